"""Token log-probabilities through a linear head, forward and backward, without logits.

Dimensions: M rows (positions, already flattened and compacted by the caller: every row
counts), D hidden features, V vocabulary entries.

    logits[m, v] = scale * sum_d hidden[m, d] * weight[v, d]         (never stored)
    logp[m]      = logits[m, y_m] - logsumexp_v(logits[m, v])
    dlogits[m, v] = grad_rows[m] * (onehot(y_m)[v] - exp(logits[m, v] - lse[m]))
    grad_hidden  = scale * dlogits @ weight        grad_weight = scale * dlogits.T @ hidden

The linear-cross-entropy fusion of Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
Language Models" (arXiv 2411.09009, Apple's cut-cross-entropy), applied to the per-token
log-probabilities that DPO (Rafailov et al. 2023, arXiv 2305.18290) sums per sequence. Logit
tiles live in registers only: the forward computes (BLOCK_M, BLOCK_V) tiles with ``tl.dot``
over D and folds them into a running max and sum; each backward kernel recomputes the tiles
from hidden, weight and the saved lse.

Deterministic by construction, with no atomics: every output element (a partial max/sum, a
row of grad_hidden or of grad_weight) is owned by exactly one program, which accumulates it
in a fixed loop order, and partials over vocabulary splits are combined in a fixed order.

Precision. Every tile accumulates in float32. float32 inputs use
``input_precision="ieee"`` (true float32 FMAs, no TF32), so the logits match an eager
float32 matmul to float32 rounding; that is the library's accuracy contract (its tests hold
ours to torch-in-dtype's distance from float64), at the cost of running without tensor
cores; bfloat16/float16 inputs use tensor cores (products exact in float32, float32 sums).
The softmax gradient tile is rounded to the input dtype to feed the tensor cores, as an
eager bf16/fp16 backward rounds its logits gradient.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, SUPPORTED_DTYPES, TRITON_DTYPE, Example, aot_example, autotune_enabled, specialize

__all__ = [
    "linear_logprobs_forward",
    "linear_logprobs_backward",
    "LinearConfig",
    "LinearKernelSpec",
    "aot_specs",
    "AOT_SHAPES",
    "SUPPORTED_DTYPES",
]

@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# The shipped configurations, per kernel and input dtype: argued from the tile algebra and
# chosen among shapes that ptxas builds without spills for sm_80 and sm_90
# (python -m fastdpo.kernel_report); not yet timed on a GPU. FASTDPO_AUTOTUNE=1 searches
# around them. BLOCK_D = 32 for 16-bit inputs, as in cut-cross-entropy's defaults.
# - fwd, 16-bit: 128x128 tiles at 8 warps, 64 accumulator registers per thread; 3 stages
#   keep 48 KiB of operands in flight (cut-cross-entropy: 256x128x32, 8 warps, 3 stages;
#   256 rows would leave fewer row blocks, so more vocabulary splits, for DPO batches).
# - bwd_h: the logits tile, its softmax-gradient tile and a BLOCK_M x BLOCK_D slice of the
#   accumulator; each V tile reads and writes the program's BLOCK_M x D float32
#   accumulator rows once (see _grad_hidden_kernel): BLOCK_V / 2 = 64 flops per
#   accumulator byte with BLOCK_V = 128.
# - bwd_w: the mirror image, BLOCK_M / 2 flops per accumulator byte, so BLOCK_M = 128;
#   128x128 tiles spill at 255 registers, 128x64 builds at ~180.
# - float32: no tensor cores (IEEE), so each tile is an FMA loop holding a BLOCK_D-deep
#   slice of both operands in registers: BLOCK_D = 16 (32 spilled on sm_90 in all three);
#   the forward's 64x128 at 8 warps sat at ptxas's 128-register choice on sm_90 and
#   spilled, 64x64 at 4 warps builds at ~165.
_DEFAULT_CONFIGS: dict[tuple[str, torch.dtype], LinearConfig] = {}
for _dt in (torch.bfloat16, torch.float16):
    _DEFAULT_CONFIGS["fwd", _dt] = LinearConfig(128, 128, 32, num_warps=8, num_stages=3)
    _DEFAULT_CONFIGS["bwd_h", _dt] = LinearConfig(64, 128, 32, num_warps=8, num_stages=3)
    _DEFAULT_CONFIGS["bwd_w", _dt] = LinearConfig(128, 64, 32, num_warps=8, num_stages=3)
_DEFAULT_CONFIGS["fwd", torch.float32] = LinearConfig(64, 64, 16, num_warps=4, num_stages=2)
_DEFAULT_CONFIGS["bwd_h", torch.float32] = LinearConfig(64, 128, 16, num_warps=8, num_stages=2)
_DEFAULT_CONFIGS["bwd_w", torch.float32] = LinearConfig(64, 64, 16, num_warps=8, num_stages=2)
del _dt

# Rows per program of the tiny combine kernel (one float32 partial per row and split).
_COMBINE_BLOCK = 128
_COMBINE_CONFIG = LinearConfig(_COMBINE_BLOCK, 0, 0, num_warps=4, num_stages=3)

# Programs to aim for when the rows alone leave the GPU idle: two per SM of an H100 SXM
# (132 SMs; 2.4 waves on an A100's 108). A program of the 16-bit forward holds 8 warps at
# 170-208 registers per thread, so one is resident per SM: two waves let the SMs that drew
# short splits take a second program instead of idling. A fixed number (not the device's
# SM count) keeps results bitwise identical across GPUs for a given batch.
_TARGET_PROGRAMS = 2 * 132

# grad_hidden's vocabulary splits each cost an (M, D) float32 partial; at most this many, so
# the partials stay within 8 float32 copies of hidden (the GPU is full from 33 row blocks on).
_MAX_HIDDEN_SPLITS = 8


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _scaled_dot_tile(
    a_rows_ptr, b_rows_ptr, a_ok, b_ok, D, scale,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """float32 ``scale * a @ b.T`` for a (BLOCK_A, D) and a (BLOCK_B, D) row set, given as
    vectors of row pointers (unit D stride); rows outside a_ok/b_ok read as zeros."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        # The D-tail mask stays (no EVEN_D flag): the launchers make D a multiple of 16, and
        # with that the compiler proves the mask constant over 16 columns and still issues
        # 16-byte cp.async (same PTX loads and registers as without it, checked with ptxas).
        d_ok = (d0 + offs_d)[None, :] < D
        a = tl.load(a_rows_ptr[:, None] + (d0 + offs_d)[None, :], mask=a_ok[:, None] & d_ok, other=0.0)
        b = tl.load(b_rows_ptr[:, None] + (d0 + offs_d)[None, :], mask=b_ok[:, None] & d_ok, other=0.0)
        # "ieee" only changes float32 operands (no TF32); 16-bit ones go to tensor cores.
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc * scale


