"""Property tests (hypothesis): sequence_logprobs, linear_sequence_logprobs and DPO.

Each property runs on every implementation, as its own test (so each gets its own example
budget and its own line in ``--hypothesis-show-statistics``):

* ``sequence_logprobs``: ``impl="torch"`` (with its cache boxes shrunk at random to cross box
  boundaries) and ``impl="triton"`` (the kernels, interpreted on CPU tensors: N*T <= 12,
  V <= 300);
* ``linear_sequence_logprobs``: ``impl="torch"`` (chunked, with chunks and boxes shrunk at
  random) and ``impl="triton"`` with either ``matmul`` (drawn per example): torch products
  and the Triton fold, or the Triton GEMM kernels (interpreted: float32 and float16 only,
  see LINEAR_TRITON_DTYPES);
* ``DPO``: its routes on a tiny x-transformers TransformerWrapper (``ROUTES``) -- the fused
  head (``head="fused"``) and the logits route (``head="logits"``), each with
  ``impl="torch"`` and ``impl="triton"``, and the fused head on the Triton GEMM kernels.

Properties: invariance under a per-row constant added to the logits (+-1e4 included in
float32); batch permutation; padding with masked positions; all-false masks give exactly 0;
log-probs <= 0 and the vocabulary's probabilities sum to 1; values and gradients against
float64 autograd (the three-way rule of helpers.py).

Tolerances are derived, never tuned: float32 arithmetic on numbers of magnitude M is exact to
about ``eps32 * M``; see :func:`row_bound`.  Low-precision inputs of the shift property are
drawn on a grid (multiples of 1/4, |z| <= 24) and shifted by integers |c| <= 32, so the
shifted logits are exact in bfloat16 and float16 and the property tests the op, not the
rounding of its input.

Profiles: tests/hypothesis_profiles.py (``ci`` by default; ``FASTDPO_HYPOTHESIS_PROFILE=deep``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from x_transformers import TransformerWrapper
from x_transformers.dpo import DPO as XDPO

import fastdpo.scoring.rows as chunks
from fastdpo import DPO, linear_sequence_logprobs, sequence_logprobs
from fastdpo.scoring.backends import torch_fold as torch_impl
from fastdpo.modules.dpo import deepcopy_module

from helpers import TOL, reference_logprobs, three_way, tiny_transformer
from hypothesis_profiles import scaled

# The interpreter evaluates kernels with numpy, which warns about overflow in lanes past the
# end of a row (computed, never stored) when rows are shifted by 1e4.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps
# The routes of DPO: (head, impl, matmul).  With impl="triton" the fused head multiplies with
# torch and folds with the Triton kernels (the CUDA default), or, with matmul="triton", runs
# the Triton GEMM kernels (fastdpo.kernels.linear_sequence_logprobs); the logits route runs
# the log-prob kernels.
ROUTES = {
    "fused": ("fused", "torch", "auto"),
    "fused_triton": ("fused", "triton", "torch"),
    "fused_triton_gemm": ("fused", "triton", "triton"),
    "logits_torch": ("logits", "torch", "auto"),
    "logits_triton": ("logits", "triton", "auto"),
}
# Triton runs on CUDA tensors when there is a GPU, else interpreted on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton 3.9's interpreter gets tl.dot on bfloat16 wrong (a plain 16x16 bf16 dot is off by
# ~3e10), so interpreted runs of the Triton GEMM kernels (which multiply with tl.dot) leave
# bf16 out; on a GPU they cover it.  The default Triton route multiplies with torch: all dtypes.
LINEAR_TRITON_DTYPES = DTYPES if torch.cuda.is_available() else [torch.float32, torch.float16]


def device(impl: str) -> str:
    return TRITON_DEVICE if impl == "triton" else "cpu"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: with 2 intra-op threads on a shared 2-core machine, OpenMP hand-offs cost
    ~50x the work (measured: 0.14 s vs 0.002 s for one tiny model step).  Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers


def values(g: torch.Generator, shape, scale: float, dtype: torch.dtype, *, grid: bool) -> Tensor:
    x = torch.randn(shape, generator=g) * scale
    if grid:
        # Multiples of 1/4 in [-24, 24]: exact in bfloat16 (8 significant bits) and float16,
        # and still exact after adding an integer |c| <= 32 (|z + c| < 64 = 2^8 / 4).
        x = (x * 4).round().clamp(-96, 96) / 4
    return x.to(dtype)


def row_bound(zabs: Tensor, shift: Tensor | float, v: int) -> Tensor:
    """Bound on the float32 error of one row's log-prob ``z_y - logsumexp(z)``.

    The max, the shift by it and ``log(sum exp)`` each err by a few eps32 times the
    magnitudes involved: the largest |logit| of the row (``zabs``), the constant added to it,
    and log V.  8 covers them with room; it does not grow with anything else.
    """
    return 8 * EPS32 * (zabs + torch.as_tensor(shift).abs() + math.log(max(v, 1)) + 1)


@dataclass
class Case:
    logits: Tensor  # (N, T, V)
    targets: Tensor  # (N, T), -100 where masked (never read there)
    mask: Tensor  # (N, T) bool
    upstream: Tensor  # (N,) random upstream gradient
    box_rows: int | None  # torch_impl.BOX_BYTES in rows of V float32, None = shipped

    @property
    def shape(self):
        return tuple(self.logits.shape)

    @property
    def dtype(self):
        return self.logits.dtype


@st.composite
def logprob_cases(draw, impl: str, *, grid: bool = False, max_v: int = 300, max_rows: int = 12):
    if impl == "triton":  # interpreted: keep it tiny
        n = draw(st.integers(1, 4))
        t = draw(st.integers(1, max(1, max_rows // n)))
    else:
        n = draw(st.integers(1, 5))
        t = draw(st.integers(1, 8))
    v = draw(st.integers(1, min(20, max_v)) | st.integers(min(21, max_v), max_v))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
    p_count = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    box_rows = draw(st.sampled_from([None, 1, 2, 3])) if impl == "torch" else None
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = values(g, (n, t, v), scale, dtype, grid=grid and dtype != torch.float32)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) < p_count
    targets = torch.where(mask, targets, -100)
    upstream = torch.randn(n, generator=g)
    return Case(logits, targets, mask, upstream, box_rows)


def boxes(case_or_rows, v: int | None = None):
    """Shrink the torch implementation's cache boxes (a context manager)."""
    rows = case_or_rows.box_rows if isinstance(case_or_rows, Case) else case_or_rows
    if rows is None:
        return mock.patch.object(torch_impl, "BOX_BYTES", torch_impl.BOX_BYTES)
    v = v if v is not None else case_or_rows.shape[-1]
    return mock.patch.object(torch_impl, "BOX_BYTES", 4 * v * rows)


