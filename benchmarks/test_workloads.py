"""pytest-benchmark versions of ``fastdpo bench``'s workloads, at CPU-friendly sizes.

    pytest benchmarks/ --benchmark-only                      # every provider x workload x mode
    pytest benchmarks/ --benchmark-only -k "step and fastdpo"
    FASTDPO_BENCH_SIZE=small pytest benchmarks/ --benchmark-only   # a `fastdpo bench` preset

Each case is one provider of :data:`fastdpo.bench.PROVIDERS` on one workload and mode, the
same step callable the suite times; cases of one (workload, mode) share a benchmark group, so
pytest-benchmark prints them side by side.  Peak memory and the ratios to x-transformers and
to the floor are the suite's job (``fastdpo bench``, see README.md here): pytest-benchmark
times each case on its own, in one process.  Not part of the CI run (``testpaths = tests``).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdpo import bench

# Small enough for 2 CPU cores (the whole file in a few minutes), large enough that the head
# (2B(L-1) x V = 252 x 4096 logits) is not lost in Python overhead.
CPU_SIZE = dict(batch=2, seq_len=64, vocab=4096, dim=64, depth=1, heads=4)


def _config() -> bench.Config:
    preset = os.environ.get("FASTDPO_BENCH_SIZE")
    sizes = {k: bench.SIZES[preset][k] for k in bench.SIZE_FIELDS} if preset else CPU_SIZE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return bench.Config(**sizes, dtype=os.environ.get("FASTDPO_BENCH_DTYPE", "float32"), device=device)


CFG = _config()
CASES = [
    pytest.param(w, m, p, id=f"{w}-{m}-{p}")
    for w in bench.WORKLOADS
    for m in bench.MODES
    for p in bench.applicable(w, bench.PROVIDERS)
]


@pytest.mark.parametrize("workload, mode, provider", CASES)
def test_workload(benchmark, workload, mode, provider):
    try:
        step = bench.PROVIDERS[provider].build(workload, mode, CFG)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"{workload} {mode} ({CFG.device}, {CFG.dtype}, B={CFG.batch} L={CFG.seq_len} V={CFG.vocab})"
    benchmark.extra_info.update(provider=provider, **{k: getattr(CFG, k) for k in bench.SIZE_FIELDS})
    if CFG.device.startswith("cuda"):

        def run():
            step()
            torch.cuda.synchronize()

    else:
        run = step
    # Fixed rounds: pytest-benchmark's calibration would call a 1 s step dozens of times.
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
