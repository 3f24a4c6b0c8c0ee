"""sequence_logprobs against float64 log_softmax + gather, values and gradients."""

from __future__ import annotations

import os

import pytest
import torch

from fastdpo import sequence_logprobs
from fastdpo.scoring.backends import torch_fold as torch_impl

from helpers import IMPLS, TOL, float32_level, reference_logprobs, rel_err, three_way

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(n, t, v, dtype, seed, *, p_mask=0.3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > p_mask
    return logits, targets, mask


def check_against_float64(logits, targets, mask, fn, seed=0):
    """Values and gradients of ``fn`` vs float64 truth and torch in the input dtype."""
    dtype = logits.dtype
    n = logits.shape[0]
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))

    truth_in = logits.detach().double().requires_grad_()
    truth = reference_logprobs(truth_in, targets, mask)
    truth.backward(upstream.double())

    ref_in = logits.detach().clone().requires_grad_()
    ref = reference_logprobs(ref_in, targets, mask)
    ref.float().backward(upstream)

    ours_in = logits.detach().clone().requires_grad_()
    ours = fn(ours_in, targets, mask)
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    ours.backward(upstream)
    assert ours_in.grad.dtype == dtype
    three_way(ours, ref, truth, dtype, "scores")
    three_way(ours_in.grad, ref_in.grad, truth_in.grad, dtype, "grad")
    # float32 arithmetic on the upcast inputs: scores to float32 precision, each gradient
    # element within its rounding to the input dtype (Triton's interpreter truncates to bf16:
    # a whole ulp there)
    float32_level(ours, truth, torch.float32, "scores")
    ulps = 2.0 if dtype == torch.bfloat16 and INTERPRET else 1.0
    float32_level(ours_in.grad, truth_in.grad, dtype, "grad", ulps=ulps)
    # masked rows get exactly zero gradient
    assert (ours_in.grad[~mask] == 0).all()
    return ours


