"""Mixture-of-Experts policies: the router's load-balancing loss added as TRL 1.16's DPOTrainer
adds it (``fastdpo.DPO(router_aux_loss_coef=...)``, issue 24 item 3).

TRL 1.16 (``DPOTrainer._compute_loss``): ``loss + coef * outputs.aux_loss``, where ``outputs``
is the policy's forward on the whole sequences with the attention mask of their real tokens and
``output_router_logits=True``, ``coef`` the config's ``router_aux_loss_coef`` unless given, on
only for a config with ``output_router_logits``; the reference runs without it.  Each test
below builds that number from the model's own forward, the DPO part in float64 from the model's
own logits, and compares losses and every gradient (the routers' included).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fastdpo import DPO  # noqa: E402

from test_hf import B, CONVENTIONS, batch, grads_of, perturb, tiny  # noqa: E402
from test_hf_inferred import inferred  # noqa: E402
from helpers import rel_err  # noqa: E402

MOE = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "GraniteMoeForCausalLM",
       "GptOssForCausalLM"]
COEF = 0.3  # far above the configs' 0.001-0.01: the term moves the loss and the routers' gradients


def trl_loss(policy, reference, pref, unpref, pm, pmask, umask, coef):
    """TRL's DPO loss (sum reduction, target alignment) in float64 from the models' own logits,
    plus ``coef`` times the policy's own aux_loss as TRL asks for it."""
    seq = torch.cat((pref, unpref))
    real = torch.cat((pmask, umask))
    keep = ~pm.repeat(2, 1) & real
    mask, src, tgt = keep[:, 1:], seq[:, :-1], seq[:, 1:]

    def scores(model):
        logits = model(input_ids=src, use_cache=False).logits.double()
        return (logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1) * mask).sum(-1)

    with torch.no_grad():
        ref = scores(reference)
    pol = scores(policy)
    dpo = -F.logsigmoid(0.1 * ((pol[:B] - pol[B:]) - (ref[:B] - ref[B:]))).mean()
    aux = policy(input_ids=seq, attention_mask=real.long(), output_router_logits=True, use_cache=False).aux_loss
    return dpo + coef * aux, aux


