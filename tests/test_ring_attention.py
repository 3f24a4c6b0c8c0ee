"""fastdpo.batching.ring: ring attention over a packed layout dealt to 2 and 3 CPU processes (gloo)
equals one process attending by parts (and the dense packed mask) on the whole layout, forward
and backward, with and without a window, for a random and a contiguous deal of the slots; in
half precision it is as accurate as attention by parts in that dtype; a group whose ranks are
not the global ones (and a ring of one) works too.

One job per world size (spawned, MASTER_ADDR=127.0.0.1 and a free port, bounded by a timeout)
runs every case and saves each rank's output and gradients; the tests gather them back into the
(R, H, T, d) layout and compare.  H = 3 heads: not divisible by 2, the case ring attention is for.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawned_job
from torch import Tensor

from fastdpo.batching.attention import SegmentAttention
from fastdpo.batching.packing import PAD, PackedLayout, pack
from fastdpo.batching.ring import ring_attention

H, D, SCALE = 3, 4, 0.7
WORLDS = (2, 3)
TIMEOUT_S = 120  # three fresh interpreters importing fastdpo on a shared 2-core machine
# (layout, order, dtype, window): "row" is one row of three pairs, one longer than a process's
# share of 2 or 3; "rows" four rows with padding at their ends, one pair's chosen completion empty
CASES = [(lay, order, dtype, window) for lay, order in itertools.product(("row", "rows"), ("random", "contiguous"))
         for dtype, window in ((torch.float64, None), (torch.float32, None), (torch.float64, 3))]
CASES += [("rows", "random", torch.bfloat16, None), ("row", "contiguous", torch.float16, 3)]
HALF = (torch.bfloat16, torch.float16)
# Error to the float64 truth: output max-relative, gradients norm-relative; half precision: what
# attention by parts in that dtype errs, plus this (eps / 16)
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5), torch.bfloat16: (5e-4, 5e-4),
       torch.float16: (6e-5, 6e-5)}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def make_layout(kind: str, n: int) -> PackedLayout:
    """Pairs of odd and even (prompt, chosen, rejected) lengths, right padded to L, packed
    layout="batch", then padding columns until the R*T slots divide among ``n`` processes."""
    lengths = {"row": [(3, 19, 18), (2, 7, 6), (1, 5, 4)],  # 34 + 11 + 8 slots in a row of 53 or 54
               "rows": [(2, 9, 7), (1, 6, 8), (3, 5, 9), (4, 11, 6), (1, 3, 2), (2, 2, 5)]}[kind]
    b, length = len(lengths), 20
    g = torch.Generator().manual_seed(5)
    pref, unpref = torch.randint(1, 50, (b, length), generator=g), torch.randint(1, 50, (b, length), generator=g)
    ar = torch.arange(length)[None]
    p, w, r = (torch.tensor([x[i] for x in lengths])[:, None] for i in range(3))
    unpref = torch.where(ar < p, pref, unpref)
    pref, unpref = pref * (ar < w), unpref * (ar < r)
    pk = pack(pref, unpref, ar < p, ar < w, ar < r, layout="batch", pack_length=60 if kind == "row" else 20)
    rows, t = pk.tokens.shape
    wide = next(x for x in itertools.count(t) if rows * x % n == 0)

    def pad(x: Tensor, value: int) -> Tensor:
        return F.pad(x, (0, wide - t), value=value)

    return PackedLayout(pad(pk.tokens, 0), pad(pk.pos, 0), pad(pk.seg, PAD), pad(pk.pair, -1),
                        pk.rows // t * wide + pk.rows % t, pk.spans)


def make_order(kind: str, slots: int, n: int) -> Tensor:
    """A random deal (seeded; each process's slots ascending) or the contiguous one."""
    if kind == "contiguous":
        return torch.arange(slots)
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(7))
    return perm.view(n, -1).sort(1).values.reshape(-1)


