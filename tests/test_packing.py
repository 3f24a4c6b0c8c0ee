"""DPO(packing=...): pairs packed as [prompt, chosen, rejected] (fastdpo.batching.packing), one pair a
row ("pair", alias share_prompt=True) or whole pairs first-fit into rows ("batch"), attending
by parts (fastdpo.batching.attention) or through the dense mask.

A packed step must give x-transformers' DPO's loss (1e-6 relative) and gradients (1e-5
norm-relative) on ragged batches (different prompt lengths, right padding of different lengths,
1-token prompts, empty completions, one-pair batches, a pair longer than any other) for every
positional scheme that packs, both heads, both conventions and both attentions; every model
that cannot pack must say why; and the checks must fail when the attention leaks.
"""

from __future__ import annotations

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper
from x_transformers.dpo import DPO as XDPO

import fastdpo.batching.attention
from fastdpo import DPO
from fastdpo.modules.dpo import frozen_copy
from fastdpo.batching.packing import PackedLayout, pack
from tests.helpers import rel_err, tiny_transformer
from tests.test_dpo import loss_and_grads

V, L = 61, 13
PAD = 0
POSITIONS = {
    "absolute": dict(),
    "rotary": dict(rotary_pos_emb=True),
    "alibi": dict(alibi_pos_bias=True, disable_abs_pos_emb=True),
    "flash": dict(attn_flash=True),
    "gqa": dict(rotary_pos_emb=True, attn_kv_heads=2),
    "scaled-sinusoidal": "scaled",
    "tied": "tied",
}
MODES = [("pair", "segments"), ("pair", "dense"), ("batch", "segments"), ("batch", "dense")]
MODE_IDS = [f"{a}-{b}" for a, b in MODES]


def make_model(kind: str = "absolute", seed: int = 0, **layer_kw) -> TransformerWrapper:
    spec = POSITIONS[kind]
    wrapper_kw = {}
    if spec == "scaled":
        spec, wrapper_kw = {}, dict(scaled_sinu_pos_emb=True)
    tie = spec == "tied"
    if tie:
        spec = dict(rotary_pos_emb=True)
    return tiny_transformer(V, max_seq_len=L, dim=32, depth=2, heads=4, seed=seed, tie=tie, wrapper_kw=wrapper_kw,
                            **spec, **layer_kw)


def make_batch(seed: int = 1):
    """Five ragged pairs: prompts of 3, 6, 1, 4 and 2 tokens; an unpadded pair longer than any
    other (pair 0's chosen sequence); an empty chosen completion (pair 3); padding of different
    lengths within pairs."""
    g = torch.Generator().manual_seed(seed)
    b = 5
    pref = torch.randint(1, V, (b, L), generator=g)
    unpref = torch.randint(1, V, (b, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[3], [6], [1], [4], [2]])
    unpref[pm] = pref[pm]
    unpref[0, 12:] = PAD
    pref[1, 10:] = PAD
    unpref[2, 7:] = PAD
    pref[3, 4:] = PAD
    unpref[3, 9:] = PAD
    pref[4, 5:] = PAD
    unpref[4, 6:] = PAD
    return pref, unpref, pm


