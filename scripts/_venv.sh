# Sourced by scripts/test.sh and scripts/bench.sh: create ./.venv if needed and install
# fastdpo with the given extras.  torch==2.13.0 goes first: on our machines it is a local CPU
# wheel, while an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]"
