"""Two reweightings of the DPO loss that need more than a pair's four scores.

Dimensions: B pairs, N = 2B sequences (the B chosen, then their B rejected), T positions.

* **LD-DPO** (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
  arXiv 2409.06411), ``ld_alpha`` in [0, 1]: each sequence's score weighs its scored tokens
  by their rank among the sequence's scored positions, as TRL 1.16 ranks them
  (``comp_pos = shift_completion_mask.cumsum(1)``): the first ``min(n_chosen, n_rejected)``
  of the pair count 1, the rest ("the verbose tail") count ``ld_alpha``.  For the policy and
  the reference alike.  These are per-position weights of a batch (:func:`ld_token_weights`),
  a function of its mask alone, like its counts: they travel with the
  :class:`~fastdpo.batching.batch.Batch` (:func:`ld_weighted`), so every route scores
  ``sum_t w_t * log p_t`` and gives row t the gradient ``w_t * dL/ds``.
* **WPO** (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
  arXiv 2406.11827, eq. 2), ``use_weighting=True``: each pair's loss is multiplied by
  ``exp(mean_t(log p_t - log sum_v p_v^2))`` of its chosen completion times that of its rejected
  one, under the POLICY, detached (:func:`wpo_weights`).  ``log sum_v p_v^2`` (TRL's
  ``log_sum_sq_probs``) is one more reduction of each scored row's logits, computed where the
  log-prob is (the folds of :mod:`fastdpo.scoring.rows`, :mod:`fastdpo.scoring.backends.torch_fold`, the Triton
  kernels), forward only.

Both are defined for both conventions.  Under TRL's (``logprob_reduction="sum"``,
``mask_alignment="target"``) the numbers are TRL 1.16's ``_compute_loss``; under
x-transformers' (``"mean"``, ``"input"``) the positions ranked and averaged are the scored ones
of input alignment, and an LD-weighted MEAN score is the weighted sum over the weighted count,
``sum_t w_t log p_t / max(sum_t w_t, 1e-5)`` (the count clamp of x-transformers): a weighted
average of the token log-probs, so ``ld_alpha=1`` is exactly the plain mean and ``ld_alpha=0``
the mean over the shared part.  The WPO mean is over the scored tokens (unweighted, as TRL's
``completion_lengths``) in both conventions.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import _checks


def check_ld_alpha(ld_alpha) -> float | None:
    """``None`` (off) or a real number in [0, 1]; else ``TypeError``/``ValueError`` naming it."""
    if ld_alpha is None:
        return None
    alpha = _checks.real_number("ld_alpha", ld_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be None or in [0, 1] (LD-DPO's tail weight), got {ld_alpha!r}")
    return alpha


def check_use_weighting(use_weighting, loss_types: tuple[str, ...]) -> bool:
    """A bool; WPO weights each pair, which the losses that sort a batch's log-ratios
    (``aot``, ``aot_unpaired``) would misalign: ``NotImplementedError`` there, as TRL 1.16."""
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {type(use_weighting).__name__}")
    sorting = [t for t in loss_types if t in ("aot", "aot_unpaired")]
    if use_weighting and sorting:
        raise NotImplementedError(
            f"use_weighting=True (WPO) is not implemented for loss_type {tuple(sorting)}: those losses "
            "sort the batch's log-ratios, which would misalign the per-pair weights (as in TRL)"
        )
    return use_weighting


def ld_token_weights(mask: Tensor, ld_alpha: float) -> Tensor:
    """float32 (2B, T) LD-DPO weights of a pair batch's scored positions ``mask`` (2B, T): the
    k-th scored position of a sequence (k = 1, 2, ...) weighs 1 while k <= min(n_w, n_l) of its
    pair, ``ld_alpha`` beyond; 0 where nothing is scored."""
    n2 = mask.shape[0]
    rank = mask.cumsum(1)
    count = mask.sum(1)
    shared = torch.minimum(count[: n2 // 2], count[n2 // 2 :]).repeat(2)
    w = torch.where(rank <= shared.unsqueeze(1), 1.0, ld_alpha).to(torch.float32)
    return torch.where(mask, w, 0.0)


def ld_weighted(batch, ld_alpha: float | None, reduction: str):
    """``batch`` (a :class:`fastdpo.batching.batch.Batch` of pairs) with its LD-DPO token weights, and,
    for ``reduction="mean"``, its counts replaced by the weighted counts (clamped at 1e-5 as
    the plain ones are) that divide a weighted mean score; ``batch`` itself for ``None``.
    With ``"sum"`` the counts stay the token counts: the lengths TRL's length-normalized
    losses (``ipo``, ``sigmoid_norm``) divide by are unweighted."""
    if ld_alpha is None:
        return batch
    w = ld_token_weights(batch.mask, ld_alpha)
    count = w.sum(-1).clamp(min=1e-5) if reduction == "mean" else batch.count
    return dataclasses.replace(batch, token_weights=w, count=count)


def wpo_weights(logps: Tensor, log_sum_sq: Tensor, tokens: Tensor) -> Tensor:
    """(B,) WPO pair weights, detached: ``exp(a_w) * exp(a_l)`` with, per sequence,
    ``a = sum_t (log p_t - log sum_v p_v^2) / max(n, 1)`` over its n scored tokens.

    Args (each (2B,), chosen then rejected): ``logps`` the sequences' summed token log-probs
    under the policy, UNweighted by LD-DPO (they may carry the policy's graph: the weights are
    cut from it here); ``log_sum_sq`` their summed ``log sum_v p_v^2``; ``tokens`` the scored
    token counts.  WPO (arXiv 2406.11827) eq. 2, as TRL 1.16 computes it (the means here in
    float64, the weights float32), with no clamp on the exponent: a completion whose
    probabilities underflow gets weight 0, and its pair no loss.
    """
    b = logps.shape[0] // 2
    mean = (logps.detach().double() - log_sum_sq.double()) / tokens.double().clamp(min=1)
    w = torch.exp(mean).float()
    return w[:b] * w[b:]