def perturbed_pair(kind="absolute", **dpo_kw):
    """(x-transformers' DPO, fastdpo's packed DPO) on the same weights, the policy moved off
    the reference.  x-transformers' reference is replaced by a true copy (its own deepcopy keeps
    a tied head reading the policy's embedding)."""
    x = XDPO(make_model(kind), pad_id=PAD)
    x.ref_model = frozen_copy(x.policy_model)
    ours = DPO(make_model(kind), pad_id=PAD, **dpo_kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in x.policy_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    return x, ours


def packed_and_plain(kind: str, seed: int, dtype=torch.float32, packing="pair", **kw):
    """fastdpo's DPO packed and not, the same weights, policy off reference."""
    packed = DPO(make_model(kind).to(dtype), pad_id=PAD, packing=packing, **kw)
    kw.pop("pack_attention", None)
    kw.pop("pack_length", None)
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


@pytest.fixture
def by_parts(monkeypatch):
    """Counts the calls of attention by parts."""
    calls = []
    real = fastdpo.batching.attention.SegmentAttention.__call__
    monkeypatch.setattr(fastdpo.batching.attention.SegmentAttention, "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", [k for k in POSITIONS if k != "alibi"])
def test_packed_step_equals_x_transformers(kind, mode, by_parts):
    layout, attention = mode
    x, ours = perturbed_pair(kind, packing=layout, pack_attention=attention)
    pref, unpref, pm = make_batch()
    assert_same(loss_and_grads(ours, pref, unpref, prompt_mask=pm), loss_and_grads(x, pref, unpref, prompt_mask=pm))
    assert (len(by_parts) > 0) == (attention == "segments")


@pytest.mark.parametrize("layout", ["pair", "batch"])
def test_alibi_packs_through_the_dense_mask(layout, by_parts):
    with pytest.warns(UserWarning, match="AlibiPositionalBias adds a bias to the attention scores"):
        x, ours = perturbed_pair("alibi", packing=layout)
    assert ours.packing.attention == "dense"
    pref, unpref, pm = make_batch()
    assert_same(loss_and_grads(ours, pref, unpref, prompt_mask=pm), loss_and_grads(x, pref, unpref, prompt_mask=pm))
    assert not by_parts


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_logits_route_packs_too(mode):
    x, ours = perturbed_pair("rotary", head="logits", packing=mode[0], pack_attention=mode[1])
    pref, unpref, pm = make_batch(seed=2)
    assert_same(loss_and_grads(ours, pref, unpref, prompt_mask=pm), loss_and_grads(x, pref, unpref, prompt_mask=pm))


@pytest.mark.parametrize("pack_length", [None, 18, 200], ids=["longest-pair", "tight", "one-row"])
def test_batch_rows_of_any_length(pack_length):
    x, ours = perturbed_pair("rotary", packing="batch", pack_length=pack_length)
    pref, unpref, pm = make_batch(seed=3)
    assert_same(loss_and_grads(ours, pref, unpref, prompt_mask=pm), loss_and_grads(x, pref, unpref, prompt_mask=pm))


@pytest.mark.parametrize("layout", ["pair", "batch"])
@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "bco_pair", "hinge"])
def test_other_losses_trl_conventions_and_metrics(loss_type, layout):
    kw = dict(loss_type=loss_type, logprob_reduction="sum", mask_alignment="target")
    if loss_type == "bco_pair":
        kw["bco_delta"] = "batch"  # couples pairs: the "scores" route
    pref, unpref, pm = make_batch(seed=3)
    packed, plain = packed_and_plain("rotary", 8, packing=layout, **kw)
    assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    _, m1 = packed(pref, unpref, prompt_mask=pm, return_metrics=True)
    _, m2 = plain(pref, unpref, prompt_mask=pm, return_metrics=True)
    assert m1.keys() == m2.keys()
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("layout", ["pair", "batch"])
def test_precomputed_reference_scores_reference_scores_and_evaluation(layout):
    x, ours = perturbed_pair("absolute", packing=layout)
    pref, unpref, pm = make_batch(seed=4)
    w, l = ours.reference_scores(pref, unpref, prompt_mask=pm)
    plain = DPO(make_model("absolute"), pad_id=PAD)
    plain.ref_model.load_state_dict(ours.ref_model.state_dict())
    plain.policy_model.load_state_dict(ours.policy_model.state_dict())
    pw, pl = plain.reference_scores(pref, unpref, prompt_mask=pm)
    torch.testing.assert_close(w, pw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l, pl, rtol=1e-6, atol=1e-6)
    assert_same(
        loss_and_grads(ours, pref, unpref, prompt_mask=pm, ref_preferred_logprob=w, ref_unpreferred_logprob=l),
        loss_and_grads(x, pref, unpref, prompt_mask=pm),
    )
    with torch.no_grad():  # evaluation: forward only
        a, b = ours(pref, unpref, prompt_mask=pm), plain(pref, unpref, prompt_mask=pm)
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())


