"""sequence_logprobs' small-input path (plain autograd ops below fastdpo.scoring.logits_op.SMALL_ELEMENTS):
the same contract as the main path, checked the same ways."""

from __future__ import annotations

import math

import pytest
import torch

import fastdpo.scoring.logits_op as ops
from fastdpo import sequence_logprobs

from helpers import TOL, reference_logprobs, three_way

pytestmark = pytest.mark.small_path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(n, t, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[-1] = False
    return logits, targets, mask


def test_the_path_is_taken(monkeypatch):
    taken = []
    real_small, real_main = ops._small_logprobs, ops._logprobs_op
    monkeypatch.setattr(ops, "_small_logprobs", lambda *a: taken.append("small") or real_small(*a))
    monkeypatch.setattr(ops, "_logprobs_op", lambda *a: taken.append("main") or real_main(*a))
    logits, targets, mask = inputs(2, 3, 7, torch.float32, 0)
    sequence_logprobs(logits, targets, mask, impl="torch")
    assert taken == ["small"]
    for v, path in ((ops.SMALL_ELEMENTS, "small"), (ops.SMALL_ELEMENTS + 1, "main")):
        # exactly at the threshold: still small; one element over it: the main path
        logits, targets, _ = inputs(1, 1, v, torch.float32, seed=v)
        taken.clear()
        sequence_logprobs(logits, targets, impl="torch")
        assert taken == [path], v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 97), (1, 1, 2), (2, 7, 1000)], ids=str)
def test_against_float64(shape, dtype):
    logits, targets, mask = inputs(*shape, dtype, seed=sum(shape))
    targets[~mask] = -100  # never read where masked
    safe = torch.where(mask, targets, 0)
    up = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))

    def run(z, y):
        z = z.detach().clone().requires_grad_()
        s = sequence_logprobs(z, y, mask, impl="torch") if y is targets else reference_logprobs(z, y, mask)
        s.float().backward(up.to(s.dtype))
        return s, z.grad

    s, g = run(logits, targets)
    sr, gr = run(logits, safe)
    st, gt = run(logits.double(), safe)
    assert s.dtype == torch.float32 and g.dtype == dtype
    three_way(s, sr, st, dtype, "scores")
    three_way(g, gr, gt, dtype, "grad")
    assert (g[~mask] == 0).all()


def test_non_finite_masked_rows_never_reach_scores_or_gradients():
    logits, targets, mask = inputs(2, 4, 11, torch.float32, 3)
    mask[0, 1] = False
    logits[0, 1, 3] = float("nan")
    logits[0, 1, 5] = float("inf")
    z = logits.clone().requires_grad_()
    s = sequence_logprobs(z, targets, mask, impl="torch")
    s.sum().backward()
    assert s.isfinite().all() and z.grad.isfinite().all() and (z.grad[0, 1] == 0).all()


def test_counted_non_finite_and_out_of_range():
    logits, targets, mask = inputs(2, 4, 11, torch.float32, 4)
    mask[0, 2] = True
    logits[0, 2, 1] = float("inf")
    assert sequence_logprobs(logits, targets, mask, impl="torch")[0].isnan()
    logits[0, 2, 1] = 0.0
    targets[0, 2] = 11
    with pytest.raises(ValueError, match="targets holds token id 11"):
        sequence_logprobs(logits, targets, mask, impl="torch")


def test_empty_and_int32_ids():
    assert sequence_logprobs(torch.randn(0, 3, 5), torch.zeros(0, 3, dtype=torch.long), impl="torch").shape == (0,)
    logits, targets, mask = inputs(2, 3, 9, torch.float32, 5)
    a = sequence_logprobs(logits, targets.int(), mask, impl="torch")
    b = sequence_logprobs(logits, targets, mask, impl="torch")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- DPO's small steps


