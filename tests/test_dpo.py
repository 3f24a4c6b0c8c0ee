"""DPO: parity with x_transformers.dpo.DPO, the convention switches, structure, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from x_transformers.dpo import DPO as XDPO

from fastdpo import DPO
from fastdpo.modules.dpo import deepcopy_module

from helpers import rel_err, tiny_transformer


def make_model(num_tokens, *, dim=32, depth=1, tie=False, seed=0, max_seq_len=64):
    return tiny_transformer(num_tokens, max_seq_len=max_seq_len, dim=dim, depth=depth, heads=2, seed=seed, tie=tie)


def perturb_(module, seed, skip=()):
    """Move the policy away from the reference so the loss and its gradient are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# x-transformers' reference copy of a tied-embedding model reads the policy's embedding in
# its head (see test_tied_reference_does_not_drift); parity runs leave that weight equal.
TIED = ("token_emb.emb.weight",)


def make_batch(b, l, v, *, seed, prompt_lens, pad_id=None, pad_lens=None):
    g = torch.Generator().manual_seed(seed)
    low = 1 if pad_id == 0 else 0
    pref = torch.randint(low, v, (b, l), generator=g)
    unpref = torch.randint(low, v, (b, l), generator=g)
    prompt_mask = torch.arange(l)[None] < torch.tensor(prompt_lens)[:, None]
    unpref[prompt_mask] = pref[prompt_mask]  # shared prompt
    if pad_lens is not None:
        for i, (pw, pl) in enumerate(pad_lens):
            if pw:
                pref[i, l - pw :] = pad_id
            if pl:
                unpref[i, l - pl :] = pad_id
    return pref, unpref, prompt_mask


def paired(make, tie=False, **kw):
    """An x-transformers DPO and a fastdpo DPO with identical policy and reference weights."""
    x = XDPO(make(), beta=kw.get("beta", 0.1), pad_id=kw.get("pad_id"))
    ours = DPO(make(), **kw)
    perturb_(x.policy_model, seed=123, skip=TIED if tie else ())
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    return x, ours


def loss_and_grads(dpo, *args, **kwargs):
    dpo.policy_model.zero_grad(set_to_none=True)
    loss = dpo(*args, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in dpo.policy_model.named_parameters() if p.grad is not None}


CONFIGS = [
    # b, l, v, tie, pad_id, pad_lens, explicit masks, prompt lens, train
    dict(b=1, l=9, v=2, prompt_lens=[3]),
    dict(b=3, l=17, v=257, prompt_lens=[2, 5, 9]),
    dict(b=3, l=13, v=5003, prompt_lens=[4, 1, 6], tie=True),
    dict(b=3, l=15, v=257, prompt_lens=[3, 5, 2], pad_id=0, pad_lens=[(2, 0), (0, 4), (3, 3)]),
    dict(b=3, l=11, v=257, prompt_lens=[3, 11, 2], explicit=True),  # row 1 is all prompt
    dict(b=1, l=7, v=5003, prompt_lens=[2], train=True, tie=True),
    dict(b=3, l=9, v=257, prompt_lens=[1, 4, 3], pad_id=0, pad_lens=[(1, 2), (0, 0), (4, 1)], train=True),
]