@triton.jit
def _split_range(V, BLOCK_V: tl.constexpr):
    """[lo, hi) of this program's vocabulary split: tl.num_programs(1) splits of whole
    BLOCK_V tiles, balanced to within one tile. A split is empty only when there are more
    splits than tiles (a test override, or autotuning a larger BLOCK_V)."""
    # int64 products: splits x tiles may pass 2^31; the bounds themselves are below V.
    pid_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1)
    n_tiles = tl.cdiv(V, BLOCK_V)
    lo = ((pid_s * n_tiles // n_splits) * BLOCK_V).to(tl.int32)
    hi = tl.minimum(((pid_s + 1) * n_tiles // n_splits) * BLOCK_V, V).to(tl.int32)
    return lo, hi


@triton.jit
def _lse_partials_kernel(
    # pointers: inputs, then (splits, M) float32 partials (contiguous)
    hidden_ptr, weight_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_tgt_ptr,
    # strides, in elements, of the M and V dims (the D stride is 1)
    stride_hm, stride_wv,
    # sizes
    M, V, D,
    # constants
    scale,
    # structure
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 rows: rows * stride_hm exceeds 2^31 once M*D does.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    h_rows_ptr = hidden_ptr + rows * stride_hm
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    v_lo, v_hi = _split_range(V, BLOCK_V)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        w_rows_ptr = weight_ptr + cols.to(tl.int64) * stride_wv
        z = _scaled_dot_tile(h_rows_ptr, w_rows_ptr, row_ok, col_ok, D, scale, BLOCK_M, BLOCK_V, BLOCK_D)
        # -inf past V adds exp(-inf) = 0 to the sum and never wins the max.
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # The target logit is taken from the very tile the lse sums, not from a separate
        # dot over D, so logp = z_y - lse uses one value of z_y (bitwise); each row's target
        # lies in exactly one split, the others add exact zeros.
        t_i += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # A row whose max is still -inf would give exp(-inf - -inf) = NaN; shifting by 0
        # gives the right exp(-inf) = 0 terms.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m_i = m_new

    # An empty split stores (-inf, 0, 0): the combine's guard makes it add nothing.
    part = tl.program_id(1).to(tl.int64) * M + rows
    tl.store(part_max_ptr + part, m_i, mask=row_ok)
    tl.store(part_sum_ptr + part, s_i, mask=row_ok)
    tl.store(part_tgt_ptr + part, t_i, mask=row_ok)


@triton.jit
def _lse_combine_kernel(
    # pointers: (splits, M) float32 partials, targets; then (M,) float32 outputs
    part_max_ptr, part_sum_ptr, part_tgt_ptr, targets_ptr,
    logp_ptr, lse_ptr,
    # sizes
    M, V, n_splits,
    # structure
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK,), dtype=tl.float32)
    # Advancing the pointers (64-bit) instead of indexing split * M keeps int32 math clear
    # of overflow; the fixed split order makes the result bitwise reproducible.
    pm_ptr = part_max_ptr + rows
    ps_ptr = part_sum_ptr + rows
    pt_ptr = part_tgt_ptr + rows
    for _ in range(0, n_splits):
        pm = tl.load(pm_ptr, mask=row_ok, other=float("-inf"))
        ps = tl.load(ps_ptr, mask=row_ok, other=0.0)
        t_i += tl.load(pt_ptr, mask=row_ok, other=0.0)
        m_new = tl.maximum(m_i, pm)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - shift) + ps * tl.exp(pm - shift)
        m_i = m_new
        pm_ptr += M
        ps_ptr += M
        pt_ptr += M
    # (rows past M have s = 0: log(1) keeps the interpreter's numpy quiet; not stored)
    lse = m_i + tl.log(tl.where(row_ok, s_i, 1.0))
    y = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    # A target outside [0, V) matched no tile: say so with NaN rather than return -lse.
    in_vocab = (y >= 0) & (y < V)
    tl.store(logp_ptr + rows, tl.where(in_vocab, t_i - lse, float("nan")), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _grad_hidden_kernel(
    # pointers: inputs; the float32 accumulator (splits, M, D); the (M, D) gradient, written
    # when `direct` (with float32 inputs it may alias acc_ptr)
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_rows_ptr,
    acc_ptr, grad_hidden_ptr,
    # strides, in elements (all D strides are 1)
    stride_hm, stride_wv, stride_as, stride_am, stride_gm,
    # sizes
    M, V, D,
    # constants; direct: one split, whose last tile writes grad_hidden itself; otherwise
    # each split leaves its unscaled float32 partial in acc and the launcher sums them. A
    # runtime 0/1 int, not a constexpr: one binary serves both (the skipped epilogue is a
    # predicated store), which halves what the ahead-of-time report has to build.  (Not a
    # bool: triton 3.6's interpreter cannot take a bool argument that is not a constexpr.)
    scale, direct,
    # structure
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Why the accumulator lives in global memory: the program's output is BLOCK_M x D
    # (D = 4096 is 1 MiB of float32 at BLOCK_M = 64), far beyond registers or shared
    # memory, and the alternative, one program per (row block, D block), would recompute
    # every logits tile once per D block (32x the flops at D = 4096 with 128-wide blocks).
    # Instead each V tile is computed once and added to the program's own accumulator
    # rows, slice by slice: a read and a write of BLOCK_M x D float32 per V tile against
    # 4 * BLOCK_M * BLOCK_V * D flops, BLOCK_V / 2 flops per byte, mostly from L2. The rows
    # belong to this program alone, so the order of additions is fixed: no atomics.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_d = tl.arange(0, BLOCK_D)
    h_rows_ptr = hidden_ptr + rows * stride_hm
    acc_rows_ptr = acc_ptr + tl.program_id(1).to(tl.int64) * stride_as + rows * stride_am
    out_rows_ptr = grad_hidden_ptr + rows * stride_gm
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # grad_rows[m] is a per-row factor of dlogits: it is applied once to the finished sum
    # (by the launcher when there are several splits), so the tile fed to the tensor cores
    # is onehot - softmax in [-1, 1], which cannot overflow float16 whatever grad_rows is.
    row_factor = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0) * scale
    v_lo, v_hi = _split_range(V, BLOCK_V)

    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        w_rows_ptr = weight_ptr + cols.to(tl.int64) * stride_wv
        z = _scaled_dot_tile(h_rows_ptr, w_rows_ptr, row_ok, col_ok, D, scale, BLOCK_M, BLOCK_V, BLOCK_D)
        dz = tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
        # Columns past V multiply zero weight rows, but exp(0 - lse) may be inf there and
        # inf * 0 = NaN: zero them.
        dz = tl.where(col_ok[None, :], dz, 0.0).to(weight_ptr.dtype.element_ty)
        # Scalar conditions enter masks through tl.where: Triton 3.9's interpreter turns
        # `block & scalar` of int1 into int32, which tl.load rejects as a mask.
        first = v0 == v_lo
        to_out = (v0 + BLOCK_V >= v_hi) & (direct != 0)
        for d0 in range(0, D, BLOCK_D):
            cols_d = d0 + offs_d
            d_ok = row_ok[:, None] & (cols_d[None, :] < D)
            w = tl.load(w_rows_ptr[:, None] + cols_d[None, :],
                        mask=col_ok[:, None] & (cols_d[None, :] < D), other=0.0)
            # The first tile starts from zero: no memset of the accumulator, no read.
            prev = tl.load(acc_rows_ptr[:, None] + cols_d[None, :], mask=tl.where(first, False, d_ok), other=0.0)
            acc = tl.dot(dz, w, prev, input_precision="ieee")
            out = (acc * row_factor[:, None]).to(grad_hidden_ptr.dtype.element_ty)
            tl.store(out_rows_ptr[:, None] + cols_d[None, :], out, mask=tl.where(to_out, d_ok, False))
            tl.store(acc_rows_ptr[:, None] + cols_d[None, :], acc, mask=tl.where(to_out, False, d_ok))
        # The next tile reads these accumulator elements back, maybe from other threads
        # (the load and the dot result need not share a layout): a CTA barrier orders the
        # global writes before those reads.
        tl.debug_barrier()

    # An empty split (more splits than tiles: a test override, or autotuning a larger
    # BLOCK_V) still owns a partial: make it zero. Never taken when direct (one split).
    if v_lo >= v_hi:
        for d0 in range(0, D, BLOCK_D):
            cols_d = d0 + offs_d
            tl.store(acc_rows_ptr[:, None] + cols_d[None, :], tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32),
                     mask=row_ok[:, None] & (cols_d[None, :] < D))


@triton.jit
def _grad_weight_kernel(
    # pointers: inputs; the (V, D) float32 accumulator; the (V, D) gradient (may alias
    # acc_ptr with float32 inputs)
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_rows_ptr,
    acc_ptr, grad_weight_ptr,
    # strides, in elements (all D strides are 1)
    stride_hm, stride_wv, stride_av, stride_gv,
    # sizes
    M, V, D,
    # constants
    scale,
    # structure
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The mirror image of _grad_hidden_kernel: this program owns BLOCK_V rows of
    # grad_weight, walks all M rows in a fixed order and keeps its float32 sums in its own
    # accumulator rows (BLOCK_M / 2 flops per accumulator byte). V / BLOCK_V programs: 2004
    # for Llama 3's vocabulary, so no splitting over M is needed to fill the GPU.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    offs_d = tl.arange(0, BLOCK_D)
    w_rows_ptr = weight_ptr + cols * stride_wv
    acc_rows_ptr = acc_ptr + cols * stride_av
    out_rows_ptr = grad_weight_ptr + cols * stride_gv

    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        h_rows_ptr = hidden_ptr + rows * stride_hm
        y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0)
        # The transposed tile, (BLOCK_V, BLOCK_M) = weight @ hidden.T, is what the second
        # product needs as its left operand: no transpose of a float32 tile.
        zt = _scaled_dot_tile(w_rows_ptr, h_rows_ptr, col_ok, row_ok, D, scale, BLOCK_V, BLOCK_M, BLOCK_D)
        # grad_rows varies along this product's reduction, so it goes into the tile (a
        # |grad_rows| past float16's 65504 overflows a float16 tile, as in eager float16).
        dzt = (tl.where(cols[:, None] == y[None, :], 1.0, 0.0) - tl.exp(zt - lse[None, :])) * g[None, :]
        # Rows past M read zero hidden rows; zero their column too, so no inf * 0 appears.
        dzt = tl.where(row_ok[None, :], dzt, 0.0).to(hidden_ptr.dtype.element_ty)
        first = m0 == 0
        last = m0 + BLOCK_M >= M
        for d0 in range(0, D, BLOCK_D):
            cols_d = d0 + offs_d
            d_ok = col_ok[:, None] & (cols_d[None, :] < D)
            h = tl.load(h_rows_ptr[:, None] + cols_d[None, :],
                        mask=row_ok[:, None] & (cols_d[None, :] < D), other=0.0)
            prev = tl.load(acc_rows_ptr[:, None] + cols_d[None, :], mask=tl.where(first, False, d_ok), other=0.0)
            acc = tl.dot(dzt, h, prev, input_precision="ieee")
            out = (acc * scale).to(grad_weight_ptr.dtype.element_ty)
            tl.store(out_rows_ptr[:, None] + cols_d[None, :], out, mask=tl.where(last, d_ok, False))
            tl.store(acc_rows_ptr[:, None] + cols_d[None, :], acc, mask=tl.where(last, False, d_ok))
        # As in _grad_hidden_kernel: the next row block reads back what other threads wrote.
        tl.debug_barrier()


# --------------------------------------------------------------------------------------
# opt-in autotuning (FASTDPO_AUTOTUNE=1), as in cut-cross-entropy
# --------------------------------------------------------------------------------------


def _autotune_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bv in ((64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128))
        for bd in (16, 32, 64)
        for w, s in ((4, 3), (8, 3), (8, 4))
    ]


def _prune(configs, named_args, **kwargs):
    # Tiles far larger than the problem only cost masked lanes: keep those that fit, or the
    # smallest. float32 tiles are FMA loops holding BLOCK_D-deep operand slices in
    # registers: only BLOCK_D = 16 and up to 64x128 tiles build without spills; 16-bit ones
    # want BLOCK_D >= 32 for the tensor cores.
    M, V = max(named_args["M"], 16), max(named_args["V"], 16)
    fp32 = named_args["hidden_ptr"].dtype == torch.float32

    def fits(c):
        bm, bv, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"]
        if fp32 and (bd != 16 or bm * bv > 64 * 128):
            return False
        if not fp32 and bd < 32:
            return False
        return bm <= triton.next_power_of_2(M) and bv <= triton.next_power_of_2(V)

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"]))]


# Keyed on the sizes that change the best tile, not on M: every DPO batch has its own M and
# retuning each would cost more than it wins, so the first batch's M decides
# (cut-cross-entropy keys on a binned M instead).
_autotune = dict(key=["V", "D"], prune_configs_by={"early_config_prune": _prune})
_fwd_autotuned = triton.autotune(_autotune_configs(), **_autotune)(_lse_partials_kernel)
_grad_hidden_autotuned = triton.autotune(_autotune_configs(), **_autotune)(_grad_hidden_kernel)
_grad_weight_autotuned = triton.autotune(_autotune_configs(), **_autotune)(_grad_weight_kernel)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _config(kernel: str, dtype: torch.dtype, block_m, block_v, block_d) -> LinearConfig:
    """The shipped configuration, with any test-only block overrides applied."""
    cfg = _DEFAULT_CONFIGS[kernel, dtype]
    return dataclasses.replace(
        cfg,
        block_m=block_m or cfg.block_m,
        block_v=block_v or cfg.block_v,
        block_d=block_d or cfg.block_d,
    )


def _num_splits(M: int, V: int, cfg: LinearConfig, cap: int) -> int:
    """Vocabulary splits so that row blocks x splits reaches _TARGET_PROGRAMS: a batch of
    few rows still fills the GPU, a large one gets a single split. Never more splits than
    V tiles, so that no split is empty with the shipped tiles."""
    row_blocks = triton.cdiv(M, cfg.block_m)
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, row_blocks), triton.cdiv(V, cfg.block_v), cap))


