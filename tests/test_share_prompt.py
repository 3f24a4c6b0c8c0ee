"""DPO(share_prompt=True): each pair as one packed sequence (fastdpo.packing).

The packed step must give x-transformers' DPO's loss (1e-6 relative) and gradients (1e-5
norm-relative) on fresh random inputs with odd shapes, padding and different prompt lengths,
for every positional scheme that packs, both heads and both conventions; every model that
cannot pack must say why.
"""

from __future__ import annotations

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper
from x_transformers.dpo import DPO as XDPO

from fastdpo import DPO
from fastdpo.packing import pack
from tests.helpers import rel_err, tiny_transformer
from tests.test_dpo import loss_and_grads

V, B, L = 61, 3, 13
PAD = 0
POSITIONS = {
    "absolute": dict(),
    "rotary": dict(rotary_pos_emb=True),
    "alibi": dict(alibi_pos_bias=True, disable_abs_pos_emb=True),
    "flash": dict(attn_flash=True),
    "scaled-sinusoidal": "scaled",
}


def make_model(kind: str = "absolute", seed: int = 0, **layer_kw) -> TransformerWrapper:
    spec = POSITIONS[kind]
    wrapper_kw = {}
    if spec == "scaled":
        spec, wrapper_kw = {}, dict(scaled_sinu_pos_emb=True)
    return tiny_transformer(V, max_seq_len=L, dim=32, depth=2, heads=4, seed=seed, wrapper_kw=wrapper_kw, **spec, **layer_kw)


def make_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pref = torch.randint(1, V, (B, L), generator=g)
    unpref = torch.randint(1, V, (B, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[3], [6], [1]])
    unpref[pm] = pref[pm]
    pref[1, 10:] = PAD  # right padding, different lengths in a pair
    unpref[2, 7:] = PAD
    unpref[0, 12:] = PAD
    return pref, unpref, pm


def pair(kind="absolute", **dpo_kw):
    """(x-transformers' DPO, fastdpo's packed DPO) on the same weights, the policy moved off
    the reference."""
    x = XDPO(make_model(kind), pad_id=PAD)
    ours = DPO(make_model(kind), pad_id=PAD, share_prompt=True, **dpo_kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in x.policy_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    return x, ours


def packed_and_plain(kind: str, seed: int, dtype=torch.float32, **kw):
    """fastdpo's DPO with and without share_prompt, the same weights, policy off reference."""
    packed = DPO(make_model(kind).to(dtype), pad_id=PAD, share_prompt=True, **kw)
    plain = DPO(make_model(kind).to(dtype), pad_id=PAD, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(packed.policy_model.parameters(), plain.policy_model.parameters()):
            a.add_((0.1 * torch.randn(a.shape, generator=g)).to(a.dtype))
            b.copy_(a)
    return packed, plain


def assert_same(got, want):
    (lg, gg), (lw, gw) = got, want
    assert abs(lg.item() - lw.item()) <= 1e-6 * abs(lw.item()), (lg.item(), lw.item())
    assert gg.keys() == gw.keys()
    for n in gw:
        assert rel_err(gg[n], gw[n]) <= 1e-5, (n, rel_err(gg[n], gw[n]))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("head", ["auto", "logits"])
@pytest.mark.parametrize("kind", list(POSITIONS))
def test_packed_step_equals_x_transformers(kind, head):
    x, ours = pair(kind, head=head)
    pref, unpref, pm = make_batch()
    assert_same(loss_and_grads(ours, pref, unpref, prompt_mask=pm), loss_and_grads(x, pref, unpref, prompt_mask=pm))


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "bco_pair", "hinge"])
def test_packed_step_equals_unpacked_for_other_losses_and_trl_conventions(loss_type):
    kw = dict(loss_type=loss_type, logprob_reduction="sum", mask_alignment="target")
    if loss_type == "bco_pair":
        kw["bco_delta"] = "batch"  # couples pairs: the "scores" route
    pref, unpref, pm = make_batch(seed=3)
    packed, plain = packed_and_plain("rotary", 8, **kw)
    assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    # metrics too
    _, m1 = packed(pref, unpref, prompt_mask=pm, return_metrics=True)
    _, m2 = plain(pref, unpref, prompt_mask=pm, return_metrics=True)
    assert m1.keys() == m2.keys()
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6, msg=k)


def test_precomputed_reference_scores_and_reference_scores():
    x, ours = pair("absolute")
    pref, unpref, pm = make_batch(seed=4)
    w, l = ours.reference_scores(pref, unpref, prompt_mask=pm)
    plain = DPO(make_model("absolute"), pad_id=PAD)
    plain.ref_model.load_state_dict(ours.ref_model.state_dict())
    pw, pl = plain.reference_scores(pref, unpref, prompt_mask=pm)
    torch.testing.assert_close(w, pw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l, pl, rtol=1e-6, atol=1e-6)
    assert_same(
        loss_and_grads(ours, pref, unpref, prompt_mask=pm, ref_preferred_logprob=w, ref_unpreferred_logprob=l),
        loss_and_grads(x, pref, unpref, prompt_mask=pm),
    )


