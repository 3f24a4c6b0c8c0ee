"""What the TRL trainers share: a fastdpo module's step run as the trainer's model's forward (so
that DDP, accelerate's autocast and hooks wrap it as they wrap TRL's own call), TRL's collated
batches as fastdpo's arguments, the metrics gathered over processes as TRL gathers them, and
the one-line refusals of what fastdpo cannot honour.

Dimensions: B pairs, N = 2B sequences (TRL's ``input_ids``: the B chosen rows, then the B
rejected ones), L tokens.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
from torch import Tensor, nn

from ..models import peft_model

STEP_KEY = "fastdpo_step"


class Step:
    """A fastdpo module's call, carried to the model's forward as one keyword argument
    (``model(fastdpo_step=Step(...))``): through DDP it is one opaque object, left as it is."""

    __slots__ = ("kwargs", "module")

    def __init__(self, module: nn.Module, kwargs: dict):
        self.module, self.kwargs = module, kwargs

    def __call__(self):
        return self.module(**self.kwargs)


def _forward(self, *args, fastdpo_step: Step | None = None, **kwargs):
    if fastdpo_step is None:
        return self._fastdpo_previous_forward(*args, **kwargs)
    return fastdpo_step()


def route_through(model: nn.Module) -> None:
    """Make ``model(fastdpo_step=step)`` run ``step()`` as ``model``'s forward; any other call
    is the forward ``model`` had.  A call through the trainer's wrapper (DDP, accelerate's
    autocast) then wraps fastdpo's step as it wraps a forward: DDP readies its gradient
    reduction only for a backward whose forward ran through it.  The previous forward is kept
    as a bound method on the model (``copy.deepcopy`` binds it to the copy), the step travels
    in the call, so nothing here holds the model or the module.  TRL patches its fused head in
    the same way (``trl.trainer.utils.add_fused_lm_head``)."""
    if "_fastdpo_previous_forward" in vars(model):
        return
    previous = model.forward
    forward = functools.wraps(type(model).forward)(_forward)  # generate() reads the signature
    model._fastdpo_previous_forward = previous
    model.forward = types.MethodType(forward, model)


def run_step(model: nn.Module, module: nn.Module, kwargs: dict):
    """``module(**kwargs)`` as the forward of ``model`` (the trainer's model, possibly wrapped)."""
    return model(**{STEP_KEY: Step(module, kwargs)})


class ReferenceScores:
    """Ahead of TRL's DPO or KTO trainer (a mixin): where the precomputed reference scores come
    from.  The subclass's ``_fastdpo_module()`` builds its one module."""

    def _precompute_tag(self) -> str:
        """What besides the dataset and the model changes the precomputed scores."""
        return "fastdpo-"

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # fastdpo's scores get a cache entry of their own (TRL keys it by the dataset and the model
        # only): TRL's own scores, or those of other options, would otherwise be read back as these.
        tag = self._precompute_tag()
        if not str(self._precompute_model_hash).startswith(tag):
            self._precompute_model_hash = f"{tag}{self._precompute_model_hash}"
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def train(self, *args, **kwargs):
        module = self._fastdpo_module()
        if self.precompute_ref_logps and self.ref_model is None and module.ref_model is not None:
            module.ref_model = None  # the policy's copy that scored the precomputed reference
        return super().train(*args, **kwargs)


# ----------------------------------------------------------------------------- batches


def _bool(x: Tensor) -> Tensor:
    return x if x.dtype == torch.bool else x != 0


def pair_arguments(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> dict:
    """TRL's pair batch -- ``input_ids``, ``attention_mask``, ``completion_mask`` (2B, L), chosen
    rows then rejected rows -- as :meth:`fastdpo.DPO.forward`'s arguments.  The scored positions
    are the same: fastdpo scores ``~prompt_mask & seq_mask`` target-aligned, which with
    ``prompt_mask = attention & ~completion`` is TRL's ``completion_mask[:, 1:]``.  A pair's two
    rows must have their prompt at the same positions (one ``prompt_mask`` per pair): TRL's
    collator makes them so but with ``truncation_mode="keep_end"`` cutting a pair's two prompts
    to different lengths; that, or a collator padding on the left, is a ``ValueError``."""
    b = input_ids.shape[0] // 2
    real, completion = _bool(attention_mask), _bool(completion_mask)
    prompt = real & ~completion
    if not torch.equal(prompt[:b], prompt[b:]):
        raise ValueError(
            "a pair's chosen and rejected rows have their prompt tokens at different positions (truncation_mode="
            "'keep_end' cut the two to different lengths, or the collator pads on the left): fastdpo scores a pair "
            "with one prompt mask; use truncation_mode='keep_start' (TRL's default), a larger max_length, or a "
            "right-padding collator"
        )
    return dict(preferred_seq=input_ids[:b], unpreferred_seq=input_ids[b:], prompt_mask=prompt[:b],
                preferred_seq_mask=real[:b], unpreferred_seq_mask=real[b:])


def unpaired_arguments(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's unpaired rows as :meth:`fastdpo.KTO.forward`'s ``(seq, prompt_mask, seq_mask)``."""
    real = _bool(attention_mask)
    return input_ids, real & ~_bool(completion_mask), real


# ----------------------------------------------------------------------------- metrics


def gathered_sums(accelerator, values: list[Tensor]) -> list[float]:
    """Each 0-d value summed over the processes (one gather, one host sync)."""
    local = torch.stack([v.detach().float().reshape(()) for v in values]).reshape(1, -1)
    return accelerator.gather(local).reshape(-1, len(values)).sum(0).tolist()


def gathered_mean(accelerator, value: Tensor) -> float:
    """A 0-d value averaged over the processes, as TRL averages ``aux_loss``."""
    return accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean().item()


def count_tokens(trainer, mode: str, attention_mask: Tensor) -> None:
    """TRL's ``num_tokens`` metric: the real tokens the training batches held so far, over the
    processes (its own code, on the batch's ``attention_mask``)."""
    if mode == "train":
        n = trainer.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        trainer._total_train_tokens += n // trainer._tp_size
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def logits_for_compute_metrics(model: nn.Module, model_kwargs: dict):
    """TRL 1.16's deprecated ``return_outputs=True`` path, as TRL takes it: one more forward
    without the fused head, so the logits exist, for ``compute_metrics``."""
    warnings.warn(
        "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated and will be removed "
        "in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra forward pass.",
        FutureWarning,
        stacklevel=3,
    )
    with torch.no_grad():
        return model(**model_kwargs)


# ----------------------------------------------------------------------------- refusals


def refuse(trainer: str, what: str, why: str) -> ValueError:
    """The one-line error for a set-up fastdpo cannot honour."""
    return ValueError(f"fastdpo.trl.{trainer}: {what} is not supported: {why}")


def check_setup(trainer: str, args, processing_class, train_dataset) -> None:
    """Refuse, before TRL prepares anything, what no fastdpo module takes: vision-language
    processors and image datasets, and sequence, context or tensor parallelism (they shard a
    sequence, or the head, before the loss)."""
    transformers = __import__("transformers")
    if isinstance(processing_class, transformers.ProcessorMixin):
        raise refuse(trainer, f"processing_class={type(processing_class).__name__}",
                     "fastdpo scores causal language models only, not vision-language models")
    if train_dataset is not None and hasattr(train_dataset, "__iter__"):
        first = next(iter(train_dataset), None)
        if isinstance(first, dict) and ("image" in first or "images" in first):
            raise refuse(trainer, "an image dataset", "fastdpo scores causal language models only")
    parallel = getattr(args, "parallelism_config", None)
    if parallel is not None:
        sizes = {k: getattr(parallel, f"{k}_size", 1) or 1 for k in ("tp", "cp", "sp")}
        used = [f"{k}_size={v}" for k, v in sizes.items() if v > 1]
        if used:
            raise refuse(trainer, f"parallelism_config ({', '.join(used)})",
                         "tensor, context and sequence parallelism shard the head or the sequences before the loss")


def check_model(trainer: str, model: nn.Module, ref_model: nn.Module | None) -> None:
    """Refuse what TRL's set-up made that fastdpo cannot score as TRL does: an encoder-decoder,
    and a peft policy whose reference TRL made a ``"ref"`` copy of its adapter (a ``PeftModel``
    passed with a trained adapter and no ``ref_model``), where fastdpo's reference is the model
    with its adapters disabled."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise refuse(trainer, "an encoder-decoder model", "fastdpo scores causal language models only")
    peft = peft_model(model)
    if ref_model is None and peft is not None and "ref" in getattr(peft, "peft_config", {}):
        raise refuse(
            trainer, "a PeftModel passed with its adapter and no ref_model",
            "TRL scores the reference with a 'ref' copy of that adapter, fastdpo with the adapters disabled; pass the "
            "base model with peft_config=, or a ref_model",
        )
