"""Options declared once (fastdpo.modules.options): every module's constructor is written from
its loss options and the three shared groups, with an explicit keyword signature and each
option's one doc in its docstring."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import pytest

from fastdpo import CPO, DPO, KTO, ORPO
from fastdpo._options import doc_of, option
from fastdpo.batching.options import PackingOptions, TokenOptions
from fastdpo.modules.base import PreferenceModule
from fastdpo.modules.options import SHARED, with_options
from fastdpo.scoring.options import ComputeOptions
from helpers import tiny_transformer


def small():
    return tiny_transformer(64, max_seq_len=16, dim=16, depth=1, heads=2)

MODULES = (DPO, ORPO, CPO, KTO)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_signature_is_explicit_and_comes_from_the_fields(cls):
    params = inspect.signature(cls).parameters
    assert list(params)[0] == "model"
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
    expected = [f for group in (cls.Options, *SHARED) for f in fields(group)]
    assert list(params)[1:] == [f.name for f in expected]
    for f in expected:
        p = params[f.name]
        assert p.kind == p.KEYWORD_ONLY and p.default == f.default, f.name
        assert doc_of(f) and f"{f.name}: " in cls.__doc__, f.name  # its one doc, in the module's


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_unknown_option_is_a_type_error_naming_it(cls):
    with pytest.raises(TypeError, match="unexpected keyword argument 'bta'"):
        cls(small(), bta=0.1)


def test_shared_options_reach_every_module():
    model = small()
    for cls in MODULES:
        m = cls(model, pad_id=0, mask_alignment="target", head="logits", impl="torch", chunk_bytes=1 << 20)
        assert m.token_options == TokenOptions(pad_id=0, mask_alignment="target")
        assert m.compute_options == ComputeOptions(head="logits", impl="torch", chunk_bytes=1 << 20)
        assert m.packing_options == PackingOptions()
        assert (m.pad_id, m.mask_alignment, m.head, m.impl) == (0, "target", "logits", "torch")
        assert m.scorer.chunk_bytes == 1 << 20
        assert isinstance(m.loss_options, cls.Options)


def test_a_new_option_is_one_field():
    """A module written with a group that gains a field takes it, with its default and doc,
    and hands it to _build: nothing else to edit."""

    @dataclass(frozen=True, kw_only=True)
    class Extra:
        """An extra group."""

        temperature: float = option(0.7, "how warm it is.")

    @dataclass(frozen=True, kw_only=True)
    class Loss:
        """A toy loss."""

        beta: float = option(0.5, "a toy weight.")

    seen = {}

    @with_options(Loss, shared=(*SHARED, Extra))
    class Toy(PreferenceModule):
        """A toy module."""

        def _build(self, model, loss, tokens, packing, compute, extra):
            seen.update(loss=loss, extra=extra)
            super().__init__(model, tokens, packing, compute, reference=False, independent_pairs=False)

    Toy(small(), temperature=0.3, impl="torch")
    assert seen == {"loss": Loss(beta=0.5), "extra": Extra(temperature=0.3)}
    assert inspect.signature(Toy).parameters["temperature"].default == 0.7
    assert "temperature: how warm it is." in Toy.__doc__ and "beta: a toy weight." in Toy.__doc__


def test_option_names_are_unique_across_groups():
    @dataclass(frozen=True, kw_only=True)
    class Clash:
        """Reuses a shared name."""

        pad_id: int = option(0, "again.")

    with pytest.raises(TypeError, match="option names must be unique"):
        with_options(Clash)


def test_defaults_match_what_each_module_did_before():
    """The documented defaults, as x-transformers' DPO and TRL's trainers set them."""
    sig = {cls: inspect.signature(cls).parameters for cls in MODULES}
    assert sig[DPO]["beta"].default == 0.1 and sig[DPO]["router_aux_loss_coef"].default is None
    assert sig[KTO]["router_aux_loss_coef"].default is None and "router_aux_loss_coef" not in sig[ORPO]
    assert sig[CPO]["cpo_alpha"].default == 1.0 and sig[CPO]["loss_type"].default == "sigmoid"
    for cls in MODULES:
        assert sig[cls]["logprob_reduction"].default == "mean" and sig[cls]["mask_alignment"].default == "input"
        assert sig[cls]["head"].default == "auto" and sig[cls]["inplace_backward"].default is True


def test_docs_api_lists_every_option():
    """docs/api.md is the reference a user reads: every option of every module is in it."""
    from pathlib import Path

    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    missing = sorted({f.name for cls in MODULES for g in (cls.Options, *SHARED) for f in fields(g)
                      if f"`{f.name}`" not in api})
    assert not missing, f"docs/api.md does not list: {missing}"