def _check_tensor(name: str, x, dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")


def _check_rows(name: str, x, M: int, dtype: torch.dtype, device: torch.device) -> None:
    _check_tensor(name, x, 1)
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if tuple(x.shape) != (M,):
        raise ValueError(f"{name} must have shape {(M,)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like hidden, got {x.device}")


def _check_inputs(hidden, weight, targets, scale) -> tuple[int, int, int]:
    _check_tensor("hidden", hidden, 2)
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden must have dtype float32, bfloat16 or float16, got {hidden.dtype}")
    _check_tensor("weight", weight, 2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    M, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape (V, {D}) to match hidden (M, D), got {tuple(weight.shape)}")
    if V < 1 or D < 1:
        raise ValueError(f"weight must have V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on {hidden.device} like hidden, got {weight.device}")
    if M >= 2**31 or V >= 2**31:
        raise ValueError(f"hidden and weight must have fewer than 2**31 rows, got M={M}, V={V}")
    _check_rows("targets", targets, M, torch.int64, hidden.device)
    # A tensor scale would need .item() (a host sync) to become a kernel argument.
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    return M, V, D


# The JIT specializes every pointer, D and row stride on divisibility by 16 (bytes for
# pointers, elements for integers): with all of them divisible the tiles stream in with
# 16-byte cp.async; with any one not, every element becomes its own masked load holding a
# 64-bit address, and the tiles reached 217-255 registers, spilling in the backward
# kernels (checked with ptxas). Rows not aligned so are copied into zero-padded aligned
# ones instead (zero columns add nothing to any dot product): one build per kernel and
# dtype ships, the one python -m fastdpo.kernel_report checks. D % 16 != 0 is rare in real
# heads (4096, 3584, 2304, 896, 576 all divide), and the copy costs a pass over weight next
# to a 2 * M * V * D flop product.
_ALIGN = 16


# The kernels' arguments but the constexprs, in their order (the launchers pass them
# positionally); the ahead-of-time specs are built by the same functions, on stand-ins.


def _fwd_args(hidden, weight, targets, parts, stride_hm, stride_wv, M, V, D, scale) -> dict:
    return dict(hidden_ptr=hidden, weight_ptr=weight, targets_ptr=targets,
                part_max_ptr=parts[0], part_sum_ptr=parts[1], part_tgt_ptr=parts[2],
                stride_hm=stride_hm, stride_wv=stride_wv, M=M, V=V, D=D, scale=float(scale))


def _combine_args(parts, targets, logp, lse, M, V, n_splits) -> dict:
    return dict(part_max_ptr=parts[0], part_sum_ptr=parts[1], part_tgt_ptr=parts[2], targets_ptr=targets,
                logp_ptr=logp, lse_ptr=lse, M=M, V=V, n_splits=n_splits)


def _grad_hidden_args(hidden, weight, targets, lse, grad_rows, acc, grad_hidden, stride_hm, stride_wv,
                      M, V, D, scale, direct) -> dict:
    return dict(hidden_ptr=hidden, weight_ptr=weight, targets_ptr=targets, lse_ptr=lse, grad_rows_ptr=grad_rows,
                acc_ptr=acc, grad_hidden_ptr=grad_hidden, stride_hm=stride_hm, stride_wv=stride_wv,
                stride_as=acc.stride(0), stride_am=acc.stride(1), stride_gm=grad_hidden.stride(0),
                M=M, V=V, D=D, scale=float(scale), direct=int(direct))


def _grad_weight_args(hidden, weight, targets, lse, grad_rows, acc, grad_weight, stride_hm, stride_wv,
                      M, V, D, scale) -> dict:
    return dict(hidden_ptr=hidden, weight_ptr=weight, targets_ptr=targets, lse_ptr=lse, grad_rows_ptr=grad_rows,
                acc_ptr=acc, grad_weight_ptr=grad_weight, stride_hm=stride_hm, stride_wv=stride_wv,
                stride_av=acc.stride(0), stride_gv=grad_weight.stride(0), M=M, V=V, D=D, scale=float(scale))


def _padded_d(D: int) -> int:
    return triton.cdiv(D, _ALIGN) * _ALIGN


def _aligned_rows(x: torch.Tensor, D_pad: int) -> tuple[torch.Tensor, int]:
    """x itself when its rows are as the shipped build expects (unit D stride, D_pad
    columns, row stride and address divisible by 16), else a zero-padded aligned copy; and
    the row stride to pass (a single row's stride is irrelevant: D_pad keeps the JIT from
    specializing it)."""
    rows, D = x.shape
    row_stride = x.stride(0) if rows > 1 else D_pad
    if D == D_pad and x.stride(1) == 1 and row_stride % _ALIGN == 0 and x.data_ptr() % 16 == 0:
        return x, row_stride
    copy = x.new_zeros((rows, D_pad)) if D_pad != D else x.new_empty((rows, D))
    copy[:, :D] = x
    return copy, D_pad


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    *,
    _block_m: int | None = None,
    _block_v: int | None = None,
    _block_d: int | None = None,
    _splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` under ``softmax(scale * hidden @ weight.T)``,
    without materializing the (M, V) logits (cut-cross-entropy, arXiv 2411.09009; the
    per-token terms of DPO, arXiv 2305.18290).

    Args:
        hidden: (M, D) float32, bfloat16 or float16, any strides (rows whose D stride is
            not 1, or whose D, row stride or address is not a multiple of 16, are copied).
        weight: (V, D) of hidden's dtype and device, any strides (likewise).
        targets: (M,) int64 ids in [0, V); an id outside gives a NaN log-prob.
        scale: Python float multiplying the logits (1.0 for a plain linear head).
        _block_m, _block_v, _block_d, _splits: test-only overrides of the tiles (powers of
            two >= 16) and of the number of vocabulary splits.

    Returns:
        logp: (M,) float32, ``logits[m, y_m] - logsumexp(logits[m])``;
        lse: (M,) float32, ``logsumexp(logits[m])`` (the backward's input).
    """
    M, V, D = _check_inputs(hidden, weight, targets, scale)
    device = hidden.device
    logp = torch.empty((M,), dtype=torch.float32, device=device)
    lse = torch.empty((M,), dtype=torch.float32, device=device)
    if M == 0:
        return logp, lse
    D_pad = _padded_d(D)
    hidden, stride_hm = _aligned_rows(hidden, D_pad)
    weight, stride_wv = _aligned_rows(weight, D_pad)
    targets = targets.contiguous()

    cfg = _config("fwd", hidden.dtype, _block_m, _block_v, _block_d)
    splits = _splits or _num_splits(M, V, cfg, cap=2**16 - 1)
    # Three allocations, not slices of one: each starts 16-byte aligned whatever splits * M
    # is, as the shipped build is specialized.
    parts = [torch.empty((splits, M), dtype=torch.float32, device=device) for _ in range(3)]
    args = _fwd_args(hidden, weight, targets, parts, stride_hm, stride_wv, M, V, D_pad, scale).values()
    if autotune_enabled() and not (_block_m or _block_v or _block_d):
        _fwd_autotuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)](*args, **LAUNCH_OPTIONS)
    else:
        _lse_partials_kernel[(triton.cdiv(M, cfg.block_m), splits)](
            *args, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS)
    _lse_combine_kernel[(triton.cdiv(M, _COMBINE_BLOCK),)](
        *_combine_args(parts, targets, logp, lse, M, V, splits).values(),
        BLOCK=_COMBINE_BLOCK, num_warps=_COMBINE_CONFIG.num_warps, **LAUNCH_OPTIONS)
    return logp, lse


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    *,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    _block_m: int | None = None,
    _block_v: int | None = None,
    _block_d: int | None = None,
    _splits: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_m grad_rows[m] * logp[m]`` with respect to hidden and weight.

    Args:
        hidden, weight, targets, scale: as given to :func:`linear_logprobs_forward`.
        lse: (M,) float32, the forward's second output.
        grad_rows: (M,) float32 upstream gradient per row, ``dL/dlogp[m]``.
        need_hidden_grad, need_weight_grad: which gradients to compute (the other is None).
        _block_m, _block_v, _block_d, _splits: test-only overrides of the tiles (powers of
            two >= 16) and of grad_hidden's number of vocabulary splits.

    Returns:
        grad_hidden: (M, D) of hidden's dtype, ``scale * dlogits @ weight``, or None;
        grad_weight: (V, D) of weight's dtype, ``scale * dlogits.T @ hidden``, or None;
        with ``dlogits[m, v] = grad_rows[m] * (onehot(y_m)[v] - exp(logits[m, v] - lse[m]))``,
        summed in float32. Both new contiguous tensors.
    """
    M, V, D = _check_inputs(hidden, weight, targets, scale)
    _check_rows("lse", lse, M, torch.float32, hidden.device)
    _check_rows("grad_rows", grad_rows, M, torch.float32, hidden.device)
    device, dtype = hidden.device, hidden.dtype
    D_pad = _padded_d(D)
    stride_hm = stride_wv = None  # (no rows: nothing is launched)
    if M > 0:
        hidden, stride_hm = _aligned_rows(hidden, D_pad)
        weight, stride_wv = _aligned_rows(weight, D_pad)
    targets, lse, grad_rows = targets.contiguous(), lse.contiguous(), grad_rows.contiguous()
    tuned = autotune_enabled() and not (_block_m or _block_v or _block_d)
    scale = float(scale)

    grad_hidden = None
    if need_hidden_grad:
        grad_hidden = _grad_hidden(hidden, weight, targets, lse, grad_rows, stride_hm, stride_wv, M, V, D_pad, scale,
                                   tuned, (_block_m, _block_v, _block_d), _splits)
        if D_pad != D:
            grad_hidden = grad_hidden[:, :D].contiguous()

    grad_weight = None
    if need_weight_grad:
        if M == 0:
            return grad_hidden, torch.zeros((V, D), dtype=dtype, device=device)
        grad_weight = torch.empty((V, D_pad), dtype=dtype, device=device)
        cfg = _config("bwd_w", dtype, _block_m, _block_v, _block_d)
        acc = grad_weight if dtype == torch.float32 else torch.empty_like(grad_weight, dtype=torch.float32)
        args = _grad_weight_args(hidden, weight, targets, lse, grad_rows, acc, grad_weight,
                                 stride_hm, stride_wv, M, V, D_pad, scale).values()
        if tuned:
            _grad_weight_autotuned[lambda meta: (triton.cdiv(V, meta["BLOCK_V"]),)](*args, **LAUNCH_OPTIONS)
        else:
            _grad_weight_kernel[(triton.cdiv(V, cfg.block_v),)](
                *args, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS)
        if D_pad != D:
            grad_weight = grad_weight[:, :D].contiguous()
    return grad_hidden, grad_weight


def _grad_hidden(hidden, weight, targets, lse, grad_rows, stride_hm, stride_wv, M, V, D_pad, scale, tuned, blocks,
                 _splits):
    """grad_hidden's launch: (M, D_pad) in hidden's dtype, the vocabulary split over ``splits``
    programs whose float32 partial sums are added in a fixed order (no atomics)."""
    dtype, device = hidden.dtype, hidden.device
    _block_m, _block_v, _block_d = blocks
    grad_hidden = torch.empty((M, D_pad), dtype=dtype, device=device)
    if M > 0:
        cfg = _config("bwd_h", dtype, _block_m, _block_v, _block_d)
        splits = _splits or _num_splits(M, V, cfg, cap=_MAX_HIDDEN_SPLITS)
        direct = splits == 1
        if direct:
            # float32 sums can go straight into a float32 gradient; 16-bit ones need
            # their own float32 rows.
            acc = grad_hidden if dtype == torch.float32 else torch.empty_like(grad_hidden, dtype=torch.float32)
            acc = acc.view(1, M, D_pad)
        else:
            acc = torch.empty((splits, M, D_pad), dtype=torch.float32, device=device)
        args = _grad_hidden_args(hidden, weight, targets, lse, grad_rows, acc, grad_hidden,
                                 stride_hm, stride_wv, M, V, D_pad, scale, direct).values()
        if tuned:
            _grad_hidden_autotuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)](
                *args, **LAUNCH_OPTIONS)
        else:
            _grad_hidden_kernel[(triton.cdiv(M, cfg.block_m), splits)](
                *args, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS)
        if not direct:
            # Fixed-order sum over the splits (a plain reduction: no atomics), then the
            # per-row factor the kernel left out, as the direct path applies it.
            grad_hidden.copy_(acc.sum(0).mul_((grad_rows * scale)[:, None]))
    return grad_hidden


# --------------------------------------------------------------------------------------
# what ships, for ahead-of-time compilation (fastdpo.kernel_report)
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LinearKernelSpec:
    """One shipped kernel specialization, ready for ``triton.compile(ASTSource(...))``."""

    name: str                   # "lin_fwd", "lin_combine", "lin_bwd_h" or "lin_bwd_w"
    dtype: str                  # hidden/weight dtype: "fp32", "bf16" or "fp16"
    D: int
    V: int
    config: LinearConfig
    fn: object                  # the @triton.jit function
    signature: dict[str, str]   # argument name -> Triton type, as the JIT would specialize it
    constexprs: dict[str, object]
    attrs: dict[tuple[int, ...], list]  # (arg index,) -> [["tt.divisibility", 16]]


# The shapes the report builds. The launchers align every row (_aligned_rows), so the
# JIT's remaining specializations are M and V on divisibility by 16 (M = 1 and V = 1 as
# constants), which only change row and column masks: one shape with M % 16 != 0 and
# V % 16 == 0, the Llama 3 8B head, covers the masked and unmasked cases between them.
AOT_SHAPES: dict[tuple[int, int], str] = {
    (4096, 128256): "aligned rows, 16-byte cp.async; M = 16383 (Llama 3 8B head)",
}


def aot_specs(shapes: tuple[tuple[int, int], ...] = tuple(AOT_SHAPES), M: int = 16383) -> list[LinearKernelSpec]:
    """The kernels as the launchers start them on contiguous hidden (M, D) and weight (V, D)
    with the shipped configurations, for every supported dtype and each (D, V) in `shapes`:
    the forward, grad_hidden (one binary for one split and several) and grad_weight; and the
    forward's combine, which reads float32 partials only, once.  Built by the launchers' own
    argument builders, on stand-ins."""
    f32, splits = torch.float32, 3
    specs = []
    parts = [Example(f32, splits, M)] * 3
    rows = Example(f32, M)
    fn = _lse_combine_kernel
    args = _combine_args(parts, Example(torch.int64, M), rows, rows, M, shapes[0][1], splits)
    specs.append(LinearKernelSpec("lin_combine", "fp32", 0, shapes[0][1], _COMBINE_CONFIG,
                                  fn, *specialize(fn, aot_example(args, BLOCK=_COMBINE_BLOCK))))
    for D, V in shapes:
        for torch_dtype, tdt in TRITON_DTYPE.items():
            hidden, weight, targets = Example(torch_dtype, M, D), Example(torch_dtype, V, D), Example(torch.int64, M)

            def blocks(cfg: LinearConfig) -> dict:
                return dict(BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)

            cfg = _DEFAULT_CONFIGS["fwd", torch_dtype]
            fn = _lse_partials_kernel
            args = _fwd_args(hidden, weight, targets, parts, D, D, M, V, D, 1.0)
            specs.append(LinearKernelSpec("lin_fwd", tdt, D, V, cfg, fn, *specialize(fn, aot_example(args, **blocks(cfg)))))

            cfg = _DEFAULT_CONFIGS["bwd_h", torch_dtype]
            fn = _grad_hidden_kernel
            args = _grad_hidden_args(hidden, weight, targets, rows, rows, Example(f32, 1, M, D), Example(torch_dtype, M, D),
                                     D, D, M, V, D, 1.0, True)
            specs.append(LinearKernelSpec("lin_bwd_h", tdt, D, V, cfg, fn, *specialize(fn, aot_example(args, **blocks(cfg)))))

            cfg = _DEFAULT_CONFIGS["bwd_w", torch_dtype]
            fn = _grad_weight_kernel
            args = _grad_weight_args(hidden, weight, targets, rows, rows, Example(f32, V, D), Example(torch_dtype, V, D),
                                     D, D, M, V, D, 1.0)
            specs.append(LinearKernelSpec("lin_bwd_w", tdt, D, V, cfg, fn, *specialize(fn, aot_example(args, **blocks(cfg)))))
    return specs
