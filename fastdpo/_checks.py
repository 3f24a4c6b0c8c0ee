"""Argument checks shared by the public entry points.

Every check raises a ``TypeError`` (wrong kind or dtype) or a ``ValueError`` (wrong shape or
value) whose message names the argument, what was expected and what was given.  Checks on
tensor *values* (token ranges) read the data: on CPU tensors that costs nothing extra, on
accelerators it is done with ``torch._assert_async`` so the hot path never waits on the host.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels._common import SUPPORTED_DTYPES as FLOAT_DTYPES  # one set for ops and kernels

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Verdict:
    """Whether a model (or a tensor) can do something: true when it can, else false with the
    reason (``why_not``) that an error or a warning then quotes."""

    why_not: str = ""

    def __bool__(self) -> bool:
        return not self.why_not


YES = Verdict()


def no(why_not: str) -> Verdict:
    """A false :class:`Verdict` with its reason."""
    if not why_not:
        raise ValueError("a refusal needs its reason")
    return Verdict(why_not)


def tensor(name: str, x, *, ndim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def integer_tokens(name: str, x, *, ndim: int) -> Tensor:
    tensor(name, x, ndim=ndim)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {x.dtype}")
    return x


def float_dtype(name: str, x: Tensor) -> Tensor:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")
    return x


def bool_mask(name: str, x, shape: tuple[int, ...], meaning: str) -> Tensor:
    """A bool mask of ``shape``; ``meaning`` says what True means for this mask (e.g. "True =
    the position counts", "True = a prompt position, excluded from the scores")."""
    tensor(name, x)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a torch.bool tensor ({meaning}), got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def same_device(**tensors: Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )


def token_range(name: str, tokens: Tensor, high: int | None, where: Tensor | None = None) -> None:
    """Check ``0 <= tokens < high`` (only at positions where ``where`` is True, if given)."""
    if tokens.numel() == 0:
        return
    bad = tokens < 0
    if high is not None:
        bad = bad | (tokens >= high)
    if where is not None:
        bad = bad & where
    expected = f"[0, {high})" if high is not None else ">= 0"
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} holds token id {int(tokens[idx])} at index {idx}, outside {expected}"
            )
    else:
        # No host sync on accelerators (and no data-dependent branch in a compiled graph):
        # fail the stream instead.
        torch._assert_async(~bad.any(), f"{name} holds a token id outside {expected}")


def real_number(name: str, value) -> float:
    """A finite real Python number (no bool, no tensor: a tensor here would need a host sync
    to check, and these options are constants by design)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real Python number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def positive_finite(name: str, value) -> float:
    """A finite real Python number > 0 (``beta``)."""
    v = real_number(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def token_weights(w, mask: Tensor, name: str = "token_weights") -> Tensor | None:
    """None, or a floating tensor of ``mask``'s shape and device (a weight per position's
    log-prob, a constant): returned as detached float32."""
    if w is None:
        return None
    tensor(name, w, ndim=mask.ndim)
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {w.dtype}")
    if w.shape != mask.shape:
        raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(w.shape)}")
    same_device(mask=mask, **{name: w})
    return w.detach().float()


def byte_budget(name: str, value) -> int:
    """0 for None (the device's default), else ``value`` as an int >= 1 (bytes)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None (the device's default) or a number of bytes >= 1, got {value!r}")
    return value


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
