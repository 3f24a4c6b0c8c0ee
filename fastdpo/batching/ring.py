"""Ring attention over a packed layout whose slots are dealt to the processes of a group.

Dimensions: N processes, H heads, S = R*T slots of the packed rows, s = S/N slots a process, d head size.

Under sequence parallelism each process holds s slots of the packed layout
(:class:`fastdpo.batching.packing.PackedLayout`): process j the flat slots ``order[j*s:(j+1)*s]``.
DeepSpeed-Ulysses needs H divisible by N; :func:`ring_attention` is the fallback for any H.  Each
process keeps its queries while the key/value blocks go round the ring (Liu et al. 2023, "Ring
Attention with Blockwise Transformers"): at step i a process attends its queries to the block of
process ``rank - i`` and merges it into an online softmax (running max and sum, in float32 or
better), sending the block on to ``rank + 1`` while it computes.  The backward pass runs the ring
again (flash attention's backward: the probabilities recomputed from the saved log-sum-exp),
with each block's key and value gradients travelling along with it until they reach their owner.
A process skips the blocks its queries see nothing of (under a contiguous deal, the later
processes': causal) but passes them on.  No attention dropout.

Why not torch's ``context_parallel``: it shards SDPA along a fixed sequence dimension with a
plain causal mask; a packed row needs the packed mask (same pair, the prompt or the query's own
part, a window in unpacked positions: :func:`fastdpo.batching.attention.mask_mod`) over slots
dealt by an arbitrary permutation.

Cost per layer and process: forward N-1 steps of sending a K and a V block (2(N-1) block
transfers of s*H*d elements); backward N-1 steps of K and V plus N of their gradients in the
compute dtype (4N-2 transfers: twice the forward's bytes in float32, three times for bf16 inputs).
Memory: the forward saves q, k, v, the output (in the compute dtype) and the log-sum-exp (s*H*d
each, s*H); transient, one (H, s, s) score block and its probabilities, two K/V blocks (the one
in hand, the one arriving) and, in the backward, two gradient blocks: nothing of size S besides
the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .packing import PROMPT, PackedLayout


def visible(layout: PackedLayout, q_slots: Tensor, k_slots: Tensor, window: int | None) -> Tensor:
    """(len(q_slots), len(k_slots)) bool: which key slots each query slot may attend (flat slot
    indices): :func:`~fastdpo.batching.attention.mask_mod`'s mask, except that a padding slot
    sees nothing (its output is zero).  A pair lies in one row, so same pair and a key's flat index
    at most the query's is the same row and causal."""
    pair, seg, pos = (x.reshape(-1) for x in (layout.pair, layout.seg, layout.pos))
    pq, sq = pair[q_slots][:, None], seg[q_slots][:, None]
    pk, sk = pair[k_slots][None], seg[k_slots][None]
    ok = (k_slots[None] <= q_slots[:, None]) & (pk == pq) & (pq >= 0) & ((sk == PROMPT) | (sk == sq))
    if window is not None:
        ok = ok & (pos[q_slots][:, None] - pos[k_slots][None] < window)
    return ok


@dataclass(frozen=True, eq=False)
class _Ring:
    """What both passes need besides tensors: the layout, who holds which slots, the scale and
    window, and which blocks this process's queries see at all (``live``, by owner)."""

    layout: PackedLayout
    order: Tensor
    group: object
    rank: int
    n: int
    scale: float
    window: int | None
    live: tuple[bool, ...]

    def slots(self, owner: int) -> Tensor:
        s = self.order.shape[0] // self.n
        return self.order[owner * s:(owner + 1) * s]

    def mask(self, owner: int) -> Tensor | None:
        """This process's queries against ``owner``'s keys; None when they see none of them."""
        if not self.live[owner]:
            return None
        return visible(self.layout, self.slots(self.rank), self.slots(owner), self.window)

    def shift(self, send: Tensor, tag: int) -> tuple[Tensor, list]:
        """Start sending ``send`` to the next process and receiving the previous one's into a new
        tensor; returns it and the requests to wait on (alone in its group: ``send``, none)."""
        if self.n == 1:
            return send, []
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, group=self.group, group_peer=(self.rank + 1) % self.n, tag=tag),
               dist.P2POp(dist.irecv, recv, group=self.group, group_peer=(self.rank - 1) % self.n, tag=tag)]
        return recv, dist.batch_isend_irecv(ops)


def _live(layout: PackedLayout, order: Tensor, rank: int, n: int, window: int | None) -> tuple[bool, ...]:
    """Which processes' blocks this process's queries see anything of (one host sync a call, kept
    on the layout, which every layer of the call shares, for as long as ``order`` is the same)."""
    key = ("ring_live", window, rank, n)
    cached = layout.cache.get(key)
    if cached is None or cached[0] is not order:
        s = order.shape[0] // n
        mine = order[rank * s:(rank + 1) * s]
        flags = torch.stack([visible(layout, mine, order[j * s:(j + 1) * s], window).any() for j in range(n)])
        cached = layout.cache[key] = (order, tuple(flags.tolist()))
    return cached[1]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _scores(q: Tensor, kb: Tensor, mask: Tensor, scale: float) -> Tensor:
    """(H, s, s) scaled scores of a block, -inf where the mask hides the key."""
    return (q @ kb.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))


