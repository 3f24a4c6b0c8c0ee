"""fastdpo.kernels.sequence_logprobs against a float64 ground truth and torch in the input dtype.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
the tests' conftest before triton is imported), so sizes stay small; the shipped block
sizes run once on a vocabulary spanning several of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdpo.kernels.sequence_logprobs import (
    _default_config,
    sequence_logprobs_backward,
    sequence_logprobs_forward,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

# Slack allowed beyond torch-in-dtype's own distance to float64, as (atol, rtol), in one
# place. Scores are float32 sums. A gradient element is exp(z - lse) computed in float32,
# whose relative error grows like |z - lse| * 2**-24 (about 2**-20 at |lse| ~ 16, torch's
# own error is of that size too, on other elements): 2**-18; then it is rounded once to the
# input dtype: half an ulp, 2**-(mantissa bits + 1), with the atol covering the subnormal
# step. Triton 3.9's interpreter casts float32 -> bfloat16 by truncation, not to nearest
# (runtime/interpreter.py: cast_impl -> _convert_float with no rounding mode): a whole ulp.
_F32_EXP = 2**-18
TOL = {
    torch.float32: {"scores": (1e-5, 1e-6), "grad": (1e-12, _F32_EXP)},
    torch.bfloat16: {"scores": (1e-5, 1e-6), "grad": (2**-133, (2**-7 if INTERPRET else 2**-8) + _F32_EXP)},
    torch.float16: {"scores": (1e-5, 1e-6), "grad": (2**-24, 2**-11 + _F32_EXP)},
}
DTYPES = list(TOL)

# (N, T, V, BLOCK_V override or None for the shipped configuration)
SHAPES = [
    pytest.param(2, 3, 2, None, id="V=2"),
    pytest.param(2, 4, 100, None, id="V<BLOCK_V"),
    pytest.param(3, 4, 300, 64, id="V%BLOCK_V!=0"),
    pytest.param(4, 1, 256, 64, id="T=1,EVEN_V"),
    pytest.param(2, 3, 9000, None, id="shipped-blocks"),
]


def make_inputs(N, T, V, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (N, T), generator=gen)
    mask = torch.rand(N, T, generator=gen) < 0.7
    mask[0] = False  # one sequence with no counted row at all
    if N > 1:
        mask[1, 0] = True
    return logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE)


def torch_scores(logits, targets, mask):
    """The per-sequence score in torch, in logits' own dtype (float64 for the ground truth)."""
    logp = torch.log_softmax(logits, dim=-1)
    tok = logp.gather(-1, targets.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok)).sum(-1)


def torch_grad(logits, targets, mask, grad_scores):
    x = logits.detach().clone().requires_grad_(True)
    (torch_scores(x, targets, mask) * grad_scores.to(x.dtype)).sum().backward()
    return x.grad


def assert_three_way(ours, truth, ref, atol, rtol, what):
    """ours no further from float64 than torch-in-dtype, elementwise, plus (atol, rtol)."""
    ours, truth, ref = ours.double().cpu(), truth.double().cpu(), ref.double().cpu()
    assert torch.isfinite(ours).all() and torch.isfinite(truth).all(), what
    err_ours, err_ref = (ours - truth).abs(), (ref - truth).abs()
    bound = err_ref + atol + rtol * truth.abs()
    worst = (err_ours - bound).argmax()
    assert (err_ours <= bound).all(), (
        f"{what}: |ours - f64| = {err_ours.flatten()[worst]:.3g} > |torch - f64| + tol = "
        f"{bound.flatten()[worst]:.3g} at flat index {worst.item()}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, T, V, block_v", SHAPES)
def test_forward_backward(N, T, V, block_v, dtype):
    logits, targets, mask = make_inputs(N, T, V, dtype)
    scores, ref_scores, lse = sequence_logprobs_forward(logits, targets, mask, _block_v=block_v)
    assert ref_scores is None
    assert scores.dtype == lse.dtype == torch.float32 and scores.shape == (N,) and lse.shape == (2, N, T)
    truth = torch_scores(logits.double(), targets, mask)
    atol, rtol = TOL[dtype]["scores"]
    assert_three_way(scores, truth, torch_scores(logits, targets, mask), atol, rtol, "scores")
    assert (scores[0] == 0).all()
    # the stats are each row's max and log-sum; together, its logsumexp
    assert_three_way(lse.sum(0)[mask], torch.logsumexp(logits.double(), -1)[mask],
                     torch.logsumexp(logits, -1)[mask], atol, rtol, "lse")

    grad_scores = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grad = sequence_logprobs_backward(logits, targets, mask, lse, grad_scores, _block_v=block_v)
    assert grad.dtype == dtype and grad.shape == (N, T, V)
    atol, rtol = TOL[dtype]["grad"]
    assert_three_way(grad, torch_grad(logits.double(), targets, mask, grad_scores.double()),
                     torch_grad(logits, targets, mask, grad_scores), atol, rtol, "grad")
    assert (grad[~mask] == 0).all()

    # In place: the same bits, written over the logits, returned as the same tensor.
    buf = logits.clone()
    out = sequence_logprobs_backward(buf, targets, mask, lse, grad_scores, inplace=True, _block_v=block_v)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, grad)


