"""Cost model of the fused head's two CUDA routes, and the rule that picks between them
(when packing a batch pays is :func:`fastdpo.batching.packing.choose_layout`).

Dimensions: M counted rows (completion tokens), M_all every row (prompts and padding too),
D hidden size, V vocabulary; e bytes per logit (2 for bf16/fp16, 4 for float32).

Both routes compute the policy's scores and gradients and the reference's scores exactly;
what differs is who multiplies and which rows:

* ``"torch"`` (the three-product route): the library's matrix products (cuBLAS) over the
  counted rows only, with fastdpo's Triton kernels for the elementwise fold.  Policy: one
  product forward, two backward (the DPO head op keeps each group's logits, so none is
  recomputed), and the fold's passes over the logits: the statistics read them once, the
  gradient kernel reads and writes them once (3 e V bytes a row).  Reference: one product
  and one read.
* ``"triton"`` (the cut-cross-entropy-style route): Triton GEMM kernels over every row (no
  host sync to count them).  Policy: one product forward; backward recomputes the logits in
  both of its kernels (four products).  Each backward kernel also reads and writes its float32
  accumulator once per tile of the other dimension: grad_hidden's (BLOCK_M x D) rows once per
  128-wide vocabulary tile, grad_weight's (BLOCK_V x D) rows once per 128-row block: 8 bytes
  (a float32 read and write) x D x V / 128 = ``D V / 16`` bytes a row for each kernel, about
  1 TB per kernel at M_all = 32768, D = 4096, V = 128256, counted here as HBM traffic (at D = 4096 a wave of programs holds ~130 MiB of accumulators, against 50 MiB of
  L2 on an H100).  Reference: one product.

Rates (:data:`H100`): the bf16 product rate and copy bandwidth of the H100 machines lent to
this project, from their spec sheet (and checked there: docs/performance-log.md), float32 products at
51 TFLOP/s (IEEE, no TF32: 75% of the H100's 67 TFLOP/s), and a Triton GEMM efficiency of 50%
of those rates.  That efficiency is an assumption, not a measurement: Triton's own Hopper
matmul reaches 70-80% of cuBLAS on large square products, and these kernels run an exp/max/sum
epilogue on every tile, split the vocabulary, and use 128 x 128 x 32 tiles with 3 stages;
``benchmarks/gpu_suite.py`` times both routes and prints which one the rule should pick.  Until
a GPU run replaces these figures, the rule follows the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    """Rates of one GPU: matrix products per dtype width (FLOP/s), memory bandwidth (B/s)."""

    name: str
    mm_16bit: float
    mm_fp32: float
    bandwidth: float
    triton_gemm_efficiency: float


H100 = Device("H100 SXM (measured rates, see module docstring)", 790e12, 51e12, 3.0e12, 0.5)

# grad_hidden's vocabulary tile and grad_weight's row block (16-bit shipped configurations).
_ACC_TILE = 128


def predict(
    matmul: str, m: int, m_all: int, d: int, v: int, dtype: torch.dtype, device: Device = H100
) -> dict[str, float]:
    """Predicted seconds of one DPO step's head work on ``device``: ``{"policy": forward +
    backward of the policy, "reference": forward of the reference, "total": both}``.

    ``matmul`` is the route ("torch": three library products over ``m`` counted rows plus the
    Triton fold; "triton": the Triton GEMM kernels over all ``m_all`` rows)."""
    e = dtype.itemsize
    rate = device.mm_16bit if e == 2 else device.mm_fp32
    product = 2.0 * d * v  # FLOPs of one head product, per row
    if matmul == "torch":
        policy = m * (3 * product / rate + 3 * e * v / device.bandwidth)
        reference = m * (product / rate + e * v / device.bandwidth)
    elif matmul == "triton":
        slow = rate * device.triton_gemm_efficiency
        accumulators = 8.0 * d * v / _ACC_TILE + 8.0 * d * v / _ACC_TILE  # bytes per row
        policy = m_all * (5 * product / slow + accumulators / device.bandwidth)
        reference = m_all * product / slow
    else:
        raise ValueError(f"matmul must be 'torch' or 'triton', got {matmul!r}")
    return {"policy": policy, "reference": reference, "total": policy + reference}


def choose_matmul(d: int, v: int, dtype: torch.dtype, device: Device = H100) -> str:
    """The route ``matmul="auto"`` takes on CUDA: the one :func:`predict` finds faster when
    every row counts (the three-product route's worst case: prompts only widen its lead)."""
    rows = 4096
    torch_route = predict("torch", rows, rows, d, v, dtype, device)["total"]
    triton_route = predict("triton", rows, rows, d, v, dtype, device)["total"]
    return "torch" if torch_route <= triton_route else "triton"


def table(rows: int = 16384, prompt_share: float = 0.5, dtype: torch.dtype = torch.bfloat16) -> str:
    """The docs' table: predicted milliseconds per step at D in {1024, 2048, 4096} and V in
    {32k, 128k}, ``rows`` rows in all of which ``1 - prompt_share`` count."""
    m = int(rows * (1 - prompt_share))
    lines = [
        f"| D | V | three products ({m} counted rows) | Triton GEMMs ({rows} rows) | ratio | rule |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for d in (1024, 2048, 4096):
        for v in (32000, 128256):
            a = predict("torch", m, rows, d, v, dtype)["total"] * 1e3
            b = predict("triton", m, rows, d, v, dtype)["total"] * 1e3
            lines.append(f"| {d} | {v} | {a:.1f} ms | {b:.1f} ms | {b / a:.1f}x | {choose_matmul(d, v, dtype)} |")
    return "\n".join(lines)
