"""The ``ORPO`` module: odds-ratio preference optimization, no reference model.

A loss family on :class:`fastdpo.modules.base.PreferenceModule`: the batch and the policy's sums
come from there, the loss from :func:`fastdpo.losses.reference_free.orpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import _checks
from .._options import option
from ..batching.batch import make_batch, real_tokens
from ..batching.options import PackingOptions, TokenOptions
from ..losses.reference_free import chosen_nll, orpo_loss, orpo_metrics
from ..scoring.options import ComputeOptions
from .base import PreferenceModule
from .options import with_options


@dataclass(frozen=True, kw_only=True)
class ORPOOptions:
    """ORPO's loss."""

    beta: float = option(0.1, "the weight of the odds-ratio term (the paper's lambda; TRL's ``beta``), > 0.")


@with_options(ORPOOptions)
class ORPO(PreferenceModule):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv 2403.07691) around a model, as TRL 1.16's ``ORPOTrainer`` computes it.

    ``loss = nll - mean_b(beta * log sigmoid(log_odds_b))``, where ``log_odds_b`` is the log
    odds ratio of the pair's chosen and rejected completions, odds taken on ``p =
    exp(mean token log-prob of the completion)`` (:func:`fastdpo.losses.reference_free.orpo_log_odds`),
    and ``nll`` the mean negative log-likelihood per token over every counted token of the
    batch's chosen sequences -- their prompts included, as TRL counts them (its labels mask
    padding only) -- :func:`fastdpo.losses.reference_free.chosen_nll`.  No reference model:
    ``ref_model`` is None.

    Options specific to ORPO: ``logprob_reduction`` is ``"mean"`` only (the odds are defined on
    per-token mean log-probs, as TRL's ORPO averages them: ``"sum"`` is refused);
    ``mask_alignment`` decides both the completion tokens of the odds and the sequence tokens of
    the NLL (``"target"``: TRL's numbers).  The fused head takes the ``"fused"`` route
    (:func:`fastdpo.linear_sequence_logprobs`): no (2B, L-1, V) logits; the chosen prompts' tokens
    are scored from the same hidden states (one model run).

    Where TRL differs: an empty completion (or one every token of which is certain in float)
    has a mean log-prob of 0 and infinite odds, NaN in TRL; here the mean is clamped to
    ``-tiny`` (:func:`~fastdpo.losses.reference_free.orpo_log_odds`).  A batch whose chosen sequences
    count no token has an NLL of 0 (TRL: NaN).
    """

    def _build(self, model: nn.Module, loss: ORPOOptions, tokens: TokenOptions, packing: PackingOptions,
               compute: ComputeOptions) -> None:
        beta = _checks.positive_finite("beta", loss.beta)
        if tokens.logprob_reduction != "mean":
            raise ValueError(
                f"logprob_reduction must be 'mean' for ORPO (its odds are defined on per-token mean "
                f"log-probs, as TRL's ORPOTrainer computes them), got {tokens.logprob_reduction!r}; for TRL's "
                f"numbers pass mask_alignment='target'"
            )
        super().__init__(model, tokens, packing, compute, reference=False, independent_pairs=False)
        self.loss_options, self.beta = loss, beta

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
        """The ORPO loss of B pairs; arguments as :meth:`fastdpo.DPO.forward` (no reference
        scores: there is no reference).  With ``return_metrics``, also TRL's metrics
        (:func:`fastdpo.losses.reference_free.orpo_metrics`: ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
        ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``; not TRL's ``logits/*``, means
        over logits this module never builds) and DPO's ``tokens/*``; ``token_accuracy/chosen``
        where logits are built (the logits route, or a fused step small enough to be scored from
        logits): the ``"fused"`` route's op counts no argmax hits."""
        batch = self._batch(preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask)
        b = preferred_seq.shape[0]
        # The NLL also counts the chosen prompts' tokens: scored from the same head input.
        real = real_tokens(preferred_seq, preferred_seq_mask, self.pad_id)
        prompts = make_batch(preferred_seq, prompt_mask if real is None else prompt_mask & real, self.mask_alignment)
        sums, hits, prompt_sums = self._policy_sums(batch, count_hits=return_metrics, more=prompts)
        scores = sums / batch.count
        nll = chosen_nll(sums[:b] + prompt_sums, batch.mask[:b].sum(-1) + prompts.mask.sum(-1))
        loss, ratio, log_odds = orpo_loss(scores[:b], scores[b:], nll, self.beta)
        if not return_metrics:
            return loss
        with torch.no_grad():
            metrics = orpo_metrics(scores[:b], scores[b:], nll, ratio, log_odds, self.beta)
        return loss, metrics | self._token_metrics(batch, hits, b)
