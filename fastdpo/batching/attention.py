"""Attention over packed pairs that skips what the packed mask hides.

Dimensions: R packed rows, H heads, T slots a row, d head size.

In a packed row (:class:`fastdpo.batching.packing.PackedLayout`) each pair sits as ``[prompt, chosen,
rejected]``: the prompt and the chosen completion attend ``[prompt, chosen]`` causally, the
rejected completion attends ``[prompt, rejected]`` causally (its diagonal shifted by the
prompt: lower-right aligned), and nothing attends another pair.  A dense (R, 1, T, T) mask pays
for every hidden block; :class:`SegmentAttention` computes only the visible ones:

* on the CPU, causal ``scaled_dot_product_attention`` over the parts (``[prompt, chosen]``, and
  ``[prompt, rejected]`` with its prompt rows dropped), grouped by size and padded to their
  group's longest: no mask, so torch's memory-efficient kernel runs (torch 2.13's
  FlexAttention has no backward on the CPU; the calls' overhead dominates small parts:
  docs/performance.md, "Packed batches");
* on CUDA, FlexAttention with a block mask built once per packed call (compiled once per
  process), which skips the blocks the mask hides.

An optional sliding window is measured in unpacked positions, as the model defines it: a key
is visible when ``pos(query) - pos(key) < window``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import PAD, PROMPT, PackedLayout


class SegmentAttention:
    """Attention of the packed ``layout``'s rows, by parts (see the module docstring)."""

    def __init__(self, layout: PackedLayout):
        self.layout = layout

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float = 0.0,
                 window: int | None = None) -> Tensor:
        """(R, H, T, d) attention output of ``q, k, v`` (R, H, T, d) (keys and values with as
        many heads as the queries); zeros at padding slots."""
        if q.device.type == "cuda" and dropout_p == 0.0:
            return self._flex(q, k, v, scale, window)
        # Half precision in float32: a prompt's key and value gradients are sums over two parts,
        # which half precision would round once more than one masked product does.
        dtype = q.dtype
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        return self._parts(q, k, v, scale, dropout_p, window).to(dtype)

    def _parts(self, q, k, v, scale, dropout_p, window) -> Tensor:
        r, h, t, _ = q.shape
        flat = [x.transpose(1, 2).reshape(r * t, h, x.shape[-1]) for x in (q, k, v)]
        out = q.new_zeros(r * t, h, v.shape[-1])
        for group in self._groups():
            n, lk = group.keys.shape
            qg, kg, vg = (x.index_select(0, group.keys.view(-1)).view(n, lk, h, x.shape[-1]).transpose(1, 2)
                          for x in flat)
            mask = group.mask(window)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                dropout_p=dropout_p)
            og = og.transpose(1, 2).reshape(n * lk, h, -1)
            out = out.index_copy(0, group.slots, og.index_select(0, group.real))
        return out.view(r, t, h, -1).transpose(1, 2)

    def _groups(self) -> list[_Group]:
        """The parts of every pair -- ``[prompt, chosen]`` and ``[prompt, rejected]``, each
        attending itself causally (the second's prompt rows are computed again and dropped: the
        prompt's outputs are the first part's) -- in groups of similar length, each padded at
        its end to its longest part: one causal attention call a group, no mask (so SDPA's
        memory-efficient kernel runs; a sliding window adds one (L, L) mask a group), padding
        at most ~30% more query-key pairs than the parts hold."""
        plan = self.layout.cache.get("parts")
        if plan is None:
            parts = []  # (slots as flat (R*T) indices, the first row whose output is kept)
            t = self.layout.length
            for s in self.layout.spans:
                o = s.row * t + s.start
                a, e = o + s.prompt + s.chosen, o + s.length
                if a > o:
                    parts.append(([*range(o, a)], 0))
                if e > a:
                    parts.append(([*range(o, o + s.prompt), *range(a, e)], s.prompt))
            parts.sort(key=lambda p: -len(p[0]))
            groups, current, area = [], [], 0
            for part in parts:
                size = len(part[0]) ** 2
                if current and (len(current) + 1) * len(current[0][0]) ** 2 > 1.3 * (area + size):
                    groups.append(current)
                    current, area = [], 0
                current.append(part)
                area += size
            if current:
                groups.append(current)
            plan = self.layout.cache["parts"] = [_Group(g, self.layout.tokens.device) for g in groups]
        return plan

    def _flex(self, q, k, v, scale, window) -> Tensor:
        key = ("block_mask", window)
        if key not in self.layout.cache:
            self.layout.cache[key] = block_mask(self.layout, window, q.device)
        out = _compiled_flex()(q, k, v, block_mask=self.layout.cache[key], scale=scale)
        return out.masked_fill((self.layout.seg == PAD)[:, None, :, None], 0.0)


class _Group:
    """Parts padded at their end to the group's longest: ``keys`` (n, L) flat slot indices (the
    queries are the same slots; padding: slot 0), ``slots``/``real``: where the kept rows'
    outputs go, and where they are among the (n * L) rows."""

    def __init__(self, parts, device):
        n, length = len(parts), max(len(p[0]) for p in parts)
        keys = torch.zeros(n, length, dtype=torch.long)
        kept = torch.zeros(n, length, dtype=torch.bool)
        for i, (slots, first) in enumerate(parts):
            keys[i, : len(slots)] = torch.tensor(slots)
            kept[i, first: len(slots)] = True
        self.keys = keys.to(device)
        self.slots = keys[kept].to(device)
        self.real = kept.reshape(-1).nonzero().squeeze(1).to(device)
        self._masks: dict = {}

    def mask(self, window: int | None) -> Tensor | None:
        """None (causal, ``is_causal``) without a window; else the (L, L) bool mask causal within
        the window (a part's slots are consecutive positions of its unpacked sequence)."""
        if window is None:
            return None
        if window not in self._masks:
            i = torch.arange(self.keys.shape[1], device=self.keys.device)
            back = i[:, None] - i[None, :]
            self._masks[window] = (back >= 0) & (back < window)
        return self._masks[window]


def mask_mod(layout: PackedLayout, window: int | None = None):
    """The packed mask as a FlexAttention ``mask_mod``: causal, same pair, the prompt or the
    query's own part, within the window; a padding slot sees itself and the slots before it."""
    pair, seg, pos = layout.pair, layout.seg, layout.pos

    def visible(b, h, qi, ki):
        seg_q, seg_k = seg[b, qi], seg[b, ki]
        ok = (qi >= ki) & (pair[b, qi] == pair[b, ki]) & ((seg_k == PROMPT) | (seg_k == seg_q))
        if window is not None:
            ok = ok & (pos[b, qi] - pos[b, ki] < window)
        return ok | ((seg_q == PAD) & (qi >= ki))

    return visible


def block_mask(layout: PackedLayout, window: int | None, device):
    """FlexAttention's block mask of ``layout`` (its blocks that the mask hides are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    r, t = layout.tokens.shape
    return create_block_mask(mask_mod(layout, window), r, None, t, t, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)
