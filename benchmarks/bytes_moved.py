"""Bytes-moved model of one DPO loss-head step on a GPU: x-transformers' path vs fastdpo's.

    python benchmarks/bytes_moved.py [--n 16 --t 2048 --v 128256 --dtype-bytes 2 --bandwidth 3.0e12]

The loss head of a DPO step is memory-bound: per logit it does a handful of flops, so its
time is the traffic through device memory divided by the bandwidth.  Given the policy and the
reference logits (N sequences x T positions x V, N = 2B), the step must at least

* read the policy logits once forward and once backward (the softmax is recomputed from the
  saved row logsumexp, or kept -- which costs a write and a read of the same size),
* write the gradient once,
* read the reference logits once.

Counts are in logit-sized tensors (``S = N*T*V`` elements of ``dtype_bytes``) and ignore
O(N*T) traffic (targets, masks, per-row statistics).  x-transformers' path is counted pass by
pass from its code (``log_softmax`` + ``gather`` + masked mean, per model, then autograd);
how many times PyTorch's softmax kernels re-read a row depends on the kernel chosen for the
row length, so it is given as a range: "low" assumes every kernel streams its inputs once
(an online max+sum), "high" the classic two-read forward (max, then sum and write) and a
two-read backward (row sum of the gradient, then the update).  Every row is counted (no
prompt): prompt rows only widen the gap, since fastdpo's kernels never read them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Pass:
    what: str
    reads: float  # logit-sized tensors read
    writes: float  # logit-sized tensors written


def xtransformers_passes(high: bool) -> list[Pass]:
    r = 2.0 if high else 1.0  # reads per softmax-type pass over a row
    return [
        Pass("reference log_softmax (no_grad)", r, 1),
        Pass("reference gather", 0, 0),
        Pass("policy log_softmax (output saved for backward)", r, 1),
        Pass("policy gather", 0, 0),
        Pass("backward of gather: zeros + scatter into a logit-sized gradient", 0, 1),
        Pass("backward of log_softmax: grad - exp(out) * rowsum(grad)", r + 1, 1),
    ]


def fastdpo_passes() -> list[Pass]:
    return [
        Pass("forward kernel: policy and reference rows, online logsumexp + target", 2, 0),
        Pass("backward kernel: g * (onehot - exp(z - lse)), written once", 1, 1),
    ]


def minimum_passes() -> list[Pass]:
    return [
        Pass("policy logits read forward", 1, 0),
        Pass("reference logits read", 1, 0),
        Pass("policy logits read backward", 1, 0),
        Pass("gradient written", 0, 1),
    ]


def traffic(passes: list[Pass], elems: int, dtype_bytes: int) -> float:
    return sum(p.reads + p.writes for p in passes) * elems * dtype_bytes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="sequences (2B)")
    p.add_argument("--t", type=int, default=2048, help="positions per sequence")
    p.add_argument("--v", type=int, default=128256, help="vocabulary")
    p.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16, 4 for fp32")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100: 3.0e12 measured)")
    args = p.parse_args(argv)
    elems = args.n * args.t * args.v
    size = elems * args.dtype_bytes
    print(
        f"N={args.n} T={args.t} V={args.v}, {args.dtype_bytes}-byte logits: one logits tensor is "
        f"{size / 1e9:.2f} GB; bandwidth {args.bandwidth / 1e12:.1f} TB/s\n"
    )
    floor = traffic(minimum_passes(), elems, args.dtype_bytes)
    rows = [
        ("minimum", minimum_passes()),
        ("fastdpo kernels", fastdpo_passes()),
        ("x-transformers (low)", xtransformers_passes(high=False)),
        ("x-transformers (high)", xtransformers_passes(high=True)),
    ]
    print(f"{'path':24} {'GB moved':>9} {'vs minimum':>10} {'time ms':>8}")
    for name, passes in rows:
        t = traffic(passes, elems, args.dtype_bytes)
        print(f"{name:24} {t / 1e9:9.1f} {t / floor:9.2f}x {t / args.bandwidth * 1e3:8.1f}")
    for name, passes in rows[1:]:
        print(f"\n{name}:")
        for ps in passes:
            print(f"  {ps.what:70} {ps.reads:g} read, {ps.writes:g} written")


if __name__ == "__main__":
    main()
