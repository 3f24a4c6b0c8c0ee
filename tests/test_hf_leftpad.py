"""Left padding for Hugging Face models (fastdpo.models.hf, "Padding").

A batch with padding before a real token runs with ``attention_mask`` and ``position_ids``
(as ``generate`` makes them) on both routes, policy and reference, peft included; its loss,
per-sequence scores, metrics and gradients must be those of the same sequences right padded.
Right-padded and unpadded batches keep the call of ids alone.  Tiny random models, fresh random
tokens (padding slots too), odd lengths, prompts and completions of different lengths.

One ``prompt_mask`` serves both sequences of a pair, so a pair's prompts sit at the same
positions: ``"left"`` moves each pair right until its longer sequence ends at the last position
(pair 2, of equal lengths, is left padding alone; the others are padded on both sides);
``"trl"`` left-pads the prompts to the longest and right-pads the completions, as TRL lays out a
batch.  KTO's sequences are unpaired: each is left padded on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastdpo import DPO, KTO  # noqa: E402
from fastdpo.models import HFAdapter  # noqa: E402
from tests.helpers import TOL, rel_err  # noqa: E402
from tests.test_hf import CONFIGS, lora_llama, perturb, tiny  # noqa: E402

V = 97
L = 13  # odd
PROMPTS, CHOSEN, REJECTED = (3, 5, 2), (6, 2, 5), (3, 6, 5)  # pair 2: equal lengths
B = len(PROMPTS)
LAYOUTS = ("right", "left", "trl")
MODELS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"]
assert set(MODELS) <= set(CONFIGS)


def pairs(layout: str, seed: int = 3, pad_id: int | None = None):
    """(pref, unpref, prompt_mask, pref_mask, unpref_mask): the same B pairs of real tokens
    (ids >= 3) in ``layout``; padding slots hold fresh random ids, or ``pad_id``."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in PROMPTS]
    chosen = [torch.randint(3, V, (n,), generator=g) for n in CHOSEN]
    rejected = [torch.randint(3, V, (n,), generator=g) for n in REJECTED]
    seqs = torch.randint(3, V, (2, B, L), generator=g) if pad_id is None else torch.full((2, B, L), pad_id)
    masks = torch.zeros(2, B, L, dtype=torch.bool)
    pm = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        both = (torch.cat((prompts[b], chosen[b])), torch.cat((prompts[b], rejected[b])))
        shift = {"right": 0, "left": L - max(map(len, both)), "trl": max(PROMPTS) - PROMPTS[b]}[layout]
        for k, s in enumerate(both):
            seqs[k, b, shift:shift + len(s)] = s
            masks[k, b, shift:shift + len(s)] = True
        pm[b, shift:shift + PROMPTS[b]] = True
    return seqs[0], seqs[1], pm, masks[0], masks[1]


def test_the_layouts_are_what_they_say():
    _, _, pm, pmask, umask = pairs("left")
    assert pmask[0].tolist() == [False] * 4 + [True] * 9  # left padding alone
    assert umask[0].tolist() == [False] * 4 + [True] * 6 + [False] * 3  # both sides
    assert pmask[2].equal(umask[2]) and not pmask[2, 0] and pmask[2, -1]
    assert pm[1].tolist() == [False] * 2 + [True] * 5 + [False] * 6
    _, _, pm, pmask, _ = pairs("trl")
    assert pm[:, max(PROMPTS) - 1].all() and (pm.sum(1) == torch.tensor(PROMPTS)).all()
    assert not pmask[0, 0] and pmask[0, 2] and not pmask[0, -1]


def kwargs_of(data) -> dict:
    pref, unpref, pm, pmask, umask = data
    return dict(preferred_seq=pref, unpreferred_seq=unpref, prompt_mask=pm, preferred_seq_mask=pmask,
                unpreferred_seq_mask=umask)


def policy_scores(dpo: DPO, data) -> torch.Tensor:
    """The policy's (2B,) scores, through the module's own batch and scoring (no gradient)."""
    pref, unpref, pm, pmask, umask = data
    with torch.no_grad():
        batch = dpo._batch(pref, unpref, pm, pmask, umask)
        return dpo._scores(dpo.scorer.head_input(dpo.policy_model, batch), batch)


