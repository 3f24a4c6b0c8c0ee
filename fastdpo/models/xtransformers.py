"""x-transformers' ``TransformerWrapper`` (2.31.x): its head, hidden states and packed runs.

* **Head.**  Fusable heads are an ``nn.Linear`` ``to_logits`` (its bias too) and the tied embedding
  ``(t @ token_emb.emb.weight.t()) * tie_embedding_scale`` (the lambda x-transformers' own
  ``__init__`` makes, recognized by its code object and its closure over this model), on a
  model whose ``return_embeddings=True`` output is exactly what that head consumes.
* **Hidden states** are ``model(src, return_embeddings=True)``; logits ``model(src)``.
* **Padding** is x-transformers' own: no attention mask, no check (as its DPO), so left padding
  runs as given, attended to by the real tokens after it (its adapter never asks for a
  :class:`~fastdpo.models.Padding`).
* **Packed pairs** reach the model as ``pos`` (positions restarting after the prompt), for
  causal models whose positions come from the ``pos`` they are given.  Attention by parts
  (:mod:`fastdpo.batching.attention`) takes over the ``forward`` of every ``Attend`` module for the
  packed call (:meth:`XTransformersAdapter.can_attend_by_parts` says which attentions it reproduces);
  otherwise the mask goes in as an additive bias (:meth:`fastdpo.batching.packing.PackedLayout.additive_mask`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import YES, Verdict, no
from ..batching.sequence_parallel import by_parts
from .base import LinearHead, ModelAdapter, check_weight, logits_of
from .wrappers import inner_model, model_class, module_to_call

if TYPE_CHECKING:
    from ..batching.packing import PackedLayout


def _classes():
    from x_transformers import x_transformers as xt

    return xt


def _tied_lambda(model: nn.Module) -> bool:
    """Whether ``model.to_logits`` is the tied-embedding head x-transformers' ``__init__``
    builds for this very model (its code object, closing over ``model``)."""
    head = model.to_logits
    code = getattr(head, "__code__", None)
    init = type(model).__init__
    init = getattr(init, "__wrapped__", init)  # (beartype-style decorators)
    if code is None or code not in getattr(getattr(init, "__code__", None), "co_consts", ()):
        return False
    cells = [c.cell_contents for c in (head.__closure__ or ()) if c.cell_contents is not None]
    return any(c is model for c in cells)


class XTransformersAdapter(ModelAdapter):
    family = "x-transformers"

    def __init__(self, model: nn.Module, inner: nn.Module):
        super().__init__(model)
        self.inner = inner  # the TransformerWrapper under the wrappers

    @classmethod
    def adapt(cls, model: nn.Module) -> XTransformersAdapter | None:
        try:
            xt = _classes()
        except ImportError:  # pragma: no cover - x-transformers is a dependency
            return None
        inner = inner_model(model)
        return cls(model, inner) if isinstance(inner, xt.TransformerWrapper) else None

    def head(self) -> tuple[LinearHead | None, str]:
        model = self.inner
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
            usable = check_weight(head.weight)
            if usable and head.bias is not None:
                usable = check_weight(head.bias)
            return (LinearHead(head.weight, None, head, has_bias=head.bias is not None), "") if usable else (None, usable.why_not)
        if _tied_lambda(model) and isinstance(model.token_emb, _classes().TokenEmbedding):
            emb = model.token_emb.emb
            usable = check_weight(emb.weight)
            return (LinearHead(emb.weight, float(model.tie_embedding_scale), emb), "") if usable else (None, usable.why_not)
        return None, f"its to_logits is a custom {type(head).__name__}"

    def vocab_size(self) -> int | None:
        n = getattr(self.inner, "num_tokens", None)
        return n if isinstance(n, int) else None

    def hidden(self, tokens: Tensor, layout: PackedLayout | None = None) -> Tensor:
        return self._call(tokens, layout, embeddings=True)

    def logits(self, tokens: Tensor, layout: PackedLayout | None = None) -> Tensor:
        return logits_of(self._call(tokens, layout, embeddings=False))

    def _call(self, tokens: Tensor, layout: PackedLayout | None, *, embeddings: bool):
        callee = module_to_call(self.model)
        if layout is None:
            return callee(tokens, return_embeddings=True) if embeddings else callee(tokens)
        with self._positions(layout):
            if layout.attention == "segments":
                with _attend_by_parts(self.inner, layout):
                    return callee(tokens, return_embeddings=embeddings, pos=layout.pos)
            return callee(tokens, return_embeddings=embeddings, pos=layout.pos, **self._mask_kwargs(layout))

    @contextmanager
    def _positions(self, layout: PackedLayout) -> Iterator[None]:
        """The packed positions reach the model as ``pos``: as they are where its attention
        layers use them (rotary, ALiBi); where only an absolute positional embedding does, a
        pre-hook on the wrapper (inside its forward, after FSDP2 gathered its parameters) turns
        them into that embedding, applied by the model's own module to the flat positions, which
        also lifts its ``max_seq_len`` bound on the packed length."""
        inner = self.inner
        layers = inner.attn_layers
        uses_pos = getattr(layers, "rotary_pos_emb", None) is not None or getattr(layers, "rel_pos", None) is not None
        if uses_pos or not isinstance(inner.pos_emb, nn.Module):
            yield
            return

        def embed(module, args, kwargs):
            pos = kwargs["pos"]
            flat = module.pos_emb(args[0][:, :1], pos=pos.reshape(-1))  # (takes no batch of positions)
            return args, {**kwargs, "pos": flat.reshape(*pos.shape, flat.shape[-1])}

        handle = inner.register_forward_pre_hook(embed, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def can_attend_by_parts(self) -> Verdict:
        """Whether attention by parts can stand in for this model's attention: plain softmax
        attention (flash or not, grouped or not, with qk-norm) whose only mask is causal."""
        layers = self.inner.attn_layers
        if getattr(layers, "rel_pos", None) is not None:
            return no(f"its {type(layers.rel_pos).__name__} adds a bias to the attention scores")
        if getattr(layers, "residual_attn", False):
            return no("it uses residual attention (each layer adds the previous layer's scores)")
        for module in self.inner.modules():
            why = _attention_why(module) if type(module).__name__ == "Attention" else ""
            why = why or (_attend_why(module) if type(module).__name__ == "Attend" else "")
            if why:
                return no(why)
        return YES

    def _mask_kwargs(self, layout: PackedLayout) -> dict:
        """The dense packed mask as x-transformers' forward arguments."""
        inner = self.inner
        if getattr(inner.attn_layers, "rel_pos", None) is None:
            # The mask as an additive bias with causality in it, the model's own causal mask
            # off: one pass over each layer's scores, as the unpacked model's causal mask makes
            # (x-transformers' boolean attn_mask costs three: two masked_fills and a
            # post-softmax one).
            bias = layout.additive_mask(next(inner.parameters()).dtype)
            return dict(attn_bias=bias, causal=False)
        return dict(attn_mask=layout.attn_mask)  # ALiBi makes its own attn_bias

    def can_pack(self) -> Verdict:
        """Whether this model can run packed pairs: causal, no memories or cls tokens, positions
        it takes as given."""
        xt = _classes()
        model, layers = self.inner, self.inner.attn_layers
        rel_pos = getattr(layers, "rel_pos", None)
        checks = [
            (not getattr(layers, "causal", False), "its attention layers are not causal"),
            (getattr(model, "num_memory_tokens", 0) > 0, "it has memory tokens"),
            (getattr(model, "max_mem_len", 0) > 0 or getattr(model, "shift_mem_down", 0), "it is recurrent (memories)"),
            (getattr(model, "cls_token", None) is not None, "it uses cls tokens"),
            (getattr(model, "looped", False) or getattr(model, "recycling", False), "it is looped or recycling"),
            (rel_pos is not None and not isinstance(rel_pos, xt.AlibiPositionalBias),
             f"its {type(rel_pos).__name__} takes no custom positions"),
            (getattr(layers, "rotary_pos_emb", None) is not None and getattr(layers.rotary_pos_emb, "scale", None) is not None,
             "its rotary xpos scales with the largest position"),
            (getattr(layers, "data_dependent_alibi", None) is not None, "its data-dependent ALiBi runs along the sequence"),
            (any(getattr(m, "max_attend_past", None) is not None for m in model.modules()),
             "its attention's max_attend_past is measured along the sequence, not from positions"),
        ]
        for bad, why in checks:
            if bad:
                return no(why)
        uses_pos = getattr(layers, "rotary_pos_emb", None) is not None or rel_pos is not None
        if uses_pos and isinstance(model.pos_emb, xt.AbsolutePositionalEmbedding):
            return no(
                f"it adds an absolute positional embedding (max_seq_len {model.pos_emb.max_seq_len}) to its "
                f"{'rotary' if layers.rotary_pos_emb is not None else 'ALiBi'} positions: both take the same "
                f"positions, and a packed pair can be longer than max_seq_len"
            )
        if not isinstance(model.pos_emb, (xt.AbsolutePositionalEmbedding, xt.ScaledSinusoidalEmbedding)):
            if not (callable(model.pos_emb) and not isinstance(model.pos_emb, nn.Module)):  # always(0)
                return no(f"its positional embedding is a {type(model.pos_emb).__name__}")
        return YES

