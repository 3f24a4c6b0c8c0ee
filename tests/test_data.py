"""PreferenceDataset and collate, alone and feeding DPO through a real DataLoader."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from x_transformers import Decoder, TransformerWrapper
from x_transformers.dpo import DPO as XDPO

from fastdpo import DPO, PreferenceDataset

from helpers import rel_err

PAD = 0


def random_items(n, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        p = int(torch.randint(1, 5, (1,), generator=g))
        lw, ll = (int(x) for x in torch.randint(1, 8, (2,), generator=g))
        prompt = torch.randint(1, v, (p,), generator=g)
        items.append(
            dict(
                preferred=torch.cat((prompt, torch.randint(1, v, (lw,), generator=g))),
                unpreferred=torch.cat((prompt, torch.randint(1, v, (ll,), generator=g))).tolist(),
                prompt_len=p,
            )
        )
    return items


def test_getitem_pads_to_common_length_and_builds_prompt_mask():
    ds = PreferenceDataset(
        [dict(preferred=torch.tensor([5, 6, 7, 8, 9]), unpreferred=[5, 6, 3], prompt_len=2)],
        pad_id=PAD,
    )
    p, u, m = ds[0]
    assert p.tolist() == [5, 6, 7, 8, 9]
    assert u.tolist() == [5, 6, 3, PAD, PAD]
    assert m.tolist() == [True, True, False, False, False]
    assert p.dtype == u.dtype == torch.long and m.dtype == torch.bool


def test_equal_lengths_need_no_pad_id():
    ds = PreferenceDataset([dict(preferred=[1, 2, 3], unpreferred=[1, 2, 4], prompt_len=0)])
    p, u, m = ds[0]
    assert not m.any() and len(ds) == 1


def test_collate_round_trip():
    items = random_items(5)
    ds = PreferenceDataset(items, pad_id=PAD)
    p, u, m = ds.collate([ds[i] for i in range(5)])
    length = max(max(len(it["preferred"]), len(it["unpreferred"])) for it in items)
    assert p.shape == u.shape == m.shape == (5, length)
    for i, it in enumerate(items):
        lw, ll = len(it["preferred"]), len(it["unpreferred"])
        assert p[i, :lw].tolist() == list(it["preferred"].tolist())
        assert (p[i, lw:] == PAD).all() and (u[i, ll:] == PAD).all()
        assert u[i, :ll].tolist() == it["unpreferred"]
        assert m[i].tolist() == [j < it["prompt_len"] for j in range(length)]


@pytest.mark.parametrize(
    "items, kw, err, match",
    [
        ([dict(preferred=[1, 2], unpreferred=[1, 2, 3], prompt_len=1)], {}, ValueError, "pad_id is None"),
        ([dict(preferred=[1, 2], unpreferred=[1, 2], prompt_len=3)], {}, ValueError, r"prompt_len'\] must be in \[0, 2\]"),
        ([dict(preferred=[1, 2], unpreferred=[1, 2], prompt_len=-1)], {}, ValueError, "prompt_len"),
        ([dict(preferred=[1, 2], unpreferred=[1, 2], prompt_len=1.0)], {}, TypeError, "prompt_len"),
        ([dict(preferred=[1.0, 2.0], unpreferred=[1, 2], prompt_len=1)], {}, TypeError, "preferred"),
        ([dict(preferred=[[1, 2]], unpreferred=[1, 2], prompt_len=1)], {}, ValueError, "1-D"),
        ([dict(preferred=[], unpreferred=[1], prompt_len=0)], {"pad_id": 0}, ValueError, "at least one token"),
        ([dict(preferred=[1, 2], prompt_len=1)], {}, ValueError, "unpreferred"),
        ([dict(preferred=[1, 2], unpreferred=[1, 2])], {}, ValueError, "prompt_len"),
        ([(1, 2)], {}, TypeError, "mapping"),
    ],
)
def test_bad_items(items, kw, err, match):
    ds = PreferenceDataset(items, **kw)
    with pytest.raises(err, match=match):
        ds[0]


def test_collate_without_pad_id_rejects_ragged_batch():
    ds = PreferenceDataset(
        [dict(preferred=[1, 2], unpreferred=[1, 3], prompt_len=1),
         dict(preferred=[1, 2, 3], unpreferred=[1, 3, 4], prompt_len=1)]
    )
    with pytest.raises(ValueError, match="pad_id"):
        ds.collate([ds[0], ds[1]])
    with pytest.raises(ValueError, match="empty batch"):
        ds.collate([])


def test_bad_pad_id():
    with pytest.raises(TypeError, match="pad_id"):
        PreferenceDataset([], pad_id="0")


def test_dataloader_feeds_dpo_like_x_transformers():
    """Collated batches (padding, prompts) give x-transformers' loss and gradients, with the
    policy moved away from the reference (else both sides give log 2 whatever the masks)."""
    v = 40
    ds = PreferenceDataset(random_items(10, v=v, seed=3), pad_id=PAD)
    loader = DataLoader(ds, batch_size=4, collate_fn=ds.collate)

    def make():
        torch.manual_seed(0)
        return TransformerWrapper(num_tokens=v, max_seq_len=32, attn_layers=Decoder(dim=16, depth=1, heads=2))

    ours, ref = DPO(make(), pad_id=PAD), XDPO(make(), pad_id=PAD)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in ref.policy_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours.policy_model.load_state_dict(ref.policy_model.state_dict())
    batches = 0
    for pref, unpref, prompt_mask in loader:
        for m in (ours, ref):
            m.policy_model.zero_grad(set_to_none=True)
        lo = ours(pref, unpref, prompt_mask=prompt_mask)
        lx = ref(pref, unpref, prompt_mask=prompt_mask)
        assert abs(lx.item() - math.log(2)) > 1e-3
        assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item())
        lo.backward()
        lx.backward()
        gx = dict(ref.policy_model.named_parameters())
        for name, p in ours.policy_model.named_parameters():
            if gx[name].grad is not None:
                assert rel_err(p.grad, gx[name].grad) <= 1e-5, name
        batches += 1
    assert batches == 3
