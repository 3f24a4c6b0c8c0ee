#!/usr/bin/env bash
# Set up ./.venv from scratch if needed, then run the benchmark suite on the default device.
# Extra arguments go to `fastdpo bench` (default: --size small).
source "$(dirname "$0")/_venv.sh" test,bench
[ $# -gt 0 ] || set -- --size small
exec "$VENV/bin/fastdpo" bench "$@"