# ----------------------------------------------------------------------------- attention by parts

# Attend's options that change what attention computes, and their plain values.
_ATTEND_PLAIN = dict(
    pre_softmax_talking_heads=None, post_softmax_talking_heads=None, pre_scale_post_talking_heads=None,
    selective=False, cog_signed=False, l2_distance=False, add_zero_kv=False, head_learned_sink=False,
    softclamp_logits=False, cope=None, inverted_attention=False,
)


def _is_softmax(fn) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is F.softmax


def _attend_why(attend: nn.Module) -> str:
    for name, plain in _ATTEND_PLAIN.items():
        value = getattr(attend, name, plain)
        if (value is not None) if plain is None else (value != plain):
            return f"its attention uses {name}"
    if not _is_softmax(getattr(attend, "attn_fn", None)):
        return "its attention normalizes with something other than a softmax"
    return ""


def _attention_why(attention: nn.Module) -> str:
    if getattr(attention, "num_mem_kv", 0):
        return "its attention has memory key/values"
    if getattr(attention, "hybrid_module", None) is not None:
        return "its attention runs a hybrid (recurrent) module along the sequence"
    if getattr(attention, "rel_proj_pos_bias", None) is not None:
        return "its attention adds a relative projection bias"
    return ""


@contextmanager
def _attend_by_parts(model: nn.Module, layout: PackedLayout) -> Iterator[None]:
    """Every ``Attend`` of ``model`` computes attention by parts of ``layout`` (or of one
    process's share of it, :class:`~fastdpo.batching.sequence_parallel.ShardedLayout`) for the duration
    (its instance ``forward``; removed after, so the class's own runs again)."""
    parts = by_parts(layout)
    attends = [m for m in model.modules() if type(m).__name__ == "Attend"]
    for attend in attends:
        attend.forward = functools.partial(_attend_forward, attend, parts)
    try:
        yield
    finally:
        for attend in attends:
            del attend.forward


def _attend_forward(attend, parts, q, k, v, mask=None, attn_bias=None, prev_attn=None, attn_delta=None,
                    row_mask=None, flash_pack_seq_kwargs=None, causal=None):
    """``Attend.forward`` by parts: (out, Intermediates()) as the flash path returns them."""
    from x_transformers.attend import Intermediates

    if mask is not None or attn_bias is not None or prev_attn is not None or attn_delta is not None:
        raise RuntimeError("attention by parts got a mask, a bias or residual scores it cannot apply")
    heads = q.shape[1]
    if k.shape[1] != heads:  # grouped queries: x-transformers repeats the kv heads whole
        k, v = (t.repeat(1, heads // t.shape[1], 1, 1) for t in (k, v))
    scale = attend.scale if attend.scale is not None else q.shape[-1] ** -0.5
    dropout = attend.dropout if attend.training else 0.0
    return parts(q, k, v, scale=scale, dropout_p=dropout), Intermediates()
