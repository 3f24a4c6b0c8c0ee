"""The TRL harness (tests/trl_harness.py) is what it says: its stub head returns what TRL's
own fused LM head returns for the same model, and TRL's ``_compute_loss`` run on it gives the
DPO loss written out by hand (so a test that compares fastdpo with the harness compares it with
TRL, not with a broken stub)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from tests.trl_harness import _FusedHeadStub, trl_batch, trl_dpo_loss  # noqa: E402

V, B, L = 97, 3, 11


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    pref, unpref = torch.randint(3, V, (B, L), generator=g), torch.randint(3, V, (B, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[2], [4], [3]])
    pmask, umask = torch.ones(B, L, dtype=torch.bool), torch.ones(B, L, dtype=torch.bool)
    pmask[1, -3:] = False
    umask[2, -2:] = False
    return trl_batch(pref, unpref, pm, pmask, umask)


def test_stub_head_returns_what_trls_fused_head_returns():
    from trl.trainer.utils import add_fused_lm_head

    model = llama()
    ids, completion, attention = batch()
    fused = copy.deepcopy(model)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    add_fused_lm_head(fused, outputs=fields)
    labels = ids.masked_fill(completion == 0, -100)  # as _compute_loss builds them
    stub = _FusedHeadStub(lambda i, a: model(input_ids=i, attention_mask=a).logits, torch.float32, None)
    kw = dict(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
    with torch.no_grad():
        theirs, ours = fused(**kw), stub(**kw)
    assert theirs.log_probs.shape == (2 * B, L - 1)
    for f in fields:
        a, b = getattr(theirs, f), getattr(ours, f)
        assert a.shape == b.shape and a.dtype == b.dtype, f
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6, msg=f)
    assert (ours.log_probs != 0).sum() == (labels[:, 1:] != -100).sum()


def test_trls_sigmoid_loss_through_the_harness_is_dpo_by_hand():
    policy, reference = llama(0), llama(1)
    ids, completion, attention = batch()

    def logits(m):
        return lambda i, a: m(input_ids=i, attention_mask=a).logits

    loss = trl_dpo_loss(logits(policy), logits(reference), ids, completion, attention, beta=0.3)
    loss.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}

    policy.zero_grad()
    mask = completion[:, 1:].bool()

    def sums(m):
        lp = m(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
        return (lp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum(-1)

    with torch.no_grad():
        ref = sums(reference)
    pol = sums(policy)
    expected = -F.logsigmoid(0.3 * ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:]))).mean()
    expected.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)

    # precomputed reference log-probs (TRL's precompute_ref_log_probs) give the same loss
    again = trl_dpo_loss(logits(policy), None, ids, completion, attention, beta=0.3,
                         ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=0)


def test_harness_refuses_unknown_options():
    ids, completion, _ = batch()
    z = torch.randn(2 * B, L, V, dtype=torch.float64)
    with pytest.raises(TypeError, match="not DPOConfig fields"):
        trl_dpo_loss(z, z, ids, completion, betta=0.1)
