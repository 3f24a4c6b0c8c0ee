"""The compiled CPU score (fastdpo.scoring.backends.torch_fold.compiled_score): inductor's C++ code for
``(z_y - m) - log sum exp(z - m)``, used where no softmax is kept.  Checked against float64,
against the ATen path it replaces, at the extremes, through DPO against x-transformers, and
its fallback when compiling fails.  The size threshold is lowered so that small inputs take it
(one compilation per dtype for the whole file: sizes are dynamic)."""

from __future__ import annotations

import pytest
import torch
from x_transformers.dpo import DPO as XDPO

import fastdpo.scoring.backends.torch_fold as ti
from fastdpo import DPO, sequence_logprobs
from fastdpo.scoring.backends import native
from helpers import float32_level, rel_err, tiny_transformer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def compiled(monkeypatch):
    """Every size takes the compiled score (the C++ fold, which float32 would take first, off:
    tests/test_native_fold.py checks it)."""
    monkeypatch.setattr(native, "ENABLED", False)
    monkeypatch.setattr(ti, "COMPILE", True)
    monkeypatch.setattr(ti, "COMPILE_MIN_ELEMENTS", 0)


def _truth(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z.double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 2), (37, 1009), (3, 11, 257)])
def test_against_float64_and_aten(shape, dtype, compiled, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    z = (torch.randn(shape, generator=g) * 4).to(dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    assert ti.compiled_score(z) is not None
    ours = ti.row_logprobs(z, y)
    assert ours.dtype == torch.float32 and ours.shape == y.shape
    float32_level(ours, _truth(z, y), torch.float32, "compiled score")
    monkeypatch.setattr(ti, "COMPILE", False)
    aten = ti.row_logprobs(z, y)
    # two float32 forms of one value (log p_y there, max and log-sum apart here): a few ulps
    torch.testing.assert_close(ours, aten, rtol=2e-6, atol=2e-6)


def test_extremes(compiled):
    """NaN and +inf rows give NaN (as float64 does); a target whose probability underflows
    float32 gets its exact log-probability (max and log-sum kept apart)."""
    v = 64
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, v, generator=g)
    y = torch.randint(0, v, (6,), generator=g)
    z[1, 5] = float("nan")
    z[2, 7] = float("inf")
    z[3, y[3]] = -200.0  # p_y ~ e^-200: 0 in float32
    z[4] = -1e30
    z[4, y[4]] = 50.0  # p_y = 1 exactly
    z[5, (y[5] + 1) % v] = 1e4  # another entry dominates: log p_y ~ -1e4
    out = ti.row_logprobs(z, y)
    truth = _truth(z, y)
    assert out[1].isnan() and out[2].isnan()
    finite = torch.tensor([0, 3, 4, 5])
    # float32 arithmetic against float64: within float32 rounding of the values (up to 1e4)
    torch.testing.assert_close(out[finite].double(), truth[finite], rtol=1e-6, atol=1e-6)
    assert out[3].item() < -150


def test_threshold_and_switch(monkeypatch):
    z = torch.randn(4, 8)
    monkeypatch.setattr(ti, "COMPILE_MIN_ELEMENTS", 33)
    assert ti.compiled_score(z) is None  # 32 logits: ATen
    monkeypatch.setattr(ti, "COMPILE_MIN_ELEMENTS", 32)
    assert ti.compiled_score(z) is not None
    monkeypatch.setattr(ti, "COMPILE", False)
    assert ti.compiled_score(z) is None


def test_compile_failure_falls_back_with_a_warning(monkeypatch, compiled):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ti, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    z = torch.randn(9, 31)
    y = torch.randint(0, 31, (9,))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert ti.compiled_score(z) is None
    assert ti.compiled_score(z) is None  # tried once
    float32_level(ti.row_logprobs(z, y), _truth(z, y), torch.float32, "fallback")


def test_op_scores_without_gradient(compiled):
    """sequence_logprobs without a gradient (the compiled score per box) and with one (the
    softmax kept for backward) agree, and match float64."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 13, 501, generator=g) * 3
    targets = torch.randint(0, 501, (3, 13), generator=g)
    mask = torch.rand(3, 13, generator=g) > 0.3
    with torch.no_grad():
        scores = sequence_logprobs(logits, targets, mask)
    trained = sequence_logprobs(logits.clone().requires_grad_(), targets, mask)
    lp = _truth(logits, targets).masked_fill(~mask, 0).sum(-1)
    float32_level(scores, lp, torch.float32, "no_grad scores")
    # two float32 forms summed over up to 13 rows of |log p| ~ 5: float32 rounding of the sums
    torch.testing.assert_close(scores, trained.detach(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_dpo_matches_x_transformers(head, compiled):
    """DPO's evaluation and training losses, with the compiled score taking the reference
    (and, without gradients, the policy), equal x-transformers' own DPO."""
    v, b, l = 311, 3, 14

    def make():
        return tiny_transformer(v, max_seq_len=32, dim=32, depth=1, heads=2, seed=8)

    x = XDPO(make(), beta=0.1)
    ours = DPO(make(), beta=0.1, head=head)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in x.policy_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    for m in (x, ours):
        m.eval()
    pref = torch.randint(0, v, (b, l), generator=g)
    unpref = torch.randint(0, v, (b, l), generator=g)
    prompt_mask = torch.arange(l)[None] < torch.tensor([2, 5, 9])[:, None]
    unpref[prompt_mask] = pref[prompt_mask]
    with torch.no_grad():
        lx, lo = x(pref, unpref, prompt_mask=prompt_mask), ours(pref, unpref, prompt_mask=prompt_mask)
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item()), (lo.item(), lx.item())
    lx, lo = x(pref, unpref, prompt_mask=prompt_mask), ours(pref, unpref, prompt_mask=prompt_mask)
    lx.backward()
    lo.backward()
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item()), (lo.item(), lx.item())
    gx = {n: p.grad for n, p in x.policy_model.named_parameters() if p.grad is not None}
    go = {n: p.grad for n, p in ours.policy_model.named_parameters() if p.grad is not None}
    assert gx.keys() == go.keys()
    for name in gx:
        assert rel_err(go[name], gx[name]) <= 1e-5, name


@pytest.mark.parametrize("grad", [False, True])
def test_inside_a_compiled_step(grad, compiled, monkeypatch):
    """A user's torch.compile(fullgraph=True) over a DPO step: the op is opaque to the trace,
    and at run time its body calls the compiled score (a compiled function inside a compiled
    graph): the eager numbers."""
    calls = []
    score = ti.compiled_score(torch.randn(2, 3))  # compiled now, then counted
    monkeypatch.setitem(ti._compiled, "score", lambda z, y: calls.append(1) or score(z, y))
    v, b, l = 211, 2, 12
    dpo = DPO(tiny_transformer(v, max_seq_len=32, dim=32, depth=1, heads=2, seed=2), beta=0.1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in dpo.policy_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pref, unpref = torch.randint(0, v, (b, l), generator=g), torch.randint(0, v, (b, l), generator=g)
    pm = torch.arange(l)[None] < torch.tensor([3, 6])[:, None]
    with torch.set_grad_enabled(grad):
        want = dpo(pref, unpref, prompt_mask=pm)
        step = torch.compile(lambda p, u, m: dpo(p, u, prompt_mask=m), fullgraph=True, backend="aot_eager")
        calls.clear()
        got = step(pref, unpref, pm)
    assert calls  # the compiled score ran inside the compiled step
    # the same ops traced (aot_eager): float32 rounding only, relative to the loss
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=0)
