"""sequence_logprobs' small-input path (plain autograd ops below fastdpo.ops.SMALL_ELEMENTS):
the same contract as the main path, checked the same ways."""

from __future__ import annotations

import pytest
import torch

import fastdpo.ops as ops
from fastdpo import sequence_logprobs

from helpers import TOL, reference_logprobs, three_way

pytestmark = pytest.mark.small_path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(n, t, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[-1] = False
    return logits, targets, mask


def test_the_path_is_taken(monkeypatch):
    taken = []
    real = ops._small_logprobs
    monkeypatch.setattr(ops, "_small_logprobs", lambda *a: taken.append(1) or real(*a))
    logits, targets, mask = inputs(2, 3, 7, torch.float32, 0)
    sequence_logprobs(logits, targets, mask, impl="torch")
    assert taken == [1]
    big = torch.randn(1, 2, ops.SMALL_ELEMENTS)  # just over the threshold: the main path
    sequence_logprobs(big, torch.zeros(1, 2, dtype=torch.long), impl="torch")
    assert taken == [1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 97), (1, 1, 2), (2, 7, 1000)], ids=str)
def test_against_float64(shape, dtype):
    logits, targets, mask = inputs(*shape, dtype, seed=sum(shape))
    targets[~mask] = -100  # never read where masked
    safe = torch.where(mask, targets, 0)
    up = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))

    def run(z, y):
        z = z.detach().clone().requires_grad_()
        s = sequence_logprobs(z, y, mask, impl="torch") if y is targets else reference_logprobs(z, y, mask)
        s.float().backward(up.to(s.dtype))
        return s, z.grad

    s, g = run(logits, targets)
    sr, gr = run(logits, safe)
    st, gt = run(logits.double(), safe)
    assert s.dtype == torch.float32 and g.dtype == dtype
    three_way(s, sr, st, dtype, "scores")
    three_way(g, gr, gt, dtype, "grad")
    assert (g[~mask] == 0).all()


def test_non_finite_masked_rows_never_reach_scores_or_gradients():
    logits, targets, mask = inputs(2, 4, 11, torch.float32, 3)
    mask[0, 1] = False
    logits[0, 1, 3] = float("nan")
    logits[0, 1, 5] = float("inf")
    z = logits.clone().requires_grad_()
    s = sequence_logprobs(z, targets, mask, impl="torch")
    s.sum().backward()
    assert s.isfinite().all() and z.grad.isfinite().all() and (z.grad[0, 1] == 0).all()


def test_counted_non_finite_and_out_of_range():
    logits, targets, mask = inputs(2, 4, 11, torch.float32, 4)
    mask[0, 2] = True
    logits[0, 2, 1] = float("inf")
    assert sequence_logprobs(logits, targets, mask, impl="torch")[0].isnan()
    logits[0, 2, 1] = 0.0
    targets[0, 2] = 11
    with pytest.raises(ValueError, match="targets holds token id 11"):
        sequence_logprobs(logits, targets, mask, impl="torch")


def test_empty_and_int32_ids():
    assert sequence_logprobs(torch.randn(0, 3, 5), torch.zeros(0, 3, dtype=torch.long), impl="torch").shape == (0,)
    logits, targets, mask = inputs(2, 3, 9, torch.float32, 5)
    a = sequence_logprobs(logits, targets.int(), mask, impl="torch")
    b = sequence_logprobs(logits, targets, mask, impl="torch")
    assert torch.equal(a, b)
