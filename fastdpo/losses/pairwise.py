"""Pairwise preference losses on per-sequence scores (cheap ops on (B,) vectors).

Every loss here maps four (B,) score vectors -- the policy's and the reference's scores of the
chosen (preferred, ``w``) and rejected (``l``) completions -- to a (B,) vector of per-pair losses;
the caller takes the mean.  A score is a sequence log-prob as the DPO module computed it: by
default the masked MEAN of token log-probs (x-transformers), optionally the masked sum.

Notation used in every docstring below::

    pi_w, pi_l    policy_chosen, policy_rejected
    ref_w, ref_l  ref_chosen, ref_rejected
    r_w = pi_w - ref_w,  r_l = pi_l - ref_l          (log-ratios, "implicit rewards" / beta)
    z   = (pi_w - pi_l) - (ref_w - ref_l)  (= r_w - r_l)
    x   = beta * z
    eps = label_smoothing
    logsig(t) = log(sigmoid(t)),  sig(t) = sigmoid(t)

With ``f_divergence_type`` other than reverse KL, z is ``f'(r_w) - f'(r_l)`` instead
(:func:`f_divergence_score`) for every type that reads z.

The math lives in :func:`_per_type_loss` (with :func:`_margin_loss` for the types that read
the margin z alone and :func:`_reward_loss` for those that read each reward); everything else
is argument checking.  All forms are written with ``logsigmoid``/``sigmoid`` of a single argument, never
``log(sigmoid(.))`` or ``1 - sigmoid(.)``, so they stay finite (value and gradient) for any
finite input where the formula itself is finite, e.g. equal scores or margins of 1e4.

The loss types (``r_w, r_l`` are log-ratios)::

    sigmoid      -(1-eps) logsig(x) - eps logsig(-x)                  eps in [0, 0.5)
                 DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7; eps > 0 is
                 conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
                 preferences").  eps = 0 is bitwise :func:`dpo_loss`.
    robust       (-(1-eps) logsig(x) + eps logsig(-x)) / (1 - 2 eps)  eps in [0, 0.5)
                 Provably robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409): an
                 unbiased loss under preference flips with probability eps.  Not bounded
                 below for eps > 0 (about -eps x / (1-2eps) for large x).
    ipo          (z - 1/(2 beta))^2
                 IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17, beta = tau.  Its
                 authors intend length-normalized (per-token mean) log-probs: use mean
                 scores (fastdpo's default) or pass lengths with sum scores.
    hinge        relu(1 - x)
                 SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425): its rank-calibration hinge
                 with margin delta = 1/beta, scaled by beta, taken (as in TRL) on the
                 reference-adjusted margin z rather than the raw policy margin.
    bco_pair     -logsig(beta r_w - delta) - logsig(-(beta r_l - delta))
                 BCO, Jung et al. 2024 (arXiv 2404.04656): a binary classifier with the
                 implicit reward as logit, chosen = 1, rejected = 0, reward shift delta.
    nca_pair     -logsig(beta r_w) - 1/2 logsig(-beta r_w) - 1/2 logsig(-beta r_l)
                 NCA, Chen et al. 2024, "Noise Contrastive Alignment" (arXiv 2402.05369),
                 the K = 2 (pairwise) case.
    exo_pair     sig(x) (logsig(x) - log(1-eps)) + sig(-x) (logsig(-x) - log eps)
                                                                        eps in (0, 0.5)
                 EXO, Ji et al. 2024 (arXiv 2402.00856) eq. 16 with K = 2: the reverse KL
                 from the model's preference distribution softmax(beta r) over the pair to
                 the smoothed label distribution (1-eps, eps); >= 0.  eps = 1e-3 is
                 TRL's old default; 0 is not allowed (log 0).
    sppo_hard    (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2
                 SPPO, Wu et al. 2024 (arXiv 2405.00675), the squared loss of its
                 Algorithm 1 with the hard win probability P(y_w > y_l) = 1 (0 for y_l)
                 in place of the estimated one, and eta = 1/beta.
    apo_zero     sig(-beta r_w) + sig(beta r_l)      (= 1 - sig(beta r_w) + sig(beta r_l))
                 APO-zero, D'Oosterlinck et al. 2024, "Anchored Preference Optimization"
                 (arXiv 2408.06266) eq. 7: raise chosen, lower rejected likelihood.
    apo_down     sig(beta r_w) + sig(-x)             (= sig(beta r_w) + 1 - sig(x))
                 APO-down, same paper eq. 8: lower both, the rejected more.
    sigmoid_norm the ``sigmoid`` loss (same eps) on z computed from per-token averages,
                 z = (pi_w/n_w - pi_l/n_l) - (ref_w/n_w - ref_l/n_l), n = length clamped
                 at 1.  Length-normalized DPO, Tulu 3, Lambert et al. 2024 (arXiv
                 2411.15124).  Needs the lengths and SUM scores (with mean scores it is
                 exactly ``sigmoid``).
    simpo        -(1-eps) logsig(u) - eps logsig(-u),  u = beta (pi_w - pi_l) - gamma
                                                                        eps in [0, 0.5)
                 SimPO, Meng et al. 2024 (arXiv 2405.14734) (eps: the SimPO trainer's
                 label smoothing).  Reference-free: ref_* are ignored and may be
                 None.  Scores must be average log-probs (the default, or sums + lengths).
                 The paper's beta is 2-10, not DPO's 0.1: set beta for simpo.
    aot          -(1-eps) logsig(beta d) - eps logsig(-beta d),       eps in [0, 0.5)
                 d = sort(pi_w - pi_l)_i - sort(ref_w - ref_l)_i  (ascending over the batch)
                 AOT, Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
                 Optimal Transport" (arXiv 2406.05882), paired form: first-order stochastic
                 dominance of the policy's margins over the reference's, by the 1-D optimal
                 transport plan (sorting), with the logistic loss.  Entry i is the loss of
                 the i-th smallest margins, not of pair i: the entries depend on the whole
                 call (under data parallelism: on the rank's batch); B = 1 is ``sigmoid``.
    aot_unpaired the same on d = sort(r_w)_i - sort(r_l)_i: the unpaired form (chosen
                 log-ratios dominate the rejected ones as distributions).
    discopop     (1 - sig(x/tau)) (-logsig(x)) + sig(x/tau) exp(-x)
                 DiscoPOP's log-ratio modulated loss, Chan Lu et al. 2024, "Discovering
                 Preference Optimization Algorithms with and for LLMs" (arXiv 2406.08414)
                 eq. 5: the logistic loss for x < 0 blending into the exponential loss
                 for x > 0; tau = ``discopop_tau``.
    sft          -pi_w, the chosen completion's negative log-likelihood; its mean over the
                 pairs is the SFT (NLL) term of RPO, Pang et al. 2024 (arXiv 2404.19733)
                 and TRL's MPO recipe.  With MEAN scores (no lengths): -mean_i pi_w_i,
                 each chosen completion's per-token mean NLL averaged over the pairs (RPO's
                 length-normalized NLL).  With SUM scores and lengths: entry i is
                 -pi_w_i * B / sum_j n_w_j, so the mean over the pairs is TRL 1.16's
                 "sft": the NLL per chosen token over the whole batch (the total clamped
                 at 1: a batch without chosen tokens gives 0 where TRL gives NaN).
                 Reference-free, and unaffected by f_divergence_type.

BCO's reward shift.  TRL's DPOTrainer used to keep a running mean of the batch rewards
across steps (hidden trainer state; recent versions use delta = 0).  Here it is stateless
and explicit: ``bco_delta`` is a number (default 0, TRL's current behaviour), a tensor the
caller maintains (pass it detached; a (B,) tensor gives one shift per pair), or
``"batch"``: delta = mean over this call's 2B rewards ``cat(beta r_w, beta r_l)``, detached
-- TRL's first-step value.  With ``"batch"`` a pair's loss depends on the other pairs in
the call (under data parallelism: on its rank's batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from .config import (
    _REFERENCE_FREE, _USES_LENGTHS, DISCOPOP_TAU, F_ALPHA_DIVERGENCE_COEF, SIMPO_GAMMA, LossConfig,
    check_loss_config,
)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Per-pair DPO loss ``-log sigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))``, shape (B,).

    Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, eq. 7.  Written
    in the same order of operations as x-transformers' ``DPO`` so results agree bitwise given
    the same scores.
    """
    policy_logratios = policy_chosen - policy_rejected
    ref_logratios = ref_chosen - ref_rejected
    return -F.logsigmoid(beta * (policy_logratios - ref_logratios))


