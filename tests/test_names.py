"""Public names renamed so that each word has one meaning keep their earlier names for one
release, with a DeprecationWarning: the route kinds ("pair" is now "dpo_head", "scores" is now
"fused": "pair" means a preference pair only) and ``sequence_logprobs_pair`` (now
``sequence_logprobs_with_reference``: the policy's and the reference's logits)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

import fastdpo
from fastdpo._checks import YES, Verdict, no
from fastdpo.scoring.router import RouteKind


def test_route_kinds_are_their_new_names():
    assert [k.value for k in RouteKind] == ["dpo_head", "fused", "logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names compare without a warning
        assert RouteKind.DPO_HEAD == "dpo_head" and RouteKind.FUSED == "fused" and RouteKind.LOGITS == "logits"
        assert RouteKind.FUSED != "dpo_head" and str(RouteKind.DPO_HEAD) == "dpo_head"
        assert f"{RouteKind.FUSED}" == "fused" and {RouteKind.LOGITS: 1}["logits"] == 1
    assert pickle.loads(pickle.dumps(RouteKind.DPO_HEAD)) is RouteKind.DPO_HEAD


@pytest.mark.parametrize("earlier, kind", [("pair", RouteKind.DPO_HEAD), ("scores", RouteKind.FUSED)])
def test_earlier_route_kind_names_compare_equal_with_a_warning(earlier, kind):
    with pytest.warns(DeprecationWarning, match=f"route kind '{earlier}' is now '{kind.value}'"):
        assert kind == earlier
    with pytest.warns(DeprecationWarning):
        assert RouteKind.LOGITS != earlier


def test_sequence_logprobs_pair_is_the_earlier_name():
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    want = fastdpo.sequence_logprobs_with_reference(logits, ref, targets, impl="torch")
    with pytest.warns(DeprecationWarning, match="sequence_logprobs_with_reference"):
        got = fastdpo.sequence_logprobs_pair(logits, ref, targets, impl="torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_verdict_is_true_when_it_can_and_says_why_not_otherwise():
    assert YES and Verdict() == YES and YES.why_not == ""
    refused = no("its head is a custom module")
    assert not refused and refused.why_not == "its head is a custom module"
    with pytest.raises(ValueError, match="needs its reason"):
        no("")


def test_both_pair_datasets_give_a_pair_batch():
    """PreferenceDataset's batch unpacks as x-transformers' does and is forward's keyword
    arguments too; the tokenized dataset's is the same type, with its sequence masks."""
    from fastdpo import PairBatch, PreferenceDataset

    ds = PreferenceDataset([{"preferred": [1, 2, 3], "unpreferred": [1, 2, 4, 5], "prompt_len": 2}], pad_id=0)
    batch = ds.collate([ds[0]])
    assert isinstance(batch, PairBatch) and len(batch) == 3
    p, u, m = batch
    assert batch.keys() == ("preferred_seq", "unpreferred_seq", "prompt_mask")
    assert batch["prompt_mask"] is m and "prompt_mask" in batch and "preferred_seq_mask" not in batch
    assert dict(batch.items())["unpreferred_seq"] is u and batch.get("preferred_seq_mask") is None
    with pytest.raises(KeyError):
        batch["preferred_seq_mask"]
    full = PairBatch(p, u, m, p != 0, u != 0)
    assert full.keys()[3:] == ("preferred_seq_mask", "unpreferred_seq_mask") and full.to("cpu")[4].dtype == torch.bool
    with pytest.raises(ValueError, match="both sequence masks"):
        PairBatch(p, u, m, p != 0)


def test_from_records_lives_on_the_class_it_returns(monkeypatch):
    from fastdpo import PreferenceDataset, TokenizedPreferenceDataset

    assert "from_records" in vars(TokenizedPreferenceDataset)
    seen = []

    def fake(records, tokenizer, **options):
        seen.append((records, tokenizer, options))
        return "tokenized"

    monkeypatch.setattr(TokenizedPreferenceDataset, "from_records", staticmethod(fake))
    with pytest.warns(DeprecationWarning, match="TokenizedPreferenceDataset.from_records"):
        assert PreferenceDataset.from_records([{"a": 1}], "tok", max_length=8) == "tokenized"
    assert seen == [([{"a": 1}], "tok", {"max_length": 8})]