@pytest.fixture
def routes(monkeypatch):
    """Counts which route DPO took: the fused head or the logits."""
    import fastdpo.modules.dpo as dpo_module
    import fastdpo.scoring.logits_op as ops_module

    seen = {"fused": 0, "logits": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(dpo_module, "run_dpo_head", spy("fused", dpo_module.run_dpo_head))
    monkeypatch.setattr(ops_module, "run_logprobs", spy("logits", ops_module.run_logprobs))
    return seen


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "pad_lens"))
def test_parity_with_x_transformers(cfg, head, routes):
    b, l, v = cfg["b"], cfg["l"], cfg["v"]
    pad_id = cfg.get("pad_id")
    tie = cfg.get("tie", False)
    x, ours = paired(lambda: make_model(v, tie=tie, seed=v + l), tie=tie, beta=0.1, pad_id=pad_id, head=head)
    for m in (x, ours):
        m.train(cfg.get("train", False))
    pref, unpref, prompt_mask = make_batch(
        b, l, v, seed=l, prompt_lens=cfg["prompt_lens"], pad_id=pad_id, pad_lens=cfg.get("pad_lens")
    )
    kwargs = dict(prompt_mask=prompt_mask)
    if cfg.get("explicit"):
        g = torch.Generator().manual_seed(7)
        kwargs["preferred_seq_mask"] = torch.rand(b, l, generator=g) > 0.2
        kwargs["unpreferred_seq_mask"] = torch.rand(b, l, generator=g) > 0.2

    lx, gx = loss_and_grads(x, pref, unpref, **kwargs)
    lo, go = loss_and_grads(ours, pref, unpref, **kwargs)
    # the policy took the route asked for (the reference scores no logits on the fused one)
    assert routes == ({"fused": 1, "logits": 0} if head == "fused" else {"fused": 0, "logits": 2})
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item()), (lo.item(), lx.item())
    assert gx.keys() == go.keys()
    for name in gx:
        assert rel_err(go[name], gx[name]) <= 1e-5, name

    # Three-way: the same model in float64 is the truth; ours is no further from it than
    # x-transformers (plus float32 slack).
    truth = deepcopy_module(x).double()
    truth.train(cfg.get("train", False))
    lt, gt = loss_and_grads(truth, pref, unpref, **kwargs)
    assert abs(lo.item() - lt.item()) <= abs(lx.item() - lt.item()) + 1e-6 * abs(lt.item())
    for name in gt:
        assert rel_err(go[name], gt[name]) <= rel_err(gx[name], gt[name]) + 1e-5, name


def test_a_gathered_reference_head_is_scored_before_the_policy_runs(monkeypatch):
    """A reference head weight gathered from FSDP2 shards (a whole copy made for the call) is
    scored before the policy's forward and the copy dropped, instead of riding to the DPO head
    op with the policy's: held through the policy's forward it would add a whole head weight to
    the step's peak (measured under --fsdp: benchmarks/fsdp_startup_memory.py).  The loss and
    the gradients are the ones the op gives scoring both."""
    import fastdpo.modules.dpo as dpo_module
    import fastdpo.scoring.router as router

    _, ours = paired(lambda: make_model(257, seed=5), beta=0.1)
    pref, unpref, prompt_mask = make_batch(3, 17, 257, seed=4, prompt_lens=[2, 5, 9])
    handed = []

    def spy(*args, **kwargs):
        handed.append((kwargs["ref_weight"] is not None, kwargs["ref_scores"] is not None))
        return real(*args, **kwargs)

    real = dpo_module.run_dpo_head
    monkeypatch.setattr(dpo_module, "run_dpo_head", spy)
    both, both_grads = loss_and_grads(ours, pref, unpref, prompt_mask=prompt_mask)
    monkeypatch.setattr(router, "gathers", lambda head: True)
    first, first_grads = loss_and_grads(ours, pref, unpref, prompt_mask=prompt_mask)
    assert handed == [(True, False), (False, True)]  # the op scored the reference, then was given its scores
    assert rel_err(first, both) <= 1e-6
    assert first_grads.keys() == both_grads.keys()
    for name in both_grads:
        assert rel_err(first_grads[name], both_grads[name]) <= 1e-6, name


def test_tied_reference_does_not_drift():
    """x-transformers' deepcopy leaves the tied head reading the policy's embedding; ours not."""
    dpo = DPO(make_model(257, tie=True, seed=3))
    x = XDPO(make_model(257, tie=True, seed=3))
    src = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        before = dpo.ref_model(src)
        x_before = x.ref_model(src)
        for m in (dpo, x):
            m.policy_model.token_emb.emb.weight.mul_(2.0)
        torch.testing.assert_close(dpo.ref_model(src), before, rtol=0, atol=0)
        assert not torch.allclose(x.ref_model(src), x_before)  # the flaw we do not copy
    emb = dpo.ref_model.token_emb.emb.weight
    assert emb.data_ptr() != dpo.policy_model.token_emb.emb.weight.data_ptr()


def test_reference_copy_of_a_patched_forward_runs_the_copy():
    """A forward patched as a method closing over the original's forward (TRL's
    ``add_fused_lm_head`` patches one so): the reference copy runs itself, not the policy."""
    import types

    model = make_model(257, seed=3)
    original = model.forward

    def patched(self, *args, **kwargs):
        return original(*args, **kwargs)

    model.forward = types.MethodType(patched, model)
    dpo = DPO(model)
    src = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        before = dpo.ref_model(src)
        perturb_(model, seed=7)
        torch.testing.assert_close(dpo.ref_model(src), before, rtol=0, atol=0)
        assert not torch.allclose(model(src), before)


