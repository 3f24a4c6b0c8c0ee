"""Pairwise preference losses: float64 formulas written out here, edges, validation, metrics."""

from __future__ import annotations

import dataclasses

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdpo.losses import (
    LOSS_TYPES,
    LossConfig,
    check_loss_config,
    dpo_loss,
    preference_loss,
    reward_metrics,
)

from helpers import three_way

B = 5
SCORES = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


# ---------------------------------------------------------------------------------------------
# Ground truth, written from the papers' formulas (not from fastdpo's code)
# ---------------------------------------------------------------------------------------------


def logsig(t):
    """log sigmoid(t), by cases so no exp overflows: t - log(1 + e^t) for t < 0,
    -log(1 + e^-t) for t >= 0 (each branch fed a clamped input, so the branch not taken has
    a finite gradient, and the derivative at 0 is the true 1/2)."""
    neg, pos = t.clamp(max=0), t.clamp(min=0)
    return torch.where(t < 0, neg - torch.log1p(torch.exp(neg)), -torch.log1p(torch.exp(-pos)))


def sig(t):
    return torch.exp(logsig(t))


def f_prime(r, f, alpha):
    """f'(u) at u = pi/ref = exp(r), f-DPO (Wang et al. 2023, arXiv 2309.16240) Table 1, in
    log space; additive constants as TRL keeps them (they cancel in f'(u_w) - f'(u_l))."""
    if f == "reverse_kl":  # f(u) = u log u: f'(u) = log u + 1
        return r
    if f == "forward_kl":  # f(u) = -log u: f'(u) = -1/u
        return 1 - torch.exp(-r)
    if f == "js_divergence":  # f'(u) = log(2u / (1 + u))
        return math.log(2) - torch.log1p(torch.exp(-r))
    # alpha-divergence, paper's a = 1 - alpha: f'(u) = (1 - u^-a) / a; TRL clamps -a r at 80
    a = 1 - alpha
    if abs(a) < 1e-6:  # the limit a -> 0: log u, reverse KL
        return r
    return (1 - torch.exp(torch.clamp(-a * r, max=80.0))) / a


