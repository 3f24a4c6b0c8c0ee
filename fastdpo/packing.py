"""Prompt sharing: a preference pair as one packed sequence (Wang & Hegde 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing").

A pair ``(prompt + chosen, prompt + rejected)`` runs through a model as one sequence
``[prompt, chosen completion, rejected completion]``: the rejected completion's positions
restart after the prompt, and an attention mask hides the chosen completion from it.  With a
causal model whose positions come from the ``pos`` it is given, every token then sees exactly
what it sees in its own unpacked sequence, so the hidden states -- and the scores -- are the
unpacked ones (to float rounding), while the prompt runs once instead of twice.

:func:`pack` builds the layout; :func:`check_model` says which models (x-transformers
``TransformerWrapper``s, Hugging Face causal LMs) can run it; :func:`run_packed` runs one; the hidden states of the unpacked ``(2B, L-1)`` rows are then
gathered back (:attr:`Packed.rows`) and scored as usual.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


@dataclass(frozen=True)
class Packed:
    """One batch of B pairs packed into B sequences of length T."""

    tokens: Tensor  # (B, T) token ids
    pos: Tensor  # (B, T) each token's position in its unpacked sequence
    attn_mask: Tensor  # (B, 1, T, T) bool, True = may attend (the model adds causality)
    rows: Tensor  # (2B, L-1) index into the (B*T) packed positions of each unpacked input position
    length: int  # T

    @property
    def shared_fraction(self) -> float:
        """Tokens saved: 1 - packed tokens / unpacked tokens (padding included in both)."""
        b, t = self.tokens.shape
        return 1.0 - (b * t) / (2 * b * (self.rows.shape[1] + 1))


def pack(
    preferred: Tensor, unpreferred: Tensor, prompt_mask: Tensor, pref_mask: Tensor | None,
    unpref_mask: Tensor | None, pad_token: int = 0,
) -> Packed:
    """Pack B pairs (each (B, L), right padded, prompt first).

    Checks, with one host sync for the whole batch (the layout's lengths): each row's prompt
    is a prefix (True then False), of real tokens, equal in both sequences of the pair; the
    sequence masks are right padding.  Raises ``ValueError`` naming the first bad row.
    """
    b, n = preferred.shape
    device = preferred.device
    ar = torch.arange(n, device=device)
    ones = torch.ones_like(prompt_mask)
    wm = pref_mask if pref_mask is not None else ones
    lm = unpref_mask if unpref_mask is not None else ones
    p = prompt_mask.sum(1)
    wlen, llen = wm.sum(1), lm.sum(1)
    prefix = ar[None] < p[:, None]
    bad = torch.stack((
        (prompt_mask != prefix).any(1),  # the prompt is not a prefix
        (wm != (ar[None] < wlen[:, None])).any(1) | (lm != (ar[None] < llen[:, None])).any(1),  # not right padding
        (p > torch.minimum(wlen, llen)),  # a prompt position is padding
        ((preferred != unpreferred) & prefix).any(1),  # the prompts differ
    ))
    stats = torch.cat((bad.any(1), p, wlen, llen)).tolist()  # the one host sync
    reasons = (
        "its prompt_mask is not a prefix (True on the first positions, then False)",
        "its sequence masks are not right padding",
        "its prompt includes padding",
        "its preferred and unpreferred prompts differ",
    )
    for k, why in enumerate(reasons):
        if stats[k]:
            row = int(bad[k].nonzero()[0])
            raise ValueError(f"share_prompt=True cannot pack pair {row}: {why}")
    p_h, w_h, l_h = stats[4:4 + b], stats[4 + b:4 + 2 * b], stats[4 + 2 * b:]
    t_len = max(w + l - q for q, w, l in zip(p_h, w_h, l_h))

    t = torch.arange(t_len, device=device)[None]  # (1, T)
    pc, wc, lc = p[:, None], wlen[:, None], llen[:, None]
    rej_end = wc + lc - pc
    seg = torch.full((b, t_len), PAD, dtype=torch.long, device=device)
    seg = torch.where(t < rej_end, REJECTED, seg)
    seg = torch.where(t < wc, CHOSEN, seg)
    seg = torch.where(t < pc, PROMPT, seg)
    # token and position of each packed slot: its own index in the chosen part, shifted back by
    # the chosen completion's length in the rejected part
    src_pos = torch.where(seg == REJECTED, t - wc + pc, torch.where(seg == PAD, 0, t))
    from_chosen = torch.gather(preferred, 1, torch.where(seg == REJECTED, 0, src_pos).clamp(max=n - 1))
    from_rejected = torch.gather(unpreferred, 1, src_pos.clamp(max=n - 1))
    tokens = torch.where(seg == REJECTED, from_rejected, from_chosen)
    tokens = torch.where(seg == PAD, torch.full_like(tokens, pad_token), tokens)
    seg_i, seg_j = seg[:, :, None], seg[:, None, :]
    attn_mask = ((seg_j == PROMPT) | (seg_j == seg_i) | (seg_i == PAD))[:, None]

    # rows: where each unpacked input position j (0..L-2) of each sequence lives in the pack;
    # positions past a sequence's end (never scored) point at slot 0
    j = torch.arange(n - 1, device=device)[None]
    base = torch.arange(b, device=device)[:, None] * t_len
    chosen_rows = torch.where(j < wc, j, 0) + base
    rejected_slot = torch.where(j < pc, j, j - pc + wc)
    rejected_rows = torch.where(j < lc, rejected_slot, 0) + base
    return Packed(tokens, src_pos, attn_mask, torch.cat((chosen_rows, rejected_rows)), t_len)


def check_model(model: nn.Module) -> str:
    """Why ``model`` (seen through torch.compile and peft) cannot run packed pairs; "" when
    nothing known stands in the way (:func:`fastdpo.dpo.DPO` then checks the hidden states of
    one pair, packed against unpacked, on its first call)."""
    from x_transformers.x_transformers import (
        AbsolutePositionalEmbedding,
        AlibiPositionalBias,
        ScaledSinusoidalEmbedding,
        TransformerWrapper,
    )

    from . import hf

    lm = hf.causal_lm(model)
    if lm is not None:
        return _check_hf(lm)
    model = hf.inner_model(model)
    if not isinstance(model, TransformerWrapper):
        return f"the model is a {type(model).__name__}, not a TransformerWrapper"
    layers = model.attn_layers
    checks = [
        (not getattr(layers, "causal", False), "its attention layers are not causal"),
        (getattr(model, "num_memory_tokens", 0) > 0, "it has memory tokens"),
        (getattr(model, "max_mem_len", 0) > 0 or getattr(model, "shift_mem_down", 0), "it is recurrent (memories)"),
        (getattr(model, "cls_token", None) is not None, "it uses cls tokens"),
        (getattr(model, "looped", False) or getattr(model, "recycling", False), "it is looped or recycling"),
        (getattr(layers, "rel_pos", None) is not None and not isinstance(layers.rel_pos, AlibiPositionalBias),
         f"its {type(getattr(layers, 'rel_pos', None)).__name__} takes no custom positions"),
        (getattr(layers, "rotary_pos_emb", None) is not None and getattr(layers.rotary_pos_emb, "scale", None) is not None,
         "its rotary xpos scales with the largest position"),
        (getattr(layers, "data_dependent_alibi", None) is not None, "its data-dependent ALiBi runs along the sequence"),
    ]
    for bad, why in checks:
        if bad:
            return why
    uses_pos = getattr(layers, "rotary_pos_emb", None) is not None or getattr(layers, "rel_pos", None) is not None
    if uses_pos and isinstance(model.pos_emb, AbsolutePositionalEmbedding):
        return (
            f"it adds an absolute positional embedding (max_seq_len {model.pos_emb.max_seq_len}) to its "
            f"{'rotary' if layers.rotary_pos_emb is not None else 'ALiBi'} positions: both take the same "
            f"positions, and a packed pair can be longer than max_seq_len"
        )
    if not isinstance(model.pos_emb, (AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding)):
        if not (callable(model.pos_emb) and not isinstance(model.pos_emb, nn.Module)):  # always(0)
            return f"its positional embedding is a {type(model.pos_emb).__name__}"
    return ""


def _check_hf(lm: nn.Module) -> str:
    """Why a Hugging Face causal LM cannot run packed pairs ("" when it can): it takes the mask
    as a 4-D additive ``attention_mask`` (used as it is, since transformers 4.44) and the
    positions as ``position_ids``."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    impl = getattr(config, "_attn_implementation", None) or getattr(lm.config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return f"its attention implementation {impl!r} takes no 4-D mask (use 'sdpa' or 'eager')"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"it uses sliding-window attention (sliding_window={window}), which a 4-D mask would replace"
    params = inspect.signature(lm.forward).parameters
    if "attention_mask" not in params or "position_ids" not in params:
        return "its forward takes no attention_mask and position_ids"
    return ""


def _additive_mask(packed: Packed, dtype: torch.dtype) -> Tensor:
    """The packed mask with causality in it, as a (B, 1, T, T) additive bias: 0 where a token
    may attend, the dtype's lowest value where it may not."""
    t = packed.length
    causal = torch.ones(t, t, dtype=torch.bool, device=packed.tokens.device).tril()
    bias = torch.zeros(packed.attn_mask.shape, dtype=dtype, device=packed.tokens.device)
    return bias.masked_fill_(~(packed.attn_mask & causal), torch.finfo(dtype).min)


def run_packed(model: nn.Module, packed: Packed, *, embeddings: bool = True) -> Tensor:
    """A model's (B, T, D) hidden states (``embeddings``) or (B, T, V) logits of a packed batch.

    Hugging Face: the mask as a 4-D additive ``attention_mask``, the positions as
    ``position_ids`` (:func:`fastdpo.hf.hidden_states` for the hidden states).  x-transformers:
    positions reach the model as ``pos``: long positions where its attention layers use them
    (rotary, ALiBi); as the absolute positional embedding itself (its own module, applied to
    the positions) where only that uses them, which also lifts its ``max_seq_len`` bound on
    the packed length.
    """
    from . import hf

    lm = hf.causal_lm(model)
    if lm is not None:
        kw = dict(attention_mask=_additive_mask(packed, next(lm.parameters()).dtype), position_ids=packed.pos)
        return hf.hidden_states(model, packed.tokens, **kw) if embeddings else hf.logits(model, packed.tokens, **kw)
    inner = hf.inner_model(model)
    layers = inner.attn_layers
    uses_pos = getattr(layers, "rotary_pos_emb", None) is not None or getattr(layers, "rel_pos", None) is not None
    callee = hf.module_to_call(model)
    if uses_pos or not isinstance(inner.pos_emb, nn.Module):
        pos = packed.pos
    else:  # the embedding of the positions, by the model's own module (on flat positions:
        # the sinusoidal one takes no batch of them), which also lifts max_seq_len's bound
        flat = inner.pos_emb(packed.tokens[:, :1], pos=packed.pos.reshape(-1))
        pos = flat.reshape(*packed.pos.shape, flat.shape[-1])
    if getattr(layers, "rel_pos", None) is None:
        # the mask as an additive bias with causality in it, the model's own causal mask off:
        # one pass over each layer's scores, as the unpacked model's causal mask makes
        # (x-transformers' boolean attn_mask costs three: two masked_fills and a post-softmax one)
        bias = _additive_mask(packed, next(inner.parameters()).dtype)
        out = callee(packed.tokens, return_embeddings=embeddings, pos=pos, attn_bias=bias, causal=False)
    else:  # ALiBi makes its own attn_bias: the boolean mask
        out = callee(packed.tokens, return_embeddings=embeddings, pos=pos, attn_mask=packed.attn_mask)
    return out if embeddings else hf.logits_of(out)
