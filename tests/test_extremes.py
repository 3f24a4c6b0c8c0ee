"""Extreme and non-finite logits: sequence_logprobs does what float64 log_softmax does.

The truth is float64 ``log_softmax`` + gather (and its autograd), rounded to float32: a true
value beyond float32's range is -inf there too.  Where fastdpo deviates on purpose (its
arithmetic is float32, so a row's log-prob carries an absolute error ~eps32 * max|z|), the
tolerance says so.  Non-finite outcomes (NaN, -inf) must match exactly, position by position.

Documented behaviour (README, ``sequence_logprobs`` docstring): NaN or +inf logits in a
counted row give a NaN score; a counted target whose logit is -inf scores -inf; masked rows
never affect the result and get an exactly zero gradient.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastdpo.kernels.sequence_logprobs as kernels
from fastdpo import linear_sequence_logprobs, sequence_logprobs
from fastdpo.scoring.backends import torch_fold as torch_impl

from helpers import IMPLS, reference_logprobs, rel_err, three_way

# The interpreter evaluates the kernels with numpy, which warns about the very overflows and
# invalid operations these tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps
INF, NAN = float("inf"), float("nan")
# The Triton path runs on CUDA tensors when there is a GPU, else interpreted on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: OpenMP hand-offs between 2 threads on a shared machine cost far more
    than the work.  Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ours(impl, logits, targets, mask, upstream):
    """(scores, d logits) of sequence_logprobs, on the CPU."""
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    z = logits.detach().to(device).requires_grad_()
    s = sequence_logprobs(z, targets.to(device), mask.to(device), impl=impl)
    s.backward(upstream.to(device))
    return s.detach().cpu(), z.grad.cpu()


def truth(logits, targets, mask, upstream):
    """float64 scores and d logits (float64 log_softmax + gather, autograd).

    Masked rows are zeroed first (by a ``where``, whose gradient there is exactly 0): they do
    not take part in the math, and log_softmax's backward of a NaN row would give NaN * 0.
    """
    z = logits.detach().double().requires_grad_()
    s = reference_logprobs(torch.where(mask.unsqueeze(-1), z, 0.0), targets, mask)
    s.backward(upstream.double())
    return s.detach(), z.grad


def assert_like(actual, expected, atol):
    """Same NaN and same signed infinities, position by position; finite values within
    ``atol`` (a tensor broadcastable to them, or a number) of the float64 truth rounded to
    float32."""
    expected = expected.float().double()  # what a float32 result can be: overflow -> inf
    actual = actual.double()
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    assert torch.equal(actual == INF, expected == INF), (actual, expected)
    assert torch.equal(actual == -INF, expected == -INF), (actual, expected)
    finite = expected.isfinite()
    err = (actual - expected).abs()
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(err)
    assert (err[finite] <= atol[finite]).all(), (actual, expected, atol)


def score_atol(logits, mask):
    """Per-sequence bound on the float32 error of a score: each counted row errs by a few
    eps32 times its largest finite |logit| (and log V) -- fastdpo's float32 arithmetic."""
    z = logits.double()
    zabs = torch.where(z.isfinite(), z.abs(), 0).amax(-1)
    rows = 8 * EPS32 * (zabs + math.log(logits.shape[-1]) + 1)
    return torch.where(mask, rows, 0).sum(-1)


def grad_atol(logits, upstream, dtype):
    """d logits = g (onehot - softmax): off by the softmax's float32 error, relative
    eps32 * max|z| (exp of z - lse), plus one rounding to the logits dtype."""
    z = logits.double()
    zabs = torch.where(z.isfinite(), z.abs(), 0).max().item()
    return upstream.abs().max().item() * (
        8 * EPS32 * (zabs + math.log(logits.shape[-1]) + 1) + 2 * torch.finfo(dtype).eps
    )


def check(impl, logits, targets, mask, upstream=None, *, grads=True):
    n = logits.shape[0]
    if upstream is None:
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(n))
    s, g = ours(impl, logits, targets, mask, upstream)
    st, gt = truth(logits, targets, mask, upstream)
    assert s.dtype == torch.float32 and g.dtype == logits.dtype
    assert_like(s, st, score_atol(logits, mask))
    if grads:
        assert_like(g, gt, grad_atol(logits, upstream, logits.dtype))
    assert (g[~mask] == 0).all() and not g[~mask].isnan().any()
    return s, g


