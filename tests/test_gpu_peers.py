"""The peers' adapters (fastdpo/bench/peers.py: the bench's and the GPU suite's) against float64.

TRL's and cut-cross-entropy's heads must give the summed masked log-probs of a float64
``log_softmax(hidden @ weight.T)``, and their gradients with respect to ``hidden`` and
``weight``, no further from it than plain float32 torch is, plus a small per-dtype slack (the
three-way rule of helpers.py); Liger's DPO loss must be the float64 DPO loss in TRL's
conventions.  Every case runs on the CPU here and on CUDA where there is one.  A case whose
package cannot be imported skips, naming it.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import three_way

from fastdpo.bench import peers as gp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
F32 = torch.float32


def _needs(module: str, package: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"{module} cannot be imported here ({type(err).__name__}: {err}); pip install {package}")


def _inputs(n, t, d, v, device, seed, fully_masked_row=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.25  # logits of std ~ d**0.25: peaked, not one-hot
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) < 0.7
    if fully_masked_row:
        mask[min(1, n - 1)] = False
    mask[0, 0] = True  # never an all-masked batch
    targets = targets.masked_fill(~mask, -100)  # the adapters must not read masked targets
    return hidden.to(device), weight.to(device), targets.to(device), mask.to(device)


def _scores(hidden, weight, targets, mask):
    """Summed masked log-probs with plain torch ops, in the inputs' dtype."""
    lp = torch.log_softmax(hidden @ weight.T, -1)
    lp = lp.gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(~mask, 0).sum(-1)


def _value_and_grads(fn, hidden, weight, dtype, upstream):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    out = fn(h, w)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


HEADS = [
    pytest.param("trl", {}, id="trl"),
    pytest.param("trl", {"chunk_size": 32}, id="trl-4-vocab-tiles"),  # V=97: three full tiles and a partial
    pytest.param("cut-cross-entropy", {}, id="cce"),
]
SHAPES = [pytest.param((4, 5, 24, 97), id="N4-T5-D24-V97"), pytest.param((3, 1, 24, 97), id="T1")]
MODULE_OF = {"trl": ("trl.kernels.chunked_logprob", "trl==1.16.0"),
             "cut-cross-entropy": ("cut_cross_entropy", "cut-cross-entropy==25.1.1"),
             "liger": ("liger_kernel.chunked_loss", "liger-kernel==0.8.5")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("peer, kwargs", HEADS)
def test_head_scores_and_gradients_match_float64(peer, kwargs, shape, device):
    _needs(*MODULE_OF[peer])
    adapter, _, _ = gp.PEERS[peer]
    hidden, weight, targets, mask = _inputs(*shape, device, seed=sum(shape))
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(7)).to(device)

    out, dh, dw = _value_and_grads(lambda h, w: adapter(h, w, targets, mask, **kwargs), hidden, weight, F32, upstream)
    ref, rdh, rdw = _value_and_grads(lambda h, w: _scores(h, w, targets, mask), hidden, weight, F32, upstream)
    truth, tdh, tdw = _value_and_grads(lambda h, w: _scores(h, w, targets, mask), hidden, weight, torch.float64,
                                       upstream)

    assert out.shape == (shape[0],) and out.dtype == F32
    assert torch.all(out[~mask.any(-1)] == 0)
    three_way(out, ref, truth, F32, f"{peer} scores")
    three_way(dh, rdh, tdh, F32, f"{peer} d hidden")
    three_way(dw, rdw, tdw, F32, f"{peer} d weight")


def test_cce_cuda_kernels_refuse_cpu_tensors():
    _needs(*MODULE_OF["cut-cross-entropy"])
    hidden, weight, targets, mask = _inputs(2, 3, 8, 11, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="Triton kernels for CUDA"):
        gp.cce_head(hidden, weight, targets, mask, impl="cce")


