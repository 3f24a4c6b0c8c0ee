#!/usr/bin/env bash
# On a lent GPU machine (no network): install the carried wheels (.whl/, made here by
# scripts/gpu_wheels.sh) into /tmp/site, then run the GPU suite from the source tree, with its
# log, gpu.json and gpu.md under $OUT/gpu (what comes back from the machine).
#
#   device run, carry [".whl"], timeout ~480 s:   bash scripts/gpu_suite.sh [gpu_suite.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-results}/gpu
mkdir -p "$OUTDIR"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; } > "$OUTDIR/nvidia-smi.csv" 2>&1
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/log.txt"
exit "${PIPESTATUS[0]}"