def dpo_step(dpo: DPO, model: nn.Module, data) -> dict:
    """Loss, metrics and gradients of one step, and both models' per-sequence scores."""
    model.zero_grad(set_to_none=True)
    loss, metrics = dpo(**kwargs_of(data), return_metrics=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    kw = kwargs_of(data)
    ref = torch.cat(dpo.reference_scores(kw.pop("preferred_seq"), kw.pop("unpreferred_seq"), **kw))
    return dict(loss=loss.detach(), metrics=metrics, grads=grads, ref=ref, policy=policy_scores(dpo, data))


def assert_same_step(got: dict, want: dict, loss_tol: float = 1e-6, grad_tol: float = 1e-5,
                     neutral: float = 0.6931471805599453) -> None:
    """``got`` equals ``want`` (:func:`dpo_step`'s); ``neutral``: the loss of a policy equal to
    its reference, which ``want``'s must be away from."""
    assert abs(got["loss"].item() - want["loss"].item()) <= loss_tol * abs(want["loss"].item()), (got["loss"], want["loss"])
    assert abs(want["loss"].item() - neutral) > 1e-4  # the policy is off its reference
    for key in ("ref", "policy"):
        torch.testing.assert_close(got[key], want[key], rtol=loss_tol, atol=loss_tol, msg=key)
    assert got["metrics"].keys() == want["metrics"].keys()
    for key in want["metrics"]:
        torch.testing.assert_close(got["metrics"][key], want["metrics"][key], rtol=loss_tol, atol=loss_tol, msg=key)
    assert got["grads"].keys() == want["grads"].keys() and want["grads"]
    for name in want["grads"]:
        assert rel_err(got["grads"][name], want["grads"][name]) <= grad_tol, (name, rel_err(got["grads"][name], want["grads"][name]))


class Calls:
    """The keyword arguments of every forward of a module (a pre-hook)."""

    def __init__(self, module: nn.Module):
        self.kwargs: list[dict] = []
        module.register_forward_pre_hook(lambda m, args, kw: self.kwargs.append(dict(kw)), with_kwargs=True)

    def told(self) -> list[bool]:
        """Per call: whether it got an attention mask (and then position ids too)."""
        out = []
        for kw in self.kwargs:
            has = kw.get("attention_mask") is not None
            assert has == (kw.get("position_ids") is not None), kw.keys()
            out.append(has)
        return out


# ----------------------------------------------------------------------------- equal to right padding


@pytest.mark.parametrize("layout, reduction", [("left", "mean"), ("trl", "sum")])
@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("key", MODELS)
def test_left_padded_step_equals_the_right_padded_one(key, head, layout, reduction):
    model = tiny(key)
    dpo = DPO(model, head=head, logprob_reduction=reduction, mask_alignment="target")
    perturb(model)
    policy_calls, ref_calls = Calls(model), Calls(dpo.ref_model)
    want = dpo_step(dpo, model, pairs("right"))
    assert not any(policy_calls.told() + ref_calls.told())  # right padding: the ids alone
    n = (len(policy_calls.kwargs), len(ref_calls.kwargs))
    got = dpo_step(dpo, model, pairs(layout))
    assert all(policy_calls.told()[n[0]:]) and all(ref_calls.told()[n[1]:]) and len(policy_calls.kwargs) > n[0]
    assert dpo.route(model, "cpu").kind == ("dpo_head" if head == "fused" else "logits")
    assert_same_step(got, want)


def test_the_mask_is_what_makes_them_equal(monkeypatch):
    """The comparison above can fail: the left-padded batch run as ids alone (the adapter not
    asking to be told) scores differently, for GPT2 through its learned positions too."""
    for key in ("LlamaForCausalLM", "GPT2LMHeadModel"):
        model = tiny(key)
        dpo = DPO(model, logprob_reduction="sum", mask_alignment="target")
        perturb(model)
        want = policy_scores(dpo, pairs("right"))
        with monkeypatch.context() as m:
            m.setattr(HFAdapter, "check_padding", lambda self, name, mask: False)
            blind = policy_scores(dpo, pairs("left"))
        assert (blind - want).abs().max() > 1e-3, key
        torch.testing.assert_close(policy_scores(dpo, pairs("left")), want, rtol=1e-6, atol=1e-6)


def test_pad_id_makes_left_padding_masks():
    model = tiny("LlamaForCausalLM")
    dpo = DPO(model, pad_id=0, logprob_reduction="sum", mask_alignment="target")
    perturb(model)
    want = dpo_step(dpo, model, pairs("right", pad_id=0))
    pref, unpref, pm, _, _ = pairs("left", pad_id=0)
    got = dpo_step(dpo, model, (pref, unpref, pm, None, None))
    assert_same_step(got, want)


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_lora_policy_with_its_adapters_off_as_reference(head):
    model = lora_llama()
    dpo = DPO(model, head=head, logprob_reduction="sum", mask_alignment="target")
    assert dpo.ref_model is None and dpo.has_reference()
    calls = Calls(model.get_base_model())
    want = dpo_step(dpo, model, pairs("right"))
    assert not any(calls.told())
    n = len(calls.kwargs)
    got = dpo_step(dpo, model, pairs("left"))
    assert all(calls.told()[n:]) and len(calls.kwargs) > n
    assert set(want["grads"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_same_step(got, want)


def test_bfloat16_llama_within_bf16():
    model = tiny("LlamaForCausalLM").to(torch.bfloat16)
    dpo = DPO(model, head="fused", logprob_reduction="sum", mask_alignment="target")
    perturb(model)
    want = dpo_step(dpo, model, pairs("right"))
    got = dpo_step(dpo, model, pairs("trl"))
    tol = TOL[torch.bfloat16]
    assert_same_step(got, want, loss_tol=tol, grad_tol=tol)


def test_inferred_head_is_checked_on_real_tokens():
    """A class outside HEAD_RULES is checked on its first call: on the first sequence's real
    tokens (its leading padding cut off), as ids alone; then fused, equal to right padding."""

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(tiny("LlamaForCausalLM").config)
    dpo = DPO(model, head="fused", logprob_reduction="sum", mask_alignment="target")
    perturb(model)
    right = copy.deepcopy(dpo)
    want = dpo_step(right, right.policy_model, pairs("right"))
    calls = Calls(model)
    data = pairs("left")
    got = dpo_step(dpo, model, data)
    first = calls.kwargs[0]  # the check's own-logits call
    pref, _, _, pmask, _ = data
    assert first.get("attention_mask") is None and not pmask[0, 0]
    assert first["input_ids"].equal(pref[:1][:, pmask[0]][:, :-1][:, :16])  # (L - 1 <= 16 inputs)
    assert dpo.route(model, "cpu").kind == "dpo_head" and dpo.route(model, "cpu").head.inferred
    assert [verdict.why_not for _, verdict in dpo.scorer.checked.values()] == ["", ""]
    assert_same_step(got, want)


# ----------------------------------------------------------------------------- KTO


def unpaired(layout: str, seed: int = 4):
    """seq, prompt_mask, seq_mask and the KL sequences (each prompt with the next example's
    completion) with theirs: N unpaired sequences, each left padded on its own for "left"."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (3, 6, 2, 4)]
    completions = [torch.randint(3, V, (n,), generator=g) for n in (5, 1, 7, 4)]

    def build(parts):
        seq = torch.randint(3, V, (len(parts), L), generator=g)
        mask = torch.zeros(len(parts), L, dtype=torch.bool)
        pm = torch.zeros_like(mask)
        for i, (p, c) in enumerate(parts):
            start = 0 if layout == "right" else L - len(p) - len(c)
            seq[i, start:start + len(p) + len(c)] = torch.cat((p, c))
            mask[i, start:start + len(p) + len(c)] = True
            pm[i, start:start + len(p)] = True
        return seq, pm, mask

    n = len(prompts)
    return (*build(list(zip(prompts, completions))),
            *build([(prompts[i], completions[(i + 1) % n]) for i in range(n)]))


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("key", ["LlamaForCausalLM", "GPT2LMHeadModel", "lora"])
def test_kto_left_padded_equals_right_padded(key, head):
    model = lora_llama() if key == "lora" else tiny(key)
    kto = KTO(model, head=head, logprob_reduction="sum", mask_alignment="target")
    if key != "lora":
        perturb(model)
    label = torch.tensor([True, False, True, False])
    out = {}
    for layout in ("right", "left"):
        seq, pm, mask, kl_seq, kl_pm, kl_mask = unpaired(layout)
        assert (mask[:, 0] == (layout == "right")).all()
        kw = dict(prompt_mask=pm, seq_mask=mask, kl_seq=kl_seq, kl_prompt_mask=kl_pm, kl_seq_mask=kl_mask)
        model.zero_grad(set_to_none=True)
        loss, metrics = kto(seq, label=label, **kw, return_metrics=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        ref = torch.cat(kto.reference_scores(seq, **kw))
        with torch.no_grad():  # the policy's scores of both batches (the KL one's make z0)
            batches = (kto._unpaired(seq, pm, mask), kto._unpaired(kl_seq, kl_pm, kl_mask, "kl_"))
            policy = torch.cat([kto._scores(kto.scorer.head_input(model, b), b) for b in batches])
        out[layout] = dict(loss=loss.detach(), metrics=metrics, grads=grads, ref=ref, policy=policy)
    assert_same_step(out["left"], out["right"], neutral=0.5)


def test_kto_hole_and_input_alignment_are_errors():
    kto = KTO(tiny("LlamaForCausalLM"))  # x-transformers' conventions: mask_alignment="input"
    seq, pm, mask, *_ = unpaired("left")
    with pytest.raises(ValueError, match="seq_mask has padding before a real token, which mask_alignment='input'"):
        kto(seq, prompt_mask=pm, seq_mask=mask, label=torch.ones(4, dtype=torch.bool), kl=0.0)
    holed = mask.clone()
    holed[2, -3] = False
    with pytest.raises(ValueError, match=r"seq_mask has padding between real tokens \(row 2\)"):
        KTO(tiny("LlamaForCausalLM"), mask_alignment="target")(
            seq, prompt_mask=pm, seq_mask=holed, label=torch.ones(4, dtype=torch.bool), kl=0.0)


# ----------------------------------------------------------------------------- refused, by name


def test_a_hole_is_an_error():
    dpo = DPO(tiny("LlamaForCausalLM"), mask_alignment="target")
    pref, unpref, pm, pmask, umask = pairs("left")
    holed = umask.clone()
    holed[2, L - 4] = False
    with pytest.raises(ValueError, match=r"unpreferred_seq_mask has padding between real tokens \(row 2\)"):
        dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=holed)


def test_input_alignment_refuses_left_padding_naming_why():
    """x-transformers' rule scores the token after a right-padded row's last real token, which
    the left-padded row ending at the last position does not have: the scores would differ."""
    dpo = DPO(tiny("LlamaForCausalLM"))  # mask_alignment="input", the default
    with pytest.raises(ValueError, match="preferred_seq_mask has padding before a real token, which "
                                         "mask_alignment='input' cannot score"):
        dpo(**kwargs_of(pairs("left")))
    dpo(**kwargs_of(pairs("right")))  # right padding: as before


@pytest.mark.parametrize("packing", ["pair", "batch", "share_prompt"])
def test_packing_refuses_left_padding_by_name(packing):
    kw = dict(share_prompt=True) if packing == "share_prompt" else dict(packing=packing)
    dpo = DPO(tiny("LlamaForCausalLM"), mask_alignment="target", pack_attention="segments", **kw)
    layout = "batch" if packing == "batch" else "pair"
    with pytest.raises(ValueError, match=f"packing='{layout}' packs right-padded pairs, and these have padding "
                                         f"before a real token"):
        dpo(**kwargs_of(pairs("trl")))


def test_auto_packing_runs_a_left_padded_batch_unpacked(monkeypatch):
    model = tiny("LlamaForCausalLM")
    perturb(model)
    auto = DPO(model, packing="auto", mask_alignment="target", pack_attention="segments")
    plain = DPO(model, mask_alignment="target")
    plain.ref_model = auto.ref_model
    monkeypatch.setattr("fastdpo.batching.packing.choose_layout", lambda *a, **k: "batch")  # packing always pays
    packed_right = auto(**kwargs_of(pairs("right")))
    assert auto._packing_checked == {"cpu"}  # the right-padded batch was packed
    got = auto(**kwargs_of(pairs("left")))
    torch.testing.assert_close(got, plain(**kwargs_of(pairs("left"))), rtol=0, atol=0)
    # packed (right) against unpacked (left): other products and attention calls, so equal to
    # float rounding, the 1e-6 relative every packed-against-unpacked loss test holds
    torch.testing.assert_close(got, packed_right, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- other families


def test_x_transformers_keeps_its_own_padding():
    """A TransformerWrapper gets no attention mask and no padding check, left padding included:
    x-transformers' own DPO's numbers on the same batch."""
    from x_transformers.dpo import DPO as XDPO

    from tests.helpers import tiny_transformer

    model = tiny_transformer(V, max_seq_len=L, dim=16, depth=2, heads=2)
    ours = DPO(model)
    perturb(model)
    theirs = XDPO(model)
    theirs.ref_model = ours.ref_model
    calls = Calls(model)
    data = kwargs_of(pairs("left"))
    got = ours(**data)
    assert calls.kwargs and all(set(kw) <= {"return_embeddings"} for kw in calls.kwargs), calls.kwargs
    want = theirs(**data)
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    assert abs(want.item() - 0.6931471805599453) > 1e-4
