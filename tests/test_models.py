"""fastdpo.models: DPO talks to model adapters only, so a new family is one ModelAdapter
subclass; the families found for each kind of model; the wrappers seen through or refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from fastdpo import DPO, models
from fastdpo.models import HFAdapter, LinearHead, ModelAdapter, XTransformersAdapter, adapter_for

V, L, D = 41, 9, 12


class Toy(nn.Module):
    """A model no family knows: an embedding, one MLP, a linear head (logits out)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.out = nn.Linear(D, V, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def body(self, tokens):
        return self.mlp(self.emb(tokens))

    def forward(self, tokens):
        return self.out(self.body(tokens)) * 0.75


class ToyAdapter(ModelAdapter):
    """The whole of a third family: where the head is, what it consumes."""

    family = "toy"

    @classmethod
    def adapt(cls, model):
        return cls(model) if isinstance(model, Toy) else None

    def head(self):
        return LinearHead(self.model.out.weight, 0.75, self.model.out), ""

    def hidden(self, tokens, layout=None):
        return self.model.body(tokens)

    def vocab_size(self):
        return V


def _batch(seed=1, b=3):
    g = torch.Generator().manual_seed(seed)
    pref, unpref = torch.randint(0, V, (b, L), generator=g), torch.randint(0, V, (b, L), generator=g)
    pm = torch.arange(L)[None] < torch.randint(1, L - 2, (b, 1), generator=g)
    unpref[pm] = pref[pm]
    return pref, unpref, pm


def _perturbed(dpo):
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in dpo.policy_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return dpo


def test_a_new_family_is_one_adapter(monkeypatch):
    """Listed in FAMILIES, a ModelAdapter subclass gets the fused head: the loss and gradients
    of the logits route (the model's own forward), no logits built."""
    with pytest.warns(UserWarning, match="not a TransformerWrapper or a Hugging Face causal LM"):
        plain = _perturbed(DPO(Toy(), beta=0.3))
    assert plain.route(plain.policy_model, "cpu").kind == "logits"
    monkeypatch.setattr(models, "FAMILIES", (ToyAdapter,) + models.FAMILIES)
    fused = _perturbed(DPO(Toy(), beta=0.3))
    route = fused.route(fused.policy_model, "cpu")
    assert route.kind == "dpo_head" and route.family == "toy"
    pref, unpref, pm = _batch()
    losses = []
    for dpo in (plain, fused):
        loss = dpo(pref, unpref, prompt_mask=pm)
        loss.backward()
        losses.append(loss)
    assert abs(losses[0].item() - 0.6931) > 1e-3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, a), b in zip(plain.policy_model.named_parameters(), fused.policy_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_families_found():
    xt = TransformerWrapper(num_tokens=V, max_seq_len=L, attn_layers=Decoder(dim=8, depth=1, heads=1))
    assert type(adapter_for(xt)) is XTransformersAdapter
    assert type(adapter_for(torch.compile(xt))) is XTransformersAdapter
    assert type(adapter_for(Toy())) is ModelAdapter
    assert adapter_for(Toy()).vocab_size() is None
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    adapter = adapter_for(transformers.LlamaForCausalLM(cfg))
    assert type(adapter) is HFAdapter and adapter.vocab_size() == V


def test_tied_head_is_recognized_by_its_code_not_its_name():
    """x-transformers' tied head is the lambda its __init__ builds over this model; a look-alike
    lambda (same qualname, another computation) is not fused."""
    model = TransformerWrapper(num_tokens=V, max_seq_len=L, tie_embedding=True, attn_layers=Decoder(dim=8, depth=1, heads=1))
    head, why = adapter_for(model).head()
    assert head is not None and head.owner is model.token_emb.emb and why == ""

    def fake(t):  # a custom head under x-transformers' own name
        return (t @ model.token_emb.emb.weight.t()) * 2.0

    fake.__qualname__ = model.to_logits.__qualname__
    model.to_logits = fake
    head, why = adapter_for(model).head()
    assert head is None and "custom function" in why


def test_ddp_around_the_model_is_refused():
    class DistributedDataParallel(nn.Module):  # what DDP's class looks like to fastdpo
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match=r"wrap the DPO module instead"):
        DPO(DistributedDataParallel(Toy()))
