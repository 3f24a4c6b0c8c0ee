"""Hugging Face causal LMs outside ``fastdpo.models.hf.HEAD_RULES``: the head inferred from the
config and checked on the first call against the model's own logits (``scoring.check_head``).

Each class below takes the fused head after the check passes and equals a float64
computation from its own logits; a forward that does something else to the logits (a bias, a
temperature) is caught by the check and scored on the logits route, exactly, with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fastdpo.scoring.router  # noqa: E402
from fastdpo import DPO  # noqa: E402
from fastdpo.models import hf  # noqa: E402

from test_hf import COMMON, CONVENTIONS, batch, check_against_own_logits, perturb, tiny  # noqa: E402

# Tiny configs of popular classes fastdpo's HEAD_RULES do not list (transformers 5.24).
INFERRED = {
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                   head_dim=8)),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "GraniteMoeForCausalLM": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=3.0)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                   shared_expert_intermediate_size=16)),
    "GptOssForCausalLM": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"])),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict()),
    "StableLmForCausalLM": ("StableLmConfig", dict()),
    "OlmoForCausalLM": ("OlmoConfig", dict()),
    "SmolLM3ForCausalLM": ("SmolLM3Config", dict()),
}


def inferred(name: str, seed: int = 0) -> nn.Module:
    config_name, kw = INFERRED[name]
    torch.manual_seed(seed)
    return getattr(transformers, name)(getattr(transformers, config_name)(**{**COMMON, **kw}))


@pytest.fixture
def checks(monkeypatch):
    """Counts the first-call checks."""
    calls = []
    real = fastdpo.scoring.router.check_head

    def spy(*args, **kwargs):
        calls.append(args[1].inferred)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastdpo.scoring.router, "check_head", spy)
    return calls


def test_the_classes_are_not_in_head_rules():
    assert not set(INFERRED) & set(hf.HEAD_RULES)


@pytest.mark.parametrize("conv", list(CONVENTIONS))
@pytest.mark.parametrize("name", list(INFERRED))
def test_inferred_head_is_checked_once_then_fused_and_exact(name, conv, checks):
    model = inferred(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the head is fused
        # (the MoE classes' router term off: these compare the head; tests/test_moe_aux.py adds it)
        dpo = DPO(model, pad_id=0, router_aux_loss_coef=0.0, **CONVENTIONS[conv])
        perturb(model)
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS[conv])
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS[conv])
    route = dpo.route(model, "cpu")
    assert route.kind == "dpo_head" and route.head.inferred, route
    assert len(checks) == 2, checks  # the policy and the reference, once each
    if name == "GraniteMoeForCausalLM":
        assert route.head.scale == pytest.approx(1 / 3) and "/ 3 (logits_scaling)" in route.head.inferred


def test_listed_classes_are_not_checked(checks):
    model = tiny("LlamaForCausalLM")
    dpo = DPO(model, **CONVENTIONS["trl"])
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"])
    assert checks == []
    assert dpo.route(dpo.policy_model, "cpu").head.inferred == ""


class BiasedLlama(transformers.LlamaForCausalLM):
    """A forward that adds a bias to the logits: the head fastdpo infers cannot see it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        g = torch.Generator().manual_seed(7)
        bias = torch.randn(out.logits.shape[-1], generator=g) * 0.5
        out.logits = out.logits + bias
        return out


