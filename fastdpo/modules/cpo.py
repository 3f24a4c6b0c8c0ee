"""The ``CPO`` module: contrastive preference optimization and its kin (SimPO, AlphaPO), no
reference model.

A loss family on :class:`fastdpo.modules.base.PreferenceModule`: the batch and the policy's sums
come from there, the loss from :func:`fastdpo.losses.reference_free.cpo_pair_losses` and
:func:`~fastdpo.losses.reference_free.chosen_nll`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._options import option
from ..batching.options import PackingOptions, TokenOptions
from ..losses.config import SIMPO_GAMMA
from ..losses.reference_free import CPO_LOSS_TYPES, check_cpo_config, chosen_nll, cpo_metrics, cpo_pair_losses
from ..scoring.options import ComputeOptions
from .base import PreferenceModule
from .options import with_options

__all__ = ["CPO", "CPO_LOSS_TYPES", "CPOOptions"]


@dataclass(frozen=True, kw_only=True)
class CPOOptions:
    """CPO's loss, SimPO's and AlphaPO's."""

    beta: float = option(0.1, "> 0, the loss's inverse temperature (IPO's tau; SimPO's paper uses 2 to 10).")
    loss_type: str = option("sigmoid", """
        ``"sigmoid"`` (CPO), ``"hinge"``, ``"ipo"``, ``"simpo"`` or ``"alphapo"`` (TRL's shorthand
        for ``"simpo"`` with ``cpo_alpha=0``: leave ``cpo_alpha`` out).""")
    cpo_alpha: float = option(1.0, ">= 0, the NLL term's weight (0: not computed, ``nll_loss`` logs 0).")
    simpo_gamma: float = option(SIMPO_GAMMA, """
        >= 0, SimPO's target reward margin (``simpo``/``alphapo`` only), after the beta scaling:
        ``-log sigmoid(beta (r_w - r_l) - simpo_gamma)``, as TRL.""")
    alpha: float = option(0.0, """
        AlphaPO's reward shape for every type: the scores ``x`` become ``r = (1 - exp(x)^-alpha) /
        alpha`` (:func:`~fastdpo.losses.reference_free.alphapo_reward`); 0 (default) keeps ``r = x``.""")
    label_smoothing: float = option(0.0, """
        in [0, 0.5) for ``sigmoid``, ``simpo``, ``alphapo`` (conservative labels); must be 0 for
        ``hinge`` and ``ipo``.""")


@with_options(CPOOptions)
class CPO(PreferenceModule):
    """CPO (Xu et al. 2024, arXiv 2401.08417) around a model, with SimPO (Meng et al. 2024,
    arXiv 2405.14734) and AlphaPO (Gupta et al. 2025, arXiv 2501.03884), as TRL 1.16's
    ``CPOTrainer`` computes them.

    ``loss = mean_b loss_b + cpo_alpha * nll``: ``loss_b`` the pair loss of ``loss_type`` on
    the policy's scores alone (:func:`fastdpo.losses.reference_free.cpo_pair_losses`: DPO's loss of
    that type with a zero reference, on AlphaPO's rewards when ``alpha != 0``), ``nll`` the
    behaviour-cloning term, the mean negative log-likelihood per token over every completion
    token of the batch's chosen sequences (:func:`~fastdpo.losses.reference_free.chosen_nll`; TRL's
    ``cross_entropy_loss`` on the chosen half's labels).  No reference model: ``ref_model`` is
    None.

    Options specific to CPO: ``logprob_reduction`` sets the scores of the types defined on
    summed log-probs, ``sigmoid`` and ``hinge``: ``"mean"`` (default, x-transformers' convention:
    per-token means) or ``"sum"`` (TRL's); ``ipo``, ``simpo`` and ``alphapo`` are defined on
    per-token means and always use them (as TRL's ``average_log_prob``), so with
    ``logprob_reduction="sum", mask_alignment="target"`` every number is TRL's.  The NLL is a
    token mean over the batch either way, over the tokens ``mask_alignment`` counts.  The fused
    head takes the ``"fused"`` route (:func:`fastdpo.linear_sequence_logprobs`): no (2B, L-1, V)
    logits.

    Options are checked once, here (:func:`fastdpo.losses.reference_free.check_cpo_config`); the
    checked configuration is ``self.config``.  Where TRL differs: a batch whose chosen
    completions are all empty has an NLL of 0 (TRL: NaN), an empty completion's mean is 0 (TRL:
    NaN), and AlphaPO's reward stays finite where TRL's ``exp(x)`` underflows.
    """

    def _build(self, model: nn.Module, loss: CPOOptions, tokens: TokenOptions, packing: PackingOptions,
               compute: ComputeOptions) -> None:
        config = check_cpo_config(loss.loss_type, loss.beta, loss.label_smoothing, loss.cpo_alpha, loss.simpo_gamma,
                                  loss.alpha)
        super().__init__(model, tokens, packing, compute, reference=False, independent_pairs=False)
        self.loss_options, self.config = loss, config
        self.beta, self.loss_type, self.label_smoothing = config.loss.beta, loss.loss_type, config.loss.label_smoothing
        self.cpo_alpha, self.simpo_gamma, self.alpha = config.cpo_alpha, config.loss.gamma, config.alpha

    def forward(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
        return_metrics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The CPO loss of B pairs; arguments as :meth:`fastdpo.DPO.forward` (no reference
        scores: there is no reference).  With ``return_metrics``, also TRL's metrics
        (:func:`fastdpo.losses.reference_free.cpo_metrics`: ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins`` on ``beta * r``, ``logps/chosen``,
        ``logps/rejected`` on the scores, ``nll_loss``; not TRL's ``logits/*``, means over
        logits this module never builds) and DPO's ``tokens/*``; ``token_accuracy/chosen`` where
        logits are built (the logits route, or a fused step small enough to be scored from
        logits): the ``"fused"`` route's op counts no argmax hits."""
        batch = self._batch(preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask)
        b = preferred_seq.shape[0]
        sums, hits, _ = self._policy_sums(batch, count_hits=return_metrics)
        scores = sums / batch.count if self.config.averaged or self.logprob_reduction == "mean" else sums
        losses, rw, rl = cpo_pair_losses(scores[:b], scores[b:], self.config)
        if self.cpo_alpha != 0:
            nll = chosen_nll(sums[:b], batch.mask[:b].sum(-1))
            loss = losses.mean() + self.cpo_alpha * nll
        else:  # TRL computes no NLL then
            nll, loss = torch.zeros((), device=sums.device), losses.mean()
        if not return_metrics:
            return loss
        with torch.no_grad():
            metrics = cpo_metrics(scores[:b], scores[b:], rw, rl, nll, self.beta)
        return loss, metrics | self._token_metrics(batch, hits, b)
