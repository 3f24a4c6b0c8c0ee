"""fastdpo.kernel_report: every shipped kernel compiles for sm_80 and sm_90 without spills.

Runs the report in subprocesses: triton.jit fixes interpreted vs compiled at import time
from TRITON_INTERPRET, which the tests' conftest sets on machines without CUDA.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdpo.kernel_report import SMEM_LIMIT, Row
from fastdpo.kernels.linear_sequence_logprobs import AOT_SHAPES
from fastdpo.kernels.sequence_logprobs import AOT_VOCABS, CAP_BLOCK_V


def run_report(*args: str, interpret: bool) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "fastdpo.kernel_report", "--json", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON from the report (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def test_every_shipped_kernel_compiles_without_spills():
    rc, report = run_report(interpret=False)
    rows = report["kernels"]
    failures = [r for r in rows if not r["ok"] or r["spill_stores"] or r["spill_loads"]]
    assert not failures, failures
    assert rc == 0 and report["ok"]

    sequence = [r for r in rows if r["family"] == "sequence"]
    linear = [r for r in rows if r["family"] == "linear"]
    assert len(sequence) + len(linear) == len(rows)
    built = {(r["kernel"], r["dtype"], r["V"], r["target"]) for r in sequence}
    expected = {(k, d, V, t) for k in ("fwd", "fwd+ref", "fwd+sq", "fwd+cap", "bwd", "bwd+cap") for d in ("fp32", "bf16", "fp16")
                for V in AOT_VOCABS for t in ("sm_80", "sm_90")}
    assert built == expected
    for r in sequence:
        assert 0 < r["registers"] <= 255 and r["shared"] >= 0, r
        # Rows 16-byte aligned (V % 16 == 0): every logits load is 128 bits wide, and the
        # backward's stores too: a block's bytes over its threads' 16-byte loads (4 per thread
        # but in the softcap's smaller 16-bit blocks, 2); the reference row adds its own loads.
        if r["V"] % 16 == 0:
            assert r["vectorized"], r
            per_thread = r["block_v"] * {"fp32": 4, "bf16": 2, "fp16": 2}[r["dtype"]] // (32 * r["num_warps"] * 16)
            capped16 = r["kernel"].endswith("+cap") and r["dtype"] != "fp32" and r["block_v"] == CAP_BLOCK_V
            assert per_thread == (2 if capped16 else 4), r
            assert r["loads_128"] >= per_thread * (2 if r["kernel"] == "fwd+ref" else 1), r
        else:
            # Unaligned rows cannot be vector-loaded: the scan must say so, not guess.
            assert not r["vectorized"] and r["loads_128"] == 0, r

    built = {(r["kernel"], r["dtype"], r["D"], r["V"], r["target"]) for r in linear}
    expected = {(k, d, D, V, t) for k in ("lin_fwd", "lin_bwd_h", "lin_bwd_w") for d in ("fp32", "bf16", "fp16")
                for D, V in AOT_SHAPES for t in ("sm_80", "sm_90")}
    expected |= {("lin_combine", "fp32", 0, next(iter(AOT_SHAPES))[1], t) for t in ("sm_80", "sm_90")}
    assert built == expected
    for r in linear:
        assert 0 < r["registers"] <= 255 and 0 <= r["shared"] <= SMEM_LIMIT[int(r["target"][3:])], r
        if r["kernel"] != "lin_combine":
            # The launchers align every row: the hidden and weight tiles arrive by 16-byte
            # cp.async; 16-bit tiles use tensor cores, float32 ones IEEE FMAs (no TF32).
            assert r["vectorized"] and r["cp_async_128"] >= 2, r
            assert (r["mma"] > 0) == (r["dtype"] != "fp32"), r


def test_row_failure_rules():
    # What makes the report exit 1, on hand-made rows (no compiling).
    def row(**kw):
        base = dict(kernel="lin_fwd", dtype="bf16", V=128, block_v=64, num_warps=4, target="sm_80", ok=True,
                    registers=100, spill_stores=0, spill_loads=0, shared=1024, family="linear",
                    cp_async_128=4, mma=8, vec_expected=True, tensor_cores_expected=True)
        return Row(**{**base, **kw})

    assert not row().failed
    assert row(ok=False).failed
    assert row(spill_loads=4).failed
    assert row(shared=SMEM_LIMIT[80] + 1).failed and not row(shared=SMEM_LIMIT[80] + 1, target="sm_90").failed
    assert row(cp_async_128=0).failed
    assert row(mma=0).failed and row(dtype="fp32", tensor_cores_expected=False).failed
    assert not row(dtype="fp32", tensor_cores_expected=False, mma=0).failed


def test_reexecs_itself_out_of_interpret_mode():
    rc, report = run_report("--vocab", "2000", interpret=True)
    assert rc == 0 and report["ok"]
    assert len(report["kernels"]) == 6 * 3 * 2  # fwd, fwd+ref, fwd+sq, fwd+cap, bwd, bwd+cap; 3 dtypes; 2 targets
    assert all(r["V"] == 2000 and r["vectorized"] for r in report["kernels"])


def test_launch_argument_builders_follow_each_kernels_signature():
    """The launchers pass each builder's values positionally and the AOT specs come from the
    same builders: their keys must be the kernel's non-constexpr parameters, in order."""
    from fastdpo.kernels import linear_sequence_logprobs as lin
    from fastdpo.kernels import sequence_logprobs as seq
    from fastdpo.kernels._common import Example

    def params(kernel):
        fn = kernel
        while hasattr(fn, "fn"):  # heuristics -> JIT (or interpreted) function -> Python function
            fn = fn.fn
        sig = inspect.signature(fn)
        return [n for n, p in sig.parameters.items() if "constexpr" not in str(p.annotation)]

    f32, ex = torch.float32, Example(torch.float32, 2, 3, 4)
    cases = [
        (seq._sequence_logprobs_fwd_kernel, seq._fwd_args(ex, ex, ex, ex, ex, ex, ex, ex, 3, 4, 1.0)),
        (seq._sequence_logprobs_bwd_kernel, seq._bwd_args(ex, ex, ex, ex, ex, ex, 3, 4, 1.0)),
        (lin._lse_partials_kernel, lin._fwd_args(ex, ex, ex, [ex] * 3, 4, 4, 2, 5, 4, 1.0)),
        (lin._lse_combine_kernel, lin._combine_args([ex] * 3, ex, ex, ex, 2, 5, 3)),
        (lin._grad_hidden_kernel, lin._grad_hidden_args(ex, ex, ex, ex, ex, ex, ex, 4, 4, 2, 5, 4, 1.0, True)),
        (lin._grad_weight_kernel, lin._grad_weight_args(ex, ex, ex, ex, ex, ex, ex, 4, 4, 2, 5, 4, 1.0)),
    ]
    for kernel, args in cases:
        assert list(args) == params(kernel), kernel
    assert Example(f32, 2, 3, 4).stride(0) == 12 and Example(f32, 2, 3, 4).stride(-1) == 1
    assert Example(f32, 2, 3, strides=(1, 0)).stride(1) == 0
