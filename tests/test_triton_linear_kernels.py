"""fastdpo.kernels.linear_sequence_logprobs against a float64 ground truth and torch in the input dtype.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
the tests' conftest before triton is imported), so sizes stay small and most cases shrink
the tiles to 16 (the `_block_*` overrides); the shipped configuration runs once per dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdpo.kernels.linear_sequence_logprobs import linear_logprobs_backward, linear_logprobs_forward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

# Slack allowed beyond torch-in-dtype's own distance to float64 (the three-way rule), in one
# place, relative to max(1, max|truth|). Our logp is float32 whatever the input dtype (the
# tiles accumulate in float32; torch's log_softmax rounds to the input dtype, so it is the
# looser one for 16-bit): a few float32 ulps of the logits. A gradient element is
# rounded once to the input dtype at the end (half an ulp, 2**-(mantissa bits + 1)), after
# a softmax-gradient tile rounded to the input dtype for the tensor cores (its error
# averages out over V and D); Triton 3.9's interpreter rounds float32 -> bfloat16 by
# truncation (runtime/interpreter.py: _convert_float without a rounding mode): a whole ulp.
TOL = {
    torch.float32: {"logp": 2**-20, "grad": 2**-20},
    torch.bfloat16: {"logp": 2**-20, "grad": 2**-7 if INTERPRET else 2**-8},
    torch.float16: {"logp": 2**-20, "grad": 2**-11},
}
DTYPES = list(TOL)
SMALL = dict(_block_m=16, _block_v=16, _block_d=16)

# (M, D, V, overrides): every row counts (the caller compacts), so no mask here.
SHAPES = [
    pytest.param(1, 40, 2, SMALL, id="M=1,V=2"),
    pytest.param(5, 33, 13, SMALL, id="V<BLOCK_V,D=33"),
    pytest.param(20, 40, 70, SMALL, id="V%BLOCK_V!=0,D=40,splits"),
    pytest.param(20, 48, 150, dict(SMALL, _splits=3), id="multi-tile-splits"),
    pytest.param(20, 48, 70, dict(SMALL, _splits=1), id="one-split,direct"),
    pytest.param(17, 32, 40, dict(SMALL, _splits=5), id="empty-splits"),
    pytest.param(3, 64, 300, {}, id="shipped-config"),
]


@pytest.fixture(autouse=True, scope="module")
def interpreter_bf16_dot():
    """Triton 3.9's interpreter keeps bfloat16 as raw uint16 bits and hands them to
    np.matmul as integers (InterpreterBuilder.create_dot), so every bf16 tl.dot is garbage
    there (triton-lang/triton#11584, closed: bfloat16 is documented as unsupported by the
    interpreter). Widen the operands to float32 first (exact, as the tensor cores take
    them) for this module, and put the original back afterwards."""
    if not INTERPRET:
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original


def make_inputs(M, D, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, D, generator=gen).to(dtype)
    # Logits of a few units: softmax neither uniform nor one-hot.
    weight = (torch.randn(V, D, generator=gen) * 2.0 / D**0.5).to(dtype)
    targets = torch.randint(0, V, (M,), generator=gen)
    grad_rows = torch.randn(M, generator=gen)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), grad_rows.to(DEVICE)


SCALE = 1.3


def torch_reference(hidden, weight, targets, grad_rows, scale=SCALE, dtype=None):
    """logp, grad_hidden, grad_weight with plain torch ops and autograd, in `dtype`."""
    h = hidden.detach().to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(True)
    logp = (h @ w.T * scale).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    (logp * grad_rows.to(dtype)).sum().backward()
    return logp.detach(), h.grad, w.grad


def assert_three_way(ours, ref, truth, slack, what):
    """max|ours - truth| <= max|ref - truth| + slack * max(1, max|truth|)."""
    assert ours.shape == truth.shape, (what, ours.shape, truth.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    truth = truth.double()
    scale = max(1.0, truth.abs().max().item())
    err_ours = (ours.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    assert err_ours <= err_ref + slack * scale, (
        f"{what}: ours is {err_ours:.3g} from float64, torch-in-dtype {err_ref:.3g}, slack {slack * scale:.3g}"
    )


def run(hidden, weight, targets, grad_rows, **kw):
    logp, lse = linear_logprobs_forward(hidden, weight, targets, SCALE, **kw)
    gh, gw = linear_logprobs_backward(hidden, weight, targets, lse, grad_rows, SCALE, **kw)
    return logp, lse, gh, gw


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("M, D, V, kw", SHAPES)
def test_values_and_gradients(M, D, V, kw, dtype):
    hidden, weight, targets, grad_rows = make_inputs(M, D, V, dtype)
    logp, lse, gh, gw = run(hidden, weight, targets, grad_rows, **kw)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == (M,)
    assert gh.dtype == gw.dtype == dtype and gh.shape == (M, D) and gw.shape == (V, D)
    assert gh.is_contiguous() and gw.is_contiguous()

    truth = torch_reference(hidden, weight, targets, grad_rows, dtype=torch.float64)
    ref = torch_reference(hidden, weight, targets, grad_rows, dtype=dtype)
    tol = TOL[dtype]
    assert_three_way(logp, ref[0], truth[0], tol["logp"], "logp")
    lse_ref = (hidden @ weight.T * SCALE).logsumexp(-1)
    lse_truth = (hidden.double() @ weight.double().T * SCALE).logsumexp(-1)
    assert_three_way(lse, lse_ref, lse_truth, tol["logp"], "lse")
    assert_three_way(gh, ref[1], truth[1], tol["grad"], "grad_hidden")
    assert_three_way(gw, ref[2], truth[2], tol["grad"], "grad_weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_bitwise_deterministic(dtype):
    # Several splits in the forward and in grad_hidden, several row blocks in grad_weight:
    # every reduction crosses programs, and none uses atomics.
    hidden, weight, targets, grad_rows = make_inputs(40, 40, 90, dtype, seed=3)
    first = run(hidden, weight, targets, grad_rows, **SMALL)
    second = run(hidden, weight, targets, grad_rows, **SMALL)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_strided_rows_and_padding():
    # Any row stride is read in place when it and D are multiples of 16 and copied
    # (zero-padded to D % 16 == 0) otherwise; the result does not depend on which.
    M, D, V = 6, 32, 50
    hidden, weight, targets, grad_rows = make_inputs(M, D, V, torch.float32, seed=5)
    base = run(hidden, weight, targets, grad_rows, **SMALL)
    wide_h = torch.randn(M, 2 * D + 16, device=DEVICE)
    wide_h[:, 16:16 + D] = hidden  # row stride 80: read in place
    odd_w = torch.randn(V, D + 3, device=DEVICE)
    odd_w[:, 1:1 + D] = weight  # row stride 35 and an unaligned address: copied
    sparse_w = torch.randn(2 * V, D, device=DEVICE)
    sparse_w[::2] = weight  # row stride 64: read in place
    col_major = hidden.t().contiguous().t()  # D stride M: copied
    for h, w in ((wide_h[:, 16:16 + D], odd_w[:, 1:1 + D]), (col_major, sparse_w[::2])):
        out = run(h, w, targets, grad_rows, **SMALL)
        for a, b in zip(out, base):
            assert torch.equal(a, b)


def test_int64_offsets():
    # Row r of hidden and weight starts at element r * stride, a stride that fits int32
    # while 2 * stride does not: only int64 row offsets in the kernels reach row 2. The
    # 4 GiB float16 buffers are mostly untouched, hence never committed.
    M = V = 3
    D = 16
    hidden, weight, targets, grad_rows = make_inputs(M, D, V, torch.float16, seed=7)
    stride = 2**30 + 16
    far_h = torch.empty(2 * stride + D, dtype=torch.float16, device=DEVICE).as_strided((M, D), (stride, 1))
    far_w = torch.empty(2 * stride + D, dtype=torch.float16, device=DEVICE).as_strided((V, D), (stride, 1))
    far_h.copy_(hidden)
    far_w.copy_(weight)
    base = run(hidden, weight, targets, grad_rows, **SMALL)
    out = run(far_h, far_w, targets, grad_rows, **SMALL)
    for a, b in zip(out, base):
        assert torch.equal(a, b)


def test_empty_batch_and_flags():
    D, V = 16, 20
    hidden, weight, targets, grad_rows = make_inputs(0, D, V, torch.float32)
    logp, lse = linear_logprobs_forward(hidden, weight, targets, 1.0)
    assert logp.shape == lse.shape == (0,)
    gh, gw = linear_logprobs_backward(hidden, weight, targets, lse, grad_rows, 1.0)
    assert gh.shape == (0, D) and torch.equal(gw, torch.zeros(V, D, device=DEVICE))

    hidden, weight, targets, grad_rows = make_inputs(3, D, V, torch.float32)
    logp, lse = linear_logprobs_forward(hidden, weight, targets, 1.0, **SMALL)
    gh, gw = linear_logprobs_backward(hidden, weight, targets, lse, grad_rows, 1.0,
                                      need_weight_grad=False, **SMALL)
    assert gw is None and gh.shape == (3, D)
    gh, gw = linear_logprobs_backward(hidden, weight, targets, lse, grad_rows, 1.0,
                                      need_hidden_grad=False, **SMALL)
    assert gh is None and gw.shape == (V, D)


def test_out_of_vocab_target_is_nan():
    hidden, weight, targets, _ = make_inputs(4, 16, 20, torch.float32)
    targets[1], targets[2] = -1, 20
    logp, lse = linear_logprobs_forward(hidden, weight, targets, 1.0, **SMALL)
    assert logp[1].isnan() and logp[2].isnan()
    assert torch.isfinite(logp[[0, 3]]).all() and torch.isfinite(lse).all()


def test_opt_in_autotune(monkeypatch):
    # FASTDPO_AUTOTUNE=1 goes through triton.autotune (here pruned to the one smallest
    # config; on a GPU it benchmarks several): same values as the fixed configuration.
    hidden, weight, targets, grad_rows = make_inputs(4, 32, 40, torch.float16, seed=9)
    base = run(hidden, weight, targets, grad_rows)
    monkeypatch.setenv("FASTDPO_AUTOTUNE", "1")
    try:
        tuned = run(hidden, weight, targets, grad_rows)
    except RuntimeError as e:  # triton 3.6's autotuner asks for a driver even when interpreting
        if "active drivers" in str(e) and not torch.cuda.is_available():
            pytest.skip(f"this triton's autotuner needs a GPU driver under the interpreter: {e}")
        raise
    for a, b, tol in zip(tuned, base, (1e-6, 1e-6, 2**-10, 2**-10)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_validation():
    hidden, weight, targets, grad_rows = make_inputs(3, 16, 10, torch.float32)
    lse = torch.zeros(3, device=DEVICE)
    fwd, bwd = linear_logprobs_forward, linear_logprobs_backward
    cases = [
        (TypeError, "hidden", lambda: fwd(hidden.double(), weight, targets, 1.0)),
        (ValueError, "hidden", lambda: fwd(hidden[0], weight, targets, 1.0)),
        (TypeError, "hidden", lambda: fwd(hidden.tolist(), weight, targets, 1.0)),
        (TypeError, "weight", lambda: fwd(hidden, weight.half(), targets, 1.0)),
        (ValueError, "weight", lambda: fwd(hidden, weight[:, :8], targets, 1.0)),
        (ValueError, "weight", lambda: fwd(hidden, weight[:0], targets, 1.0)),
        (ValueError, "weight", lambda: fwd(hidden, weight.to("meta"), targets, 1.0)),
        (TypeError, "targets", lambda: fwd(hidden, weight, targets.int(), 1.0)),
        (ValueError, "targets", lambda: fwd(hidden, weight, targets[:2], 1.0)),
        (TypeError, "scale", lambda: fwd(hidden, weight, targets, torch.tensor(1.0))),
        (TypeError, "lse", lambda: bwd(hidden, weight, targets, lse.half(), grad_rows, 1.0)),
        (ValueError, "lse", lambda: bwd(hidden, weight, targets, lse[:1], grad_rows, 1.0)),
        (TypeError, "grad_rows", lambda: bwd(hidden, weight, targets, lse, grad_rows.double(), 1.0)),
        (ValueError, "grad_rows", lambda: bwd(hidden, weight, targets, lse, grad_rows[None], 1.0)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