def make_inputs(layout: PackedLayout, index: int) -> tuple[Tensor, ...]:
    """q, k, v and the upstream gradient, (R, H, T, d) float64, seeded by the case."""
    g = torch.Generator().manual_seed(100 + index)
    r, t = layout.tokens.shape
    return tuple(torch.randn(r, H, t, D, generator=g, dtype=torch.float64) for _ in range(4))


def local(x: Tensor, order: Tensor, rank: int, n: int) -> Tensor:
    """(1, H, s, d): process ``rank``'s slots of a (R, H, T, d) tensor."""
    flat = x.transpose(1, 2).reshape(-1, *x.shape[1::2])
    s = flat.shape[0] // n
    return flat[order[rank * s:(rank + 1) * s]].transpose(0, 1)[None].contiguous()


def gather(parts: list[Tensor], order: Tensor, shape) -> Tensor:
    """The (R, H, T, d) tensor whose slots the processes hold as ``parts`` (each (1, H, s, d))."""
    r, h, t, d = shape
    flat = torch.zeros(r * t, h, d, dtype=torch.float64)
    flat[order] = torch.cat([p[0].transpose(0, 1).double() for p in parts])
    return flat.view(r, t, h, d).transpose(1, 2)


# ----------------------------------------------------------------------------- the worker


def _run_case(i: int, group) -> dict:
    """Case ``i`` on this process's slots in ``group``: the output, the q, k, v gradients of
    (out * g).sum(), whether a second call gives the same bits, the block flags it cached."""
    lay, kind, dtype, window = CASES[i]
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    layout = make_layout(lay, n)
    order = make_order(kind, layout.tokens.numel(), n)
    q, k, v, g = (local(x, order, rank, n).to(dtype) for x in make_inputs(layout, i))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ring_attention(q, k, v, layout=layout, order=order, group=group, scale=SCALE, window=window)
    again = ring_attention(q, k, v, layout=layout, order=order, group=group, scale=SCALE, window=window)
    (out * g).sum().backward()
    return {"out": out.detach(), "grads": [x.grad for x in (q, k, v)], "again": torch.equal(out, again),
            "live": layout.cache[("ring_live", window, rank, n)][1]}


def _worker(rank: int, n: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # n processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=n)
    results: dict = {}
    try:
        for i in range(len(CASES)):
            results[i] = _run_case(i, None)
        # a group whose ranks are not the global ones: global ranks 1.. as group ranks 0..
        sub = dist.new_group(list(range(1, n)))
        if rank > 0:
            results["sub"] = _run_case(0, sub)
        q = torch.zeros(1, H, 1, D)
        try:
            ring_attention(q, q, q, layout=make_layout("rows", n), order=torch.arange(5), group=None, scale=SCALE)
        except ValueError as e:
            results["bad_order"] = str(e)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=lambda n: f"{n}proc")
def job(request, tmp_path_factory):
    """Run the n-process job once; return (n, each rank's results)."""
    n = request.param
    return n, list(spawned_job(_worker, n, tmp_path_factory.mktemp(f"ring{n}"), TIMEOUT_S))


# ----------------------------------------------------------------------------- the references


