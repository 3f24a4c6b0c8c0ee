#!/usr/bin/env bash
# Download, into ./.whl, the wheels a lent GPU machine (Python 3.12, torch 2.11, triton 3.6,
# transformers and accelerate installed, no network) needs for the GPU suite: the reference
# (x-transformers and its einx) and the peers (Liger-Kernel, TRL, cut-cross-entropy), with every
# dependency that image lacks, pinned.  Run it here, in the repository root or anywhere in the
# checkout; it is idempotent.  See benchmarks/README.md, "On a lent GPU machine (no network)".
#
#   bash scripts/gpu_wheels.sh                  # the set below (about 2.3 MB)
#   bash scripts/gpu_wheels.sh --with-datasets  # plus datasets, for TRL's own trainer.utils
#
# Without `datasets`, trl/trainer/utils.py (which the backward of TRL's chunked log-prob kernel
# imports) does not import there; fastdpo/bench/peers.py then loads the kernel's file on its
# own, with the same code.  datasets 5.2.0 declares pyarrow>=24 and huggingface-hub>=1.31,
# versions not checked on that image: hence an option.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=${PYTHON:-python3}

PINNED=(
    x-transformers==2.31.10     # the reference; needs einops (there), einx, loguru, torch-einops-utils
    einx==0.4.3                 # needs numpy, sympy (there), frozendict
    frozendict==2.5.1
    loguru==0.7.3
    torch-einops-utils==0.2.0
    liger-kernel==0.8.5         # needs torch, triton only
    trl==1.16.0                 # trl.kernels.chunked_logprob needs transformers (there)
    cut-cross-entropy==25.1.1   # needs torch, triton only
)
DATASETS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)  # the rest of datasets' needs are there
case "${1:-}" in
    "") DROP=("${DATASETS[@]}") ;;
    --with-datasets) PINNED+=("${DATASETS[@]}"); DROP=() ;;
    *) echo "usage: $0 [--with-datasets]" >&2; exit 2 ;;
esac

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"

# A wheel's file name starts with its project name, '-' and '.' folded to '_'.
wheel_prefix() { echo "${1%%==*}" | tr 'A-Z.-' 'a-z__'; }

# One version of each package: drop wheels of a pinned package at another version, and the
# optional ones when not asked for.  Wheels of other packages in .whl are left alone.
drop() {  # drop SPEC [all]: remove .whl/PROJECT-*.whl at versions other than SPEC's (all: every version)
    local prefix keep name f
    prefix=$(wheel_prefix "$1")
    keep="${prefix}-${1##*==}-"
    for f in .whl/*.whl; do
        [ -e "$f" ] || continue
        name=$(basename "$f" | tr 'A-Z' 'a-z')
        if [[ "$name" == "${prefix}-"* && ( "${2:-}" == all || "$name" != "$keep"* ) ]]; then
            echo "removing $(basename "$f")"
            rm -f "$f"
        fi
    done
}
for spec in "${PINNED[@]}"; do drop "$spec"; done
for spec in ${DROP[@]+"${DROP[@]}"}; do drop "$spec" all; done

"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${PINNED[@]}"

# Two versions of one package in .whl would stop the install there.
dups=$(for f in .whl/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z' 'a-z'; done | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "error: .whl holds several versions of: $dups" >&2
    exit 1
fi

ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(cat .whl/*.whl | wc -c)
echo "total: $total bytes ($(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB) in $(ls .whl/*.whl | wc -l) wheels"
echo "there: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
