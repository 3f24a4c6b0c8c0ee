"""Finding a model's output head, when fastdpo can reproduce it exactly.

A head that is ``logits = hidden @ weight.T (* scale)`` can be fused into the loss
(:mod:`fastdpo.fused_pair`, :func:`fastdpo.linear_sequence_logprobs`): the model then runs for
its hidden states only (x-transformers: ``return_embeddings=True``; Hugging Face: its backbone,
:mod:`fastdpo.hf`) and no (B, L, V) logits are ever built.  Anything else takes the
logits route, and :func:`find_linear_head` says why.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LinearHead:
    """A model's output head as ``logits = hidden @ weight.T * scale`` (scale may be None)."""

    weight: Tensor
    scale: float | None


# Wrappers fastdpo sees through to find the head; the wrapper itself is still what runs.
WRAPPERS = {
    "torch.compile": "torch._dynamo.eval_frame.OptimizedModule (its _orig_mod)",
    "peft": "peft.PeftModel (its get_base_model(), the adapters injected into its layers)",
}


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
    weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    if weight is None and isinstance(getattr(model, "token_emb", None), TokenEmbedding):
        weight = model.token_emb.emb.weight
    if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
        # e.g. an FSDP2-sharded DTensor: the chunked products need a plain local weight
        return None, f"its head weight is a {type(weight).__name__}, not a plain tensor"
    if type(head) is nn.Linear:
        if head.bias is not None:
            return None, "its to_logits has a bias"
        return LinearHead(head.weight, None), ""
    if (
        isinstance(head, types.FunctionType)
        and head.__qualname__ == "TransformerWrapper.__init__.<locals>.<lambda>"
        and hasattr(model, "tie_embedding_scale")
        and isinstance(model.token_emb, TokenEmbedding)
    ):
        return LinearHead(model.token_emb.emb.weight, float(model.tie_embedding_scale)), ""
    return None, f"its to_logits is a custom {type(head).__name__}"