@pytest.mark.parametrize("tie", [False, True], ids=["linear-head", "tied-head"])
def test_dpo_small_step_builds_tiny_logits_and_matches_x_transformers(tie, monkeypatch):
    """A fused-head step with at most SMALL_ELEMENTS logits per model skips the fused op
    (its machinery costs more than the work at that size) and scores the head's logits with
    the small path: still x-transformers' loss, gradients and metrics."""
    from x_transformers.dpo import DPO as XDPO

    import fastdpo.modules.dpo as dpo_module
    from fastdpo import DPO
    from test_dpo import TIED, loss_and_grads, make_batch, make_model, perturb_

    from helpers import rel_err

    fused = []
    real = dpo_module.run_dpo_head
    monkeypatch.setattr(dpo_module, "run_dpo_head", lambda *a, **k: fused.append(1) or real(*a, **k))
    b, l, v = 2, 12, 97  # 2B x (L-1) x V = 4268 logits per model
    x = XDPO(make_model(v, tie=tie, seed=3), beta=0.1, pad_id=0)
    ours = DPO(make_model(v, tie=tie, seed=3), beta=0.1, pad_id=0, impl="torch")
    assert ours.route(ours.policy_model, "cpu").kind == "dpo_head"
    perturb_(x.policy_model, seed=5, skip=TIED if tie else ())
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    pref, unpref, pm = make_batch(b, l, v, seed=1, prompt_lens=[3, 5], pad_id=0, pad_lens=[(2, 0), (0, 3)])
    lx, gx = loss_and_grads(x, pref, unpref, prompt_mask=pm)
    lo, go = loss_and_grads(ours, pref, unpref, prompt_mask=pm)
    assert fused == []  # the small path was taken
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item()) and abs(lo.item() - math.log(2)) > 1e-5
    assert gx.keys() == go.keys()
    for name in gx:
        assert rel_err(go[name], gx[name]) <= 1e-5, name
    # the same step through the fused op (small path off) agrees to float32 rounding
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    lf, gf = loss_and_grads(ours, pref, unpref, prompt_mask=pm)
    assert fused == [1]
    assert abs(lf.item() - lo.item()) <= 1e-6 * abs(lo.item())
    for name in gf:
        assert rel_err(gf[name], go[name]) <= 1e-5, name


def test_dpo_small_step_metrics_and_evaluation():
    from fastdpo import DPO
    from test_dpo import make_batch, make_model, perturb_

    ours = DPO(make_model(61, seed=4), beta=0.1, impl="torch")
    perturb_(ours.policy_model, seed=6)
    pref, unpref, pm = make_batch(2, 10, 61, seed=2, prompt_lens=[2, 4])
    loss, metrics = ours(pref, unpref, prompt_mask=pm, return_metrics=True)
    ops.SMALL_ELEMENTS, saved = 0, ops.SMALL_ELEMENTS
    try:
        loss_f, metrics_f = ours(pref, unpref, prompt_mask=pm, return_metrics=True)
    finally:
        ops.SMALL_ELEMENTS = saved
    assert torch.allclose(loss, loss_f, rtol=1e-6, atol=0)
    assert metrics.keys() == metrics_f.keys()
    for k in metrics:
        assert torch.allclose(metrics[k], metrics_f[k], rtol=1e-5, atol=1e-7), k
    with torch.inference_mode():
        assert torch.allclose(ours(pref, unpref, prompt_mask=pm), loss, rtol=1e-6, atol=0)


def test_dpo_small_step_threshold(monkeypatch):
    import fastdpo.modules.dpo as dpo_module
    from fastdpo import DPO
    from test_dpo import make_batch, make_model

    fused = []
    real = dpo_module.run_dpo_head
    monkeypatch.setattr(dpo_module, "run_dpo_head", lambda *a, **k: fused.append(1) or real(*a, **k))
    b, l, v = 1, 9, 61
    ours = DPO(make_model(v, seed=4), impl="torch")
    pref, unpref, pm = make_batch(b, l, v, seed=2, prompt_lens=[2])
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 2 * b * (l - 1) * v)  # exactly at it: small
    ours(pref, unpref, prompt_mask=pm).backward()
    assert fused == []
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 2 * b * (l - 1) * v - 1)  # one over: the fused op
    ours(pref, unpref, prompt_mask=pm).backward()
    assert fused == [1]
