"""fastdpo.kernel_report: every shipped kernel compiles for sm_80 and sm_90 without spills.

Runs the report in subprocesses: triton.jit fixes interpreted vs compiled at import time
from TRITON_INTERPRET, which the tests' conftest sets on machines without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastdpo.kernels.sequence_logprobs import AOT_VOCABS


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

    built = {(r["kernel"], r["dtype"], r["V"], r["target"]) for r in rows}
    expected = {(k, d, V, t) for k in ("fwd", "fwd+ref", "bwd") for d in ("fp32", "bf16", "fp16")
                for V in AOT_VOCABS for t in ("sm_80", "sm_90")}
    assert built == expected
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared"] >= 0, r
        # Rows 16-byte aligned (V % 16 == 0): every logits load is 128 bits wide, and the
        # backward's stores too; the reference row adds its own loads.
        if r["V"] % 16 == 0:
            assert r["vectorized"], r
            assert r["loads_128"] >= (8 if r["kernel"] == "fwd+ref" else 4), r
        else:
            # Unaligned rows cannot be vector-loaded: the scan must say so, not guess.
            assert not r["vectorized"] and r["loads_128"] == 0, r


def test_reexecs_itself_out_of_interpret_mode():
    rc, report = run_report("--vocab", "2000", interpret=True)
    assert rc == 0 and report["ok"]
    assert len(report["kernels"]) == 3 * 3 * 2
    assert all(r["V"] == 2000 and r["vectorized"] for r in report["kernels"])
