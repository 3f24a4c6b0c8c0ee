"""Options declared once: a dataclass field with its default and its one docstring
(:func:`option`), and the docstring section a module's constructor gets from a group of them
(:func:`args_doc`).  The groups are the layers' own: :class:`fastdpo.batching.options.TokenOptions`
and :class:`~fastdpo.batching.options.PackingOptions`, :class:`fastdpo.scoring.options.ComputeOptions`,
and each module's loss options; :func:`fastdpo.modules.options.with_options` writes a module's
constructor from them."""

from __future__ import annotations

import re
import textwrap
from dataclasses import Field, field, fields


def option(default, doc: str) -> Field:
    """A field of an options dataclass: its default and the option's doc (one place for both)."""
    return field(default=default, metadata={"doc": doc})


def doc_of(f: Field) -> str:
    """The doc :func:`option` gave a field, as one paragraph."""
    return " ".join(f.metadata.get("doc", "").split())


_LITERAL = re.compile(r"``.*?``")
_KEEP = "\x00"  # stands for a space inside a ``literal`` while the text is wrapped


def args_doc(group: type, indent: int = 8, width: int = 100) -> str:
    """The ``name: doc`` entries of every field of the options dataclass ``group``, each wrapped
    under its name as a docstring's ``Args`` section holds them (never inside a ``literal``)."""
    lead, more = " " * indent, " " * (indent + 4)
    entries = []
    for f in fields(group):
        text = _LITERAL.sub(lambda m: m.group(0).replace(" ", _KEEP), f"{f.name}: {doc_of(f)}")
        wrapped = textwrap.fill(text, width=width, initial_indent=lead, subsequent_indent=more,
                                break_long_words=False, break_on_hyphens=False)
        entries.append(wrapped.replace(_KEEP, " "))
    return "\n".join(entries)
