"""Packed preference batches: the layout (Wang & Hegde 2024, "Accelerating Direct Preference
Optimization with Prefix Sharing"; padding-free packing as in ms-swift).

A pair ``(prompt + chosen, prompt + rejected)`` runs through a model as one sequence
``[prompt, chosen completion, rejected completion]``: the rejected completion's positions
restart after the prompt, and the attention hides the chosen completion from it.  With a
causal model whose positions come from the positions it is given, every token then sees
exactly what it sees in its own unpacked sequence, so the hidden states -- and the scores --
are the unpacked ones (to float rounding), while the prompt runs once instead of twice.
Layouts (:data:`LAYOUTS`): ``"pair"`` puts each pair in a row of its own; ``"batch"`` places
whole pairs first-fit (longest first) into as few rows as fit, so no padding runs either.

This module only builds the layout (:func:`pack`; tensors, no model): a model's adapter
(:mod:`fastdpo.models`) runs it, attending by parts (:mod:`fastdpo.batching.attention`) or through the
dense mask (:meth:`PackedLayout.additive_mask`), and :mod:`fastdpo.scoring.router` gathers the hidden states
of the unpacked rows back (:attr:`PackedLayout.rows`), which are then scored as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
LAYOUTS = ("pair", "batch")  # one pair a row; whole pairs first-fit into rows
ATTENTIONS = ("segments", "dense")


@dataclass(frozen=True)
class Span:
    """Where one pair sits in the packed rows: ``[prompt, chosen, rejected]`` from ``start``."""

    pair: int
    row: int
    start: int
    prompt: int
    chosen: int  # completion tokens of the chosen sequence (its real tokens past the prompt)
    rejected: int

    @property
    def length(self) -> int:
        return self.prompt + self.chosen + self.rejected


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """B pairs packed into R rows of T slots, each pair as ``[prompt, chosen completion,
    rejected completion]``; the slots after a row's last pair are padding."""

    tokens: Tensor  # (R, T) token ids
    pos: Tensor  # (R, T) each token's position in its unpacked sequence (0 at padding)
    seg: Tensor  # (R, T) PROMPT, CHOSEN, REJECTED or PAD
    pair: Tensor  # (R, T) the pair a slot belongs to, -1 at padding
    rows: Tensor  # (2B, L-1) index into the (R*T) slots of each unpacked input position
    spans: tuple[Span, ...]  # every pair's place, by row then start (host ints)
    attention: str = "dense"  # how the models attend within it: ATTENTIONS
    # What attention derives from the layout once, for every layer of both models (fastdpo.batching.attention)
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        """T, the slots per row."""
        return self.tokens.shape[1]

    @property
    def real_tokens(self) -> int:
        """The slots that hold a token of some pair (every prompt once)."""
        return sum(s.length for s in self.spans)

    @property
    def attn_mask(self) -> Tensor:
        """(R, 1, T, T) bool, True where a token may attend (causality not in it): its own
        pair's prompt and its own part; a padding slot may attend anything (its output is never
        read, and no row of the mask is empty)."""
        same = self.pair[:, :, None] == self.pair[:, None, :]
        seg_i, seg_j = self.seg[:, :, None], self.seg[:, None, :]
        return ((same & ((seg_j == PROMPT) | (seg_j == seg_i))) | (seg_i == PAD))[:, None]

    def additive_mask(self, dtype: torch.dtype) -> Tensor:
        """The mask with causality in it, as a (R, 1, T, T) additive bias: 0 where a token may
        attend, the dtype's lowest value where it may not (how both families take it)."""
        t, device = self.length, self.tokens.device
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        bias = torch.zeros((self.tokens.shape[0], 1, t, t), dtype=dtype, device=device)
        return bias.masked_fill_(~(self.attn_mask & causal), torch.finfo(dtype).min)


def _place(lengths: list[int], layout: str, capacity: int | None) -> tuple[list[tuple[int, int]], int]:
    """(row, start) of each pair and the row length T: one pair a row in order ("pair"), or
    whole pairs first-fit in decreasing length into rows of ``capacity`` slots ("batch";
    default: the longest pair, so no row is longer than the longest pair; a pair longer than
    ``capacity`` gets a row of its own, as long as the pair)."""
    if layout == "pair":
        return [(i, 0) for i in range(len(lengths))], max(lengths)
    capacity = max(lengths) if capacity is None else capacity
    fill: list[int] = []
    where = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used and used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        where[i] = (row, fill[row])
        fill[row] += lengths[i]
    return where, max(fill)


def pair_lengths(
    preferred: Tensor, unpreferred: Tensor, prompt_mask: Tensor, pref_mask: Tensor | None,
    unpref_mask: Tensor | None,
) -> tuple[list[int], list[int], list[int]]:
    """Each pair's prompt length and its two sequences' real lengths, on the host (the one host
    sync of a packed step), after checking that the pairs can pack: each row's prompt is a
    prefix (True then False), of real tokens, equal in both sequences of the pair; the sequence
    masks are right padding.  Raises ``ValueError`` naming the first bad pair."""
    b, n = preferred.shape
    ar = torch.arange(n, device=preferred.device)
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
    stats = torch.cat((bad.any(1), p, wlen, llen)).tolist()
    reasons = (
        "its prompt_mask is not a prefix (True on the first positions, then False)",
        "its sequence masks are not right padding",
        "its prompt includes padding",
        "its preferred and unpreferred prompts differ",
    )
    for k, why in enumerate(reasons):
        if stats[k]:
            row = int(bad[k].nonzero()[0])
            raise ValueError(f"packing cannot pack pair {row}: {why}")
    return stats[4:4 + b], stats[4 + b:4 + 2 * b], stats[4 + 2 * b:]