# --------------------------------------------------------------------------------------------
# Tensor checks
# --------------------------------------------------------------------------------------------


def _check_scores(**scores: Tensor | None) -> int:
    """All given score vectors: floating, 1-D, one shape, one device.  Returns B."""
    first_name, first = None, None
    for name, x in scores.items():
        if x is None and name.startswith("ref_"):
            continue
        _checks.tensor(name, x, ndim=1)
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        if first is None:
            first_name, first = name, x
        elif x.shape != first.shape:
            raise ValueError(
                f"{name} must have the shape of {first_name}, {tuple(first.shape)}, "
                f"got {tuple(x.shape)}"
            )
    _checks.same_device(**scores)
    return first.shape[0]


def _check_reference(ref_chosen: Tensor | None, ref_rejected: Tensor | None, who: str) -> bool:
    """Both references or neither; returns whether they are given."""
    if (ref_chosen is None) != (ref_rejected is None):
        missing = "ref_chosen" if ref_chosen is None else "ref_rejected"
        raise ValueError(
            f"{missing} is None but the other reference score is given: pass both "
            f"ref_chosen and ref_rejected, or neither ({who})"
        )
    return ref_chosen is not None


def _check_lengths(b: int, chosen_lengths: Tensor | None, rejected_lengths: Tensor | None):
    for name, n in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if n is None:
            continue
        _checks.tensor(name, n, ndim=1)
        if n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"{name} must hold integer or float token counts, got {n.dtype}")
        if n.shape[0] != b:
            raise ValueError(f"{name} must have shape ({b},), got {tuple(n.shape)}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        missing = "chosen_lengths" if chosen_lengths is None else "rejected_lengths"
        raise ValueError(f"{missing} is None but the other length vector is given: pass both")


# --------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------


# Where TRL clamps (alpha - 1) * log-ratio before exp, per score dtype, so exp stays finite in
# that dtype; float64 (absent from TRL's table) clamps as float32 does, so a float64 reference
# of a float32 run has the same kink.
_ALPHA_CLAMP = {torch.float16: 11.0}


def f_divergence_score(logratio: Tensor, kind: str, alpha: float) -> Tensor:
    """f'(u) of f-DPO (Wang et al. 2023, arXiv 2309.16240, Table 1) at u = pi/ref, from the
    log-ratio r = log u, in r's dtype; the DPO margin becomes f'(u_w) - f'(u_l)::

        reverse_kl        r                                        (DPO)
        forward_kl        1 - exp(-r)
        js_divergence     log 2 + logsig(r)                        (= log(2u / (1 + u)))
        alpha_divergence  (exp((alpha - 1) r) - 1) / (alpha - 1)   (u^(alpha-1) - 1)/(alpha-1)
                          r itself when |alpha - 1| < 1e-6 (the limit); (alpha - 1) r is
                          clamped at 11 for float16 scores, 80 otherwise, and exp runs in
                          float32 at least (TRL 1.16's clamping).  alpha is TRL's
                          coefficient: the paper's (1 - u^-a) / a with a = 1 - alpha (the
                          same at TRL's default 0.5).

    forward_kl is the paper's -1/u plus 1 (TRL's form): the constant cancels in the margin
    except where each side is divided by its own length (``ipo``, ``sigmoid_norm`` with sums).
    """
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return -torch.expm1(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if abs(alpha - 1.0) < 1e-6:
        return logratio
    dtype = logratio.dtype
    t = ((alpha - 1.0) * logratio).to(torch.promote_types(dtype, torch.float32))
    return torch.expm1(t.clamp(max=_ALPHA_CLAMP.get(dtype, 80.0))).to(dtype) * (1.0 / (alpha - 1.0))


def _smoothed_sigmoid(u: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) logsig(u) - eps logsig(-u)``; exactly ``-logsig(u)`` when eps == 0."""
    if eps == 0.0:
        return -F.logsigmoid(u)
    return -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)


def _per_type_loss(
    t: str,
    pi_w: Tensor,
    pi_l: Tensor,
    ref_w: Tensor | None,
    ref_l: Tensor | None,
    n_w: Tensor | None,
    n_l: Tensor | None,
    cfg: LossConfig,
    sft_scale: Tensor | None,
) -> Tensor:
    beta, eps = cfg.beta, cfg.label_smoothing

    if t == "sft":
        return -pi_w if sft_scale is None else -pi_w * sft_scale
    if t == "aot":  # sorted margins: the i-th smallest policy margin against the reference's
        z = torch.sort(pi_w - pi_l).values - torch.sort(ref_w - ref_l).values
        return _smoothed_sigmoid(beta * z, eps)
    if t == "aot_unpaired":  # sorted log-ratios: the i-th smallest chosen against rejected
        z = torch.sort(pi_w - ref_w).values - torch.sort(pi_l - ref_l).values
        return _smoothed_sigmoid(beta * z, eps)

    if cfg.f_divergence_type != "reverse_kl":
        # f-DPO: z = f'(pi_w / ref_w) - f'(pi_l / ref_l) on the log-ratios (then per token).
        alpha = cfg.f_alpha_divergence_coef
        s_w = f_divergence_score(pi_w - ref_w, cfg.f_divergence_type, alpha)
        s_l = f_divergence_score(pi_l - ref_l, cfg.f_divergence_type, alpha)
        if t in _USES_LENGTHS and n_w is not None:
            s_w, s_l = s_w / n_w, s_l / n_l
        z = s_w - s_l
    else:
        if t in _USES_LENGTHS and n_w is not None:
            # Sum scores -> per-token averages.  Keep the order (a - b) - (c - d) of dpo_loss.
            pi_w, pi_l = pi_w / n_w, pi_l / n_l
            if ref_w is not None:
                ref_w, ref_l = ref_w / n_w, ref_l / n_l
        if t == "simpo":
            return _smoothed_sigmoid(beta * (pi_w - pi_l) - cfg.gamma, eps)
        # Same order of operations as dpo_loss (bitwise parity for "sigmoid" with eps == 0).
        z = (pi_w - pi_l) - (ref_w - ref_l)

    if t in _MARGIN_TYPES:
        return _margin_loss(t, z, cfg)
    return _reward_loss(t, pi_w, pi_l, ref_w, ref_l, z, cfg)


# The types whose loss is a function of the margin z alone; the others read each sequence's reward.
_MARGIN_TYPES = frozenset({"sigmoid", "sigmoid_norm", "robust", "ipo", "hinge", "exo_pair", "discopop"})


def _margin_loss(t: str, z: Tensor, cfg: LossConfig) -> Tensor:
    beta, eps = cfg.beta, cfg.label_smoothing
    if t in ("sigmoid", "sigmoid_norm"):
        return _smoothed_sigmoid(beta * z, eps)
    if t == "robust":
        x = beta * z
        return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    if t == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    if t == "hinge":
        return torch.relu(1 - beta * z)
    if t == "exo_pair":
        # KL(Bernoulli(sig(x)) || Bernoulli(1 - eps)), each term a product of a probability and
        # a finite log (logsigmoid never returns -inf for finite x), so no 0 * inf.
        x = beta * z
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(eps)
        )
    if t == "discopop":
        # (1 - sig(x/tau)) logistic(x) + sig(x/tau) exp(-x); the second product as one exp,
        # finite where exp(-x) alone would overflow (x << 0: the product tends to 0, tau < 1).
        x, tau = beta * z, cfg.discopop_tau
        return -F.logsigmoid(x) * torch.sigmoid(-x / tau) + torch.exp(F.logsigmoid(x / tau) - x)
    raise AssertionError(t)


def _reward_loss(t: str, pi_w: Tensor, pi_l: Tensor, ref_w: Tensor, ref_l: Tensor, z: Tensor, cfg: LossConfig) -> Tensor:
    beta = cfg.beta
    rw = beta * (pi_w - ref_w)
    rl = beta * (pi_l - ref_l)
    if t == "bco_pair":
        if isinstance(cfg.bco_delta, str):  # "batch"
            delta = torch.cat([rw, rl]).detach().mean()
        else:
            delta = cfg.bco_delta
        return -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))
    if t == "nca_pair":
        return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    if t == "sppo_hard":
        half = 1 / (2 * beta)
        return (pi_w - ref_w - half) ** 2 + (pi_l - ref_l + half) ** 2
    if t == "apo_zero":
        return torch.sigmoid(-rw) + torch.sigmoid(rl)
    if t == "apo_down":
        return torch.sigmoid(rw) + torch.sigmoid(-(beta * z))
    raise AssertionError(t)  # check_loss_config admits only LOSS_TYPES


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = SIMPO_GAMMA,
    loss_weights: Sequence[float] | None = None,
    bco_delta: float | str | Tensor = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """Per-pair preference loss, shape (B,); the caller takes the mean.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) floating score vectors
            (sequence log-probs), one shape, one device; mixed float dtypes promote as torch
            does.  ``ref_*`` may be ``None`` (both) when every type is reference-free
            (``simpo``, ``sft``); otherwise a ``ValueError`` names ``ref_chosen``.  For TRL's
            ``reference_free=True`` behaviour pass zeros.
        loss_type: a name from :data:`LOSS_TYPES`, or a sequence of distinct names: the result
            is then ``sum_k loss_weights[k] * loss_k`` (per pair).
        beta: > 0, shared by all types (it is tau in IPO, 1/eta in SPPO).
        label_smoothing: eps, shared by the types that read it (ranges in
            :func:`check_loss_config`).
        gamma: SimPO's target reward margin, in log-prob units *after* the beta scaling (not
            gamma/beta): the loss is ``-logsig(beta * (pi_w - pi_l) - gamma)``.  Default 0.5,
            the official SimPO trainer's default (beta = 2.0, gamma/beta = 0.25).
        loss_weights: one weight >= 0 per type; ``None`` means all 1.
        bco_delta: BCO's reward shift delta (``bco_pair`` only): a float, a detached 0-D or
            (B,) tensor (e.g. a running mean the caller keeps), or ``"batch"``.  See below.
        discopop_tau: DiscoPOP's temperature tau, > 0 (default 0.05, the paper's and TRL's).
        f_divergence_type: the f-DPO regularizer (see :func:`f_divergence_score`):
            ``"reverse_kl"`` (default: DPO), ``"forward_kl"``, ``"js_divergence"``,
            ``"alpha_divergence"``.  Other than reverse KL, only with ``sigmoid``,
            ``sigmoid_norm``, ``hinge``, ``ipo``, ``exo_pair``, ``robust``, ``discopop``,
            ``sft`` (TRL's list; else ``ValueError``): each of them then reads
            ``z = f'(r_w) - f'(r_l)`` in place of ``r_w - r_l`` (``ipo``/``sigmoid_norm``
            with lengths: ``f'(r_w)/n_w - f'(r_l)/n_l``, as TRL); ``sft`` is unchanged.
            With mean scores, r is the log-ratio of the per-token means.
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"`` (default 0.5, TRL 1.16's
            ``DPOConfig`` default; alpha = 1 is reverse KL).
        chosen_lengths, rejected_lengths: (B,) completion token counts (int or float), both or
            neither.  Required by ``sigmoid_norm``.  When given, the scores are taken to be
            SUMS and the types defined on per-token averages -- ``sigmoid_norm``, ``ipo``,
            ``simpo`` -- divide each score by its count clamped at 1 (an empty completion's
            sum, 0, stays 0); ``sft`` divides by the batch's chosen token total; every other
            type ignores them.  With fastdpo's default MEAN scores, leave them out: the scores
            already are the averages.

    Each type's formula and paper: the module docstring.

    Computation stays in the scores' dtype (bitwise parity with :func:`dpo_loss`); length
    division promotes to float32 at least, so bf16/fp16 counts do not round.
    """
    cfg = check_loss_config(
        loss_type, beta, label_smoothing, loss_weights, gamma=gamma, bco_delta=bco_delta,
        discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )
    _check_call(cfg, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths)
    return _combined_loss(
        cfg, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
        chosen_lengths,
    )


def _check_call(cfg: LossConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                rejected_lengths) -> None:
    """:func:`preference_loss`'s tensor arguments against each other and the checked ``cfg``."""
    b = _check_scores(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    has_ref = _check_reference(ref_chosen, ref_rejected, "preference_loss")
    if cfg.needs_reference and not has_ref:
        need = tuple(t for t in cfg.loss_type if t not in _REFERENCE_FREE)
        raise ValueError(
            f"ref_chosen and ref_rejected are None, but loss_type {need} needs the reference "
            f"scores (only {tuple(sorted(_REFERENCE_FREE))} are reference-free)"
        )
    _check_lengths(b, chosen_lengths, rejected_lengths)
    per_pair_delta = isinstance(cfg.bco_delta, Tensor) and cfg.bco_delta.ndim == 1
    _checks.same_device(
        policy_chosen=policy_chosen,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        bco_delta=cfg.bco_delta if per_pair_delta else None,
    )
    if cfg.needs_lengths and chosen_lengths is None:
        raise ValueError(
            "chosen_lengths and rejected_lengths are required by loss_type 'sigmoid_norm' "
            "(completion token counts, with SUM scores)"
        )
    if isinstance(cfg.bco_delta, Tensor) and "bco_pair" in cfg.loss_type:
        if cfg.bco_delta.ndim == 1 and cfg.bco_delta.shape[0] != b:
            raise ValueError(
                f"bco_delta must be 0-D or have shape ({b},), got {tuple(cfg.bco_delta.shape)}"
            )


def _combined_loss(
    cfg, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
    batch_chosen_lengths=None,
):
    """:func:`preference_loss` on arguments already checked (``cfg`` from check_loss_config);
    ``batch_chosen_lengths``: every chosen completion's token count in the batch these pairs
    belong to (sum scores: ``sft``'s token mean is over the batch), None for mean scores."""
    dtype = torch.float32
    for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    n_w = n_l = None
    if chosen_lengths is not None and any(t in _USES_LENGTHS for t in cfg.loss_type):
        n_w = chosen_lengths.to(dtype).clamp(min=1)
        n_l = rejected_lengths.to(dtype).clamp(min=1)
    sft_scale = None
    if batch_chosen_lengths is not None and "sft" in cfg.loss_type:
        n = batch_chosen_lengths.to(dtype)
        sft_scale = n.shape[0] / n.sum().clamp(min=1)

    total = None
    for t, w in zip(cfg.loss_type, cfg.loss_weights):
        loss = _per_type_loss(
            t, policy_chosen, policy_rejected, ref_chosen, ref_rejected, n_w, n_l, cfg, sft_scale
        )
        if w != 1.0:  # (1.0 * loss is loss: the unweighted result stays bitwise)
            loss = w * loss
        total = loss if total is None else total + loss
    return total


def pair_losses(
    sums: Tensor,
    ref_scores: Tensor,
    count: Tensor,
    cfg: LossConfig,
    reduction: str,
    pairs: Tensor | None = None,
    batch_count: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Per-pair losses (k,) of some pairs of a DPO batch, from their sequences' summed log-probs.

    ``sums``, ``ref_scores`` and ``count`` are (2k,): the pairs' k chosen sequences, then their k
    rejected ones (summed policy log-probs; reference scores already in ``reduction``; scored
    token counts).  ``reduction`` is the DPO module's ``logprob_reduction``: ``"mean"`` divides
    the sums by the counts, ``"sum"`` passes the counts as lengths (for the types defined on
    per-token averages).  ``pairs`` (k,) names the pairs, to select a per-pair ``bco_delta``;
    ``batch_count`` is the whole batch's (2B,) counts when these are some of its pairs (``sft``
    with sums is a token mean over the batch; counts of empty sequences, clamped at 1e-5, count
    as 0).  ``weights`` (k,) multiply the pairs' losses (WPO's,
    :func:`fastdpo.losses.weighting.wpo_weights`).
    The configuration was checked once (:func:`check_loss_config`), so nothing is checked here.
    """
    k = sums.shape[0] // 2
    scores = sums / count if reduction == "mean" else sums
    n_w = n_l = batch_w = None
    if reduction == "sum":
        n_w, n_l = count[:k], count[k:]
        if "sft" in cfg.loss_type:
            full = count if batch_count is None else batch_count
            batch_w = full[: full.shape[0] // 2].floor()
    if pairs is not None and isinstance(cfg.bco_delta, Tensor) and cfg.bco_delta.ndim == 1:
        cfg = dataclasses.replace(cfg, bco_delta=cfg.bco_delta[pairs])
    losses = _combined_loss(cfg, scores[:k], scores[k:], ref_scores[:k], ref_scores[k:], n_w, n_l, batch_w)
    return losses if weights is None else losses * weights


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reward_metrics(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float,
) -> dict[str, Tensor]:
    """The reward statistics TRL's DPOTrainer logs, as detached 0-D tensors.

    With implicit rewards ``c_i = beta * (pi_w_i - ref_w_i)`` and ``r_i = beta * (pi_l_i -
    ref_l_i)`` (``beta * pi_w_i`` and ``beta * pi_l_i`` when ``ref_*`` are None, i.e.
    reference-free), over the B pairs::

        rewards/chosen      mean_i c_i
        rewards/rejected    mean_i r_i
        rewards/margins     mean_i (c_i - r_i)
        rewards/accuracies  mean_i [c_i > r_i]     (strict: a tie counts as wrong)
        logps/chosen        mean_i pi_w_i
        logps/rejected      mean_i pi_l_i

    Computed in float32 (float64 for float64 scores), so bf16 scores average without rounding.
    A batch of B = 0 gives NaN means.  Shapes, dtypes and beta are checked as in
    :func:`preference_loss`.
    """
    _check_scores(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    has_ref = _check_reference(ref_chosen, ref_rejected, "reward_metrics")
    beta = _checks.positive_finite("beta", beta)

    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    pi_w, pi_l = policy_chosen.detach().to(dtype), policy_rejected.detach().to(dtype)
    if has_ref:
        chosen = beta * (pi_w - ref_chosen.detach().to(dtype))
        rejected = beta * (pi_l - ref_rejected.detach().to(dtype))
    else:
        chosen, rejected = beta * pi_w, beta * pi_l
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(dtype).mean(),
        "logps/chosen": pi_w.mean(),
        "logps/rejected": pi_l.mean(),
    }
