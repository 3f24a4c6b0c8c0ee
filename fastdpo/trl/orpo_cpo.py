"""``fastdpo.trl.ORPOTrainer`` and ``CPOTrainer``: TRL 1.16's experimental ORPO and CPO trainers
(``trl.experimental.orpo.ORPOTrainer``, ``trl.experimental.cpo.CPOTrainer``: TRL 1.16 ships them
there only) with their losses computed by :class:`fastdpo.ORPO` and :class:`fastdpo.CPO`."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # (trl.experimental warns once that it is experimental)
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer as _CPOTrainer
    from trl.experimental.orpo import ORPOTrainer as _ORPOTrainer

from ..losses.reference_free import check_cpo_config
from ..modules.cpo import CPO
from ..modules.orpo import ORPO
from . import _common as common

# TRL's metrics of a pair batch: means over every process's pairs ...
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
                "logps/chosen")
# ... and means over the processes of each process's one number (TRL gathers these as scalars).
BATCH_METRICS = {"ORPOTrainer": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "CPOTrainer": ("nll_loss",)}


def _padded(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


class _FastdpoPairs:
    """Ahead of TRL's experimental ORPO or CPO trainer (a mixin): the loss and metrics of
    ``get_batch_loss_metrics`` from the subclass's fastdpo module (``_build``)."""

    def _fastdpo_init(self) -> None:
        name = type(self).__name__
        config = getattr(self.model, "config", None)
        common.check_setup(name, self.args, self.processing_class, None)
        common.check_model(name, self.model, None)
        if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 0.0):
            raise common.refuse(name, "an MoE model's router load-balancing loss (output_router_logits)",
                                f"fastdpo's {name[:-7]} adds none; set output_router_logits=False in the model's config")
        self._fastdpo = self._build()
        common.route_through(self.model)

    def _pad_id(self) -> int:
        pad = getattr(self, "padding_value", None)  # ORPO's; CPO pads with the tokenizer's
        return self.pad_token_id if pad is None else pad

    def _pair_arguments(self, batch: dict) -> dict:
        """TRL's padded chosen/rejected batch (``{chosen,rejected}_{input_ids,attention_mask,labels}``,
        the labels -100 on the prompt and the padding) as :meth:`fastdpo.ORPO.forward`'s arguments:
        both sides padded to one length, the prompt where a real token has no label (TRL's
        ``get_batch_logps`` scores ``labels[:, 1:] != -100``)."""
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        rows = {}
        for side in ("chosen", "rejected"):
            rows[f"{side}_input_ids"] = _padded(batch[f"{side}_input_ids"], length, self._pad_id())
            rows[f"{side}_attention_mask"] = _padded(batch[f"{side}_attention_mask"], length, 0)
            rows[f"{side}_labels"] = _padded(batch[f"{side}_labels"], length, -100)
        ids = torch.cat((rows["chosen_input_ids"], rows["rejected_input_ids"]))
        attention = torch.cat((rows["chosen_attention_mask"], rows["rejected_attention_mask"]))
        scored = torch.cat((rows["chosen_labels"], rows["rejected_labels"])) != -100
        return common.pair_arguments(ids, attention, attention.bool() & scored)

    def get_batch_loss_metrics(self, model, batch, train_eval: str = "train"):
        """The loss and TRL's metrics of a batch, from fastdpo's module (``logits/*`` left out:
        means over logits the fused head never builds)."""
        args = self._pair_arguments(batch)
        loss, metrics = common.run_step(model, self._fastdpo, args | {"return_metrics": True})
        b = args["preferred_seq"].shape[0]
        n = torch.tensor(float(b), device=loss.device)
        own = BATCH_METRICS[type(self)._fastdpo_family]
        world = self.accelerator.num_processes
        sums = common.gathered_sums(self.accelerator, [n, *(metrics[k] * n for k in PAIR_METRICS),
                                                       *(metrics[k] for k in own)])
        prefix = "eval_" if train_eval == "eval" else ""
        out = {f"{prefix}{k}": total / sums[0] for k, total in zip(PAIR_METRICS, sums[1:])}
        out |= {f"{prefix}{k}": total / world for k, total in zip(own, sums[1 + len(PAIR_METRICS):])}
        return loss, out


class ORPOTrainer(_FastdpoPairs, _ORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` (TRL 1.16), its loss computed by :class:`fastdpo.ORPO`.

    TRL's constructor (same arguments), tokenization, collator, training, evaluation and saving;
    ``get_batch_loss_metrics`` is fastdpo's: the odds-ratio loss plus the NLL of the chosen
    sequences (prompt and completion, TRL's), on the fused head (``head="fused"``: no logits).
    Options: ``beta``; refused in one line: vision-language processors, encoder-decoders, model
    parallelism, an MoE model's router loss (TRL adds it, fastdpo's ORPO does not).  Metrics, TRL's names and averages: ``rewards/*``, ``logps/*``,
    ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``; not ``logits/chosen``,
    ``logits/rejected`` (means over logits the fused head never builds).
    """

    _fastdpo_family = "ORPOTrainer"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastdpo_init()

    def _build(self) -> ORPO:
        return ORPO(self.model, beta=self.beta, pad_id=self._pad_id(), mask_alignment="target", head="fused")


class CPOTrainer(_FastdpoPairs, _CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` (TRL 1.16), its loss computed by :class:`fastdpo.CPO`.

    As :class:`ORPOTrainer`: ``get_batch_loss_metrics`` is fastdpo's (CPO, SimPO, AlphaPO: the
    options ``loss_type``, ``beta``, ``label_smoothing``, ``cpo_alpha``, ``simpo_gamma``,
    ``alpha``, and TRL's ``"alphapo"`` shorthand), TRL's conventions (summed log-probs, per-token
    means for ``ipo`` and ``simpo``), ``head="fused"``.  Refused: ``label_smoothing`` with
    ``hinge`` or ``ipo`` (TRL ignores it there), encoder-decoders, an MoE router loss.  Metrics:
    ``rewards/*``, ``logps/*``, ``nll_loss``; not ``logits/*``.
    """

    _fastdpo_family = "CPOTrainer"

    def __init__(self, *args, **kwargs):
        options = kwargs.get("args", args[1] if len(args) > 1 else None)
        if options is not None:  # before TRL tokenizes the data
            check_cpo_config(options.loss_type, options.beta, options.label_smoothing, options.cpo_alpha,
                             options.simpo_gamma, options.alpha)
        super().__init__(*args, **kwargs)
        self._fastdpo_init()

    def _build(self) -> CPO:
        a = self.args
        return CPO(self.model, beta=a.beta, loss_type=a.loss_type, label_smoothing=a.label_smoothing,
                   cpo_alpha=a.cpo_alpha, simpo_gamma=a.simpo_gamma, alpha=a.alpha, pad_id=self._pad_id(),
                   logprob_reduction="sum", mask_alignment="target", head="fused")