def op(impl, **kw):
    return lambda z, y, m: sequence_logprobs(z, y, m, impl=impl, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(2, 7, 1000), (3, 1, 257), (1, 5, 2), (4, 3, 5003), (2, 9, 33)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_values_and_grads(shape, dtype, impl):
    logits, targets, mask = make_inputs(*shape, dtype, seed=sum(shape))
    check_against_float64(logits, targets, mask, op(impl))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("box_rows", [1, 3, 5, 20])
@pytest.mark.parametrize("layout", ["random", "prompt"])
def test_box_boundaries(dtype, box_rows, layout, monkeypatch):
    """Boxes of whole sequences, runs of positions, skipped (all-masked), mixed and partial
    last boxes all agree with float64."""
    v = 1001
    monkeypatch.setattr(torch_impl, "BOX_BYTES", 4 * v * box_rows)
    logits, targets, mask = make_inputs(3, 7, v, dtype, seed=box_rows)
    if layout == "prompt":  # contiguous masked runs, as prompts and padding are
        mask = (torch.arange(7)[None] >= torch.tensor([[2], [5], [7]])) & (torch.arange(7)[None] < 6)
    check_against_float64(logits, targets, mask, op("torch"))


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_and_ignored_targets(impl):
    logits, targets, mask = make_inputs(3, 6, 300, torch.float32, seed=5)
    mask[1] = False
    targets[~mask] = -100  # never read at masked positions
    out = check_against_float64(logits, targets, mask, op(impl))
    assert out[1].item() == 0.0
    # nor are masked logits: NaN there changes nothing, and their gradient stays exactly 0
    poisoned = logits.clone()
    poisoned[1, 2] = float("nan")
    poisoned[~mask] = float("inf")
    poisoned.requires_grad_()
    again = sequence_logprobs(poisoned, targets, mask, impl=impl)
    assert torch.equal(again, out.detach())
    again.backward(torch.randn(3))
    assert (poisoned.grad[~mask] == 0).all() and poisoned.grad[mask].isfinite().all()


def test_mask_none_counts_everything():
    logits, targets, _ = make_inputs(2, 4, 50, torch.float32, seed=9)
    full = torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(
        sequence_logprobs(logits, targets), sequence_logprobs(logits, targets, full), rtol=0, atol=0
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, impl):
    base, targets, mask = make_inputs(6, 4, 700, dtype, seed=11)
    logits = base.transpose(0, 1)[:, :, 100:613]  # (4, 6, 513): strided N/T, sliced V
    targets = targets.T % 513  # (4, 6) as a transposed view
    targets = targets.contiguous().T.contiguous().T  # non-contiguous too
    mask = mask.T
    assert not logits.is_contiguous() and not targets.is_contiguous()
    check_against_float64(logits, targets, mask, op(impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches_out_of_place(dtype, impl):
    logits, targets, mask = make_inputs(2, 5, 400, dtype, seed=3)
    upstream = torch.randn(2)
    a = logits.clone().requires_grad_()
    sequence_logprobs(a, targets, mask, impl=impl).backward(upstream)

    # in-place: the gradient lands in the (non-leaf) logits buffer itself
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0
    out = sequence_logprobs(z, targets, mask, impl=impl, inplace_backward=True)
    out.backward(upstream)
    torch.testing.assert_close(leaf.grad, a.grad, rtol=0, atol=0)
    torch.testing.assert_close(z.detach(), a.grad, rtol=0, atol=0)


@pytest.mark.parametrize("fold", ["aten", "native"])
def test_no_vocab_sized_softmax_is_built(fold, monkeypatch):
    """The op runs (log_)softmax on boxes of rows only and never allocates more than one
    (N, T, V) buffer: temporaries are box-sized (here 3 rows of the 16).  With the C++ fold
    (fastdpo.scoring.backends.native) there is no softmax op at all: the boxes go to it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdpo.scoring.backends import native

    if fold == "native" and not native.available():
        pytest.skip("no C++ compiler for the native fold")
    monkeypatch.setattr(native, "ENABLED", fold == "native")
    boxes = []
    for name in ("score", "softmax", "grad"):
        monkeypatch.setattr(native, name, lambda *a, _f=getattr(native, name): boxes.append(a[0].shape) or _f(*a))
    n, t, v = 2, 8, 4096
    monkeypatch.setattr(torch_impl, "BOX_BYTES", 4 * v * 3)
    logits, targets, mask = make_inputs(n, t, v, torch.float32, seed=1)
    big, softmaxes = [], []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "softmax" in str(func):
                assert out.numel() <= 3 * v, (str(func), tuple(out.shape))
                softmaxes.append(str(func))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.numel() >= n * t * v:
                    ptr = o.untyped_storage().data_ptr()
                    if ptr != logits.untyped_storage().data_ptr() and ptr not in big:
                        big.append(ptr)  # a new (N, T, V) storage
            return out

    # The custom op is opaque to dispatch modes: spy on the implementation it runs.
    with Spy():
        scores, lse = torch_impl.forward(logits, targets, mask)
        torch_impl.backward(logits, targets, mask, lse, torch.ones(n))
    assert len(big) == 1, big  # the gradient buffer, nothing else
    if fold == "aten":
        assert softmaxes and not boxes, "the spy saw no (log_)softmax: it checks nothing"
    else:
        assert boxes and not softmaxes
        assert all(b.numel() <= 3 * v for b in boxes), boxes
    big.clear()
    with Spy():
        torch_impl.backward(logits.detach(), targets, mask, lse, torch.ones(n), inplace=True)
    assert big == [], big


def test_nan_logits_give_nan_score_only_where_counted():
    logits, targets, mask = make_inputs(2, 4, 30, torch.float32, seed=2)
    mask[:] = True
    mask[1, 2] = False
    logits[0, 1, 5] = float("nan")
    logits[1, 2, :] = float("nan")  # masked row: ignored
    out = sequence_logprobs(logits, targets, mask, impl="torch")
    assert out[0].isnan() and out[1].isfinite()


def test_minus_inf_vocab_entries():
    logits, targets, mask = make_inputs(1, 3, 20, torch.float32, seed=4)
    mask[:] = True
    logits[0, 0, :10] = float("-inf")  # vocabulary masking
    targets[0, 0] = 12
    logits[0, 1, 7] = float("-inf")
    targets[0, 1] = 7  # a counted target with -inf logit
    out = sequence_logprobs(logits, targets, mask, impl="torch")
    assert out[0].item() == float("-inf")
    mask[0, 1] = False
    out = sequence_logprobs(logits, targets, mask, impl="torch")
    truth = reference_logprobs(logits.double(), targets, mask)
    torch.testing.assert_close(out.double(), truth, rtol=1e-6, atol=1e-6)


def test_tolerance_table_covers_dtypes():
    assert set(TOL) == set(DTYPES)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ref_dtype", DTYPES)
def test_pair_equals_two_calls(impl, ref_dtype):
    from fastdpo import sequence_logprobs_with_reference

    logits, targets, mask = make_inputs(3, 4, 300, torch.float32, seed=8)
    ref_logits = make_inputs(3, 4, 300, ref_dtype, seed=9)[0]
    a = logits.clone().requires_grad_()
    scores, ref_scores = sequence_logprobs_with_reference(a, ref_logits, targets, mask, impl=impl)
    assert not ref_scores.requires_grad
    b = logits.clone().requires_grad_()
    alone = sequence_logprobs(b, targets, mask, impl=impl)
    torch.testing.assert_close(scores, alone, rtol=0, atol=0)
    torch.testing.assert_close(ref_scores, sequence_logprobs(ref_logits, targets, mask, impl=impl), rtol=0, atol=0)
    upstream = torch.randn(3)
    scores.backward(upstream)
    alone.backward(upstream)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda z, y, m: sequence_logprobs(z[0], y, m), ValueError, "logits must be 3-D"),
        (lambda z, y, m: sequence_logprobs(z.double(), y, m), TypeError, "logits must be float32"),
        (lambda z, y, m: sequence_logprobs(z, y.float(), m), TypeError, "targets must hold integer"),
        (lambda z, y, m: sequence_logprobs(z, y[:, :-1], m), ValueError, r"targets must have shape \(N, T\)"),
        (lambda z, y, m: sequence_logprobs(z, y, m.int()), TypeError, "mask must be a torch.bool"),
        (lambda z, y, m: sequence_logprobs(z, y, m[:1]), ValueError, "mask must have shape"),
        (lambda z, y, m: sequence_logprobs(z, y + 50, m), ValueError, "targets holds token id .* outside \\[0, 50\\)"),
        (lambda z, y, m: sequence_logprobs(z, y - 50, m), ValueError, "targets holds token id"),
        (lambda z, y, m: sequence_logprobs(z, y, m, impl="cuda"), ValueError, "impl must be one of"),
        (lambda z, y, m: sequence_logprobs(z[:, :, :0], y, m), ValueError, "vocabulary dimension"),
        (lambda z, y, m: sequence_logprobs(z.tolist(), y, m), TypeError, "logits must be a torch.Tensor"),
        (lambda z, y, m: __import__("fastdpo").sequence_logprobs_with_reference(z, z[:1], y, m), ValueError, "ref_logits must have the shape"),
    ],
)
def test_bad_input(call, err, match):
    logits, targets, mask = make_inputs(2, 3, 50, torch.float32, seed=0)
    mask[:] = True
    with pytest.raises(err, match=match):
        call(logits, targets, mask)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_targets_are_fine_where_masked(impl):
    """Ids at masked positions are never read: out-of-vocabulary ones there (10_000, -100)
    neither raise nor change the scores or the gradient (bit for bit)."""
    logits, targets, mask = make_inputs(3, 5, 50, torch.float32, seed=0)
    assert (~mask).any() and mask.any()
    wild = targets.clone()
    wild[~mask] = torch.where(torch.arange(int((~mask).sum())) % 2 == 0, 10_000, -100)
    upstream = torch.randn(3, generator=torch.Generator().manual_seed(1))
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    scores = sequence_logprobs(a, wild, mask, impl=impl)
    clean = sequence_logprobs(b, targets, mask, impl=impl)
    assert scores.isfinite().all()
    torch.testing.assert_close(scores, clean, rtol=0, atol=0)
    scores.backward(upstream)
    clean.backward(upstream)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    truth = reference_logprobs(logits.double(), targets, mask)
    torch.testing.assert_close(scores.double(), truth, rtol=0, atol=1e-5)


def test_empty_inputs():
    for shape in [(0, 3, 10), (2, 0, 10)]:
        z = torch.randn(*shape, requires_grad=True)
        y = torch.zeros(shape[:2], dtype=torch.long)
        out = sequence_logprobs(z, y, impl="torch")
        assert out.shape == (shape[0],) and (out == 0).all()
        out.sum().backward()
        assert z.grad.shape == z.shape


def test_softmax_kept_from_forward_and_retain_graph(monkeypatch):
    """float32 logits that want a gradient (impl='torch', not in place): forward writes the
    softmax into the buffer that becomes the gradient, backward only multiplies and scatters
    (no second exp).  A second backward over the retained graph recomputes from the logits
    and gets the same gradient."""
    calls = []
    real = torch_impl.backward_from_probs
    monkeypatch.setattr(torch_impl, "backward_from_probs", lambda *a: calls.append("probs") or real(*a))
    real_bwd = torch_impl.backward
    monkeypatch.setattr(torch_impl, "backward", lambda *a, **k: calls.append("recompute") or real_bwd(*a, **k))
    logits, targets, mask = make_inputs(3, 7, 301, torch.float32, seed=11)
    mask[1, 2:5] = False  # a hole: a MIXED box
    upstream = torch.randn(3, generator=torch.Generator().manual_seed(2))
    x64 = logits.double().requires_grad_()
    reference_logprobs(x64, targets, mask).backward(upstream.double())
    z = logits.clone().requires_grad_()
    s = sequence_logprobs(z, targets, mask, impl="torch")
    s.backward(upstream, retain_graph=True)
    assert calls == ["probs"]
    first = z.grad.clone()
    s.backward(upstream)
    assert calls == ["probs", "recompute"]
    torch.testing.assert_close(z.grad, 2 * first, rtol=1e-6, atol=1e-8)
    assert rel_err(first, x64.grad) <= 1e-6
    assert (first[~mask] == 0).all()
    calls.clear()
    with torch.no_grad():  # no gradient wanted: no buffer, the forward alone
        sequence_logprobs(logits.clone().requires_grad_(), targets, mask, impl="torch")
    assert calls == []
