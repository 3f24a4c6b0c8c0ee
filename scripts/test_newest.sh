#!/usr/bin/env bash
# The test suite against the newest releases of every dependency that pyproject.toml's ranges
# admit, instead of constraints.txt's pinned versions (torch stays 2.13.0, the local CPU wheel),
# in its own ./.venv-newest.  Not run by CI: run it to see what the next releases break before
# moving constraints.txt forward.  Arguments go to pytest, as for scripts/test.sh.
FASTDPO_NEWEST=1 exec bash "$(dirname "$0")/test.sh" "$@"
