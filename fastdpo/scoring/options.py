"""The options of every module that say how the scores are computed: :class:`ComputeOptions`.
They choose routes, implementations and memory budgets, never the numbers beyond float
rounding (each field's doc is the option's one docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from .._options import option


@dataclass(frozen=True, kw_only=True)
class ComputeOptions:
    """How the scores are computed: the head's route, who runs the elementwise work, budgets."""

    head: str = option("auto", """
        ``"auto"`` (default) fuses the head product into the loss whenever the model's adapter
        (:mod:`fastdpo.models`) can reproduce the model's head exactly, and scores logits
        otherwise (warning once with the reason); ``"fused"`` insists (a ``ValueError`` with the
        reason, at construction and at any call that cannot fuse); ``"logits"`` always scores the
        model's logits.  A model wrapped or changed after construction is looked at again on its
        first call on each device.  On the torch path, a fused step of at most
        ``fastdpo.scoring.logits_op.SMALL_ELEMENTS`` logits per model builds them from the hidden
        states (the same product and scale) and scores them with plain ops: at that size a step's
        head is dispatch, not work.""")
    impl: str = option("auto", """
        ``"auto"`` (Triton kernels for CUDA tensors, torch otherwise), ``"torch"`` or
        ``"triton"``, for every route (:func:`fastdpo.sequence_logprobs`,
        :func:`fastdpo.linear_sequence_logprobs`).""")
    matmul: str = option("auto", """
        on the fused head with ``impl`` resolving to ``"triton"``: who multiplies.  ``"torch"``
        (the library's products, cuBLAS on CUDA, over completion rows, with Triton kernels for
        the elementwise work: three products a step), ``"triton"`` (the Triton GEMM kernels over
        every row, backward recomputing) or ``"auto"``
        (:func:`fastdpo.scoring.cost_model.choose_matmul`).""")
    inplace_backward: bool = option(True, """
        on the logits route, let the policy's logits (made by this module's own call to the
        model) take their gradient in place, so the loss adds no (2B, L-1, V) buffer to them.
        Used only when they come straight from a linear head.""")
    chunk_bytes: int | None = option(None, """
        the fused head's chunk: the bytes of logits (in the fold's dtype) one product makes at a
        time (at least one row).  With gradients the DPO head makes a group's kept logits in one
        product, and its other products take as many rows as that buffer holds where it is
        larger (no more peak: the buffer is held anyway).  ``None`` (default): the device's,
        :func:`fastdpo.scoring.rows.chunk_bytes`.""")
    group_bytes: int | None = option(None, """
        the DPO head's keep budget: the logits one group of whole pairs keeps between its scoring
        and its gradient (at least one pair is a group; logits beyond it are made again).
        ``None`` (default): the device's, :func:`fastdpo.scoring.rows.group_bytes`.  Both budgets
        trade peak memory for time, never the numbers: every budget gives the same scores and
        gradients to float rounding.""")