def run_op(impl, logits, targets, mask, upstream):
    """(scores, d scores . upstream / d logits) of sequence_logprobs, back on the CPU."""
    dev = device(impl)
    z = logits.detach().to(dev).requires_grad_()
    s = sequence_logprobs(z, targets.to(dev), mask.to(dev), impl=impl)
    s.backward(upstream.to(dev))
    return s.detach().cpu(), z.grad.cpu()


# ============================================================================ sequence_logprobs


def check_shift_invariance(case: Case, data, impl: str):
    n, t, v = case.shape
    if case.dtype == torch.float32:
        const = st.sampled_from([1e4, -1e4, 0.0]) | st.floats(-1e4, 1e4, allow_nan=False)
    else:
        const = st.integers(-32, 32).map(float)
    c = torch.tensor(data.draw(st.lists(const, min_size=n * t, max_size=n * t))).reshape(n, t, 1)
    shifted = (case.logits.float() + c).to(case.dtype)
    if case.dtype != torch.float32:  # the grid makes the shift exact: the test tests the op
        assert torch.equal(shifted.float() - c, case.logits.float())
    with boxes(case):
        s0, g0 = run_op(impl, case.logits, case.targets, case.mask, case.upstream)
        s1, g1 = run_op(impl, shifted, case.targets, case.mask, case.upstream)
    zabs = case.logits.float().abs().amax(-1)
    per_row = torch.where(case.mask, row_bound(zabs, c.squeeze(-1), v), 0.0)
    # plus the float32 sum over T of rows that are all <= 0 (no cancellation)
    bound = per_row.sum(-1) + 2 * EPS32 * t * s0.abs()
    assert ((s1 - s0).abs() <= bound).all(), ((s1 - s0).abs(), bound)
    # softmax(z + c) = softmax(z): the gradient moves by its float32 error, plus one rounding
    # to the logits dtype
    gmax = case.upstream.abs().max()
    atol = gmax * (2 * torch.finfo(case.dtype).eps + row_bound(zabs.max(), c.abs().max(), v))
    torch.testing.assert_close(g1.float(), g0.float(), rtol=0, atol=float(atol))


@scaled(1.0)
@given(case=logprob_cases("torch", grid=True), data=st.data())
def test_shift_invariance_torch(case, data):
    check_shift_invariance(case, data, "torch")


@scaled(0.6)
@given(case=logprob_cases("triton", grid=True), data=st.data())
def test_shift_invariance_triton(case, data):
    check_shift_invariance(case, data, "triton")


def check_batch_permutation(case: Case, data, impl: str):
    n = case.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    with boxes(case):
        s, g = run_op(impl, case.logits, case.targets, case.mask, case.upstream)
        sp, gp = run_op(
            impl, case.logits[perm], case.targets[perm], case.mask[perm], case.upstream[perm]
        )
    # Rows are scored independently and summed in a fixed order: the same bits, permuted.
    assert torch.equal(sp, s[perm])
    assert torch.equal(gp, g[perm])


@scaled(1.0)
@given(case=logprob_cases("torch"), data=st.data())
def test_batch_permutation_torch(case, data):
    check_batch_permutation(case, data, "torch")


@scaled(0.6)
@given(case=logprob_cases("triton"), data=st.data())
def test_batch_permutation_triton(case, data):
    check_batch_permutation(case, data, "triton")


