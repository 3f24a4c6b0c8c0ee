"""The ``KTO`` module: Kahneman-Tversky optimization on unpaired completions.

A loss family on :class:`fastdpo.modules.base.PreferenceModule` (the policy, the frozen or
``peft`` reference, the routes and the fused head's sums come from there); its math (options,
loss, KL baseline, metrics) is :mod:`fastdpo.losses.kto`.  What is here: the checks of a call's
arguments and the module.

Dimensions: N sequences (unpaired: each a prompt and a completion, labelled desirable or
undesirable), L tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import _checks
from .._options import option
from ..batching.batch import Batch, given_scores, unpaired_batch
from ..batching.options import PackingOptions, TokenOptions
from ..losses.kto import KTO_LOSS_TYPES, check_kto_config, kl_baseline, kto_losses, kto_metrics
from ..scoring.options import ComputeOptions
from .base import PreferenceModule
from .options import with_options

__all__ = ["KTO", "KTOOptions", "KTO_LOSS_TYPES"]


def _check_label(label, n: int, like: Tensor) -> Tensor:
    if label is None:
        raise ValueError(
            "label is required: an (N,) torch.bool tensor, True for a desirable completion and False for an "
            "undesirable one (KTO's data is unpaired; fastdpo.KTODataset's collate makes it)"
        )
    _checks.tensor("label", label, ndim=1)
    if label.dtype != torch.bool:
        raise TypeError(f"label must be a torch.bool tensor (True = desirable), got dtype {label.dtype}")
    if label.shape[0] != n:
        raise ValueError(f"label must have shape ({n},) (one per sequence of seq), got {tuple(label.shape)}")
    _checks.same_device(seq=like, label=label)
    return label


def _given_kl(kl, like: Tensor) -> Tensor:
    """A precomputed KL estimate (a real number or a one-element float tensor) as a detached
    0-d float32 tensor on ``like``'s device, clamped at 0 as the estimate is."""
    if isinstance(kl, Tensor):
        if kl.numel() != 1 or not kl.is_floating_point():
            raise ValueError(f"kl must be a number or a one-element float tensor, got shape {tuple(kl.shape)} "
                             f"and dtype {kl.dtype}")
        value = kl.detach().to(device=like.device, dtype=torch.float32).reshape(())
    else:
        value = torch.tensor(_checks.real_number("kl", kl), dtype=torch.float32, device=like.device)
    return value.clamp(min=0)


@dataclass(frozen=True, kw_only=True)
class KTOOptions:
    """KTO's loss and its KL baseline."""

    beta: float = option(0.1, "> 0, the inverse temperature.")
    desirable_weight: float = option(1.0, """
        >= 0, the paper's lambda_D (eq. 8 suggests ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]).""")
    undesirable_weight: float = option(1.0, ">= 0, the paper's lambda_U.")
    loss_type: str = option("kto", """
        ``"kto"`` (default) or ``"apo_zero_unpaired"`` (``1 - sigmoid(beta r)`` for desirable,
        ``sigmoid(beta r)`` for undesirable completions: no KL sequences, as TRL computes none
        for it).""")
    sync_kl: bool = option(True, """
        under ``torch.distributed`` with several processes (DDP), average the per-rank KL
        estimates over the ranks before the clamp, as TRL does (one all-reduce of a scalar in each
        ``forward`` that estimates it: every rank must call ``forward`` the same number of times,
        as DDP requires anyway).  False keeps each rank's estimate.""")
    router_aux_loss_coef: float | None = option(None, """
        an MoE policy's router load-balancing loss on the batch's sequences (not the KL
        sequences'), added as TRL 1.16's ``KTOTrainer`` adds it: ``None`` (default) the config's
        coefficient for a model with a router, 0.0 off, as :class:`fastdpo.DPO` documents it;
        metric ``aux_loss``.""")
    ref_model: nn.Module | None = option(None, """
        the reference model (TRL's ``ref_model``), used as it is instead of a copy of ``model``, its
        parameters frozen, as :class:`fastdpo.DPO` documents it; ``None`` (default): a frozen copy
        (a ``peft`` model: itself with its adapters disabled).""")


