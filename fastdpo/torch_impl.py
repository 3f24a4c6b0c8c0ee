"""Pure-torch implementation of the masked sequence log-prob op (the CPU path).

Dimensions: N sequences, T positions, V vocabulary.

For a row (n, t) with logits z and target y, ``logp = z_y - logsumexp(z)``; a sequence's score
is ``sum_t m_t * logp_t``.  Its gradient w.r.t. row (n, t) is ``g_n * m_t * (onehot(y) -
softmax(z))`` (DESIGN.md), so backward needs only the saved row logsumexp, never a stored
softmax.  Both passes walk the logits in boxes of whole rows small enough to stay in cache
(``_boxes``), in float32 whatever the input dtype: no (N, T, V) log-softmax or softmax is ever
built, and backward writes the gradient straight into its one (N, T, V) output buffer (or,
when asked, into the logits themselves).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows of a box are chosen so that one float32 copy of the box is about this many bytes:
# large enough that per-box Python and dispatch overhead (~20 us) is noise, small enough that
# the box stays in L2 between the passes made over it.  Measured in
# benchmarks/chunk_size.py (see docs/performance.md).
BOX_BYTES = 1 << 20


@dataclass(frozen=True)
class TorchOptions:
    """Non-tensor options of the torch path (one object, so backward returns fixed Nones)."""

    inplace_backward: bool = False
    box_bytes: int = BOX_BYTES


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


def row_logsumexp(logits: Tensor, box_bytes: int = BOX_BYTES) -> Tensor:
    """float32 (N, T) logsumexp over the vocabulary, computed box by box."""
    n, t, v = logits.shape
    lse = torch.empty(n, t, dtype=torch.float32, device=logits.device)
    for bn, bt in _boxes(n, t, v, box_bytes):
        lse[bn, bt] = torch.logsumexp(logits[bn, bt].float(), dim=-1)
    return lse


def forward(
    logits: Tensor, targets: Tensor, mask: Tensor, box_bytes: int = BOX_BYTES
) -> tuple[Tensor, Tensor]:
    """Return (scores float32 (N,), row logsumexp float32 (N, T)).

    ``targets`` is int64 and ``mask`` bool, both (N, T); targets at masked positions are never
    read (they may hold any value, e.g. a padding id of -100).
    """
    lse = row_logsumexp(logits, box_bytes)
    safe = torch.where(mask, targets, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    # where, not multiply: a non-finite value in a masked row must not reach the score.
    scores = torch.where(mask, picked - lse, 0.0).sum(-1)
    return scores, lse


def backward(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    lse: Tensor,
    grad_scores: Tensor,
    *,
    inplace: bool = False,
    box_bytes: int = BOX_BYTES,
) -> Tensor:
    """Gradient ``g_n * m_t * (onehot(y) - softmax(z))`` in the logits dtype.

    With ``inplace=True`` the gradient overwrites ``logits`` (which is returned).
    """
    n, t, v = logits.shape
    out = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = torch.where(mask, grad_scores.float().unsqueeze(-1), 0.0)  # (N, T)
    # exp(z - inf) == 0 makes every masked row an exact zero without a separate pass.
    lse = torch.where(mask, lse, float("inf"))
    safe = torch.where(mask, targets, 0)
    direct = out.dtype == torch.float32
    for bn, bt in _boxes(n, t, v, box_bytes):
        z, gb, yb = logits[bn, bt], g[bn, bt].unsqueeze(-1), safe[bn, bt].unsqueeze(-1)
        o = out[bn, bt]
        buf = o if direct else torch.empty(z.shape, dtype=torch.float32, device=z.device)
        torch.sub(z, lse[bn, bt].unsqueeze(-1), out=buf)
        buf.exp_().mul_(gb.neg())
        buf.scatter_add_(-1, yb, gb)
        if not direct:
            o.copy_(buf)
    return out


class TorchSequenceLogprobs(torch.autograd.Function):
    """Autograd Function over :func:`forward` / :func:`backward`."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mask: Tensor, opts: TorchOptions) -> Tensor:
        scores, lse = forward(logits, targets, mask, opts.box_bytes)
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.opts = opts
        return scores

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        logits, targets, mask, lse = ctx.saved_tensors
        opts: TorchOptions = ctx.opts
        grad = None
        if ctx.needs_input_grad[0]:
            grad = backward(
                logits.detach(),
                targets,
                mask,
                lse,
                grad_scores,
                inplace=opts.inplace_backward,
                box_bytes=opts.box_bytes,
            )
        return grad, None, None, None
