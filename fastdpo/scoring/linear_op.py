"""``linear_sequence_logprobs``: sequence log-probs straight from hidden states.

Dimensions: N sequences, T positions, D hidden size, V vocabulary; M counted rows.

``sequence_logprobs(hidden @ weight.T * scale, targets, mask)`` without the (N, T, V) logits
(with ``softcap``, of ``softcap * tanh(hidden @ weight.T * scale / softcap)``: Gemma 2's).
The public function checks its arguments, then calls one ``torch.library`` custom op,
``fastdpo::linear_sequence_logprobs`` (opaque to ``torch.compile``, with a fake
implementation and registered autograd), whose body runs the route chosen per call:

* ``impl="torch"`` -- counted rows gathered, ``torch.mm`` in chunks, torch elementwise work
  (:class:`fastdpo.scoring.rows.TorchFold`); backward recomputes each chunk;
* ``impl="triton", matmul="torch"`` -- the same chunks of counted rows through the library's
  products (cuBLAS on CUDA) with the elementwise work in fastdpo's Triton kernels
  (:class:`fastdpo.scoring.rows.TritonFold`): the three-product route;
* ``impl="triton", matmul="triton"`` -- the cut-cross-entropy-style kernels of
  :mod:`fastdpo.kernels.linear_sequence_logprobs`, which multiply in Triton too: logits tiles
  live in registers only, every row is processed (no host sync), backward recomputes.

``impl="auto"`` is Triton for CUDA tensors, torch otherwise; ``matmul="auto"`` follows
:func:`fastdpo.scoring.cost_model.choose_matmul`.  For the DPO step itself, :mod:`fastdpo.scoring.dpo_head_op`
does better than this op's forward + backward: the loss gradient is known in forward, so no
chunk is recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from . import cost_model
from . import rows as chunks
from .backends import torch_fold as torch_impl
from .backends import triton_fold
from .logits_op import resolve_impl

MATMULS = ("auto", "torch", "triton")


def resolve_matmul(matmul: str, impl: str, weight: Tensor, softcap: float | None = None, bias: bool = False) -> str:
    """Who multiplies, for an already resolved ``impl``: "torch" or "triton" (never the Triton
    GEMM kernels under a ``softcap`` or with a ``bias``: they do neither)."""
    _checks.choice("matmul", matmul, MATMULS)
    if impl == "torch":
        if matmul == "triton":
            raise ValueError(
                "matmul='triton' (the Triton GEMM kernels) needs impl='triton' (or 'auto' on "
                "CUDA tensors); impl='torch' multiplies with torch"
            )
        return "torch"
    if softcap is not None or bias:
        if matmul == "triton":
            what = "cap logits (softcap)" if softcap is not None else "add a head bias"
            raise ValueError(f"matmul='triton' (the Triton GEMM kernels) does not {what}: use matmul='auto' or 'torch'")
        return "torch"
    if matmul == "auto":
        v, d = weight.shape
        return cost_model.choose_matmul(d, v, weight.dtype)
    return matmul


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastdpo::linear_sequence_logprobs", mutates_args=())
def _linear_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mask: Tensor,
    token_weights: Tensor | None,
    scale: float | None,
    softcap: float | None,
    impl: str,
    matmul: str,
    with_wpo: bool,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(scores (N,), row stats (2, N, T), WPO's sums), float32.

    The row stats are what the backward reads.  ``matmul="torch"``: the fold's, 0 at rows that
    do not count; the Triton fold's (``impl="triton"``) are each row's max and log-sum, whose
    sum is its logsumexp; the torch fold's are zeros (its backward recomputes the softmax from
    the logits and reads none).  ``matmul="triton"``: each row's logsumexp and 0, at every row,
    masked ones included (the GEMM kernels score every row, masked rows with zero hidden
    states).  WPO's sums: (2, N) with ``with_wpo``, per sequence
    ``sum_t log sum_v p_v^2`` and the unweighted ``sum_t log p_t``; else (0,)."""
    n, t, d = hidden.shape
    if matmul == "triton":
        if with_wpo:
            raise ValueError("the Triton GEMM kernels (matmul='triton') do not compute log sum_v p_v^2 (WPO)")
        if softcap is not None or bias is not None:
            raise ValueError("the Triton GEMM kernels (matmul='triton') do not cap logits (softcap) nor add a bias")
        k = triton_fold.linear_kernels()
        # Every row goes to the kernels: gathering the counted rows would need their count on
        # the host.  Masked rows enter with zero hidden states (so a NaN in padding cannot turn
        # 0 * NaN into NaN in a gradient) and a weight of 0 in backward.
        h = hidden.masked_fill(~mask.unsqueeze(-1), 0).reshape(-1, d)
        y = torch.where(mask, targets, 0).reshape(-1)
        logp, lse = k.linear_logprobs_forward(h, weight, y, 1.0 if scale is None else scale)
        stats = torch.stack((lse, torch.zeros_like(lse))).view(2, n, t)
        logp = logp.view(n, t) if token_weights is None else logp.view(n, t) * token_weights
        return torch.where(mask, logp, 0.0).sum(-1), stats, hidden.new_empty(0, dtype=torch.float32)
    plan = chunks.plan_rows(mask)
    fold = chunks.FOLDS[impl]
    row_stats, logp, _, log_sum_sq = chunks.score_rows(
        plan.take(hidden), plan.take(targets), weight, scale, fold, chunks.chunk_bytes(hidden.device, chunk_bytes), with_wpo=with_wpo,
        softcap=softcap, bias=bias,
    )
    stats = torch.zeros(2, n * t, dtype=torch.float32, device=hidden.device)
    stats.index_copy_(1, plan.index, row_stats)
    w = plan.take(token_weights) if token_weights is not None else None
    scores = plan.sequence_sums(logp if w is None else logp * w)
    wpo = torch.stack((plan.sequence_sums(log_sum_sq), plan.sequence_sums(logp))) if with_wpo else scores.new_empty(0)
    return scores, stats.view(2, n, t), wpo