def truth(kind, pw, pl, rw, rl, *, beta, eps=0.0, gamma=0.5, delta=0.0, nw=None, nl=None,
          f="reverse_kl", alpha=0.5, tau=0.05):
    if kind == "sft":  # the chosen NLL: per token over the batch given counts, else per pair
        return -pw if nw is None else -pw * len(pw) / nw.sum().clamp(min=1)
    if kind == "aot":  # sorted policy margins against sorted reference margins
        d = torch.sort(pw - pl).values - torch.sort(rw - rl).values
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if kind == "aot_unpaired":  # sorted chosen log-ratios against sorted rejected ones
        d = torch.sort(pw - rw).values - torch.sort(pl - rl).values
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if f != "reverse_kl":
        fw, fl = f_prime(pw - rw, f, alpha), f_prime(pl - rl, f, alpha)
        if nw is not None and kind in ("sigmoid_norm", "ipo"):  # TRL: f' of sums, per token
            fw, fl = fw / nw.clamp(min=1), fl / nl.clamp(min=1)
        # every type allowed with an f reads its margin only: stand in r_w = f'_w, r_l = f'_l
        pw, pl, rw, rl, nw = fw, fl, torch.zeros_like(fw), torch.zeros_like(fl), None
    if nw is not None and kind in ("sigmoid_norm", "ipo", "simpo"):
        nw, nl = nw.clamp(min=1).to(pw.dtype), nl.clamp(min=1).to(pw.dtype)
        pw, pl = pw / nw, pl / nl
        if rw is not None:
            rw, rl = rw / nw, rl / nl
    if kind == "simpo":
        u = beta * (pw - pl) - gamma
        return -(1 - eps) * logsig(u) - eps * logsig(-u)
    cw, cl = pw - rw, pl - rl  # log pi/ref of chosen and rejected
    m = beta * (cw - cl)
    if kind == "discopop":
        # DiscoPOP (arXiv 2406.08414) eq. 5: (1 - sig(m/tau)) * logistic + sig(m/tau) * exp(-m),
        # the second product as one exp (exp(-m) alone overflows where the product is ~0)
        return -logsig(m) * (1 - sig(m / tau)) + torch.exp(logsig(m / tau) - m)
    if kind in ("sigmoid", "sigmoid_norm"):
        return -(1 - eps) * logsig(m) - eps * logsig(-m)
    if kind == "robust":
        return ((1 - eps) * -logsig(m) - eps * -logsig(-m)) / (1 - 2 * eps)
    if kind == "ipo":
        return (cw - cl - 0.5 / beta) ** 2
    if kind == "hinge":
        return torch.clamp(1 - m, min=0)
    if kind == "bco_pair":
        if isinstance(delta, str):
            delta = torch.cat([beta * cw, beta * cl]).mean().detach()
        return -logsig(beta * cw - delta) - logsig(delta - beta * cl)
    if kind == "nca_pair":
        return -logsig(beta * cw) - logsig(-beta * cw) / 2 - logsig(-beta * cl) / 2
    if kind == "exo_pair":
        # KL(model || target) over the pair's two outcomes: the model says chosen wins with
        # probability sig(m), the smoothed label with 1 - eps.
        q, qbar = sig(m), sig(-m)
        return q * (logsig(m) - math.log(1 - eps)) + qbar * (logsig(-m) - math.log(eps))
    if kind == "sppo_hard":
        return (cw - 1 / (2 * beta)) ** 2 + (cl + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return (1 - sig(beta * cw)) + sig(beta * cl)
    if kind == "apo_down":
        return sig(beta * cw) + (1 - sig(m))
    raise AssertionError(kind)


# (loss_type, options) cases: every type, every option that changes the math.
CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.1}),
    ("robust", {"label_smoothing": 0.2}),
    ("robust", {}),
    ("ipo", {}),
    ("ipo", {"lengths": True}),
    ("hinge", {}),
    ("bco_pair", {}),
    ("bco_pair", {"bco_delta": 0.3}),
    ("bco_pair", {"bco_delta": "batch"}),
    ("bco_pair", {"bco_delta": "tensor"}),
    ("nca_pair", {}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.3}),
    ("sppo_hard", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("sigmoid_norm", {"lengths": True}),
    ("sigmoid_norm", {"lengths": True, "label_smoothing": 0.05}),
    ("simpo", {"beta": 2.0}),
    ("simpo", {"beta": 2.5, "gamma": 1.4, "label_smoothing": 0.1, "lengths": True}),
    ("aot", {}),
    ("aot", {"label_smoothing": 0.2, "lengths": True}),
    ("aot_unpaired", {}),
    ("aot_unpaired", {"label_smoothing": 0.1}),
    ("discopop", {}),
    ("discopop", {"discopop_tau": 0.5, "beta": 2.0}),
    ("sft", {}),
    ("sft", {"lengths": True}),
    # f-DPO: every type TRL allows an f for, each f, with and without lengths
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence", "label_smoothing": 0.1}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
    ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("ipo", {"f_divergence_type": "forward_kl", "lengths": True}),
    ("ipo", {"f_divergence_type": "js_divergence"}),
    ("sigmoid_norm", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.7,
                      "lengths": True}),
    ("exo_pair", {"f_divergence_type": "js_divergence", "label_smoothing": 0.01}),
    ("robust", {"f_divergence_type": "forward_kl", "label_smoothing": 0.2}),
    ("discopop", {"f_divergence_type": "forward_kl"}),
    ("sft", {"f_divergence_type": "js_divergence", "lengths": True}),
]
assert {c[0] for c in CASES} == set(LOSS_TYPES)


def truth_options(opts):
    """The options of a case as :func:`truth` names them."""
    return dict(eps=opts.get("label_smoothing", 0.0), gamma=opts.get("gamma", 0.5),
                f=opts.get("f_divergence_type", "reverse_kl"),
                alpha=opts.get("f_alpha_divergence_coef", 0.5), tau=opts.get("discopop_tau", 0.05))


