"""Sequence log-probs straight from hidden states: the head product fused with the loss.

Dimensions: N sequences, T positions, D hidden size, V vocabulary; M counted rows.

``logits = hidden @ weight.T (* scale)`` is never built whole.  Counted rows (mask True) are
gathered once (prompt and padding rows need no head product at all), then walked in chunks of
rows whose float32 logits fit a byte budget: each chunk's logits live only while their row
logsumexp, target logit or gradient is taken.  Two entry points:

* :func:`linear_sequence_logprobs` -- a differentiable op like
  :func:`fastdpo.sequence_logprobs` on ``hidden @ weight.T``; backward recomputes each chunk's
  logits from the saved row logsumexp (one head product forward, three backward).
* :func:`fused_linear_pair_loss` -- the DPO step's policy head.  It groups whole preference
  pairs, so once a group's scores are known the loss gradient per sequence is too (a pair's
  loss depends on its own four scores only): the group's logits, kept from the forward product,
  turn into the gradient in place and meet ``weight`` and ``hidden`` right away.  One product
  forward and two backward, the floor; backward merely scales the gradients it stored.  When
  a group's logits exceed ``GROUP_BYTES`` (one pair is always a group), the chunks beyond the
  budget are recomputed in the second pass instead of kept.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _checks, torch_impl
from .ops import resolve_impl

# Float32 logits bytes one chunk of rows may hold.  Large enough that each chunk's product is
# an efficient GEMM (hundreds of rows), small against the (N, T, V) logits it replaces.
CHUNK_BYTES = 64 << 20
# Float32 logits bytes fused_linear_pair_loss may keep from a group of whole pairs between
# its two passes; logits beyond it are recomputed.  At 128 MiB one pair of 2 x 512 tokens
# over a 32k vocabulary fits whole (no recomputation).
GROUP_BYTES = 128 << 20


# ----------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class LinearHead:
    """A model's output head as ``logits = hidden @ weight.T * scale`` (scale may be None)."""

    weight: Tensor
    scale: float | None


def find_linear_head(model: nn.Module) -> tuple[LinearHead | None, str]:
    """The head of an x-transformers ``TransformerWrapper`` when fastdpo can reproduce it exactly.

    Returns ``(head, "")`` or ``(None, reason)``.  Reproducible heads: a bias-free
    ``nn.Linear`` ``to_logits`` and the tied embedding ``(t @ emb.weight.t()) * scale``, on a
    model whose ``return_embeddings=True`` output is exactly what that head consumes.
    """
    try:
        from x_transformers.x_transformers import TokenEmbedding, TransformerWrapper
    except ImportError:  # pragma: no cover - x-transformers is a dependency
        return None, "x-transformers is not importable"
    if not isinstance(model, TransformerWrapper):
        return None, f"the model is a {type(model).__name__}, not a TransformerWrapper"
    checks = [
        (getattr(model, "has_multiple_heads", False), "it has multiple output heads"),
        (getattr(model, "to_mixture", None) is not None, "it uses a mixture of softmaxes"),
        (getattr(model, "sigsoftmax_logits", False), "it uses sigsoftmax logits"),
        (getattr(model, "squeeze_out_last_dim", False), "it squeezes its output"),
        (getattr(model, "looped", False), "it is a looped model"),
        (getattr(model, "attn_pool", None) is not None, "it pools with attention"),
        (getattr(model, "cls_token", None) is not None, "it uses cls tokens"),
        (getattr(model, "average_pool_embed", False), "it average-pools its output"),
        (model.to_logits is None, "it has no head"),
    ]
    for bad, why in checks:
        if bad:
            return None, why
    head = model.to_logits
    weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    if weight is None and isinstance(getattr(model, "token_emb", None), TokenEmbedding):
        weight = model.token_emb.emb.weight
    if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
        # e.g. an FSDP2-sharded DTensor: the chunked products need a plain local weight
        return None, f"its head weight is a {type(weight).__name__}, not a plain tensor"
    if type(head) is nn.Linear:
        if head.bias is not None:
            return None, "its to_logits has a bias"
        return LinearHead(head.weight, None), ""
    if (
        isinstance(head, types.FunctionType)
        and head.__qualname__ == "TransformerWrapper.__init__.<locals>.<lambda>"
        and hasattr(model, "tie_embedding_scale")
        and isinstance(model.token_emb, TokenEmbedding)
    ):
        return LinearHead(model.token_emb.emb.weight, float(model.tie_embedding_scale)), ""
    return None, f"its to_logits is a custom {type(head).__name__}"