def test_reference_model_is_frozen_and_untouched():
    model = make_model(257)
    dpo = DPO(model)
    assert dpo.policy_model is model and dpo.ref_model is not model
    assert all(not p.requires_grad for p in dpo.ref_model.parameters())
    assert {id(p) for p in dpo.parameters()} == {id(p) for p in model.parameters()}
    before = {k: v.clone() for k, v in dpo.ref_model.state_dict().items()}
    dpo.train()
    pref, unpref, pm = make_batch(2, 9, 257, seed=1, prompt_lens=[2, 3])
    dpo(pref, unpref, prompt_mask=pm).backward()
    assert not dpo.ref_model.training  # evaluated in eval mode, as x-transformers
    assert all(p.grad is None for p in dpo.ref_model.parameters())
    for k, v in dpo.ref_model.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_given_reference_model_is_used_without_a_copy():
    """``ref_model=`` (TRL's): that model scores the reference, frozen; the loss is the copy's
    when it holds the same weights, and moves when it does not."""
    from fastdpo import KTO

    model, other = make_model(257, seed=4), make_model(257, seed=4)
    pref, unpref, pm = make_batch(2, 9, 257, seed=1, prompt_lens=[2, 3])
    with_copy = DPO(model)
    perturb_(model, seed=5)
    copied = with_copy(pref, unpref, prompt_mask=pm)
    dpo = DPO(model, ref_model=other)
    assert dpo.ref_model is other and dpo.has_reference()
    assert all(not p.requires_grad for p in other.parameters())
    torch.testing.assert_close(dpo(pref, unpref, prompt_mask=pm), copied, rtol=0, atol=0)
    perturb_(other, seed=6)
    assert rel_err(dpo(pref, unpref, prompt_mask=pm), copied) > 1e-3
    assert not other.training
    assert KTO(model, ref_model=other).ref_model is other
    with pytest.raises(ValueError, match="shares its parameters with the policy"):
        DPO(model, ref_model=model)
    with pytest.raises(ValueError, match="reads no reference model"):
        DPO(model, ref_model=other, reference_free=True)
    with pytest.raises(TypeError, match="ref_model must be a torch.nn.Module"):
        DPO(model, ref_model="ref")


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.batch = inner, 0, []

    def forward(self, x):
        self.calls += 1
        self.batch.append(x.shape[0])
        return self.inner(x)


def test_one_forward_per_model_on_concatenated_batch():
    dpo = DPO(Counting(make_model(257)))
    pref, unpref, pm = make_batch(3, 9, 257, seed=2, prompt_lens=[2, 3, 4])
    dpo(pref, unpref, prompt_mask=pm)
    assert dpo.policy_model.calls == 1 and dpo.ref_model.calls == 1
    assert dpo.policy_model.batch == [6] and dpo.ref_model.batch == [6]


def test_no_log_softmax_over_the_vocabulary():
    from torch.utils._python_dispatch import TorchDispatchMode

    v = 257
    dpo = DPO(make_model(v))
    pref, unpref, pm = make_batch(2, 9, v, seed=3, prompt_lens=[2, 3])
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "softmax" in str(func) and isinstance(out, torch.Tensor) and out.shape[-1] == v:
                seen.append(str(func))
            return out

    with Spy():
        dpo(pref, unpref, prompt_mask=pm).backward()
    assert seen == []