@_linear_op.register_fake
def _(hidden, weight, bias, targets, mask, token_weights, scale, softcap, impl, matmul, with_wpo, chunk_bytes):
    n, t, _ = hidden.shape
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n, **f32), hidden.new_empty(2, n, t, **f32), hidden.new_empty((2, n) if with_wpo else (0,), **f32)


@torch.library.custom_op("fastdpo::linear_sequence_logprobs_backward", mutates_args=())
def _linear_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mask: Tensor,
    token_weights: Tensor | None,
    stats: Tensor,
    grad_scores: Tensor,
    scale: float | None,
    softcap: float | None,
    impl: str,
    matmul: str,
    chunk_bytes: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad hidden (N, T, D) or (0,), grad weight (V, D) or (0,), grad bias (V,) or (0,)), in
    the inputs' dtype."""
    n, t, d = hidden.shape
    grad_scores = grad_scores.float()
    if matmul == "triton":
        k = triton_fold.linear_kernels()
        h = hidden.masked_fill(~mask.unsqueeze(-1), 0).reshape(-1, d)
        y = torch.where(mask, targets, 0).reshape(-1)
        g = torch_impl.row_weights(grad_scores, mask, token_weights).reshape(-1)
        grad_h, grad_w = k.linear_logprobs_backward(
            h, weight, y, stats[0].reshape(-1).contiguous(), g, 1.0 if scale is None else scale,
            need_hidden_grad=need_hidden, need_weight_grad=need_weight,
        )
        grad_h = grad_h.view(n, t, d) if grad_h is not None else None
        grad_b = None
    else:
        plan = chunks.plan_rows(mask)
        grad_w = chunks.WeightGrad(weight) if need_weight else None
        grad_b = chunks.BiasGrad(bias) if need_bias else None
        g = grad_scores.index_select(0, plan.seq)
        if token_weights is not None:
            g = g * plan.take(token_weights)
        rows = chunks.row_grads(
            plan.take(hidden), plan.take(targets), weight, scale, chunks.FOLDS[impl],
            stats.reshape(2, n * t).index_select(1, plan.index), g,
            chunks.chunk_bytes(hidden.device, chunk_bytes), grad_w, need_hidden, softcap, bias, grad_b,
        )
        grad_h = plan.put(rows) if need_hidden else None
        grad_w = grad_w.result() if grad_w is not None else None
        if grad_w is None and need_weight:  # no counted row at all
            grad_w = torch.zeros_like(weight)
        grad_b = grad_b.result() if grad_b is not None else None
    return tuple(x if x is not None else hidden.new_empty(0) for x in (grad_h, grad_w, grad_b))


@_linear_backward_op.register_fake
def _(hidden, weight, bias, targets, mask, token_weights, stats, grad_scores, scale, softcap, impl, matmul, chunk_bytes,
      need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)), (
        torch.empty_like(weight) if need_weight else hidden.new_empty(0)
    ), (torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, mask, token_weights, scale, softcap, impl, matmul, _, chunk_bytes = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, mask, token_weights, output[1])
    ctx.options = (scale, softcap, impl, matmul, chunk_bytes)
    ctx.mark_non_differentiable(output[1], output[2])
    # Outputs nobody differentiates get None in backward, not zeros of their size (a zeros
    # tensor the size of the logits, or of the head weight, per step otherwise).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_scores, _grad_stats, _grad_wpo):
    hidden, weight, bias, targets, mask, token_weights, stats = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_h or need_w or need_b):
        return (None,) * 12
    if grad_scores is None:
        grad_scores = torch.zeros(hidden.shape[0], device=hidden.device)
    grad_h, grad_w, grad_b = _linear_backward_op(
        hidden, weight, bias, targets, mask, token_weights, stats, grad_scores, *ctx.options, need_h, need_w, need_b
    )
    return (grad_h if need_h else None), (grad_w if need_w else None), (grad_b if need_b else None), *(None,) * 9


