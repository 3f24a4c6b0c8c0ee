"""The cost model of the fused head's CUDA routes and the matmul='auto' rule built on it."""

from __future__ import annotations

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper

import fastdpo.scoring.linear_op as linear
from fastdpo import DPO
from fastdpo.scoring import cost_model


def test_three_product_route_is_three_products_plus_the_fold():
    m, d, v = 1000, 4096, 128256
    got = cost_model.predict("torch", m, 2 * m, d, v, torch.bfloat16)
    rate, bw = cost_model.H100.mm_16bit, cost_model.H100.bandwidth
    assert got["policy"] == pytest.approx(m * (3 * 2 * d * v / rate + 3 * 2 * v / bw))
    assert got["reference"] == pytest.approx(m * (2 * d * v / rate + 2 * v / bw))
    assert got["total"] == pytest.approx(got["policy"] + got["reference"])
    # only counted rows: the prompt rows (m_all - m) cost nothing
    assert cost_model.predict("torch", m, 10 * m, d, v, torch.bfloat16) == got


def test_triton_gemm_route_counts_every_row_and_its_accumulator_traffic():
    # The estimate: ~1 TB of accumulator traffic per backward kernel at M = 32768,
    # V = 128256, D = 4096, i.e. ~0.36 s each at 3 TB/s.
    m, d, v = 32768, 4096, 128256
    slow = cost_model.H100.mm_16bit * cost_model.H100.triton_gemm_efficiency
    policy = cost_model.predict("triton", 1, m, d, v, torch.bfloat16)["policy"]
    accumulators = policy - m * 5 * 2 * d * v / slow
    assert accumulators * cost_model.H100.bandwidth == pytest.approx(2 * 1.076e12, rel=1e-3)


@pytest.mark.parametrize("d", [1024, 2048, 4096])
@pytest.mark.parametrize("v", [32000, 128256])
def test_rule_follows_the_model(d, v):
    assert cost_model.choose_matmul(d, v, torch.bfloat16) == "torch"
    assert f"| {d} | {v} |" in cost_model.table()


def test_bad_route_name():
    with pytest.raises(ValueError, match="matmul must be 'torch' or 'triton'"):
        cost_model.predict("cublas", 1, 1, 8, 8, torch.float32)


def test_auto_takes_what_the_rule_says(monkeypatch):
    """DPO(impl='triton', matmul='auto') takes the route choose_matmul names."""
    model = TransformerWrapper(num_tokens=50, max_seq_len=8, attn_layers=Decoder(dim=16, depth=1, heads=2))
    assert DPO(model, impl="triton").route(model, "cpu").matmul == "torch"
    monkeypatch.setattr(linear.cost_model, "choose_matmul", lambda d, v, dtype: "triton")
    route = DPO(model, impl="triton").route(model, "cpu")
    assert (route.kind, route.matmul) == ("fused", "triton")
    assert DPO(model, impl="torch").route(model, "cpu").matmul == "torch"  # torch multiplies on its own path