@pytest.mark.parametrize("layout", ["pair", "batch"])
def test_padding_contents_change_nothing(layout):
    """What padding holds is never read -- except, in x-transformers' input alignment, the
    first padding token, which is the target of the last real one (x-transformers' rule)."""
    _, ours = perturbed_pair("rotary", packing=layout)
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


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_edge_pairs_empty_completions_one_token_prompts_one_pair(mode):
    pref, unpref, pm = make_batch(seed=10)
    pm = torch.arange(L)[None] < torch.tensor([[1], [4], [2], [1], [3]])
    unpref[pm] = pref[pm]
    unpref[1, 4:] = PAD  # an empty rejected completion
    pref[2, 2:] = PAD  # an empty chosen completion
    for conv in (dict(), dict(logprob_reduction="sum", mask_alignment="target")):
        packed, plain = packed_and_plain("rotary", 11, packing=mode[0], pack_attention=mode[1], **conv)
        for rows in (slice(None), slice(1, 2), slice(2, 3)):  # the batch, and one pair alone
            args = (pref[rows], unpref[rows])
            assert_same(loss_and_grads(packed, *args, prompt_mask=pm[rows]),
                        loss_and_grads(plain, *args, prompt_mask=pm[rows]))


@pytest.mark.parametrize("layout", ["pair", "batch"])
def test_bfloat16_packed_is_as_close_to_float32_as_unpacked(layout):
    """Three-way: against the float32 unpacked step, the packed bf16 step errs about as much as
    the unpacked bf16 step does.  Not bit for bit: attention by parts computes in float32 what
    x-transformers' attention computes in bf16 with a float32 softmax, and a shared prompt's
    gradient sums two parts, so the roundings differ (per parameter, packed/unpacked error
    ratios of 0.6-1.3 over four seeds); a leak would be O(1)."""
    pref, unpref, pm = make_batch(seed=12)

    def build(dtype, packs):
        dpo = packed_and_plain("rotary", 13, dtype, packing=layout)[0 if packs else 1]
        return loss_and_grads(dpo, pref, unpref, prompt_mask=pm)

    l32, g32 = build(torch.float32, False)
    (lp, gp), (lu, gu) = build(torch.bfloat16, True), build(torch.bfloat16, False)
    assert abs(lp.item() - l32.item()) <= 1.5 * abs(lu.item() - l32.item()) + 1e-3 * abs(l32.item())
    for n in g32:
        assert rel_err(gp[n], g32[n]) <= 1.5 * rel_err(gu[n], g32[n]) + 1e-3, n


# ----------------------------------------------------------------------------- the checks bite


