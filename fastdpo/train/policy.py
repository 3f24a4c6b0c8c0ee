"""How ``fastdpo train`` runs the policy: gradient checkpointing and activation offloading
(:func:`prepare`), dropout off (TRL's ``disable_dropout``), and mixed precision
(:class:`Precision`: autocast over float32 master weights, a loss scaler for float16).

These are TRL 1.16's ``DPOConfig`` features, done as TRL does them, so a run moved from TRL
trains the same objective:

* **Gradient checkpointing** (on by default, as TRL): the model's own
  ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers
  5.2x) with the non-reentrant checkpoint.  Each decoder layer keeps its input and recomputes
  the rest in backward.  fastdpo's packed attention survives the recompute
  (:func:`fastdpo.models.hf._recomputing_by_parts`), so every route, packing, LoRA, KTO's KL
  pass, FSDP2 and the router term work under it (tests/test_checkpointing.py).
* **Activation offloading** (off by default): transformers' ``offload=True``: the layers'
  saved inputs go to pinned host memory in forward and come back in backward.  It needs
  checkpointing, and does nothing on the CPU (the activations are already there).  TRL's
  ``activation_offloading`` is its own context manager that offloads every saved activation;
  this one offloads what checkpointing keeps, which is far less.
* **Dropout off** in the policy and the reference (TRL's ``disable_dropout_in_model``: every
  ``nn.Dropout`` gets ``p = 0``; attention dropout given as a config float is the model's own,
  as in TRL).  ``keep_dropout`` keeps it.
* **Mixed precision**: ``"bf16"`` or ``"fp16"`` runs every forward (the policy's, the
  reference's, evaluation's and the precomputed reference scores') under ``torch.autocast``
  over float32 weights; gradients, the optimizer's state and the step stay float32 (TRL's
  ``bf16``/``fp16`` through accelerate).  ``"fp16"`` scales the loss (``torch.amp.GradScaler``):
  a step whose gradients overflow is skipped, with the scheduler, and the scale halves.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["PRECISIONS", "Precision", "prepare", "disable_dropout", "config_dropouts"]

PRECISIONS = ("float32", "bf16", "fp16")


def disable_dropout(model: nn.Module) -> int:
    """Every ``nn.Dropout`` of ``model`` gets ``p = 0`` (as TRL); returns how many had ``p > 0``."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            n += module.p > 0
            module.p = 0.0
    return n


def config_dropouts(model: nn.Module) -> dict[str, float]:
    """The attention dropout rates > 0 that ``model``'s attention modules hold as numbers (the
    ``attention_dropout`` attribute transformers' attention code reads in training mode, e.g.
    Llama's) rather than as ``nn.Dropout`` modules: :func:`disable_dropout` leaves them on, as
    TRL's ``disable_dropout_in_model`` does.  By class name."""
    return {type(m).__name__: rate for m in model.modules()
            if isinstance(rate := getattr(m, "attention_dropout", None), float) and rate > 0}  # fmt: skip


def _enable_checkpointing(model: nn.Module, offload: bool) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    elif offload:
        raise ValueError("--activation-offloading needs transformers' offload (transformers >= 5.25)")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare(model: nn.Module, *, gradient_checkpointing: bool, activation_offloading: bool) -> None:
    """Turn on what the run asks for on ``model`` (a transformers model, or peft around one;
    the options are checked together with the others, :func:`fastdpo.train.config.check_config`)."""
    if not gradient_checkpointing:
        return
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing: pass --no-gradient-checkpointing")
    _enable_checkpointing(model, activation_offloading)


class Precision:
    """The forward's precision (:data:`PRECISIONS`) and, for float16, the loss scaler."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        self.name, self.device = name, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        """The context every forward runs in."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """The gradients as the loss's (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """The optimizer's step; False when the scaler skipped it (gradients not finite)."""
        if self.scaler is None:
            opt.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
