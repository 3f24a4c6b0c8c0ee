"""Finding a model's output head, when fastdpo can reproduce it exactly.

A head that is ``logits = hidden @ weight.T (* scale)`` can be fused into the loss
(:mod:`fastdpo.fused_pair`, :func:`fastdpo.linear_sequence_logprobs`): the model then runs for
its hidden states only (x-transformers: ``return_embeddings=True``; Hugging Face: its backbone,
:mod:`fastdpo.hf`) and no (B, L, V) logits are ever built.  Anything else takes the
logits route, and :func:`find_linear_head` says why.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LinearHead:
    """A model's output head as ``logits = hidden @ weight.T * scale`` (scale may be None).

    ``weight`` is the weight when the head was found; ``owner``, when given, is the module
    whose ``.weight`` it is, read again at each call by :func:`live_weight` (FSDP2 swaps a
    sharded parameter for its gathered twin and back around every forward).
    """

    weight: Tensor
    scale: float | None
    owner: nn.Module | None = None


def _is_plain(w: Tensor) -> bool:
    return type(w) in (torch.Tensor, nn.Parameter)


def live_weight(head: LinearHead, dtype: torch.dtype) -> Tensor:
    """The head weight to multiply hidden states of ``dtype`` by, now.

    A plain tensor is used as it is (also FSDP2's gathered parameter while its group is
    unsharded: FSDP2 reduce-scatters its gradient itself).  A ``DTensor`` (an FSDP2 shard,
    outside its group's forward) is gathered whole with ``full_tensor``, its gradient marked
    ``Partial("avg")`` over every mesh dimension: backward reduce-scatters (and averages, as
    FSDP2 does) the full gradient back into the shards, through DTensor's own autograd.  It is
    gathered in its stored dtype (so that reduction runs in it) and cast to ``dtype`` (FSDP2's
    ``param_dtype`` under a mixed-precision policy) after.  The gathered weight lives as long
    as the caller holds it.
    """
    w = head.owner.weight if head.owner is not None else head.weight
    if _is_plain(w):
        return w
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(w, DTensor):  # pragma: no cover - find_linear_head declines these
        raise TypeError(f"the head weight is a {type(w).__name__}, not a tensor or a DTensor")
    if w.requires_grad and torch.is_grad_enabled():
        full = w.full_tensor(grad_placements=[Partial("avg")] * w.device_mesh.ndim)
    else:
        full = w.detach().full_tensor()
    return full.to(dtype)


def check_weight(weight) -> str:
    """Why a head weight cannot be used ("" when it can): a plain tensor, or a DTensor."""
    if not isinstance(weight, torch.Tensor):
        return f"its head weight is a {type(weight).__name__}, not a tensor"
    if _is_plain(weight):
        return ""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor):
        return ""  # gathered at each call (live_weight)
    return f"its head weight is a {type(weight).__name__}, not a plain tensor or a DTensor"


# Wrappers fastdpo sees through to find the head; the wrapper itself is still what runs.
WRAPPERS = {
    "torch.compile": "torch._dynamo.eval_frame.OptimizedModule (its _orig_mod)",
    "peft": "peft.PeftModel (its get_base_model(), the adapters injected into its layers)",
}


def model_class(module: nn.Module) -> type:
    """``module``'s class, seen through FSDP2's ``fully_shard``, which swaps it for a class
    ``FSDP<name>(FSDPModule, <class>)`` that adds no forward of its own."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == "FSDP" + bases[1].__name__:
        return bases[1]
    return cls


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (repeatedly), or ``model`` itself.

    Only the head is looked for on the unwrapped module: the caller keeps running ``model``,
    so a compiled body stays compiled.
    """
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    return model


def find_linear_head(model: nn.Module) -> tuple[LinearHead | None, str]:
    """The head of a model when fastdpo can reproduce it exactly.

    Returns ``(head, "")`` or ``(None, reason)``.  For a Hugging Face causal LM see
    :func:`fastdpo.hf.find_head`.  For an x-transformers ``TransformerWrapper``, reproducible
    heads are a bias-free ``nn.Linear`` ``to_logits`` and the tied embedding
    ``(t @ emb.weight.t()) * scale``, on a model whose ``return_embeddings=True`` output is
    exactly what that head consumes.  ``torch.compile`` and ``peft`` wrappers are seen through
    (see :data:`WRAPPERS`).
    """
    from . import hf  # (hf imports this module)

    if hf.causal_lm(model) is not None:
        return hf.find_head(model)
    try:
        from x_transformers.x_transformers import TokenEmbedding, TransformerWrapper
    except ImportError:  # pragma: no cover - x-transformers is a dependency
        return None, "x-transformers is not importable"
    model = hf.inner_model(model)
    if not isinstance(model, TransformerWrapper):
        return None, (
            f"the model is a {type(model).__name__}, not a TransformerWrapper or a Hugging Face "
            f"causal LM"
        )
    checks = [
        (getattr(model, "has_multiple_heads", False), "it has multiple output heads"),
        (getattr(model, "to_mixture", None) is not None, "it uses a mixture of softmaxes"),
        (getattr(model, "sigsoftmax_logits", False), "it uses sigsoftmax logits"),
        (getattr(model, "squeeze_out_last_dim", False), "it squeezes its output"),
        (getattr(model, "looped", False), "it is a looped model"),
        (getattr(model, "attn_pool", None) is not None, "it pools with attention"),
        (getattr(model, "cls_token", None) is not None, "it uses cls tokens"),
        (getattr(model, "average_pool_embed", False), "it average-pools its output"),
        (model.to_logits is None, "it has no head"),
    ]
    for bad, why in checks:
        if bad:
            return None, why
    head = model.to_logits
    if isinstance(head, nn.Module) and model_class(head) is nn.Linear:
        if head.bias is not None:
            return None, "its to_logits has a bias"
        why = check_weight(head.weight)
        return (LinearHead(head.weight, None, head), "") if not why else (None, why)
    if (
        isinstance(head, types.FunctionType)
        and head.__qualname__ == "TransformerWrapper.__init__.<locals>.<lambda>"
        and hasattr(model, "tie_embedding_scale")
        and isinstance(model.token_emb, TokenEmbedding)
    ):
        emb = model.token_emb.emb
        why = check_weight(emb.weight)
        return (LinearHead(emb.weight, float(model.tie_embedding_scale), emb), "") if not why else (None, why)
    return None, f"its to_logits is a custom {type(head).__name__}"
