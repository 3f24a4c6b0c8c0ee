"""Functional ops: masked per-sequence log-probabilities of target tokens.

This is where a user's call turns into math: :func:`sequence_logprobs` checks its arguments,
then hands them to one implementation chosen per call by ``impl``:

* ``"torch"`` -- :mod:`fastdpo.torch_impl`, chunked pure torch (any device);
* ``"triton"`` -- the fused Triton kernels of :mod:`fastdpo.kernels` (CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``);
* ``"auto"`` -- Triton for CUDA tensors when available, torch otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .torch_impl import TorchOptions, TorchSequenceLogprobs

IMPLS = ("auto", "torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` names for tensors on ``device`` ("torch" or "triton")."""
    _checks.choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "triton":
        _require_triton(device)
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _triton_kernels() is not None


def _triton_kernels():
    try:
        from .kernels import sequence_logprobs as k
    except ImportError:
        return None
    return k


def _require_triton(device: torch.device) -> None:
    if _triton_kernels() is None:
        raise NotImplementedError(
            "impl='triton' needs the fused kernels in fastdpo.kernels, which are not available "
            "in this build (is triton installed?); use impl='torch' or impl='auto'"
        )
    if device.type != "cuda":
        import triton

        if not triton.knobs.runtime.interpret:
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got tensors on {device}; set "
                "TRITON_INTERPRET=1 before importing fastdpo to run the kernels on the CPU "
                "(slow, for testing), or use impl='torch'"
            )


def check_logprob_inputs(
    logits: Tensor, targets: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validate ``sequence_logprobs`` arguments; return (int64 targets, bool mask)."""
    _checks.tensor("logits", logits, ndim=3)
    if logits.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16 or float16, got dtype {logits.dtype}"
        )
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
        _checks.bool_mask("mask", mask, (n, t))
    _checks.same_device(logits=logits, targets=targets, mask=mask)
    _checks.token_range("targets", targets, v, where=mask)
    return targets.long(), mask


def sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    """Masked sum of target-token log-probabilities per sequence.

    ``out[n] = sum_t mask[n, t] * log_softmax(logits[n, t])[targets[n, t]]``, the sequence
    score of DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), differentiable w.r.t.
    ``logits``.  No (N, T, V) log-softmax or softmax is ever materialized; all arithmetic is
    float32 whatever the logits dtype.

    Args:
        logits: (N, T, V) float32, bfloat16 or float16; any strides.
        targets: (N, T) integer token ids, aligned with ``logits`` (row (n, t) scores
            ``targets[n, t]``).  Ids at masked positions are never read and may be anything
            (e.g. -100); counted ids must lie in [0, V) (``ValueError`` on CPU tensors; on
            CUDA a device-side assert).
        mask: (N, T) bool, True where the position counts; ``None`` counts every position.
        impl: "auto" (Triton on CUDA when available, else torch), "torch" or "triton".
        inplace_backward: write the gradient into ``logits`` itself instead of a new buffer,
            saving one (N, T, V) tensor.  Only for logits nobody else reads afterwards.

    Returns:
        float32 (N,) scores.  A row with no counted position scores exactly 0.  Non-finite
        logits in a counted row give a non-finite score (NaN for NaN or +inf entries,
        -inf for a target whose logit is -inf); masked rows never affect the result.
    """
    targets, mask = check_logprob_inputs(logits, targets, mask)
    which = resolve_impl(impl, logits.device)
    if which == "triton":
        from .triton_impl import triton_sequence_logprobs

        return triton_sequence_logprobs(logits, targets, mask, inplace_backward=inplace_backward)
    return TorchSequenceLogprobs.apply(
        logits, targets, mask, TorchOptions(inplace_backward=inplace_backward)
    )
