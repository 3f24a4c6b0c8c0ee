"""``fastdpo.trl.KTOTrainer``: TRL 1.16's ``KTOTrainer`` with its loss computed by :class:`fastdpo.KTO`."""

from __future__ import annotations

import torch
from trl import KTOConfig
from trl.trainer.kto_trainer import KTOTrainer as _KTOTrainer
from trl.trainer.utils import get_config_model_id

from ..losses.kto import check_kto_config
from ..modules.kto import KTO
from . import _common as common

# TRL's batch keys that are not the model's (its own list, for the return_outputs forward).
_NOT_MODEL = ("completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "label", "ref_logps",
              "ref_KL_logps")


class KTOTrainer(common.ReferenceScores, _KTOTrainer):
    """TRL 1.16's ``KTOTrainer``, its loss computed by one :class:`fastdpo.KTO` module.

    As :class:`fastdpo.trl.DPOTrainer` for DPO: TRL's constructor, data (the KL sequences its
    dataset preparation pairs by rotating completions), accelerate, PEFT, logging, evaluation and
    saving; ``_compute_loss`` calls the module through the trainer's model on TRL's batch (the
    completions' ``input_ids``, ``attention_mask``, ``completion_mask``, ``label``, and the KL
    sequences'), ``compute_ref_log_probs`` is :meth:`fastdpo.KTO.reference_scores`.  The
    module: the trainer's model as policy, TRL's ``ref_model`` (a PEFT policy without one:
    adapters disabled), TRL's conventions, ``head="fused"``; the KL baseline averaged over the
    processes before its clamp, as TRL.

    **Options**: ``loss_type`` (``"kto"``, ``"apo_zero_unpaired"``), ``beta``,
    ``desirable_weight``, ``undesirable_weight``, ``router_aux_loss_coef``,
    ``precompute_ref_log_probs``, ``sync_ref_model``; refused as ``DPOTrainer`` refuses
    (vision-language models, encoder-decoders, model parallelism, a ``PeftModel`` with its
    adapter and no ``ref_model``).

    **Metrics**, TRL's names and averages: ``kl``, ``rewards/chosen``, ``logps/chosen``,
    ``rewards/rejected``, ``logps/rejected``, ``rewards/margins`` (each logged when the batches
    of all processes hold completions of that kind, as TRL), ``num_tokens``, ``aux_loss`` (MoE).
    Not logged: ``entropy``, ``logits/chosen``, ``logits/rejected`` (reductions over the
    vocabulary the fused head does not compute).
    """

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = KTOConfig(f"{name.split('/')[-1]}-KTO")
        check_kto_config(args.loss_type, args.beta, args.desirable_weight, args.undesirable_weight)
        common.check_setup(type(self).__name__, args, processing_class, train_dataset)
        self._fastdpo: KTO | None = None
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, quantization_config, peft_config)
        self._fastdpo_module()
        common.route_through(self.model)

    def _fastdpo_module(self) -> KTO:
        """The one :class:`fastdpo.KTO` module (built on the first call)."""
        if self._fastdpo is None:
            ref = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else None
            common.check_model(type(self).__name__, self.model, ref)
            a = self.args
            self._fastdpo = KTO(
                self.model, ref_model=ref, beta=a.beta, loss_type=a.loss_type, desirable_weight=a.desirable_weight,
                undesirable_weight=a.undesirable_weight, router_aux_loss_coef=a.router_aux_loss_coef,
                pad_id=self._tokenizer.pad_token_id, logprob_reduction="sum", mask_alignment="target", head="fused",
            )
        return self._fastdpo

    def _arguments(self, inputs: dict) -> dict:
        seq, prompt, real = common.unpaired_arguments(inputs["input_ids"], inputs["attention_mask"],
                                                      inputs["completion_mask"])
        args = dict(seq=seq, prompt_mask=prompt, seq_mask=real)
        if self.calculate_KL:
            kl_seq, kl_prompt, kl_real = common.unpaired_arguments(
                inputs["KL_input_ids"], inputs["KL_attention_mask"], inputs["KL_completion_mask"])
            args |= dict(kl_seq=kl_seq, kl_prompt_mask=kl_prompt, kl_seq_mask=kl_real)
        return args

    def compute_ref_log_probs(self, model, inputs):
        """The reference's scores of a batch and of its KL sequences: :meth:`fastdpo.KTO.reference_scores`."""
        return self._fastdpo_module().reference_scores(**self._arguments(inputs))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        args = self._arguments(inputs) | {"label": torch.as_tensor(inputs["label"], device=inputs["input_ids"].device).bool()}
        if self.precompute_ref_logps:
            args["ref_logprob"] = inputs["ref_logps"]
            if self.calculate_KL:
                args["ref_kl_logprob"] = inputs["ref_KL_logps"]
        loss, metrics = common.run_step(model, self._fastdpo_module(), args | {"return_metrics": True})
        self._log_metrics(mode, metrics, inputs, args["label"])
        if return_outputs:
            kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL} | {"use_cache": False}
            return loss, common.logits_for_compute_metrics(model, kwargs)
        return loss

    def _log_metrics(self, mode: str, metrics: dict, inputs: dict, label: torch.Tensor) -> None:
        """fastdpo's KTO metrics appended to ``self._metrics[mode]`` as TRL logs them: sums over
        every process's completions of each kind, divided by their number."""
        logged = self._metrics[mode]
        logged["kl"].append(metrics["kl"].item())
        common.count_tokens(self, mode, inputs["attention_mask"])
        n_chosen, n_rejected = label.sum().float(), (~label).sum().float()

        def total(name: str, n: torch.Tensor) -> torch.Tensor:  # this process's sum (0 without that kind)
            return torch.where(n > 0, metrics[name] * n, 0.0)

        nc, nr, rc, lc, rr, lr = common.gathered_sums(self.accelerator, [
            n_chosen, n_rejected, total("rewards/chosen", n_chosen), total("logps/chosen", n_chosen),
            total("rewards/rejected", n_rejected), total("logps/rejected", n_rejected)])
        if nc > 0:
            logged["rewards/chosen"].append(rc / nc)
            logged["logps/chosen"].append(lc / nc)
        if nr > 0:
            logged["rewards/rejected"].append(rr / nr)
            logged["logps/rejected"].append(lr / nr)
        if nc > 0 and nr > 0:
            logged["rewards/margins"].append(logged["rewards/chosen"][-1] - logged["rewards/rejected"][-1])
        if "aux_loss" in metrics:
            logged["aux_loss"].append(common.gathered_mean(self.accelerator, metrics["aux_loss"]))
