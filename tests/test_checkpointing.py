"""Gradient checkpointing (transformers' own, which ``fastdpo train`` turns on by default) gives
the same loss and the same gradients as no checkpointing, on every route fastdpo takes a
Hugging Face model through: unpacked, packed by segments (attention by parts, which must come
back when backward recomputes a layer) and by a dense mask, sliding windows, LoRA (the
reference is the policy with its adapters off), the router's load-balancing term, KTO's KL
pass, and the logits route; with the non-reentrant checkpoint (TRL's and fastdpo's) and the
reentrant one.

Recomputing a layer runs the same operations on the same inputs, so on the CPU the gradients
are bitwise those of the run without checkpointing: the tests ask for equality.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastdpo import DPO, KTO  # noqa: E402
from test_hf import CONVENTIONS, batch, grads_of, perturb, tiny  # noqa: E402
from test_hf_inferred import inferred  # noqa: E402
from test_kto import ours_collate, examples  # noqa: E402


def checkpointing(model, on: bool, reentrant: bool = False) -> None:
    """transformers' checkpointing on or off (``activation_checkpointing_*`` from transformers 5.2x,
    ``gradient_checkpointing_*`` before)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": reentrant}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


def loss_and_grads(module, model, call) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = call(module)
    loss.backward()
    return loss.detach(), grads_of(model)


def dpo_call(dpo):
    pref, unpref, pm, pmask, umask = batch()
    return dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)


def assert_same(model, build, call=dpo_call, reentrant=False):
    """``build()`` the module around ``model`` with checkpointing off, then on: equal loss and
    every gradient equal (and some gradient to compare)."""
    checkpointing(model, False)
    want_loss, want = loss_and_grads(build(), model, call)
    checkpointing(model, True, reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got_loss, got = loss_and_grads(build(), model, call)
    checkpointing(model, False)
    assert want and got.keys() == want.keys()
    assert torch.equal(got_loss, want_loss), (got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name


LAYOUTS = [dict(packing="none"), dict(packing="pair"), dict(packing="batch", pack_attention="segments"),
           dict(packing="batch", pack_attention="dense")]  # fmt: skip


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(map(str, d.values())))
def test_llama_every_layout(layout, reentrant):
    model = tiny("LlamaForCausalLM")
    perturb(model)
    assert_same(model, lambda: DPO(model, **layout, **CONVENTIONS["trl"]), reentrant=reentrant)


def test_sliding_window_packed_by_segments():
    model = tiny("MistralForCausalLM", sliding_window=4)
    perturb(model)
    assert_same(model, lambda: DPO(model, packing="pair", **CONVENTIONS["trl"]))


def test_logits_route():
    model = tiny("LlamaForCausalLM")
    perturb(model)
    assert_same(model, lambda: DPO(model, head="logits", **CONVENTIONS["trl"]))


@pytest.mark.parametrize("packing", ["none", "pair"])
def test_lora_reference_is_the_policy_with_adapters_off(packing):
    base = tiny("LlamaForCausalLM")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb(model, seed=5)
    assert_same(model, lambda: DPO(model, packing=packing, **CONVENTIONS["trl"]))


def test_router_load_balancing_term():
    model = inferred("MixtralForCausalLM")
    perturb(model)
    assert_same(model, lambda: DPO(model, router_aux_loss_coef=0.05, **CONVENTIONS["trl"]))


def test_kto_with_its_kl_pass():
    from test_kto import hf_model

    model = hf_model()
    data = ours_collate(examples())
    assert_same(model, lambda: KTO(model, **CONVENTIONS["trl"]), call=lambda kto: kto(**data))