def random_inputs(n, t, v, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.25
    return logits, targets, mask, gen


# ----------------------------------------------------------------------------- -inf


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_vocabulary_masking(impl, dtype):
    """-inf entries (a masked vocabulary): exact zeros in softmax and in the gradient."""
    logits, targets, mask, gen = random_inputs(3, 4, 50, dtype, seed=1)
    banned = torch.rand(3, 4, 50, generator=gen) < 0.4
    banned.scatter_(-1, targets.unsqueeze(-1), False)  # the targets stay allowed
    logits[banned] = -INF
    logits[0, 1] = -INF  # a masked row of nothing but -inf
    mask[0, 1] = False
    s, g = check(impl, logits, targets, mask)
    assert s.isfinite().all()
    assert (g[banned] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [64, 70], ids=["even_v", "tail_block"])
def test_whole_vocabulary_blocks_at_minus_inf(impl, v, monkeypatch):
    """The kernel's online logsumexp over blocks of 16 (the shipped block would hold the whole
    row): all -inf leading blocks (running max -inf), a middle block, the last (partial)
    block, every entry but one; one sequence per case so results do not mix."""
    block = 16
    for name in ("sequence_logprobs_forward", "sequence_logprobs_backward"):
        monkeypatch.setattr(kernels, name, functools.partial(getattr(kernels, name), _block_v=block))
    # the torch path, for comparison, walks boxes of 3 rows
    monkeypatch.setattr(torch_impl, "BOX_BYTES", 4 * v * 3)
    assert kernels._default_config(v, torch.float32)[0] > v - 1  # the override matters

    logits, targets, mask, gen = random_inputs(7, 1, v, torch.float32, seed=v)
    mask[:] = True
    logits[0, 0, : 2 * block] = -INF  # two leading blocks
    targets[0, 0] = 2 * block + 3
    logits[1, 0, block : 2 * block] = -INF  # a middle block, after a finite one
    targets[1, 0] = 5
    logits[2, 0, (v - 1) // block * block :] = -INF  # the last block, partial when v = 70
    targets[2, 0] = 1
    logits[3, 0, :] = -INF  # all but the target: log-prob exactly 0
    logits[3, 0, v - 2] = 1.5
    targets[3, 0] = v - 2
    logits[4, 0, :] = -INF  # all but one entry, and the target is -inf: -inf
    logits[4, 0, 3] = 0.0
    targets[4, 0] = block + 1
    logits[5, 0, :] = -INF  # nothing finite: NaN, as float64 (-inf - -inf)
    logits[6, 0, : v - 1] = -INF  # only the very last entry finite, in the last block
    targets[6, 0] = v - 1
    s, _ = check(impl, logits, targets, mask)
    assert s[3].item() == 0.0 and s[6].item() == 0.0
    assert s[4].item() == -INF
    assert s[5].isnan()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_counted_target_at_minus_inf_scores_minus_inf(impl, dtype):
    logits, targets, mask, _ = random_inputs(2, 3, 40, dtype, seed=3)
    mask[:] = True
    logits[0, 2, targets[0, 2]] = -INF
    s, g = check(impl, logits, targets, mask)
    assert s[0].item() == -INF and s[1].isfinite()
    # d(z_y - lse)/dz = onehot - softmax: finite, +g at the target (its softmax is 0)
    assert g.isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_target_at_minus_inf_has_no_effect(impl, dtype):
    logits, targets, mask, _ = random_inputs(2, 4, 40, dtype, seed=4)
    mask[:] = True
    mask[0, 1] = False
    clean = logits.clone()
    logits[0, 1, targets[0, 1]] = -INF
    up = torch.randn(2, generator=torch.Generator().manual_seed(4))
    s, g = check(impl, logits, targets, mask, up)
    s_clean, g_clean = ours(impl, clean, targets, mask, up)
    assert torch.equal(s, s_clean) and torch.equal(g, g_clean)


# ----------------------------------------------------------------------------- +inf, NaN

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["off_target", "at_target"])
def test_plus_inf_gives_nan(impl, dtype, where):
    """A +inf logit in a counted row gives a NaN score and a NaN gradient row, as float64
    log_softmax does.  Guards the row max and log-sum kept apart (inf - inf = NaN; ATen's fused
    log_softmax and softmax keep them apart too): torch.logsumexp returns +inf for a row holding
    +inf (it zeroes an infinite max before shifting), which would score z_y - lse = -inf, not
    NaN, and leave the gradient row finite but at the +inf entry."""
    logits, targets, mask, _ = random_inputs(2, 3, 30, dtype, seed=5)
    mask[:] = True
    col = int(targets[0, 1]) if where == "at_target" else (int(targets[0, 1]) + 7) % 30
    logits[0, 1, col] = INF
    s, g = check(impl, logits, targets, mask)
    assert s[0].isnan() and s[1].isfinite()
    assert g[0, 1].isnan().all()  # as float64 autograd: the whole row
    assert g[0, [0, 2]].isfinite().all() and g[1].isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_target_gives_nan(impl, dtype):
    logits, targets, mask, _ = random_inputs(2, 3, 30, dtype, seed=6)
    mask[:] = True
    logits[1, 0, targets[1, 0]] = NAN
    s, g = check(impl, logits, targets, mask)
    assert s[1].isnan() and s[0].isfinite()
    assert g[1, 0].isnan().all() and g[1, 1:].isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_off_target_gives_nan(impl, dtype):
    logits, targets, mask, _ = random_inputs(2, 3, 30, dtype, seed=7)
    mask[:] = True
    logits[0, 2, (int(targets[0, 2]) + 1) % 30] = NAN
    s, g = check(impl, logits, targets, mask)
    assert s[0].isnan() and s[1].isfinite()
    assert g[0, 2].isnan().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_masked_rows_are_ignored(impl, dtype):
    logits, targets, mask, gen = random_inputs(3, 4, 30, dtype, seed=8)
    mask[:] = True
    mask[0, 0] = mask[1, 3] = mask[2, 1] = False
    clean = logits.clone()
    logits[0, 0] = NAN
    logits[1, 3] = INF
    logits[2, 1, ::2] = -INF
    logits[2, 1, 1::2] = INF
    targets[0, 0], targets[1, 3], targets[2, 1] = -100, 2**40, -1  # never read
    up = torch.randn(3, generator=gen)
    s, g = check(impl, logits, targets, mask, up)
    s_clean, g_clean = ours(impl, clean, torch.where(mask, targets, 0), mask, up)
    assert torch.equal(s, s_clean) and torch.equal(g, g_clean)
    assert s.isfinite().all() and g.isfinite().all()


# ----------------------------------------------------------------------------- 16-bit extremes


def extreme_rows(dtype):
    """Rows of V = 6 built from the dtype's extremes: max, -max, the smallest subnormal, the
    smallest normal, zero; with the target at each kind of entry."""
    fi = torch.finfo(dtype)
    big, tiny, sub = fi.max, fi.tiny, fi.smallest_normal * fi.eps  # smallest subnormal
    rows = [
        ([big, 0.0, -big, 1.0, -1.0, sub], 0),  # target the max: log-prob ~ 0
        ([big, 0.0, -big, 1.0, -1.0, sub], 2),  # target -max: true value -2 max, beyond float32 for bf16
        ([big, big, big, big, big, big], 3),  # all max: -log 6 (float32: lse absorbs log 6 for bf16)
        ([-big, -big, -big, -big, -big, -big], 1),  # all -max: -log 6
        ([sub, -sub, tiny, -tiny, 0.0, sub], 4),  # subnormals: uniform, -log 6
        ([sub, 0.0, 0.0, 0.0, 0.0, 0.0], 0),
        ([65504.0, 65504.0, 0.0, -65504.0, 1.0, 2.0], 1),  # fp16's max, in every dtype
    ]
    logits = torch.tensor([r for r, _ in rows], dtype=torch.float32).to(dtype).unsqueeze(1)
    targets = torch.tensor([[y] for _, y in rows])
    return logits, targets


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_extremes(impl, dtype):
    logits, targets = extreme_rows(dtype)
    assert logits.isfinite().all()
    mask = torch.ones(targets.shape, dtype=torch.bool)
    s, g = check(impl, logits, targets, mask)
    assert (s <= 0).all() and not s.isnan().any()
    if dtype == torch.float16:
        assert s[1].item() == -131008.0
    else:  # -2 max overflows float32: -inf, as the float64 truth rounded to float32
        assert s[1].item() == -INF
    assert abs(s[4].item() + math.log(6)) <= 4 * EPS32 * math.log(6)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_max_in_a_sequence(impl):
    """65504 logits among ordinary ones, several rows of one sequence, the gradient in fp16."""
    logits, targets, mask, _ = random_inputs(2, 5, 20, torch.float16, seed=9)
    mask[:] = True
    logits[0, :, 3] = 65504.0
    logits[1, 2, :] = -65504.0
    logits[1, 2, targets[1, 2]] = 65504.0
    check(impl, logits, targets, mask)


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("impl", IMPLS)
def test_large_logit_gradient_precision(impl):
    """float32 logits of magnitude ~100: d logits within the three-way rule.

    Guards backward's softmax as exp((z - m) - log_s), from the row max m and
    log(sum exp(z - m)) saved apart: exp(z - lse) from one float32 lse would scale every
    probability by lse's rounding (ulp(|lse|)/2), 5.1e-6 from float64 here, where float32
    log_softmax is 5.4e-8 off (slack 2.9e-6)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 40, generator=gen) * 30  # max |z| ~ 100
    targets = torch.randint(0, 40, (4, 3), generator=gen)
    mask = torch.ones(4, 3, dtype=torch.bool)
    up = torch.randn(4, generator=gen)
    _, g = ours(impl, logits, targets, mask, up)
    _, gt = truth(logits, targets, mask, up)
    ref = logits.clone().requires_grad_()
    reference_logprobs(ref, targets, mask).backward(up)
    three_way(g, ref.grad, gt, torch.float32, "grad")


# ----------------------------------------------------------------------------- linear head


def linear_case():
    """One sequence of 3 rows over V = 5, D = 2; h = 1, so each logit is a row sum of W."""
    gen = torch.Generator().manual_seed(10)
    hidden = torch.ones(1, 3, 2)
    weight = torch.randn(5, 2, generator=gen)
    targets = torch.tensor([[1, 2, 0]])
    return hidden, weight, targets


def linear_ours_and_truth(hidden, weight, targets, mask, impl="torch"):
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    h = hidden.clone().to(dev).requires_grad_()
    s = linear_sequence_logprobs(h, weight.to(dev), targets.to(dev), mask.to(dev), impl=impl)
    s.backward(torch.ones(1, device=dev))
    s, h_grad = s.detach().cpu(), h.grad.cpu()
    # The op's contract: sequence_logprobs of the product rounded in the inputs' dtype.  The
    # truth is float64 log_softmax of those float32 logits (an overflow to +inf included).
    z = (hidden @ weight.T).double().requires_grad_()
    st = reference_logprobs(torch.where(mask.unsqueeze(-1), z, 0.0), targets, mask)
    st.backward(torch.ones(1, dtype=torch.float64))
    return (s, h_grad), (st.detach(), z.grad @ weight.double())


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_overflowing_logit_gives_nan(impl):
    """A product that overflows to +inf scores NaN, not -inf (which torch.logsumexp would give:
    see test_plus_inf_gives_nan)."""
    hidden, weight, targets = linear_case()
    weight[3] = 3e38  # h @ W.T overflows to +inf at vocabulary entry 3, in every row
    mask = torch.tensor([[True, False, False]])
    (s, g), (st, gt) = linear_ours_and_truth(hidden, weight, targets, mask, impl)
    assert st.isnan().all()
    assert s.isnan().all(), s
    assert g[0, 0].isnan().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_minus_inf_logit(impl):
    hidden, weight, targets = linear_case()
    weight[4] = -3e38  # a -inf logit (a banned token) in every row
    mask = torch.tensor([[True, True, False]])
    (s, g), (st, gt) = linear_ours_and_truth(hidden, weight, targets, mask, impl)
    assert s.isfinite().all()
    assert_like(s, st, 8 * EPS32 * 10 * 2)
    assert (g[0, 2] == 0).all()
    assert_like(g[0, :2], gt[0, :2], 1e-6)




@pytest.mark.parametrize(
    "impl", ["torch", "triton"]
)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_linear_non_finite_masked_row_is_ignored(impl, value):
    hidden, weight, targets = linear_case()
    mask = torch.tensor([[True, True, False]])
    (s0, g0), _ = linear_ours_and_truth(hidden, weight, targets, mask, impl)
    hidden[0, 2] = value  # a masked row
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    h = hidden.clone().to(dev).requires_grad_()
    w = weight.clone().to(dev).requires_grad_()
    s = linear_sequence_logprobs(h, w, targets.to(dev), mask.to(dev), impl=impl)
    s.backward(torch.ones(1, device=dev))
    assert torch.equal(s.detach().cpu(), s0)
    assert (h.grad[0, 2] == 0).all() and h.grad.isfinite().all(), h.grad
    assert w.grad.isfinite().all(), w.grad
    torch.testing.assert_close(h.grad.cpu(), g0, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_nan_in_counted_row_gives_nan(impl):
    hidden, weight, targets = linear_case()
    hidden[0, 1, 0] = NAN
    mask = torch.ones(1, 3, dtype=torch.bool)
    (s, g), (st, gt) = linear_ours_and_truth(hidden, weight, targets, mask, impl)
    assert s.isnan().all() and st.isnan().all()
    # the gradient: NaN exactly where float64's is (the NaN row), finite elsewhere
    assert gt[0, 1].isnan().all() and gt[0, [0, 2]].isfinite().all()
    assert torch.equal(g.isnan(), gt.isnan()), g


# ----------------------------------------------------------------------------- the DPO head op


def _head(fold, hidden, weight, targets, mask, upstream_pairs=None):
    """(loss, policy sums, d hidden, d weight) of dpo_head with every group's logits kept (the
    torch fold turns them into probabilities in place)."""
    from fastdpo import check_loss_config
    from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head

    opts = HeadOptions(impl=fold, scale=None, ref_scale=None, reduction="sum", loss=check_loss_config("sigmoid", 0.5),
                       group_bytes=1 << 30)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    count = mask.sum(-1).clamp(min=1e-5).float()
    loss, sums, _, _ = dpo_head(h, w, targets, mask, count, opts, ref_scores=torch.zeros(hidden.shape[0]))
    loss.backward()
    return loss.detach(), sums, h.grad, w.grad


def _head_truth(hidden, weight, targets, mask):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = h @ w.T
    lp = z.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sums = torch.where(mask, lp, 0.0).sum(-1)
    b = sums.shape[0] // 2
    loss = -F.logsigmoid(0.5 * (sums[:b] - sums[b:])).mean()
    loss.backward()
    return loss.detach(), sums.detach(), h.grad, w.grad


@pytest.mark.parametrize("fold", ["torch", "triton"])
def test_dpo_head_large_logit_precision(fold):
    """Logits of magnitude ~100 through the pair fusion: scores and gradients near float64.
    The torch fold's kept logits become probabilities in place and its log-sum is read off
    the softmax (exp(0)/s at the row max): no logsumexp rounded into one float32."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 5, 8, generator=gen) * 6
    weight = torch.randn(37, 8, generator=gen) * 6 / 8**0.5  # |z| up to ~100
    targets = torch.randint(0, 37, (4, 5), generator=gen)
    mask = torch.rand(4, 5, generator=gen) > 0.2
    loss, sums, gh, gw = _head(fold, hidden, weight, targets, mask)
    lt, st, ght, gwt = _head_truth(hidden, weight, targets, mask)
    assert (hidden @ weight.T).abs().max() > 60
    torch.testing.assert_close(sums.double(), st, rtol=2e-6, atol=2e-5)
    assert abs(loss.item() - lt.item()) <= 1e-5 * max(1.0, abs(lt.item()))
    assert rel_err(gh, ght) <= 1e-5 and rel_err(gw, gwt) <= 1e-5