class HotLlama(transformers.LlamaForCausalLM):
    """A forward that divides the logits by a temperature no config key names."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / 0.7
        return out


@pytest.mark.parametrize("cls", [BiasedLlama, HotLlama])
def test_a_forward_the_head_cannot_reproduce_is_caught_and_stays_exact(cls, checks):
    model = cls(tiny("LlamaForCausalLM").config)
    dpo = DPO(model)  # no warning yet: the claim is checked on the first call
    assert dpo.route(model, "cpu").head.inferred
    perturb(model)
    with pytest.warns(UserWarning, match="own logits differ from logits = lm_head"):
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["x-transformers"])
    route = dpo.route(model, "cpu")
    assert route.kind == "logits" and "differ" in route.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["x-transformers"])
    assert len(checks) == 2

    strict = DPO(cls(tiny("LlamaForCausalLM").config), head="fused")
    pref, unpref, pm, pmask, umask = batch()
    with pytest.raises(ValueError, match="head='fused' but the model's head cannot be fused: its first call"):
        strict(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)


def test_a_subclass_with_the_same_forward_is_fused():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(tiny("LlamaForCausalLM").config)
    dpo = DPO(model, head="fused", **CONVENTIONS["trl"])
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"])
    assert dpo.route(model, "cpu").kind == "dpo_head"


@pytest.mark.parametrize("name", ["GPTNeoXForCausalLM", "GraniteMoeForCausalLM"])
def test_bfloat16_inferred_head_passes_its_check_and_is_within_bf16(name):
    model = inferred(name).to(torch.bfloat16)
    dpo = DPO(model, head="fused", **CONVENTIONS["trl"])
    perturb(model)
    # as tests/test_hf.py's bf16 Llama: the model's own logits are rounded to bf16 first
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"], loss_tol=2e-2, grad_tol=2e-2)
    assert dpo.route(model, "cpu").kind == "dpo_head"


@pytest.mark.parametrize("matmul", ["torch", "triton"])
def test_triton_route_with_an_inferred_scale(matmul):
    """impl="triton" (the CUDA code, interpreted on CPU tensors) on an inferred head with a scale."""
    model = inferred("GraniteMoeForCausalLM")
    dpo = DPO(model, head="fused", impl="triton", matmul=matmul, router_aux_loss_coef=0.0)
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["x-transformers"])
    assert dpo.route(model, "cpu").head.scale == pytest.approx(1 / 3)


class CappedGemma2(transformers.Gemma2ForCausalLM):
    """A Gemma 2 subclass: outside HEAD_RULES, its cap inferred from the config and checked."""


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_an_inferred_softcap_is_checked_then_fused_and_exact(impl, checks):
    torch.manual_seed(0)
    model = CappedGemma2(transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0))
    head = hf.find_head(model)[0]
    assert head.softcap == 2.0 and head.inferred.startswith("logits = tanh(lm_head(hidden) / 2) * 2 (final_logit_softcapping)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the head is fused
        dpo = DPO(model, head="auto", impl=impl, **CONVENTIONS["trl"])
        perturb(model)
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"])
    assert dpo.route(model, "cpu").kind == "dpo_head" and len(checks) == 2


def test_a_softcap_the_forward_ignores_is_caught():
    # OLMo's forward does not read final_logit_softcapping: the claim inferred from the config
    # is wrong, and the first call's check says so (the logits route then, exactly)
    model = inferred("OlmoForCausalLM")
    model.config.final_logit_softcapping = 2.0
    assert hf.find_head(model)[0].softcap == 2.0
    perturb(model)
    with pytest.warns(UserWarning, match=r"differ from logits = tanh\(lm_head\(hidden\) / 2\) \* 2"):
        dpo = DPO(model, **CONVENTIONS["trl"])
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"])
    assert dpo.route(model, "cpu").kind == "logits"


class LlamaWithHeadBias(transformers.LlamaForCausalLM):
    """A Llama subclass (outside HEAD_RULES) whose lm_head has a bias: inferred, checked, fused."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)


def test_an_inferred_head_with_a_bias_is_checked_then_fused_and_exact(checks):
    torch.manual_seed(0)
    model = LlamaWithHeadBias(transformers.LlamaConfig(**COMMON))
    assert hf.find_head(model)[0].has_bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused: no fallback warning
        dpo = DPO(model, **CONVENTIONS["trl"])
        perturb(model)
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"])
    assert dpo.route(model, "cpu").kind == "dpo_head" and len(checks) == 2  # (lm_head.bias's gradient compared too)


def test_a_compiled_first_call_scores_the_logits_exactly():
    """Inside a compiled graph the check cannot run: that graph takes the logits route, with
    the eager (checked, fused) step's loss."""
    model = inferred("OlmoForCausalLM")
    perturb(model)
    dpo = DPO(model, **CONVENTIONS["trl"])
    pref, unpref, pm, pmask, umask = batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    with torch.no_grad():
        want = dpo(pref, unpref, **kw)  # eager: checked, fused
    torch._dynamo.reset()
    fresh = DPO(model, **CONVENTIONS["trl"])
    fresh.ref_model = dpo.ref_model
    step = torch.compile(lambda: fresh(pref, unpref, **kw), backend="aot_eager")
    with torch.no_grad():
        got = step()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert fresh.scorer.checked == {}  # nothing was checked inside the graph

    # an eager call checks the head; a graph traced after it fuses
    with torch.no_grad():
        fresh(pref, unpref, **kw)
    assert [verdict.why_not for _, verdict in fresh.scorer.checked.values()] == ["", ""]  # both heads passed
    torch._dynamo.reset()
    traced = []
    real = hf.hidden_states
    try:
        hf.hidden_states = lambda *a, **k: traced.append(1) or real(*a, **k)
        step = torch.compile(lambda: fresh(pref, unpref, **kw), backend="aot_eager")
        with torch.no_grad():
            got = step()
    finally:
        hf.hidden_states = real
    assert traced  # the fused route's hidden states, not the logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
