"""Argument checks of every public entry point: one test per row of docs/validation.md.

Bad input must get a ``TypeError`` or ``ValueError`` that names the argument and says what
was expected and what came (the project's rule for every public function: ``assert`` is for
internal invariants only), never a bare ``AssertionError`` nor an ``IndexError``/
``RuntimeError`` from deep inside torch.  Valid but unusual input (non-contiguous, expanded
stride-0, int32 ids, empty batches) must work and give the values of its contiguous twin.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fastdpo import (
    DPO,
    PreferenceDataset,
    check_loss_config,
    linear_sequence_logprobs,
    precompute_reference_scores,
    sequence_logprobs,
    sequence_logprobs_with_reference,
)
from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head

from helpers import IMPLS, tiny_transformer

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: OpenMP hand-offs between threads on a shared machine cost far more than
    the work.  Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def device_of(impl: str) -> str:
    return TRITON_DEVICE if impl == "triton" else "cpu"


def logprob_inputs(device="cpu", n=2, t=3, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[:, 0] = True
    return logits.to(device), targets.to(device), mask.to(device)


def scores_and_grad(fn, logits, *args, **kwargs):
    z = logits.detach().clone().requires_grad_()
    s = fn(z, *args, **kwargs)
    s.backward(torch.arange(1.0, s.shape[0] + 1, device=s.device))
    return s.detach().cpu(), z.grad.cpu()


# ============================================================================ sequence_logprobs

Z, Y, M = logprob_inputs()
META = torch.device("meta")

SEQUENCE_LOGPROBS_ERRORS = [
    # id, (logits, targets, mask), kwargs, exception, message
    ("logits_not_tensor", (Z.tolist(), Y, M), {}, TypeError, "logits must be a torch.Tensor"),
    ("logits_float64", (Z.double(), Y, M), {}, TypeError, "logits must be float32"),
    ("logits_integer", (Y.unsqueeze(-1), Y, M), {}, TypeError, "logits must be float32"),
    ("logits_2d", (Z[0], Y, M), {}, ValueError, "logits must be 3-D"),
    ("logits_4d", (Z[None], Y, M), {}, ValueError, "logits must be 3-D"),
    ("logits_empty_vocab", (Z[..., :0], Y, M), {}, ValueError, "vocabulary dimension"),
    ("targets_float", (Z, Y.float(), M), {}, TypeError, "targets must hold integer"),
    ("targets_bool", (Z, Y.bool(), M), {}, TypeError, "targets must hold integer"),
    ("targets_shape", (Z, Y[:, :2], M), {}, ValueError, "targets must have shape"),
    ("targets_3d", (Z, Y.unsqueeze(-1), M), {}, ValueError, "targets must be 2-D"),
    ("mask_int", (Z, Y, M.long()), {}, TypeError, "mask must be a torch.bool"),
    ("mask_float", (Z, Y, M.float()), {}, TypeError, "mask must be a torch.bool"),
    ("mask_shape", (Z, Y, M[:1]), {}, ValueError, "mask must have shape"),
    ("logits_on_meta", (Z.to(META), Y, M), {}, ValueError, "logits is on meta"),
    ("targets_on_meta", (Z, Y.to(META), M), {}, ValueError, "targets is on meta"),
    ("mask_on_meta", (Z, Y, M.to(META)), {}, ValueError, "mask is on meta"),
    ("impl_unknown", (Z, Y, M), {"impl": "cuda"}, ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [pytest.param(*row[1:], id=row[0]) for row in SEQUENCE_LOGPROBS_ERRORS],
)
def test_sequence_logprobs_rejects(impl, args, kwargs, exc, match):
    kwargs = {"impl": impl, **kwargs}
    with pytest.raises(exc, match=match):
        sequence_logprobs(*args, **kwargs)


@pytest.mark.parametrize("bad", [-1, V + 5, 7], ids=["negative", "large", "V"])
def test_sequence_logprobs_out_of_vocab_id_raises_on_cpu_torch(bad):
    logits, targets, mask = logprob_inputs()
    targets[1, 0] = bad  # counted (mask[:, 0] is True)
    with pytest.raises(ValueError, match=r"targets holds token id .* outside \[0, 7\)"):
        sequence_logprobs(logits, targets, mask, impl="torch")


def test_sequence_logprobs_out_of_vocab_id_scores_nan_on_triton():
    """The Triton path never dereferences a bad id and never syncs to check it: the score
    (and its gradient row) is NaN, the other sequence's is untouched.  (The docstring's
    "raises ValueError for CPU tensors" holds for impl='torch' only.)"""
    logits, targets, mask = logprob_inputs(TRITON_DEVICE)
    targets[1, 0] = 7
    s, g = scores_and_grad(sequence_logprobs, logits, targets, mask, impl="triton")
    assert s[1].isnan() and s[0].isfinite()
    assert g[1, 0].isnan().all() and g[0].isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_masked_ids_are_never_read(impl):
    logits, targets, mask = logprob_inputs(device_of(impl))
    wild = targets.clone()
    wild[~mask] = -100
    wild[~mask & (torch.arange(3, device=wild.device) == 2)] = 2**40
    assert torch.equal(
        sequence_logprobs(logits, wild, mask, impl=impl),
        sequence_logprobs(logits, targets, mask, impl=impl),
    )


def test_sequence_logprobs_triton_needs_cuda_or_interpreter(monkeypatch):
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        sequence_logprobs(Z, Y, M, impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_empty_and_meta(impl):
    dev = device_of(impl)
    logits, targets, mask = logprob_inputs(dev)
    assert sequence_logprobs(logits[:0], targets[:0], mask[:0], impl=impl).shape == (0,)
    out = sequence_logprobs(logits[:, :0], targets[:, :0], mask[:, :0], impl=impl)
    assert torch.equal(out.cpu(), torch.zeros(2))
    # all on meta: shapes only (the op has a fake implementation: torch.compile, meta init)
    meta = sequence_logprobs(Z.to(META), Y.to(META), M.to(META), impl=impl)
    assert meta.device.type == "meta" and meta.shape == (2,) and meta.dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_sequence_logprobs_narrow_integer_ids(impl, dtype):
    logits, targets, mask = logprob_inputs(device_of(impl))
    assert torch.equal(
        sequence_logprobs(logits, targets.to(dtype), mask, impl=impl),
        sequence_logprobs(logits, targets, mask, impl=impl),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_sequence_logprobs_strided_inputs(impl, inplace_backward):
    """Transposed N/T, a V slice (stride 2 in V), stride-0 expanded targets and mask: the
    values and gradients of contiguous copies.  (Logits made by an op, so in-place backward
    is allowed to overwrite them.)"""
    dev = device_of(impl)
    base = torch.randn(3, 2, 14, generator=torch.Generator().manual_seed(1)).to(dev)
    targets = torch.tensor([[1, 2], [3, 4], [5, 6]], device=dev)
    mask = torch.tensor([True, False, True], device=dev)
    cases = {
        "transposed": (lambda b: b.transpose(0, 1)[:, :, :7], targets.T, mask[:2, None].expand(2, 3)),
        "v_stride_2": (lambda b: b.transpose(0, 1)[:, :, ::2], targets.T.contiguous(), mask[:2, None].expand(2, 3).contiguous()),
        "expanded_ids": (lambda b: b.transpose(0, 1).contiguous()[:, :, 3:10], targets[:1, :1].expand(2, 3), mask[:1, None].expand(2, 3)),
    }
    for name, (view, y, m) in cases.items():
        leaf = base.clone().requires_grad_()
        s = sequence_logprobs(view(leaf * 1.0), y, m, impl=impl, inplace_backward=inplace_backward)
        s.backward(torch.tensor([1.0, -2.0], device=dev))
        twin = base.clone().requires_grad_()
        s2 = sequence_logprobs(view(twin).contiguous(), y.contiguous(), m.contiguous(), impl="torch")
        s2.backward(torch.tensor([1.0, -2.0], device=dev))
        assert not view(base).is_contiguous()
        torch.testing.assert_close(s.cpu(), s2.cpu(), rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(leaf.grad.cpu(), twin.grad.cpu(), rtol=1e-6, atol=1e-6, msg=name)




@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_expanded_logits(impl):
    """Stride-0 logits (one row broadcast over N and T): the right values and the gradient
    summed back into the one row."""
    dev = device_of(impl)
    row = torch.randn(1, 1, 7, generator=torch.Generator().manual_seed(2)).to(dev).requires_grad_()
    targets, mask = Y.to(dev), M.to(dev)
    s = sequence_logprobs(row.expand(2, 3, 7), targets, mask, impl=impl)
    s.backward(torch.tensor([1.0, 3.0], device=dev))
    twin = row.detach().clone().requires_grad_()
    s2 = sequence_logprobs(twin.expand(2, 3, 7).contiguous(), targets, mask, impl="torch")
    s2.backward(torch.tensor([1.0, 3.0], device=dev))
    torch.testing.assert_close(s, s2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row.grad, twin.grad, rtol=1e-6, atol=1e-6)




@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_inplace_backward_on_expanded_logits(impl):
    dev = device_of(impl)
    row = torch.randn(1, 1, 7, generator=torch.Generator().manual_seed(3)).to(dev).requires_grad_()
    targets, mask = Y.to(dev), M.to(dev)
    s = sequence_logprobs(row.expand(2, 3, 7), targets, mask, impl=impl, inplace_backward=True)
    s.backward(torch.ones(2, device=dev))
    twin = row.detach().clone().requires_grad_()
    sequence_logprobs(twin.expand(2, 3, 7), targets, mask, impl="torch").backward(torch.ones(2, device=dev))
    torch.testing.assert_close(row.grad, twin.grad, rtol=1e-6, atol=1e-6)


def test_sequence_logprobs_triton_inplace_backward_on_v_strided_logits():
    base = torch.randn(2, 3, 14, generator=torch.Generator().manual_seed(4)).to(TRITON_DEVICE)
    leaf = base.clone().requires_grad_()
    y, m = Y.to(TRITON_DEVICE), M.to(TRITON_DEVICE)
    s = sequence_logprobs((leaf * 1.0)[..., ::2], y, m, impl="triton", inplace_backward=True)
    s.backward(torch.ones(2, device=TRITON_DEVICE))
    twin = base.clone().requires_grad_()
    sequence_logprobs(twin[..., ::2], y, m, impl="torch").backward(torch.ones(2, device=TRITON_DEVICE))
    torch.testing.assert_close(leaf.grad, twin.grad, rtol=1e-6, atol=1e-6)


# ============================================================================ sequence_logprobs_with_reference

PAIR_ERRORS = [
    ("ref_not_tensor", Z.tolist(), TypeError, "ref_logits must be a torch.Tensor"),
    ("ref_float64", Z.double(), TypeError, "ref_logits must be float32"),
    ("ref_2d", Z[0], ValueError, "ref_logits must be 3-D"),
    ("ref_shape", Z[:1], ValueError, "ref_logits must have the shape of logits"),
    ("ref_on_meta", Z.to(META), ValueError, "ref_logits is on meta"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ref, exc, match", [pytest.param(*r[1:], id=r[0]) for r in PAIR_ERRORS])
def test_sequence_logprobs_pair_rejects(impl, ref, exc, match):
    with pytest.raises(exc, match=match):
        sequence_logprobs_with_reference(Z, ref, Y, M, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_pair_checks_policy_args_too(impl):
    with pytest.raises(TypeError, match="mask must be a torch.bool"):
        sequence_logprobs_with_reference(Z, Z, Y, M.int(), impl=impl)
    with pytest.raises(TypeError, match="logits must be float32"):
        sequence_logprobs_with_reference(Z.double(), Z, Y, M, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_pair_mixed_dtypes_and_detached_reference(impl):
    dev = device_of(impl)
    logits, targets, mask = logprob_inputs(dev)
    ref = (logits * 0.5).bfloat16().requires_grad_()
    s, r = sequence_logprobs_with_reference(logits, ref, targets, mask, impl=impl)
    assert not r.requires_grad
    assert torch.equal(s, sequence_logprobs(logits, targets, mask, impl=impl))
    assert torch.equal(r, sequence_logprobs(ref.detach(), targets, mask, impl=impl))


# ============================================================================ linear


def linear_inputs(n=2, t=3, d=4, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g)
    weight = torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[:, 0] = True
    return hidden, weight, targets, mask


H, W, LY, LM = linear_inputs()

LINEAR_ERRORS = [
    ("hidden_not_tensor", (H.tolist(), W, LY, LM), {}, TypeError, "hidden must be a torch.Tensor"),
    ("hidden_float64", (H.double(), W.double(), LY, LM), {}, TypeError, "hidden must be float32"),
    ("dtype_mismatch", (H, W.bfloat16(), LY, LM), {}, TypeError, "must share a dtype"),
    ("hidden_2d", (H[0], W, LY, LM), {}, ValueError, "hidden must be 3-D"),
    ("weight_3d", (H, W[None], LY, LM), {}, ValueError, "weight must be 2-D"),
    ("weight_wrong_d", (H, W[:, :3], LY, LM), {}, ValueError, "weight must have shape"),
    ("weight_empty_vocab", (H, W[:0], LY, LM), {}, ValueError, "weight must have at least one row"),
    ("targets_float", (H, W, LY.float(), LM), {}, TypeError, "targets must hold integer"),
    ("targets_shape", (H, W, LY[:1], LM), {}, ValueError, "targets must have shape"),
    ("target_negative", (H, W, LY - 10, None), {}, ValueError, "targets holds token id"),
    ("target_too_large", (H, W, LY + 7, None), {}, ValueError, "targets holds token id"),
    ("mask_int", (H, W, LY, LM.int()), {}, TypeError, "mask must be a torch.bool"),
    ("mask_shape", (H, W, LY, LM[:, :1]), {}, ValueError, "mask must have shape"),
    ("hidden_on_meta", (H.to(META), W, LY, LM), {}, ValueError, "hidden is on meta"),
    ("weight_on_meta", (H, W.to(META), LY, LM), {}, ValueError, "weight is on meta"),
    ("scale_nan", (H, W, LY, LM), {"scale": float("nan")}, ValueError, "scale must be finite"),
    ("scale_inf", (H, W, LY, LM), {"scale": float("inf")}, ValueError, "scale must be finite"),
    ("impl_unknown", (H, W, LY, LM), {"impl": "cuda"}, ValueError, "impl must be one of"),
    # float("x") fails first: a ValueError that does not name scale
    ("scale_string", (H, W, LY, LM), {"scale": "x"}, ValueError, "could not convert"),
]


@pytest.mark.parametrize(
    "args, kwargs, exc, match", [pytest.param(*r[1:], id=r[0]) for r in LINEAR_ERRORS]
)
def test_linear_sequence_logprobs_rejects(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        linear_sequence_logprobs(*args, **kwargs)




def test_linear_sequence_logprobs_all_meta():
    """Every tensor on meta: shapes only, from the custom op's fake implementation (as
    sequence_logprobs; torch.compile and meta-device initialisation need it)."""
    out = linear_sequence_logprobs(H.to(META), W.to(META), LY.to(META), LM.to(META))
    assert out.shape == (2,) and out.device.type == "meta" and out.dtype == torch.float32


def test_linear_sequence_logprobs_masked_ids_empty_and_narrow_ids():
    wild = torch.where(LM, LY, 2**40)
    assert torch.equal(linear_sequence_logprobs(H, W, wild, LM), linear_sequence_logprobs(H, W, LY, LM))
    assert linear_sequence_logprobs(H[:0], W, LY[:0], LM[:0]).shape == (0,)
    assert torch.equal(linear_sequence_logprobs(H[:, :0], W, LY[:, :0], LM[:, :0]), torch.zeros(2))
    assert torch.equal(
        linear_sequence_logprobs(H, W, LY.int(), LM), linear_sequence_logprobs(H, W, LY, LM)
    )


def test_linear_sequence_logprobs_strided_and_expanded():
    """Transposed hidden, a stride-0 expanded hidden row and weight row, expanded targets and
    mask: the values and gradients of contiguous copies."""
    h_leaf = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5), requires_grad=True)
    w_row = torch.randn(1, 4, generator=torch.Generator().manual_seed(6), requires_grad=True)
    weight = torch.cat((W, w_row.expand(3, 4)))  # 10 rows, 3 of them one shared row
    views = {
        "transposed": (lambda h: h.transpose(0, 1), LY[:, :3], LM[:, :3]),
        "expanded": (lambda h: h[:1, :1].expand(2, 3, 4), LY[:1, :1].expand(2, 3), LM[:1, :1].expand(2, 3)),
    }
    for name, (view, y, m) in views.items():
        grads = []
        for make in (lambda x: x, lambda x: x.contiguous()):
            h_leaf.grad = w_row.grad = None
            s = linear_sequence_logprobs(make(view(h_leaf)), make(weight), make(y), make(m))
            s.backward(torch.tensor([1.0, -1.0]))
            grads.append((s.detach(), h_leaf.grad.clone(), w_row.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


OPTS = HeadOptions(impl="torch", scale=None, ref_scale=None, reduction="mean", loss=check_loss_config("sigmoid", 0.1))


def test_dpo_head_rejects():
    count = torch.ones(2)
    with pytest.raises(ValueError, match="hidden must hold 2B sequences"):
        dpo_head(H[:1].expand(3, 3, 4), W, LY[:1].expand(3, 3), LM[:1].expand(3, 3), torch.ones(3), OPTS)
    with pytest.raises(ValueError, match="opts.reduction must be one of"):
        dpo_head(H, W, LY, LM, count, dataclasses.replace(OPTS, reduction="max"))
    with pytest.raises(ValueError, match="opts.impl must be one of"):
        dpo_head(H, W, LY, LM, count, dataclasses.replace(OPTS, impl="cuda"))
    with pytest.raises(TypeError, match=r"mask must be a torch.bool tensor \(True = the position counts\)"):
        dpo_head(H, W, LY, LM.float(), count, OPTS)
    with pytest.raises(ValueError, match="targets holds token id"):
        dpo_head(H, W, LY + 7, LM, count, OPTS)
    with pytest.raises(ValueError, match=r"count must be a float \(2,\) tensor"):
        dpo_head(H, W, LY, LM, torch.ones(3), OPTS)
    with pytest.raises(ValueError, match="ref_scores must be a float32"):
        dpo_head(H, W, LY, LM, count, OPTS, ref_scores=torch.zeros(3))


def test_dpo_head_empty_batch():
    with pytest.raises(ValueError, match="hidden must hold at least one pair"):
        dpo_head(H[:0], W, LY[:0], LM[:0], torch.ones(0), OPTS)


# ============================================================================ DPO


def make_model(v=V, seed=0):
    return tiny_transformer(v, max_seq_len=16, dim=8, depth=1, heads=2, seed=seed)


def batch(b=2, l=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pref = torch.randint(1, V, (b, l), generator=g)
    unpref = torch.randint(1, V, (b, l), generator=g)
    prompt_mask = torch.zeros(b, l, dtype=torch.bool)
    prompt_mask[:, :2] = True
    return pref, unpref, prompt_mask


def test_dpo_init_rejects():
    model = make_model()
    cases = [
        (dict(), lambda: DPO(lambda x: x), TypeError, "model must be a torch.nn.Module"),
        (dict(beta=0), None, ValueError, "beta"),
        (dict(beta=-1.0), None, ValueError, "beta"),
        (dict(beta=float("nan")), None, ValueError, "beta"),
        (dict(beta=float("inf")), None, ValueError, "beta"),
        (dict(beta="0.1"), None, TypeError, "beta"),
        (dict(beta=None), None, TypeError, "beta"),
        (dict(pad_id=0.0), None, TypeError, "pad_id must be an int or None"),
        (dict(pad_id=True), None, TypeError, "pad_id must be an int or None"),
        (dict(logprob_reduction="avg"), None, ValueError, "logprob_reduction must be one of"),
        (dict(mask_alignment="output"), None, ValueError, "mask_alignment must be one of"),
        (dict(head="linear"), None, ValueError, "head must be one of"),
        (dict(impl="cuda"), None, ValueError, "impl must be one of"),
    ]
    for kwargs, make, exc, match in cases:
        with pytest.raises(exc, match=match):
            (make or (lambda: DPO(model, **kwargs)))()
    with pytest.raises(ValueError, match="head='fused' but the model's head cannot be fused"):
        DPO(nn.Linear(4, 4), head="fused")


@pytest.fixture(scope="module")
def dpo():
    return DPO(make_model(), pad_id=0)


def forward_cases():
    p, u, m = batch()
    meta = torch.device("meta")
    return [
        # id, args, kwargs, exception, message
        ("float_seq", (p.float(), u), dict(prompt_mask=m), TypeError, "preferred_seq must hold integer"),
        ("bool_seq", (p, u.bool()), dict(prompt_mask=m), TypeError, "unpreferred_seq must hold integer"),
        ("seq_1d", (p[0], u[0]), dict(prompt_mask=m[0]), ValueError, "preferred_seq must be 2-D"),
        ("seq_not_tensor", (p.tolist(), u), dict(prompt_mask=m), TypeError, "preferred_seq must be a torch.Tensor"),
        ("seq_3d", (p[None], u[None]), dict(prompt_mask=m), ValueError, "preferred_seq must be 2-D"),
        ("shape_mismatch", (p, u[:, :5]), dict(prompt_mask=m), ValueError, "unpreferred_seq must have the shape"),
        ("empty_batch", (p[:0], u[:0]), dict(prompt_mask=m[:0]), ValueError, "B >= 1 and L >= 2"),
        ("length_1", (p[:, :1], u[:, :1]), dict(prompt_mask=m[:, :1]), ValueError, "B >= 1 and L >= 2"),
        ("prompt_mask_none", (p, u), dict(prompt_mask=None), TypeError, "prompt_mask must be a torch.Tensor"),
        ("prompt_mask_int", (p, u), dict(prompt_mask=m.long()), TypeError, "prompt_mask must be a torch.bool"),
        ("prompt_mask_shape", (p, u), dict(prompt_mask=m[:, :5]), ValueError, "prompt_mask must have shape"),
        ("seq_mask_float", (p, u), dict(prompt_mask=m, preferred_seq_mask=(p > 0).float()), TypeError, "preferred_seq_mask must be a torch.bool"),
        ("seq_mask_shape", (p, u), dict(prompt_mask=m, unpreferred_seq_mask=(u > 0)[:1]), ValueError, "unpreferred_seq_mask must have shape"),
        ("token_negative", (p - V, u), dict(prompt_mask=m), ValueError, "preferred_seq holds token id -"),
        ("token_too_large", (p, u + V), dict(prompt_mask=m), ValueError, r"unpreferred_seq holds token id .* outside \[0, 20\)"),
        ("seq_on_meta", (p.to(meta), u), dict(prompt_mask=m), ValueError, "on meta"),
        ("mask_on_meta", (p, u), dict(prompt_mask=m.to(meta)), ValueError, "prompt_mask is on meta"),
    ]


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("method", ["forward", "reference_scores"])
@pytest.mark.parametrize(
    "args, kwargs, exc, match", [pytest.param(*c[1:], id=c[0]) for c in forward_cases()]
)
def test_dpo_forward_and_reference_scores_reject(head, method, args, kwargs, exc, match):
    # built with this head (not a shared module's attribute changed after its routes were
    # decided): each case meets the DPO a user of that head gets
    dpo = DPO(make_model(), pad_id=0, head=head)
    fn = dpo if method == "forward" else dpo.reference_scores
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def ref_score_cases():
    p, u, m = batch()
    r = torch.zeros(2)
    meta = torch.device("meta")
    return [
        ("only_one", dict(ref_preferred_logprob=r), ValueError, "give both"),
        ("python_float", dict(ref_preferred_logprob=0.0, ref_unpreferred_logprob=0.0), TypeError, "ref_preferred_logprob must be a torch.Tensor"),
        ("2d", dict(ref_preferred_logprob=r[:, None], ref_unpreferred_logprob=r), ValueError, "ref_preferred_logprob must be 1-D"),
        ("wrong_length", dict(ref_preferred_logprob=r, ref_unpreferred_logprob=torch.zeros(3)), ValueError, r"ref_unpreferred_logprob must have shape \(2,\)"),
        ("integer", dict(ref_preferred_logprob=r.long(), ref_unpreferred_logprob=r), TypeError, "ref_preferred_logprob must be a float"),
        ("on_meta", dict(ref_preferred_logprob=r, ref_unpreferred_logprob=r.to(meta)), ValueError, "ref_unpreferred_logprob is on meta"),
    ]


@pytest.mark.parametrize("kwargs, exc, match", [pytest.param(*c[1:], id=c[0]) for c in ref_score_cases()])
def test_dpo_forward_rejects_bad_reference_scores(dpo, kwargs, exc, match):
    p, u, m = batch()
    with pytest.raises(exc, match=match):
        dpo(p, u, prompt_mask=m, **kwargs)


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_dpo_accepts_narrow_ids_strided_and_expanded_inputs(head):
    """int32/int16/uint8 ids, non-contiguous (transposed) and stride-0 (expanded) sequences
    and masks: the loss and gradients of contiguous int64 copies."""
    dpo = DPO(make_model(), pad_id=0, head=head)
    p, u, m = batch(b=3, l=6)
    p[:, -1] = 0  # some padding
    ref_loss = None
    variants = {
        "int64": (p, u, m),
        "int32": (p.int(), u.int(), m),
        "int16": (p.short(), u.short(), m),
        "uint8": (p.to(torch.uint8), u.to(torch.uint8), m),
        "transposed": (p.T.contiguous().T, u.T.contiguous().T, m.T.contiguous().T),
    }
    for name, (a, b, c) in variants.items():
        assert name in ("int64", "int32", "int16", "uint8") or not a.is_contiguous()
        dpo.policy_model.zero_grad(set_to_none=True)
        loss = dpo(a, b, prompt_mask=c)
        loss.backward()
        grads = [q.grad.clone() for q in dpo.parameters()]
        if ref_loss is None:
            ref_loss, ref_grads = loss.detach(), grads
        assert torch.equal(loss.detach(), ref_loss), name
        assert all(torch.equal(x, y) for x, y in zip(grads, ref_grads)), name
    # one row expanded over the batch: equals its contiguous copy
    e = (p[:1].expand(3, 6), u[:1].expand(3, 6), m[:1].expand(3, 6))
    torch.testing.assert_close(
        dpo(*e[:2], prompt_mask=e[2]), dpo(*(x.contiguous() for x in e[:2]), prompt_mask=e[2].contiguous()),
        rtol=0, atol=0,
    )


def test_dpo_sequence_longer_than_the_model_is_the_models_error():
    """Not fastdpo's check: x-transformers' TransformerWrapper asserts its max_seq_len (x-
    transformers' own DPO gives the same AssertionError).  fastdpo does not own the model's
    limits; the message names the maximum."""
    dpo = DPO(make_model(), pad_id=0)
    p, u, m = batch(l=20)
    with pytest.raises((AssertionError, ValueError), match="max sequence length|max_seq_len"):
        dpo(p, u, prompt_mask=m)


def test_dpo_without_reference_model_needs_precomputed_scores():
    dpo = DPO(make_model(), pad_id=0)
    p, u, m = batch()
    w, l = dpo.reference_scores(p, u, prompt_mask=m)
    del dpo.ref_model  # "safe, as long as every call passes precomputed scores"
    assert dpo(p, u, prompt_mask=m, ref_preferred_logprob=w, ref_unpreferred_logprob=l).isfinite()
    with pytest.raises(AttributeError, match="ref_model"):
        dpo(p, u, prompt_mask=m)


# ============================================================================ PreferenceDataset


def item(**kw):
    return {"preferred": [1, 2, 3], "unpreferred": [1, 2, 4], "prompt_len": 1, **kw}


DATASET_ERRORS = [
    ("item_not_mapping", [[1, 2]], {}, TypeError, r"data\[0\] must be a mapping"),
    ("missing_unpreferred", [{"preferred": [1], "prompt_len": 0}], {}, ValueError, r"has no 'unpreferred' entry"),
    ("missing_prompt_len", [{"preferred": [1], "unpreferred": [1]}], {}, ValueError, r"has no 'prompt_len' entry"),
    ("float_tokens", [item(preferred=[1.5, 2.0])], {}, TypeError, r"data\[0\]\['preferred'\] must hold integer"),
    ("bool_tokens", [item(unpreferred=[True, False, True])], {}, TypeError, r"data\[0\]\['unpreferred'\] must hold integer"),
    ("tokens_2d", [item(preferred=[[1, 2]])], {}, ValueError, r"data\[0\]\['preferred'\] must be 1-D"),
    ("tokens_0d", [item(preferred=3)], {}, ValueError, r"data\[0\]\['preferred'\] must be 1-D"),
    ("tokens_empty", [item(preferred=[])], {}, ValueError, "must hold at least one token"),
    # torch.as_tensor fails first: TypeError/ValueError that do not name the item
    ("tokens_string", [item(preferred="abc")], {}, TypeError, "invalid data type 'str'"),
    ("tokens_ragged", [item(preferred=[[1], [1, 2]])], {}, ValueError, "expected sequence of length"),
    ("prompt_len_negative", [item(prompt_len=-1)], {}, ValueError, r"'prompt_len'\] must be in \[0, 3\]"),
    ("prompt_len_too_large", [item(prompt_len=4)], {}, ValueError, r"'prompt_len'\] must be in \[0, 3\]"),
    ("prompt_len_float", [item(prompt_len=1.0)], {}, TypeError, r"'prompt_len'\] must be an int"),
    ("prompt_len_float_tensor", [item(prompt_len=torch.tensor(1.0))], {}, TypeError, r"'prompt_len'\] must be an int"),
    ("lengths_differ_no_pad_id", [item(unpreferred=[1, 2])], {}, ValueError, "need padding, but pad_id is None"),
]


@pytest.mark.parametrize(
    "data, kwargs, exc, match", [pytest.param(*r[1:], id=r[0]) for r in DATASET_ERRORS]
)
def test_preference_dataset_item_rejects(data, kwargs, exc, match):
    ds = PreferenceDataset(data, **kwargs)
    with pytest.raises(exc, match=match):
        ds[0]


def test_preference_dataset_init_and_index():
    with pytest.raises(TypeError, match="pad_id must be an int or None"):
        PreferenceDataset([item()], pad_id=0.5)
    with pytest.raises(TypeError, match="pad_id must be an int or None"):
        PreferenceDataset([item()], pad_id=False)
    ds = PreferenceDataset([item()])
    # IndexError past the end is the sequence protocol (iteration stops on it), not a bug
    with pytest.raises(IndexError):
        ds[1]
    assert len(list(ds)) == 1


def test_preference_dataset_accepts_tensors_views_and_numpy():
    expect = PreferenceDataset([item(preferred=[0, 2, 4, 6], unpreferred=[7, 7, 7, 7], prompt_len=2)])[0]
    ds = PreferenceDataset([
        item(preferred=torch.arange(8)[::2], unpreferred=torch.tensor(7).expand(4), prompt_len=torch.tensor(2)),
        item(preferred=np.arange(8)[::2], unpreferred=np.full(4, 7, dtype=np.int32), prompt_len=2),
    ])
    for i in range(2):
        for got, want in zip(ds[i], expect):
            assert torch.equal(got, want)
    # negative ids are not the dataset's business (it has no vocabulary): DPO.forward rejects them
    assert PreferenceDataset([item(preferred=[-1, 2, 3])])[0][0][0] == -1




def test_preference_dataset_numpy_integer_prompt_len():
    _, _, prompt_mask = PreferenceDataset([item(prompt_len=np.int64(2))])[0]
    assert prompt_mask.tolist() == [True, True, False]


# ============================================================================ collate


@pytest.fixture(scope="module")
def ds():
    return PreferenceDataset(
        [item(), item(preferred=[1, 2, 3, 4, 5], unpreferred=[1, 2, 3, 4, 6], prompt_len=2)], pad_id=0
    )


def test_collate_rejects(ds):
    with pytest.raises(ValueError, match="collate got an empty batch"):
        ds.collate([])
    with pytest.raises(ValueError, match="need padding, but pad_id is None"):
        PreferenceDataset([item()]).collate([ds[0], ds[1]])
    # a 2-tuple item is named
    with pytest.raises(TypeError, match="batch item 0 must be a dataset item"):
        ds.collate([ds[0][:2]])


def test_collate_pads_strided_and_expanded_items(ds):
    p, u, m = ds.collate([ds[0], ds[1]])
    assert p.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert m.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    odd = (torch.arange(6)[::2], torch.tensor(1).expand(3), torch.tensor(True).expand(3))
    p, u, m = ds.collate([odd, ds[1]])
    assert p[0].tolist() == [0, 2, 4, 0, 0] and u[0].tolist() == [1, 1, 1, 0, 0]
    assert m[0].tolist() == [True, True, True, False, False]




@pytest.mark.parametrize("kind", ["raw_mappings", "lists"])
def test_collate_malformed_items(ds, kind):
    if kind == "raw_mappings":
        batch_ = [item(), item(preferred=[1, 2])]
    else:
        batch_ = [([1, 2], [1, 2], [True, False]), ([1, 2, 3], [1, 2, 3], [True, False, False])]
    with pytest.raises((TypeError, ValueError), match="batch item 0|batch\\[0\\]"):
        ds.collate(batch_)


def test_collate_pads_to_the_longest_tensor_of_any_item(ds):
    """A hand-built item whose unpreferred is the longest tensor of the batch: all padded to it."""
    p, u, m = ds.collate([(torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4]), torch.tensor([True, False]))])
    assert p.tolist() == [[1, 2, 0, 0]] and u.tolist() == [[1, 2, 3, 4]]
    assert m.tolist() == [[True, False, False, False]]


# ============================================================================ precompute_reference_scores


def test_precompute_reference_scores_rows():
    dpo = DPO(make_model(), pad_id=0)
    p, u, m = batch()
    w, l = precompute_reference_scores(dpo, [(p, u, m), (p[:1], u[:1], m[:1])], progress=False)
    assert w.shape == (3,) and l.shape == (3,)
    assert torch.equal(w[:2], dpo.reference_scores(p, u, prompt_mask=m)[0])
    # the optional sequence masks after the prompt mask are passed on
    w2, _ = precompute_reference_scores(dpo, [(p, u, m, p > 5, u > 5)], progress=False)
    assert torch.equal(w2, dpo.reference_scores(p, u, prompt_mask=m, preferred_seq_mask=p > 5)[0])
    empty_w, empty_l = precompute_reference_scores(dpo, [], progress=False)
    assert empty_w.shape == (0,) and empty_l.shape == (0,)
    # bad batches reach DPO's own checks
    with pytest.raises(TypeError, match="prompt_mask must be a torch.bool"):
        precompute_reference_scores(dpo, [(p, u, m.long())], progress=False)
    # a 2-tuple is named
    with pytest.raises(ValueError, match=r"batches\[0\] must be"):
        precompute_reference_scores(dpo, [(p, u)], progress=False)
    with pytest.raises(TypeError, match="not iterable"):
        precompute_reference_scores(dpo, 3, progress=False)




@pytest.mark.parametrize("kind", ["not_a_dpo", "six_entries"])
def test_precompute_reference_scores_malformed(kind):
    dpo = DPO(make_model(), pad_id=0)
    p, u, m = batch()
    if kind == "not_a_dpo":
        with pytest.raises(TypeError, match="dpo"):
            precompute_reference_scores(dpo.policy_model, [(p, u, m)], progress=False)
    else:
        with pytest.raises(ValueError, match="batch"):
            precompute_reference_scores(dpo, [(p, u, m, p > 0, u > 0, m)], progress=False)
