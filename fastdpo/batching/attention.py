"""Attention over packed pairs that skips what the packed mask hides.

Dimensions: R packed rows, H heads, T slots a row, d head size.

In a packed row (:class:`fastdpo.batching.packing.PackedLayout`) each pair sits as ``[prompt, chosen,
rejected]``: the prompt and the chosen completion attend ``[prompt, chosen]`` causally, the
rejected completion attends ``[prompt, rejected]`` causally (its diagonal shifted by the
prompt: lower-right aligned), and nothing attends another pair.  A dense (R, 1, T, T) mask pays
for every hidden block; :class:`SegmentAttention` computes only the visible ones:

* on the CPU, ``scaled_dot_product_attention`` over the parts, grouped by size and padded
  to their group's longest (torch 2.13's FlexAttention has no backward on the CPU; one call per
  part costs less than one call with a dense mask, but the calls' overhead dominates small
  parts: docs/performance.md, "Packed batches");
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
        r, h, t, d = q.shape
        flat = [x.transpose(1, 2).reshape(r * t, h, x.shape[-1]) for x in (q, k, v)]
        out = q.new_zeros(r * t, h, v.shape[-1])
        for group in self._groups():
            n, lq, lk = group.queries.shape[0], group.queries.shape[1], group.keys.shape[1]
            qg = flat[0].index_select(0, group.queries.view(-1)).view(n, lq, h, d).transpose(1, 2)
            kg, vg = (x.index_select(0, group.keys.view(-1)).view(n, lk, h, x.shape[-1]).transpose(1, 2)
                      for x in flat[1:])
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask(window), scale=scale, dropout_p=dropout_p)
            og = og.transpose(1, 2).reshape(n * lq, h, -1)
            out = out.index_copy(0, group.slots, og.index_select(0, group.real))
        return out.view(r, t, h, -1).transpose(1, 2)

    def _groups(self) -> list[_Group]:
        """The parts of every pair -- ``[prompt, chosen]`` attending itself, the rejected part
        attending ``[prompt, rejected]`` -- in groups of similar size, each group padded to its
        longest part: one attention call a group, padding in attention only (at most ~30% more
        query-key pairs than the parts hold)."""
        plan = self.layout.cache.get("parts")
        if plan is None:
            parts = []  # (query slots, key slots) as flat (R*T) indices
            t = self.layout.length
            for s in self.layout.spans:
                o = s.row * t + s.start
                a, e = o + s.prompt + s.chosen, o + s.length
                if a > o:
                    parts.append((range(o, a), range(o, a)))
                if e > a:
                    parts.append((range(a, e), [*range(o, o + s.prompt), *range(a, e)]))
            parts.sort(key=lambda p: -len(p[1]))
            groups, current, area, lq = [], [], 0, 0
            for part in parts:
                size = len(part[0]) * len(part[1])
                longest_q = max(lq, len(part[0]))  # keys come longest first: current[0]'s are the longest
                if current and (len(current) + 1) * longest_q * len(current[0][1]) > 1.3 * (area + size):
                    groups.append(current)
                    current, area, longest_q = [], 0, len(part[0])
                current.append(part)
                area, lq = area + size, longest_q
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
    """Parts padded to the group's longest: ``queries`` (n, Lq) and ``keys`` (n, Lk) flat slot
    indices (padding: slot 0), ``slots``/``real``: where the real queries' outputs go."""

    def __init__(self, parts, device):
        n = len(parts)
        lq, lk = max(len(p[0]) for p in parts), max(len(p[1]) for p in parts)
        queries = torch.zeros(n, lq, dtype=torch.long)
        keys = torch.zeros(n, lk, dtype=torch.long)
        n_q, n_k = torch.tensor([len(p[0]) for p in parts]), torch.tensor([len(p[1]) for p in parts])
        for i, (qs, ks) in enumerate(parts):
            queries[i, : len(qs)] = torch.tensor(qs)
            keys[i, : len(ks)] = torch.tensor(ks)
        real = torch.arange(lq)[None] < n_q[:, None]
        self.queries, self.keys = queries.to(device), keys.to(device)
        self.slots = queries[real].to(device)
        self.real = real.reshape(-1).nonzero().squeeze(1).to(device)
        # query i of a part sits at position i + (n_k - n_q) among its keys (lower-right causal)
        self._qpos = (torch.arange(lq)[None] + (n_k - n_q)[:, None]).to(device)
        self._n_k, self._valid_q = n_k.to(device), real.to(device)
        self._masks: dict = {}

    def mask(self, window: int | None) -> Tensor:
        """(n, 1, Lq, Lk) bool: causal within the part (and the window), its own keys only; a
        padding query sees key 0 (its output is dropped; no row of the mask is empty)."""
        if window not in self._masks:
            lk = self.keys.shape[1]
            j = torch.arange(lk, device=self.keys.device)[None, None]
            qpos = self._qpos[:, :, None]
            ok = (j <= qpos) & (j < self._n_k[:, None, None])
            if window is not None:
                ok = ok & (qpos - j < window)
            ok = ok | (~self._valid_q[:, :, None] & (j == 0))
            self._masks[window] = ok[:, None]
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
