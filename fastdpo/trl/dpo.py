"""``fastdpo.trl.DPOTrainer``: TRL 1.16's ``DPOTrainer`` with its loss computed by :class:`fastdpo.DPO`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer as _DPOTrainer
from trl.trainer.utils import get_config_model_id

from ..batching.batch import PACKINGS
from ..losses.config import check_loss_config
from ..modules.dpo import DPO
from . import _common as common

# The loss types TRL 1.16's DPOTrainer reads label_smoothing in.  fastdpo's sigmoid and
# sigmoid_norm read it too (conservative DPO), where TRL ignores it.
TRL_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
# The types TRL normalizes by the completion's length: it counts completion_mask (the completion's
# first token included), fastdpo the scored (target-aligned) positions; they differ by one only when
# a completion starts at position 0 (an empty prompt), whose first token has no log-prob.
LENGTH_TYPES = ("ipo", "sigmoid_norm")
# What TRL logs that fastdpo.DPO's metrics give, by TRL's name.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected")


@dataclass
class DPOConfig(trl.DPOConfig):
    """``trl.DPOConfig`` and one field of fastdpo's; a ``trl.DPOConfig`` works as well (``packing="none"``).

    Parameters:
        packing (`str`, *optional*, defaults to `"none"`):
            fastdpo's batch layout (:class:`fastdpo.DPO`'s ``packing``): ``"none"`` (TRL's padded
            rows), ``"pair"`` (each pair's prompt run once), ``"batch"`` (whole pairs packed into
            rows, no padding), ``"auto"`` (per batch, where it pays).  Every layout gives the same
            numbers up to float rounding.
    """

    packing: str = field(
        default="none",
        metadata={"help": "fastdpo's batch layout: 'none' (TRL's padded rows), 'pair', 'batch' or 'auto'."},
    )


def dpo_options(args, trainer: str = "DPOTrainer") -> dict:
    """:class:`fastdpo.DPO`'s options for a ``DPOConfig``: every loss field TRL 1.16's
    ``DPOTrainer`` reads, TRL's conventions (summed log-probs, target-aligned masks) and the fused
    head (``head="fused"``: a model whose head cannot be fused is a ``ValueError``, never a
    silent (2B, L, V) logits tensor).  What fastdpo would compute otherwise than TRL is a one-line
    ``ValueError``; the loss options are checked here, before TRL prepares the data."""
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    eps = args.label_smoothing
    if eps:
        ignored = [t for t in types if t in ("sigmoid", "sigmoid_norm")]
        if ignored or not any(t in TRL_SMOOTHED for t in types):
            raise common.refuse(
                trainer, f"label_smoothing={eps!r} with loss_type {ignored or types}",
                f"TRL 1.16 ignores label_smoothing there (it reads it for {', '.join(TRL_SMOOTHED)} only); fastdpo "
                f"would apply it (conservative DPO for 'sigmoid'): set label_smoothing=0.0, or use fastdpo.DPO "
                f"directly for cDPO",
            )
    packing = getattr(args, "packing", "none")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    options = dict(
        beta=args.beta, loss_type=types, loss_weights=args.loss_weights, label_smoothing=eps,
        discopop_tau=args.discopop_tau, f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef, ld_alpha=args.ld_alpha,
        use_weighting=args.use_weighting, router_aux_loss_coef=args.router_aux_loss_coef,
        logprob_reduction="sum", mask_alignment="target", head="fused", packing=packing,
    )
    check_loss_config(types, args.beta, eps, args.loss_weights, discopop_tau=args.discopop_tau,
                      f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef)
    return options


class DPOTrainer(common.ReferenceScores, _DPOTrainer):
    """TRL 1.16's ``DPOTrainer``, its loss computed by one :class:`fastdpo.DPO` module.

    Everything but the loss is TRL's: the constructor (same arguments: a model or its path,
    ``ref_model``, a ``DPOConfig``, datasets, collator, callbacks, optimizers, quantization and
    ``peft_config``), tokenization and collation, accelerate (DDP, mixed precision), gradient
    checkpointing, logging, evaluation, checkpoints and the hub.  Two methods are fastdpo's:
    ``_compute_loss`` turns TRL's batch (chosen rows, then rejected rows, with their
    ``attention_mask`` and ``completion_mask``) into :meth:`fastdpo.DPO.forward`'s arguments and
    calls the module through the trainer's model (so DDP reduces the gradients);
    ``compute_ref_log_probs`` (``precompute_ref_log_probs=True``) is
    :meth:`fastdpo.DPO.reference_scores`.  The module is built once: the trainer's model is the
    policy, TRL's ``ref_model`` the reference (a PEFT policy without one: itself with its adapters
    disabled, as TRL), with TRL's conventions (summed log-probs, target-aligned masks) and
    ``head="fused"``: no (2B, L, V) logits.

    **Options.**  Every loss field of ``DPOConfig`` is honoured: ``loss_type`` (every TRL type,
    lists), ``loss_weights``, ``beta``, ``label_smoothing``, ``f_divergence_type``,
    ``f_alpha_divergence_coef``, ``ld_alpha``, ``use_weighting``, ``discopop_tau``,
    ``router_aux_loss_coef``, ``precompute_ref_log_probs`` (and its batch size), ``sync_ref_model``
    (the reference is TRL's own object, which its callback updates), plus fastdpo's ``packing``
    (:class:`DPOConfig`).  Refused in one line at construction, where fastdpo would compute
    something else than TRL: ``label_smoothing`` with ``sigmoid`` or ``sigmoid_norm`` or with no
    type that reads it (TRL ignores it there); vision-language models and image data;
    encoder-decoders; tensor, context or sequence parallelism; a ``PeftModel`` passed with its
    adapter and no ``ref_model`` (TRL's reference is then a copy of that adapter).  At a batch: a
    pair whose two prompts sit at different positions (``truncation_mode="keep_end"`` cutting
    them differently), and, for ``ipo``/``sigmoid_norm``, a completion starting at position 0.

    **Metrics**, under TRL's names and averaged over processes as TRL does: ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``, ``mean_token_accuracy``, ``num_tokens``, ``aux_loss`` (MoE).  Not
    logged: ``entropy``, ``logits/chosen``, ``logits/rejected`` -- reductions over the
    vocabulary of every scored row, which fastdpo's fused head does not compute.

    With ``precompute_ref_log_probs=True`` and neither ``ref_model`` nor PEFT, the reference
    scores come from a frozen copy of the policy made for them (TRL scores with the policy
    itself before training), dropped when training starts.  Not tested: FSDP, DeepSpeed,
    ``torch_compile``.
    """

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        self._fastdpo_options = dpo_options(args, type(self).__name__)
        common.check_setup(type(self).__name__, args, processing_class, train_dataset)
        self._fastdpo: DPO | None = None
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, quantization_config, peft_config)
        self._fastdpo_module()
        common.route_through(self.model)

    def _fastdpo_module(self) -> DPO:
        """The one :class:`fastdpo.DPO` module (built on the first call: TRL's precompute may
        ask for it before ``__init__`` returns)."""
        if self._fastdpo is None:
            ref = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else None
            common.check_model(type(self).__name__, self.model, ref)
            self._fastdpo = DPO(self.model, ref_model=ref, pad_id=self._tokenizer.pad_token_id, **self._fastdpo_options)
        return self._fastdpo

    def _precompute_tag(self) -> str:
        return f"fastdpo-ld_alpha={self.ld_alpha}-"

    def compute_ref_log_probs(self, model, inputs):
        """The reference's scores of a batch: :meth:`fastdpo.DPO.reference_scores` (``model``,
        TRL's reference or policy, is the module's reference already)."""
        args = common.pair_arguments(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        return self._fastdpo_module().reference_scores(**args)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        args = common.pair_arguments(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        if any(t in LENGTH_TYPES for t in self.loss_types) and inputs["completion_mask"][:, 0].any():
            raise common.refuse(type(self).__name__, f"loss_type {self.loss_types} with a completion at position 0",
                                "TRL counts its first token in the length, which has no log-prob to score")
        if self.precompute_ref_logps:
            args |= dict(ref_preferred_logprob=inputs["ref_chosen_logps"],
                         ref_unpreferred_logprob=inputs["ref_rejected_logps"])
        loss, metrics = common.run_step(model, self._fastdpo_module(), args | {"return_metrics": True})
        self._log_metrics(mode, metrics, inputs, args["preferred_seq"].shape[0])
        if return_outputs:
            skip = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
            kwargs = {k: v for k, v in inputs.items() if k not in skip} | {"use_cache": False}
            return loss, common.logits_for_compute_metrics(model, kwargs)
        return loss

    def _log_metrics(self, mode: str, metrics: dict, inputs: dict, b: int) -> None:
        """fastdpo's metrics of this process's B pairs appended to ``self._metrics[mode]`` as TRL
        logs them: means over every process's pairs (and scored chosen tokens)."""
        logged = self._metrics[mode]
        if "aux_loss" in metrics:
            logged["aux_loss"].append(common.gathered_mean(self.accelerator, metrics["aux_loss"]))
        common.count_tokens(self, mode, inputs["attention_mask"])
        n = torch.tensor(float(b), device=metrics["rewards/chosen"].device)
        values = [n, *(metrics[k] * n for k in REWARD_METRICS)]
        if "token_accuracy/chosen" in metrics:
            tokens = metrics["tokens/chosen"] * n
            values += [tokens, (metrics["token_accuracy/chosen"] * tokens).round()]
        sums = common.gathered_sums(self.accelerator, values)
        if len(sums) > 1 + len(REWARD_METRICS):
            tokens, hits = sums[-2:]
            logged["mean_token_accuracy"].append(hits / tokens if tokens > 0 else 0.0)
        for name, total in zip(REWARD_METRICS, sums[1:]):
            logged[name].append(total / sums[0])
