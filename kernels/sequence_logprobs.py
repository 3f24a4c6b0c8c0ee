"""Per-sequence sums of token log-probabilities, forward and backward, in Triton.

Dimensions: N sequences, T positions, V vocabulary entries. A *row* is one position (n, t):
its V logits, its target id and its mask bit.

    scores[n] = sum_t where(mask[n, t], logits[n, t, y] - logsumexp(logits[n, t, :]), 0)
    d scores[n] / d logits[n, t, :] = mask[n, t] * (onehot(y) - softmax(logits[n, t, :]))

(the sequence log-likelihood of DPO, Rafailov et al. 2023, arXiv 2305.18290). The forward
reads every counted row of the policy logits (and of the reference logits) once with an
online logsumexp; the backward reads it once more and writes the gradient once, in place if
asked. Rows whose mask is false are never read. A variant of the forward (``HAS_SQ``, for WPO,
arXiv 2406.11827) also folds ``log sum_v softmax(logits)_v^2 = log sum exp(2 (z - m)) - 2 log s``
from the same exps; the backward takes a weight per row (LD-DPO's token weights, or the
sequence's upstream gradient through a stride-0 view).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, SUPPORTED_DTYPES, TRITON_DTYPE, Example, aot_example, autotune_enabled, specialize

__all__ = [
    "sequence_logprobs_forward",
    "sequence_logprobs_backward",
    "row_logprobs",
    "row_logprob_grad_",
    "SUPPORTED_DTYPES",
    "KernelSpec",
    "aot_specs",
    "AOT_VOCABS",
]

# One program streams BYTES_PER_ITER bytes of its row per loop iteration: 4096 float32 or
# 8192 16-bit logits, i.e. with 8 warps 64 bytes (four 128-bit loads) per thread. At the
# <= 64 registers per thread ptxas reports for aligned rows (python -m fastdpo.kernel_report)
# four such programs fit on an SM: 64 KiB of loads in flight per SM, several times the
# ~15 KiB Little's law asks of an H100 (3.35 TB/s x ~0.6 us latency / 132 SMs), while each
# iteration's two block reductions (max, sum) stay small next to 16 KiB of loads. Argued,
# not yet timed on a GPU; FASTDPO_AUTOTUNE=1 searches around it.
BYTES_PER_ITER = 16384
MAX_WARPS = 8
_BYTES_PER_THREAD = 64
# The softcap variants' block: 16 float32 logits per thread with 8 warps.  A 16-bit row at
# the full 8192 spills on sm_90 in the forward (odd V: scalar loads) and needs ~150 registers
# in the backward (python -m fastdpo.kernel_report).
CAP_BLOCK_V = 4096


def _default_config(V: int, dtype: torch.dtype, cap: bool = False) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of V logits of `dtype`: the shipped configuration.  With
    a softcap (``cap``), at most CAP_BLOCK_V logits per block in the same warps: the cap's
    float32 work per logit (an exp, a divide, its derivative in backward) is what then fills
    the registers, not the bytes loaded."""
    elem = dtype.itemsize
    # A small vocabulary gets a block no larger than the row (a power of two for tl.arange),
    # so that V=2 does not pay for 8192 masked lanes.
    block_v = min(BYTES_PER_ITER // elem, max(16, triton.next_power_of_2(V)))
    num_warps = min(MAX_WARPS, max(1, block_v * elem // (32 * _BYTES_PER_THREAD)))
    return (min(block_v, CAP_BLOCK_V) if cap else block_v), num_warps


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


# Below this |x| the softcap's tanh(x) is its odd Taylor polynomial to x^13 (truncation under
# 4e-9 relative), where 1 - exp(-2|x|) would lose digits to cancellation (above it, at most
# half an ulp of e over 1 - e >= 0.55: under an ulp).
_TANH_SERIES = tl.constexpr(0.4)


@triton.jit
def _softcap(z, cap):
    """``cap * tanh(z / cap)`` in float32 from one exp (Gemma 2's final_logit_softcapping), and
    the derivative ``1 - tanh^2 = 4e / (1 + e)^2`` with ``e = exp(-2|z / cap|)``: no cancellation
    where the tanh saturates (a few ulps everywhere; triton has no tanh of its own that its
    interpreter runs)."""
    x = z / cap
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0))
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0 + series)))))
    t = tl.where(tl.abs(x) < _TANH_SERIES, series, t)
    one_e = 1.0 + e
    return cap * t, (4.0 * e) / (one_e * one_e)


