"""Counted rows and chunked head products: the math both fused-head ops share.

Dimensions: N sequences, T positions, D hidden size, V vocabulary; M counted rows.

``logits = hidden @ weight.T (* scale)`` (then, for Gemma 2, ``softcap * tanh(logits /
softcap)``) is never built whole.  The counted rows (mask True)
are gathered once (prompt and padding rows need no head product at all), then walked in
chunks whose logits fit a byte budget.  Each chunk's logits come from the library's matrix
product (``torch.mm``: cuBLAS on CUDA), rounded as the model's own head rounds them (the
product in the weight's dtype, then the scale); a *fold* then does the elementwise work on
them, the softcap included (in float32, and its derivative in the gradient):

* :class:`TorchFold` -- on float32 logits (the CPU path): the C++ fold over a whole chunk
  (:mod:`fastdpo.scoring.backends.native`) where it is built, else torch ops over cache-sized boxes;
* :class:`TritonFold` -- fastdpo's Triton kernels (:func:`fastdpo.kernels.sequence_logprobs.
  row_logprobs` and ``row_logprob_grad_``), reading the logits in their own dtype and writing
  the gradient over them in place (the CUDA path, and under ``TRITON_INTERPRET=1`` on CPU
  tensors).

Gathering needs the number of counted rows on the host: :func:`plan_rows` costs one
device-to-host copy of N counts (one sync on CUDA), and everything after it is sync-free.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import torch_fold as torch_impl
from .backends.torch_fold import TorchFold, chunk_slices
from .backends.triton_fold import TritonFold

# Logits bytes (in the fold's dtype) one chunk of rows may hold, per device type.  CPU: large
# enough that each chunk's product is an efficient GEMM (hundreds of rows), small against the
# (N, T, V) logits it replaces.  CUDA: thousands of rows, so each product fills the GPU
# (1 GiB is 4096 rows of bf16 logits at V = 128256).
CHUNK_BYTES = 64 << 20
CUDA_CHUNK_BYTES = 1 << 30
# Logits bytes the DPO head op may keep from one group of whole pairs between its two passes
# (logits beyond it are recomputed).  CPU: at 128 MiB one pair of 2 x 512 tokens over a 32k
# vocabulary fits whole; a larger budget groups more pairs, which adds their logits to the
# step's peak for little time saved on a few cores (docs/performance-log.md, "Pair-fusion
# budget").  CUDA: a quarter of the memory free for tensors (cudaMemGetInfo plus what torch's
# caching allocator holds unused), at most CUDA_GROUP_CAP: 4 GiB holds 16k rows of bf16 logits
# at V = 128256 (B = 8 pairs of 2 x 1000 completion tokens), so recomputing is the exception.
GROUP_BYTES = 128 << 20
CUDA_GROUP_CAP = 4 << 30


def chunk_bytes(device: torch.device, given: int = 0) -> int:
    """The chunk budget for tensors on ``device``: ``given`` (a module's ``chunk_bytes``) when
    nonzero, else the device's default (read at call time: tests shrink it)."""
    if given:
        return given
    return CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES


def group_bytes(device: torch.device, given: int = 0) -> int:
    """The DPO head op's keep budget for tensors on ``device`` (see GROUP_BYTES): ``given`` (a
    module's ``group_bytes``) when nonzero, else the device's default."""
    if given:
        return given
    if device.type != "cuda":
        return GROUP_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(max(GROUP_BYTES, min(CUDA_GROUP_CAP, (free + cached) // 4)))


rows_per_chunk = torch_impl.rows_per_box  # rows of V logits of elem_bytes each within a budget


# ----------------------------------------------------------------------------- buffers

# The chunk, keep and recompute buffers (tens to hundreds of MiB of logits) are fresh memory at
# every step: malloc maps each anew and the kernel faults its 4 KiB pages in one by one as the
# product first writes them.  On Linux the buffers are advised as transparent huge pages
# (madvise(MADV_HUGEPAGE): honoured where THP is "madvise" or "always"), one fault per 2 MiB.
# (A product into huge pages costs little more than into memory already mapped, one into 4 KiB
# pages much more: docs/performance-log.md, "Issue 25".)  Nothing is held between calls; a
# buffer is freed when the step drops it.  False: plain torch.empty.
HUGE_PAGES = True
HUGE_PAGE_MIN_BYTES = 8 << 20  # below this, malloc's own reuse and the fault cost are small
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise = None


def _madvise_fn():
    """libc's ``madvise`` (None off Linux or without it), looked up once."""
    global _madvise
    if _madvise is None:
        fn = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL("libc.so.6", use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _madvise = fn
    return _madvise or None


def rows_buffer(rows: int, v: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized contiguous (rows, V) buffer; on the CPU, from :data:`HUGE_PAGE_MIN_BYTES`
    up, starting on a 2 MiB boundary with the whole 2 MiB pages in it advised as huge pages
    (see :data:`HUGE_PAGES`; advice only: where the kernel declines it, 4 KiB pages)."""
    itemsize = dtype.itemsize
    n = rows * v
    madvise = _madvise_fn() if HUGE_PAGES and device.type == "cpu" and n * itemsize >= HUGE_PAGE_MIN_BYTES else None
    if madvise is None:
        return torch.empty(rows, v, dtype=dtype, device=device)
    raw = torch.empty(n + _HUGE // itemsize, dtype=dtype, device=device)
    start = raw.data_ptr()
    aligned = -(-start // _HUGE) * _HUGE
    madvise(aligned, n * itemsize // _HUGE * _HUGE, _MADV_HUGEPAGE)  # advice: a refusal changes nothing
    offset = (aligned - start) // itemsize
    return raw[offset : offset + n].view(rows, v)


class Scratch:
    """One (rows, V) buffer reused by the chunk loops of one op call (the reference's scoring,
    the policy's scoring, each group's kept logits), so that a call maps and faults in its
    buffer memory once instead of once per loop (on the CPU a fresh buffer is mapped anew and
    the kernel zeroes each page as it is first written; docs/performance-log.md, "The evaluation
    step's remaining time, and one buffer per call").  A request larger than the held buffer lets the held one go before
    the larger is made, so the peak is that of the largest request; the memory is freed with
    the object (nothing is held between calls).  A view it returns is overwritten by the next
    request: one user at a time."""

    def __init__(self) -> None:
        self._flat: Tensor | None = None

    def capacity(self, v: int, dtype: torch.dtype, device: torch.device) -> int:
        """Rows of ``v`` elements the held buffer holds (0: none held of this dtype and device)."""
        flat = self._flat
        if flat is None or flat.dtype != dtype or flat.device != device:
            return 0
        return flat.numel() // max(v, 1)

    def rows(self, rows: int, v: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A (rows, v) view of the held buffer, made (see :func:`rows_buffer`) when there is
        none yet, it is of another dtype or device, or it is too small."""
        n = rows * v
        flat = self._flat
        if flat is None or flat.dtype != dtype or flat.device != device or flat.numel() < n:
            self._flat = flat = None  # the smaller buffer goes before the larger is made
            self._flat = flat = rows_buffer(rows, v, dtype, device).view(-1)
        return flat[:n].view(rows, v)


# ----------------------------------------------------------------------------- counted rows


@dataclass
class RowPlan:
    """The counted rows of an (N, T) mask, in row-major order.

    ``index`` (M,) flat positions into N*T; ``seq`` (M,) the sequence of each row; ``bounds``
    (host list, N + 1) so that sequence n's rows are ``[bounds[n], bounds[n + 1])``.
    """

    index: Tensor
    seq: Tensor
    bounds: list[int]
    shape: tuple[int, int]

    @property
    def m(self) -> int:
        return self.bounds[-1]

    def take(self, x: Tensor) -> Tensor:
        """Rows of an (N, T, ...) tensor at the counted positions: (M, ...)."""
        n, t = self.shape
        return x.reshape(n * t, *x.shape[2:]).index_select(0, self.index)

    def put(self, rows: Tensor) -> Tensor:
        """(N, T, ...) zeros with ``rows`` (M, ...) at the counted positions."""
        n, t = self.shape
        out = rows.new_zeros(n * t, *rows.shape[1:])
        out.index_copy_(0, self.index, rows)
        return out.reshape(n, t, *rows.shape[1:])

    def sequence_sums(self, per_row: Tensor) -> Tensor:
        """float32 (N,) sums of (M,) row values per sequence.  index_add_ adds row after row:
        thousands of float32 terms would lose ~1e-6 relative, so the sums accumulate in
        float64 (M extra values, nothing to the step)."""
        sums = torch.zeros(self.shape[0], dtype=torch.float64, device=per_row.device)
        return sums.index_add_(0, self.seq, per_row.double()).float()


def plan_rows(mask: Tensor) -> RowPlan:
    """The :class:`RowPlan` of a bool (N, T) mask; its one host sync is the N counts."""
    n, t = mask.shape
    counts = mask.sum(-1)
    bounds = [0, *torch.cumsum(counts, 0).tolist()]  # the sync
    m = bounds[-1]
    # Sync-free compaction now that M is known: a stable sort puts the counted positions
    # first, in order (deterministic, unlike a scatter with a chunk_buffer slot).
    flat = mask.reshape(-1)
    index = torch.sort((~flat).to(torch.uint8), stable=True).indices[:m]
    return RowPlan(index=index, seq=torch.div(index, max(t, 1), rounding_mode="floor"), bounds=bounds, shape=(n, t))


# ----------------------------------------------------------------------------- products


def logits_into(out: Tensor, h: Tensor, weight: Tensor, scale: float | None, bias: Tensor | None = None) -> Tensor:
    """Fill ``out`` (rows, V) with ``(h @ weight.T + bias) (* scale)`` rounded as the model's own
    head rounds it: the product (with the bias, one ``addmm`` as ``nn.Linear`` makes it) in the
    weight's dtype, then the scale (after the product, as x-transformers' tied head does),
    then, for a float32 ``out``, the widening."""
    if out.dtype == weight.dtype:
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
        if scale is not None:
            out.mul_(scale)
        return out
    z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    if scale is not None:
        z.mul_(scale)
    return out.copy_(z)


class WeightGrad:
    """Accumulates ``sum_k dz_k.T @ h_k`` for a (V, D) weight.

    One product is kept as it comes (rounded once to the weight's dtype, as the model's own
    backward rounds it); from the second on, the sum moves to float32 and every product is
    added there (``torch.mm(..., out_dtype=torch.float32)`` where the build has it for CUDA,
    else the product widened), so many chunks or groups do not round the gradient many times.
    """

    def __init__(self, weight: Tensor):
        self.dtype = weight.dtype
        self.value: Tensor | None = None
        self.products = 0

    def add(self, dz: Tensor, h: Tensor) -> None:
        self.products += 1
        if self.value is None:
            self.value = torch.mm(dz.t(), h)
            return
        if self.value.dtype != torch.float32:
            self.value = self.value.float()
        if dz.dtype == torch.float32:
            self.value.addmm_(dz.t(), h)
        else:
            self.value.add_(_mm_float32(dz.t(), h))

    def add_rows(self, index: Tensor, rows: Tensor) -> None:
        """Add ``rows`` (K, D) into the rows ``index`` (K,) of the sum (after an :meth:`add`)."""
        self.value.index_add_(0, index, rows.to(self.value.dtype))

    def result(self) -> Tensor | None:
        return None if self.value is None else self.value.to(self.dtype)


class BiasGrad:
    """Accumulates ``sum_k dz_k.sum(0)`` for a (V,) head bias, in float32 (the column sums of
    the logits' gradient chunks), rounded once to the bias's dtype at the end."""

    def __init__(self, bias: Tensor):
        self.dtype = bias.dtype
        self.value = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)

    def add(self, dz: Tensor) -> None:
        self.value.add_(dz.sum(0, dtype=torch.float32))

    def result(self) -> Tensor:
        return self.value.to(self.dtype)


_MM_OUT_DTYPE: bool | None = None


def _mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """float32 ``a @ b`` of 16-bit operands: cuBLAS's float32 output where torch offers it
    (``aten::mm.dtype``, CUDA only), else the product in the operands' dtype, widened."""
    global _MM_OUT_DTYPE
    if a.device.type == "cuda" and _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return torch.mm(a, b).float()


# ----------------------------------------------------------------------------- folds


FOLDS = {"torch": TorchFold, "triton": TritonFold}  # by impl


# ----------------------------------------------------------------------------- scoring


def direct_product(dtype: torch.dtype, weight: Tensor) -> bool:
    """True where :func:`logits_into` writes logits of ``dtype`` straight from the product (the
    fold's dtype is the weight's), so a product over more rows makes no larger temporary."""
    return dtype == weight.dtype


def _chunk_rows(m: int, v: int, dtype: torch.dtype, weight: Tensor, budget: int, scratch: Scratch | None) -> int:
    """Rows per product of a chunk loop over ``m`` rows: the budget's, or all the rows a scratch
    buffer already holds when that is more (the DPO head op's is as large as a group's kept logits:
    larger products at no extra peak), where the product needs no temporary
    (:func:`direct_product`)."""
    rows = rows_per_chunk(v, dtype.itemsize, budget)
    if scratch is not None and direct_product(dtype, weight):
        rows = max(rows, scratch.capacity(v, dtype, weight.device))
    return max(1, min(m, rows))


def score_rows(
    h: Tensor,
    y: Tensor,
    weight: Tensor,
    scale: float | None,
    fold,
    budget: int,
    *,
    hits: bool = False,
    with_wpo: bool = False,
    softcap: float | None = None,
    bias: Tensor | None = None,
    scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(row stats (2, M), target log-probs (M,), argmax hits (M,) bool or None, with ``with_wpo`` the
    rows' ``log sum_v p_v^2`` (M,) or None) of every row of ``h`` (M, D), chunk by chunk
    through one reused buffer, the logits capped by ``softcap`` when given; no logits kept.
    (The argmax: the torch fold's of capped logits, the Triton fold's of uncapped ones; the
    cap is increasing, so the two agree but where tanh saturates float32 into a tie.)  The
    chunk buffer comes from ``scratch`` when given (its rows per product too, when it holds
    more than the budget: :func:`_chunk_rows`), else is made for the call."""
    m, v = h.shape[0], weight.shape[0]
    dtype = fold.dtype(weight)
    row_stats = torch.empty(2, m, dtype=torch.float32, device=h.device)
    logp = torch.empty(m, dtype=torch.float32, device=h.device)
    hit = torch.empty(m, dtype=torch.bool, device=h.device) if hits else None
    log_sum_sq = torch.empty(m, dtype=torch.float32, device=h.device) if with_wpo else None
    rows = _chunk_rows(m, v, dtype, weight, budget, scratch)
    buf = (scratch.rows if scratch is not None else rows_buffer)(rows, v, dtype, h.device) if m else None
    for c in chunk_slices(m, rows):
        z = logits_into(buf[: c.stop - c.start], h[c], weight, scale, bias)
        row_stats[:, c], logp[c] = fold.stats(z, y[c], sq_out=log_sum_sq[c] if with_wpo else None, softcap=softcap)
        if hit is not None:
            hit[c] = z.argmax(-1) == y[c]
    return row_stats, logp, hit, log_sum_sq


def kept_grads(
    kept: Tensor,
    row_stats: Tensor,
    y: Tensor,
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    scale: float | None,
    fold,
    grad_h: Tensor | None,
    grad_weight: WeightGrad | None,
    softcap: float | None = None,
    grad_bias: BiasGrad | None = None,
) -> None:
    """The gradients of ``sum_m g_m logp_m`` through rows whose logits ``kept`` (rows, V) still
    holds as :meth:`stats` left them with ``keep=True``: d hidden rows into ``grad_h`` (rows,
    D), the weight's added into ``grad_weight``, the bias's into ``grad_bias``; ``kept`` is
    overwritten.

    Where ``kept`` holds probabilities P in float32 beside a float32 weight (the torch fold
    without a softcap) and no bias is differentiated, the row weights ``g`` (times the scale)
    commute with both products: ``dh = g (W_y - P W)`` and ``dW = scatter_y(g h) - P^T (g h)``,
    so P meets the two products as it is and no pass over it writes ``g (onehot - P)`` first
    (the row terms are (rows, D), V / D times smaller than that pass: docs/performance-log.md,
    "Larger products, and no gradient pass over the kept rows").  The two routes round differently, both
    to float32 accuracy (tests/test_kept_grads.py holds this one as close to float64 as the
    in-place one).  Otherwise ``kept`` becomes the logits' gradient in place (:meth:`grad_`)
    and meets the products in the weight's dtype."""
    if softcap is None and fold.keeps_probabilities and kept.dtype == weight.dtype == torch.float32 and grad_bias is None:
        gs = (g if scale is None else g * scale).unsqueeze(1)  # (rows, 1)
        if grad_h is not None:
            torch.mm(kept, weight, out=grad_h)  # P W
            grad_h.sub_(weight.index_select(0, y)).mul_(gs.neg())  # g (W_y - P W)
        if grad_weight is not None:
            gh = h * gs
            grad_weight.add(kept, gh.neg())  # -P^T (g h)
            grad_weight.add_rows(y, gh)  # + g h at each row's target
        return
    dz = fold.grad_(kept, row_stats, y, g, scale, kept=True, softcap=softcap).to(weight.dtype)
    if grad_h is not None:
        torch.mm(dz, weight, out=grad_h)
    if grad_weight is not None:
        grad_weight.add(dz, h)
    if grad_bias is not None:
        grad_bias.add(dz)


def row_grads(
    h: Tensor,
    y: Tensor,
    weight: Tensor,
    scale: float | None,
    fold,
    row_stats: Tensor,
    g: Tensor,
    budget: int,
    grad_weight: WeightGrad | None,
    need_hidden: bool = True,
    softcap: float | None = None,
    bias: Tensor | None = None,
    grad_bias: BiasGrad | None = None,
    scratch: Scratch | None = None,
) -> Tensor | None:
    """d hidden rows (M, D) of ``sum_m g_m logp_m`` (recomputing each chunk's logits from the
    row stats; through the ``softcap`` when given); adds the weight's gradient into
    ``grad_weight``, and the bias's into ``grad_bias``; the chunk buffer from ``scratch``
    when given (as in :func:`score_rows`)."""
    m, v = h.shape[0], weight.shape[0]
    dtype = fold.dtype(weight)
    grad_h = torch.empty_like(h) if need_hidden else None
    rows = _chunk_rows(m, v, dtype, weight, budget, scratch)
    buf = (scratch.rows if scratch is not None else rows_buffer)(rows, v, dtype, h.device) if m else None
    for c in chunk_slices(m, rows):
        z = logits_into(buf[: c.stop - c.start], h[c], weight, scale, bias)
        dz = fold.grad_(z, row_stats[:, c], y[c], g[c], scale, softcap=softcap).to(weight.dtype)
        if grad_h is not None:
            torch.mm(dz, weight, out=grad_h[c])
        if grad_weight is not None:
            grad_weight.add(dz, h[c])
        if grad_bias is not None:
            grad_bias.add(dz)
    return grad_h