def make_inputs(seed, *, lengths=False, b=B):
    """Float64 scores like mean token log-probs (negative), reference near the policy."""
    g = torch.Generator().manual_seed(seed)
    pw = -(torch.rand(b, generator=g, dtype=torch.float64) * 2 + 0.1)
    pl = -(torch.rand(b, generator=g, dtype=torch.float64) * 2 + 0.1)
    rw = pw + torch.randn(b, generator=g, dtype=torch.float64) * 0.7
    rl = pl + torch.randn(b, generator=g, dtype=torch.float64) * 0.7
    scores = [pw, pl, rw, rl]
    nw = nl = None
    if lengths:  # sum scores = mean * count; a zero count (empty completion) included
        nw = torch.randint(1, 12, (b,), generator=g)
        nl = torch.randint(1, 12, (b,), generator=g)
        nw[0] = 0
        scores = [pw * nw, pl * nl, rw * nw, rl * nl]
    return scores, nw, nl, g


def split_options(kind, opts, b, g):
    opts = dict(opts)
    beta = opts.pop("beta", 0.5)
    use_lengths = opts.pop("lengths", False)
    if opts.get("bco_delta") == "tensor":
        opts["bco_delta"] = torch.randn(b, generator=g, dtype=torch.float64) * 0.2
    return beta, use_lengths, opts


def run_both(kind, opts, scores, nw, nl, beta, dtype):
    """Ours on scores cast to dtype, and the float64 truth on those rounded scores."""
    xs = [s.to(dtype).requires_grad_() for s in scores]
    x64 = [x.detach().double().requires_grad_() for x in xs]
    kw = dict(opts)
    if nw is not None:
        kw.update(chosen_lengths=nw, rejected_lengths=nl)
    delta = kw.get("bco_delta", 0.0)
    if isinstance(delta, torch.Tensor):
        kw["bco_delta"] = delta.to(dtype)
        delta = kw["bco_delta"].double()
    ours = preference_loss(*xs, loss_type=kind, beta=beta, **kw)
    ref = truth(kind, *x64, beta=beta, delta=delta, nw=nw, nl=nl, **truth_options(opts))
    return xs, x64, ours, ref


def grads(loss, xs, upstream):
    gs = torch.autograd.grad(loss, xs, upstream.to(loss.dtype), allow_unused=True)
    return [torch.zeros_like(x) if g_ is None else g_ for x, g_ in zip(xs, gs)]


@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_float64_values_and_grads(kind, opts):
    scores, nw, nl, g = make_inputs(sum(map(ord, kind)), lengths=opts.get("lengths", False))
    beta, _, opts = split_options(kind, opts, B, g)
    xs, x64, ours, ref = run_both(kind, opts, scores, nw, nl, beta, torch.float64)
    assert ours.shape == (B,) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn(B, generator=g, dtype=torch.float64)
    for name, go, gr in zip(SCORES, grads(ours, xs, up), grads(ref, x64, up)):
        torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12, msg=f"d loss / d {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_low_precision_three_way(kind, opts, dtype):
    """Ours in dtype is no further from float64 than the naive formula evaluated in dtype."""
    scores, nw, nl, g = make_inputs(7 + sum(map(ord, kind)), lengths=opts.get("lengths", False))
    beta, _, opts = split_options(kind, opts, B, g)
    xs, x64, ours, truth64 = run_both(kind, opts, scores, nw, nl, beta, dtype)
    # The reference in the input dtype: the same textbook formula, evaluated in dtype.
    xr = [x.detach().clone().requires_grad_() for x in xs]
    delta = opts.get("bco_delta", 0.0)
    if isinstance(delta, torch.Tensor):
        delta = delta.to(dtype)
    naive = truth(kind, *xr, beta=beta, delta=delta, nw=nw, nl=nl, **truth_options(opts))
    three_way(ours, naive, truth64, dtype, f"{kind} value")
    up = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    for name, go, gn, gt in zip(SCORES, grads(ours, xs, up), grads(naive, xr, up),
                                grads(truth64, x64, up.double())):
        three_way(go, gn, gt, dtype, f"{kind} d/d{name}")


# ---------------------------------------------------------------------------------------------
# Edge values
# ---------------------------------------------------------------------------------------------

EPS_FOR = {"exo_pair": 0.1, "robust": 0.1}