def pack(
    preferred: Tensor, unpreferred: Tensor, prompt_mask: Tensor, pref_mask: Tensor | None,
    unpref_mask: Tensor | None, pad_token: int = 0, *, layout: str = "pair", pack_length: int | None = None,
    attention: str = "dense", lengths: tuple[list[int], list[int], list[int]] | None = None,
) -> PackedLayout:
    """Pack B pairs (each (B, L), right padded, prompt first) in ``layout`` (:data:`LAYOUTS`),
    for models to attend within it as ``attention`` says (:data:`ATTENTIONS`).

    ``lengths``: what :func:`pair_lengths` returned for these pairs (it checks them; computed
    here when not given).
    """
    b, n = preferred.shape
    device = preferred.device
    p_h, w_h, l_h = lengths if lengths is not None else pair_lengths(preferred, unpreferred, prompt_mask, pref_mask, unpref_mask)
    lengths = [w + l - q for q, w, l in zip(p_h, w_h, l_h)]
    where, t_len = _place(lengths, layout, pack_length)
    n_rows = max(r for r, _ in where) + 1
    spans = tuple(sorted(
        (Span(i, r, o, p_h[i], w_h[i] - p_h[i], l_h[i] - p_h[i]) for i, (r, o) in enumerate(where)),
        key=lambda s: (s.row, s.start),
    ))

    # Every real slot, pair by pair: its pair, its index k within the pair's [prompt, chosen,
    # rejected], and where it goes in the flat (R*T) rows.
    start = torch.tensor([r * t_len + o for r, o in where], device=device)
    size = torch.tensor(lengths, device=device)
    p, wlen = torch.tensor(p_h, device=device), torch.tensor(w_h, device=device)
    llen = torch.tensor(l_h, device=device)
    total = sum(lengths)
    owner = torch.repeat_interleave(torch.arange(b, device=device), size, output_size=total)
    k = torch.arange(total, device=device) - (torch.cumsum(size, 0) - size)[owner]
    pk, wk = p[owner], wlen[owner]
    rejected = k >= wk
    seg = torch.where(rejected, REJECTED, torch.where(k >= pk, CHOSEN, PROMPT))
    # position in its unpacked sequence: its index in the chosen part, shifted back by the chosen
    # completion's length in the rejected part
    pos = torch.where(rejected, k - wk + pk, k)
    token = torch.where(rejected, unpreferred[owner, pos.clamp(max=n - 1)], preferred[owner, k.clamp(max=n - 1)])
    dest = start[owner] + k
    slots = n_rows * t_len

    def scatter(values: Tensor, fill: int) -> Tensor:
        out = torch.full((slots,), fill, dtype=values.dtype, device=device)
        return out.index_copy_(0, dest, values).view(n_rows, t_len)

    # rows: where each unpacked input position j (0..L-2) of each sequence lives in the pack;
    # positions past a sequence's end (never scored) point at its pair's first slot
    j = torch.arange(n - 1, device=device)[None]
    base = start[:, None]
    pc, wc, lc = p[:, None], wlen[:, None], llen[:, None]
    chosen_rows = torch.where(j < wc, j, 0) + base
    rejected_rows = torch.where(j < lc, torch.where(j < pc, j, j - pc + wc), 0) + base
    return PackedLayout(
        scatter(token, pad_token), scatter(pos, 0), scatter(seg, PAD), scatter(owner, -1),
        torch.cat((chosen_rows, rejected_rows)), spans, attention,
    )


# ----------------------------------------------------------------------------- when packing pays

# packing="auto" packs a batch (layout "batch") when the predicted packed/unpacked time,
#     tokens packed / tokens padded + PACK_OVERHEAD / (mean packed pair length),
# is at most PACK_WHEN.  The first term is what packing saves (padding, repeated prompts: the
# bodies' work scales with tokens); the second its fixed costs per pair (the layout's host sync
# and index building, the gathers, one attention call per group of parts per layer), in tokens
# of a pair.  Fitted on the CPU with small models (dim 32-64, where the fixed costs weigh most:
# 16-20 tokens a pair; docs/performance.md, "Packed batches"); larger models pay less, and
# attention by parts often saves more than its token share, so the rule errs towards not
# packing.  PACK_WHEN leaves a margin for timing noise: a batch it packs runs faster packed.
PACK_OVERHEAD = 20.0
PACK_WHEN = 0.95


def choose_layout(shape: tuple[int, int], lengths, attention: str, device: torch.device) -> str:
    """``"batch"`` when packing a batch of ``shape`` (B, L) pays (the rule above), else
    ``"none"``; ``"none"`` too for a batch that cannot pack (``lengths`` None).  ``lengths``:
    the (prompt, chosen, rejected) host lists of :func:`pair_lengths`."""
    if lengths is None:
        return "none"
    b, l = shape
    packed = sum(w + r - p for p, w, r in zip(*lengths))
    predicted = packed / (2 * b * l) + PACK_OVERHEAD * b / max(packed, 1)
    return "batch" if predicted <= PACK_WHEN else "none"