def hand_loss(dpo64, pref, unpref, prompt_mask, *, beta, reduction, alignment, pad_id=None):
    """The DPO paper / TRL formula written out with full log_softmax, in the model's dtype."""
    seq = torch.cat((pref, unpref))
    keep = ~prompt_mask.repeat(2, 1)
    if pad_id is not None:
        keep = keep & (seq != pad_id)
    mask = keep[:, 1:] if alignment == "target" else keep[:, :-1]

    def score(model):
        lp = model(seq[:, :-1]).log_softmax(-1).gather(-1, seq[:, 1:, None]).squeeze(-1)
        s = (lp * mask).sum(-1)
        return s / mask.sum(-1).clamp(min=1e-5) if reduction == "mean" else s

    with torch.no_grad():
        dpo64.ref_model.eval()
        ref = score(dpo64.ref_model)
    pol = score(dpo64.policy_model)
    b = pref.shape[0]
    z = beta * ((pol[:b] - pol[b:]) - (ref[:b] - ref[b:]))
    return -F.logsigmoid(z).mean()


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("alignment", ["input", "target"])
def test_convention_switches_against_float64_formula(reduction, alignment, head):
    v, b, l = 257, 3, 13
    model = make_model(v, seed=4)
    ours = DPO(model, beta=0.2, pad_id=0, logprob_reduction=reduction, mask_alignment=alignment, head=head)
    perturb_(ours.policy_model, seed=9)
    pref, unpref, pm = make_batch(b, l, v, seed=5, prompt_lens=[2, 5, 3], pad_id=0, pad_lens=[(2, 0), (0, 3), (1, 1)])
    lo, go = loss_and_grads(ours, pref, unpref, prompt_mask=pm)

    kw = dict(beta=0.2, reduction=reduction, alignment=alignment, pad_id=0)
    truth = deepcopy_module(ours).double()
    ref32 = deepcopy_module(ours)
    results = {}
    for name, m in (("truth", truth), ("ref32", ref32)):
        m.policy_model.zero_grad(set_to_none=True)
        loss = hand_loss(m, pref, unpref, pm, **kw)
        loss.backward()
        results[name] = loss.detach(), {n: p.grad for n, p in m.policy_model.named_parameters() if p.grad is not None}
    (lt, gt), (lr, gr) = results["truth"], results["ref32"]
    assert abs(lo.item() - lt.item()) <= abs(lr.item() - lt.item()) + 1e-6 * abs(lt.item())
    for n in gt:
        assert rel_err(go[n], gt[n]) <= rel_err(gr[n], gt[n]) + 1e-5, n


def test_conventions_differ_from_default():
    """The switches change the number (so the test above cannot pass vacuously)."""
    model = make_model(257, seed=6)
    pref, unpref, pm = make_batch(2, 11, 257, seed=6, prompt_lens=[3, 4])
    losses = {}
    for red in ("mean", "sum"):
        for al in ("input", "target"):
            d = DPO(deepcopy_module(model), logprob_reduction=red, mask_alignment=al)
            perturb_(d.policy_model, seed=1)
            losses[red, al] = d(pref, unpref, prompt_mask=pm).item()
    assert len(set(losses.values())) == 4, losses


def test_inplace_backward_used_and_equivalent(monkeypatch):
    import fastdpo.scoring.logits_op as ops

    inplace_calls = []
    real = ops._logprobs_backward_inplace_op
    monkeypatch.setattr(ops, "_logprobs_backward_inplace_op", lambda *a: inplace_calls.append(1) or real(*a))
    model = make_model(257, seed=8)
    a = DPO(deepcopy_module(model), inplace_backward=True, head="logits")
    b_ = DPO(deepcopy_module(model), inplace_backward=False, head="logits")
    perturb_(a.policy_model, 3)
    perturb_(b_.policy_model, 3)
    pref, unpref, pm = make_batch(2, 9, 257, seed=8, prompt_lens=[2, 3])
    la, ga = loss_and_grads(a, pref, unpref, prompt_mask=pm)
    assert inplace_calls == [1]  # the policy's logits took their gradient in place
    lb, gb = loss_and_grads(b_, pref, unpref, prompt_mask=pm)
    assert inplace_calls == [1]  # and not with inplace_backward=False
    assert torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


# ----------------------------------------------------------------------------- evaluation, autograd contract

