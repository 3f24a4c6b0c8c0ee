"""Model families behind one small interface (:class:`ModelAdapter`).

``DPO`` asks a model's adapter, never the model, what it needs: the fusable head (or why
not), hidden states, logits, the vocabulary size, the padding it accepts, how to run packed
pairs.  One module per family; :data:`FAMILIES` is the order they are asked in, the first that
adapts a model (``Family.adapt(model)`` is not None) is its adapter, and :class:`ModelAdapter` itself (any module that returns logits)
takes the rest.  A new family is one module with a :class:`ModelAdapter` subclass, listed
here.

* :mod:`.wrappers` -- torch.compile, peft, FSDP2, DDP: what every family sees through;
* :mod:`.base` -- the interface, the fusable head (:class:`LinearHead`, :func:`live_weight`,
  :func:`live_bias`);
* :mod:`.xtransformers` -- x-transformers' ``TransformerWrapper``;
* :mod:`.hf` -- Hugging Face causal LMs.
"""

from __future__ import annotations

from torch import nn

from ..batching.batch import Padding
from .base import LinearHead, ModelAdapter, check_first_pairs, gathers, live_bias, live_weight
from .hf import HFAdapter
from .wrappers import adapters_disabled, check_wrappers, eval_mode, peft_model
from .xtransformers import XTransformersAdapter

FAMILIES: tuple[type[ModelAdapter], ...] = (HFAdapter, XTransformersAdapter)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of the first family in :data:`FAMILIES` that knows ``model``, else the
    logits-only :class:`ModelAdapter`."""
    for family in FAMILIES:
        adapter = family.adapt(model)
        if adapter is not None:
            return adapter
    return ModelAdapter(model)


__all__ = [
    "FAMILIES",
    "HFAdapter",
    "LinearHead",
    "ModelAdapter",
    "Padding",
    "XTransformersAdapter",
    "adapter_for",
    "adapters_disabled",
    "check_first_pairs",
    "check_wrappers",
    "eval_mode",
    "gathers",
    "live_bias",
    "live_weight",
    "peft_model",
]
