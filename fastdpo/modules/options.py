"""A module's constructor, written from its options.

Every module takes the same shared options, in three groups that the layers reading them
declare (:class:`~fastdpo.batching.options.TokenOptions`,
:class:`~fastdpo.batching.options.PackingOptions`,
:class:`~fastdpo.scoring.options.ComputeOptions`), and its own loss options (a frozen dataclass
in its module file: ``DPOOptions``, ``ORPOOptions``, ...).  :func:`with_options` writes the
class's ``__init__`` from those fields -- an explicit keyword signature, as :mod:`dataclasses`
writes its constructors -- which builds the four groups and hands them to the class's
``_build(model, loss, tokens, packing, compute)``; and it ends the class docstring with every
option's doc, grouped.  So an option is one field with its one doc: its default, type, the
signature and the docs all come from there.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

from .._options import args_doc
from ..batching.options import PackingOptions, TokenOptions
from ..scoring.options import ComputeOptions

SHARED = (TokenOptions, PackingOptions, ComputeOptions)

MODEL_DOC = """\
        model: maps token ids (B, L) to logits (B, L, V), returned as a tensor or as an output
            with ``.logits``: an x-transformers ``TransformerWrapper`` (also inside
            ``torch.compile``), a Hugging Face causal LM or a ``peft`` model around one
            (:mod:`fastdpo.models`; right padding, or left padding with
            ``mask_alignment="target"``), any such module, wrapped in DDP or sharded with FSDP2.
            It becomes ``policy_model``.  A loss that reads a reference makes ``ref_model`` a
            frozen deep copy of it (:func:`fastdpo.modules.base.frozen_copy`: unlike
            x-transformers' copy it shares no weights with the policy, also when the head is
            tied to the embedding), except for a ``peft`` model, whose reference is itself with
            its adapters disabled (``ref_model`` is then None; see ``has_reference``)."""


def with_options(loss: type, *, shared: tuple[type, ...] = SHARED):
    """Class decorator: the module's ``__init__(self, model, *, <the fields of loss, then of
    each shared group>)``, which calls ``self._build(model, loss(...), *groups(...))``; and the
    options' docs appended to the class docstring.  ``loss``: the module's loss options, a
    dataclass whose fields have :func:`fastdpo._options.option` docs."""
    groups = (loss, *shared)
    names = [f.name for g in groups for f in fields(g)]
    if len(set(names)) != len(names):
        raise TypeError(f"option names must be unique across {[g.__name__ for g in groups]}: {names}")

    def decorate(cls):
        namespace = {f"_group{i}": g for i, g in enumerate(groups)}
        params, calls, annotations = [], [], {"model": "nn.Module"}
        for i, group in enumerate(groups):
            for f in fields(group):
                if f.default is MISSING:
                    raise TypeError(f"{group.__name__}.{f.name} needs a default (modules take options by keyword)")
                namespace[f"_default_{f.name}"] = f.default
                params.append(f"{f.name}=_default_{f.name}")
                annotations[f.name] = f.type
            calls.append(f"_group{i}(" + ", ".join(f"{f.name}={f.name}" for f in fields(group)) + ")")
        source = (f"def __init__(self, model, *, {', '.join(params)}):\n"
                  f"    self._build(model, {', '.join(calls)})\n")
        exec(source, namespace)  # noqa: S102 -- a constructor from the fields, as dataclasses writes one
        init = namespace["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        init.__module__ = cls.__module__
        init.__annotations__ = annotations
        init.__doc__ = f"See :class:`{cls.__name__}`: every option is a keyword argument."
        cls.__init__ = init
        cls.Options = loss
        cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n" + options_doc(groups)
        return cls

    return decorate


def options_doc(groups: tuple[type, ...]) -> str:
    """The ``Args`` part of a module's docstring: ``model``, then each group's options under the
    group's first docstring line."""
    parts = ["    Args:", MODEL_DOC]
    for group in groups:
        title = (group.__doc__ or group.__name__).strip().splitlines()[0]
        parts.append(f"\n    {group.__name__} -- {title}\n")
        parts.append(args_doc(group))
    return "\n".join(parts) + "\n"
