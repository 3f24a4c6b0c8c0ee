# Sourced by scripts/test.sh, scripts/bench.sh and scripts/test_newest.sh: create the virtual
# environment if needed and install fastdpo with the given extras.  torch==2.13.0 goes first: on
# our machines it is a local CPU wheel, while an unpinned torch pulled in by a dependency would be
# a multi-GB CUDA build.
#
# Everything else is pinned by constraints.txt (the versions the suite was last run and passed
# with), so a new release of a dependency cannot change what CI tests.  With FASTDPO_NEWEST=1
# (scripts/test_newest.sh) the environment is ./.venv-newest instead, and every dependency is
# upgraded to its newest release that pyproject.toml's ranges admit (torch stays 2.13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
PIP_FLAGS=(-q --disable-pip-version-check)
if [ "${FASTDPO_NEWEST:-0}" = 1 ]; then
    VENV=.venv-newest
    DEPS=(--upgrade --upgrade-strategy eager torch==2.13.0)  # (named: eager would take a CUDA torch)
else
    VENV=.venv
    DEPS=(-c constraints.txt)
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" "${DEPS[@]}" -e ".[$1]"