def test_padding_contents_change_nothing():
    """What padding holds is never read -- except, in x-transformers' input alignment, the
    first padding token, which is the target of the last real one (x-transformers' rule)."""
    _, ours = pair("rotary")
    pref, unpref, pm = make_batch(seed=5)
    kw = dict(prompt_mask=pm, preferred_seq_mask=pref != PAD, unpreferred_seq_mask=unpref != PAD)
    a = ours(pref, unpref, **kw)
    g = torch.Generator().manual_seed(6)
    p2, u2 = pref.clone(), unpref.clone()
    for new, old in ((p2, pref), (u2, unpref)):
        pad = old == PAD
        later = pad & torch.cat((torch.zeros_like(pad[:, :1]), pad[:, :-1]), 1)  # not the first pad
        new[later] = torch.randint(1, V, (int(later.sum()),), generator=g)
    assert not torch.equal(p2, pref) and not torch.equal(u2, unpref)
    b = ours(p2, u2, **kw)
    assert torch.equal(a, b)
    assert a.item() != pytest.approx(0.6931471805599453)  # the policy is off its reference


def test_packing_saves_the_prompt():
    pref, unpref, pm = make_batch()
    packed = pack(pref, unpref, pm, pref != PAD, unpref != PAD)
    real = (pref != PAD).sum(1) + (unpref != PAD).sum(1) - pm.sum(1)
    assert packed.length == int(real.max())
    assert packed.tokens.shape == (B, packed.length)
    # each sequence's real tokens, read back through the row map, are its own
    flat = packed.tokens.reshape(-1)
    seq = torch.cat((pref, unpref))[:, :-1]
    keep = torch.cat((pref != PAD, unpref != PAD))[:, :-1]
    assert torch.equal(flat[packed.rows][keep], seq[keep])


# ----------------------------------------------------------------------------- bad input


def test_pairs_that_cannot_pack_are_errors():
    _, ours = pair()
    pref, unpref, pm = make_batch()
    bad = unpref.clone()
    bad[1, 2] = (bad[1, 2] % (V - 1)) + 1 if bad[1, 2] != pref[1, 2] else bad[1, 2]
    bad[1, 2] = pref[1, 2] % (V - 1) + 1
    with pytest.raises(ValueError, match="cannot pack pair 1: its preferred and unpreferred prompts differ"):
        ours(pref, bad, prompt_mask=pm)
    holed = pm.clone()
    holed[1, 1] = False
    with pytest.raises(ValueError, match="cannot pack pair 1: its prompt_mask is not a prefix"):
        ours(pref, unpref, prompt_mask=holed)
    left = pref.clone()
    left[0, 4] = PAD
    with pytest.raises(ValueError, match="cannot pack pair 0: its sequence masks are not right padding"):
        ours(left, unpref, prompt_mask=pm)


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: TransformerWrapper(num_tokens=V, max_seq_len=L, num_memory_tokens=2,
                                    attn_layers=Decoder(dim=32, depth=1, heads=2)), "it has memory tokens"),
        (lambda: TransformerWrapper(num_tokens=V, max_seq_len=L,
                                    attn_layers=Decoder(dim=32, depth=1, heads=2, rel_pos_bias=True)),
         "its RelativePositionBias takes no custom positions"),
        (lambda: TransformerWrapper(num_tokens=V, max_seq_len=L,
                                    attn_layers=Decoder(dim=32, depth=1, heads=2, alibi_pos_bias=True)),
         "it adds an absolute positional embedding"),
        (lambda: TransformerWrapper(num_tokens=V, max_seq_len=L, max_mem_len=4,
                                    attn_layers=Decoder(dim=32, depth=1, heads=2)), "it is recurrent"),
    ],
    ids=["memory-tokens", "t5-relative-bias", "abs-plus-alibi", "recurrent"],
)
def test_models_that_cannot_pack_raise_naming_why(build, reason):
    with pytest.raises(ValueError, match=f"share_prompt=True but this model cannot share its prompt: {reason}"):
        DPO(build(), share_prompt=True)


def test_a_feature_that_breaks_packing_is_caught_on_the_first_call():
    """Token shift mixes each token with the one before it in the sequence: the first rejected
    token would mix with the last chosen one.  No static rule names it; the first call's check
    of one pair, packed against unpacked, does."""
    model = TransformerWrapper(num_tokens=V, max_seq_len=L,
                               attn_layers=Decoder(dim=32, depth=1, heads=2, shift_tokens=1))
    dpo = DPO(model, pad_id=PAD, share_prompt=True)
    pref, unpref, pm = make_batch()
    with pytest.raises(ValueError, match="hidden states change when a pair is packed"):
        dpo(pref, unpref, prompt_mask=pm)


