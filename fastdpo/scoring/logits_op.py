"""Functional ops: masked per-sequence log-probabilities of target tokens.

This is where a user's call turns into math.  :func:`sequence_logprobs` (and
:func:`sequence_logprobs_with_reference`) check their arguments, then call one ``torch.library`` custom
op, ``fastdpo::sequence_logprobs``, whose body runs one implementation chosen per call by
``impl``:

* ``"torch"`` -- :mod:`fastdpo.scoring.backends.torch_fold`, chunked pure torch (any device);
* ``"triton"`` -- the fused kernels of :mod:`fastdpo.kernels.sequence_logprobs` (CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"auto"`` -- Triton for CUDA tensors when available, torch otherwise.

Being a custom op (with a fake implementation and registered autograd), it is opaque to
``torch.compile``: a compiled model calling it does not graph-break, whatever the
implementation does inside.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks
from .backends import torch_fold as torch_impl
from .backends import triton_fold

IMPLS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------- dispatch


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` names for tensors on ``device``: "torch" or "triton"."""
    _checks.choice("impl", impl, IMPLS)
    return _resolve(impl, torch.device(device).type)


@torch.compiler.assume_constant_result
def _resolve(impl: str, device_type: str) -> str:
    # A constant of the compiled graph: torch.compile calls this once, eagerly (it asks
    # triton whether it interprets, which a trace cannot).
    if impl == "auto":
        return "triton" if device_type == "cuda" and triton_fold.sequence_kernels() is not None else "torch"
    if impl == "triton":
        if triton_fold.sequence_kernels() is None:
            raise NotImplementedError(
                "impl='triton' needs triton and the kernels in fastdpo.kernels, which cannot "
                "be imported here; use impl='torch' or impl='auto'"
            )
        if device_type != "cuda":
            if not triton_fold.interpreting():
                raise ValueError(
                    f"impl='triton' needs CUDA tensors, got tensors on {device_type}; set "
                    "TRITON_INTERPRET=1 before importing fastdpo to run the kernels on the "
                    "CPU (slow, for testing), or use impl='torch'"
                )
    return impl


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastdpo::sequence_logprobs", mutates_args=())
def _logprobs_op(
    logits: Tensor,
    ref_logits: Tensor | None,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor | None,
    impl: str,
    inplace_backward: bool,
    keep_probs: bool,
    with_wpo: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(scores (N,), ref_scores (N,) or (0,), row stats (2, N, T): max and log-sum, softmax
    (N, T, V) for the backward to finish or (0,), WPO's sums (2, N) of the policy logits with
    ``with_wpo`` or (0,)), float32.  ``weights``: (N, T) float32 weights of the rows' log-probs in
    both scores, or None.  ``keep_probs``: torch path, float32 logits that want a gradient (see
    :func:`fastdpo.scoring.backends.torch_fold.forward`)."""
    probs = None
    wpo = torch.empty(2, logits.shape[0], dtype=torch.float32, device=logits.device) if with_wpo else None
    if impl == "triton":
        k = triton_fold.sequence_kernels()
        scores, ref_scores, stats = k.sequence_logprobs_forward(
            logits, targets, mask, ref_logits, weights=weights, wpo_sums=wpo
        )
    else:
        if keep_probs:
            probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        scores, stats = torch_impl.forward(logits, targets, mask, probs, weights, wpo)
        ref_scores = None
        if ref_logits is not None:
            ref_scores, _ = torch_impl.forward(ref_logits, targets, mask, weights=weights)
    if ref_scores is None:
        ref_scores = scores.new_empty(0)
    empty = scores.new_empty(0)
    return scores, ref_scores, stats, probs if probs is not None else empty, wpo if wpo is not None else empty.clone()


@_logprobs_op.register_fake
def _(logits, ref_logits, targets, mask, weights, impl, inplace_backward, keep_probs, with_wpo):
    n, t, _ = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        torch.empty(n, **f32),
        torch.empty(n if ref_logits is not None else 0, **f32),
        torch.empty(2, n, t, **f32),
        torch.empty(logits.shape if keep_probs and impl == "torch" else (0,), **f32),
        torch.empty((2, n) if with_wpo else (0,), **f32),
    )


@torch.library.custom_op("fastdpo::sequence_logprobs_backward", mutates_args=())
def _logprobs_backward_op(
    logits: Tensor, targets: Tensor, mask: Tensor, weights: Tensor | None, stats: Tensor, grad_scores: Tensor,
    impl: str,
) -> Tensor:
    return _backward(logits, targets, mask, weights, stats, grad_scores, impl, inplace=False)


@_logprobs_backward_op.register_fake
def _(logits, targets, mask, weights, stats, grad_scores, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastdpo::sequence_logprobs_backward_", mutates_args=("logits",))
def _logprobs_backward_inplace_op(
    logits: Tensor, targets: Tensor, mask: Tensor, weights: Tensor | None, stats: Tensor, grad_scores: Tensor,
    impl: str,
) -> None:
    _backward(logits, targets, mask, weights, stats, grad_scores, impl, inplace=True)


def _backward(logits, targets, mask, weights, stats, grad_scores, impl, *, inplace):
    grad_scores = grad_scores.float().contiguous()
    if impl == "triton":
        k = triton_fold.sequence_kernels()
        return k.sequence_logprobs_backward(logits, targets, mask, stats, grad_scores, inplace=inplace, weights=weights)
    return torch_impl.backward(logits, targets, mask, stats, grad_scores, inplace=inplace, weights=weights)


def _setup_context(ctx, inputs, output):
    logits, _, targets, mask, weights, impl, inplace_backward, keep_probs, _ = inputs
    _, _, stats, probs, wpo = output
    ctx.save_for_backward(logits, targets, mask, weights, stats)
    ctx.impl, ctx.inplace_backward = impl, inplace_backward
    # Not a saved tensor: the first backward turns it into the gradient it returns, and a
    # second one (retain_graph) recomputes from the saved logits instead.
    ctx.probs = probs if probs.numel() else None
    ctx.mark_non_differentiable(output[1], stats, probs, wpo)
    # Outputs nobody differentiates get None in backward, not zeros of their size (a zeros
    # tensor the size of the logits, or of the head weight, per step otherwise).
    ctx.set_materialize_grads(False)


def _logprobs_autograd_backward(ctx, grad_scores, _grad_ref, _grad_stats, _grad_probs, _grad_wpo):
    logits, targets, mask, weights, stats = ctx.saved_tensors
    probs, ctx.probs = ctx.probs, None
    grad = None
    if ctx.needs_input_grad[0]:
        if grad_scores is None:
            grad_scores = torch.zeros(logits.shape[0], device=logits.device)
        if probs is not None:  # eager only (see _keep_probs): no op to dispatch through
            grad = torch_impl.backward_from_probs(probs, targets, mask, grad_scores.float(), weights)
        elif ctx.inplace_backward:
            _logprobs_backward_inplace_op(logits, targets, mask, weights, stats, grad_scores, ctx.impl)
            grad = logits
        else:
            grad = _logprobs_backward_op(logits, targets, mask, weights, stats, grad_scores, ctx.impl)
    return grad, *(None,) * 8


_logprobs_op.register_autograd(_logprobs_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _check_range(targets: Tensor, mask: Tensor, v: int, impl: str) -> None:
    """The torch path's gather would read an out-of-vocab id: check them, as
    linear_sequence_logprobs does (a ValueError on CPU tensors, an async assert elsewhere).
    The kernels never read one (they score it NaN), so they need no check and no sync."""
    if impl == "torch":
        _checks.token_range("targets", targets, v, where=mask)


def _keep_probs(logits: Tensor, impl: str, inplace: bool) -> bool:
    """Whether the torch path computes the softmax once, in forward, into the buffer that
    becomes the gradient: float32 logits that will get a gradient, not overwritten in place
    (that route keeps memory to the logits alone), run eagerly (a compiled graph or a
    torch.func transform cannot carry the buffer from forward to backward outside the saved
    tensors, see _setup_context)."""
    return (
        impl == "torch"
        and not inplace
        and logits.dtype == torch.float32
        and torch.is_grad_enabled()
        and logits.requires_grad
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def _can_overwrite(logits: Tensor, impl: str) -> bool:
    """Whether the gradient can be written over ``logits``: each element must own its memory
    (not an expanded or otherwise overlapping view), and the kernels write rows of unit V
    stride.  Otherwise ``inplace_backward`` quietly falls back to a fresh buffer."""
    if torch._debug_has_internal_overlap(logits) != 0:
        return False
    return impl != "triton" or logits.stride(-1) == 1 or logits.shape[-1] == 1


def check_logprob_inputs(
    logits: Tensor, targets: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validate ``sequence_logprobs`` arguments; return (int64 targets, bool mask).

    Shapes, dtypes and devices only; the token range is checked once the implementation is
    known (:func:`_check_range`: the kernels need none).
    """
    _checks.tensor("logits", logits, ndim=3)
    _checks.float_dtype("logits", logits)
    n, t, v = logits.shape
    if v < 1:
        raise ValueError(f"logits must have a vocabulary dimension of size >= 1, got {v}")
    _checks.integer_tokens("targets", targets, ndim=2)
    if tuple(targets.shape) != (n, t):
        raise ValueError(
            f"targets must have shape (N, T) = {(n, t)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if mask is None:
        mask = torch.ones(n, t, dtype=torch.bool, device=logits.device)
    else:
        _checks.bool_mask("mask", mask, (n, t), "True = the position counts")
    _checks.same_device(logits=logits, targets=targets, mask=mask)
    return targets.long(), mask


def sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    impl: str = "auto",
    inplace_backward: bool = False,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Masked sum of target-token log-probabilities per sequence.

    ``out[n] = sum_t mask[n, t] * log_softmax(logits[n, t])[targets[n, t]]``, the sequence
    log-likelihood of DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), differentiable
    w.r.t. ``logits``.  No (N, T, V) log-softmax or softmax is ever materialized; all
    arithmetic is float32 whatever the logits dtype.

    Args:
        logits: (N, T, V) float32, bfloat16 or float16; any strides.
        targets: (N, T) integer token ids, aligned with ``logits`` (row (n, t) scores
            ``targets[n, t]``).  Ids at masked positions are never read and may be anything
            (e.g. -100).  A counted id outside [0, V): ``impl="torch"`` raises ``ValueError``
            on CPU tensors and fails a device-side assert on CUDA; the Triton kernels score it
            NaN (never reading out of bounds; no host sync to check it).
        mask: (N, T) bool, True where the position counts; ``None`` counts every position.
        impl: "auto" (Triton on CUDA when available, else torch), "torch" or "triton".
        inplace_backward: write the gradient into ``logits`` itself instead of a new buffer,
            saving one (N, T, V) tensor.  Only for logits nobody reads afterwards.  Ignored
            (a new buffer is used) where it cannot be done: logits whose elements share memory
            (an ``expand``), or, for the kernels, a vocabulary stride other than 1; and with
            ``impl="torch"`` for logits of at most :data:`SMALL_ELEMENTS` elements, which take a
            few plain autograd ops (same contract: at that size a call is dispatch, not work).
        token_weights: optional (N, T) floating weights: ``out[n] = sum_t mask * w[n, t] *
            log_softmax(...)``, and each row's gradient is weighted alike (a constant, not
            differentiated; e.g. LD-DPO's, :mod:`fastdpo.losses.weighting`).  Values at masked
            positions are never read.

    Returns:
        float32 (N,) scores.  A sequence with no counted position scores exactly 0.  NaN or
        +inf logits in a counted row give a NaN score; a counted target whose logit is -inf
        scores -inf; masked rows never affect the scores and get an exactly zero gradient.
    """
    targets, mask = check_logprob_inputs(logits, targets, mask)
    token_weights = _checks.token_weights(token_weights, mask)
    return run_logprobs(logits, targets, mask, resolve_impl(impl, logits.device), inplace_backward, token_weights)[0]


def run_logprobs(
    logits: Tensor, targets: Tensor, mask: Tensor, impl: str, inplace_backward: bool,
    token_weights: Tensor | None = None, with_wpo: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`sequence_logprobs` on checked arguments (``impl`` resolved, ``token_weights``
    float32 or None): what :class:`fastdpo.scoring.router.Scorer` calls.  Returns (scores (N,), with
    ``with_wpo`` WPO's sums (2, N), detached: per sequence ``sum_t log sum_v p_v^2`` and the
    unweighted ``sum_t log p_t``; else None)."""
    if impl == "torch" and is_small(logits.numel()):
        return _small_logprobs(logits, targets, mask, token_weights, with_wpo)
    _check_range(targets, mask, logits.shape[-1], impl)
    inplace = inplace_backward and _can_overwrite(logits, impl)
    keep = _keep_probs(logits, impl, inplace)
    scores, _, _, _, wpo = _logprobs_op(logits, None, targets, mask, token_weights, impl, inplace, keep, with_wpo)
    return scores, (wpo if with_wpo else None)


# Logits up to this many elements (256 KiB of float32) take plain autograd ops: at that size a
# call is dispatch, not arithmetic, and the custom op's machinery (its wrappers, the box plan)
# would cost several times the work.  The memory the plain ops keep is as small.
SMALL_ELEMENTS = 1 << 16


def is_small(logits_numel: int) -> bool:
    """Whether logits of this many elements take the plain ops on the torch path (eagerly: a
    compiled graph keeps the op).  :class:`fastdpo.scoring.router.Scorer` asks it of a fused head's
    step too, which then builds its logits and scores them here."""
    return logits_numel <= SMALL_ELEMENTS and not torch.compiler.is_compiling()


def _small_logprobs(
    logits: Tensor, targets: Tensor, mask: Tensor, weights: Tensor | None = None, with_wpo: bool = False
) -> tuple[Tensor, Tensor | None]:
    """run_logprobs of small logits in a few plain autograd ops, the same contract: masked
    rows are zeroed before the log-softmax (no non-finite value of theirs reaches a score or a
    gradient), ids at masked positions are never read, a counted id outside [0, V) raises."""
    safe = torch.where(mask, targets, 0)
    # Rows are independent: a masked row only reaches the result through a NaN or inf of its
    # own (0 * NaN in the gradient), so the masking pass (the dearest op here) runs only then.
    # (A sum is finite only if every term is: one cheap reduction; an overflow merely masks.)
    z = logits if bool(logits.sum().isfinite()) else torch.where(mask.unsqueeze(-1), logits, 0.0)
    lsm = torch.log_softmax(z, -1, dtype=torch.float32)
    try:
        picked = lsm.gather(-1, safe.unsqueeze(-1))
    except RuntimeError:  # gather refuses an out-of-range index: say which, as the op does
        _checks.token_range("targets", targets, logits.shape[-1], where=mask)
        raise
    picked = picked.squeeze(-1)
    scores = torch.where(mask, picked if weights is None else picked * weights, 0.0).sum(-1)
    if not with_wpo:
        return scores, None
    with torch.no_grad():
        log_sq = torch_impl.log_sum_sq(lsm.exp())
        wpo = torch.stack([torch.where(mask, x, 0.0).sum(-1, dtype=torch.float64) for x in (log_sq, picked)]).float()
    return scores, wpo


def sequence_logprobs_with_reference(
    logits: Tensor,
    ref_logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    impl: str = "auto",
    inplace_backward: bool = False,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Policy and reference scores in one pass: ``(sequence_logprobs(logits, ...),
    sequence_logprobs(ref_logits, ...).detach())``.

    The Triton path reads each policy row and the matching reference row in the same program
    (one launch).  Only the policy scores are differentiable.  Both (N, T, V) tensors must be
    alive at once, so prefer two :func:`sequence_logprobs` calls when memory is tight (as
    :class:`fastdpo.DPO` does by default).

    Args:
        logits, ref_logits: (N, T, V) float32, bfloat16 or float16 (dtypes may differ).
        targets, mask, impl, inplace_backward, token_weights: as in :func:`sequence_logprobs`.
    """
    targets, mask = check_logprob_inputs(logits, targets, mask)
    token_weights = _checks.token_weights(token_weights, mask)
    _checks.tensor("ref_logits", ref_logits, ndim=3)
    _checks.float_dtype("ref_logits", ref_logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(
            f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(ref_logits.shape)}"
        )
    _checks.same_device(logits=logits, ref_logits=ref_logits)
    which = resolve_impl(impl, logits.device)
    _check_range(targets, mask, logits.shape[-1], which)
    inplace = inplace_backward and _can_overwrite(logits, which)
    scores, ref_scores, _, _, _ = _logprobs_op(
        logits, ref_logits.detach(), targets, mask, token_weights, which, inplace,
        _keep_probs(logits, which, inplace), False,
    )
    return scores, ref_scores


def sequence_logprobs_pair(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """The earlier name of :func:`sequence_logprobs_with_reference` (kept for one release,
    with a ``DeprecationWarning``: "pair" now means a preference pair only)."""
    warnings.warn("fastdpo.sequence_logprobs_pair is now fastdpo.sequence_logprobs_with_reference",
                  DeprecationWarning, stacklevel=2)
    return sequence_logprobs_with_reference(*args, **kwargs)