@with_options(KTOOptions)
class KTO(PreferenceModule):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv 2402.01306) around a model, as TRL 1.16's ``KTOTrainer`` computes it, with its
    ``apo_zero_unpaired`` variant.

    The data is unpaired: N sequences, each a prompt and a completion labelled desirable or
    undesirable.  ``loss = nanmean_n(loss_n)`` (:func:`kto_losses`): with ``r_n`` the policy's
    score minus the reference's, a desirable completion's loss is ``desirable_weight * (1 -
    sigmoid(beta (r_n - z0)))``, an undesirable one's ``undesirable_weight * (1 -
    sigmoid(beta (z0 - r_n)))``.  The baseline ``z0`` (:func:`kl_baseline`) estimates
    KL(policy || reference) from *mismatched* pairs: sequences ``kl_seq`` of each prompt with
    another example's completion (TRL: the completions rotated by one within the batch, as
    :meth:`fastdpo.KTODataset.collate` builds them), ``z0 = max(0, mean_n(policy_n -
    reference_n))`` over their scores, detached; the policy scores them under ``no_grad``.  Or
    pass ``kl=`` a precomputed estimate.  ``loss_type="apo_zero_unpaired"`` has no baseline.

    Options specific to KTO: ``logprob_reduction`` and ``mask_alignment`` make every score -- of
    the completions and of the KL sequences, the policy's and the reference's: with TRL's ``"sum"``
    and ``"target"`` every number is TRL's (its ``completion_mask[:, 1:]`` and summed token
    log-probs); with x-transformers' ``"mean"`` and ``"input"`` (the defaults) each is the masked
    per-token mean with the mask at the input position, and the formulas above are unchanged on
    them (so ``z0`` is a per-token KL estimate).  ``packing`` packs the sequences (each a
    prompt and one completion; ``"pair"``: one a row, ``"batch"``: first-fit, no padding run),
    ``sequence_parallel`` splits the packed rows across processes.  The fused head takes the ``"fused"`` route
    (:func:`fastdpo.linear_sequence_logprobs`): no (N, L-1, V) logits for any of the four
    scorings.

    Options are checked once, here (:func:`~fastdpo.losses.kto.check_kto_config`; the checked
    configuration is ``self.config``).  Where TRL differs: a batch with no desirable (or no undesirable)
    completion gives NaN for that kind's metrics where TRL logs none.
    """

    def _build(self, model: nn.Module, loss: KTOOptions, tokens: TokenOptions, packing: PackingOptions,
               compute: ComputeOptions) -> None:
        config = check_kto_config(loss.loss_type, loss.beta, loss.desirable_weight, loss.undesirable_weight)
        if not isinstance(loss.sync_kl, bool):
            raise TypeError(f"sync_kl must be a bool, got {type(loss.sync_kl).__name__}")
        if packing.share_prompt:
            raise ValueError("share_prompt=True shares a pair's prompt; KTO's sequences are unpaired (packing='batch' "
                             "packs them)")
        super().__init__(model, tokens, packing, compute, reference=True, independent_pairs=False,
                         router_aux_loss_coef=loss.router_aux_loss_coef, ref_model=loss.ref_model)
        self.loss_options, self.config, self.sync_kl = loss, config, loss.sync_kl
        self.beta, self.loss_type = config.beta, config.loss_type
        self.desirable_weight, self.undesirable_weight = config.desirable_weight, config.undesirable_weight

    def _unpaired(self, seq, prompt_mask, seq_mask, prefix: str = "") -> Batch:
        names = (f"{prefix}seq", f"{prefix}prompt_mask", f"{prefix}seq_mask")
        return self._packed_batch(unpaired_batch, seq.device if isinstance(seq, Tensor) else None, seq, prompt_mask,
                                  seq_mask, names=names)

    def _batches(self, seq, prompt_mask, seq_mask, kl_seq, kl_prompt_mask, kl_seq_mask) -> tuple[Batch, Batch | None]:
        """The checked batch of ``seq`` and, when ``kl_seq`` is given, of the KL sequences."""
        batch = self._unpaired(seq, prompt_mask, seq_mask)
        if kl_seq is None:
            if kl_prompt_mask is not None or kl_seq_mask is not None:
                raise ValueError("kl_prompt_mask and kl_seq_mask go with kl_seq, which is not given")
            return batch, None
        if kl_prompt_mask is None:
            raise ValueError("kl_seq needs its kl_prompt_mask (True on the prompt positions of kl_seq)")
        kl_batch = self._unpaired(kl_seq, kl_prompt_mask, kl_seq_mask, "kl_")
        if kl_seq.shape[0] != seq.shape[0]:
            raise ValueError(f"kl_seq must hold one sequence per sequence of seq ({seq.shape[0]}), got {kl_seq.shape[0]}")
        return batch, kl_batch

    def _reference_scores(self, batch: Batch, kl_batch: Batch | None) -> tuple[Tensor, Tensor | None]:
        """The reference's (N,) scores of ``batch`` and of ``kl_batch`` (each body scored, and
        its logits freed, before the next runs)."""
        scores = self._scores(self._reference_input(batch), batch)
        kl = self._scores(self._reference_input(kl_batch), kl_batch) if kl_batch is not None else None
        return scores, kl

    def forward(
        self,
        seq: Tensor,
        *,
        prompt_mask: Tensor,
        label: Tensor | None = None,
        seq_mask: Tensor | None = None,
        kl_seq: Tensor | None = None,
        kl_prompt_mask: Tensor | None = None,
        kl_seq_mask: Tensor | None = None,
        ref_logprob: Tensor | None = None,
        ref_kl_logprob: Tensor | None = None,
        kl: float | Tensor | None = None,
        return_metrics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The KTO loss of N unpaired completions.

        Args:
            seq: (N, L) token ids, prompt followed by completion, right padded (a Hugging
                Face model also takes left padding, with ``mask_alignment="target"``:
                :class:`fastdpo.DPO`'s ``model``).
            prompt_mask: (N, L) bool, True on prompt positions (not scored).
            label: (N,) bool, True for a desirable completion (required; batches may be all
                desirable or all undesirable).
            seq_mask: (N, L) bool, True on real tokens; default ``seq != pad_id`` when
                ``pad_id`` was given, else all True.
            kl_seq, kl_prompt_mask, kl_seq_mask: the KL sequences (N, L') and their masks:
                each prompt with a mismatched completion (:meth:`fastdpo.KTODataset.collate`
                rotates the completions by one, as TRL).  For ``loss_type="kto"`` give these or
                ``kl``; ``apo_zero_unpaired`` takes neither.
            ref_logprob, ref_kl_logprob: precomputed (N,) reference scores of ``seq`` and of
                ``kl_seq`` (:meth:`reference_scores`, in this module's conventions); given
                (both, when ``kl_seq`` is), the reference model is not run.
            kl: a precomputed KL baseline instead of ``kl_seq``: a real number or a
                one-element float tensor, used detached and clamped at 0 (not averaged over
                ranks).  ``kl=0.0`` is KTO without a baseline.
            return_metrics: also return the detached metrics of :func:`kto_metrics` (``kl``,
                ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``,
                ``logps/rejected``; ``kl`` is 0 for ``apo_zero_unpaired``).

        Without gradients (``torch.no_grad()``, ``torch.inference_mode()``) every scoring is
        forward only.  The policy keeps its train/eval mode for both of its passes; the
        reference runs in eval mode.
        """
        batch, kl_batch = self._batches(seq, prompt_mask, seq_mask, kl_seq, kl_prompt_mask, kl_seq_mask)
        n = seq.shape[0]
        label = _check_label(label, n, seq)
        if not self.config.uses_kl and (kl_batch is not None or kl is not None or ref_kl_logprob is not None):
            raise ValueError(
                f"loss_type={self.loss_type!r} has no KL baseline: pass no kl_seq, kl or ref_kl_logprob "
                f"(KTODataset(..., kl=False) makes no KL sequences)"
            )
        if self.config.uses_kl and (kl_batch is None) == (kl is None):
            raise ValueError(
                "loss_type='kto' needs its KL baseline from exactly one of kl_seq (with kl_prompt_mask: the "
                "mismatched sequences KTODataset's collate builds) or kl (a precomputed estimate; kl=0.0 for none)"
                + ("; both were given" if kl is not None else "")
            )
        ref_scores, z0 = self._reference_and_baseline(seq, batch, kl_batch, ref_logprob, ref_kl_logprob, kl)
        policy = self._policy_input(batch)
        sums = self.scorer.sums(policy, batch)[0]
        scores = sums / batch.count if self.logprob_reduction == "mean" else sums
        loss = kto_losses(scores, ref_scores, label, z0, self.config).nanmean()
        if policy.aux is not None:  # the MoE router's load-balancing term, as TRL adds it
            loss = loss + self.router_aux_loss_coef * policy.aux
        if not return_metrics:
            return loss
        metrics = kto_metrics(scores, ref_scores, label, z0, self.beta)
        if policy.aux is not None:
            metrics["aux_loss"] = policy.aux.detach()
        return loss, metrics

    def _reference_and_baseline(self, seq: Tensor, batch: Batch, kl_batch: Batch | None, ref_logprob, ref_kl_logprob,
                                kl) -> tuple[Tensor, Tensor]:
        """The reference's (N,) scores (given, or scored) and the KL baseline ``z0``: from the KL
        sequences (the policy's scores of them under ``no_grad``), given as ``kl``, or 0."""
        n = seq.shape[0]
        ref_scores = given_scores("ref_logprob", ref_logprob, n, seq, "seq")
        ref_kl = given_scores("ref_kl_logprob", ref_kl_logprob, n, seq, "seq")
        if ref_kl is not None and (ref_scores is None or kl_batch is None):
            raise ValueError("ref_kl_logprob goes with ref_logprob and kl_seq")
        if ref_scores is not None and kl_batch is not None and ref_kl is None:
            raise ValueError("with ref_logprob and kl_seq, give ref_kl_logprob too (reference_scores returns both)")
        if ref_scores is None:
            ref_scores, ref_kl = self._reference_scores(batch, kl_batch)
        if kl_batch is not None:
            with torch.no_grad():
                policy_kl = self._scores(self.scorer.head_input(self.policy_model, kl_batch), kl_batch)
            z0 = kl_baseline(policy_kl, ref_kl, sync=self.sync_kl)
        elif kl is not None:
            z0 = _given_kl(kl, seq)
        else:
            z0 = torch.zeros((), dtype=torch.float32, device=seq.device)
        return ref_scores, z0

    @torch.no_grad()
    def reference_scores(
        self,
        seq: Tensor,
        *,
        prompt_mask: Tensor,
        seq_mask: Tensor | None = None,
        kl_seq: Tensor | None = None,
        kl_prompt_mask: Tensor | None = None,
        kl_seq_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The reference model's (N,) scores of ``seq`` and of ``kl_seq`` (None without it),
        to pass back to :meth:`forward` as ``ref_logprob`` and ``ref_kl_logprob``; arguments as
        :meth:`forward`, scores in this module's ``logprob_reduction`` and ``mask_alignment``.
        The KL sequences' scores belong to their batch (each pairs a prompt with a neighbour's
        completion): precompute them over the batches training will see, in the same order."""
        batch, kl_batch = self._batches(seq, prompt_mask, seq_mask, kl_seq, kl_prompt_mask, kl_seq_mask)
        return self._reference_scores(batch, kl_batch)
