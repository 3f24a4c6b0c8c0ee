"""ORPO and CPO (with SimPO and AlphaPO): fastdpo.ORPO and fastdpo.CPO against float64
references written from the papers, and against TRL 1.16's own trainer code.

TRL's code runs unbound on a stub ``self`` (a SimpleNamespace with the attributes it reads:
``ORPOTrainer.get_batch_loss_metrics`` -> its ``concatenated_forward``, ``odds_ratio_loss``;
``CPOTrainer``'s, with ``cpo_loss``) and a stub model returning the real model's own logits
upcast to float64, so TRL's loss is float64 from the same float32 model body as ours.  Loss
within 1e-6 (relative), every policy gradient within 1e-5 (norm-relative), metrics within
1e-5, on x-transformers and Hugging Face models, fused ("scores") and logits routes, in
x-transformers' conventions and in TRL's.
"""

from __future__ import annotations

import types
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastdpo.scoring.router
from fastdpo import CPO, CPO_LOSS_TYPES, ORPO
from fastdpo.losses.reference_free import alphapo_reward, chosen_nll, log1mexp, orpo_log_odds

from helpers import rel_err, three_way, tiny_transformer

V = 97  # odd: no block multiple
B, L = 3, 11
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- models and data


def xt_model(seed: int = 0, tie: bool = False):
    model = tiny_transformer(V, max_seq_len=32, dim=16, depth=2, heads=2, seed=seed, tie=tie)
    perturb(model)
    return model