def check(dpo, reference, coef, data=None, loss_tol=1e-6, grad_tol=1e-5):
    pref, unpref, pm, pmask, umask = data if data is not None else batch()
    policy = dpo.policy_model
    policy.zero_grad(set_to_none=True)
    loss, metrics = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                        return_metrics=True)
    loss.backward()
    got = grads_of(policy)
    policy.zero_grad(set_to_none=True)
    want, aux = trl_loss(policy, reference, pref, unpref, pm, pmask, umask, coef)
    want.backward()
    expected = grads_of(policy)
    assert abs(loss.item() - want.item()) <= loss_tol * abs(want.item()), (loss.item(), want.item())
    assert metrics["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-6)
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel_err(got[name], expected[name]) <= grad_tol, (name, rel_err(got[name], expected[name]))
    return loss, metrics


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("name", MOE)
def test_router_loss_as_trl_adds_it(name, head):
    model = inferred(name)
    dpo = DPO(model, head=head, router_aux_loss_coef=COEF, **CONVENTIONS["trl"])
    assert dpo.router_aux_loss_coef == COEF
    perturb(model)
    loss, metrics = check(dpo, dpo.ref_model, COEF)
    # the term matters: without it the loss is the plain DPO loss, and routers get less gradient
    plain = DPO(model, head=head, router_aux_loss_coef=0.0, **CONVENTIONS["trl"])
    plain.ref_model = dpo.ref_model
    pref, unpref, pm, pmask, umask = batch()
    without = plain(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    assert (loss - without).item() == pytest.approx(COEF * metrics["aux_loss"].item(), rel=1e-5)
    assert metrics["aux_loss"].item() > 0.5  # ~1 for a balanced router, times the experts' share


def test_the_coefficient_comes_from_the_config_unless_given():
    model = inferred("MixtralForCausalLM")
    assert DPO(model).router_aux_loss_coef == model.config.router_aux_loss_coef == 0.001
    model.config.router_aux_loss_coef = 0.2
    dpo = DPO(model, **CONVENTIONS["trl"])
    assert dpo.router_aux_loss_coef == 0.2
    perturb(model)
    check(dpo, dpo.ref_model, 0.2)
    assert DPO(model, router_aux_loss_coef=0.0).router_aux_loss_coef == 0.0


def test_models_without_a_router():
    llama = tiny("LlamaForCausalLM")
    assert DPO(llama).router_aux_loss_coef == 0.0  # (None: the config has no router)
    assert DPO(llama, router_aux_loss_coef=0.0).router_aux_loss_coef == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.5 but LlamaForCausalLM is not a Mixture-of-Experts"):
        DPO(llama, router_aux_loss_coef=0.5)
    with pytest.raises(TypeError, match="router_aux_loss_coef must be a real Python number"):
        DPO(inferred("MixtralForCausalLM"), router_aux_loss_coef="0.1")
    pref, unpref, pm, pmask, umask = batch()
    _, metrics = DPO(llama)(pref, unpref, prompt_mask=pm, return_metrics=True)
    assert "aux_loss" not in metrics


def test_packing_with_the_router_loss_is_refused():
    model = inferred("MixtralForCausalLM")
    with pytest.raises(ValueError, match="packing='pair' with the MoE router's load-balancing loss"):
        DPO(model, router_aux_loss_coef=COEF, share_prompt=True)
    DPO(model, router_aux_loss_coef=0.0, packing="batch")  # off: packs as any model


def test_only_the_policy_is_asked_for_its_router():
    model = inferred("Qwen3MoeForCausalLM")
    dpo = DPO(model, router_aux_loss_coef=COEF, **CONVENTIONS["trl"])
    asked = []
    for m in (model, dpo.ref_model):
        m.register_forward_pre_hook(lambda mod, args, kw: asked.append((mod, kw.get("output_router_logits"))),
                                    with_kwargs=True)
    pref, unpref, pm, pmask, umask = batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    dpo(pref, unpref, **kw).backward()  # (the first call also checks the inferred heads)
    asked.clear()
    dpo(pref, unpref, **kw).backward()
    assert [(m is model, flag) for m, flag in asked] == [(False, None), (True, True)]


def test_left_padded_batch_gets_the_same_router_loss():
    """The term counts the real tokens only: the same pairs left padded (each pair's two rows
    of one length, so that one prompt mask serves both) give the same loss and term."""
    model = inferred("MixtralForCausalLM")
    perturb(model)
    dpo = DPO(model, router_aux_loss_coef=COEF, **CONVENTIONS["trl"])
    g = torch.Generator().manual_seed(11)
    L, n, prompt = 11, [11, 8, 9], [2, 4, 3]
    vocab = model.config.vocab_size
    sides = {}
    for side in ("right", "left"):
        pref = torch.zeros(B, L, dtype=torch.long)
        unpref, pm, real = pref.clone(), torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
        sides[side] = (pref, unpref, pm, real)
    for i in range(B):
        w = torch.randint(3, vocab, (n[i],), generator=g)
        lo = torch.randint(3, vocab, (n[i],), generator=g)
        lo[: prompt[i]] = w[: prompt[i]]
        for side, start in (("right", 0), ("left", L - n[i])):
            pref, unpref, pm, real = sides[side]
            pref[i, start : start + n[i]], unpref[i, start : start + n[i]] = w, lo
            pm[i, start : start + prompt[i]] = True
            real[i, start : start + n[i]] = True
    out = {}
    for side, (pref, unpref, pm, real) in sides.items():
        out[side] = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=real, unpreferred_seq_mask=real,
                        return_metrics=True)
    (a, ma), (b, mb) = out["right"], out["left"]
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    assert mb["aux_loss"].item() == pytest.approx(ma["aux_loss"].item(), rel=1e-5)
    assert ma["aux_loss"].item() > 0.5


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_kto_adds_the_router_loss_of_its_batch(head):
    """KTO as TRL 1.16's KTOTrainer: the term of the batch's own sequences (not of the KL
    sequences), loss and gradients those of the KTO loss without it plus coef * aux_loss."""
    from fastdpo import KTO

    model = inferred("OlmoeForCausalLM")
    perturb(model)
    pref, unpref, pm, pmask, umask = batch()
    seq, prompt, real = torch.cat((pref, unpref)), pm.repeat(2, 1), torch.cat((pmask, umask))
    label = torch.tensor([True, False, True, False, True, True])
    kw = dict(prompt_mask=prompt, label=label, seq_mask=real, kl_seq=seq.roll(1, 0), kl_prompt_mask=prompt.roll(1, 0),
              kl_seq_mask=real.roll(1, 0))
    with_term = KTO(model, head=head, router_aux_loss_coef=COEF, **CONVENTIONS["trl"])
    assert KTO(model).router_aux_loss_coef == model.config.router_aux_loss_coef  # (None: the config's)
    without = KTO(model, head=head, router_aux_loss_coef=0.0, **CONVENTIONS["trl"])
    without.ref_model = with_term.ref_model
    results = []
    for kto in (with_term, without):
        model.zero_grad(set_to_none=True)
        out = kto(seq, return_metrics=True, **kw)
        out[0].backward()
        results.append((out, grads_of(model)))
    ((loss, metrics), got), ((plain, plain_metrics), base) = results
    model.zero_grad(set_to_none=True)
    aux = model(input_ids=seq, attention_mask=real.long(), output_router_logits=True, use_cache=False).aux_loss
    (COEF * aux).backward()
    term = grads_of(model)
    assert "aux_loss" not in plain_metrics and metrics["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-6)
    assert loss.item() == pytest.approx(plain.item() + COEF * aux.item(), rel=1e-6)
    for name in got:
        want = base.get(name, torch.zeros_like(got[name])) + term.get(name, torch.zeros_like(got[name]))
        assert rel_err(got[name], want) <= 1e-5, name
