"""The pair op's kept rows' gradients (fastdpo.scoring.rows.kept_grads): where the torch fold kept
probabilities beside a float32 weight, the row weights commute with the two products
(``dh = g (W_y - P W)``, ``dW = scatter_y(g h) - P^T (g h)``) and no pass writes ``g (onehot
- P)``; against float64 and against the in-place route, and which route each case takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdpo.scoring import rows as chunks
from helpers import three_way


def _case(rows: int, v: int, d: int, seed: int, sharp: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g)
    weight = torch.randn(v, d, generator=g) * sharp / d**0.5
    y = torch.randint(0, v, (rows,), generator=g)
    y[: rows // 3] = (h[: rows // 3] @ weight.T).argmax(-1)  # a third of the rows confident in their target
    w = torch.randn(rows, generator=g)
    return h, weight, y, w


def _truth(h, weight, y, w, scale):
    h64, w64 = h.double(), weight.double()
    z = h64 @ w64.T * (scale or 1.0)
    dz = (w.double() * (scale or 1.0)).unsqueeze(1) * (F.one_hot(y, weight.shape[0]).double() - z.softmax(-1))
    return dz @ w64, dz.T @ h64


def _run(h, weight, y, w, scale, softcap=None, bias=None, fold=chunks.TorchFold):
    kept = torch.empty(h.shape[0], weight.shape[0], dtype=fold.dtype(weight))
    chunks.logits_into(kept, h, weight, scale, bias)
    st, _ = fold.stats(kept, y, keep=True, softcap=softcap)
    grad_h = torch.empty_like(h)
    grad_w = chunks.WeightGrad(weight)
    grad_b = chunks.BiasGrad(bias) if bias is not None else None
    chunks.kept_grads(kept, st, y, w, h, weight, scale, fold, grad_h, grad_w, softcap, grad_b)
    return grad_h, grad_w.result(), grad_b


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("rows,v,d", [(1, 5, 3), (37, 1009, 24), (64, 8192, 16)])
def test_commuted_against_float64_and_the_in_place_route(rows, v, d, scale, monkeypatch):
    h, weight, y, w = _case(rows, v, d, seed=rows + v)
    calls = []
    real = chunks.TorchFold.grad_
    monkeypatch.setattr(chunks.TorchFold, "grad_", staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k)))
    gh, gw, _ = _run(h, weight, y, w, scale)
    assert not calls, "float32 probabilities kept: no pass writes the logits' gradient"
    monkeypatch.setattr(chunks.TorchFold, "keeps_probabilities", False)  # forces the in-place route
    ref_h, ref_w, _ = _run(h, weight, y, w, scale)
    assert calls
    truth_h, truth_w = _truth(h, weight, y, w, scale)
    three_way(gh, ref_h, truth_h, torch.float32, "d hidden")
    three_way(gw, ref_w, truth_w, torch.float32, "d weight")


def test_repeated_targets_and_accumulation_over_groups():
    """Rows sharing a target add their terms; a second group adds onto the first's weight
    gradient (as the pair op's groups do)."""
    h, weight, y, w = _case(40, 300, 8, seed=3)
    y[:20] = 7
    grad_w = chunks.WeightGrad(weight)
    for part in (slice(0, 25), slice(25, 40)):
        kept = chunks.logits_into(torch.empty(part.stop - part.start, 300), h[part], weight, None)
        st, _ = chunks.TorchFold.stats(kept, y[part], keep=True)
        chunks.kept_grads(kept, st, y[part], w[part], h[part], weight, None, chunks.TorchFold, None, grad_w)
    _, truth_w = _truth(h, weight, y, w, None)
    _, ref_w, _ = _run(h, weight, y, w, None)
    three_way(grad_w.result(), ref_w, truth_w, torch.float32, "d weight over two groups")


@pytest.mark.parametrize("case", ["softcap", "bias", "bfloat16"])
def test_the_other_cases_take_the_in_place_route(case, monkeypatch):
    """Capped logits are kept as logits (the cap's derivative needs them); a differentiated
    bias needs the gradient's column sums; 16-bit weights meet the products in their dtype."""
    h, weight, y, w = _case(21, 257, 8, seed=9)
    kw = {}
    if case == "softcap":
        kw["softcap"] = 2.5
    elif case == "bias":
        kw["bias"] = torch.randn(257) * 0.1
    else:
        h, weight = h.bfloat16(), weight.bfloat16()
    calls = []
    real = chunks.TorchFold.grad_
    monkeypatch.setattr(chunks.TorchFold, "grad_", staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k)))
    gh, gw, gb = _run(h, weight, y, w, None, **kw)
    assert calls
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    if case == "bias":
        assert gb is not None and torch.isfinite(gb.result()).all()