# ----------------------------------------------------------------------------- row chunks


def _logits(h: Tensor, weight: Tensor, scale: float | None) -> Tensor:
    """float32 logits of some rows, rounded as the model's own head would round them."""
    z = torch.mm(h, weight.t())
    if scale is not None:
        z.mul_(scale)  # after the product, as x-transformers' tied head does
    return z if z.dtype == torch.float32 else z.float()


def _boxes(z: Tensor) -> list[slice]:
    """Row ranges of ``z`` small enough to stay in cache across several elementwise passes
    (the chunk itself is a GEMM output far larger than any cache)."""
    return _chunks(z.shape[0], z.shape[1], torch_impl.BOX_BYTES)


def _stats(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(row stats (2, rows): max and log-sum, see :func:`torch_impl.max_logsum`; row target
    log-prob) of float32 logits ``z``."""
    st = torch.empty(2, z.shape[0], dtype=torch.float32, device=z.device)
    for r in _boxes(z):
        st[0, r], st[1, r] = torch_impl.max_logsum(z[r])
    return st, (z.gather(1, y.unsqueeze(1)).squeeze(1) - st[0]) - st[1]


def _into_grad_(z: Tensor, st: Tensor, y: Tensor, g: Tensor, scale: float | None) -> Tensor:
    """Turn float32 logits into d(sum_m g_m logp_m)/d(h @ W.T) in place."""
    for r in _boxes(z):
        zr = z[r]
        zr.sub_(st[0, r].unsqueeze(1)).sub_(st[1, r].unsqueeze(1))
        zr.exp_().mul_(g[r].neg().unsqueeze(1))
        zr.scatter_add_(1, y[r].unsqueeze(1), g[r].unsqueeze(1))
        if scale is not None:
            zr.mul_(scale)
    return z


def _grads(dz: Tensor, h: Tensor, weight: Tensor, grad_weight: Tensor | None) -> Tensor:
    """Return d hidden rows = dz @ W; add dz.T @ h into the float32 ``grad_weight``."""
    dz = dz.to(weight.dtype)
    if grad_weight is not None:
        if weight.dtype == torch.float32:
            grad_weight.addmm_(dz.t(), h)
        else:
            grad_weight.add_(torch.mm(dz.t(), h).float())
    return torch.mm(dz, weight)


def _chunks(m: int, v: int, budget: int) -> list[slice]:
    rows = max(1, budget // (4 * max(v, 1)))
    return [slice(r, min(r + rows, m)) for r in range(0, m, rows)]


def _row_stats(h: Tensor, y: Tensor, weight: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """(row stats (2, M), logp (M,)) of every row of ``h``, chunk by chunk; no logits kept."""
    m, v = h.shape[0], weight.shape[0]
    st = torch.empty(2, m, dtype=torch.float32, device=h.device)
    logp = torch.empty(m, dtype=torch.float32, device=h.device)
    for c in _chunks(m, v, CHUNK_BYTES):
        st[:, c], logp[c] = _stats(_logits(h[c], weight, scale), y[c])
    return st, logp


def _row_grads(
    h: Tensor,
    y: Tensor,
    weight: Tensor,
    scale: float | None,
    st: Tensor,
    g: Tensor,
    grad_weight: Tensor | None,
) -> Tensor:
    """d hidden rows for row weights ``g`` (recomputing logits); adds into ``grad_weight``."""
    grad_h = torch.empty_like(h)
    for c in _chunks(h.shape[0], weight.shape[0], CHUNK_BYTES):
        dz = _into_grad_(_logits(h[c], weight, scale), st[:, c], y[c], g[c], scale)
        grad_h[c] = _grads(dz, h[c], weight, grad_weight)
    return grad_h


@dataclass
class _Rows:
    """The counted rows of (N, T) inputs, gathered: M rows, sequence ``seq[m]``."""

    index: Tensor  # (M,) flat index into N*T
    seq: Tensor  # (M,) sequence of each row
    bounds: list[int]  # rows of sequence n are [bounds[n], bounds[n + 1])
    h: Tensor  # (M, D)
    y: Tensor  # (M,)


def _gather_rows(hidden: Tensor, targets: Tensor, mask: Tensor) -> _Rows:
    n, t, d = hidden.shape
    index = mask.reshape(-1).nonzero().squeeze(1)
    counts = mask.sum(-1)
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    return _Rows(
        index=index,
        seq=torch.div(index, t, rounding_mode="floor"),
        bounds=bounds,
        h=hidden.reshape(n * t, d).index_select(0, index),
        y=targets.reshape(-1).index_select(0, index),
    )


def _scatter_rows(rows: _Rows, values: Tensor, shape: tuple[int, ...]) -> Tensor:
    out = values.new_zeros(shape[0] * shape[1], *values.shape[1:])
    out.index_copy_(0, rows.index, values)
    return out.reshape(*shape[:2], *values.shape[1:])


def _sequence_sums(rows: _Rows, per_row: Tensor, n: int) -> Tensor:
    # index_add_ adds row after row: thousands of float32 terms would lose ~1e-6 relative,
    # so the per-sequence sums accumulate in float64 (M extra values, nothing to the step).
    sums = torch.zeros(n, dtype=torch.float64, device=per_row.device)
    return sums.index_add_(0, rows.seq, per_row.double()).float()


# ----------------------------------------------------------------------------- op


def _check_linear_inputs(hidden, weight, targets, mask, scale):
    _checks.tensor("hidden", hidden, ndim=3)
    _checks.tensor("weight", weight, ndim=2)
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    n, t, d = hidden.shape
    if weight.shape[1] != d:
        raise ValueError(
            f"weight must have shape (V, D) with D = {d} (hidden's last dim), got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (V >= 1), got {tuple(weight.shape)}")
    _checks.integer_tokens("targets", targets, ndim=2)
    if tuple(targets.shape) != (n, t):
        raise ValueError(f"targets must have shape (N, T) = {(n, t)}, got {tuple(targets.shape)}")
    if mask is None:
        mask = torch.ones(n, t, dtype=torch.bool, device=hidden.device)
    else:
        _checks.bool_mask("mask", mask, (n, t))
    _checks.same_device(hidden=hidden, weight=weight, targets=targets, mask=mask)
    if hidden.device.type == "meta":
        raise ValueError(
            "hidden is on the meta device: linear_sequence_logprobs selects the counted rows "
            "by value and needs real tensors"
        )
    if scale is not None:
        scale = float(scale)
        if not scale == scale or scale in (float("inf"), float("-inf")):
            raise ValueError(f"scale must be finite, got {scale}")
    _checks.token_range("targets", targets, weight.shape[0], where=mask)
    return targets.long(), mask, scale


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, scale, impl):
        n = hidden.shape[0]
        ctx.scale, ctx.impl = scale, impl
        if impl == "triton":
            # Every row goes to the kernels (masked ones get weight 0 in backward): gathering
            # the counted rows would need their count on the host, a sync per call.
            k = _linear_kernels()
            # Masked rows enter the products with weight 0; zeroing their hidden states keeps
            # a NaN/inf there (padding) from turning 0 * NaN into NaN in every gradient.
            h = hidden.masked_fill(~mask.unsqueeze(-1), 0).reshape(-1, hidden.shape[-1])
            y = torch.where(mask, targets, 0).reshape(-1)
            logp, lse = k.linear_logprobs_forward(h, weight, y, 1.0 if scale is None else scale)
            ctx.save_for_backward(h, weight, y, mask, lse)
            ctx.hidden_shape = hidden.shape
            return torch.where(mask, logp.view(mask.shape), 0.0).sum(-1)
        rows = _gather_rows(hidden, targets, mask)
        st, logp = _row_stats(rows.h, rows.y, weight, scale)
        ctx.save_for_backward(hidden, weight, st)
        ctx.rows = rows
        return _sequence_sums(rows, logp, n)

    @staticmethod
    def backward(ctx, grad_scores):
        need_h, need_w = ctx.needs_input_grad[:2]
        if ctx.impl == "triton":
            h, weight, y, mask, lse = ctx.saved_tensors
            k = _linear_kernels()
            g = torch.where(mask, grad_scores.float().unsqueeze(-1), 0.0).reshape(-1)
            grad_h, grad_w = k.linear_logprobs_backward(
                h, weight, y, lse, g, 1.0 if ctx.scale is None else ctx.scale,
                need_hidden_grad=need_h, need_weight_grad=need_w,
            )
            grad_h = grad_h.view(ctx.hidden_shape) if grad_h is not None else None
            return grad_h, grad_w, None, None, None, None
        hidden, weight, st = ctx.saved_tensors
        rows: _Rows = ctx.rows
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g = grad_scores.float().index_select(0, rows.seq)
        grad_rows = _row_grads(rows.h, rows.y, weight, ctx.scale, st, g, grad_w)
        grad_h = _scatter_rows(rows, grad_rows, hidden.shape) if need_h else None
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def _linear_kernels():
    from .kernels import linear_sequence_logprobs as k

    return k


def linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Masked per-sequence sums of target log-probs of ``hidden @ weight.T * scale``.

    Same result as ``sequence_logprobs(hidden @ weight.T * scale, targets, mask)`` (the product
    rounded in the inputs' dtype, the scale applied after it, everything after in float32),
    differentiable w.r.t. ``hidden`` and ``weight``, without ever holding the (N, T, V)
    logits: peak extra memory is O(N*T*D + CHUNK_BYTES + V*D).  Only counted rows are
    multiplied.  Backward recomputes each chunk's logits from the saved row statistics; when a
    whole loss is known in advance, :func:`fused_linear_pair_loss` avoids that recomputation.

    Args:
        hidden: (N, T, D) float32, bfloat16 or float16 final hidden states.
        weight: (V, D), same dtype: the output head (``nn.Linear.weight``, or a tied
            embedding's weight).
        targets: (N, T) integer ids; counted ids must be in [0, V) (ignored where masked).
        mask: (N, T) bool, True where the position counts; ``None`` counts all.
        scale: multiplies the logits after the product (x-transformers' tied-embedding scale).
        impl: "torch" (chunked torch, above), "triton" (the kernels of
            :mod:`fastdpo.kernels.linear_sequence_logprobs`: logits tiles live in registers
            only, every row is processed, no host sync) or "auto" (Triton on CUDA).

    Returns:
        float32 (N,) scores, as :func:`fastdpo.sequence_logprobs`.
    """
    targets, mask, scale = _check_linear_inputs(hidden, weight, targets, mask, scale)
    which = resolve_impl(impl, hidden.device)
    return _LinearLogprobs.apply(hidden, weight, targets, mask, scale, which)


# ----------------------------------------------------------------------------- fused DPO head


PairLoss = Callable[[Tensor, Tensor], Tensor]
"""``pair_loss(policy_sums (2k,), pair_index (k,)) -> per-pair losses (k,)``.

``policy_sums`` holds the summed log-probs of the chosen sequences of pairs ``pair_index``
followed by those of their rejected sequences; the callable knows everything else (reference
scores, token counts, beta) and must be differentiable in ``policy_sums``."""


class _FusedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, scale, pair_loss, reduction, count_hits):
        b2, t, d = hidden.shape
        b = b2 // 2
        rows = _gather_rows(hidden, targets, mask)
        need_w = weight.requires_grad
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_rows = torch.empty_like(rows.h)
        sums64 = torch.zeros(b2, dtype=torch.float64, device=hidden.device)  # see _sequence_sums
        hits = torch.zeros(b2 if count_hits else 0, dtype=torch.int64, device=hidden.device)
        losses = torch.empty(b, dtype=torch.float32, device=hidden.device)
        v = weight.shape[0]
        weight_of_pair = 1.0 / b if reduction == "mean" else 1.0
        for pairs, spans in _pair_groups(rows.bounds, b, v):
            h = torch.cat([rows.h[s] for s in spans])
            y = torch.cat([rows.y[s] for s in spans])
            seq = torch.cat([rows.seq[s] for s in spans])
            # Pass 1: score the group's rows, keeping chunk logits while they fit the budget.
            chunks = _chunks(h.shape[0], v, CHUNK_BYTES)
            st = torch.empty(2, h.shape[0], dtype=torch.float32, device=h.device)
            logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            kept: list[Tensor | None] = []
            held = 0
            for c in chunks:
                z = _logits(h[c], weight, scale)
                st[:, c], logp[c] = _stats(z, y[c])
                if count_hits:
                    hits.index_add_(0, seq[c], (z.argmax(-1) == y[c]).long())
                keep = held + z.numel() * 4 <= GROUP_BYTES
                held += z.numel() * 4 if keep else 0
                kept.append(z if keep else None)
                del z
            sums64.index_add_(0, seq, logp.double())
            sums = sums64.float()
            # The group's loss gradient per sequence, from its scores alone.
            index = torch.tensor(pairs, device=hidden.device)
            group_sums = torch.cat((sums[index], sums[index + b])).requires_grad_()
            with torch.enable_grad():
                group_losses = pair_loss(group_sums, index)
                (dsums,) = torch.autograd.grad(group_losses.sum() * weight_of_pair, group_sums)
            losses[index] = group_losses.detach()
            g_of_seq = torch.zeros(b2, dtype=torch.float32, device=hidden.device)
            g_of_seq[index] = dsums[: len(pairs)]
            g_of_seq[index + b] = dsums[len(pairs) :]
            g = g_of_seq.index_select(0, seq)
            # Pass 2: kept logits become the gradient in place; the rest are recomputed.
            grad_h = torch.empty_like(h)
            for i, c in enumerate(chunks):
                z = kept[i] if kept[i] is not None else _logits(h[c], weight, scale)
                kept[i] = None
                dz = _into_grad_(z, st[:, c], y[c], g[c], scale)
                grad_h[c] = _grads(dz, h[c], weight, grad_w)
                del dz
                del z
            start = 0
            for s in spans:
                grad_rows[s] = grad_h[start : start + s.stop - s.start]
                start += s.stop - s.start
        ctx.grad_hidden = _scatter_rows(rows, grad_rows, hidden.shape).to(hidden.dtype)
        ctx.grad_weight = grad_w.to(weight.dtype) if grad_w is not None else None
        sums = sums64.float()
        ctx.mark_non_differentiable(sums, hits)
        return (losses.mean() if reduction == "mean" else losses.sum()), sums, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_hits):
        grad_h = ctx.grad_hidden * grad_loss if ctx.needs_input_grad[0] else None
        grad_w = ctx.grad_weight * grad_loss if ctx.grad_weight is not None else None
        ctx.grad_hidden = ctx.grad_weight = None
        return grad_h, grad_w, None, None, None, None, None, None