_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def check_linear_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None, scale, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, float | None]:
    """Validate ``linear_sequence_logprobs`` arguments; return (int64 targets, bool mask,
    float scale or None).  Shapes, dtypes and devices here; the token range is checked as
    :func:`fastdpo._checks.token_range` does (no host sync on accelerators)."""
    _checks.tensor("hidden", hidden, ndim=3)
    _checks.tensor("weight", weight, ndim=2)
    for name, x in (("hidden", hidden), ("weight", weight)):
        _checks.float_dtype(name, x)
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
        _checks.bool_mask("mask", mask, (n, t), "True = the position counts")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(
                f"bias must be a ({weight.shape[0]},) tensor of the weight's dtype {weight.dtype}, got "
                f"{bias.dtype} {tuple(bias.shape)}"
            )
    _checks.same_device(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask)
    if scale is not None:
        scale = float(scale)
        if not scale == scale or scale in (float("inf"), float("-inf")):
            raise ValueError(f"scale must be finite, got {scale}")
    _checks.token_range("targets", targets, weight.shape[0], where=mask)
    return targets.long(), mask, scale


def linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    bias: Tensor | None = None,
    impl: str = "auto",
    matmul: str = "auto",
    token_weights: Tensor | None = None,
) -> Tensor:
    """Masked per-sequence sums of target log-probs of ``hidden @ weight.T * scale``.

    Same result as ``sequence_logprobs(hidden @ weight.T * scale, targets, mask)`` (the product
    rounded in the inputs' dtype, the scale applied after it, everything after in float32),
    differentiable w.r.t. ``hidden`` and ``weight``, without ever holding the (N, T, V)
    logits: peak extra memory is O(N*T*D + chunk + V*D).  Backward recomputes each chunk's
    logits from the saved row statistics; for a whole DPO step, :class:`fastdpo.DPO` avoids
    that recomputation (:mod:`fastdpo.scoring.dpo_head_op`).

    Args:
        hidden: (N, T, D) float32, bfloat16 or float16 final hidden states.
        weight: (V, D), same dtype: the output head (``nn.Linear.weight``, or a tied
            embedding's weight).
        targets: (N, T) integer ids; counted ids must be in [0, V) (ignored where masked).
        mask: (N, T) bool, True where the position counts; ``None`` counts all.
        scale: multiplies the logits after the product (x-transformers' tied-embedding scale).
        softcap: None, or a finite cap > 0: the logits (after the scale) become ``softcap *
            tanh(logits / softcap)`` (Gemma 2's ``final_logit_softcapping``), in float32 in
            the fold, the gradient through it; with ``matmul="triton"`` a ``ValueError``.
        bias: None, or the head's (V,) bias (``nn.Linear``'s, weight's dtype), added by the
            product (one ``addmm``) before the scale; differentiable; with ``matmul="triton"``
            a ``ValueError``.
        impl: "torch", "triton" or "auto" (Triton on CUDA), see the module docstring.
        matmul: with ``impl="triton"``, who multiplies: "torch" (the library's products over
            counted rows, Triton for the elementwise work; one host sync per call to count the
            rows), "triton" (the Triton GEMM kernels, every row, no sync) or "auto"
            (:func:`fastdpo.scoring.cost_model.choose_matmul`; "torch" under a softcap).  With
            ``impl="torch"``: "auto" or "torch".
        token_weights: optional (N, T) floating weight of each position's log-prob (a constant,
            not differentiated; e.g. LD-DPO's, :mod:`fastdpo.losses.weighting`), as in
            :func:`fastdpo.sequence_logprobs`.

    Returns:
        float32 (N,) scores, as :func:`fastdpo.sequence_logprobs`.
    """
    targets, mask, scale = check_linear_inputs(hidden, weight, targets, mask, scale, bias)
    softcap = check_softcap(softcap)
    token_weights = _checks.token_weights(token_weights, mask)
    which = resolve_impl(impl, hidden.device)
    matmul = resolve_matmul(matmul, which, weight, softcap, bias is not None)
    return run_linear(hidden, weight, targets, mask, scale, which, matmul, token_weights, softcap=softcap, bias=bias)[0]


def check_softcap(softcap) -> float | None:
    """None, or ``softcap`` as a finite float > 0 (a ``ValueError`` else)."""
    return None if softcap is None else _checks.positive_finite("softcap", softcap)


def run_linear(
    hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, scale: float | None, impl: str, matmul: str,
    token_weights: Tensor | None = None, with_wpo: bool = False, softcap: float | None = None, bias: Tensor | None = None,
    chunk_bytes: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """The op with ``impl`` and ``matmul`` already resolved, on inputs whose shapes, dtypes and
    devices (and token range, and float32 ``token_weights``) are already checked: what
    :class:`fastdpo.scoring.router.Scorer` calls, with its module's ``chunk_bytes`` (0: the device's
    default, :func:`fastdpo.scoring.rows.chunk_bytes`).  Returns (scores (N,), with ``with_wpo`` WPO's sums (2, N):
    per sequence ``sum_t log sum_v p_v^2`` and the unweighted ``sum_t log p_t``, else None)."""
    scores, _, wpo = _linear_op(hidden, weight, bias, targets.long(), mask, token_weights, scale, softcap, impl, matmul,
                                with_wpo, chunk_bytes)
    return scores, (wpo if with_wpo else None)
