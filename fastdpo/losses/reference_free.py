"""The loss math of the reference-free families, ORPO and CPO (with SimPO and AlphaPO).

Like :mod:`fastdpo.losses.pairwise` for DPO, these are cheap ops on per-sequence scores, (B,) vectors:
every route of :class:`fastdpo.ORPO` and :class:`fastdpo.CPO` (the fused head, the logits,
the small path) makes the policy's summed token log-probs and calls the functions here, so each
formula exists once.  CPO's pair losses *are* DPO's (:func:`fastdpo.losses.pairwise.preference_loss`,
with a zero reference); only the AlphaPO reward transform, ORPO's odds ratio and the
behaviour-cloning NLL are new.  One module for both families: they share the NLL term, the
reward metrics, and the reference-free shape of the loss (a pair term on the policy's scores
plus a weighted NLL), which is also where a third such family would go.

Notation: ``x_w``, ``x_l`` the policy's scores of the chosen and rejected completions (ORPO:
per-token mean log-probs; CPO: means or sums, see :class:`fastdpo.CPO`), ``S_w`` a chosen
sequence's summed log-probs over the tokens the NLL counts and ``n_w`` their number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from .config import SIMPO_GAMMA, LossConfig, check_loss_config
from .pairwise import preference_loss, reward_metrics

# TRL 1.16's CPOConfig.loss_type values; "alphapo" is TRL's shorthand for "simpo" with cpo_alpha=0.
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# The types TRL's CPOTrainer scores with average_log_prob=True (per-token means).
_CPO_AVERAGED = frozenset({"ipo", "simpo"})


def chosen_nll(sums: Tensor, tokens: Tensor) -> Tensor:
    """The behaviour-cloning term: ``-sum_b S_w,b / sum_b n_w,b``, the mean NLL per token over
    all the counted tokens of the batch's chosen sequences (what TRL's ORPO and CPO trainers'
    ``cross_entropy_loss`` computes: one ``CrossEntropyLoss`` over the chosen half's labels,
    not a mean of per-sequence means).  ``sums``, ``tokens``: (B,).  A batch with no counted
    token gives 0 (TRL: NaN)."""
    return -sums.sum() / tokens.sum().clamp(min=1)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"): ``log(-expm1(x))`` above ``-log 2``, ``log1p(-exp(x))``
    below.  Each branch is fed only its own side's values, so the other branch's infinite
    derivative cannot turn into ``0 * inf = NaN`` in the gradient."""
    near = x > -math.log(2)
    a = torch.log(-torch.expm1(torch.where(near, x, -1.0)))
    b = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(near, a, b)


def orpo_log_odds(chosen: Tensor, rejected: Tensor) -> Tensor:
    """``log odds(y_w | x) - log odds(y_l | x)``, with ``odds = p / (1 - p)`` and ``p =
    exp(x)`` the per-token geometric-mean likelihood (ORPO, Hong et al. 2024, arXiv 2403.07691,
    eqs. 4 and 6): ``(x_w - x_l) - (log(1 - exp(x_w)) - log(1 - exp(x_l)))``, in float32 at
    least (TRL upcasts too).

    A mean log-prob of exactly 0 (an empty completion, or every token certain in float) has
    infinite odds; it is clamped to ``-tiny`` (the dtype's smallest normal number): finite odds
    (about 87 nats in float32) and a zero gradient through it, where TRL's is inf/NaN.
    """
    dtype = torch.promote_types(torch.promote_types(chosen.dtype, rejected.dtype), torch.float32)
    top = -torch.finfo(dtype).tiny
    w, l = chosen.to(dtype).clamp(max=top), rejected.to(dtype).clamp(max=top)
    return (w - l) - (log1mexp(w) - log1mexp(l))


