"""The Triton kernels (:mod:`fastdpo.kernels`, the top-level ``kernels/`` folder) as the scoring
code calls them: the two kernel modules, loaded on first use, and :class:`TritonFold`, the fused
head's elementwise work in them.

The kernel modules are imported when a call first needs them, not with fastdpo: importing them
takes about a second (triton decorates every kernel), which a CPU-only user never needs to pay.
This module is the one place the scoring code reaches the kernels from.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor


def sequence_kernels() -> ModuleType | None:
    """:mod:`fastdpo.kernels.sequence_logprobs`, or None when triton or either kernel module
    (this one's or the fused head's, :func:`linear_kernels`) cannot be imported."""
    try:
        from ...kernels import linear_sequence_logprobs as _  # noqa: F401
        from ...kernels import sequence_logprobs as k
    except ImportError:
        return None
    return k


def linear_kernels() -> ModuleType:
    """:mod:`fastdpo.kernels.linear_sequence_logprobs` (the Triton GEMM route's kernels)."""
    from ...kernels import linear_sequence_logprobs as k

    return k


def interpreting() -> bool:
    """Whether triton runs the kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    from ...kernels._common import interpreting as triton_interprets

    return triton_interprets()


class TritonFold:
    """The elementwise work in fastdpo's Triton kernels, on logits in the weight's dtype:
    one launch for the row statistics and target log-probs, one that writes the gradient over
    the logits in place (so the two gradient products read it as they would the model's).  On
    a GPU the second read of the logits costs less than writing probabilities in the first
    pass would, so kept logits stay logits."""

    name = "triton"
    keeps_probabilities = False  # kept logits stay logits

    @staticmethod
    def dtype(weight: Tensor) -> torch.dtype:
        return weight.dtype

    @staticmethod
    def stats(
        z: Tensor, y: Tensor, keep: bool = False, sq_out: Tensor | None = None, softcap: float | None = None
    ) -> tuple[Tensor, Tensor]:
        # A softcap is applied in float32 as the kernel reads the logits; z stays uncapped.
        logp, row_stats = sequence_kernels().row_logprobs(z, y, sq_out, softcap)
        return row_stats, logp

    @staticmethod
    def grad_(
        z: Tensor, row_stats: Tensor, y: Tensor, g: Tensor, scale: float | None, kept: bool = False,
        softcap: float | None = None,
    ) -> Tensor:
        # The scale folds into the row weight: d logp / dz scaled, rounded once to z's dtype.
        return sequence_kernels().row_logprob_grad_(z, y, row_stats, g if scale is None else g * scale, softcap)
