"""Pure-torch implementation of the masked sequence log-prob op (the CPU path).

Dimensions: N sequences, T positions, V vocabulary.

For a row (n, t) with logits z and target y, ``logp = z_y - logsumexp(z)``; a sequence's score
is ``sum_t m_t * logp_t``.  Its gradient w.r.t. row (n, t) is ``g_n * m_t * (onehot(y) -
softmax(z))`` (DESIGN.md), so backward needs only the saved row statistics (max and log-sum),
never a stored softmax.  Both passes walk the logits in boxes of whole rows small enough to stay in cache
(``_boxes``), in float32 whatever the input dtype: no (N, T, V) log-softmax or softmax is ever
built, and backward writes the gradient straight into its one (N, T, V) output buffer (or,
when asked, into the logits themselves).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# Rows of a box are chosen so that one float32 copy of the box is about this many bytes:
# large enough that per-box Python and dispatch overhead (~20 us) is noise, small enough that
# the box stays in cache between the passes made over it (measured: docs/performance.md).
# Read at call time, so tests can shrink it to exercise box boundaries.
BOX_BYTES = 4 << 20


# What a box holds: no counted row (skipped), only counted rows, or both.
EMPTY, FULL, MIXED = 0, 1, 2


def _boxes(n: int, t: int, v: int, box_bytes: int) -> Iterator[tuple[slice, slice]]:
    """Cover the (n, t) grid in row-major boxes of at most ``box_bytes // (4 v)`` rows.

    A box is either some whole sequences or a run of positions of one sequence, so slicing a
    (N, T, ...) tensor with it is always a view, contiguous when the tensor is.
    """
    rows = max(1, box_bytes // (4 * max(v, 1)))
    if n == 0 or t == 0:
        return
    if t <= rows:
        per = rows // t
        for n0 in range(0, n, per):
            yield slice(n0, min(n0 + per, n)), slice(0, t)
    else:
        for i in range(n):
            for t0 in range(0, t, rows):
                yield slice(i, i + 1), slice(t0, min(t0 + rows, t))


def box_plan(mask: Tensor, v: int, box_bytes: int) -> list[tuple[slice, slice, int]]:
    """The boxes of :func:`_boxes`, each tagged EMPTY, FULL or MIXED from ``mask``.

    Prompt and padding rows are often whole boxes; skipping them saves their exp work (and
    exp of -inf/subnormal arguments is a slow path on x86).  Reading the mask costs one
    device-to-host copy of N*T counts (free on CPU, the one sync of this path on CUDA).
    """
    n, t = mask.shape
    counted = torch.cumsum(mask.reshape(-1), 0, dtype=torch.int64).tolist()
    plan = []
    for bn, bt in _boxes(n, t, v, box_bytes):
        first = bn.start * t + bt.start
        last = (bn.stop - 1) * t + bt.stop - 1
        size = last - first + 1
        count = counted[last] - (counted[first - 1] if first else 0)
        plan.append((bn, bt, EMPTY if count == 0 else FULL if count == size else MIXED))
    return plan


def max_logsum(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of float32 ``z`` (..., V): the max m and ``log sum exp(z - m)``.

    Kept apart rather than added into a logsumexp: the backward's ``exp((z - m) - log_s)``
    then errs by ulp(log_s)/2 instead of ulp(|lse|)/2 (about 2e-6 relative at |lse| ~ 50).
    A +inf or NaN in the row makes log_s NaN (inf - inf), as in float64 log_softmax, where
    ``torch.logsumexp`` would return +inf.
    """
    m = z.amax(dim=-1, keepdim=True)
    log_s = (z - m).exp_().sum(-1).log_()
    return m.squeeze(-1), log_s


def forward(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return (scores float32 (N,), row stats float32 (2, N, T)).

    The stats are each row's max and ``log sum exp(z - max)`` (see :func:`max_logsum`); rows
    in EMPTY boxes are left at 0 (never used).  ``targets`` is int64 and ``mask`` bool, both
    (N, T); targets at masked positions are never read (they may hold any value, e.g. -100).
    """
    n, t, v = logits.shape
    plan = box_plan(mask, v, BOX_BYTES)
    stats = torch.zeros(2, n, t, dtype=torch.float32, device=logits.device)
    for bn, bt, kind in plan:
        if kind != EMPTY:
            stats[0, bn, bt], stats[1, bn, bt] = max_logsum(logits[bn, bt].float())
    safe = torch.where(mask, targets, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    # where, not multiply: a non-finite value in a masked row must not reach the score.
    scores = torch.where(mask, (picked - stats[0]) - stats[1], 0.0).sum(-1)
    return scores, stats


def backward(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    stats: Tensor,
    grad_scores: Tensor,
    *,
    inplace: bool = False,
) -> Tensor:
    """Gradient ``g_n * m_t * (onehot(y) - softmax(z))`` in the logits dtype.

    With ``inplace=True`` the gradient overwrites ``logits`` (which is returned).  Masked rows
    get exact zeros whatever their logits hold.
    """
    plan = box_plan(mask, logits.shape[-1], BOX_BYTES)
    out = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = torch.where(mask, grad_scores.float().unsqueeze(-1), 0.0)  # (N, T)
    safe = torch.where(mask, targets, 0)
    direct = out.dtype == torch.float32
    for bn, bt, kind in plan:
        o = out[bn, bt]
        if kind == EMPTY:
            o.zero_()
            continue
        z, gb = logits[bn, bt], g[bn, bt].unsqueeze(-1)
        buf = o if direct else torch.empty(z.shape, dtype=torch.float32, device=z.device)
        torch.sub(z, stats[0, bn, bt].unsqueeze(-1), out=buf)
        buf.sub_(stats[1, bn, bt].unsqueeze(-1)).exp_().mul_(gb.neg())
        buf.scatter_add_(-1, safe[bn, bt].unsqueeze(-1), gb)
        if kind == MIXED:
            buf.masked_fill_(~mask[bn, bt].unsqueeze(-1), 0.0)
        if not direct:
            o.copy_(buf)
    return out
