"""KTO's loss math (Kahneman-Tversky optimization, Ethayarajh et al. 2024, arXiv 2402.01306):
its options (:func:`check_kto_config`), its loss (:func:`kto_losses`), its KL baseline
(:func:`kl_baseline`) and its metrics (:func:`kto_metrics`), on (N,) score vectors, as TRL 1.16's
``KTOTrainer`` computes them.  :class:`fastdpo.KTO` (:mod:`fastdpo.modules.kto`) is the module
around a model; every route calls these functions, so each formula exists once.

Notation: ``r`` a completion's log-ratio, the policy's score minus the reference's; ``z0`` the
KL baseline, an estimate of KL(policy || reference) from mismatched (prompt, completion)
pairs, detached and clamped at 0; ``lambda_D``, ``lambda_U`` the desirable and undesirable
weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks

# TRL 1.16's KTOConfig.loss_type values.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

__all__ = ["KTO_LOSS_TYPES", "KTOConfig", "check_kto_config", "kl_baseline", "kto_losses", "kto_metrics"]


@dataclass(frozen=True)
class KTOConfig:
    """A checked KTO configuration (:func:`check_kto_config`)."""

    loss_type: str  # one of KTO_LOSS_TYPES
    beta: float
    desirable_weight: float
    undesirable_weight: float

    @property
    def uses_kl(self) -> bool:
        """Whether the loss has a KL baseline (TRL's ``calculate_KL``: every type but
        ``apo_zero_unpaired``)."""
        return self.loss_type != "apo_zero_unpaired"


def check_kto_config(
    loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> KTOConfig:
    """Check KTO's options once; ``TypeError``/``ValueError`` naming the argument.

    ``loss_type``: one of :data:`KTO_LOSS_TYPES`.  ``beta``: finite, > 0.  ``desirable_weight``,
    ``undesirable_weight``: finite, >= 0 (the paper's lambda_D and lambda_U).
    """
    if not isinstance(loss_type, str):
        raise TypeError(f"loss_type must be a str, one of {KTO_LOSS_TYPES}, got {type(loss_type).__name__}")
    _checks.choice("loss_type", loss_type, KTO_LOSS_TYPES)
    beta = _checks.positive_finite("beta", beta)
    weights = []
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        w = _checks.real_number(name, w)
        if w < 0:
            raise ValueError(f"{name} must be >= 0, got {w!r}")
        weights.append(w)
    return KTOConfig(loss_type, beta, *weights)


def kto_losses(scores: Tensor, ref_scores: Tensor, label: Tensor, kl: Tensor, cfg: KTOConfig) -> Tensor:
    """The (N,) weighted per-completion losses (their ``nanmean`` is the loss), as TRL 1.16's
    ``KTOTrainer`` computes them.

    ``kto`` (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7, with the constant lambda_y
    dropped): ``lambda_D * (1 - sigmoid(beta (r - z0)))`` for a desirable completion,
    ``lambda_U * (1 - sigmoid(beta (z0 - r)))`` for an undesirable one.
    ``apo_zero_unpaired`` (the unpaired APO-zero of D'Oosterlinck et al. 2024, arXiv
    2408.06266): ``lambda_D * (1 - sigmoid(beta r))`` and ``lambda_U * sigmoid(beta r)``, no
    baseline.  ``1 - sigmoid(x)`` is computed as ``sigmoid(-x)`` (exact where the difference
    would round to 0).

    Args: ``scores``, ``ref_scores`` (N,) the policy's and reference's scores; ``label`` (N,)
    bool, True for desirable; ``kl`` the 0-d baseline ``z0`` (ignored by
    ``apo_zero_unpaired``).
    """
    r = scores - ref_scores
    d = cfg.beta * (r - kl) if cfg.uses_kl else cfg.beta * r
    # Desirable: 1 - sigmoid(d) = sigmoid(-d); undesirable: 1 - sigmoid(-d) = sigmoid(d).
    losses = torch.sigmoid(torch.where(label, -d, d))
    weights = torch.where(label, cfg.desirable_weight, cfg.undesirable_weight).to(losses.dtype)
    return weights * losses


def _rank_mean(x: Tensor) -> Tensor:
    """``x`` averaged over the ranks of the default process group (itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def kl_baseline(policy_kl: Tensor, ref_kl: Tensor, *, sync: bool = True) -> Tensor:
    """KTO's baseline ``z0``, detached: ``max(0, mean_n(policy_kl - ref_kl))`` over the (N,)
    scores of the mismatched KL sequences (the paper's estimate of KL(policy || reference),
    arXiv 2402.01306 sec. 3.2, as TRL 1.16 computes it).  With ``sync`` and
    ``torch.distributed`` initialized with several processes, the per-rank means are averaged
    over the ranks before the clamp (an all-reduce: TRL's ``gather_for_metrics(kl).mean()``)."""
    kl = (policy_kl.detach().float() - ref_kl.detach().float()).mean()
    if sync:
        kl = _rank_mean(kl)
    return kl.clamp(min=0)


def kto_metrics(scores: Tensor, ref_scores: Tensor, label: Tensor, kl: Tensor, beta: float) -> dict[str, Tensor]:
    """What TRL 1.16's ``KTOTrainer`` logs, detached, but ``logits/*`` (means over logits the
    fused head never builds) and ``entropy``: ``kl`` (``z0``), ``rewards/chosen`` and
    ``logps/chosen`` (the sum over the desirable completions of ``beta r`` and of the scores,
    NaNs skipped, divided by their number), ``rewards/rejected``, ``logps/rejected`` (the same
    over the undesirable ones), ``rewards/margins`` (chosen minus rejected).  Where TRL logs
    nothing (no completion of a kind in the batch) the value is NaN.  Per process: TRL divides
    sums gathered over the ranks by counts gathered over the ranks."""
    scores, ref_scores = scores.detach().float(), ref_scores.detach().float()
    rewards = beta * (scores - ref_scores)
    n_chosen, n_rejected = label.sum(), (~label).sum()

    def average(x: Tensor, keep: Tensor, n: Tensor) -> Tensor:
        return torch.where(keep, x, 0.0).nansum() / n

    metrics = {
        "kl": kl.detach().float().reshape(()),
        "rewards/chosen": average(rewards, label, n_chosen),
        "rewards/rejected": average(rewards, ~label, n_rejected),
        "logps/chosen": average(scores, label, n_chosen),
        "logps/rejected": average(scores, ~label, n_rejected),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
