"""Prompt sharing: a preference pair as one packed sequence (Wang & Hegde 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing").

A pair ``(prompt + chosen, prompt + rejected)`` runs through a model as one sequence
``[prompt, chosen completion, rejected completion]``: the rejected completion's positions
restart after the prompt, and an attention mask hides the chosen completion from it.  With a
causal model whose positions come from the ``pos`` it is given, every token then sees exactly
what it sees in its own unpacked sequence, so the hidden states -- and the scores -- are the
unpacked ones (to float rounding), while the prompt runs once instead of twice.

:func:`pack` builds the layout; a model's adapter (:mod:`fastdpo.models`) says whether it can
run one (``adapter.packing()``) and runs it (its positions and mask as the family's forward
takes them, :meth:`Packed.additive_mask`); :func:`run` gathers the hidden states of the unpacked
``(2B, L-1)`` rows back (:attr:`Packed.rows`), which are then scored as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models import ModelAdapter, eval_mode

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


@dataclass(frozen=True)
class Packed:
    """One batch of B pairs packed into B sequences of length T."""

    tokens: Tensor  # (B, T) token ids
    pos: Tensor  # (B, T) each token's position in its unpacked sequence
    attn_mask: Tensor  # (B, 1, T, T) bool, True = may attend (the model adds causality)
    rows: Tensor  # (2B, L-1) index into the (B*T) packed positions of each unpacked input position
    length: int  # T

    def additive_mask(self, dtype: torch.dtype) -> Tensor:
        """The mask with causality in it, as a (B, 1, T, T) additive bias: 0 where a token may
        attend, the dtype's lowest value where it may not (how both families take it)."""
        t, device = self.length, self.tokens.device
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        bias = torch.zeros(self.attn_mask.shape, dtype=dtype, device=device)
        return bias.masked_fill_(~(self.attn_mask & causal), torch.finfo(dtype).min)

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


def run(adapter: ModelAdapter, packed: Packed, *, hidden: bool) -> Tensor:
    """The model's (2B, L-1, D) hidden states (``hidden``) or (2B, L-1, V) logits of the
    unpacked input rows, computed on the packed layout and gathered back."""
    out = adapter.hidden(packed.tokens, packed) if hidden else adapter.logits(packed.tokens, packed)
    return out.reshape(-1, out.shape[-1])[packed.rows]


@torch.no_grad()
def check_first_pair(
    adapter: ModelAdapter, preferred: Tensor, unpreferred: Tensor, prompt_mask: Tensor,
    pref_mask: Tensor | None, unpref_mask: Tensor | None,
) -> None:
    """The model's hidden states of the first pair, packed and unpacked (eval mode), must agree
    to float rounding; else raise with what differs.  Catches what no rule of the adapter's
    :meth:`~fastdpo.models.ModelAdapter.packing` names (token shift, say)."""
    one = slice(0, 1)
    masks = [m[one] if m is not None else None for m in (pref_mask, unpref_mask)]
    pk = pack(preferred[one], unpreferred[one], prompt_mask[one], *masks)
    src = torch.cat((preferred[one], unpreferred[one]))[:, :-1]
    with eval_mode(adapter.model):
        got = run(adapter, pk, hidden=True).float()
        want = adapter.hidden(src).float()
    real = torch.cat([m if m is not None else torch.ones_like(prompt_mask[one]) for m in masks])[:, :-1]
    err = ((got - want)[real].abs().max() / want[real].abs().max().clamp(min=1e-30)).item()
    tol = 1e-3 if want.dtype == torch.float32 and got.dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise ValueError(
            f"share_prompt=True but this model's hidden states change when a pair is packed "
            f"(relative difference {err:.3g} > {tol:g} on the first pair): a feature of the "
            f"model depends on where tokens sit in the sequence beyond their positions"
        )
