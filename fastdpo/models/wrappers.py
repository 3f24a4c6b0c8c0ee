"""The wrappers users put around a model, seen through by every family's adapter.

* ``torch.compile``: an ``OptimizedModule`` holding the model as ``_orig_mod``.  The wrapper
  is what runs (the body stays compiled); the head is looked for on the module inside.
* ``peft``: a ``PeftModel`` (LoRA, IA3, ...: adapters injected into the layers).  It runs as
  its base model with the adapters active; its reference is the same model with the adapters
  disabled (:func:`adapters_disabled`), so no copy is made.  Prompt-learning adapters prepend
  virtual tokens and are refused (:func:`check_peft`).
* FSDP2's ``fully_shard``: swaps a module's class for ``FSDP<name>(FSDPModule, <name>)``,
  which adds no forward of its own (:func:`model_class` sees the class under it); its sharded
  parameters are ``DTensor`` s, gathered where fastdpo reads the head weight
  (:func:`fastdpo.models.base.live_weight`).
* DDP: ``DistributedDataParallel`` goes around the :class:`fastdpo.DPO` module, not around
  the model given to it (:func:`check_wrappers` says so).

Nothing here imports ``peft``: a model is a ``PeftModel`` only when ``peft`` is already
imported (whoever built the model imported it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (repeatedly), or ``model`` itself."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    return model


def peft_model(model: nn.Module) -> nn.Module | None:
    """``model`` (seen through ``torch.compile``) when it is a ``peft.PeftModel``, else None."""
    peft = sys.modules.get("peft")
    cls = getattr(peft, "PeftModel", None) if peft is not None else None
    inner = unwrap_compiled(model)
    return inner if cls is not None and isinstance(inner, cls) else None


def inner_model(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` and ``peft`` wrappers (where the head lives)."""
    peft = peft_model(model)
    return unwrap_compiled(peft.get_base_model()) if peft is not None else unwrap_compiled(model)


def module_to_call(model: nn.Module) -> nn.Module:
    """What to call with a family's own keyword arguments (x-transformers'
    ``return_embeddings``, ``pos``, ...): ``model`` itself, or a peft model's base model (its
    adapters injected into the layers), whose forward takes the base model's arguments."""
    return inner_model(model) if peft_model(model) is not None else model


def model_class(module: nn.Module) -> type:
    """``module``'s class, seen through FSDP2's ``fully_shard``, which swaps it for a class
    ``FSDP<name>(FSDPModule, <class>)`` that adds no forward of its own."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == "FSDP" + bases[1].__name__:
        return bases[1]
    return cls


def check_wrappers(model: nn.Module) -> None:
    """Raise for wrappers DPO cannot run a model inside: DDP around the model, prompt-learning
    peft adapters."""
    if type(unwrap_compiled(model)).__name__ == "DistributedDataParallel":
        raise TypeError(
            "DPO got a DistributedDataParallel-wrapped model: wrap the DPO module instead "
            "(DDP(DPO(model, ...))), so its reference copy is made of the model itself and DDP "
            "reduces the policy's gradients (docs/distributed.md)"
        )
    peft = peft_model(model)
    if peft is not None and peft.active_peft_config.is_prompt_learning:
        kind = type(peft.active_peft_config).__name__
        raise ValueError(
            f"fastdpo does not take prompt-learning peft adapters ({kind}): they prepend "
            f"virtual tokens, so the model's outputs no longer line up with the sequences; "
            f"use a tuner adapter (LoRA, IA3, ...)"
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, every module's train/eval flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The reference of a ``peft`` policy: the same model, adapters off, in eval mode (every
    module's train/eval flag is restored after)."""
    peft = peft_model(model)
    with eval_mode(peft), peft.disable_adapter():
        yield model