def equal_value(kind, beta, eps, gamma):
    """Closed forms at pi_w = pi_l = ref_w = ref_l (z = 0, every log-ratio 0)."""
    ln2 = math.log(2)
    return {
        "sigmoid": ln2,
        "robust": ln2,  # ((1-eps) ln2 - eps ln2) / (1 - 2 eps)
        "ipo": 1 / (4 * beta**2),
        "hinge": 1.0,
        "bco_pair": 2 * ln2,
        "nca_pair": 2 * ln2,
        "exo_pair": 0.5 * (-ln2 - math.log(1 - eps)) + 0.5 * (-ln2 - math.log(eps or 1.0)),
        "sppo_hard": 2 / (4 * beta**2),
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "sigmoid_norm": ln2,
        "simpo": math.log1p(math.exp(gamma)),  # -logsig(-gamma)
        "aot": ln2,
        "aot_unpaired": ln2,
        "discopop": ln2 / 2 + 1 / 2,  # sig(0) = 1/2 of each of -logsig(0) and exp(0)
        "sft": 1.3 * B / sum(range(B)),  # -pi_w * B / total: scores -1.3, counts 0..B-1
    }[kind]


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_equal_scores(kind):
    beta, eps, gamma = 0.25, EPS_FOR.get(kind, 0.0), 0.5
    s = torch.full((B,), -1.3)
    xs = [s.clone().requires_grad_() for _ in range(4)]
    n = torch.arange(B)  # includes a zero count
    loss = preference_loss(*xs, loss_type=kind, beta=beta, label_smoothing=eps, gamma=gamma,
                           chosen_lengths=n, rejected_lengths=n)
    expected = torch.full((B,), equal_value(kind, beta, eps, gamma))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, g_ in zip(SCORES, grads(loss.sum(), xs, torch.tensor(1.0))):
        assert torch.isfinite(g_).all(), name


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_huge_margins(kind, beta):
    """|z| = 1e4 (both signs), also with |log-ratio| = 1e4 on one side: finite and right."""
    pw = torch.tensor([5e3, -5e3, 1e4, 0.0, -1e4], dtype=torch.float64)
    pl = torch.tensor([-5e3, 5e3, 0.0, 1e4, 0.0], dtype=torch.float64)
    rw = torch.zeros(5, dtype=torch.float64)
    rl = torch.zeros(5, dtype=torch.float64)
    eps = EPS_FOR.get(kind, 0.0)
    n = torch.ones(5)
    xs = [x.float().requires_grad_() for x in (pw, pl, rw, rl)]
    x64 = [x.detach().double().requires_grad_() for x in xs]
    ours = preference_loss(*xs, loss_type=kind, beta=beta, label_smoothing=eps,
                           chosen_lengths=n, rejected_lengths=n)
    ref = truth(kind, *x64, beta=beta, eps=eps, nw=n, nl=n)
    assert torch.isfinite(ref).all()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    up = torch.linspace(-1, 1, 5, dtype=torch.float64)
    for name, go, gr in zip(SCORES, grads(ours, xs, up), grads(ref, x64, up)):
        assert torch.isfinite(go).all(), name
        torch.testing.assert_close(go.double(), gr, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_tiny_beta(kind):
    scores, nw, nl, _ = make_inputs(3, lengths=True)
    beta, eps = 1e-6, EPS_FOR.get(kind, 0.0)
    xs, x64, ours, ref = run_both(kind, {"label_smoothing": eps}, scores, nw, nl, beta,
                                  torch.float32)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    up = torch.ones(B, dtype=torch.float64)
    for name, go, gr in zip(SCORES, grads(ours, xs, up), grads(ref, x64, up)):
        assert torch.isfinite(go).all(), name
        torch.testing.assert_close(go.double(), gr, rtol=1e-4, atol=1e-9, msg=name)


# One label_smoothing per type that is valid for it (hypothesis below).
SMOOTH = {"robust": 0.1, "exo_pair": 0.05, "sigmoid": 0.05, "simpo": 0.05}
finite_score = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(finite_score, min_size=12, max_size=12),
    st.floats(1e-3, 10.0),
    st.lists(st.integers(0, 50), min_size=6, max_size=6),
)
def test_finite_for_finite_inputs(vals, beta, counts):
    t = torch.tensor(vals, dtype=torch.float32).view(4, 3)
    n = torch.tensor(counts).view(2, 3)
    for kind in LOSS_TYPES:
        xs = [row.clone().requires_grad_() for row in t]
        loss = preference_loss(*xs, loss_type=kind, beta=beta,
                               label_smoothing=SMOOTH.get(kind, 0.0),
                               chosen_lengths=n[0], rejected_lengths=n[1])
        assert torch.isfinite(loss).all(), kind
        # the unbiased robust loss is not bounded below; sft is an NLL of scores that are not
        # log-probs here (some > 0)
        if kind not in ("robust", "sft"):
            assert (loss >= 0).all(), kind
        for name, g_ in zip(SCORES, grads(loss.sum(), xs, torch.tensor(1.0))):
            assert torch.isfinite(g_).all(), (kind, name)