def _leaky_parts(self, q, k, v, scale, dropout_p, window):
    """Causal attention over the whole packed row: no block diagonal (pairs see each other,
    rejected parts see chosen ones)."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.masked_fill((self.layout.seg == 3)[:, None, :, None], 0.0)


def _rejected_sees_chosen(self):
    """The dense mask with the chosen part visible to the rejected one."""
    same = self.pair[:, :, None] == self.pair[:, None, :]
    return (same | (self.seg[:, :, None] == 3))[:, None]


def _leak(attention: str, monkeypatch) -> None:
    """Make the packed attention leak: by parts, causal over the whole row; dense, the
    rejected part seeing the chosen one."""
    if attention == "segments":
        monkeypatch.setattr(fastdpo.batching.attention.SegmentAttention, "_parts", _leaky_parts)
    else:
        monkeypatch.setattr(PackedLayout, "attn_mask", property(_rejected_sees_chosen))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_leaking_attention_fails_the_parity_check(mode, monkeypatch):
    """The parity check above fails when the packed attention leaks: by parts, causal over the
    whole row; dense, the rejected part seeing the chosen one."""
    layout, attention = mode
    _leak(attention, monkeypatch)
    x, ours = perturbed_pair("rotary", packing=layout, pack_attention=attention)
    ours._packing_checked.add("cpu")  # (the first-call check would refuse the leak first)
    pref, unpref, pm = make_batch()
    with pytest.raises(AssertionError):
        assert_same(loss_and_grads(ours, pref, unpref, prompt_mask=pm), loss_and_grads(x, pref, unpref, prompt_mask=pm))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_the_first_call_refuses_a_leaking_attention(mode, monkeypatch):
    layout, attention = mode
    _leak(attention, monkeypatch)
    _, ours = perturbed_pair("rotary", packing=layout, pack_attention=attention)
    pref, unpref, pm = make_batch()
    with pytest.raises(ValueError, match="hidden states change when pairs are packed"):
        ours(pref, unpref, prompt_mask=pm)


# ----------------------------------------------------------------------------- the layout


def test_layouts():
    pref, unpref, pm = make_batch()
    args = (pref, unpref, pm, pref != PAD, unpref != PAD)
    real = (pref != PAD).sum(1) + (unpref != PAD).sum(1) - pm.sum(1)
    one = pack(*args, layout="pair")
    assert one.length == int(real.max()) and one.tokens.shape == (5, one.length)
    assert [s.pair for s in one.spans] == list(range(5)) and all(s.start == 0 for s in one.spans)
    many = pack(*args, layout="batch")
    assert many.length <= int(real.max()) and many.tokens.shape[0] < 5
    assert many.real_tokens == one.real_tokens == int(real.sum())
    # first-fit decreasing: no row could take a pair placed in a later row
    fill = [0] * many.tokens.shape[0]
    for s in many.spans:
        fill[s.row] = max(fill[s.row], s.start + s.length)
    for s in many.spans:
        assert all(fill[r] + s.length > many.length for r in range(s.row))
    for packed in (one, many):  # each sequence's real tokens and positions, read back, are its own
        seq = torch.cat((pref, unpref))[:, :-1]
        keep = torch.cat((pref != PAD, unpref != PAD))[:, :-1]
        assert torch.equal(packed.tokens.reshape(-1)[packed.rows][keep], seq[keep])
        assert torch.equal(packed.pos.reshape(-1)[packed.rows][keep], torch.arange(L - 1).expand(10, -1)[keep])
    short = pack(*args, layout="batch", pack_length=12)  # pairs longer than a row: a row each
    assert short.tokens.shape == (5, int(real.max()))
    assert sorted(s.row for s in short.spans) == list(range(5))


def test_what_the_packed_padding_holds_is_never_seen():
    """The slots after a row's last pair are seen by no real token."""
    from fastdpo.models import adapter_for

    model = make_model("rotary").eval()
    pref, unpref, pm = make_batch(seed=9)
    kw = (pref, unpref, pm, pref != PAD, unpref != PAD)
    keep = torch.cat((pref != PAD, unpref != PAD))[:, :-1]
    for attention in ("segments", "dense"):
        a = pack(*kw, pad_token=0, attention=attention)
        b = pack(*kw, pad_token=V - 1, attention=attention)
        assert not torch.equal(a.tokens, b.tokens)
        with torch.no_grad():
            ha, hb = (adapter_for(model).hidden(p.tokens, p) for p in (a, b))
        d = ha.shape[-1]
        assert torch.equal(ha.reshape(-1, d)[a.rows][keep], hb.reshape(-1, d)[b.rows][keep])


# ----------------------------------------------------------------------------- auto


def test_auto_packs_when_it_pays_and_equals_unpacked(monkeypatch):
    """packing="auto" packs the batches packing.choose_layout says pay, with the unpacked
    step's numbers, and runs the others (short pairs, a batch that cannot pack) unpacked."""
    from fastdpo.batching import packing as layout

    pref, unpref, pm = make_batch(seed=14)
    packed, plain = packed_and_plain("rotary", 15, packing="auto")
    seen = []
    real = layout.choose_layout
    monkeypatch.setattr(layout, "choose_layout", lambda *a: seen.append(real(*a)) or seen[-1])
    assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    assert seen == ["none"]  # pairs of ~15 tokens: the fixed costs would not be paid back
    monkeypatch.setattr(layout, "PACK_OVERHEAD", 0.0)  # as if the pairs were long
    assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    assert seen[-1] == "batch"
    bad = unpref.clone()
    bad[1, 2] = pref[1, 2] % (V - 1) + 1  # prompts differ: this batch cannot pack, auto runs it unpacked
    assert_same(loss_and_grads(packed, pref, bad, prompt_mask=pm), loss_and_grads(plain, pref, bad, prompt_mask=pm))
    assert seen[-1] == "none"