def orpo_loss(chosen: Tensor, rejected: Tensor, nll: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's objective (arXiv 2403.07691 eq. 6, as TRL 1.16's ``ORPOTrainer`` computes it):
    ``nll - mean_b(beta * log sigmoid(log_odds_b))`` with ``log_odds`` from
    :func:`orpo_log_odds` of the (B,) per-token mean log-probs and ``nll`` the scalar
    :func:`chosen_nll` (beta is the paper's lambda).  Returns ``(loss, log sigmoid(log_odds),
    log_odds)``; TRL logs the means of the last two as ``log_odds_ratio`` and
    ``log_odds_chosen``."""
    log_odds = orpo_log_odds(chosen, rejected)
    ratio = F.logsigmoid(log_odds)
    return nll - (beta * ratio).mean(), ratio, log_odds


def orpo_metrics(chosen: Tensor, rejected: Tensor, nll: Tensor, ratio: Tensor, log_odds: Tensor,
                 beta: float) -> dict[str, Tensor]:
    """What TRL's ORPOTrainer logs (detached), but ``logits/*``: the rewards ``beta * x``
    (:func:`fastdpo.losses.pairwise.reward_metrics`), ``nll_loss``, ``log_odds_ratio`` (mean log
    sigmoid of the log odds ratio) and ``log_odds_chosen`` (mean log odds ratio)."""
    metrics = reward_metrics(chosen, rejected, None, None, beta)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return metrics


# ----------------------------------------------------------------------------- CPO


@dataclass(frozen=True)
class CPOLossConfig:
    """A checked CPO configuration (:func:`check_cpo_config`)."""

    loss_type: str  # as asked, one of CPO_LOSS_TYPES
    loss: LossConfig  # the pair loss: a DPO loss type on a zero reference ("alphapo" -> "simpo")
    cpo_alpha: float  # the NLL term's weight (0 for "alphapo")
    alpha: float  # AlphaPO's reward shape (0: the log-prob itself)
    averaged: bool  # the type is defined on per-token means (ipo, simpo, alphapo)


def check_cpo_config(
    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0,
    simpo_gamma: float = SIMPO_GAMMA, alpha: float = 0.0,
) -> CPOLossConfig:
    """Check CPO's options once; ``TypeError``/``ValueError`` naming the argument.

    - ``loss_type``: one of :data:`CPO_LOSS_TYPES`.  ``"alphapo"`` is TRL's shorthand for
      ``"simpo"`` with ``cpo_alpha=0``: leave ``cpo_alpha`` at its default (1.0, replaced by 0
      as TRL's ``CPOConfig`` does) or pass 0; any other value is an error.
    - ``beta``: finite, > 0.  ``label_smoothing``: in [0, 0.5) for ``sigmoid``, ``simpo`` and
      ``alphapo``; 0 for ``hinge`` and ``ipo`` (TRL warns and ignores it there).
    - ``cpo_alpha``: finite, >= 0.  ``simpo_gamma``: finite, >= 0.  ``alpha``: finite.
    """
    if not isinstance(loss_type, str):
        raise TypeError(f"loss_type must be a str, one of {CPO_LOSS_TYPES}, got {type(loss_type).__name__}")
    _checks.choice("loss_type", loss_type, CPO_LOSS_TYPES)
    cpo_alpha = _checks.real_number("cpo_alpha", cpo_alpha)
    if cpo_alpha < 0:
        raise ValueError(f"cpo_alpha must be >= 0 (the weight of the NLL term), got {cpo_alpha!r}")
    if loss_type == "alphapo":
        if cpo_alpha not in (0.0, 1.0):
            raise ValueError(
                f"loss_type='alphapo' is 'simpo' with cpo_alpha=0 (TRL's shorthand), got cpo_alpha={cpo_alpha!r}: "
                "leave cpo_alpha out, or use loss_type='simpo' with alpha for AlphaPO with an NLL term"
            )
        cpo_alpha = 0.0
    simpo_gamma = _checks.real_number("simpo_gamma", simpo_gamma)
    if simpo_gamma < 0:
        raise ValueError(f"simpo_gamma must be >= 0 (SimPO's target reward margin), got {simpo_gamma!r}")
    alpha = _checks.real_number("alpha", alpha)
    pair = "simpo" if loss_type == "alphapo" else loss_type
    loss = check_loss_config(pair, beta, label_smoothing, gamma=simpo_gamma)
    return CPOLossConfig(loss_type, loss, cpo_alpha, alpha, pair in _CPO_AVERAGED)


def alphapo_reward(x: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward (Gupta et al. 2025, arXiv 2501.03884): ``r = (1 - p^-alpha) / alpha``
    with ``p = exp(x)``, written ``-expm1(-alpha x) / alpha`` (no underflow of ``p`` for long
    sums; TRL's ``exp(x).pow(-alpha)`` overflows to inf once ``exp(x)`` underflows).  ``x``
    itself for ``alpha = 0`` (the limit)."""
    if alpha == 0.0:
        return x
    return -torch.expm1(-alpha * x) / alpha


def cpo_pair_losses(chosen: Tensor, rejected: Tensor, cfg: CPOLossConfig) -> tuple[Tensor, Tensor, Tensor]:
    """CPO's per-pair losses (B,) and the rewards ``r_w``, ``r_l`` (the scores after
    :func:`alphapo_reward`) they are taken on, as TRL 1.16's ``CPOTrainer.cpo_loss``: the DPO
    loss of the type (:func:`fastdpo.losses.pairwise.preference_loss`) with a zero reference --
    ``sigmoid`` (CPO, Xu et al. 2024, arXiv 2401.08417 eq. 3, with cDPO's label smoothing),
    ``hinge`` ``relu(1 - beta (r_w - r_l))``, ``ipo`` ``(r_w - r_l - 1/(2 beta))^2``,
    ``simpo`` ``-logsig(beta (r_w - r_l) - gamma)`` (SimPO, Meng et al. 2024, arXiv
    2405.14734 eq. 6)."""
    rw, rl = alphapo_reward(chosen, cfg.alpha), alphapo_reward(rejected, cfg.alpha)
    c = cfg.loss
    ref = None if c.loss_type == ("simpo",) else torch.zeros_like(rw)
    losses = preference_loss(
        rw, rl, ref, ref, loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing, gamma=c.gamma
    )
    return losses, rw, rl


def cpo_metrics(
    chosen: Tensor, rejected: Tensor, rw: Tensor, rl: Tensor, nll: Tensor, beta: float
) -> dict[str, Tensor]:
    """What TRL's CPOTrainer logs (detached), but ``logits/*``: ``rewards/*`` on ``beta * r``
    (the AlphaPO rewards), ``logps/*`` on the scores before the transform, ``nll_loss``."""
    metrics = reward_metrics(rw, rl, None, None, beta)
    dtype = torch.promote_types(chosen.dtype, torch.float32)  # as reward_metrics averages
    metrics["logps/chosen"] = chosen.detach().to(dtype).mean()
    metrics["logps/rejected"] = rejected.detach().to(dtype).mean()
    metrics["nll_loss"] = nll.detach()
    return metrics