# ---------------------------------------------------------------------------------------------
# Parity, combination, reference-free
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sigmoid_bitwise_dpo_loss(dtype):
    scores, _, _, g = make_inputs(11, b=33)
    xs = [s.to(dtype).requires_grad_() for s in scores]
    ys = [s.to(dtype).requires_grad_() for s in scores]
    ours = preference_loss(*xs, loss_type="sigmoid", beta=0.3, label_smoothing=0.0)
    ref = dpo_loss(*ys, 0.3)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    up = torch.randn(33, generator=g).to(dtype)
    for name, a, b in zip(SCORES, grads(ours, xs, up), grads(ref, ys, up)):
        assert torch.equal(a, b), name
    # Lengths of 1 leave sigmoid_norm bitwise equal as well.
    one = torch.ones(33, dtype=torch.long)
    if dtype in (torch.float32, torch.float64):
        norm = preference_loss(*xs, loss_type="sigmoid_norm", beta=0.3,
                               chosen_lengths=one, rejected_lengths=one)
        assert torch.equal(norm, ref)


def test_weighted_combination():
    scores, nw, nl, _ = make_inputs(5, lengths=True)
    kw = dict(beta=0.4, label_smoothing=0.1, chosen_lengths=nw, rejected_lengths=nl)
    types = ["sigmoid", "exo_pair", "sigmoid_norm", "apo_zero"]
    weights = [1.0, 0.5, 2.0, 0.0]
    # label_smoothing is shared: each type that reads it gets it, apo_zero does not.
    parts = [
        preference_loss(*scores, loss_type=t, **{**kw, "label_smoothing": 0.0 if t == "apo_zero"
                                                 else 0.1})
        for t in types
    ]
    combo = preference_loss(*scores, loss_type=types, loss_weights=weights, **kw)
    torch.testing.assert_close(combo, sum(w * p for w, p in zip(weights, parts)),
                               rtol=1e-14, atol=0)
    default = preference_loss(*scores, loss_type=tuple(types), **kw)
    torch.testing.assert_close(default, sum(parts), rtol=1e-14, atol=0)
    # A one-element list is the type itself, times its weight (as TRL weighs a single type).
    assert torch.equal(preference_loss(*scores, loss_type=["sigmoid"], loss_weights=[1.0], **kw),
                       parts[0])
    torch.testing.assert_close(preference_loss(*scores, loss_type=["sigmoid"], loss_weights=[0.5], **kw),
                               0.5 * parts[0], rtol=1e-14, atol=0)


def test_simpo_is_reference_free():
    scores, nw, nl, _ = make_inputs(9, lengths=True)
    pw, pl, rw, rl = scores
    kw = dict(loss_type="simpo", beta=2.0, gamma=1.0, chosen_lengths=nw, rejected_lengths=nl)
    free = preference_loss(pw, pl, **kw)
    assert torch.equal(free, preference_loss(pw, pl, rw, rl, **kw))
    torch.testing.assert_close(free, truth("simpo", pw, pl, None, None, beta=2.0, gamma=1.0,
                                           nw=nw, nl=nl), rtol=1e-12, atol=1e-12)
    assert not check_loss_config("simpo").needs_reference


@pytest.mark.parametrize("kind", [t for t in LOSS_TYPES if t not in ("simpo", "sft")] + [["simpo", "ipo"]])
def test_reference_required(kind):
    scores, nw, nl, _ = make_inputs(1, lengths=True)
    with pytest.raises(ValueError, match="ref_chosen"):
        preference_loss(scores[0], scores[1], loss_type=kind,
                        label_smoothing=EPS_FOR.get(kind if isinstance(kind, str) else "", 0.0),
                        chosen_lengths=nw, rejected_lengths=nl)