@pytest.mark.parametrize("b, l, lengths, expected", [
    (32, 32, ([6] * 32, [32] * 32, [32] * 32), "none"),  # short pairs: fixed costs dominate
    (8, 256, ([51] * 8, [256] * 8, [256] * 8), "batch"),  # 20% prompts, long pairs
    (4, 512, ([1] * 4, [512] * 4, [512] * 4), "none"),  # nothing to save
    (16, 128, ([10] * 16, [40] * 16, [30] * 16), "batch"),  # mostly padding
])
def test_auto_rule(b, l, lengths, expected):
    from fastdpo.batching import packing as layout

    assert layout.choose_layout((b, l), lengths, "segments", torch.device("cpu")) == expected
    assert layout.choose_layout((b, l), None, "segments", torch.device("cpu")) == "none"


# ----------------------------------------------------------------------------- bad input


def test_pairs_that_cannot_pack_are_errors():
    _, ours = perturbed_pair(packing="batch")
    pref, unpref, pm = make_batch()
    bad = unpref.clone()
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


def test_bad_packing_arguments():
    with pytest.raises(TypeError, match="share_prompt must be a bool"):
        DPO(make_model(), share_prompt="yes")
    with pytest.raises(ValueError, match="packing must be one of"):
        DPO(make_model(), packing="rows")
    with pytest.raises(ValueError, match="pack_attention must be one of"):
        DPO(make_model(), packing="batch", pack_attention="flex")
    with pytest.raises(ValueError, match="pack_length must be an int >= 2 or None"):
        DPO(make_model(), packing="batch", pack_length=1.5)
    with pytest.raises(ValueError, match="pack_length is for packing='batch' or 'auto'"):
        DPO(make_model(), packing="pair", pack_length=40)
    with pytest.raises(ValueError, match="share_prompt=True is packing='pair'; it contradicts packing='batch'"):
        DPO(make_model(), share_prompt=True, packing="batch")
    with pytest.raises(ValueError, match="attention by parts .* cannot stand in .* AlibiPositionalBias"):
        DPO(make_model("alibi"), packing="batch", pack_attention="segments")
    assert DPO(make_model(), share_prompt=True).packing.layout == "pair"


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
        (lambda: TransformerWrapper(num_tokens=V, max_seq_len=L,
                                    attn_layers=Decoder(dim=32, depth=1, heads=2, attn_max_attend_past=4)),
         "its attention.s max_attend_past is measured along the sequence"),
    ],
    ids=["memory-tokens", "t5-relative-bias", "abs-plus-alibi", "recurrent", "max-attend-past"],
)
@pytest.mark.parametrize("layout", ["pair", "batch"])
def test_models_that_cannot_pack_raise_naming_why(build, reason, layout):
    with pytest.raises(ValueError, match=f"packing='{layout}' but this model cannot run packed pairs: {reason}"):
        DPO(build(), packing=layout)
    assert DPO(build(), packing="auto").packing.layout == "none"  # auto: never packs it


@pytest.mark.parametrize("layer_kw, reason", [
    (dict(attn_pre_talking_heads=True), "its attention uses pre_softmax_talking_heads"),
    (dict(attn_sparse_topk=2), "other than a softmax"),
    (dict(attn_num_mem_kv=2), "memory key/values"),
    (dict(residual_attn=True), "residual attention"),
])
def test_attentions_by_parts_cannot_reproduce_fall_back_to_dense(layer_kw, reason):
    model = TransformerWrapper(num_tokens=V, max_seq_len=L, attn_layers=Decoder(dim=32, depth=1, heads=2, **layer_kw))
    with pytest.warns(UserWarning, match=reason):
        dpo = DPO(model, pad_id=PAD, packing="batch")
    assert dpo.packing.attention == "dense"


def test_a_feature_that_breaks_packing_is_caught_on_the_first_call():
    """Token shift mixes each token with the one before it in the sequence: the first rejected
    token would mix with the last chosen one.  No static rule names it; the first call's check
    of two pairs, packed against unpacked, does."""
    model = TransformerWrapper(num_tokens=V, max_seq_len=L,
                               attn_layers=Decoder(dim=32, depth=1, heads=2, shift_tokens=1))
    dpo = DPO(model, pad_id=PAD, packing="batch")
    pref, unpref, pm = make_batch()
    with pytest.raises(ValueError, match="hidden states change when pairs are packed"):
        dpo(pref, unpref, prompt_mask=pm)


