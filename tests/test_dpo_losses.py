"""DPO with the loss family: every type through both routes, metrics, reference-free."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper

from fastdpo import DPO
from fastdpo.modules.dpo import deepcopy_module
from fastdpo.losses import LOSS_TYPES

from helpers import reference_logprobs, rel_err
from test_losses import truth

V, B, L = 61, 3, 12


def model(seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    pref, unpref = torch.randint(1, V, (B, L), generator=g), torch.randint(1, V, (B, L), generator=g)
    unpref[1, -4:] = 0
    pm = torch.arange(L)[None] < torch.tensor([[2], [3], [5]])
    return pref, unpref, pm


def hand_scores(m, pref, unpref, pm, reduction):
    """Sequence scores with a full log_softmax (x-transformers' conventions), differentiable."""
    seq = torch.cat((pref, unpref))
    mask = (~pm.repeat(2, 1) & (seq != 0))[:, :-1]
    s = reference_logprobs(m(seq[:, :-1]), seq[:, 1:], mask)
    count = mask.sum(-1).clamp(min=1e-5)
    return (s / count if reduction == "mean" else s), count


CASES = [dict(loss_type=t) for t in LOSS_TYPES if t not in ("exo_pair", "sigmoid_norm", "simpo")] + [
    dict(loss_type="sigmoid", label_smoothing=0.2),
    dict(loss_type="exo_pair", label_smoothing=0.1),
    dict(loss_type="sigmoid_norm", logprob_reduction="sum"),
    dict(loss_type="simpo", beta=2.0),
    dict(loss_type="ipo", logprob_reduction="sum"),
    dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5]),
    dict(loss_type="bco_pair", bco_delta="batch"),
    dict(loss_type="sigmoid", reference_free=True),
]


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_loss_through_dpo(case, head):
    kw = dict(case)
    beta = kw.pop("beta", 0.1)
    reduction = kw.get("logprob_reduction", "mean")
    dpo = DPO(model(), beta=beta, pad_id=0, head=head, **kw)
    with torch.no_grad():
        for p in dpo.policy_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pref, unpref, pm = batch()
    loss = dpo(pref, unpref, prompt_mask=pm)
    loss.backward()

    # the same loss, by hand: full log_softmax scores, then the papers' formulas in float64
    # (test_losses.truth, written independently of fastdpo.losses.pairwise), from the case itself
    twin = deepcopy_module(dpo)
    twin.policy_model.zero_grad(set_to_none=True)
    pol, count = hand_scores(twin.policy_model, pref, unpref, pm, reduction)
    if twin.ref_model is not None:
        with torch.no_grad():
            ref, _ = hand_scores(twin.ref_model.eval(), pref, unpref, pm, reduction)
    else:
        ref = torch.zeros_like(pol)
    lengths = dict(nw=count[:B], nl=count[B:]) if reduction == "sum" else {}
    types = kw.get("loss_type", "sigmoid")
    types, weights = ([types], [1.0]) if isinstance(types, str) else (types, kw["loss_weights"])
    pol, ref = pol.double(), ref.double()
    expected = sum(
        w * truth(t, pol[:B], pol[B:], ref[:B], ref[B:], beta=beta, eps=kw.get("label_smoothing", 0.0),
                  delta=kw.get("bco_delta", 0.0), **lengths)
        for t, w in zip(types, weights)
    ).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 2e-6 * max(1.0, abs(expected.item()))
    for (n, a), (_, b) in zip(dpo.policy_model.named_parameters(), twin.policy_model.named_parameters()):
        assert rel_err(a.grad, b.grad) <= 1e-5, n


def test_reference_free_and_simpo_hold_no_reference_copy():
    assert DPO(model(), reference_free=True).ref_model is None
    assert DPO(model(), loss_type="simpo", beta=2.0).ref_model is None
    assert DPO(model()).ref_model is not None


def test_sigmoid_norm_needs_sum_reduction():
    with pytest.raises(ValueError, match="sigmoid_norm.*logprob_reduction='sum'"):
        DPO(model(), loss_type="sigmoid_norm")


def test_bad_loss_config_named():
    with pytest.raises(ValueError, match="loss_type"):
        DPO(model(), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(model(), label_smoothing=0.7)


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_metrics_match_their_definitions(head):
    dpo = DPO(model(), beta=0.5, pad_id=0, head=head)
    with torch.no_grad():
        for p in dpo.policy_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pref, unpref, pm = batch()
    loss, metrics = dpo(pref, unpref, prompt_mask=pm, return_metrics=True)
    assert torch.equal(loss, dpo(pref, unpref, prompt_mask=pm))
    assert all(not v.requires_grad for v in metrics.values())

    with torch.no_grad():
        pol, count = hand_scores(dpo.policy_model, pref, unpref, pm, "mean")
        ref, _ = hand_scores(dpo.ref_model.eval(), pref, unpref, pm, "mean")
        seq = torch.cat((pref, unpref))
        mask = (~pm.repeat(2, 1) & (seq != 0))[:, :-1]
        argmax = dpo.policy_model(seq[:, :-1]).argmax(-1)
    c, r = 0.5 * (pol[:B] - ref[:B]), 0.5 * (pol[B:] - ref[B:])
    expected = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "logps/chosen": pol[:B].mean(),
        "logps/rejected": pol[B:].mean(),
        "tokens/chosen": mask[:B].sum(-1).float().mean(),
        "tokens/rejected": mask[B:].sum(-1).float().mean(),
        "token_accuracy/chosen": ((argmax == seq[:, 1:]) & mask)[:B].sum() / mask[:B].sum(),
    }
    assert metrics.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(metrics[k], v.float(), rtol=1e-5, atol=1e-6, msg=k)


def test_readme_example_trains_to_high_reward_accuracy():
    """The README's training example, shortened: held-out reward accuracy above 0.9."""
    path = Path(__file__).resolve().parents[1] / "examples" / "train_synthetic.py"
    spec = importlib.util.spec_from_file_location("train_synthetic", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for loss_type in ("sigmoid", "ipo"):
        result = example.train(loss_type, steps=150, seed=0, progress=False)
        assert result["rewards/accuracies"] > 0.9, (loss_type, result)