def _pair_groups(bounds: list[int], b: int, v: int):
    """Consecutive pairs whose counted rows' float32 logits fit GROUP_BYTES (at least one).

    Yields (pair indices, row slices of their chosen then rejected sequences)."""
    start = 0
    while start < b:
        stop, rows = start, 0
        while stop < b:
            size = (bounds[stop + 1] - bounds[stop]) + (bounds[b + stop + 1] - bounds[b + stop])
            if stop > start and (rows + size) * v * 4 > GROUP_BYTES:
                break
            rows += size
            stop += 1
        spans = [slice(bounds[start], bounds[stop]), slice(bounds[b + start], bounds[b + stop])]
        yield list(range(start, stop)), spans
        start = stop


def fused_linear_pair_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    pair_loss: PairLoss,
    *,
    scale: float | None = None,
    reduction: str = "mean",
    count_hits: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (or sum) over pairs of ``pair_loss``, with the head's gradient made in forward.

    ``hidden`` (2B, T, D) holds B chosen sequences followed by their B rejected ones; each
    group of whole pairs is scored, its loss gradient taken (``pair_loss`` must depend only on
    the pairs it is given), and its logits turned into the gradient in place while they are
    still in memory.  Backward returns the stored gradients times the upstream gradient.

    Returns (loss scalar, float32 (2B,) summed log-probs, int64 (2B,) counts of scored
    positions whose target is the argmax of its logits -- taken from the logits already in
    hand, only with ``count_hits``, else an empty tensor); the last two are detached.
    """
    targets, mask, scale = _check_linear_inputs(hidden, weight, targets, mask, scale)
    if hidden.shape[0] == 0:
        raise ValueError("hidden must hold at least one pair (2 sequences), got 0 sequences")
    if hidden.shape[0] % 2:
        raise ValueError(
            f"hidden must hold 2B sequences (chosen then rejected), got {hidden.shape[0]}"
        )
    _checks.choice("reduction", reduction, ("mean", "sum"))
    return _FusedPairLoss.apply(
        hidden, weight, targets, mask, scale, pair_loss, reduction, count_hits
    )