def test_config_round_trip():
    cfg = check_loss_config(["sigmoid", "sigmoid_norm"], 0.2, 0.1, [1, 3], gamma=0.0)
    assert isinstance(cfg, LossConfig)
    assert cfg.loss_type == ("sigmoid", "sigmoid_norm") and cfg.loss_weights == (1.0, 3.0)
    assert cfg.needs_reference and cfg.needs_lengths
    assert check_loss_config("ipo").loss_weights == (1.0,)
    assert not check_loss_config("ipo").needs_lengths
    scores, nw, nl, _ = make_inputs(2, lengths=True)
    a = preference_loss(*scores, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, chosen_lengths=nw, rejected_lengths=nl)
    b = preference_loss(*scores, loss_type=["sigmoid", "sigmoid_norm"], beta=0.2,
                        label_smoothing=0.1, loss_weights=[1, 3], gamma=0.0,
                        chosen_lengths=nw, rejected_lengths=nl)
    assert torch.equal(a, b)
    with pytest.raises(AttributeError):
        cfg.beta = 1.0  # frozen


# ---------------------------------------------------------------------------------------------
# Validation: every error names its argument
# ---------------------------------------------------------------------------------------------

_S = torch.tensor([-1.0, -2.0, -0.5])


def _call(**over):
    args = {n: _S.clone() for n in SCORES}
    args.update(over)
    pos = [args.pop(n) for n in SCORES]
    return preference_loss(*pos, **args)


CONFIG_ERRORS = [
    (dict(loss_type="dpo"), ValueError, r"loss_type must be one of \('sigmoid', 'robust'"),
    (dict(loss_type=[]), ValueError, "loss_type"),
    (dict(loss_type=3), TypeError, "loss_type"),
    (dict(loss_type=["ipo", 2]), TypeError, "loss_type"),
    (dict(loss_type=["ipo", "ipo"]), ValueError, "loss_type"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta="0.1"), TypeError, "beta"),
    (dict(beta=True), TypeError, "beta"),
    (dict(beta=torch.tensor(0.1)), TypeError, "beta"),
    (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=-0.01), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(loss_type="exo_pair"), ValueError, r"label_smoothing must be in \(0, 0.5\)"),
    (dict(loss_type="exo_pair", label_smoothing=0.6), ValueError, "label_smoothing"),
    (dict(loss_type=["sigmoid", "exo_pair"]), ValueError, "label_smoothing.*exo_pair"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing must be 0"),
    (dict(loss_type=["ipo", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type=["ipo", "hinge"], loss_weights=[1.0, -0.5]), ValueError, "loss_weights"),
    (dict(loss_type=["ipo", "hinge"], loss_weights=[0, 0]), ValueError, "loss_weights"),
    (dict(loss_type=["ipo", "hinge"], loss_weights=[1, float("inf")]), ValueError,
     "loss_weights"),
    (dict(loss_weights=1.0), TypeError, "loss_weights"),
    (dict(loss_weights=torch.ones(1)), TypeError, "loss_weights"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(bco_delta="running"), ValueError, "bco_delta"),
    (dict(bco_delta=torch.zeros(3, 1)), TypeError, "bco_delta"),
    (dict(bco_delta=torch.zeros(3, dtype=torch.long)), TypeError, "bco_delta"),
    (dict(loss_type="aot", label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\).*'aot'"),
    (dict(discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(discopop_tau=float("inf")), ValueError, "discopop_tau"),
    (dict(f_divergence_type="kl"), ValueError, r"f_divergence_type must be one of \('reverse_kl'"),
    (dict(f_alpha_divergence_coef=float("nan")), ValueError, "f_alpha_divergence_coef"),
    (dict(f_alpha_divergence_coef="0.5"), TypeError, "f_alpha_divergence_coef"),
] + [  # f-DPO only where TRL allows it: the error names the types it refuses
    (dict(loss_type=["sigmoid", t], f_divergence_type=f), ValueError,
     rf"f_divergence_type='{f}' is only defined for loss_type in .*got \('{t}',\)")
    for t in ("aot", "aot_unpaired", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "simpo")
    for f in ("forward_kl", "alpha_divergence")
]


@pytest.mark.parametrize("over,exc,match", CONFIG_ERRORS)
def test_config_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)
    cfg_keys = {"loss_type", "beta", "label_smoothing", "loss_weights", "gamma", "bco_delta", "discopop_tau",
                "f_divergence_type", "f_alpha_divergence_coef"}
    with pytest.raises(exc, match=match):  # the same from the construction-time check
        check_loss_config(**{k: v for k, v in over.items() if k in cfg_keys})


TENSOR_ERRORS = [
    (dict(policy_rejected=torch.zeros(4)), ValueError, r"policy_rejected .*\(3,\).*\(4,\)"),
    (dict(ref_chosen=torch.zeros(2)), ValueError, "ref_chosen"),
    (dict(ref_rejected=torch.zeros(3, 1)), ValueError, "ref_rejected must be 1-D"),
    (dict(policy_chosen=torch.zeros(1, 3)), ValueError, "policy_chosen must be 1-D"),
    (dict(policy_chosen=torch.zeros(3, dtype=torch.long)), TypeError, "policy_chosen"),
    (dict(policy_rejected=[0.0, 0.0, 0.0]), TypeError, "policy_rejected"),
    (dict(policy_chosen=None), TypeError, "policy_chosen"),
    (dict(ref_rejected=None), ValueError, "ref_rejected"),
    (dict(ref_chosen=None), ValueError, "ref_chosen"),
    (dict(ref_chosen=None, ref_rejected=None), ValueError, "ref_chosen"),
    (dict(loss_type="sigmoid_norm"), ValueError, "chosen_lengths"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(3)), ValueError,
     "rejected_lengths"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(3),
          rejected_lengths=torch.ones(2)), ValueError, r"rejected_lengths must have shape \(3,\)"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(3, dtype=torch.bool),
          rejected_lengths=torch.ones(3)), TypeError, "chosen_lengths"),
    (dict(loss_type="bco_pair", bco_delta=torch.zeros(4)), ValueError, r"bco_delta.*\(3,\)"),
]