@pytest.mark.parametrize("dtype, ref_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float16),
], ids=str)
@pytest.mark.parametrize("N, T, V, block_v", [SHAPES[2], SHAPES[3]])
def test_reference_logits(N, T, V, block_v, dtype, ref_dtype):
    logits, targets, mask = make_inputs(N, T, V, dtype)
    ref_logits, _, _ = make_inputs(N, T, V, ref_dtype, seed=7, scale=2.0)
    scores, ref_scores, lse = sequence_logprobs_forward(logits, targets, mask, ref_logits, _block_v=block_v)
    alone, none, lse_alone = sequence_logprobs_forward(logits, targets, mask, _block_v=block_v)
    assert none is None and torch.equal(scores, alone) and torch.equal(lse, lse_alone)
    atol, rtol = TOL[ref_dtype]["scores"]
    assert_three_way(ref_scores, torch_scores(ref_logits.double(), targets, mask),
                     torch_scores(ref_logits, targets, mask), atol, rtol, "ref_scores")


def test_noncontiguous_inputs():
    N, T, V, Vpad, dtype = 3, 4, 200, 232, torch.bfloat16
    logits, targets, mask = make_inputs(N, T, V, dtype)
    # (T, N, Vpad) storage seen as (N, T, V): transposed N/T and a V slice of a wider row.
    wide = torch.randn(T, N, Vpad, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    wide[:, :, :V] = logits.transpose(0, 1)
    view = wide.transpose(0, 1)[:, :, :V]
    t_targets = targets.t().contiguous().t()
    t_mask = mask.t().contiguous().t()
    # V stride 2: the launcher has to make it contiguous in V.
    ref_store = torch.randn(N, T, 2 * V, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ref_logits = ref_store[:, :, ::2]
    assert not view.is_contiguous() and not t_targets.is_contiguous() and ref_logits.stride(-1) == 2

    scores, ref_scores, lse = sequence_logprobs_forward(view, t_targets, t_mask, ref_logits, _block_v=64)
    expect, expect_ref, expect_lse = sequence_logprobs_forward(
        logits, targets, mask, ref_logits.contiguous(), _block_v=64)
    assert torch.equal(scores, expect) and torch.equal(ref_scores, expect_ref) and torch.equal(lse, expect_lse)

    grad_scores = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    expect_grad = sequence_logprobs_backward(logits, targets, mask, lse, grad_scores, _block_v=64)
    grad = sequence_logprobs_backward(view, t_targets, t_mask, lse, grad_scores, _block_v=64)
    assert torch.equal(grad, expect_grad)
    # In place into the strided view: the padding columns beyond V stay untouched.
    pad_before = wide[:, :, V:].clone()
    out = sequence_logprobs_backward(view, t_targets, t_mask, lse, grad_scores, inplace=True, _block_v=64)
    assert out.data_ptr() == view.data_ptr() and torch.equal(out, expect_grad)
    assert torch.equal(wide[:, :, V:], pad_before)


def capped(logits, cap):
    """Gemma 2's cap, in the logits' own dtype (float64 for the ground truth)."""
    return torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, T, V, block_v", SHAPES)
@pytest.mark.parametrize("cap, scale", [(5.0, 20.0), (50.0, 3.0)], ids=["saturating", "gentle"])
def test_softcap(N, T, V, block_v, dtype, cap, scale):
    """softcap: the rows scored as ``cap * tanh(z / cap)`` and differentiated through it, no
    further from float64 than torch's own cap in the input dtype: logits deep in the tanh's
    saturation (|z| ~ 20 against a cap of 5) and near 0 (where the kernel's tanh switches to
    its series), tail blocks and the shipped blocks."""
    logits, targets, mask = make_inputs(N, T, V, dtype, scale=scale)
    scores, _, stats = sequence_logprobs_forward(logits, targets, mask, softcap=cap, _block_v=block_v)
    atol, rtol = TOL[dtype]["scores"]
    truth = torch_scores(capped(logits.double(), cap), targets, mask)
    assert_three_way(scores, truth, torch_scores(capped(logits, cap), targets, mask), atol, rtol, "scores")
    assert_three_way(stats.sum(0)[mask], torch.logsumexp(capped(logits.double(), cap), -1)[mask],
                     torch.logsumexp(capped(logits, cap), -1)[mask], atol, rtol, "lse")
    if cap < scale:  # the cap changed every score
        plain, _, _ = sequence_logprobs_forward(logits, targets, mask, _block_v=block_v)
        assert (plain - scores)[mask.any(-1)].abs().min() > 1e-3

    def through_cap(z, targets, mask, g):
        x = z.detach().clone().requires_grad_(True)
        (torch_scores(capped(x, cap), targets, mask) * g.to(x.dtype)).sum().backward()
        return x.grad

    g = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grad = sequence_logprobs_backward(logits, targets, mask, stats, g, softcap=cap, _block_v=block_v)
    atol, rtol = TOL[dtype]["grad"]
    assert_three_way(grad, through_cap(logits.double(), targets, mask, g.double()),
                     through_cap(logits, targets, mask, g), atol, rtol, "grad")
    assert (grad[~mask] == 0).all()
    buf = logits.clone()
    sequence_logprobs_backward(buf, targets, mask, stats, g, inplace=True, softcap=cap, _block_v=block_v)
    assert torch.equal(buf, grad)


def test_softcap_of_infinities():
    """A cap makes infinite logits finite (+-cap), as the model's own tanh does; the gradient
    at them is 0."""
    N, T, V, cap = 1, 2, 200, 5.0
    logits, targets, mask = make_inputs(N, T, V, torch.float32)
    mask[:] = True
    logits[0, 0, :70] = float("-inf")
    logits[0, 1, 3] = float("inf")
    targets[0, 0] = 5  # a -inf target: log-prob -2 cap - log(...), finite
    scores, _, stats = sequence_logprobs_forward(logits, targets, mask, softcap=cap, _block_v=64)
    truth = torch_scores(capped(logits.double(), cap), targets, mask)
    assert torch.isfinite(scores).all()
    assert torch.allclose(scores.double().cpu(), truth.cpu(), rtol=1e-6, atol=1e-5)
    grad = sequence_logprobs_backward(logits, targets, mask, stats, torch.ones(N), softcap=cap, _block_v=64)
    assert torch.isfinite(grad).all() and (grad[0, 0, :70] == 0).all() and grad[0, 1, 3] == 0


def test_infinities():
    N, T, V, block_v = 2, 3, 200, 64
    logits, targets, mask = make_inputs(N, T, V, torch.float32)
    mask[:] = True
    logits[0, 0, :128] = float("-inf")  # the first two blocks all -inf: running max stays -inf
    targets[0, 0] = 150
    logits[0, 1, 64:128] = float("-inf")  # an all -inf block after a finite one
    logits[0, 2, targets[0, 2]] = float("-inf")  # a -inf target logit
    logits[1, 0, :] = float("-inf")
    logits[1, 0, 5] = 0.0  # all but one -inf: log-prob exactly 0 at that one
    targets[1, 0] = 5

    scores, _, lse = sequence_logprobs_forward(logits, targets, mask, _block_v=block_v)
    assert scores[0] == float("-inf")
    truth = torch_scores(logits.double(), targets, mask)
    assert torch.allclose(scores[1].double().cpu(), truth[1].cpu(), rtol=1e-6, atol=1e-5)
    rows = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.isfinite(lse).all()
    # per-row values, through single-row masks
    for t in (0, 1):
        one = torch.zeros_like(mask)
        one[0, t] = True
        s, _, _ = sequence_logprobs_forward(logits, targets, one, _block_v=block_v)
        assert torch.allclose(s[0].double().cpu(), rows[0, t].cpu(), rtol=1e-6, atol=1e-5)

    grad_scores = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad = sequence_logprobs_backward(logits, targets, mask, lse, grad_scores, _block_v=block_v)
    assert torch.isfinite(grad).all()
    expect = torch_grad(logits.double(), targets, mask, grad_scores.double())
    assert torch.allclose(grad.double().cpu(), expect.cpu(), rtol=1e-5, atol=1e-7)


def test_out_of_range_targets():
    N, T, V = 3, 4, 100
    logits, targets, mask = make_inputs(N, T, V, torch.float32)
    mask[:] = True
    mask[2, 1] = False
    targets[0, 2] = V           # counted, one past the end
    targets[1, 3] = -1          # counted, negative
    targets[2, 1] = 2**40       # masked: ignored
    scores, _, lse = sequence_logprobs_forward(logits, targets, mask, _block_v=64)
    assert torch.isnan(scores[:2]).all()
    truth = torch_scores(logits.double(), targets, mask)
    assert torch.allclose(scores[2].double().cpu(), truth[2].cpu(), rtol=1e-6, atol=1e-5)

    grad = sequence_logprobs_backward(logits, targets, mask, lse, torch.ones(N, device=DEVICE), _block_v=64)
    assert torch.isnan(grad[0, 2]).all() and torch.isnan(grad[1, 3]).all()
    assert (grad[2, 1] == 0).all()
    ok = mask.clone()
    ok[0, 2] = ok[1, 3] = False
    assert torch.isfinite(grad[ok]).all()
    expect = torch_grad(logits.double(), targets, ok, torch.ones(N, dtype=torch.float64, device=DEVICE))
    assert torch.allclose(grad[ok].double().cpu(), expect[ok].cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_in_masked_rows_ignored(dtype):
    N, T, V = 2, 3, 150
    logits, targets, mask = make_inputs(N, T, V, dtype)
    mask[:] = True
    mask[1, 1] = False
    logits[1, 1, :] = float("nan")
    logits[1, 1, 3] = float("inf")
    logits[0, 2, 7] = float("nan")  # counted: poisons sequence 0 only
    scores, _, lse = sequence_logprobs_forward(logits, targets, mask, _block_v=64)
    assert torch.isnan(scores[0])
    truth = torch_scores(logits.double(), targets, mask)
    assert torch.allclose(scores[1].double().cpu(), truth[1].cpu(), rtol=1e-6, atol=1e-5)
    grad = sequence_logprobs_backward(logits, targets, mask, lse, torch.ones(N, device=DEVICE), _block_v=64)
    assert (grad[1, 1] == 0).all() and torch.isfinite(grad[1]).all()
    assert torch.isnan(grad[0, 2]).all()


def test_deterministic():
    N, T, V = 4, 5, 300
    logits, targets, mask = make_inputs(N, T, V, torch.bfloat16)
    ref_logits, _, _ = make_inputs(N, T, V, torch.bfloat16, seed=9)
    grad_scores = torch.randn(N, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    runs = []
    for _ in range(2):
        s, r, lse = sequence_logprobs_forward(logits, targets, mask, ref_logits, _block_v=128)
        g = sequence_logprobs_backward(logits, targets, mask, lse, grad_scores, _block_v=128)
        runs.append((s, r, lse, g))
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.view(torch.int32),
                           b.view(torch.uint8) if b.dtype != torch.float32 else b.view(torch.int32))


def test_row_offsets_beyond_int32():
    # Sequence n=2 starts 2**31 + 32 elements into the logits; int32 offsets would wrap (and
    # crash or read the wrong row), so this runs in a subprocess. The storage is virtual:
    # only the three touched rows are ever written.
    code = textwrap.dedent(f"""
        import torch
        from fastdpo.kernels.sequence_logprobs import sequence_logprobs_forward, sequence_logprobs_backward
        V, S, dev = 64, 2**30 + 16, {DEVICE!r}
        buf = torch.empty(2 * S + V, dtype=torch.bfloat16, device=dev)
        x = buf.as_strided((3, 1, V), (S, V, 1))
        x.copy_(torch.randn(3, 1, V, generator=torch.Generator().manual_seed(0)).to(dev))
        y = torch.tensor([[1], [2], [3]], device=dev)
        m = torch.ones(3, 1, dtype=torch.bool, device=dev)
        truth = torch.log_softmax(x.double(), -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)
        s, _, lse = sequence_logprobs_forward(x, y, m)
        assert torch.allclose(s.double(), truth, atol=1e-5), (s, truth)
        g = torch.tensor([1.0, 2.0, 3.0], device=dev)
        expect = sequence_logprobs_backward(x.contiguous(), y, m, lse, g)
        out = sequence_logprobs_backward(x, y, m, lse, g, inplace=True)
        assert torch.equal(out, expect)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_empty_and_shipped_config():
    logits = torch.randn(0, 3, 10, device=DEVICE)
    targets = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    mask = torch.ones(0, 3, dtype=torch.bool, device=DEVICE)
    s, r, lse = sequence_logprobs_forward(logits, targets, mask, logits)
    assert s.shape == r.shape == (0,) and lse.shape == (2, 0, 3)
    assert sequence_logprobs_backward(logits, targets, mask, lse, s).shape == (0, 3, 10)
    logits = torch.randn(2, 0, 10, device=DEVICE)
    s, r, _ = sequence_logprobs_forward(logits, targets.reshape(2, 0), mask.reshape(2, 0))
    assert torch.equal(s, torch.zeros(2, device=DEVICE)) and r is None
    # the shipped configuration: 16 KiB of a row per iteration, four 128-bit loads per thread
    assert _default_config(128256, torch.float32) == (4096, 8)
    assert _default_config(128256, torch.bfloat16) == (8192, 8)
    assert _default_config(2, torch.float16) == (16, 1)


def test_opt_in_autotune(monkeypatch):
    """FASTDPO_AUTOTUNE=1 benchmarks several configurations (a CPU timer stands in for
    do_bench under the interpreter) and gives the fixed configuration's results; the in-place
    backward tunes out of place on a few rows and never restores (clones) the logits."""
    import time

    from fastdpo.kernels import sequence_logprobs as k

    N, T, V = 2, 3, 3000  # BLOCK_V 1024..4096 fit V: 9 configurations to try
    logits, targets, mask = make_inputs(N, T, V, torch.float16)
    grad_scores = torch.randn(N, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    s, _, lse = sequence_logprobs_forward(logits, targets, mask)
    g = sequence_logprobs_backward(logits, targets, mask, lse, grad_scores)

    timed = []

    def cpu_bench(kernel_call, quantiles):
        t0 = time.perf_counter()
        kernel_call()
        timed.append(1)
        ms = (time.perf_counter() - t0) * 1e3
        return [ms, ms, ms]

    for tuner in (k._fwd_autotuned, k._bwd_autotuned):
        monkeypatch.setattr(tuner, "_do_bench", cpu_bench)
        monkeypatch.setattr(tuner, "cache", {})
    assert not hasattr(k, "_bwd_inplace_autotuned")  # no restore_value path left
    monkeypatch.setenv("FASTDPO_AUTOTUNE", "1")
    s_at, _, lse_at = sequence_logprobs_forward(logits, targets, mask)
    assert len(timed) >= 2, "autotuning tried fewer than two configurations"
    assert torch.allclose(s_at, s, rtol=1e-6, atol=1e-6) and torch.allclose(lse_at, lse, rtol=1e-6, atol=1e-6)
    before = len(timed)
    g_at = sequence_logprobs_backward(logits.clone(), targets, mask, lse, grad_scores, inplace=True)
    assert len(timed) - before >= 2
    assert k._bwd_autotuned.best_config.kwargs["BLOCK_V"] in (1024, 2048, 4096)
    assert torch.allclose(g_at.float(), g.float(), rtol=2**-10, atol=1e-6)
    g_out = sequence_logprobs_backward(logits, targets, mask, lse, grad_scores)
    assert torch.allclose(g_out.float(), g.float(), rtol=2**-10, atol=1e-6)


def test_validation():
    N, T, V = 2, 3, 10
    logits, targets, mask = make_inputs(N, T, V, torch.float32)
    lse = torch.zeros(2, N, T, device=DEVICE)  # the row stats (max, log-sum)
    gs = torch.zeros(N, device=DEVICE)
    fwd, bwd = sequence_logprobs_forward, sequence_logprobs_backward
    cases = [
        (TypeError, "logits", lambda: fwd(logits.double(), targets, mask)),
        (ValueError, "logits", lambda: fwd(logits[0], targets, mask)),
        (TypeError, "targets", lambda: fwd(logits, targets.int(), mask)),
        (ValueError, "targets", lambda: fwd(logits, targets[:, :2], mask)),
        (TypeError, "mask", lambda: fwd(logits, targets, mask.to(torch.uint8))),
        (ValueError, "mask", lambda: fwd(logits, targets, mask.t())),
        (ValueError, "ref_logits", lambda: fwd(logits, targets, mask, logits[:, :, :5])),
        (TypeError, "ref_logits", lambda: fwd(logits, targets, mask, logits.double())),
        (ValueError, "stats", lambda: bwd(logits, targets, mask, lse.half(), gs)),
        (ValueError, "grad_scores", lambda: bwd(logits, targets, mask, lse, gs[:1])),
        (TypeError, "grad_scores", lambda: bwd(logits, targets, mask, lse, gs.double())),
        (ValueError, "inplace", lambda: bwd(logits[:, :, ::2], targets, mask, lse, gs, inplace=True)),
        (ValueError, "softcap", lambda: fwd(logits, targets, mask, softcap=0.0)),
        (ValueError, "softcap", lambda: bwd(logits, targets, mask, lse, gs, softcap=float("inf"))),
        (ValueError, "softcap", lambda: fwd(logits, targets, mask, logits, softcap=2.0)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