ROUTE_KW = {
    "fused": dict(head="fused"),
    "fused-triton": dict(head="fused", impl="triton"),
    "fused-triton-gemm": dict(head="fused", impl="triton", matmul="triton"),
    "logits": dict(head="logits"),
}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("route", ROUTE_KW)
def test_evaluation_scores_forward_only(route, mode, monkeypatch):
    """Without gradients (no_grad, inference_mode, or a frozen policy) DPO gives the training
    loss and metrics and does no gradient work: no fold turns logits into gradients, no
    weight-gradient product, no backward kernel."""
    import contextlib

    import fastdpo.scoring.rows as chunks
    import fastdpo.scoring.logits_op as ops

    dpo = DPO(make_model(257, seed=4), **ROUTE_KW[route])
    perturb_(dpo.policy_model, 5)
    pref, unpref, pm = make_batch(3, 11, 257, seed=6, prompt_lens=[2, 4, 11])
    train_loss, train_metrics = dpo(pref, unpref, prompt_mask=pm, return_metrics=True)

    def forbidden(*a, **k):
        raise AssertionError("gradient work in an evaluation step")

    for fold in chunks.FOLDS.values():
        monkeypatch.setattr(fold, "grad_", staticmethod(forbidden))
    monkeypatch.setattr(chunks.WeightGrad, "add", forbidden)
    monkeypatch.setattr(ops, "_backward", forbidden)
    if mode == "frozen":
        dpo.policy_model.requires_grad_(False)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(), "frozen": contextlib.nullcontext()}[mode]
    with ctx:
        loss, metrics = dpo(pref, unpref, prompt_mask=pm, return_metrics=True)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, train_loss.detach(), rtol=1e-6, atol=0)
    assert metrics.keys() == train_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], train_metrics[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("route", ROUTE_KW)
def test_backward_twice_with_retain_graph(route):
    """One graph, two backward passes: the gradients are exactly twice one pass's.  (The logits
    route's in-place backward overwrites the logits the second pass would read: there it
    takes inplace_backward=False, and with the default autograd says so -- see below.)"""
    kw = dict(ROUTE_KW[route], inplace_backward=False) if route == "logits" else ROUTE_KW[route]
    dpo = DPO(make_model(257, seed=4), **kw)
    perturb_(dpo.policy_model, 5)
    pref, unpref, pm = make_batch(2, 9, 257, seed=6, prompt_lens=[2, 4])
    _, once = loss_and_grads(dpo, pref, unpref, prompt_mask=pm)
    dpo.policy_model.zero_grad(set_to_none=True)
    loss = dpo(pref, unpref, prompt_mask=pm)
    loss.backward(retain_graph=True)
    loss.backward()
    for n, p in dpo.policy_model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-6, atol=1e-8, msg=n)


def test_retain_graph_with_inplace_logits_is_an_error_not_a_wrong_gradient():
    dpo = DPO(make_model(257, seed=4), head="logits")
    pref, unpref, pm = make_batch(2, 9, 257, seed=6, prompt_lens=[2, 4])
    loss = dpo(pref, unpref, prompt_mask=pm)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_step_under_a_dispatch_mode():
    """The fused route works under a TorchDispatchMode such as FlopCounterMode (the pair
    fusion takes its group loss gradient with autograd inside a custom op)."""
    from torch.utils.flop_counter import FlopCounterMode

    dpo = DPO(make_model(257, seed=4))
    perturb_(dpo.policy_model, 5)
    pref, unpref, pm = make_batch(2, 9, 257, seed=6, prompt_lens=[2, 4])
    plain, grads = loss_and_grads(dpo, pref, unpref, prompt_mask=pm)
    with FlopCounterMode(display=False):
        counted, counted_grads = loss_and_grads(dpo, pref, unpref, prompt_mask=pm)
    assert torch.equal(plain, counted)
    for n in grads:
        assert torch.equal(grads[n], counted_grads[n]), n


@pytest.mark.parametrize("head, matmul", [("fused", "auto"), ("fused", "triton"), ("logits", "auto")],
                         ids=["fused", "fused-gemm", "logits"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[4]], ids=["prompts", "padding", "all-prompt-row"])
def test_triton_impl_matches_x_transformers(cfg, head, matmul):
    """DPO(impl='triton') -- interpreted on CPU, compiled on a GPU: exactly the code path
    impl='auto' takes on CUDA tensors -- against x-transformers: the sequence kernels (logits
    route), torch products + the Triton fold (the fused route's default, matmul='auto') and
    the Triton GEMM kernels (matmul='triton')."""
    b, l, v = cfg["b"], cfg["l"], cfg["v"]
    pad_id = cfg.get("pad_id")
    x, ours = paired(lambda: make_model(v, seed=v + l), beta=0.1, pad_id=pad_id, impl="triton", head=head, matmul=matmul)
    expected = {"fused": "dpo_head" if matmul == "auto" else "fused", "logits": "logits"}[head]
    assert ours.route(ours.policy_model, "cpu").kind == expected
    pref, unpref, prompt_mask = make_batch(
        b, l, v, seed=l, prompt_lens=cfg["prompt_lens"], pad_id=pad_id, pad_lens=cfg.get("pad_lens")
    )
    lx, gx = loss_and_grads(x, pref, unpref, prompt_mask=prompt_mask)
    lo, go = loss_and_grads(ours, pref, unpref, prompt_mask=prompt_mask)
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item()), (lo.item(), lx.item())
    for name in gx:
        assert rel_err(go[name], gx[name]) <= 1e-5, name