def hf_model(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    perturb(model)
    return model


MODELS = {"x-transformers": xt_model, "x-transformers-tied": lambda: xt_model(tie=True), "hf": hf_model}


def perturb(model, seed: int = 1, std: float = 0.1) -> None:
    """Spread the logits (a fresh init scores every token about -log V)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def own_logits(model, ids, attention_mask=None):
    if hasattr(model, "config"):  # Hugging Face (or peft around it)
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    return model(ids)


def make_batch(seed: int = 3):
    """B pairs, right padded with pad id 0 (TRL's padding_value), prompts of 2, 4, 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    pref = torch.randint(3, V, (B, L), generator=g)
    unpref = torch.randint(3, V, (B, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[2], [4], [3]])
    unpref[pm] = pref[pm]
    pmask = torch.ones(B, L, dtype=torch.bool)
    umask = torch.ones(B, L, dtype=torch.bool)
    pmask[1, -3:] = False
    umask[2, -2:] = False
    umask[0, -1:] = False
    pref[~pmask], unpref[~umask] = 0, 0
    return pref, unpref, pm, pmask, umask


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def ours_step(module, data):
    pref, unpref, pm, pmask, umask = data
    module.policy_model.zero_grad(set_to_none=True)
    loss, metrics = module(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                           return_metrics=True)
    loss.backward()
    return loss.detach(), grads(module.policy_model), metrics


def reference_step(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss, metrics = loss_fn()
    loss.backward()
    return loss.detach(), grads(model), metrics


def assert_same(ours, want, *, metric_keys=None, what=""):
    (lo, go, mo), (lw, gw, mw) = ours, want
    assert abs(lo.item() - float(lw)) <= 1e-6 * abs(float(lw)), f"{what}: loss {lo.item()} != {float(lw)}"
    assert go.keys() == gw.keys(), what
    for name in gw:
        assert rel_err(go[name], gw[name]) <= 1e-5, f"{what}: gradient of {name}"
    for k in metric_keys if metric_keys is not None else mw:
        got, exp = float(mo[k]), float(mw[k])
        assert abs(got - exp) <= 1e-5 * max(1.0, abs(exp)), f"{what}: metric {k} {got} != {exp}"


# ----------------------------------------------------------------------------- float64 references from the papers


def token_logps(model, seq):
    """(N, L-1) float64 log-probs of ``seq[:, 1:]`` from the model's own logits."""
    logits = own_logits(model, seq[:, :-1]).double()
    return logits.log_softmax(-1).gather(-1, seq[:, 1:, None]).squeeze(-1)


def aligned(keep, alignment):
    return keep[:, :-1] if alignment == "input" else keep[:, 1:]


def orpo_paper(model, data, *, beta, alignment):
    """ORPO, arXiv 2403.07691: P(y|x) the per-token geometric mean likelihood (eq. 4's
    footnote), odds = P / (1 - P) (eq. 4), L_OR = -log sigmoid(log(odds_w / odds_l)) (eq. 7),
    L = L_SFT + lambda * L_OR (eq. 6); L_SFT the chosen sequences' NLL per token over every
    real token, prompt included (TRL's labels mask padding only)."""
    pref, unpref, pm, pmask, umask = data
    lp = token_logps(model, torch.cat((pref, unpref)))
    comp = aligned(~pm.repeat(2, 1) & torch.cat((pmask, umask)), alignment)
    mean = (lp * comp).sum(-1) / comp.sum(-1)
    p = mean.exp()
    log_odds = torch.log(p / (1 - p))
    ratio = F.logsigmoid(log_odds[:B] - log_odds[B:])
    real = aligned(pmask, alignment)
    nll = -(lp[:B] * real).sum() / real.sum()
    rewards = beta * mean.detach()
    metrics = {
        "rewards/chosen": rewards[:B].mean(), "rewards/rejected": rewards[B:].mean(),
        "rewards/margins": (rewards[:B] - rewards[B:]).mean(),
        "rewards/accuracies": (rewards[:B] > rewards[B:]).double().mean(),
        "logps/chosen": mean[:B].detach().mean(), "logps/rejected": mean[B:].detach().mean(), "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": (log_odds[:B] - log_odds[B:]).detach().mean(),
    }
    return nll - beta * ratio.mean(), metrics


def cpo_paper(model, data, *, loss_type, beta, cpo_alpha, simpo_gamma, alpha, label_smoothing, reduction, alignment):
    """CPO (arXiv 2401.08417 eq. 3: -log sigmoid(beta (log pi(y_w) - log pi(y_l))) plus the
    NLL of the chosen completions), its hinge and IPO variants, SimPO (arXiv 2405.14734 eq. 6:
    average log-probs, margin gamma), AlphaPO (arXiv 2501.03884: reward (1 - p^-alpha) /
    alpha); conservative labels eps as cDPO.  Sum scores for sigmoid/hinge under ``"sum"``,
    per-token means otherwise (TRL: ipo and simpo average)."""
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    pref, unpref, pm, pmask, umask = data
    lp = token_logps(model, torch.cat((pref, unpref)))
    comp = aligned(~pm.repeat(2, 1) & torch.cat((pmask, umask)), alignment)
    sums, n = (lp * comp).sum(-1), comp.sum(-1)
    x = sums / n if reduction == "mean" or loss_type in ("ipo", "simpo") else sums
    r = x if alpha == 0 else (1 - x.exp() ** -alpha) / alpha
    d = r[:B] - r[B:]
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        u = beta * d - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    nll = -sums[:B].sum() / n[:B].sum()
    rewards = beta * r.detach()
    metrics = {
        "rewards/chosen": rewards[:B].mean(), "rewards/rejected": rewards[B:].mean(),
        "rewards/margins": (rewards[:B] - rewards[B:]).mean(),
        "rewards/accuracies": (rewards[:B] > rewards[B:]).double().mean(),
        "logps/chosen": x[:B].detach().mean(), "logps/rejected": x[B:].detach().mean(),
        "nll_loss": nll.detach() if cpo_alpha != 0 else torch.zeros(()),
    }
    return losses.mean() + cpo_alpha * nll, metrics


# ----------------------------------------------------------------------------- TRL 1.16's own code


class StubModel:
    """What TRL's concatenated_forward calls: the model's own logits, upcast to float64
    (unless ``float64=False``)."""

    def __init__(self, model, float64: bool = True):
        self.model, self.float64 = model, float64

    def __call__(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        assert not kwargs, kwargs
        logits = own_logits(self.model, input_ids, attention_mask)
        return SimpleNamespace(logits=logits.double() if self.float64 else logits)


def trl_batch(data):
    """The padded batch TRL's collator makes: labels are the ids with the prompt and padding at -100."""
    pref, unpref, pm, pmask, umask = data
    return {
        "chosen_input_ids": pref, "chosen_attention_mask": pmask.long(),
        "chosen_labels": pref.masked_fill(pm | ~pmask, -100),
        "rejected_input_ids": unpref, "rejected_attention_mask": umask.long(),
        "rejected_labels": unpref.masked_fill(pm | ~umask, -100),
    }


def _stub_self(cls, methods, **attrs):
    ns = SimpleNamespace(
        is_encoder_decoder=False, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x),
        concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps, **attrs,
    )
    for name in methods:
        setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    return ns


def trl_orpo(model, data, *, beta, float64: bool = True):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    self = _stub_self(ORPOTrainer, ("concatenated_forward", "odds_ratio_loss"), beta=beta, padding_value=0)
    return ORPOTrainer.get_batch_loss_metrics(self, StubModel(model, float64), trl_batch(data))


def trl_cpo(model, data, float64: bool = True, **options):
    """TRL's CPOConfig makes the options (its "alphapo" shorthand included), then the
    attributes CPOTrainer.__init__ copies from it."""
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = CPOConfig(output_dir="/tmp/fastdpo-cpo-config", report_to="none", bf16=False, use_cpu=True, **options)
    self = _stub_self(
        CPOTrainer, ("concatenated_forward", "cpo_loss"), pad_token_id=0, beta=args.beta,
        label_smoothing=args.label_smoothing, loss_type=args.loss_type, cpo_alpha=args.cpo_alpha,
        simpo_gamma=args.simpo_gamma, alpha=args.alpha,
    )
    return CPOTrainer.get_batch_loss_metrics(self, StubModel(model, float64), trl_batch(data))


# ----------------------------------------------------------------------------- routes


@pytest.fixture
def linear_calls(monkeypatch):
    """Counts the fused "scores" op's calls (each call scores some rows of hidden states)."""
    calls = []
    real = fastdpo.scoring.router.run_linear
    monkeypatch.setattr(fastdpo.scoring.router, "run_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


TRL_METRICS_ORPO = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
                    "logps/chosen", "nll_loss", "log_odds_ratio", "log_odds_chosen")
TRL_METRICS_CPO = TRL_METRICS_ORPO[:7]


def _common_metric_keys(ours: dict, trl: dict) -> list[str]:
    """TRL's metric names, but ``logits/*`` (means over logits the fused head never builds)."""
    keys = [k for k in trl if not k.startswith("logits/")]
    assert set(keys) <= set(ours), set(keys) - set(ours)
    return keys


# ----------------------------------------------------------------------------- ORPO


@pytest.mark.parametrize("conv", ["x-transformers", "trl"])
@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("family", list(MODELS))
def test_orpo_matches_the_paper_and_trl(family, head, conv, linear_calls):
    model = MODELS[family]()
    alignment = "input" if conv == "x-transformers" else "target"
    orpo = ORPO(model, beta=0.25, head=head, mask_alignment=alignment)
    assert orpo.ref_model is None and not orpo.has_reference()
    data = make_batch()
    ours = ours_step(orpo, data)
    assert len(linear_calls) == (2 if head == "fused" else 0)  # completions, then the chosen prompts
    paper = reference_step(model, lambda: orpo_paper(model, data, beta=0.25, alignment=alignment))
    assert_same(ours, paper, what="paper")
    assert set(TRL_METRICS_ORPO) <= set(ours[2]) and {"tokens/chosen", "tokens/rejected"} <= set(ours[2])
    if conv == "trl":
        trl = reference_step(model, lambda: trl_orpo(model, data, beta=0.25))
        assert_same(ours, trl, metric_keys=_common_metric_keys(ours[2], trl[2]), what="TRL")


@pytest.mark.small_path
@pytest.mark.parametrize("family", ["orpo", "cpo"])
def test_small_path_matches_trl(family, linear_calls):
    model = xt_model()
    data = make_batch()
    if family == "orpo":
        module = ORPO(model, beta=0.5, mask_alignment="target", impl="torch")
        trl = reference_step(model, lambda: trl_orpo(model, data, beta=0.5))
    else:
        module = CPO(model, loss_type="ipo", beta=0.5, logprob_reduction="sum", mask_alignment="target", impl="torch")
        trl = reference_step(model, lambda: trl_cpo(model, data, loss_type="ipo", beta=0.5))
    ours = ours_step(module, data)
    assert linear_calls == []  # the small path builds the (few) logits and scores them
    assert_same(ours, trl, metric_keys=_common_metric_keys(ours[2], trl[2]), what="TRL")
    assert "token_accuracy/chosen" in ours[2]


@pytest.mark.parametrize("family", ["orpo", "cpo"])
def test_bfloat16_model_is_as_accurate_as_trl_in_bfloat16(family):
    """A bf16 model, fused head: against TRL's float64 numbers from the same bf16 logits,
    ours is no further off than TRL's own code run in bf16 (the three-way rule), loss and
    every gradient."""
    model = tiny_transformer(V, max_seq_len=32, dim=16, depth=2, heads=2, seed=0)
    perturb(model)
    model = model.to(torch.bfloat16)
    data = make_batch()
    if family == "orpo":
        module = ORPO(model, mask_alignment="target")
        truth = reference_step(model, lambda: trl_orpo(model, data, beta=0.1))
        low = reference_step(model, lambda: trl_orpo(model, data, beta=0.1, float64=False))
    else:
        module = CPO(model, logprob_reduction="sum", mask_alignment="target")
        truth = reference_step(model, lambda: trl_cpo(model, data))
        low = reference_step(model, lambda: trl_cpo(model, data, float64=False))
    ours = ours_step(module, data)
    assert module.route(model, "cpu").kind == "fused"
    three_way(ours[0], low[0], truth[0], torch.bfloat16, "loss")
    for name in truth[1]:
        three_way(ours[1][name], low[1][name], truth[1][name], torch.bfloat16, name)


def test_orpo_without_its_nll_term_fails_the_comparison(monkeypatch):
    """The mutation check: ORPO's loss with the NLL term dropped no longer matches TRL."""
    import fastdpo.modules.orpo

    model = xt_model()
    data = make_batch()
    trl = reference_step(model, lambda: trl_orpo(model, data, beta=0.1))
    orpo = ORPO(model, beta=0.1, mask_alignment="target")
    assert_same(ours_step(orpo, data), trl, metric_keys=())
    real = fastdpo.modules.orpo.orpo_loss
    monkeypatch.setattr(fastdpo.modules.orpo, "orpo_loss", lambda c, r, nll, beta: real(c, r, torch.zeros_like(nll), beta))
    with pytest.raises(AssertionError, match="loss"):
        assert_same(ours_step(orpo, data), trl, metric_keys=())


def test_orpo_nll_counts_the_chosen_prompt_but_not_the_rejected_sequence():
    """TRL's ORPO NLL: every real token of the chosen half, prompt included, none of the
    rejected half: the gradient of the NLL alone changes with a chosen prompt token and with
    no rejected token."""
    model = xt_model()
    orpo = ORPO(model, mask_alignment="target")
    pref, unpref, pm, pmask, umask = make_batch()
    _, m = orpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                return_metrics=True)
    lp = token_logps(model, torch.cat((pref, unpref))).float()
    real = pmask[:, 1:]
    assert torch.allclose(m["nll_loss"], -(lp[:B] * real).sum() / real.sum(), rtol=1e-6)
    completion = (~pm & pmask)[:, 1:]
    assert not torch.allclose(m["nll_loss"], -(lp[:B] * completion).sum() / completion.sum(), rtol=1e-3)


def test_orpo_empty_completion_is_finite():
    """A chosen completion with no token has a mean log-prob of 0 and infinite odds (NaN in
    TRL): clamped, the loss and every gradient stay finite, and the pair's odds term
    vanishes."""
    model = xt_model()
    orpo = ORPO(model, mask_alignment="target")
    pref, unpref, pm, pmask, umask = make_batch()
    pmask[0, 2:] = False  # pair 0: the chosen sequence is its prompt alone
    pref[0, 2:] = 0
    loss, g, m = ours_step(orpo, (pref, unpref, pm, pmask, umask))
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in g.values())
    assert torch.isfinite(m["log_odds_chosen"])
    odds = orpo_log_odds(torch.tensor([0.0, -1.0]), torch.tensor([-1.0, -2.0]))
    assert torch.isfinite(odds).all() and odds[0] > 80


# ----------------------------------------------------------------------------- CPO


def cpo_options(loss_type, alpha):
    eps = 0.15 if alpha != 0 and loss_type in ("sigmoid", "simpo", "alphapo") else 0.0
    beta = 2.0 if loss_type in ("simpo", "alphapo") else 0.3
    return dict(loss_type=loss_type, beta=beta, cpo_alpha=0.7, simpo_gamma=0.4, alpha=alpha, label_smoothing=eps)


def _trl_cpo_options(opts):
    if opts["loss_type"] == "alphapo":  # TRL's shorthand replaces cpo_alpha; ours takes its default
        opts = {k: v for k, v in opts.items() if k != "cpo_alpha"}
    return opts


def alpha_for(shaped: bool, loss_type: str, reduction: str) -> float:
    """AlphaPO's alpha for a test: 0.3 on per-token means; 0.05 on summed log-probs, whose
    reward's condition number alpha * |x| (x about -40 here) multiplies the scores' float32
    rounding into the loss (in TRL's float32 code as in ours: see
    test_alphapo_on_summed_logprobs_is_as_accurate_as_trl_in_float32)."""
    if not shaped:
        return 0.0
    return 0.05 if reduction == "sum" and loss_type in ("sigmoid", "hinge") else 0.3


@pytest.mark.parametrize("conv", ["x-transformers", "trl"])
@pytest.mark.parametrize("shaped", [False, True], ids=["logprob-reward", "alphapo-reward"])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_matches_the_paper_and_trl(loss_type, shaped, conv, linear_calls):
    model = xt_model()
    reduction, alignment = ("mean", "input") if conv == "x-transformers" else ("sum", "target")
    opts = _trl_cpo_options(cpo_options(loss_type, alpha_for(shaped, loss_type, reduction)))
    cpo = CPO(model, **opts, logprob_reduction=reduction, mask_alignment=alignment)
    assert cpo.ref_model is None and not cpo.has_reference()
    data = make_batch()
    ours = ours_step(cpo, data)
    assert len(linear_calls) == 1
    paper_opts = {**cpo_options(loss_type, opts["alpha"]), **opts}
    paper = reference_step(model, lambda: cpo_paper(model, data, **paper_opts, reduction=reduction, alignment=alignment))
    assert_same(ours, paper, what="paper")
    assert set(TRL_METRICS_CPO) <= set(ours[2])
    if conv == "trl":
        trl = reference_step(model, lambda: trl_cpo(model, data, **opts))
        assert_same(ours, trl, metric_keys=_common_metric_keys(ours[2], trl[2]), what="TRL")


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("family", list(MODELS))
def test_cpo_routes_and_models_match_trl(family, head):
    model = MODELS[family]()
    opts = cpo_options("sigmoid", alpha_for(True, "sigmoid", "sum"))
    cpo = CPO(model, **opts, head=head, logprob_reduction="sum", mask_alignment="target")
    data = make_batch()
    ours = ours_step(cpo, data)
    trl = reference_step(model, lambda: trl_cpo(model, data, **opts))
    assert_same(ours, trl, metric_keys=_common_metric_keys(ours[2], trl[2]), what="TRL")


def test_alphapo_on_summed_logprobs_is_as_accurate_as_trl_in_float32():
    """With alpha = 0.3 on summed log-probs (x about -40), AlphaPO's reward exp(-alpha x)
    amplifies the float32 rounding of the scores some 10-fold: ours must be no further from
    TRL's float64 numbers than TRL's own code run in float32 (the three-way rule)."""
    model = xt_model()
    data = make_batch()
    opts = dict(loss_type="sigmoid", beta=0.3, alpha=0.3, label_smoothing=0.1)
    ours = ours_step(CPO(model, **opts, logprob_reduction="sum", mask_alignment="target"), data)
    truth = reference_step(model, lambda: trl_cpo(model, data, **opts))
    f32 = reference_step(model, lambda: trl_cpo(model, data, float64=False, **opts))
    assert truth[0].dtype == torch.float64 and f32[0].dtype == torch.float32
    three_way(ours[0], f32[0], truth[0], torch.float32, "loss")
    for name in truth[1]:
        three_way(ours[1][name], f32[1][name], truth[1][name], torch.float32, name)


def test_cpo_alphapo_is_simpo_without_nll():
    model = xt_model()
    data = make_batch()
    a = ours_step(CPO(model, loss_type="alphapo", beta=2.0, alpha=0.2), data)
    b = ours_step(CPO(model, loss_type="simpo", beta=2.0, alpha=0.2, cpo_alpha=0.0), data)
    assert_same(a, b, metric_keys=list(b[2]))
    assert a[2]["nll_loss"] == 0
    assert CPO(model, loss_type="alphapo", cpo_alpha=0.0).cpo_alpha == 0.0


def test_cpo_nll_weight_is_linear():
    """loss(cpo_alpha) - loss(0) = cpo_alpha * nll_loss, nll_loss the chosen completions'
    token-mean NLL (TRL's cross_entropy_loss over the chosen labels)."""
    model = xt_model()
    pref, unpref, pm, pmask, umask = data = make_batch()
    l0 = ours_step(CPO(model, cpo_alpha=0.0, mask_alignment="target"), data)[0]
    l2, _, m = ours_step(CPO(model, cpo_alpha=2.0, mask_alignment="target"), data)
    lp = token_logps(model, pref).float()
    comp = (~pm & pmask)[:, 1:]
    nll = -(lp * comp).sum() / comp.sum()
    assert torch.allclose(m["nll_loss"], nll, rtol=1e-6)
    assert torch.allclose(l2 - l0, 2.0 * nll, rtol=1e-5)
    assert torch.allclose(chosen_nll(torch.zeros(2), torch.zeros(2)), torch.zeros(()))  # no token: 0, not NaN


# ----------------------------------------------------------------------------- shared machinery


@pytest.mark.parametrize("make", [lambda m: ORPO(m), lambda m: CPO(m, loss_type="simpo", beta=2.0)], ids=["orpo", "cpo"])
def test_evaluation_mode_scores_forward_only(make):
    module = make(xt_model())
    pref, unpref, pm, pmask, umask = make_batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    want = module(pref, unpref, **kw)
    with torch.no_grad():
        got = module(pref, unpref, **kw)
    assert not got.requires_grad and torch.allclose(got, want.detach(), rtol=1e-6, atol=0)
    with torch.inference_mode():
        assert torch.allclose(module(pref, unpref, **kw), want.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("make", [lambda m, **k: ORPO(m, **k), lambda m, **k: CPO(m, loss_type="ipo", **k)],
                         ids=["orpo", "cpo"])
def test_packed_pairs_match_unpacked(make):
    model = xt_model()
    data = make_batch()
    a = ours_step(make(model), data)
    b = ours_step(make(model, packing="batch"), data)
    assert_same(b, a, metric_keys=list(a[2]))


@pytest.mark.parametrize("family", ["orpo", "cpo"])
def test_peft_policy_trains_its_adapters_and_matches_trl(family):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(hf_model(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj"]))
    perturb(model, seed=5)
    data = make_batch()
    if family == "orpo":
        module = ORPO(model, mask_alignment="target")
        trl = reference_step(model, lambda: trl_orpo(model, data, beta=0.1))
    else:
        module = CPO(model, loss_type="simpo", beta=2.0, logprob_reduction="sum", mask_alignment="target")
        trl = reference_step(model, lambda: trl_cpo(model, data, loss_type="simpo", beta=2.0))
    assert module.ref_model is None and not module.has_reference()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in module.parameters()} == trainable
    ours = ours_step(module, data)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ours[1])
    assert_same(ours, trl, metric_keys=_common_metric_keys(ours[2], trl[2]), what="TRL")


# ----------------------------------------------------------------------------- the formulas


def test_log1mexp_is_accurate_and_its_gradient_finite():
    mpmath = pytest.importorskip("mpmath")
    x = -torch.logspace(-30, 2, 400, dtype=torch.float64)
    with mpmath.workdps(120):  # 1 - exp(-100) needs 44 digits before the 16 that count
        want = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()]
    want = torch.tensor(want, dtype=torch.float64)
    assert torch.allclose(log1mexp(x), want, rtol=1e-14, atol=0)
    x32 = x.float().requires_grad_()
    assert rel_err(log1mexp(x32).double(), want) <= 1e-6
    log1mexp(x32).sum().backward()
    assert torch.isfinite(x32.grad).all()
    assert torch.allclose(x32.grad.double(), -1 / torch.expm1(-x32.detach().double()), rtol=1e-5)


def test_alphapo_reward_is_the_papers():
    x = -torch.rand(50, dtype=torch.float64) * 20
    for a in (-0.5, 0.1, 1.0):
        assert torch.allclose(alphapo_reward(x, a), (1 - x.exp() ** -a) / a, rtol=1e-12)
    assert alphapo_reward(x, 0.0) is x
    assert torch.isfinite(alphapo_reward(torch.tensor([-200.0]), 0.4)).all()  # TRL's exp(-200) ** -0.4 is inf


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_type="kto"), ValueError, r"loss_type must be one of \('sigmoid', 'hinge', 'ipo', 'simpo', 'alphapo'\)"),
    (dict(loss_type=["sigmoid"]), TypeError, "loss_type must be a str"),
    (dict(cpo_alpha=-0.1), ValueError, r"cpo_alpha must be >= 0"),
    (dict(cpo_alpha=float("nan")), ValueError, "cpo_alpha must be finite"),
    (dict(loss_type="alphapo", cpo_alpha=0.5), ValueError, "loss_type='alphapo' is 'simpo' with cpo_alpha=0"),
    (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\) for loss_type 'sigmoid'"),
    (dict(label_smoothing=-0.1, loss_type="simpo"), ValueError, r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=0.1, loss_type="hinge"), ValueError, "label_smoothing must be 0 for loss_type"),
    (dict(label_smoothing=0.1, loss_type="ipo"), ValueError, "label_smoothing must be 0 for loss_type"),
    (dict(simpo_gamma=-1.0), ValueError, "simpo_gamma must be >= 0"),
    (dict(alpha=float("inf")), ValueError, "alpha must be finite"),
    (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
    (dict(head="fast"), ValueError, r"head must be one of \('auto', 'fused', 'logits'\)"),
    (dict(reference_free=True), TypeError, "reference_free"),
])
def test_cpo_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        CPO(xt_model(), **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beta=-1.0), ValueError, "beta must be a finite number > 0"),
    (dict(logprob_reduction="sum"), ValueError, "logprob_reduction must be 'mean' for ORPO"),
    (dict(mask_alignment="output"), ValueError, r"mask_alignment must be one of \('input', 'target'\)"),
    (dict(loss_type="sigmoid"), TypeError, "loss_type"),
])
def test_orpo_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ORPO(xt_model(), **kwargs)


def test_no_reference_scores_to_pass():
    pref, unpref, pm, *_ = make_batch()
    for module in (ORPO(xt_model()), CPO(xt_model())):
        with pytest.raises(TypeError, match="ref_preferred_logprob"):
            module(pref, unpref, prompt_mask=pm, ref_preferred_logprob=torch.zeros(B),
                   ref_unpreferred_logprob=torch.zeros(B))