@pytest.mark.parametrize("fold", ["torch", "triton"])
def test_dpo_head_non_finite_logits(fold):
    """An overflowing logit in a scored row: that sequence's score is NaN (never a finite wrong
    number); a -inf target logit scores -inf; masked rows holding them change nothing."""
    hidden = torch.ones(2, 3, 2)
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0], [-3.0, 0.5], [0.0, 0.0]])
    targets = torch.tensor([[1, 2, 0], [0, 1, 3]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    big = weight.clone()
    big[2] = float("inf")  # logit +inf in every row
    _, sums, _, _ = _head(fold, hidden, big, targets, mask)
    assert sums.isnan().all()
    neg = weight.clone()
    neg[3] = float("-inf")  # row 1, position 2's target (id 3) has logit -inf
    sums = _sums_only(fold, hidden, neg, targets, mask)
    assert sums[1] == float("-inf") and sums[0].isfinite()
    masked = mask.clone()
    masked[1, 2] = False  # the -inf target no longer counts
    sums = _sums_only(fold, hidden, neg, targets, masked)
    assert sums.isfinite().all()


def _sums_only(fold, hidden, weight, targets, mask):
    from fastdpo import check_loss_config
    from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head

    opts = HeadOptions(impl=fold, scale=None, ref_scale=None, reduction="sum", loss=check_loss_config("sigmoid", 0.5))
    count = mask.sum(-1).clamp(min=1e-5).float()
    h = hidden.clone().requires_grad_()  # the gradient path: pass 1 keeps (torch: probabilities)
    _, sums, _, _ = dpo_head(h, weight, targets, mask, count, opts, ref_scores=torch.zeros(hidden.shape[0]))
    return sums
