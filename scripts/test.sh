#!/usr/bin/env bash
# Set up ./.venv from scratch if needed, then run the whole test suite on the CPU.
source "$(dirname "$0")/_venv.sh" test
exec .venv/bin/python -m pytest "$@"