@pytest.mark.parametrize("over,exc,match", TENSOR_ERRORS)
def test_tensor_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_metrics_errors():
    with pytest.raises(ValueError, match="beta"):
        reward_metrics(_S, _S, _S, _S, 0.0)
    with pytest.raises(ValueError, match="ref_rejected"):
        reward_metrics(_S, _S, _S, torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="ref_chosen"):
        reward_metrics(_S, _S, None, _S, 0.1)


# ---------------------------------------------------------------------------------------------
# Metrics, on numbers computed by hand
# ---------------------------------------------------------------------------------------------


def test_reward_metrics_by_hand():
    # beta = 0.5.  Chosen rewards 0.5*(pw - rw) = [0.5, 0, 0, 0.5];
    # rejected 0.5*(pl - rl) = [-0.5, 0.5, 0, -0.5]; pair 3 is a tie (not accurate).
    pw = torch.tensor([-1.0, -2.0, -1.0, -2.0], requires_grad=True)
    pl = torch.tensor([-3.0, -1.0, -1.0, -4.0], requires_grad=True)
    rw = torch.tensor([-2.0, -2.0, -1.0, -3.0])
    rl = torch.tensor([-2.0, -2.0, -1.0, -3.0])
    m = reward_metrics(pw, pl, rw, rl, 0.5)
    expected = {
        "rewards/chosen": 0.25,
        "rewards/rejected": -0.125,
        "rewards/margins": 0.375,  # mean of [1, -0.5, 0, 1]
        "rewards/accuracies": 0.5,
        "logps/chosen": -1.5,
        "logps/rejected": -2.25,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].shape == () and not m[k].requires_grad, k
        assert m[k].item() == v, (k, m[k].item(), v)

    # Reference-free: rewards are beta * policy scores: chosen [-0.5, -1, -0.5, -1],
    # rejected [-1.5, -0.5, -0.5, -2] (pair 3 ties again).
    free = reward_metrics(pw, pl, None, None, 0.5)
    for k, v in {"rewards/chosen": -0.75, "rewards/rejected": -1.125,
                 "rewards/margins": 0.375, "rewards/accuracies": 0.5}.items():
        assert free[k].item() == v, k

    # bf16 scores are averaged in float32.
    mb = reward_metrics(pw.bfloat16(), pl.bfloat16(), rw.bfloat16(), rl.bfloat16(), 0.5)
    assert all(v.dtype == torch.float32 for v in mb.values())
    assert mb["rewards/margins"].item() == 0.375
