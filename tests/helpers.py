"""Shared test helpers: the per-dtype tolerance table, the three-way comparison rule, models."""

from __future__ import annotations

import torch
from torch import Tensor

# Every implementation runs in CI: Triton on CPU tensors under TRITON_INTERPRET=1 (set by
# conftest.py), on the GPU when there is one.
IMPLS = ["torch", "triton"]

# The three-way rule: compare ours, the reference implementation in the input dtype, and a
# float64 truth; ours must be no further from the truth than the reference is, plus this
# per-dtype slack (absolute, on values scaled to O(1)).  Never loosened to make a test pass.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def three_way(ours: Tensor, ref: Tensor, truth: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert ``max|ours - truth| <= max|ref - truth| + TOL[dtype] * scale``."""
    truth = truth.double()
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    err_ours = (ours.double() - truth).abs().max().item() if truth.numel() else 0.0
    err_ref = (ref.double() - truth).abs().max().item() if truth.numel() else 0.0
    assert err_ours <= err_ref + TOL[dtype] * scale, (
        f"{what}: ours is {err_ours:.3g} from float64, the reference {err_ref:.3g} "
        f"(allowed slack {TOL[dtype] * scale:.3g})"
    )


def rel_err(a: Tensor, b: Tensor) -> float:
    """Norm-wise relative error of ``a`` against ``b``."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def reference_logprobs(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``sum_t mask * log_softmax(logits)[target]`` with plain torch ops (in logits' dtype)."""
    lp = logits.log_softmax(-1).gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(~mask, 0).sum(-1)


# Mantissa bits of each dtype: rounding a value to it errs by at most 2**-(bits + 1) relative.
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def float32_level(ours: Tensor, truth: Tensor, out_dtype: torch.dtype, what: str = "", ulps: float = 1.0) -> None:
    """The ops promise float32 arithmetic whatever the input dtype: against float64 on the
    upcast inputs, each element of ``ours`` (stored in ``out_dtype``) must be within ``ulps``
    half-ulps of ``out_dtype`` of the truth, plus float32 noise relative to the largest value
    (sums of float32 terms).  Tighter than torch-in-dtype (:func:`three_way`) for 16-bit."""
    truth = truth.double()
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    bound = ulps * 2.0 ** -(MANTISSA[out_dtype] + 1) * truth.abs() + 4e-6 * scale
    err = (ours.double() - truth).abs()
    worst = (err - bound).max().item() if truth.numel() else 0.0
    assert worst <= 0, f"{what}: an element is {worst:.3g} beyond float32-level rounding into {out_dtype}"


def tiny_transformer(
    num_tokens: int,
    *,
    max_seq_len: int,
    dim: int,
    depth: int,
    heads: int,
    seed: int = 0,
    tie: bool = False,
    dtype: torch.dtype | None = None,
    wrapper_kw: dict | None = None,
    **layer_kw,
):
    """The test files' small x-transformers model: ``torch.manual_seed(seed)``, then a
    ``TransformerWrapper`` over a ``Decoder(dim, depth, heads, **layer_kw)`` (``wrapper_kw``
    to the wrapper), cast to ``dtype`` if given.  Each test file's ``make_model`` fixes its own
    sizes on top of this, so one file's models never change with another's."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(seed)
    model = TransformerWrapper(
        num_tokens=num_tokens, max_seq_len=max_seq_len, tie_embedding=tie,
        attn_layers=Decoder(dim=dim, depth=depth, heads=heads, **layer_kw), **(wrapper_kw or {}),
    )
    return model if dtype is None else model.to(dtype)


def leave(procs=None) -> None:
    """End a worker process of a gloo job: ``procs.close()`` (a
    ``fastdpo.train.processes.Processes``: what is unreachable freed, then the group destroyed;
    the caller drops its runs first), then leave without the interpreter's teardown.  After
    gloo collectives (a backward through them, DDP, a sharded model), torch 2.13 sometimes
    aborts in finalization, even past ``destroy_process_group`` ("terminate called without an
    active exception", SIGABRT: 2 in 20 spawned pairs of test_sequence_parallel.py, once in a
    fresh-clone run of test_kto_distributed.py, once in CI in test_train.py's torchrun
    launch), which would fail a job whose results are saved.  pytorch/pytorch#179291."""
    import os
    import sys

    if procs is not None:
        procs.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _then_leave(rank: int, worker, *args) -> None:
    """``worker(rank, *args)``, then :func:`leave` (a worker's exception propagates as usual)."""
    worker(rank, *args)
    leave()


def spawned_job(worker, world: int, out, timeout_s: float, *extra) -> tuple:
    """Run ``worker(rank, world, port, str(out), *extra)`` once in each of ``world`` fresh
    processes (spawned; ``port`` a free one for gloo's rendezvous), bounded by ``timeout_s``
    (``pytest.fail`` past it; a worker's exception is raised here), and return every rank's
    results, which each worker saved with ``torch.save`` as ``out/rank{rank}.pt``.  A worker
    that returned leaves without the interpreter's teardown (:func:`leave`).  Only the
    processes started here are stopped on the way out."""
    import time

    import pytest
    import torch.multiprocessing as mp

    from benchmarks.fsdp_memory import _free_port

    ctx = mp.start_processes(_then_leave, args=(worker, world, _free_port(), str(out), *extra), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):  # raises ProcessRaisedException if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process job did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return tuple(torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(world))
