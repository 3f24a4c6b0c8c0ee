"""Sequence parallelism: the slots of packed rows dealt to the processes of a group.

Dimensions: R packed rows, T slots a row, S = R * T slots in all, N processes in the group,
s = S / N slots a process, H heads, d head size, n sequences (2B for B pairs).

A packed layout (:class:`fastdpo.batching.packing.PackedLayout`) already says everything a token
needs besides its own id: its position in its unpacked sequence (what rotary and absolute
embeddings read), and which slots it attends (its pair's prompt and its own part).  Every layer
but attention works token by token, so any set of slots can run on a process of its own;
:func:`shard_rows` deals the S slots to the N processes of a ``torch.distributed`` group, s each
(:class:`ShardedLayout`), and only attention exchanges data:

* **Ulysses** (DeepSpeed-Ulysses, Jacobs et al. 2023) when the heads divide by N: an
  all-to-all turns each process's (H, s, d) queries, keys and values -- its slots, every head
  -- into (H/N, S, d) -- every slot, its heads --, attention by parts runs on the whole packed
  rows for those heads (:class:`fastdpo.batching.attention.SegmentAttention`: the segments,
  sliding windows and grouped queries exactly as in one process), and a second all-to-all
  takes the outputs back.  Four all-to-alls a layer forward (q, k, v, out) and four backward,
  each moving (N - 1)/N of a (s, H, d) tensor per process.
* **Ring attention** (:mod:`fastdpo.batching.ring`) when they do not: keys and values travel
  around the processes, each computes its own queries against every block.

**The deal** (:func:`deal`): the slots are sorted by the attention work of their queries -- the
keys a query sees, its position in its part plus one (a causal row's end costs more than its
start) -- and dealt in a snake (0, 1, .., N-1, N-1, .., 0, ...), so each process holds exactly s
slots (even work in every token-wise layer) and nearly the same attention work (the ring's
cost; Ulysses splits attention by heads, which is even whatever the deal).
:func:`work` measures it.

**Scores**: each process scores the targets of its own slots (the fused head on its (s, D)
hidden states, never a whole row's); the per-sequence sums are all-reduced over the group
(:func:`all_reduce_sum`), so every process computes the same loss.  Autograd runs through the
collectives (their backward is their adjoint: an all-to-all the other way, an all-reduce), so
each process's parameter gradient is N times its own share of the loss's: averaged over the
group -- as DDP and FSDP2 average over every process of the world --, it is the gradient of the
loss.  Sequence parallel ranks must therefore take part in the gradient average, and see the
same batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .attention import SegmentAttention
from .packing import PAD, PackedLayout


def group_of(where) -> object:
    """The process group of ``where``: a ``ProcessGroup``, or a one-dimensional ``DeviceMesh``
    (a mesh's dimension, ``mesh["sp"]``).  Raises ``TypeError``/``ValueError`` in one line."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        DeviceMesh = ()
    if isinstance(where, DeviceMesh):
        if where.ndim != 1:
            raise ValueError(f"sequence_parallel takes a one-dimensional DeviceMesh (a mesh's dimension, "
                             f"mesh['sp']), got one of {where.ndim} dimensions {where.mesh_dim_names}")
        return where.get_group()
    if not isinstance(where, dist.ProcessGroup):
        raise TypeError(f"sequence_parallel must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(where).__name__}")
    return where


# ----------------------------------------------------------------------------- the deal


def slot_work(layout: PackedLayout) -> Tensor:
    """(S,) the keys each slot's query sees (its position in its part plus one; 0 at padding):
    its attention work."""
    work = layout.pos.reshape(-1) + 1
    return torch.where(layout.seg.reshape(-1) == PAD, 0, work)


def deal(layout: PackedLayout, size: int) -> Tensor:
    """(S,) the slots of ``layout`` (S a multiple of ``size``) in process order: process j's s
    slots are ``[j*s, (j+1)*s)``, ascending there; dealt by decreasing work in a snake (see the
    module docstring)."""
    work = slot_work(layout)
    slots = work.numel()
    by_work = torch.sort(work, descending=True, stable=True).indices
    turn = torch.arange(slots, device=work.device)
    lap, place = turn // size, turn % size
    owner = torch.where(lap % 2 == 0, place, size - 1 - place)
    rank_of = torch.empty_like(owner).index_copy_(0, by_work, owner)
    # by process, then ascending slot: a stable sort of the owners
    return torch.sort(rank_of, stable=True).indices


def work(layout: PackedLayout, order: Tensor, size: int) -> list[int]:
    """The attention work (visible query-key pairs) of each process's slots under ``order``."""
    per_slot = slot_work(layout)[order].view(size, -1)
    return per_slot.sum(1).tolist()


def widen(layout: PackedLayout, length: int) -> PackedLayout:
    """``layout`` with padding slots appended to each row up to ``length`` slots (its spans and
    scored positions where they were)."""
    r, t = layout.tokens.shape
    if length == t:
        return layout
    extra = length - t

    def pad(x: Tensor, fill: int) -> Tensor:
        return torch.cat((x, x.new_full((r, extra), fill)), 1)

    rows = layout.rows // t * length + layout.rows % t
    pad_token = int(layout.tokens[layout.seg == PAD][0]) if bool((layout.seg == PAD).any()) else 0
    return PackedLayout(pad(layout.tokens, pad_token), pad(layout.pos, 0), pad(layout.seg, PAD),
                        pad(layout.pair, -1), rows, layout.spans, layout.attention)


# ----------------------------------------------------------------------------- the sharded layout


@dataclass(frozen=True, eq=False)
class ShardedLayout:
    """One process's share of packed rows (:func:`shard_rows`).  It stands where a packed layout
    stands for a model's adapter: :attr:`tokens` and :attr:`pos` are this process's slots, as
    one row, and :attr:`attention` says by parts, which :func:`by_parts` makes
    sequence-parallel."""

    layout: PackedLayout  # the whole packed rows, S a multiple of size
    group: object  # the torch.distributed process group
    size: int
    rank: int
    order: Tensor  # (S,) the slots in process order (deal)
    inverse: Tensor  # (S,) where each slot sits in order
    where: Tensor  # (n * (L-1),) each unpacked input position's index among this process's slots, -1 elsewhere
    cache: dict = field(default_factory=dict, repr=False)
    attention: str = "segments"

    @property
    def local(self) -> int:
        """s, the slots of each process."""
        return self.order.numel() // self.size

    @property
    def slots(self) -> Tensor:
        """(s,) this process's flat slots, ascending."""
        s = self.local
        return self.order[self.rank * s:(self.rank + 1) * s]

    @property
    def tokens(self) -> Tensor:
        """(1, s) the token ids of this process's slots."""
        return self.layout.tokens.reshape(-1)[self.slots][None]

    @property
    def pos(self) -> Tensor:
        """(1, s) their positions in their unpacked sequences."""
        return self.layout.pos.reshape(-1)[self.slots][None]

    def work(self) -> list[int]:
        """The attention work of each process (:func:`work`)."""
        return work(self.layout, self.order, self.size)

    def scored(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """For a batch's ``mask`` (n', L-1) of the first n' sequences: the flat positions of
        ``mask`` whose target this process scores (scored there, and in its slots), and their
        indices among its slots."""
        where = self.where[: mask.numel()]
        mine = (mask.reshape(-1) & (where >= 0)).nonzero().squeeze(1)
        return mine, where[mine]


def shard_rows(layout: PackedLayout, group) -> ShardedLayout:
    """This process's :class:`ShardedLayout` of ``layout`` over ``group``: the rows widened to
    a multiple of the group's size where needed (padding slots), the slots dealt (:func:`deal`).
    Every process of the group must call it on the same layout."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_same_batch(layout, group)
    r, t = layout.tokens.shape
    if (r * t) % size:
        layout = widen(layout, -(-t // size) * size)
    order = deal(layout, size)
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    s = order.numel() // size
    flat = layout.rows.reshape(-1)
    where = torch.where(inverse[flat] // s == rank, inverse[flat] - rank * s, -1)
    return ShardedLayout(layout, group, size, rank, order, inverse, where)


def _check_same_batch(layout: PackedLayout, group) -> None:
    """Raise on every process (one all-reduce of a few numbers) unless every process of the group
    packed the same batch: a process with another batch would score a mix of both silently, or
    stop in a collective of another size."""
    w = torch.arange(layout.tokens.numel(), device=layout.tokens.device) % 1_000_003 + 1
    seen = torch.stack((torch.tensor(layout.tokens.shape, device=w.device).prod(),
                        torch.tensor(layout.tokens.shape[1], device=w.device),
                        (layout.tokens.reshape(-1).long() * w).sum(), (layout.pos.reshape(-1) * w).sum()))
    both = torch.cat((seen, -seen))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:4], -both[4:]):
        raise ValueError("the processes of a sequence_parallel group got different batches: every process of the group "
                         "must get the same batch (shard the data by data-parallel rank, not by process)")


# ----------------------------------------------------------------------------- collectives


class _AllToAll(torch.autograd.Function):
    """``x`` (N, ...) -> (N, ...): block j goes to process j, block j of the result came from
    process j; backward: the same exchange of the gradients (its adjoint)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: Tensor, group) -> Tensor:
    x = x.contiguous()  # (empty_like keeps a strided input's layout, which all_to_all_single would not respect)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``x`` over the group on every process; backward: the sum of the gradients
    (each process's loss is a copy: see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """``x`` summed over ``group``, differentiable (:class:`_AllReduceSum`); without autograd a
    plain all-reduce."""
    if x.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(x, group)
    out = x.detach().clone()
    dist.all_reduce(out, group=group)
    return out


# ----------------------------------------------------------------------------- attention


class SequenceParallelAttention:
    """Attention of a :class:`ShardedLayout`'s slots, as :class:`SegmentAttention` takes it:
    ``(q, k, v)`` (1, H, s, d) of this process's slots -> (1, H, s, d) (see the module
    docstring: Ulysses when H divides by N, else the ring)."""

    def __init__(self, sharded: ShardedLayout):
        self.sharded = sharded
        self.whole = SegmentAttention(sharded.layout)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float = 0.0,
                 window: int | None = None) -> Tensor:
        sh = self.sharded
        if q.shape[1] % sh.size == 0:
            q, k, v = (self._to_heads(x) for x in (q, k, v))
            return self._to_slots(self.whole(q, k, v, scale=scale, dropout_p=dropout_p, window=window))
        from .ring import ring_attention

        return ring_attention(q, k, v, layout=sh.layout, order=sh.order, group=sh.group, scale=scale,
                              window=window, dropout_p=dropout_p)

    def _to_heads(self, x: Tensor) -> Tensor:
        """(1, H, s, d) this process's slots, every head -> (R, H/N, T, d) every slot, its heads."""
        sh, (_, h, s, d) = self.sharded, x.shape
        n, (r, t) = sh.size, sh.layout.tokens.shape
        got = _AllToAll.apply(x[0].reshape(n, h // n, s, d), sh.group)  # got[j]: process j's slots
        flat = got.transpose(0, 1).reshape(h // n, n * s, d).index_select(1, sh.inverse)
        return flat.view(h // n, r, t, d).transpose(0, 1)

    def _to_slots(self, out: Tensor) -> Tensor:
        """(R, H/N, T, d) -> (1, H, s, d): the inverse of :meth:`_to_heads`."""
        sh, (r, hn, t, d) = self.sharded, out.shape
        n, s = sh.size, sh.local
        ordered = out.transpose(0, 1).reshape(hn, r * t, d).index_select(1, sh.order)
        got = _AllToAll.apply(ordered.view(hn, n, s, d).transpose(0, 1), sh.group)  # got[j]: head group j
        return got.reshape(1, n * hn, s, d)


def by_parts(layout) -> SegmentAttention | SequenceParallelAttention:
    """The attention by parts of a packed layout, or of one process's share of it."""
    return SequenceParallelAttention(layout) if isinstance(layout, ShardedLayout) else SegmentAttention(layout)