# ----------------------------------------------------------------------------- Hugging Face

HF_PACKABLE = ["LlamaForCausalLM", "LlamaForCausalLM-tied", "Qwen2ForCausalLM", "MistralForCausalLM",
               "MistralForCausalLM-window", "GemmaForCausalLM", "Gemma2ForCausalLM-window", "Gemma3ForCausalLM-window",
               "CohereForCausalLM", "GPT2LMHeadModel", "lora"]


def _hf_model(key, attn):
    from tests.test_hf import lora_llama, tiny

    if key == "lora":
        return lora_llama()
    if key.endswith("-window"):  # a window shorter than the sequences (Gemma 2: every other layer)
        extra = dict(attn_logit_softcapping=None) if key.startswith("Gemma2") else {}
        return tiny(key.removesuffix("-window"), attn_implementation=attn, sliding_window=3, **extra)
    return tiny(key, attn_implementation=attn)


@pytest.mark.parametrize("layout", ["pair", "batch"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", HF_PACKABLE)
def test_hugging_face_packed_step_equals_unpacked(key, attn, layout, by_parts):
    """Hugging Face models attend by parts (an AttentionInterface function) with the positions
    as position_ids; with a peft LoRA model the reference (adapters off) packs too."""
    pytest.importorskip("transformers")
    from tests.test_hf import perturb

    if key == "lora" and attn == "eager":
        pytest.skip("the LoRA model is built with SDPA")
    if key.startswith("Gemma2") and attn == "sdpa":
        pytest.skip("transformers builds Gemma 2 with eager attention only")
    model = _hf_model(key, attn)
    packed, plain = DPO(model, pad_id=PAD, packing=layout), DPO(model, pad_id=PAD)
    if plain.ref_model is not None:
        plain.ref_model.load_state_dict(packed.ref_model.state_dict())
    perturb(model, seed=3)
    hv = 97
    g = torch.Generator().manual_seed(14)
    pref, unpref = torch.randint(3, hv, (4, L), generator=g), torch.randint(3, hv, (4, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[2], [5], [3], [1]])
    unpref[pm] = pref[pm]
    pref[1, 9:] = PAD
    unpref[2, 7:] = PAD
    unpref[3, 4:] = PAD
    for conv in ({}, dict(logprob_reduction="sum", mask_alignment="target")):
        for dpo in (packed, plain):
            dpo.logprob_reduction, dpo.mask_alignment = conv.get("logprob_reduction", "mean"), conv.get("mask_alignment", "input")
        assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    assert packed.route(model, "cpu").kind == "dpo_head"
    assert packed.packing.attention == "segments" and by_parts
    assert model.config._attn_implementation == (attn if key != "lora" else "sdpa")  # switched back


@pytest.mark.parametrize("key", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_hugging_face_dense_mask_fallback(key, by_parts):
    pytest.importorskip("transformers")
    from tests.test_hf import perturb, tiny

    model = tiny(key, attn_implementation="eager")
    packed, plain = DPO(model, pad_id=PAD, packing="batch", pack_attention="dense"), DPO(model, pad_id=PAD)
    plain.ref_model.load_state_dict(packed.ref_model.state_dict())
    perturb(model, seed=4)
    pref, unpref, pm = make_batch(seed=15)
    assert_same(loss_and_grads(packed, pref, unpref, prompt_mask=pm), loss_and_grads(plain, pref, unpref, prompt_mask=pm))
    assert not by_parts


def test_hugging_face_models_that_cannot_pack_say_why():
    pytest.importorskip("transformers")
    from tests.test_hf import tiny

    with pytest.raises(ValueError, match=r"the dense mask cannot carry its packed pairs \(it uses sliding-window attention \(sliding_window=4096\)"):
        DPO(tiny("MistralForCausalLM"), packing="batch", pack_attention="dense")
    with pytest.raises(ValueError, match=r"caps its attention scores with a tanh .* sliding-window attention"):
        DPO(tiny("Gemma2ForCausalLM"), packing="batch")
    model = tiny("LlamaForCausalLM")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2' takes no 4-D mask"):
        DPO(model, packing="batch", pack_attention="dense")
    assert DPO(model, packing="batch").packing.attention == "segments"  # by parts replaces it
