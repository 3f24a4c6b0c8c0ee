"""The drop-in ``DPO`` module: the DPO loss family on :class:`fastdpo.modules.base.PreferenceModule`.

Data flows one way: (preferred, unpreferred, masks) -> one batch of 2B sequences
(:func:`fastdpo.batching.batch.pair_batch`) -> each model's body, the reference's under ``no_grad``
first (:class:`fastdpo.scoring.router.Scorer`, which asks the model's adapter, :mod:`fastdpo.models`)
-> the head: on the ``"dpo_head"`` route one op scores both head inputs and makes the policy's loss
and head gradients (:mod:`fastdpo.scoring.dpo_head_op`); otherwise each body's sums
(:meth:`~fastdpo.scoring.router.Scorer.sums`), then the pair loss (:mod:`fastdpo.losses.pairwise`) -> scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._options import option
from ..batching.batch import Batch, given_reference_scores
from ..batching.options import PackingOptions, TokenOptions
from ..losses.config import DISCOPOP_TAU, F_ALPHA_DIVERGENCE_COEF, SIMPO_GAMMA, check_loss_config
from ..losses.pairwise import pair_losses, reward_metrics
from ..losses.weighting import check_ld_alpha, check_use_weighting, ld_weighted, wpo_weights
from ..scoring.dpo_head_op import HeadOptions, run_dpo_head
from ..scoring.options import ComputeOptions
from ..scoring.router import HeadInput
from .base import PreferenceModule, deepcopy_module, frozen_copy
from .options import with_options

__all__ = ["DPO", "DPOOptions", "deepcopy_module", "frozen_copy", "precompute_reference_scores"]


@dataclass(frozen=True, kw_only=True, eq=False)
class DPOOptions:
    """DPO's loss: its type and parameters, what reweights it, and what it adds to it."""

    beta: float = option(0.1, "the inverse temperature of the loss, > 0.")
    loss_type: str | list[str] = option("sigmoid", """
        a name from :data:`fastdpo.LOSS_TYPES`, or a list of them mixed by ``loss_weights``: the
        pair loss of :func:`fastdpo.losses.preference_loss`, which gives each type's formula and
        paper (default ``"sigmoid"``: x-transformers' loss, bitwise).  With
        ``logprob_reduction="sum"`` the types defined on per-token averages (``ipo``, ``simpo``,
        ``sigmoid_norm``) get the token counts and normalize as their authors define them;
        ``sigmoid_norm`` needs that (with mean scores it would be plain ``sigmoid``).  ``"sft"`` is
        the chosen completions' NLL: with ``"sum"`` (TRL's conventions) TRL's batch-level mean
        over every scored chosen token; with ``"mean"`` the mean over pairs of each chosen
        completion's per-token mean NLL.  ``"aot"``/``"aot_unpaired"`` sort the batch's margins:
        the DPO head then takes the batch as one group of pairs (logits beyond its keep budget
        are recomputed, as for one pair too large for it).""")
    label_smoothing: float = option(0.0, """
        eps of the types that read it (conservative and robust DPO, EXO, ...; each type's range:
        :func:`fastdpo.check_loss_config`).""")
    loss_weights: list[float] | None = option(None, "one weight >= 0 per type of a list ``loss_type``; ``None``: all 1.")
    gamma: float = option(SIMPO_GAMMA, "SimPO's target reward margin, after the beta scaling (``simpo``).")
    bco_delta: float | str | Tensor = option(0.0, """
        BCO's reward shift (``bco_pair``): a float, a detached 0-D or (B,) tensor, or ``"batch"``
        (the batch's mean reward, which couples the pairs).""")
    discopop_tau: float = option(DISCOPOP_TAU, "DiscoPOP's temperature, > 0 (``discopop``).")
    f_divergence_type: str = option("reverse_kl", """
        the f-DPO regularizer: ``"reverse_kl"`` (DPO), ``"forward_kl"``, ``"js_divergence"``,
        ``"alpha_divergence"`` (:func:`fastdpo.losses.f_divergence_score`).""")
    f_alpha_divergence_coef: float = option(F_ALPHA_DIVERGENCE_COEF, 'alpha of ``"alpha_divergence"``.')
    ld_alpha: float | None = option(None, """
        LD-DPO (arXiv 2409.06411), ``None`` (off) or in [0, 1]: in each pair, the scored tokens of
        both sequences beyond the shorter completion's count (ranked as TRL ranks them) weigh
        ``ld_alpha`` in the policy's and the reference's scores (reference scores precomputed by
        this module too).  With ``"mean"`` the score is the weighted mean, ``sum_t w_t log p_t /
        max(sum_t w_t, 1e-5)``; with ``"sum"``, TRL's weighted sum.  See
        :mod:`fastdpo.losses.weighting`.""")
    use_weighting: bool = option(False, """
        WPO (arXiv 2406.11827), as TRL 1.16: each pair's loss times ``exp(a_w) * exp(a_l)``,
        ``a`` the policy's mean over the scored tokens of ``log p_t - log sum_v p_v^2``,
        detached (the fused head folds ``log sum_v p_v^2`` with the log-probs;
        ``matmul="triton"`` cannot, and is refused).  Not with ``aot`` or ``aot_unpaired``
        (``NotImplementedError``, as TRL).""")
    reference_free: bool = option(False, """
        score against a zero reference (TRL's ``reference_free``); no reference copy is made.
        Reference-free loss types (``simpo``) make none either.""")
    ref_model: nn.Module | None = option(None, """
        the reference model (TRL's ``ref_model``), used as it is instead of a copy of ``model``,
        its parameters frozen (``requires_grad=False``); it runs in eval mode under ``no_grad``.
        ``None`` (default): a frozen copy of ``model`` (a ``peft`` model: itself with its adapters
        disabled).  A ``ValueError`` when it shares parameters with ``model``, or with a loss that
        reads no reference (``reference_free=True``, ``simpo``/``sft`` only).""")
    router_aux_loss_coef: float | None = option(None, """
        a Mixture-of-Experts policy's router load-balancing loss, added as TRL 1.16's
        ``DPOTrainer`` adds it: ``loss + coef * aux_loss``, ``aux_loss`` the policy's own (its
        forward's, asked with ``output_router_logits`` on the whole sequences with the attention
        mask of their real tokens; nothing for the reference), reported as the metric
        ``aux_loss``.  ``None`` (default): the config's ``router_aux_loss_coef`` for a model whose
        config has ``output_router_logits`` (Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, GPT-OSS,
        ...), else off; 0.0: off; a number for a model without a router is a ``ValueError``.  Not
        with ``packing``.""")