def _merge(m: Tensor, total: Tensor, o: Tensor, sc: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The online softmax's running max, sum of exp(score - max) and output, with one more
    block's scores ``sc`` and values ``vb``."""
    m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
    base = m_new.masked_fill(m_new == float("-inf"), 0.0)  # no key seen yet: exp(-inf - 0) = 0, not NaN
    p, rescale = torch.exp(sc - base), torch.exp(m - base)
    return m_new, total * rescale + p.sum(-1, keepdim=True), o * rescale + p @ vb


def _forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> tuple[Tensor, Tensor]:
    """The output (H, s, dv) and the log-sum-exp (H, s, 1) in the compute dtype, the lse +inf on a
    row that sees no key (so that exp(score - lse) is 0 there, masked scores included)."""
    acc, d = _compute_dtype(q), k.shape[-1]
    qf = q.to(acc)
    m = torch.full((*q.shape[:2], 1), float("-inf"), dtype=acc, device=q.device)
    total = torch.zeros_like(m)
    o = torch.zeros((*q.shape[:2], v.shape[-1]), dtype=acc, device=q.device)
    kv = torch.cat((k, v), -1)  # one message a step
    for step in range(ring.n):
        if step < ring.n - 1:
            arriving, reqs = ring.shift(kv, tag=0)
        mask = ring.mask((ring.rank - step) % ring.n)
        if mask is not None:
            kb, vb = kv.to(acc).split((d, v.shape[-1]), -1)
            m, total, o = _merge(m, total, o, _scores(qf, kb, mask, ring.scale), vb)
        if step < ring.n - 1:
            for r in reqs:
                r.wait()
            kv = arriving
    # total is 0 on a row that saw no key (o is 0 there too) and at least 1 elsewhere (its max's term)
    out = o / total.clamp_min(1.0)
    lse = torch.where(total > 0, m + total.log(), float("inf"))
    return out, lse


def _block_grads(qf: Tensor, do: Tensor, delta: Tensor, lse: Tensor, kv: Tensor, mask: Tensor,
                 ring: _Ring) -> tuple[Tensor, Tensor]:
    """One block's share of dq and its (dk, dv) as one (H, s, d + dv) tensor, the probabilities
    recomputed from the lse: ds = p * (dp - D)."""
    kb, vb = kv.to(qf.dtype).split((qf.shape[-1], kv.shape[-1] - qf.shape[-1]), -1)
    p = torch.exp(_scores(qf, kb, mask, ring.scale) - lse)
    ds = p * (do @ vb.transpose(-1, -2) - delta)
    return ds @ kb * ring.scale, torch.cat((ds.transpose(-1, -2) @ qf * ring.scale, p.transpose(-1, -2) @ do), -1)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              ring: _Ring) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (each in its input's dtype): dq accumulated here, each block's dk and dv
    accumulated as they travel with the block (in the compute dtype), the last hop taking them
    home; each process adds its share while the block's sum so far is on its way."""
    qf, do = q.to(_compute_dtype(q)), dout.to(_compute_dtype(q))
    delta = (do * out).sum(-1, keepdim=True)  # D = rowsum(dout * out)
    dq = torch.zeros_like(qf)
    kv = torch.cat((k, v), -1)
    grads, grad_reqs = None, []
    for step in range(ring.n):
        if step < ring.n - 1:
            arriving, reqs = ring.shift(kv, tag=0)
        mask = ring.mask((ring.rank - step) % ring.n)
        if mask is None:
            part = torch.zeros(kv.shape, dtype=qf.dtype, device=kv.device)
        else:
            dq_part, part = _block_grads(qf, do, delta, lse, kv, mask, ring)
            dq += dq_part
        for r in grad_reqs:
            r.wait()
        if grads is not None:  # the processes before this one's sum for this block
            part += grads
        grads, grad_reqs = ring.shift(part, tag=1)
        if step < ring.n - 1:
            for r in reqs:
                r.wait()
            kv = arriving
    for r in grad_reqs:
        r.wait()
    dk, dv = grads.split((k.shape[-1], v.shape[-1]), -1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> Tensor:
        out, lse = _forward(q[0], k[0], v[0], ring)
        # the output kept in float32 for half inputs: D = rowsum(dout * out) cancels in
        # ds = p * (dp - D), and a rounded output leaves the q and k gradients less accurate
        # than attention by parts in that dtype
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out[None].to(q.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout[0], q[0], k[0], v[0], out, lse, ctx.ring)
        return dq[None], dk[None], dv[None], None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, layout: PackedLayout, order: Tensor, group, scale: float,
                   window: int | None = None, dropout_p: float = 0.0) -> Tensor:
    """(1, H, s, dv) attention output of this process's slots of ``layout``, ``q, k, v``
    (1, H, s, d) (keys and values with as many heads as the queries), with every key slot of the
    group's processes that the packed mask lets each query see (see the module docstring);
    zeros at padding slots.

    ``order``: (S,) int64 permutation of the layout's R*T flat slots (row * T + column);
    process j of ``group`` holds ``order[j*s:(j+1)*s]``, s = S / N.  ``window``: a key is visible
    when ``pos(query) - pos(key) < window`` (unpacked positions).  Half precision computes in
    float32 and returns the input dtype.  Every process of the group must call it.
    """
    if dropout_p > 0:
        raise NotImplementedError(f"ring attention takes no attention dropout (dropout_p={dropout_p})")
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    slots = layout.tokens.numel()
    if order.shape != (slots,) or slots % n:
        raise ValueError(f"order: expected shape ({slots},) (the layout's R*T slots), divisible by the "
                         f"{n} processes, got {tuple(order.shape)}")
    expected = (1, q.shape[1], slots // n)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or tuple(x.shape[:3]) != expected:
            raise ValueError(f"{name}: expected shape (1, H, s, d) with (1, H, s) = {expected}, got {tuple(x.shape)}")
    ring = _Ring(layout, order, group, rank, n, scale, window, _live(layout, order, rank, n, window))
    return _RingAttention.apply(q, k, v, ring)