@pytest.fixture
def standalone_trl_cleanup():
    """Remove the private modules a test's standalone TRL load adds to sys.modules."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(gp._TRL_STANDALONE):
            del sys.modules[name]


def test_trl_runs_standalone_without_its_trainer_utils(monkeypatch, standalone_trl_cleanup):
    # As on the GPU machines, which lack `datasets`: trl/trainer/utils.py cannot import, and the
    # kernel's backward imports maybe_gather_lm_head_ctx from it.
    _needs(*MODULE_OF["trl"])
    hidden, weight, targets, mask = _inputs(4, 5, 24, 97, "cpu", seed=3)
    upstream = torch.randn(4, generator=torch.Generator().manual_seed(1))
    want = _value_and_grads(lambda h, w: gp.trl_head(h, w, targets, mask, chunk_size=32), hidden, weight, F32,
                            upstream)
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setattr(gp, "_trl_found", None)  # look for TRL again

    assert gp.trl_route().startswith("standalone: trl.trainer.utils does not import")
    got = _value_and_grads(lambda h, w: gp.trl_head(h, w, targets, mask, chunk_size=32), hidden, weight, F32,
                           upstream)
    for a, b in zip(got, want):  # the same file's code: the same bits
        assert torch.equal(a, b)
    assert sys.modules[f"{gp._TRL_STANDALONE}.kernels.chunked_logprob"].ChunkedLogProbFunction is not (
        importlib.import_module("trl.kernels.chunked_logprob").ChunkedLogProbFunction
    )


def _dpo_loss(pol, ref, beta):
    b = pol.shape[0] // 2
    margin = (pol[:b] - pol[b:]) - (ref[:b] - ref[b:])
    return -F.logsigmoid(beta * margin).mean()


# compiled=True (Liger's default) costs a torch.compile per call site: once here on the CPU.
LIGER_CASES = [
    pytest.param("cpu", False, True, id="cpu-eager"),
    pytest.param("cpu", True, True, id="cpu-compiled"),
    pytest.param("cpu", False, False, id="cpu-eager-no-ref"),
    pytest.param("cuda", True, True, id="cuda-compiled",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device, compiled, with_ref", LIGER_CASES)
def test_liger_dpo_loss_matches_float64_trl_convention(device, compiled, with_ref):
    _needs(*MODULE_OF["liger"])
    beta, pairs = 0.5, 3
    hidden, weight, targets, mask = _inputs(2 * pairs, 6, 24, 97, device, seed=11)
    ref_hidden, ref_weight, _, _ = _inputs(2 * pairs, 6, 24, 97, device, seed=12)
    if not with_ref:
        ref_hidden = ref_weight = None
    upstream = torch.tensor(0.7, device=device)  # not 1: Liger's backward rescales its stored gradients

    def ref_scores(dtype):
        if ref_hidden is None:
            return torch.zeros(2 * pairs, dtype=dtype, device=device)
        return _scores(ref_hidden.to(dtype), ref_weight.to(dtype), targets, mask)

    out, dh, dw = _value_and_grads(
        lambda h, w: gp.liger_dpo_loss(h, w, targets, mask, ref_hidden, ref_weight, beta, compiled=compiled),
        hidden, weight, F32, upstream)
    ref, rdh, rdw = _value_and_grads(
        lambda h, w: _dpo_loss(_scores(h, w, targets, mask), ref_scores(F32), beta), hidden, weight, F32, upstream)
    truth, tdh, tdw = _value_and_grads(
        lambda h, w: _dpo_loss(_scores(h, w, targets, mask), ref_scores(torch.float64), beta),
        hidden, weight, torch.float64, upstream)

    assert out.shape == () and out.dtype == F32
    three_way(out, ref, truth, F32, "liger loss")
    three_way(dh, rdh, tdh, F32, "liger d hidden")
    three_way(dw, rdw, tdw, F32, "liger d weight")


def test_missing_modules_lists_what_cannot_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import of a None entry raises
    missing = gp.missing_modules()
    assert "cut_cross_entropy" in missing
    assert missing == [m for m in gp.MODULES if m in missing]
    for name in gp.MODULES:
        if name in missing:
            with pytest.raises(Exception):
                importlib.import_module(name)
        else:
            importlib.import_module(name)


@pytest.mark.parametrize("peer, blocked, package", [
    ("trl", "trl.kernels.chunked_logprob", "TRL"),
    ("cut-cross-entropy", "cut_cross_entropy", "cut-cross-entropy"),
    ("liger", "liger_kernel.chunked_loss", "liger-kernel"),
])
def test_adapters_name_the_missing_package(monkeypatch, peer, blocked, package):
    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.setattr(gp, "_trl_found", None)
    hidden, weight, targets, mask = _inputs(2, 3, 8, 11, "cpu", seed=0)
    extra = (None, None) if peer == "liger" else ()
    with pytest.raises(ImportError, match=package):
        gp.PEERS[peer][0](hidden, weight, targets, mask, *extra)


@pytest.mark.parametrize("peer", list(gp.PEERS))
def test_adapters_check_their_arguments(peer):
    adapter = gp.PEERS[peer][0]
    hidden, weight, targets, mask = _inputs(2, 3, 8, 11, "cpu", seed=0)
    extra = (None, None) if peer == "liger" else ()
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 3\)"):
        adapter(hidden, weight, targets, mask[:, :2], *extra)
    with pytest.raises(TypeError, match="targets: expected torch.int64"):
        adapter(hidden, weight, targets.int(), mask, *extra)
    with pytest.raises(ValueError, match=r"weight: expected \(V, 8\)"):
        adapter(hidden, weight[:, :4], targets, mask, *extra)