@with_options(DPOOptions)
class DPO(PreferenceModule):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) around a model.

    A drop-in for ``x_transformers.dpo.DPO``: same constructor, attributes and ``forward``,
    same loss and gradients by default, computed without any (2B, L, V) log-softmax and, for
    ``TransformerWrapper`` models, without any (2B, L, V) logits.  Every option below is a
    keyword argument (``DPO(model, beta=0.1, pad_id=0, loss_type="ipo", packing="pair")``),
    checked once, here.
    """

    def _build(self, model: nn.Module, loss: DPOOptions, tokens: TokenOptions, packing: PackingOptions,
               compute: ComputeOptions) -> None:
        # Checks beta too (the one place it is checked).
        config = check_loss_config(
            loss.loss_type, loss.beta, loss.label_smoothing, loss.loss_weights, gamma=loss.gamma,
            bco_delta=loss.bco_delta, discopop_tau=loss.discopop_tau, f_divergence_type=loss.f_divergence_type,
            f_alpha_divergence_coef=loss.f_alpha_divergence_coef,
        )
        # Read by the scoring, not by the loss of a pair's four scores (fastdpo.losses.weighting).
        ld_alpha = check_ld_alpha(loss.ld_alpha)
        use_weighting = check_use_weighting(loss.use_weighting, config.loss_type)
        if "sft" in config.loss_type and (use_weighting or ld_alpha is not None):
            # TRL's SFT term is the mean of the chosen tokens' plain log-probs, and WPO multiplies
            # that one batch-level number by every pair's weight: neither is a function of the
            # LD-weighted per-pair sums the other types read.
            raise NotImplementedError(
                "loss_type 'sft' with ld_alpha or use_weighting=True is not supported: TRL's SFT term "
                "reads the unweighted token log-probs (and WPO scales it by the mean pair weight); "
                "drop 'sft' or those options"
            )
        reference_free = bool(loss.reference_free)
        # A pair's loss depends on its own scores only, except with BCO's batch shift.
        independent_pairs = not ("bco_pair" in config.loss_type and isinstance(config.bco_delta, str))
        super().__init__(
            model, tokens, packing, compute, reference=config.needs_reference and not reference_free,
            independent_pairs=independent_pairs, with_wpo=use_weighting, router_aux_loss_coef=loss.router_aux_loss_coef,
            ref_model=loss.ref_model,
        )
        self.loss_options = loss
        self.loss, self.beta, self.reference_free = config, config.beta, reference_free
        self.ld_alpha, self.use_weighting = ld_alpha, use_weighting
        if self.loss.needs_lengths and self.logprob_reduction != "sum":
            raise ValueError(
                "loss_type 'sigmoid_norm' length-normalizes summed log-probs: it needs "
                "logprob_reduction='sum' (with the default 'mean' it would be plain 'sigmoid')"
            )

    # ------------------------------------------------------------------------- the step

    def _batch(self, preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask) -> Batch:
        """The checked pair batch (:meth:`PreferenceModule._batch`) with LD-DPO's token weights
        when ``ld_alpha`` is set (:func:`fastdpo.losses.weighting.ld_weighted`)."""
        batch = super()._batch(preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask)
        return ld_weighted(batch, self.ld_alpha, self.logprob_reduction)

    def forward(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
        ref_preferred_logprob: Tensor | None = None,
        ref_unpreferred_logprob: Tensor | None = None,
        return_metrics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Mean DPO loss over B pairs.

        Args:
            preferred_seq, unpreferred_seq: (B, L) token ids, prompt followed by completion.
            prompt_mask: (B, L) bool, True on prompt positions (excluded from the scores).
            preferred_seq_mask, unpreferred_seq_mask: (B, L) bool, True on real (unpadded)
                tokens; default ``seq != pad_id`` when ``pad_id`` was given, else all True.
            ref_preferred_logprob, ref_unpreferred_logprob: optional precomputed (B,) reference
                scores (as :meth:`reference_scores` returns them, in this module's
                ``logprob_reduction``); given both, the reference model is not run.
            return_metrics: also return a dict of detached training metrics (below).

        Without gradients (``torch.no_grad()``, ``torch.inference_mode()``, or a policy with no
        trainable parameters) both models are scored forward only: an evaluation step costs
        about two reference passes.

        Returns:
            the scalar loss, ``mean_b loss_b`` (default: ``-log sigmoid(beta * ((pi_w - pi_l)
            - (ref_w - ref_l)))``); with ``return_metrics``, ``(loss, metrics)`` where
            metrics holds :func:`fastdpo.losses.pairwise.reward_metrics`' ``rewards/chosen``,
            ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
            ``logps/chosen``, ``logps/rejected`` (on the scores in this module's
            ``logprob_reduction``), plus ``tokens/chosen`` and ``tokens/rejected`` (mean
            number of scored tokens per sequence) and, except on the ``"fused"`` route
            (``matmul="triton"``, BCO's ``bco_delta="batch"``, ``sequence_parallel``),
            ``token_accuracy/chosen``: the
            fraction of scored chosen tokens whose target is the policy's argmax (ties go to
            the lowest token id, as ``torch.argmax``).
        """
        batch = self._batch(preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask)
        b = preferred_seq.shape[0]
        ref_scores = given_reference_scores(ref_preferred_logprob, ref_unpreferred_logprob, b, batch.src)
        ref = self._reference_input(batch) if ref_scores is None else None
        dpo_head = self.scorer.uses_dpo_head(self.scorer.checked_route(self.policy_model, batch), batch)
        if ref_scores is None and not (dpo_head and ref is not None and ref.weight is not None and not ref.gathered):
            # Scored (and its logits freed) before the policy runs; else the DPO head op scores it.  A
            # head weight gathered from FSDP2 shards is scored first too: held through the policy's
            # forward, the whole copy would add a head's weight to the step's peak.
            ref_scores, ref = self._scores(ref, batch), None
        if dpo_head:
            policy = self._policy_input(batch)
            loss, sums, ref_scores, hits = self._pair_op(batch, policy, ref, ref_scores, return_metrics)
        else:
            with_wpo = self.use_weighting
            policy = self._policy_input(batch)
            sums, hits, wpo = self.scorer.sums(policy, batch, count_hits=return_metrics, with_wpo=with_wpo)
            pair_w = None
            if with_wpo:  # WPO, from the scores themselves when unweighted (wpo_weights detaches them)
                pair_w = wpo_weights(sums if batch.token_weights is None else wpo[1], wpo[0], batch.mask.sum(-1))
            loss = pair_losses(sums, ref_scores, batch.count, self.loss, self.logprob_reduction, weights=pair_w).mean()
        if policy.aux is not None:  # the MoE router's load-balancing term, as TRL adds it
            loss = loss + self.router_aux_loss_coef * policy.aux
        if not return_metrics:
            return loss
        metrics = self._metrics(sums.detach(), ref_scores, batch, hits, b)
        if policy.aux is not None:
            metrics["aux_loss"] = policy.aux.detach()
        return loss, metrics

    def _pair_op(self, batch: Batch, policy: HeadInput, ref: HeadInput | None, ref_scores: Tensor | None, count_hits: bool):
        """The DPO head op (:func:`fastdpo.scoring.dpo_head_op.run_dpo_head`) on the policy's head input:
        (loss, policy sums, reference scores, hits); the op scores the reference's head input when
        it is given, else takes ``ref_scores``."""
        opts = HeadOptions(
            impl=policy.route.impl, scale=policy.route.head.scale,
            ref_scale=ref.route.head.scale if ref is not None else None,
            softcap=policy.route.head.softcap, ref_softcap=ref.route.head.softcap if ref is not None else None,
            reduction=self.logprob_reduction, loss=self.loss, count_hits=count_hits,
            use_weighting=self.use_weighting, chunk_bytes=self.scorer.chunk_bytes, group_bytes=self.scorer.group_bytes,
        )
        return run_dpo_head(
            policy.out, policy.weight, batch.tgt, batch.mask, batch.count, opts,
            ref_hidden=ref.out if ref is not None else None,
            ref_weight=ref.weight if ref is not None else None, ref_scores=ref_scores,
            token_weights=batch.token_weights, bias=policy.bias, ref_bias=ref.bias if ref is not None else None,
        )

    def _metrics(self, sums: Tensor, ref_scores: Tensor, batch: Batch, hits: Tensor | None, b: int) -> dict[str, Tensor]:
        scores = sums / batch.count if self.logprob_reduction == "mean" else sums
        # Without a reference model the reference scores are zeros: rewards are beta * scores.
        metrics = reward_metrics(scores[:b], scores[b:], ref_scores[:b], ref_scores[b:], self.loss.beta)
        return metrics | self._token_metrics(batch, hits, b)

    @torch.no_grad()
    def reference_scores(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The reference model's (B,) scores of a batch, to pass back to :meth:`forward`.

        Same arguments as :meth:`forward`; returns ``(ref_preferred_logprob,
        ref_unpreferred_logprob)`` in this module's ``logprob_reduction`` and
        ``mask_alignment``.  See :func:`fastdpo.precompute_reference_scores` for a dataset.
        """
        batch = self._batch(preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask)
        scores = self._scores(self._reference_input(batch), batch)
        b = preferred_seq.shape[0]
        return scores[:b], scores[b:]


@torch.no_grad()
def precompute_reference_scores(dpo: DPO, batches, *, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``dpo``'s reference model once over a dataset; return its scores for every pair.

    ``batches`` yields what both pair datasets' ``collate`` make (a
    :class:`~fastdpo.data.batch.PairBatch`), mappings of ``forward``'s keyword arguments, or
    ``(preferred, unpreferred, prompt_mask)`` tuples (optionally with the two sequence masks
    after them), e.g. ``DataLoader(ds, batch_size=..., collate_fn=ds.collate)`` without
    shuffling.  Returns ``(ref_preferred_logprob, ref_unpreferred_logprob)``, each
    ``(num_pairs,)`` float32 on the CPU in iteration order; slice them per batch and pass them
    to ``dpo(...)`` so a training run need not keep the reference model (``del dpo.ref_model``
    is then safe, as long as every call passes precomputed scores).
    """
    from tqdm.auto import tqdm

    if not isinstance(dpo, DPO):
        hint = " (for a DistributedDataParallel wrapper, pass ddp.module)" if hasattr(dpo, "module") else ""
        raise TypeError(f"dpo must be a fastdpo.DPO, got {type(dpo).__name__}{hint}")
    it = tqdm(batches, desc="reference scores", disable=not progress)
    chosen, rejected = [], []
    for i, batch in enumerate(it):
        w, l = dpo.reference_scores(**_forward_kwargs(batch, i))
        chosen.append(w.cpu())
        rejected.append(l.cpu())
    if not chosen:
        empty = torch.empty(0)
        return empty, empty.clone()
    return torch.cat(chosen), torch.cat(rejected)


_BATCH_FIELDS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask")


def _forward_kwargs(batch, i: int) -> dict:
    """``forward``'s keyword arguments of one batch: a mapping of them (a dataset's
    :class:`~fastdpo.data.batch.PairBatch` is one) or a tuple in their order."""
    if hasattr(batch, "keys"):
        return {k: batch[k] for k in batch.keys()}
    if not 3 <= len(batch) <= 5:
        raise ValueError(
            f"batches[{i}] must be (preferred, unpreferred, prompt_mask[, preferred_seq_mask"
            f"[, unpreferred_seq_mask]]), got {len(batch)} entries"
        )
    return dict(zip(_BATCH_FIELDS, batch))
