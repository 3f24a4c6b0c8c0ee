"""fastdpo.batching.attention: attention by parts of a packed layout equals attention with the dense
packed mask (float64), with and without a sliding window; the FlexAttention mask that the CUDA
path uses gives the same (checked on the CPU forward: FlexAttention has no CPU backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdpo.batching.attention import SegmentAttention, block_mask
from fastdpo.batching.packing import PAD, pack

V, L = 50, 12


def _layout(layout: str, pack_length=None):
    g = torch.Generator().manual_seed(0)
    b = 4
    pref, unpref = torch.randint(1, V, (b, L), generator=g), torch.randint(1, V, (b, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[3], [1], [5], [2]])
    unpref[pm] = pref[pm]
    pref[1, 6:] = 0
    unpref[2, 8:] = 0
    pref[3, 2:] = 0  # an empty chosen completion
    return pack(pref, unpref, pm, pref != 0, unpref != 0, layout=layout, pack_length=pack_length)


def _dense(layout, q, k, v, window, scale):
    t = layout.length
    allowed = layout.attn_mask & torch.ones(t, t, dtype=torch.bool).tril()
    if window is not None:
        allowed = allowed & ((layout.pos[:, :, None] - layout.pos[:, None, :]) < window)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("layout, pack_length", [("pair", None), ("batch", None), ("batch", 60)])
def test_parts_equal_the_dense_mask(layout, pack_length, window):
    pk = _layout(layout, pack_length)
    r, t = pk.tokens.shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(r, 3, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    real = (pk.seg != PAD)[:, None, :, None]
    got = SegmentAttention(pk)(q, k, v, scale=0.3, window=window)
    want = _dense(pk, q, k, v, window, 0.3)
    torch.testing.assert_close(got * real, want * real, rtol=0, atol=1e-12)
    assert torch.equal(got * ~real, torch.zeros_like(got))
    up = torch.randn(got.shape, generator=g, dtype=torch.float64) * real
    ga = torch.autograd.grad((got * up).sum(), (q, k, v))
    gb = torch.autograd.grad((want * up).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("layout", ["pair", "batch"])
def test_flex_block_mask_equals_the_dense_mask(layout, window):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    pk = _layout(layout, 60 if layout == "batch" else None)
    r, t = pk.tokens.shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(r, 2, t, 8, generator=g) for _ in range(3))
    real = (pk.seg != PAD)[:, None, :, None]
    with torch.no_grad():
        got = flex.flex_attention(q, k, v, block_mask=block_mask(pk, window, "cpu"), scale=0.3)
    torch.testing.assert_close(got * real, _dense(pk, q, k, v, window, 0.3) * real, rtol=1e-5, atol=1e-6)
