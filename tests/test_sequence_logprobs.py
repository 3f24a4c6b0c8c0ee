"""sequence_logprobs against float64 log_softmax + gather, values and gradients."""

from __future__ import annotations

import pytest
import torch

from fastdpo import sequence_logprobs
from fastdpo.torch_impl import TorchOptions, TorchSequenceLogprobs

from helpers import TOL, reference_logprobs, three_way

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
    # masked rows get exactly zero gradient
    assert (ours_in.grad[~mask] == 0).all()
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(2, 7, 1000), (3, 1, 257), (1, 5, 2), (4, 3, 5003), (2, 9, 33)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_values_and_grads(shape, dtype):
    logits, targets, mask = make_inputs(*shape, dtype, seed=sum(shape))
    check_against_float64(logits, targets, mask, lambda z, y, m: sequence_logprobs(z, y, m, impl="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("box_rows", [1, 3, 5, 20])
def test_box_boundaries(dtype, box_rows):
    """Boxes of whole sequences, runs of positions, and a last partial box all agree."""
    v = 1001
    logits, targets, mask = make_inputs(3, 7, v, dtype, seed=box_rows)
    opts = TorchOptions(box_bytes=4 * v * box_rows)
    check_against_float64(
        logits, targets, mask, lambda z, y, m: TorchSequenceLogprobs.apply(z, y, m, opts)
    )


def test_fully_masked_rows_and_ignored_targets():
    logits, targets, mask = make_inputs(3, 6, 300, torch.float32, seed=5)
    mask[1] = False
    targets[~mask] = -100  # never read at masked positions
    out = check_against_float64(
        logits, targets, mask, lambda z, y, m: sequence_logprobs(z, y, m, impl="torch")
    )
    assert out[1].item() == 0.0


def test_mask_none_counts_everything():
    logits, targets, _ = make_inputs(2, 4, 50, torch.float32, seed=9)
    full = torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(
        sequence_logprobs(logits, targets), sequence_logprobs(logits, targets, full), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    base, targets, mask = make_inputs(6, 4, 700, dtype, seed=11)
    logits = base.transpose(0, 1)[:, :, 100:613]  # (4, 6, 513): strided N/T, sliced V
    targets = targets.T % 513  # (4, 6) as a transposed view
    targets = targets.contiguous().T.contiguous().T  # non-contiguous too
    mask = mask.T
    assert not logits.is_contiguous() and not targets.is_contiguous()
    check_against_float64(logits, targets, mask, lambda z, y, m: sequence_logprobs(z, y, m, impl="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches_out_of_place(dtype):
    logits, targets, mask = make_inputs(2, 5, 400, dtype, seed=3)
    upstream = torch.randn(2)
    a = logits.clone().requires_grad_()
    sequence_logprobs(a, targets, mask, impl="torch").backward(upstream)

    # in-place: the gradient lands in the (non-leaf) logits buffer itself
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0
    out = TorchSequenceLogprobs.apply(z, targets, mask, TorchOptions(inplace_backward=True))
    out.backward(upstream)
    torch.testing.assert_close(leaf.grad, a.grad, rtol=0, atol=0)
    torch.testing.assert_close(z.detach(), a.grad, rtol=0, atol=0)


def test_no_vocab_sized_softmax_is_built():
    """The op never calls (log_)softmax and never allocates more than one (N, T, V) buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, t, v = 2, 8, 4096
    logits, targets, mask = make_inputs(n, t, v, torch.float32, seed=1)
    logits.requires_grad_()
    big = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            assert "softmax" not in name, name
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.numel() >= n * t * v:
                    big.append(name)
            return out

    with Spy():
        sequence_logprobs(logits, targets, mask, impl="torch").sum().backward()
    # exactly one full-size allocation: the gradient (plus its accumulation into .grad)
    assert len([b for b in big if "empty" in b]) == 1, big


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