HF_PACKABLE = ["LlamaForCausalLM", "LlamaForCausalLM-tied", "Qwen2ForCausalLM", "GemmaForCausalLM",
               "CohereForCausalLM", "GPT2LMHeadModel", "LlamaForCausalLM-eager", "lora"]


@pytest.mark.parametrize("key", HF_PACKABLE)
def test_hugging_face_packed_step_equals_unpacked(key):
    """Hugging Face models take the packed mask as a 4-D additive attention_mask and the
    positions as position_ids; with a peft LoRA model the reference (adapters off) packs too."""
    pytest.importorskip("transformers")
    from tests.test_hf import lora_llama, perturb, tiny

    hv = 97
    if key == "lora":
        model = lora_llama()
    elif key.endswith("-eager"):
        model = tiny(key.removesuffix("-eager"), attn_implementation="eager")
    else:
        model = tiny(key)
    packed, plain = DPO(model, pad_id=PAD, share_prompt=True), DPO(model, pad_id=PAD)
    if plain.ref_model is not None:
        plain.ref_model.load_state_dict(packed.ref_model.state_dict())
    perturb(model, seed=3)
    g = torch.Generator().manual_seed(14)
    pref, unpref = torch.randint(3, hv, (B, L), generator=g), torch.randint(3, hv, (B, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[2], [5], [3]])
    unpref[pm] = pref[pm]
    pref[1, 9:] = PAD
    unpref[2, 7:] = PAD
    for conv in ({}, dict(logprob_reduction="sum", mask_alignment="target")):
        for dpo in (packed, plain):
            dpo.logprob_reduction, dpo.mask_alignment = conv.get("logprob_reduction", "mean"), conv.get("mask_alignment", "input")
        assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    assert packed.route(model, "cpu").kind == "pair"


def test_hugging_face_models_that_cannot_pack_say_why():
    pytest.importorskip("transformers")
    from tests.test_hf import tiny

    with pytest.raises(ValueError, match=r"sliding-window attention \(sliding_window=4096\)"):
        DPO(tiny("MistralForCausalLM"), share_prompt=True)
    with pytest.raises(ValueError, match="sliding-window attention"):
        DPO(tiny("Gemma2ForCausalLM"), share_prompt=True)
    model = tiny("LlamaForCausalLM")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2' takes no 4-D mask"):
        DPO(model, share_prompt=True)


def test_share_prompt_must_be_a_bool():
    with pytest.raises(TypeError, match="share_prompt must be a bool"):
        DPO(make_model(), share_prompt="yes")


def test_what_the_packed_padding_holds_is_never_seen():
    """The slots after a shorter pair's packed tokens are seen by no real token."""
    from fastdpo.models import adapter_for
    from fastdpo.packing import run

    model = make_model("rotary").eval()
    pref, unpref, pm = make_batch(seed=9)
    kw = (pref, unpref, pm, pref != PAD, unpref != PAD)
    a, b = pack(*kw, pad_token=0), pack(*kw, pad_token=V - 1)
    assert not torch.equal(a.tokens, b.tokens)
    with torch.no_grad():
        ha, hb = run(adapter_for(model), a, hidden=True), run(adapter_for(model), b, hidden=True)
    keep = torch.cat((pref != PAD, unpref != PAD))[:, :-1]
    assert torch.equal(ha[keep], hb[keep])


def test_edge_pairs_empty_completions_one_token_prompts_one_pair():
    pref, unpref, pm = make_batch(seed=10)
    pm = torch.arange(L)[None] < torch.tensor([[1], [4], [2]])
    unpref[pm] = pref[pm]
    unpref[1, 4:] = PAD  # an empty rejected completion
    pref[2, 2:] = PAD  # an empty chosen completion
    for conv in (dict(), dict(logprob_reduction="sum", mask_alignment="target")):
        packed, plain = packed_and_plain("absolute", 11, **conv)
        for rows in (slice(None), slice(1, 2)):  # the batch, and one pair alone
            args = (pref[rows], unpref[rows])
            assert_same(loss_and_grads(packed, *args, prompt_mask=pm[rows]),
                        loss_and_grads(plain, *args, prompt_mask=pm[rows]))


def test_bfloat16_packed_is_as_close_to_float32_as_unpacked():
    """Three-way: against the float32 unpacked step, the packed bf16 step errs no more than
    the unpacked bf16 step does (plus 1e-3)."""
    pref, unpref, pm = make_batch(seed=12)

    def build(dtype, share):
        dpo = packed_and_plain("rotary", 13, dtype)[0 if share else 1]
        return loss_and_grads(dpo, pref, unpref, prompt_mask=pm)

    l32, g32 = build(torch.float32, False)
    (lp, gp), (lu, gu) = build(torch.bfloat16, True), build(torch.bfloat16, False)
    assert abs(lp.item() - l32.item()) <= abs(lu.item() - l32.item()) + 1e-3 * abs(l32.item())
    for n in g32:
        assert rel_err(gp[n], g32[n]) <= rel_err(gu[n], g32[n]) + 1e-3, n