@triton.jit
def _load_row(row_ptr, cols, V, EVEN_V: tl.constexpr, HAS_CAP: tl.constexpr, cap, other):
    """One block of a row's logits in float32 (capped with HAS_CAP), ``other`` past V."""
    if EVEN_V:
        z = tl.load(row_ptr + cols).to(tl.float32)
    else:
        z = tl.load(row_ptr + cols, mask=cols < V, other=other).to(tl.float32)
    if HAS_CAP:
        z, _ = _softcap(z, cap)
        if not EVEN_V:
            z = tl.where(cols < V, z, other)  # the cap would turn -inf padding into -cap
    return z


@triton.jit
def _row_max_logsum(row_ptr, V, BLOCK_V: tl.constexpr, EVEN_V: tl.constexpr, HAS_SQ: tl.constexpr,
                    HAS_CAP: tl.constexpr, cap):
    """(max m, log sum exp(z - m), and with HAS_SQ log sum_v p_v^2) of one row of V logits in
    float32, one pass, running max + rescaled sums.  m and log s are kept apart, not added into
    a logsumexp: rounding m + log s to float32 would cost ulp(|lse|)/2 of relative error in
    every exp(z - lse) of the backward (about 2e-6 at |lse| ~ 50), where exp((z - m) - log s)
    keeps it to ulp(log s)/2."""
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    q = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        # -inf padding adds exp(-inf) = 0 to the sum and never wins the max.
        z = _load_row(row_ptr, cols, V, EVEN_V, HAS_CAP, cap, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While the row has been all -inf so far, m_new is -inf and shifting by it would
        # give exp(-inf - -inf) = NaN; shifting by 0 gives the right exp(-inf) = 0 terms.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(z - shift)
        rescale = tl.exp(m - shift)
        s = s * rescale + tl.sum(e, axis=0)
        if HAS_SQ:
            # sum exp(2 (z - m)) from the same exps: one multiply-add more per logit, no exp.
            q = q * (rescale * rescale) + tl.sum(e * e, axis=0)
        m = m_new
    # NaN anywhere in the row makes s NaN (exp(NaN) = NaN), whether or not max kept it; so
    # does +inf (exp(inf - inf)), as in float64 log_softmax.
    log_s = tl.log(s)
    # log sum_v p_v^2 = log q - 2 log s: the max's term makes q >= 1, so it never underflows
    # to log 0, however small the other probabilities are.
    log_sq = 0.0
    if HAS_SQ:
        log_sq = tl.log(q) - 2.0 * log_s
    return m, log_s, log_sq


@triton.heuristics({"EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0})
@triton.jit
def _sequence_logprobs_fwd_kernel(
    # pointers: inputs, then (N, T) float32 outputs (contiguous)
    logits_ptr, ref_logits_ptr, targets_ptr, mask_ptr,
    row_vals_ptr, ref_row_vals_ptr, stats_ptr, sq_ptr,
    # strides, in elements, of the N and T dims (the V stride is 1)
    stride_ln, stride_lt, stride_rn, stride_rt, stride_yn, stride_yt, stride_mn, stride_mt,
    # sizes (NT = N * T: the offset of the log-sums in the (2, N, T) stats); the softcap
    T, V, NT, cap,
    # structure
    HAS_REF: tl.constexpr, HAS_SQ: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    # int64 from the start: n * stride_ln exceeds 2^31 once N*T*V does.
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row - n * T
    counted = tl.load(mask_ptr + n * stride_mn + t * stride_mt)
    if counted:
        y = tl.load(targets_ptr + n * stride_yn + t * stride_yt)
        in_vocab = (y >= 0) & (y < V)
        # An out-of-vocab id is never dereferenced: read column 0, then return NaN.
        y_safe = tl.where(in_vocab, y, 0)
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        z_y = tl.load(row_ptr + y_safe).to(tl.float32)
        if HAS_CAP:
            z_y, _ = _softcap(z_y, cap)
        m, log_s, log_sq = _row_max_logsum(row_ptr, V, BLOCK_V, EVEN_V, HAS_SQ, HAS_CAP, cap)
        tl.store(row_vals_ptr + row, tl.where(in_vocab, (z_y - m) - log_s, float("nan")))
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + NT + row, log_s)
        if HAS_SQ:
            tl.store(sq_ptr + row, log_sq)
        if HAS_REF:
            ref_row_ptr = ref_logits_ptr + n * stride_rn + t * stride_rt
            ref_z_y = tl.load(ref_row_ptr + y_safe).to(tl.float32)
            ref_m, ref_log_s, _ = _row_max_logsum(ref_row_ptr, V, BLOCK_V, EVEN_V, False, False, cap)
            ref_val = (ref_z_y - ref_m) - ref_log_s
            tl.store(ref_row_vals_ptr + row, tl.where(in_vocab, ref_val, float("nan")))
    else:
        # Skipping the row (not multiplying it by 0) keeps NaN/inf in prompt or padding
        # logits out of the score, and saves reading them. Stats of a masked row are 0.
        tl.store(row_vals_ptr + row, 0.0)
        tl.store(stats_ptr + row, 0.0)
        tl.store(stats_ptr + NT + row, 0.0)
        if HAS_SQ:
            tl.store(sq_ptr + row, 0.0)
        if HAS_REF:
            tl.store(ref_row_vals_ptr + row, 0.0)


@triton.heuristics({"EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0})
@triton.jit
def _sequence_logprobs_bwd_kernel(
    # pointers: inputs, then the gradient (may alias logits_ptr: in-place backward)
    logits_ptr, targets_ptr, mask_ptr, stats_ptr, grad_rows_ptr,
    grad_ptr,
    # strides, in elements, of the N and T dims (the V stride is 1); stats are contiguous;
    # the rows' weights (N, T) are usually the (N,) upstream gradient expanded (stride_st = 0)
    stride_ln, stride_lt, stride_yn, stride_yt, stride_mn, stride_mt, stride_sn, stride_st, stride_gn, stride_gt,
    # sizes (NT = N * T: the offset of the log-sums in the (2, N, T) stats); the softcap
    T, V, NT, cap,
    # structure
    HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr, EVEN_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row - n * T
    offs = tl.arange(0, BLOCK_V)
    grad_row_ptr = grad_ptr + n * stride_gn + t * stride_gt
    counted = tl.load(mask_ptr + n * stride_mn + t * stride_mt)
    if counted:
        y = tl.load(targets_ptr + n * stride_yn + t * stride_yt)
        in_vocab = (y >= 0) & (y < V)
        # The forward score of an out-of-vocab target is NaN; so is its gradient row.
        g = tl.where(in_vocab, tl.load(grad_rows_ptr + n * stride_sn + t * stride_st), float("nan"))
        m = tl.load(stats_ptr + row)
        log_s = tl.load(stats_ptr + NT + row)
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            if EVEN_V:
                z = tl.load(row_ptr + cols).to(tl.float32)
            else:
                z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            if HAS_CAP:  # the chain rule through cap * tanh(z / cap)
                z, dcap = _softcap(z, cap)
                dz = (g * dcap) * (tl.where(cols == y, 1.0, 0.0) - tl.exp((z - m) - log_s))
            else:
                dz = g * (tl.where(cols == y, 1.0, 0.0) - tl.exp((z - m) - log_s))
            dz = dz.to(grad_ptr.dtype.element_ty)
            # Each element is read and written by the same thread in the same iteration,
            # so grad_ptr may alias logits_ptr.
            if EVEN_V:
                tl.store(grad_row_ptr + cols, dz)
            else:
                tl.store(grad_row_ptr + cols, dz, mask=cols < V)
    else:
        # A row that does not count gets exact zeros, without reading its logits.
        zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            if EVEN_V:
                tl.store(grad_row_ptr + cols, zeros)
            else:
                tl.store(grad_row_ptr + cols, zeros, mask=cols < V)


# --------------------------------------------------------------------------------------
# opt-in autotuning (FASTDPO_AUTOTUNE=1), as in cut-cross-entropy
# --------------------------------------------------------------------------------------


def _autotune_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_V": block_v}, num_warps=num_warps)
        for block_v in (1024, 2048, 4096, 8192, 16384)
        for num_warps in (4, 8, 16)
    ]


def _prune_configs(configs, named_args, **kwargs):
    limit = max(16, triton.next_power_of_2(named_args["V"]))
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_V"])]


_fwd_autotuned = triton.autotune(
    _autotune_configs(), key=["V", "HAS_REF", "HAS_SQ", "HAS_CAP"], prune_configs_by={"early_config_prune": _prune_configs}
)(_sequence_logprobs_fwd_kernel)
# Tuned out of place only: tuning an in-place launch would have to restore the logits before
# every configuration it tries (a clone of the whole tensor, exactly where in place was chosen
# to save that memory).  The in-place backward tunes on a few rows out of place, then runs
# the whole tensor in place with the configuration chosen (_tuned_bwd_config).
_bwd_autotuned = triton.autotune(
    _autotune_configs(), key=["V", "HAS_CAP"], prune_configs_by={"early_config_prune": _prune_configs}
)(_sequence_logprobs_bwd_kernel)

# Rows the in-place backward tunes on: enough programs to fill a GPU several times over.
_TUNE_ROWS = 2048


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _fwd_args(logits, ref, targets, mask, row_vals, ref_row_vals, stats, sq, T: int, V: int, cap: float) -> dict:
    """The forward kernel's arguments but the constexprs (also the AOT specs' source)."""
    return dict(
        logits_ptr=logits, ref_logits_ptr=ref, targets_ptr=targets, mask_ptr=mask,
        row_vals_ptr=row_vals, ref_row_vals_ptr=ref_row_vals, stats_ptr=stats, sq_ptr=sq,
        stride_ln=logits.stride(0), stride_lt=logits.stride(1), stride_rn=ref.stride(0), stride_rt=ref.stride(1),
        stride_yn=targets.stride(0), stride_yt=targets.stride(1), stride_mn=mask.stride(0), stride_mt=mask.stride(1),
        T=T, V=V, NT=logits.shape[0] * T, cap=cap,
    )


def _bwd_args(logits, targets, mask, stats, grad_rows, grad, T: int, V: int, cap: float) -> dict:
    """The backward kernel's arguments but the constexprs (also the AOT specs' source)."""
    return dict(
        logits_ptr=logits, targets_ptr=targets, mask_ptr=mask, stats_ptr=stats, grad_rows_ptr=grad_rows,
        grad_ptr=grad,
        stride_ln=logits.stride(0), stride_lt=logits.stride(1), stride_yn=targets.stride(0), stride_yt=targets.stride(1),
        stride_mn=mask.stride(0), stride_mt=mask.stride(1), stride_sn=grad_rows.stride(0), stride_st=grad_rows.stride(1),
        stride_gn=grad.stride(0), stride_gt=grad.stride(1),
        T=T, V=V, NT=logits.shape[0] * T, cap=cap,
    )


def _check_logits(name: str, x, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype float32, bfloat16 or float16, got {x.dtype}")
    if shape is None:
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (N, T, V), got {tuple(x.shape)}")
        if x.shape[-1] < 1:
            raise ValueError(f"{name} must have V >= 1, got shape {tuple(x.shape)}")
    elif tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (N, T, V), got {tuple(x.shape)}")


def _check_nt(name: str, x, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like logits, got {x.device}")


def _unit_stride_v(x: torch.Tensor) -> torch.Tensor:
    # The kernels assume unit V stride (vector loads); any N/T strides are passed through.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def sequence_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    wpo_sums: torch.Tensor | None = None,
    softcap: float | None = None,
    _block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Masked (weighted) per-sequence sums of target log-probabilities (DPO, arXiv 2305.18290).

    Args:
        logits: (N, T, V) float32, bfloat16 or float16, any N/T strides.
        targets: (N, T) int64 token ids; an id outside [0, V) at a counted position gives a
            NaN score, at a masked position it is ignored.
        mask: (N, T) bool; False rows are not read and contribute exactly 0.
        ref_logits: None, or (N, T, V) reference-model logits (any supported dtype, own
            strides) scored against the same targets and mask in the same pass.
        weights: None, or (N, T) float32 weights of the rows' log-probs in both scores (LD-DPO).
        wpo_sums: None, or a float32 (2, N) buffer that receives, per sequence of ``logits``,
            ``sum_t mask * log sum_v softmax(logits[n,t])_v^2`` (one more reduction of the
            row's pass, no exp; a kernel variant compiled only for it) and the unweighted
            ``sum_t mask * logp`` (WPO, arXiv 2406.11827).
        softcap: None, or a positive cap: the rows are scored as ``softcap * tanh(logits /
            softcap)`` (Gemma 2's final_logit_softcapping), computed in float32 as they are
            read (a kernel variant compiled only for it; not with ``ref_logits``).
        _block_v: test-only override of BLOCK_V (a power of two).

    Returns:
        scores: (N,) float32, ``sum_t where(mask, w * (logits[n,t,y] - logsumexp(logits[n,t])), 0)``;
        ref_scores: (N,) float32 for ``ref_logits`` or None;
        stats: (2, N, T) float32, the backward's input: per row the max of ``logits`` and
            ``log sum exp(logits - max)`` (their sum is the row logsumexp), 0 at masked rows.
    """
    has_ref, has_sq, has_cap = _check_forward_args(logits, targets, mask, ref_logits, weights, wpo_sums, softcap)
    N, T, V = logits.shape

    device = logits.device
    row_vals = torch.empty((N, T), dtype=torch.float32, device=device)
    stats = torch.empty((2, N, T), dtype=torch.float32, device=device)
    ref_row_vals = torch.empty((N, T), dtype=torch.float32, device=device) if has_ref else None
    sq = torch.empty((N, T), dtype=torch.float32, device=device) if has_sq else None
    if N * T == 0:
        scores = torch.zeros((N,), dtype=torch.float32, device=device)
        if has_sq:
            wpo_sums.zero_()
        return scores, (scores.clone() if has_ref else None), stats

    logits = _unit_stride_v(logits)
    ref = _unit_stride_v(ref_logits) if has_ref else logits
    args = _fwd_args(logits, ref, targets, mask, row_vals, ref_row_vals if has_ref else row_vals, stats,
                     sq if has_sq else row_vals, T, V, float(softcap) if has_cap else 1.0)
    grid = (N * T,)
    if _block_v is None and autotune_enabled():
        _fwd_autotuned[grid](*args.values(), HAS_REF=has_ref, HAS_SQ=has_sq, HAS_CAP=has_cap, **LAUNCH_OPTIONS)
    else:
        block_v, num_warps = _default_config(V, logits.dtype, has_cap)
        if _block_v is not None:
            block_v = _block_v
        _sequence_logprobs_fwd_kernel[grid](*args.values(), HAS_REF=has_ref, HAS_SQ=has_sq, HAS_CAP=has_cap,
                                            BLOCK_V=block_v, num_warps=num_warps, **LAUNCH_OPTIONS)

    # Fixed-order reductions over T: bitwise reproducible, no atomics.  Masked rows hold 0.
    if has_sq:  # in float64: WPO exponentiates their means
        wpo_sums[0] = sq.sum(-1, dtype=torch.float64)
        wpo_sums[1] = row_vals.sum(-1, dtype=torch.float64)
    if weights is None:
        return row_vals.sum(-1), (ref_row_vals.sum(-1) if has_ref else None), stats
    # where: a weight at a masked row (0 * its stored 0, or a NaN weight there) reaches no score
    scores = torch.where(mask, row_vals * weights, 0.0).sum(-1)
    ref_scores = torch.where(mask, ref_row_vals * weights, 0.0).sum(-1) if has_ref else None
    return scores, ref_scores, stats


def sequence_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    stats: torch.Tensor,
    grad_scores: torch.Tensor,
    *,
    inplace: bool = False,
    weights: torch.Tensor | None = None,
    softcap: float | None = None,
    _block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of ``sum_n grad_scores[n] * scores[n]`` with respect to ``logits``.

    Args:
        logits, targets, mask: as given to :func:`sequence_logprobs_forward`.
        stats: (2, N, T) float32, the forward's third output.
        grad_scores: (N,) float32 upstream gradient per sequence (fold any 1/count into it).
        inplace: write the gradient over ``logits`` (which must then have unit V stride;
            any N/T strides) and return it.
        weights: None, or the (N, T) float32 row weights the forward's scores used.
        softcap: the cap the forward's scores used (None: none); the gradient is then taken
            through ``softcap * tanh(logits / softcap)``, with respect to the uncapped logits.
        _block_v: test-only override of BLOCK_V (a power of two).

    Returns:
        (N, T, V) tensor of ``logits.dtype``: ``grad[n, t] = grad_scores[n] * weights[n, t] *
        mask[n, t] * (onehot(targets[n, t]) - softmax(logits[n, t]))`` (weights 1 without them;
        with a softcap, softmax of the capped logits times ``1 - tanh(logits / softcap)^2``),
        a NaN row where a counted target is outside [0, V); a new contiguous tensor, or
        ``logits`` itself when ``inplace``.
    """
    has_cap = _check_backward_args(logits, targets, mask, stats, grad_scores, weights, softcap, inplace)
    N, T, V = logits.shape

    if inplace:
        grad = logits
    else:
        logits = _unit_stride_v(logits)
        grad = torch.empty((N, T, V), dtype=logits.dtype, device=logits.device)
    if N * T == 0:
        return grad

    stats = stats.contiguous()
    # Each row's weight: the sequence's upstream gradient, read through a stride-0 view (no
    # (N, T) copy), or times the row's own weight.
    grad_rows = grad_scores.unsqueeze(1)
    grad_rows = grad_rows * weights if weights is not None else grad_rows.expand(N, T)
    cap = float(softcap) if has_cap else 1.0
    args = _bwd_args(logits, targets, mask, stats, grad_rows, grad, T, V, cap)
    grid = (N * T,)
    if _block_v is None and autotune_enabled() and not inplace:
        _bwd_autotuned[grid](*args.values(), HAS_CAP=has_cap, **LAUNCH_OPTIONS)
        return grad
    if _block_v is None and autotune_enabled():
        meta = _tuned_bwd_config(logits, targets, mask, stats, grad_rows, cap, has_cap)
    else:
        block_v, num_warps = _default_config(V, logits.dtype, has_cap)
        meta = dict(BLOCK_V=_block_v or block_v, num_warps=num_warps)
    _sequence_logprobs_bwd_kernel[grid](*args.values(), HAS_CAP=has_cap, **meta, **LAUNCH_OPTIONS)
    return grad


def _check_forward_args(logits, targets, mask, ref_logits, weights, wpo_sums, softcap) -> tuple[bool, bool, bool]:
    """:func:`sequence_logprobs_forward`'s arguments; returns (has_ref, has_sq, has_cap)."""
    _check_logits("logits", logits)
    N, T, V = logits.shape
    _check_nt("targets", targets, (N, T), torch.int64, logits.device)
    _check_nt("mask", mask, (N, T), torch.bool, logits.device)
    has_ref = ref_logits is not None
    if has_ref:
        _check_logits("ref_logits", ref_logits, (N, T, V))
        if ref_logits.device != logits.device:
            raise ValueError(f"ref_logits must be on {logits.device} like logits, got {ref_logits.device}")
    if N * T >= 2**31:
        raise ValueError(f"logits must have fewer than 2**31 rows N*T, got N={N}, T={T}")

    if weights is not None:
        _check_nt("weights", weights, (N, T), torch.float32, logits.device)
    has_sq = wpo_sums is not None
    if has_sq:
        _check_nt("wpo_sums", wpo_sums, (2, N), torch.float32, logits.device)
    has_cap = _check_softcap(softcap)
    if has_cap and has_ref:
        raise ValueError("softcap applies to one model's logits: score ref_logits in a call of their own")
    return has_ref, has_sq, has_cap


def _check_backward_args(logits, targets, mask, stats, grad_scores, weights, softcap, inplace) -> bool:
    """:func:`sequence_logprobs_backward`'s arguments; returns has_cap."""
    _check_logits("logits", logits)
    N, T, V = logits.shape
    _check_nt("targets", targets, (N, T), torch.int64, logits.device)
    _check_nt("mask", mask, (N, T), torch.bool, logits.device)
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"stats must be a torch.Tensor, got {type(stats).__name__}")
    if stats.dtype != torch.float32 or tuple(stats.shape) != (2, N, T) or stats.device != logits.device:
        raise ValueError(
            f"stats must be a float32 (2, N, T) = {(2, N, T)} tensor on {logits.device} (the "
            f"forward's third output), got {stats.dtype} {tuple(stats.shape)} on {stats.device}"
        )
    if not isinstance(grad_scores, torch.Tensor):
        raise TypeError(f"grad_scores must be a torch.Tensor, got {type(grad_scores).__name__}")
    if grad_scores.dtype != torch.float32:
        raise TypeError(f"grad_scores must have dtype torch.float32, got {grad_scores.dtype}")
    if tuple(grad_scores.shape) != (N,):
        raise ValueError(f"grad_scores must have shape {(N,)}, got {tuple(grad_scores.shape)}")
    if grad_scores.device != logits.device:
        raise ValueError(f"grad_scores must be on {logits.device} like logits, got {grad_scores.device}")
    if weights is not None:
        _check_nt("weights", weights, (N, T), torch.float32, logits.device)
    has_cap = _check_softcap(softcap)
    if inplace and logits.stride(-1) != 1 and V != 1:
        raise ValueError(f"inplace backward needs logits with unit stride in V, got strides {logits.stride()}")
    if N * T >= 2**31:
        raise ValueError(f"logits must have fewer than 2**31 rows N*T, got N={N}, T={T}")
    return has_cap


def _check_softcap(softcap) -> bool:
    """Whether a softcap is given; a ValueError unless it is None or a finite positive number."""
    if softcap is None:
        return False
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
        raise ValueError(f"softcap must be a finite positive number or None, got {softcap!r}")
    return True


def _tuned_bwd_config(logits, targets, mask, stats, grad_rows, cap: float, has_cap: bool) -> dict:
    """The autotuned backward's choice for these logits' V and dtype, tuned out of place on
    their first rows (at most _TUNE_ROWS): {"BLOCK_V": ..., "num_warps": ...}."""
    N, T, V = logits.shape
    n = max(1, min(N, _TUNE_ROWS // max(T, 1)))
    t = min(T, _TUNE_ROWS)
    sub = logits[:n, :t]
    out = torch.empty((n, t, V), dtype=logits.dtype, device=logits.device)
    args = _bwd_args(sub, targets[:n, :t], mask[:n, :t], stats[:, :n, :t].contiguous(), grad_rows[:n, :t], out, t, V, cap)
    _bwd_autotuned[(n * t,)](*args.values(), HAS_CAP=has_cap, **LAUNCH_OPTIONS)
    best = _bwd_autotuned.best_config
    return dict(BLOCK_V=best.kwargs["BLOCK_V"], num_warps=best.num_warps)


# --------------------------------------------------------------------------------------
# the fused head's fold: rows of logits that all count, gradient in place
# --------------------------------------------------------------------------------------


def row_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, sq_out: torch.Tensor | None = None, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row target log-probs of (M, V) logits whose rows all count (the fused head's
    chunks of gathered rows, after the library's matrix product).

    Args:
        logits: (M, V) float32, bfloat16 or float16, unit V stride.
        targets: (M,) int64 ids; one outside [0, V) gives a NaN log-prob.
        sq_out: None, or an (M,) float32 buffer that receives each row's
            ``log sum_v softmax(logits[m])_v^2`` (WPO's normalizer, TRL's ``log_sum_sq_probs``).
        softcap: None, or the cap the rows are scored under (``softcap * tanh(logits / softcap)``).

    Returns:
        logp: (M,) float32, ``logits[m, y] - logsumexp(logits[m])``;
        stats: (2, M) float32 row max and ``log sum exp(logits - max)`` (the backward's input).
    """
    M, V = _check_rows_of_logits(logits, targets)
    # With one position per "sequence", the per-sequence sums are the rows' own values.
    sums = torch.empty((2, M), dtype=torch.float32, device=logits.device) if sq_out is not None else None
    scores, _, stats = sequence_logprobs_forward(
        logits.view(M, 1, V), targets.reshape(M, 1), _all_rows(M, logits.device), wpo_sums=sums, softcap=softcap
    )
    if sq_out is not None:
        sq_out.copy_(sums[0])
    return scores, stats.view(2, M)


def row_logprob_grad_(
    logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, grad_rows: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Overwrite (M, V) logits with ``grad_rows[m] * (onehot(y_m) - softmax(logits[m]))`` (in
    their dtype) and return them: the gradient of ``sum_m grad_rows[m] * logp[m]``.

    Args:
        logits, targets: as given to :func:`row_logprobs`.
        stats: (2, M) float32, its second output.
        grad_rows: (M,) float32 weight of each row's log-prob.
        softcap: the cap :func:`row_logprobs` scored them under (the gradient is then with
            respect to the uncapped logits).
    """
    M, V = _check_rows_of_logits(logits, targets)
    if tuple(stats.shape) != (2, M) or tuple(grad_rows.shape) != (M,):
        raise ValueError(
            f"stats must be (2, M) and grad_rows (M,) with M = {M}, got {tuple(stats.shape)} "
            f"and {tuple(grad_rows.shape)}"
        )
    sequence_logprobs_backward(
        logits.view(M, 1, V), targets.reshape(M, 1), _all_rows(M, logits.device),
        stats.reshape(2, M, 1), grad_rows, inplace=True, softcap=softcap,
    )
    return logits


def _check_rows_of_logits(logits, targets) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (M, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        raise ValueError(f"logits must have unit stride in V, got strides {logits.stride()}")
    M, V = logits.shape
    _check_nt("targets", targets, (M,), torch.int64, logits.device)
    return M, V


def _all_rows(M: int, device: torch.device) -> torch.Tensor:
    return torch.ones((M, 1), dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------
# what ships, for ahead-of-time compilation (fastdpo.kernel_report)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One shipped kernel specialization, ready for ``triton.compile(ASTSource(...))``."""

    name: str                   # kernel and variant: "fwd", "fwd+ref", "fwd+sq", "fwd+cap", "bwd", "bwd+cap"
    dtype: str                  # logits dtype: "fp32", "bf16" or "fp16"
    V: int                      # the vocabulary size it was specialized for
    block_v: int
    num_warps: int
    fn: object                  # the @triton.jit function
    signature: dict[str, str]   # argument name -> Triton type, as the JIT would specialize it
    constexprs: dict[str, object]
    attrs: dict[tuple[int, ...], list]  # (arg index,) -> [["tt.divisibility", 16]]


# Vocabulary sizes that exercise every specialization the launcher can pick.
AOT_VOCABS: dict[int, str] = {
    128256: "V % 16 == 0, masked tail block (Llama 3; likewise 32000, 151936)",
    262144: "EVEN_V: no masks (Gemma 3)",
    50257: "odd V: rows not 16-byte aligned, no vector loads (GPT-2)",
    2000: "small V: BLOCK_V clamped to next_power_of_2(V)",
}


def aot_specs(vocabs: tuple[int, ...] = tuple(AOT_VOCABS), T: int = 2048, N: int = 16) -> list[KernelSpec]:
    """The kernels as launched on contiguous (N, T, V) logits with the shipped default
    configuration, for every supported logits dtype, with and without reference logits (of
    the same dtype; a mixed pair compiles the same code with another load type), with the
    ``log sum p^2`` reduction (WPO; policy logits only), with a softcap (Gemma 2; forward
    and backward), and for each vocabulary size in
    `vocabs`: the launchers' own argument builders on stand-ins."""
    specs = []
    f32 = torch.float32
    for V in vocabs:
        for torch_dtype, tdt in TRITON_DTYPE.items():
            logits = Example(torch_dtype, N, T, V)
            targets, mask = Example(torch.int64, N, T), Example(torch.bool, N, T)
            rows, stats = Example(f32, N, T), Example(f32, 2, N, T)
            grad_rows = Example(f32, N, T, strides=(1, 0))  # the (N,) upstream gradient, expanded
            variants = (("fwd", False, False, False), ("fwd+ref", True, False, False), ("fwd+sq", False, True, False),
                        ("fwd+cap", False, False, True), ("bwd", False, False, False), ("bwd+cap", False, False, True))
            for name, has_ref, has_sq, has_cap in variants:
                block_v, num_warps = _default_config(V, torch_dtype, has_cap)
                blocks = dict(BLOCK_V=block_v, EVEN_V=V % block_v == 0, HAS_CAP=has_cap)
                cap = 30.0 if has_cap else 1.0
                if name.startswith("fwd"):
                    fn = _sequence_logprobs_fwd_kernel.fn
                    # without ref (sq) the launcher passes the policy logits (and rows) as dummies
                    args = _fwd_args(logits, logits, targets, mask, rows, rows, stats, rows, T, V, cap)
                    example = aot_example(args, HAS_REF=has_ref, HAS_SQ=has_sq, **blocks)
                else:
                    fn = _sequence_logprobs_bwd_kernel.fn
                    args = _bwd_args(logits, targets, mask, stats, grad_rows, Example(torch_dtype, N, T, V), T, V, cap)
                    example = aot_example(args, **blocks)
                specs.append(KernelSpec(name, tdt, V, block_v, num_warps, fn, *specialize(fn, example)))
    return specs