def check_masked_padding(case: Case, data, impl: str):
    n, t, v = case.shape
    k = data.draw(st.integers(1, 4 if impl == "torch" else max(1, 16 // n - t)))
    side = data.draw(st.sampled_from(["right", "left"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    # padding rows hold anything: huge, infinite, NaN logits and ids no vocabulary has
    pad = (torch.randn(n, k, v, generator=g) * 1e4).to(case.dtype)
    pad[torch.rand(n, k, v, generator=g) < 0.2] = float("nan")
    pad[torch.rand(n, k, v, generator=g) < 0.2] = float("inf")
    pad_targets = torch.randint(-(2**40), 2**40, (n, k), generator=g)
    pad_mask = torch.zeros(n, k, dtype=torch.bool)

    def cat(a, b):
        return torch.cat((a, b) if side == "right" else (b, a), dim=1)

    keep = slice(0, t) if side == "right" else slice(k, k + t)
    with boxes(case):
        s, g0 = run_op(impl, case.logits, case.targets, case.mask, case.upstream)
        sp, gp = run_op(
            impl, cat(case.logits, pad), cat(case.targets, pad_targets),
            cat(case.mask, pad_mask), case.upstream,
        )
    # The same per-row values, summed over more (exactly zero) terms: float32 summation of
    # values all <= 0 errs by at most (T + k) eps32 * |sum|.
    assert ((sp - s).abs() <= 2 * EPS32 * (t + k) * s.abs()).all(), (sp, s)
    assert torch.equal(gp[:, keep], g0)
    padded = torch.ones(t + k, dtype=torch.bool)
    padded[keep] = False
    assert (gp[:, padded] == 0).all()


@scaled(1.0)
@given(case=logprob_cases("torch"), data=st.data())
def test_masked_padding_torch(case, data):
    check_masked_padding(case, data, "torch")


@scaled(0.6)
@given(case=logprob_cases("triton", max_rows=8), data=st.data())
def test_masked_padding_triton(case, data):
    check_masked_padding(case, data, "triton")


def check_all_false_mask(case: Case, data, impl: str):
    n, t, v = case.shape
    logits = case.logits.clone()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    logits[torch.rand(n, t, v, generator=g) < 0.1] = float("nan")  # never read
    logits[torch.rand(n, t, v, generator=g) < 0.1] = float("inf")
    targets = torch.randint(-(2**40), 2**40, (n, t), generator=g)
    none = torch.zeros(n, t, dtype=torch.bool)
    with boxes(case):
        s, grad = run_op(impl, logits, targets, none, case.upstream)
    assert torch.equal(s, torch.zeros(n)) and not s.signbit().any()  # +0.0, exactly
    assert torch.equal(grad, torch.zeros_like(grad))


@scaled(1.0)
@given(case=logprob_cases("torch"), data=st.data())
def test_all_false_mask_torch(case, data):
    check_all_false_mask(case, data, "torch")


@scaled(0.6)
@given(case=logprob_cases("triton"), data=st.data())
def test_all_false_mask_triton(case, data):
    check_all_false_mask(case, data, "triton")


def check_probabilities(case: Case, data, impl: str):
    n, t, v = case.shape
    with boxes(case):
        # Every row's log-prob, each row its own sequence (a view: no copy): all <= 0.
        dev = device(impl)
        rows = sequence_logprobs(
            case.logits.reshape(n * t, 1, v).to(dev), case.targets.reshape(-1, 1).to(dev),
            case.mask.reshape(-1, 1).to(dev), impl=impl,
        ).cpu()
        assert (rows <= 0).all(), rows
        # One row, against every token of the vocabulary: V sequences of one position, the
        # logits row expanded (stride 0) and the targets 0..V-1 -- a one-hot mask per token.
        r = data.draw(st.integers(0, n * t - 1))
        row = case.logits.reshape(n * t, v)[r]
        every = sequence_logprobs(
            row.to(dev).expand(v, 1, v), torch.arange(v, device=dev).reshape(v, 1),
            torch.ones(v, 1, dtype=torch.bool, device=dev), impl=impl,
        ).cpu()
    assert (every <= 0).all(), every
    total = every.double().exp().sum().item()
    assert abs(total - 1) <= 2 * row_bound(row.float().abs().max(), 0.0, v).item(), total
    if v == 1:
        assert every.item() == 0.0


@scaled(1.0)
@given(case=logprob_cases("torch"), data=st.data())
def test_probabilities_torch(case, data):
    check_probabilities(case, data, "torch")


@scaled(0.6)
@given(case=logprob_cases("triton", max_v=12), data=st.data())
def test_probabilities_triton(case, data):
    check_probabilities(case, data, "triton")


def check_against_float64(case: Case, impl: str):
    truth_in = case.logits.double().requires_grad_()
    truth = reference_logprobs(truth_in, case.targets, case.mask)
    truth.backward(case.upstream.double())
    ref_in = case.logits.clone().requires_grad_()
    ref = reference_logprobs(ref_in, case.targets, case.mask)
    ref.float().backward(case.upstream)
    with boxes(case):
        ours, grad = run_op(impl, case.logits, case.targets, case.mask, case.upstream)
    assert ours.dtype == torch.float32 and grad.dtype == case.dtype
    three_way(ours, ref, truth, case.dtype, "scores")
    three_way(grad, ref_in.grad, truth_in.grad, case.dtype, "grad")
    assert (grad[~case.mask] == 0).all()


@scaled(1.0)
@given(case=logprob_cases("torch"))
def test_against_float64_torch(case):
    check_against_float64(case, "torch")


@scaled(0.6)
@given(case=logprob_cases("triton"))
def test_against_float64_triton(case):
    check_against_float64(case, "triton")


# ============================================================================ linear


@dataclass
class LinearCase:
    hidden: Tensor  # (N, T, D)
    weight: Tensor  # (V, D)
    targets: Tensor
    mask: Tensor
    scale: float | None
    upstream: Tensor
    chunk_rows: int | None  # chunks.CHUNK_BYTES in rows, None = shipped
    box_rows: int | None
    impl: str
    matmul: str  # with impl="triton": "torch" (torch products, Triton fold) or "triton" (GEMM kernels)

    def patches(self):
        v = self.weight.shape[0]
        stack = []
        if self.chunk_rows is not None:
            stack.append(mock.patch.object(chunks, "CHUNK_BYTES", 4 * v * self.chunk_rows))
        stack.append(boxes(self.box_rows, v))
        return stack


@st.composite
def linear_cases(draw, impl: str, *, grid: bool = False):
    n = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6 if impl == "torch" else max(1, 12 // n)))
    d = draw(st.integers(1, 8 if grid else 16))
    v = draw(st.integers(1, 20) | st.integers(21, 300))
    matmul = "torch" if impl == "torch" else draw(st.sampled_from(["torch", "triton"]))
    dtype = draw(st.sampled_from(LINEAR_TRITON_DTYPES if matmul == "triton" else DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if grid and dtype != torch.float32:
        # h in {0, +-1/2, +-1}, W integers in [-3, 3], D <= 8: logits are multiples of 1/2
        # with |z| <= 24, exact in bfloat16 and float16 before and after a shift |c| <= 32.
        hidden = (torch.randint(-2, 3, (n, t, d), generator=g) / 2).to(dtype)
        weight = torch.randint(-3, 4, (v, d), generator=g).to(dtype)
        scale = draw(st.sampled_from([None, 0.5]))
    else:
        hidden = torch.randn(n, t, d, generator=g).to(dtype)
        weight = (torch.randn(v, d, generator=g) * draw(st.sampled_from([0.1, 1.0, 3.0])) / d**0.5).to(dtype)
        scale = draw(st.sampled_from([None, 0.37, 2.0]))
    mask = torch.rand(n, t, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    targets = torch.where(mask, torch.randint(0, v, (n, t), generator=g), -100)
    return LinearCase(
        hidden, weight, targets, mask, scale, torch.randn(n, generator=g),
        draw(st.sampled_from([None, 1, 2, 5])), draw(st.sampled_from([None, 1, 3])), impl, matmul,
    )


def logit_magnitude(case: LinearCase, hidden: Tensor) -> Tensor:
    """(N, T) bound on each row's largest |logit|: |h| @ |W|.T * |scale|."""
    k = abs(case.scale) if case.scale is not None else 1.0
    return (hidden.float().abs() @ case.weight.float().abs().T).amax(-1) * k


def linear_grad_atols(case: LinearCase, rel: Tensor | float) -> tuple[float, float]:
    """Absolute bounds on d hidden and d weight when each entry of d logits moves by at most
    ``rel * |upstream|``: d hidden sums V of them times |W| (column sums), d weight sums the
    counted rows times |h|."""
    k = abs(case.scale) if case.scale is not None else 1.0
    gmax = case.upstream.abs().max()
    rows = max(int(case.mask.sum()), 1)
    atol_h = 2 * gmax * rel * k * case.weight.float().abs().sum(0).max()
    atol_w = 2 * gmax * rel * k * rows * case.hidden.float().abs().max()
    return float(atol_h), float(atol_w)


def run_linear(case: LinearCase, hidden=None, weight=None, targets=None, mask=None, upstream=None):
    h = (case.hidden if hidden is None else hidden).detach().clone().requires_grad_()
    w = (case.weight if weight is None else weight).detach().clone().requires_grad_()
    targets = case.targets if targets is None else targets
    mask = case.mask if mask is None else mask
    upstream = case.upstream if upstream is None else upstream
    patches = case.patches()
    for p in patches:
        p.start()
    dev = device(case.impl)
    try:
        s = linear_sequence_logprobs(
            h.to(dev), w.to(dev), targets.to(dev), mask.to(dev), scale=case.scale, impl=case.impl,
            matmul=case.matmul,
        )
        s.backward(upstream.to(dev))
    finally:
        for p in reversed(patches):
            p.stop()
    return s.detach().cpu(), h.grad, w.grad


def check_linear_shift_invariance(case, data):
    """A constant per row added to the logits through an extra hidden feature: hidden gets a
    column c, weight a column of ones, so the logits become ``(h @ W.T + c) * scale``."""
    n, t, d = case.hidden.shape
    v = case.weight.shape[0]
    dtype = case.hidden.dtype
    if dtype == torch.float32:
        const = st.sampled_from([1e4, -1e4, 0.0]) | st.floats(-1e4, 1e4, allow_nan=False)
    else:
        const = st.integers(-32, 32).map(float)
    c = torch.tensor(data.draw(st.lists(const, min_size=n * t, max_size=n * t))).reshape(n, t, 1)
    h1 = torch.cat((case.hidden, c.to(dtype)), -1)
    w1 = torch.cat((case.weight, torch.ones(v, 1, dtype=dtype)), -1)
    if dtype != torch.float32:
        assert torch.equal(h1[..., -1:].float(), c)
    s0, gh0, gw0 = run_linear(case)
    s1, gh1, gw1 = run_linear(case, hidden=h1, weight=w1)
    k = abs(case.scale) if case.scale is not None else 1.0
    zabs = logit_magnitude(case, case.hidden)
    shift = c.squeeze(-1).abs() * k
    per_row = torch.where(case.mask, row_bound(zabs, shift, v), 0.0)
    bound = per_row.sum(-1) + 2 * EPS32 * t * s0.abs()
    assert ((s1 - s0).abs() <= bound).all(), ((s1 - s0).abs(), bound)
    rel = 4 * torch.finfo(dtype).eps + row_bound(zabs.max(), shift.max(), v)
    atol_h, atol_w = linear_grad_atols(case, rel)
    torch.testing.assert_close(gh1[..., :d].float(), gh0.float(), rtol=0, atol=atol_h)
    torch.testing.assert_close(gw1[:, :d].float(), gw0.float(), rtol=0, atol=atol_w)


def check_linear_batch_permutation(case, data):
    n, t, _ = case.hidden.shape
    v = case.weight.shape[0]
    eps = torch.finfo(case.hidden.dtype).eps
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    s, gh, gw = run_linear(case)
    sp, ghp, gwp = run_linear(
        case, hidden=case.hidden[perm], targets=case.targets[perm], mask=case.mask[perm],
        upstream=case.upstream[perm],
    )
    # Counted rows are gathered in another order, so the head GEMM may round a row
    # differently (in float32, and once more when the product is rounded to a 16-bit
    # dtype: eps * |z|), and the weight gradient sums its rows in another order.
    zabs = logit_magnitude(case, case.hidden)
    per_row = torch.where(case.mask, row_bound(zabs, 0.0, v) + 2 * eps * zabs, 0.0)
    bound = per_row.sum(-1) + 2 * EPS32 * t * s.abs()
    assert ((sp - s[perm]).abs() <= bound[perm]).all(), ((sp - s[perm]).abs(), bound[perm])
    rel = 4 * eps + row_bound(zabs.max(), 0.0, v) + 2 * eps * zabs.max()
    atol_h, atol_w = linear_grad_atols(case, rel)
    torch.testing.assert_close(ghp.float(), gh[perm].float(), rtol=0, atol=atol_h)
    torch.testing.assert_close(gwp.float(), gw.float(), rtol=0, atol=atol_w)


def check_linear_masked_padding(case, data):
    n, t, d = case.hidden.shape
    k = data.draw(st.integers(1, 4))
    side = data.draw(st.sampled_from(["right", "left"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    if case.impl == "torch":  # never multiplied: anything goes
        pad_h = (torch.randn(n, k, d, generator=g) * 1e4).to(case.hidden.dtype)
        pad_h[torch.rand(n, k, d, generator=g) < 0.3] = float("nan")
    else:  # the kernels process every row (non-finite hidden states there: test_extremes)
        pad_h = torch.randn(n, k, d, generator=g).to(case.hidden.dtype)

    def cat(a, b):
        return torch.cat((a, b) if side == "right" else (b, a), dim=1)

    s, gh, gw = run_linear(case)
    sp, ghp, gwp = run_linear(
        case, hidden=cat(case.hidden, pad_h),
        targets=cat(case.targets, torch.randint(-(2**40), 2**40, (n, k), generator=g)),
        mask=cat(case.mask, torch.zeros(n, k, dtype=torch.bool)),
    )
    keep = slice(0, t) if side == "right" else slice(k, k + t)
    pad = slice(t, t + k) if side == "right" else slice(0, k)
    assert (ghp[:, pad] == 0).all()
    if case.impl == "torch":
        # Only counted rows are gathered: the same rows in the same order, the same bits.
        assert torch.equal(sp, s)
        assert torch.equal(ghp[:, keep], gh)
        assert torch.equal(gwp, gw)
        return
    # The kernels tile all N*T rows: other tiles, so float32 rounding (as in permutation).
    eps = torch.finfo(case.hidden.dtype).eps
    zabs = logit_magnitude(case, case.hidden)
    per_row = torch.where(case.mask, row_bound(zabs, 0.0, case.weight.shape[0]) + 2 * eps * zabs, 0.0)
    assert ((sp - s).abs() <= per_row.sum(-1) + 2 * EPS32 * t * s.abs()).all(), (sp, s)
    rel = 4 * eps + row_bound(zabs.max(), 0.0, case.weight.shape[0]) + 2 * eps * zabs.max()
    atol_h, atol_w = linear_grad_atols(case, rel)
    torch.testing.assert_close(ghp[:, keep].float(), gh.float(), rtol=0, atol=atol_h)
    torch.testing.assert_close(gwp.float(), gw.float(), rtol=0, atol=atol_w)


def check_linear_all_false_mask(case, data):
    n, t, d = case.hidden.shape
    hidden = case.hidden.clone()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    if case.impl == "torch":  # never read (the kernels read every row: see test_extremes)
        hidden[torch.rand(n, t, d, generator=g) < 0.2] = float("nan")
    none = torch.zeros(n, t, dtype=torch.bool)
    targets = torch.randint(-(2**40), 2**40, (n, t), generator=g)
    s, gh, gw = run_linear(case, hidden=hidden, targets=targets, mask=none)
    assert torch.equal(s, torch.zeros(n)) and not s.signbit().any()
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def check_linear_probabilities(case, data):
    n, t, d = case.hidden.shape
    v = case.weight.shape[0]
    hr = case.hidden.reshape(n * t, 1, d)
    rows, _, _ = run_linear(
        case, hidden=hr, targets=case.targets.reshape(-1, 1), mask=case.mask.reshape(-1, 1),
        upstream=torch.ones(n * t),
    )
    assert (rows <= 0).all(), rows
    r = data.draw(st.integers(0, n * t - 1))
    every, _, _ = run_linear(
        case, hidden=hr[r : r + 1].expand(v, 1, d), targets=torch.arange(v).reshape(v, 1),
        mask=torch.ones(v, 1, dtype=torch.bool), upstream=torch.ones(v),
    )
    assert (every <= 0).all(), every
    k = abs(case.scale) if case.scale is not None else 1.0
    zabs = (hr[r].float().abs() @ case.weight.float().abs().T).max() * k
    total = every.double().exp().sum().item()
    assert abs(total - 1) <= 2 * row_bound(zabs, 0.0, v).item(), total


def check_linear_against_float64(case):
    def via_logits(h, w):
        z = h @ w.T
        if case.scale is not None:
            z = z * case.scale
        return reference_logprobs(z, case.targets, case.mask)

    def run(cast):
        h = cast(case.hidden).requires_grad_()
        w = cast(case.weight).requires_grad_()
        out = via_logits(h, w)
        out.backward(case.upstream.to(out.dtype))
        return out, h.grad, w.grad

    truth = run(lambda x: x.double())
    ref = run(lambda x: x.clone())
    ours = run_linear(case)
    for what, o, r, tr in zip(("scores", "d hidden", "d weight"), ours, ref, truth):
        three_way(o, r, tr, case.hidden.dtype, what)


# One test per property and implementation; the interpreted kernels get fewer examples.


@scaled(1.0)
@given(case=linear_cases("torch", grid=True), data=st.data())
def test_linear_shift_invariance_torch(case, data):
    check_linear_shift_invariance(case, data)


@scaled(0.6)
@given(case=linear_cases("triton", grid=True), data=st.data())
def test_linear_shift_invariance_triton(case, data):
    check_linear_shift_invariance(case, data)


@scaled(1.0)
@given(case=linear_cases("torch"), data=st.data())
def test_linear_batch_permutation_torch(case, data):
    check_linear_batch_permutation(case, data)


@scaled(0.6)
@given(case=linear_cases("triton"), data=st.data())
def test_linear_batch_permutation_triton(case, data):
    check_linear_batch_permutation(case, data)


@scaled(1.0)
@given(case=linear_cases("torch"), data=st.data())
def test_linear_masked_padding_torch(case, data):
    check_linear_masked_padding(case, data)


@scaled(0.6)
@given(case=linear_cases("triton"), data=st.data())
def test_linear_masked_padding_triton(case, data):
    check_linear_masked_padding(case, data)


@scaled(1.0)
@given(case=linear_cases("torch"), data=st.data())
def test_linear_all_false_mask_torch(case, data):
    check_linear_all_false_mask(case, data)


@scaled(0.6)
@given(case=linear_cases("triton"), data=st.data())
def test_linear_all_false_mask_triton(case, data):
    check_linear_all_false_mask(case, data)


@scaled(1.0)
@given(case=linear_cases("torch"), data=st.data())
def test_linear_probabilities_torch(case, data):
    check_linear_probabilities(case, data)


@scaled(0.6)
@given(case=linear_cases("triton"), data=st.data())
def test_linear_probabilities_triton(case, data):
    check_linear_probabilities(case, data)


@scaled(1.0)
@given(case=linear_cases("torch"))
def test_linear_against_float64_torch(case):
    check_linear_against_float64(case)


@scaled(0.6)
@given(case=linear_cases("triton"))
def test_linear_against_float64_triton(case):
    check_linear_against_float64(case)


# ============================================================================ DPO


def make_model(v: int, *, tie: bool, seed: int, dtype=torch.float32) -> TransformerWrapper:
    return tiny_transformer(v, max_seq_len=16, dim=16, depth=1, heads=2, seed=seed, tie=tie, dtype=dtype)


def perturb_(module: nn.Module, seed: int, skip=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


@dataclass
class DPOCase:
    v: int
    tie: bool
    seed: int
    beta: float
    reduction: str
    alignment: str
    pref: Tensor  # (B, L) ids in [1, V): 0 is the pad id
    unpref: Tensor
    prompt_mask: Tensor


@st.composite
def dpo_cases(draw, route: str, *, max_rows: int = 12, max_v: int | None = None):
    """Pairs of tiny sequences; the logits of the Triton route stay within N*T <= max_rows."""
    triton = ROUTES[route][1] == "triton"
    v = draw(st.integers(3, max_v or (32 if triton else 64)))
    b = draw(st.integers(1, 3))
    max_l = min(8, 1 + max_rows // (2 * b)) if triton else 8
    l = draw(st.integers(2, max(2, max_l)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pref = torch.randint(1, v, (b, l), generator=g)
    unpref = torch.randint(1, v, (b, l), generator=g)
    prompt_lens = torch.tensor(draw(st.lists(st.integers(0, l), min_size=b, max_size=b)))
    prompt_mask = torch.arange(l)[None] < prompt_lens[:, None]
    unpref[prompt_mask] = pref[prompt_mask]  # a shared prompt
    # Completions differ in their last token, which both alignments score (unless it is
    # prompt): identical pairs have an exactly-zero loss gradient, and comparing two
    # roundings of zero says nothing.
    last = ~prompt_mask[:, -1]
    unpref[last, -1] = pref[last, -1] % (v - 1) + 1
    return DPOCase(
        v=v, tie=draw(st.booleans()), seed=seed,
        beta=draw(st.sampled_from([0.1, 0.5, 2.0])),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        alignment=draw(st.sampled_from(["input", "target"])),
        pref=pref, unpref=unpref, prompt_mask=prompt_mask,
    )


def make_dpo(case: DPOCase, route: str, model: nn.Module | None = None, **kw) -> DPO:
    head, impl, matmul = ROUTES[route]
    dpo = DPO(
        model if model is not None else make_model(case.v, tie=case.tie, seed=case.seed % 1000),
        beta=case.beta, pad_id=0, logprob_reduction=case.reduction,
        mask_alignment=case.alignment, head=head, impl=impl, matmul=matmul, **kw,
    )
    # Move the policy away from the reference, so the loss and its gradients are not trivial.
    perturb_(dpo.policy_model, case.seed)
    return dpo.to(device(impl))


def on(dpo: nn.Module, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` on the device of ``dpo``'s parameters."""
    dev = next(dpo.parameters()).device
    return tuple(t.to(dev) for t in tensors)


def loss_and_grads(dpo, pref, unpref, prompt_mask, **kw):
    """(loss, {name: d loss / d policy parameter}), on the CPU."""
    dpo.policy_model.zero_grad(set_to_none=True)
    pref, unpref, prompt_mask = on(dpo, pref, unpref, prompt_mask)
    kw = {k: on(dpo, v)[0] for k, v in kw.items()}
    loss = dpo(pref, unpref, prompt_mask=prompt_mask, **kw)
    loss.backward()
    grads = {n: p.grad.cpu().clone() for n, p in dpo.policy_model.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads


def reference_scores(dpo, pref, unpref, prompt_mask) -> tuple[Tensor, Tensor]:
    w, l = dpo.reference_scores(*on(dpo, pref, unpref), prompt_mask=on(dpo, prompt_mask)[0])
    return w.cpu(), l.cpu()


def grad_scale(case: DPOCase, pref, unpref, prompt_mask) -> dict[str, float]:
    """Per parameter, ``mean_i ||d loss_i / d p||`` over the pairs: the size of the terms the
    batch gradient adds up.  Pairs can cancel (two mirror-image pairs nearly do), leaving a
    gradient far smaller than the float32 noise of its terms; this scale cannot shrink so.
    Computed on the logits route with torch (same weights as every route: make_dpo)."""
    dpo = make_dpo(case, "logits_torch")
    b = pref.shape[0]
    scale: dict[str, float] = {}
    for i in range(b):
        _, g = loss_and_grads(dpo, pref[i : i + 1], unpref[i : i + 1], prompt_mask[i : i + 1])
        for name, x in g.items():
            scale[name] = scale.get(name, 0.0) + x.double().norm().item() / b
    return scale


def assert_grads_close(a: dict, b: dict, tol: float, scale: dict[str, float], what: str = ""):
    """``||a - b|| <= tol * max(scale, ||b||)`` per parameter (see :func:`grad_scale`)."""
    assert a.keys() == b.keys(), (what, a.keys() ^ b.keys())
    for name in a:
        err = (a[name].double() - b[name].double()).norm().item()
        size = max(scale.get(name, 0.0), b[name].double().norm().item())
        assert err <= tol * size, (what, name, err, size, tol)


def dpo_tolerances(dpo: DPO, case: DPOCase, seqs: Tensor, loss: Tensor, shift=0.0):
    """(loss tolerance, gradient rel_err tolerance) for two runs whose token log-probs each
    err by at most ``row_bound`` (the logits' magnitude, the shift, log V).

    A score is the mean of its tokens (error <= one token's) or their sum (<= L of them);
    the loss moves by at most beta times four scores' errors (|d logsigmoid| <= 1), plus a
    float32 rounding of itself.  The gradients: softmax off by ``delta`` relative gives
    d logits off by that much, and 1e-5 is the float32 floor of the model body's backward on
    other GEMM shapes or row orders (test_dpo's parity tolerance).
    """
    with torch.no_grad():
        zabs = dpo.policy_model(*on(dpo, seqs)).abs().max().cpu()
    delta = row_bound(zabs, shift, case.v).item()
    count = seqs.shape[1] + 1 if case.reduction == "sum" else 1
    loss_tol = case.beta * 4 * delta * count + 4 * EPS32 * abs(loss.item())
    return loss_tol, 8 * delta * count + 1e-5


def check_dpo_shift_invariance(case: DPOCase, data, route: str):
    """Logits shifted by a constant per input token (+-1e4 included) give the same loss and
    gradients.  Shifted logits leave the fused route (the head is no longer a plain linear
    map), so the fused route is compared with the logits route of the shifted model."""
    head, impl, matmul = ROUTES[route]
    const = st.sampled_from([1e4, -1e4, 0.0]) | st.floats(-1e4, 1e4, allow_nan=False)
    table = torch.tensor(data.draw(st.lists(const, min_size=case.v, max_size=case.v)))

    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("table", table.clone())

        def forward(self, x):
            return self.inner(x) + self.table[x].unsqueeze(-1)

    base = make_dpo(case, route)
    shifted = make_dpo(case, "logits_triton" if impl == "triton" else "logits_torch",
                       model=Shifted(make_model(case.v, tie=case.tie, seed=case.seed % 1000)))
    args = (case.pref, case.unpref, case.prompt_mask)
    l0, g0 = loss_and_grads(base, *args)
    l1, g1 = loss_and_grads(shifted, *args)
    g1 = {n.removeprefix("inner."): g for n, g in g1.items()}
    loss_tol, grad_tol = dpo_tolerances(base, case, torch.cat(args[:2]), l0, table.abs().max())
    assert abs(l1 - l0) <= loss_tol, (l0, l1, loss_tol)
    assert_grads_close(g1, g0, grad_tol, grad_scale(case, *args), "shift")


def check_dpo_pair_permutation(case: DPOCase, data, route: str):
    b = case.pref.shape[0]
    # not the identity, where there is another order: the identity would test nothing
    perms = st.permutations(range(b)).filter(lambda p: b == 1 or p != list(range(b)))
    perm = torch.tensor(data.draw(perms), dtype=torch.long)
    dpo = make_dpo(case, route)
    l0, g0 = loss_and_grads(dpo, case.pref, case.unpref, case.prompt_mask)
    l1, g1 = loss_and_grads(dpo, case.pref[perm], case.unpref[perm], case.prompt_mask[perm])
    # the same B losses averaged in another order, the model body's rows permuted
    loss_tol, grad_tol = dpo_tolerances(dpo, case, torch.cat((case.pref, case.unpref)), l0)
    assert abs(l1 - l0) <= loss_tol, (l0, l1, loss_tol)
    scale = grad_scale(case, case.pref, case.unpref, case.prompt_mask)
    assert_grads_close(g1, g0, grad_tol, scale, "permutation")


def check_dpo_padding(case: DPOCase, data, route: str):
    """Extra pad positions change nothing.  With mask_alignment="input" the first pad after
    a sequence is scored (x-transformers' convention: the mask at input j scores target
    j + 1), so there the base batch already ends in one pad and more are added."""
    b, l = case.pref.shape
    _, impl, _ = ROUTES[route]
    room = (12 // (2 * b) + 1 - l) if impl == "triton" else 16 - l
    k = data.draw(st.integers(1, max(1, min(4, room))))
    pref, unpref, prompt_mask = case.pref, case.unpref, case.prompt_mask
    if case.alignment == "input":
        pad1 = torch.zeros(b, 1, dtype=pref.dtype)
        pref, unpref = torch.cat((pref, pad1), 1), torch.cat((unpref, pad1), 1)
        prompt_mask = torch.cat((prompt_mask, torch.zeros(b, 1, dtype=torch.bool)), 1)
    pad = torch.zeros(b, k, dtype=pref.dtype)
    longer = (
        torch.cat((pref, pad), 1), torch.cat((unpref, pad), 1),
        torch.cat((prompt_mask, torch.zeros(b, k, dtype=torch.bool)), 1),
    )
    dpo = make_dpo(case, route)
    l0, g0 = loss_and_grads(dpo, pref, unpref, prompt_mask)
    l1, g1 = loss_and_grads(dpo, *longer)
    # causal model, absolute positions: real positions see the same inputs; only the GEMM
    # shapes change (more rows), so float32 noise
    loss_tol, grad_tol = dpo_tolerances(dpo, case, torch.cat(longer[:2]), l0)
    assert abs(l1 - l0) <= loss_tol, (l0, l1, loss_tol)
    assert_grads_close(g1, g0, grad_tol, grad_scale(case, pref, unpref, prompt_mask), "padding")


def check_dpo_all_false_mask(case: DPOCase, data, route: str):
    """Every position prompt: every score is exactly 0 (mean: the count is clamped at 1e-5,
    0 / 1e-5 = 0; sum: an empty sum), so the loss is -log sigmoid(0) exactly and no
    gradient reaches the policy."""
    dpo = make_dpo(case, route)
    everything = torch.ones_like(case.prompt_mask)
    ref_w, ref_l = reference_scores(dpo, case.pref, case.unpref, everything)
    assert torch.equal(ref_w, torch.zeros_like(ref_w)) and torch.equal(ref_l, torch.zeros_like(ref_l))
    loss, grads = loss_and_grads(dpo, case.pref, case.unpref, everything)
    # log 2, up to the rounding of a float32 mean of B equal values
    torch.testing.assert_close(loss, -F.logsigmoid(torch.zeros(())), rtol=2 * EPS32, atol=0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
    # one pair with no scored token among others: its scores are exactly 0 too
    b, l = case.pref.shape
    mixed = case.prompt_mask.clone()
    mixed[data.draw(st.integers(0, b - 1))] = True
    ref_w, ref_l = reference_scores(dpo, case.pref, case.unpref, mixed)
    empty = mixed.all(-1)
    assert (ref_w[empty] == 0).all() and (ref_l[empty] == 0).all()


def check_dpo_probabilities(case: DPOCase, data, route: str):
    """Reference scores are <= 0; the scores of (x, y) over every token y sum to one."""
    dpo = make_dpo(case, route)
    ref_w, ref_l = reference_scores(dpo, case.pref, case.unpref, case.prompt_mask)
    assert (ref_w <= 0).all() and (ref_l <= 0).all(), (ref_w, ref_l)
    # L = 2, nothing prompt: with either alignment exactly one token, seq[:, 1], is scored.
    _, impl, _ = ROUTES[route]
    v = min(case.v, 6) if impl == "triton" else case.v  # 2V rows of logits
    first = data.draw(st.integers(1, v - 1)) if v > 1 else 0
    seqs = torch.stack((torch.full((v,), first), torch.arange(v)), 1)
    dpo.pad_id = None  # token 0 is a real token here
    # The rejected side holds the same sequences one row later (a roll by one, not an
    # involution): a swap of the two sides, or one side scored twice, breaks the equality.
    every, rolled = reference_scores(dpo, seqs, seqs.roll(1, 0), torch.zeros(v, 2, dtype=torch.bool))
    assert torch.equal(rolled, every.roll(1, 0)), (every, rolled)
    assert (every <= 0).all(), every
    if v == case.v:
        with torch.no_grad():
            zabs = dpo.ref_model(*on(dpo, seqs[:1, :1])).abs().max().cpu()
        total = every.double().exp().sum().item()
        assert abs(total - 1) <= 2 * row_bound(zabs, 0.0, v).item(), total


def check_dpo_against_float64(case: DPOCase, data, route: str):
    """x-transformers' DPO (float32) is the reference, the same in float64 the truth
    (x-transformers' conventions: mean of log-probs, input alignment)."""
    head, impl, matmul = ROUTES[route]
    dtype = data.draw(st.sampled_from(LINEAR_TRITON_DTYPES if route == "fused_triton_gemm" else DTYPES))
    tied = ("token_emb.emb.weight",) if case.tie else ()

    def model():
        return make_model(case.v, tie=case.tie, seed=case.seed % 1000, dtype=dtype)

    x = XDPO(model(), beta=case.beta, pad_id=0)
    # x-transformers' tied reference reads the policy's embedding: leave that one equal
    perturb_(x.policy_model, case.seed, skip=tied)
    ours = DPO(model(), beta=case.beta, pad_id=0, head=head, impl=impl, matmul=matmul)
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    ours.to(device(impl))
    args = (case.pref, case.unpref, case.prompt_mask)
    lo, go = loss_and_grads(ours, *args)
    lx, gx = loss_and_grads(x, *args)
    truth = deepcopy_module(x).double()
    lt, gt = loss_and_grads(truth, *args)
    slack = TOL[dtype]
    assert abs(lo.double() - lt) <= abs(lx.double() - lt) + slack * max(1.0, abs(lt.item())), (lo, lx, lt)
    assert go.keys() == gt.keys()
    scale = grad_scale(case, *args)
    for name in gt:
        err_ours = (go[name].double() - gt[name]).norm().item()
        err_ref = (gx[name].double() - gt[name]).norm().item()
        size = max(scale[name], gt[name].norm().item())
        assert err_ours <= err_ref + slack * size, (name, err_ours, err_ref, size)


# One test per (property, route); the interpreted Triton routes get fewer examples.


@scaled(0.8)
@given(case=dpo_cases("fused"), data=st.data())
def test_dpo_shift_invariance_fused(case, data):
    check_dpo_shift_invariance(case, data, "fused")


@scaled(0.8)
@given(case=dpo_cases("logits_torch"), data=st.data())
def test_dpo_shift_invariance_logits_torch(case, data):
    check_dpo_shift_invariance(case, data, "logits_torch")


@scaled(0.3)
@given(case=dpo_cases("fused_triton"), data=st.data())
def test_dpo_shift_invariance_fused_triton(case, data):
    check_dpo_shift_invariance(case, data, "fused_triton")


@scaled(0.3)
@given(case=dpo_cases("logits_triton"), data=st.data())
def test_dpo_shift_invariance_logits_triton(case, data):
    check_dpo_shift_invariance(case, data, "logits_triton")


@scaled(0.8)
@given(case=dpo_cases("fused"), data=st.data())
def test_dpo_pair_permutation_fused(case, data):
    check_dpo_pair_permutation(case, data, "fused")


@scaled(0.8)
@given(case=dpo_cases("logits_torch"), data=st.data())
def test_dpo_pair_permutation_logits_torch(case, data):
    check_dpo_pair_permutation(case, data, "logits_torch")


@scaled(0.3)
@given(case=dpo_cases("fused_triton"), data=st.data())
def test_dpo_pair_permutation_fused_triton(case, data):
    check_dpo_pair_permutation(case, data, "fused_triton")


@scaled(0.3)
@given(case=dpo_cases("logits_triton"), data=st.data())
def test_dpo_pair_permutation_logits_triton(case, data):
    check_dpo_pair_permutation(case, data, "logits_triton")


@scaled(0.8)
@given(case=dpo_cases("fused"), data=st.data())
def test_dpo_padding_fused(case, data):
    check_dpo_padding(case, data, "fused")


@scaled(0.8)
@given(case=dpo_cases("logits_torch"), data=st.data())
def test_dpo_padding_logits_torch(case, data):
    check_dpo_padding(case, data, "logits_torch")


@scaled(0.3)
@given(case=dpo_cases("fused_triton", max_rows=8), data=st.data())
def test_dpo_padding_fused_triton(case, data):
    check_dpo_padding(case, data, "fused_triton")


@scaled(0.3)
@given(case=dpo_cases("logits_triton", max_rows=8), data=st.data())
def test_dpo_padding_logits_triton(case, data):
    check_dpo_padding(case, data, "logits_triton")


@scaled(0.8)
@given(case=dpo_cases("fused"), data=st.data())
def test_dpo_all_false_mask_fused(case, data):
    check_dpo_all_false_mask(case, data, "fused")


@scaled(0.8)
@given(case=dpo_cases("logits_torch"), data=st.data())
def test_dpo_all_false_mask_logits_torch(case, data):
    check_dpo_all_false_mask(case, data, "logits_torch")


@scaled(0.3)
@given(case=dpo_cases("fused_triton"), data=st.data())
def test_dpo_all_false_mask_fused_triton(case, data):
    check_dpo_all_false_mask(case, data, "fused_triton")


@scaled(0.3)
@given(case=dpo_cases("logits_triton"), data=st.data())
def test_dpo_all_false_mask_logits_triton(case, data):
    check_dpo_all_false_mask(case, data, "logits_triton")


@scaled(0.8)
@given(case=dpo_cases("fused"), data=st.data())
def test_dpo_probabilities_fused(case, data):
    check_dpo_probabilities(case, data, "fused")


@scaled(0.8)
@given(case=dpo_cases("logits_torch"), data=st.data())
def test_dpo_probabilities_logits_torch(case, data):
    check_dpo_probabilities(case, data, "logits_torch")


@scaled(0.3)
@given(case=dpo_cases("fused_triton", max_v=6), data=st.data())
def test_dpo_probabilities_fused_triton(case, data):
    check_dpo_probabilities(case, data, "fused_triton")


@scaled(0.3)
@given(case=dpo_cases("logits_triton", max_rows=6, max_v=6), data=st.data())
def test_dpo_probabilities_logits_triton(case, data):
    check_dpo_probabilities(case, data, "logits_triton")


@scaled(0.8)
@given(case=dpo_cases("fused"), data=st.data())
def test_dpo_against_float64_fused(case, data):
    check_dpo_against_float64(case, data, "fused")


@scaled(0.8)
@given(case=dpo_cases("logits_torch"), data=st.data())
def test_dpo_against_float64_logits_torch(case, data):
    check_dpo_against_float64(case, data, "logits_torch")


@scaled(0.3)
@given(case=dpo_cases("fused_triton"), data=st.data())
def test_dpo_against_float64_fused_triton(case, data):
    check_dpo_against_float64(case, data, "fused_triton")


@scaled(0.3)
@given(case=dpo_cases("logits_triton"), data=st.data())
def test_dpo_against_float64_logits_triton(case, data):
    check_dpo_against_float64(case, data, "logits_triton")


# The fused head on the Triton GEMM kernels: every property, at the sizes of the other
# interpreted routes.


@scaled(0.3)
@given(case=dpo_cases("fused_triton_gemm"), data=st.data())
def test_dpo_shift_invariance_fused_triton_gemm(case, data):
    check_dpo_shift_invariance(case, data, "fused_triton_gemm")


@scaled(0.3)
@given(case=dpo_cases("fused_triton_gemm"), data=st.data())
def test_dpo_pair_permutation_fused_triton_gemm(case, data):
    check_dpo_pair_permutation(case, data, "fused_triton_gemm")


@scaled(0.3)
@given(case=dpo_cases("fused_triton_gemm", max_rows=8), data=st.data())
def test_dpo_padding_fused_triton_gemm(case, data):
    check_dpo_padding(case, data, "fused_triton_gemm")


@scaled(0.3)
@given(case=dpo_cases("fused_triton_gemm"), data=st.data())
def test_dpo_all_false_mask_fused_triton_gemm(case, data):
    check_dpo_all_false_mask(case, data, "fused_triton_gemm")


@scaled(0.3)
@given(case=dpo_cases("fused_triton_gemm", max_v=6), data=st.data())
def test_dpo_probabilities_fused_triton_gemm(case, data):
    check_dpo_probabilities(case, data, "fused_triton_gemm")


@scaled(0.3)
@given(case=dpo_cases("fused_triton_gemm"), data=st.data())
def test_dpo_against_float64_fused_triton_gemm(case, data):
    check_dpo_against_float64(case, data, "fused_triton_gemm")