def reference(layout: PackedLayout, q: Tensor, k: Tensor, v: Tensor, g: Tensor, window, dense: bool = False):
    """One process on the whole layout in float64: the output and the gradients of (out * g).sum()."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    if dense:
        bias = layout.additive_mask(torch.float64)
        if window is not None:
            far = (layout.pos[:, :, None] - layout.pos[:, None, :] >= window)[:, None]
            bias = bias.masked_fill(far, torch.finfo(torch.float64).min)
        out = torch.softmax(q @ k.transpose(-1, -2) * SCALE + bias, -1) @ v
        out = out * (layout.seg != PAD)[:, None, :, None]
    else:
        out = SegmentAttention(layout)(q, k, v, scale=SCALE, window=window)
    return out.detach(), torch.autograd.grad((out * g).sum(), (q, k, v))


def max_rel(got: Tensor, want: Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def norm_rel(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("i", range(len(CASES)), ids=["-".join(map(str, c)).replace("torch.", "") for c in CASES])
def test_ring_equals_one_process(job, i):
    """Output and q, k, v gradients gathered from every rank equal attention by parts on the
    whole layout in float64 (which equals the dense mask); in half precision they are as close
    to it as attention by parts in that dtype is.  Padding slots output exactly zero; no NaN;
    a second call (the block flags cached on the layout) gives the same bits; under a contiguous
    deal a process skips the blocks of the processes after it (causal)."""
    n, ranks = job
    lay, kind, dtype, window = CASES[i]
    layout = make_layout(lay, n)
    order = make_order(kind, layout.tokens.numel(), n)
    q, k, v, g = (x.to(dtype) for x in make_inputs(layout, i))  # the inputs the ranks had, exactly
    want, want_grads = reference(layout, q, k, v, g, window)
    dense, dense_grads = reference(layout, q, k, v, g, window, dense=True)
    assert max_rel(dense, want) < 1e-12 and all(norm_rel(a, b) < 1e-12 for a, b in zip(dense_grads, want_grads))

    got = gather([r[i]["out"] for r in ranks], order, want.shape)
    out_tol, grad_tol = TOL[dtype]
    grad_tols = [grad_tol] * 3
    if dtype in HALF:
        qh, kh, vh = (x.requires_grad_() for x in (q, k, v))
        same = SegmentAttention(layout)(qh, kh, vh, scale=SCALE, window=window)
        out_tol += max_rel(same.double(), want)
        same_grads = torch.autograd.grad((same * g).sum(), (qh, kh, vh))
        grad_tols = [grad_tol + norm_rel(a.double(), b) for a, b in zip(same_grads, want_grads)]
    assert all(r[i]["out"].dtype == dtype and r[i]["again"] for r in ranks)
    if kind == "contiguous":
        assert all(r[i]["live"][rank] and not any(r[i]["live"][rank + 1:]) for rank, r in enumerate(ranks))
    assert torch.isfinite(got).all()
    assert max_rel(got, want) < out_tol, max_rel(got, want)
    pad = (layout.seg == PAD)[:, None, :, None].expand_as(got)
    assert pad.any() and (got[pad] == 0).all()
    for j, name in enumerate("qkv"):
        grad = gather([r[i]["grads"][j] for r in ranks], order, want.shape)
        assert torch.isfinite(grad).all(), name
        assert grad.dtype == torch.float64 and ranks[0][i]["grads"][j].dtype == dtype
        assert norm_rel(grad, want_grads[j]) < grad_tols[j], (name, norm_rel(grad, want_grads[j]))


def test_a_subgroup_ring(job):
    """The ring's peers are ranks in its group: the global ranks 1.. of the job as a group of
    n - 1 (a ring of one in the 2-process job) give the whole layout's attention."""
    n, ranks = job
    lay, kind, dtype, window = CASES[0]
    layout = make_layout(lay, n - 1)
    order = make_order(kind, layout.tokens.numel(), n - 1)
    want, want_grads = reference(layout, *make_inputs(layout, 0), window)
    got = [r["sub"] for r in ranks[1:]]
    assert max_rel(gather([r["out"] for r in got], order, want.shape), want) < TOL[dtype][0]
    for j in range(3):
        assert norm_rel(gather([r["grads"][j] for r in got], order, want.shape), want_grads[j]) < TOL[dtype][1]


def test_a_bad_order_is_refused(job):
    assert all("order: expected shape" in r["bad_order"] for r in job[1])


def test_dropout_is_refused():
    layout = make_layout("rows", 2)
    q = torch.randn(1, H, layout.tokens.numel() // 2, D)
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        ring_attention(q, q, q, layout=layout, order=torch.arange(layout.tokens.numel()), group=None,
                       scale=SCALE, dropout_p=0.1)
