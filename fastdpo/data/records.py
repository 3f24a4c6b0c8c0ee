"""Text records -> token ids, the steps TRL 1.16's ``DPOTrainer`` and ``KTOTrainer`` take alike:
what both :mod:`.text` (preference pairs, for :class:`fastdpo.DPO`) and :mod:`.kto_text`
(unpaired completions, for :class:`fastdpo.KTO`) run, once each.

* records: read (a list, a ``datasets.Dataset``, a JSON Lines file), checked field by field
  (:func:`text_fields`, :func:`pair_fields`), the prompt of a pair without one found as TRL's
  ``extract_prompt`` finds it;
* tokenizing: the prompt and each prompt + completion as TRL tokenizes them (:func:`encode`:
  plain text with the EOS token appended to the completion, or messages through the chat
  template, the prompt with the generation prompt); the completion starts where the two
  diverge (:func:`common_prefix_length`, TRL's function of that name);
* the pipeline: the arguments' checks, reading ``records[0]`` into a :class:`Plan`, every
  record tokenized through ``datasets.Dataset.map`` (with ``num_proc`` processes) or in chunks
  of a list (with a progress bar), the warning for prompts cut at the seam, and TRL's rule for
  ``max_length`` (:func:`kept_by_prompt`);
* storage: :class:`Ragged` rows of ids, and :func:`window`, how TRL's collators cut a sequence.

Neither TRL nor ``datasets`` is imported (a ``datasets.Dataset`` given as records is tokenized
through its own ``map``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .. import _checks

TRUNCATION_MODES = ("keep_start", "keep_end")
# chat_template_kwargs the tokenizing call sets itself (TRL's would fail on them with a TypeError)
_OWN_TEMPLATE_ARGS = ("add_generation_prompt", "tokenize", "return_dict", "conversation")
# Records tokenized per call of the tokenizer (plain text) and per step of the progress bar, and
# the batch of datasets.Dataset.map: its default batch size, which is also the block in which
# TRL's unpair_preference_dataset lists a chunk's chosen completions, then its rejected ones.
_CHUNK = 1000


@dataclass(frozen=True)
class Plan:
    """How every record is read, decided once from the first record (as TRL decides from its
    dataset's first example)."""

    has_prompt: bool  # records carry a prompt; else it is the shared start of chosen and rejected
    conversational: bool  # lists of messages rendered by the chat template; else plain text
    eos: str | None  # appended to plain-text completions that do not end with it
    paired: bool = True  # chosen and rejected; else (KTO) one completion and its label
    tools: Any = None  # the dataset-wide tools (a record's own 'tools' replaces them)
    template_kwargs: dict = field(default_factory=dict)  # a record's own are merged over these


# ----------------------------------------------------------------------------- records


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], Mapping) and "role" in x[0]


def text_fields(i: int, rec, names: Sequence[str], plan: Plan) -> list:
    """``records[i]``'s fields ``names``, checked: there, and all text or all messages as in
    ``records[0]``."""
    if not isinstance(rec, Mapping):
        raise TypeError(f"records[{i}] must be a mapping (a dict of the record's fields), got {type(rec).__name__}")
    for name in names:
        if rec.get(name) is None:
            raise ValueError(f"records[{i}] has no {name!r} field")
    out = []
    for name in names:
        x = rec[name]
        if plan.conversational:
            if isinstance(x, (str, bytes)) or not isinstance(x, Sequence) or not all(
                isinstance(m, Mapping) and "role" in m for m in x
            ):
                raise TypeError(
                    f"records[{i}][{name!r}] must be a list of messages (dicts with 'role' and 'content') as in "
                    f"records[0], got {type(x).__name__}: give every field as text, or every field as messages"
                )
            x = list(x)
        elif not isinstance(x, str):
            raise TypeError(
                f"records[{i}][{name!r}] must be a str (plain text) as in records[0], got {type(x).__name__}: give "
                f"every field as text, or every field as messages"
            )
        out.append(x)
    return out


def pair_fields(i: int, rec, plan: Plan) -> tuple:
    """``records[i]``'s (prompt, chosen, rejected), checked; without a prompt (as ``records[0]``),
    the shared start of chosen and rejected (:func:`extract_prompt`)."""
    if plan.has_prompt:
        return tuple(text_fields(i, rec, ("prompt", "chosen", "rejected"), plan))
    chosen, rejected = text_fields(i, rec, ("chosen", "rejected"), plan)
    if rec.get("prompt") is not None:
        raise ValueError(
            f"records[{i}] has a 'prompt' field but records[0] has none: give every record a prompt, or none "
            f"(the prompt is then the shared start of chosen and rejected)"
        )
    return extract_prompt(i, chosen, rejected)


def extract_prompt(i: int, chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) of a record without a prompt: the prompt is the start that
    ``chosen`` and ``rejected`` (two strings or two lists of messages) share, as TRL 1.16's
    ``extract_prompt`` finds it, including its two edge rules: when nothing differs within the
    shorter one, the prompt stops one element before its end; when they first differ at
    element ``j`` and element ``j - 1`` is a space, the prompt stops before that space (for
    ``j = 0`` Python's ``chosen[-1]`` is the last character)."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        empty = "chosen" if len(chosen) == 0 else "rejected"
        raise ValueError(f"records[{i}] has no 'prompt' and an empty {empty!r}: no shared prompt can be extracted")
    cut = n - 1
    for j in range(n):
        if chosen[j] != rejected[j]:
            cut = j - 1 if chosen[j - 1] == " " else j
            break
    return chosen[:cut], chosen[cut:], rejected[cut:]


def read_jsonl(path, where: str | None = None) -> list[dict]:
    """The records of a JSON Lines file, one JSON object a line (blank lines skipped); a
    ``ValueError`` naming ``where`` (default the path) and the line for anything else."""
    where = os.fspath(path) if where is None else where
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}:{lineno} is not a JSON object ({e.msg}); records must be a "
                                 f"JSON Lines file, one record a line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}:{lineno} is a JSON {type(record).__name__}, not a JSON object; records "
                                 f"must be a JSON Lines file, one record a line")
            records.append(record)
    return records


def _hf_dataset(records):
    """``records`` when it is a ``datasets.Dataset`` (imported by whoever made it), else None."""
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return None
    if isinstance(records, datasets.Dataset):
        return records
    if isinstance(records, (datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError(f"records must be a datasets.Dataset (one split, not streamed), got {type(records).__name__}")
    return None


# ----------------------------------------------------------------------------- tokenizer


def _pad_id(tokenizer) -> int:
    """The id collate pads with: the pad token, else the EOS token (TRL's rule)."""
    token = tokenizer.pad_token if tokenizer.pad_token is not None else tokenizer.eos_token
    if token is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token (tokenizer.pad_token and eos_token are None): "
            "set tokenizer.pad_token"
        )
    if token not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer's pad token {token!r} is not in its vocabulary")
    return int(tokenizer.convert_tokens_to_ids(token))


def _template_kwargs(i: int, rec: Mapping, plan: Plan, tokenizer) -> dict:
    """The keyword arguments of ``records[i]``'s chat template calls: ``tools`` (the record's own,
    else the dataset's; a str is JSON) and the chat_template_kwargs, the record's over the dataset's."""
    tools = rec.get("tools")
    where = f"records[{i}]['tools']"
    if tools is None:
        tools, where = plan.tools, "tools"
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is a str but not JSON ({e.msg})") from None
    own = rec.get("chat_template_kwargs")
    if own is not None and not isinstance(own, Mapping):
        raise TypeError(f"records[{i}]['chat_template_kwargs'] must be a mapping, got {type(own).__name__}")
    kwargs = {"tools": tools, **plan.template_kwargs, **(own or {})}
    clash = [k for k in _OWN_TEMPLATE_ARGS if k in kwargs]
    if clash:
        raise ValueError(f"records[{i}]: chat_template_kwargs must not set {clash}: fastdpo sets them (the prompt "
                         f"with the generation prompt, the conversations without)")
    if getattr(tokenizer, "chat_template", None) is None and kwargs.get("chat_template") is None:
        raise ValueError(
            "conversational records need a chat template, and the tokenizer has none (tokenizer.chat_template is "
            "None): set tokenizer.chat_template, or pass chat_template_kwargs={'chat_template': ...}"
        )
    return kwargs


def _chat_ids(tokenizer, messages: list, kwargs: dict, generation_prompt: bool) -> list[int]:
    if generation_prompt:
        kwargs = {**kwargs, "add_generation_prompt": True}
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def encode(texts: Sequence[tuple], recs: Sequence[Mapping], where: Sequence[int], tokenizer,
           plan: Plan) -> list[tuple[list[int], ...]]:
    """Each ``(prompt, completion, ...)`` of ``texts`` (from the record ``recs[k]``, which is
    ``records[where[k]]``) tokenized as TRL 1.16 tokenizes it: ``(prompt ids, prompt + completion
    ids, ...)``.  Plain text: each completion ends with the EOS token (appended unless already
    there), tokenized with ``tokenizer(text=...)``; messages: rendered by the chat template with
    the record's tools and template arguments, the prompt with the generation prompt."""
    if plan.conversational:
        out = []
        for k, (prompt, *completions) in enumerate(texts):
            kw = _template_kwargs(where[k], recs[k], plan, tokenizer)
            out.append((_chat_ids(tokenizer, prompt, kw, True),
                        *(_chat_ids(tokenizer, prompt + c, kw, False) for c in completions)))
        return out
    if not texts:
        return []
    eos = plan.eos
    strings = [(p, *(p + (c if c.endswith(eos) else c + eos) for c in cs)) for p, *cs in texts]
    # One call per column: a tokenizer encodes a list of texts as it encodes each alone (no padding asked).
    columns = [tokenizer(text=[t[j] for t in strings])["input_ids"] for j in range(len(strings[0]))]
    return list(zip(*columns))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` have in common: where TRL 1.16 starts a completion
    (the tokenized prompt is not always a prefix of the tokenized prompt + completion)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------- storage


class Ragged:
    """Rows of token ids of different lengths in one flat int64 tensor."""

    def __init__(self, values: Tensor, lengths: Tensor):
        self.values, self.lengths = values, lengths
        self.offsets = torch.cat((lengths.new_zeros(1), lengths.cumsum(0)))

    @classmethod
    def of_lists(cls, rows: list[list[int]]) -> Ragged:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return cls(torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long), lengths)

    @classmethod
    def of_arrow(cls, column) -> Ragged:
        import pyarrow.compute as pc  # present wherever a datasets.Dataset is

        column = column.combine_chunks()
        # (copies: arrow's arrays are read-only, which torch.from_numpy warns of)
        lengths = torch.tensor(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=torch.long)
        values = torch.tensor(column.flatten().to_numpy(zero_copy_only=False), dtype=torch.long)
        return cls(values, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Tensor:
        return self.values[self.offsets[i]: self.offsets[i + 1]].clone()


def window(prompt_len: int, completion_len: int, max_length: int | None, mode: str) -> tuple[int, int]:
    """``(start, kept_prompt)`` of a prompt + completion cut to ``max_length`` tokens as TRL's
    collators cut it (the first ``max_length`` with ``"keep_start"``, the last with
    ``"keep_end"``): where the kept tokens start, and how many of them are prompt tokens."""
    if max_length is None:
        return 0, prompt_len
    if mode == "keep_start":
        return 0, min(prompt_len, max_length)
    start = max(prompt_len + completion_len - max_length, 0)
    return start, max(prompt_len - start, 0)


# ----------------------------------------------------------------------------- the pipeline


def check_arguments(tokenizer, max_length, truncation_mode, tools, chat_template_kwargs, num_proc) -> None:
    if not all(hasattr(tokenizer, a) for a in ("eos_token", "pad_token", "get_vocab", "apply_chat_template")):
        raise TypeError(f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase; a processor's "
                        f".tokenizer), got {type(tokenizer).__name__}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    _checks.choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    if tools is not None and not isinstance(tools, (str, list)):
        raise TypeError(f"tools must be a list (of tool schemas or functions), a JSON str or None, got "
                        f"{type(tools).__name__}")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
        raise TypeError(f"chat_template_kwargs must be a mapping or None, got {type(chat_template_kwargs).__name__}")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc must be an int >= 1 or None, got {num_proc!r}")


def open_records(records, tokenizer, fields: Sequence[str], *, tools, chat_template_kwargs,
                 num_proc) -> tuple[Any, Plan, int]:
    """``(source, plan, pad_id)``: the records (a ``datasets.Dataset``, else a list: a path is read
    as JSON Lines), how to read them (from ``records[0]``: text or messages in any of ``fields``;
    a prompt; chosen and rejected) and the id batches are padded with."""
    source = _hf_dataset(records)
    if source is None:
        if isinstance(records, (str, os.PathLike)):
            records = read_jsonl(records)
        elif not isinstance(records, Sequence):
            raise TypeError(f"records must be a list of dicts, a datasets.Dataset or a JSON Lines path, got "
                            f"{type(records).__name__}")
        if num_proc is not None:
            raise ValueError("num_proc parallelizes datasets.Dataset.map: it needs records as a datasets.Dataset")
        source = records
    if len(source) == 0:
        raise ValueError("records is empty")
    first = source[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"records[0] must be a mapping (a dict of the record's fields), got {type(first).__name__}")
    conversational = any(_is_messages(first.get(k)) for k in fields)
    if not conversational and (tools is not None or chat_template_kwargs):
        raise ValueError("tools and chat_template_kwargs go to the chat template, and these records are plain text "
                         "(records[0] has no list of messages)")
    pad_id = _pad_id(tokenizer)
    if not conversational and tokenizer.eos_token is None:
        raise ValueError("plain-text records need the tokenizer's EOS token (appended to each completion), and "
                         "tokenizer.eos_token is None: set it, or give the records as messages")
    paired = first.get("chosen") is not None and first.get("rejected") is not None
    plan = Plan(first.get("prompt") is not None, conversational, tokenizer.eos_token, paired, tools,
                dict(chat_template_kwargs or {}))
    return source, plan, pad_id


def _map_batch(batch: dict[str, list], indices: list[int], tokenize_rows, tokenizer, plan: Plan) -> dict[str, list]:
    """``datasets.Dataset.map``'s function (batched, with indices)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return tokenize_rows(rows, indices[0] if indices else 0, tokenizer, plan)


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # shown only when tokenizing takes more than a second
    return tqdm(total=total, desc="fastdpo: tokenizing records", unit="record", delay=1.0)


def tokenize_all(source, tokenize_rows: Callable, tokenizer, plan: Plan, num_proc: int | None) -> dict[str, Any]:
    """Every record through ``tokenize_rows(rows, start, tokenizer, plan)`` (a dict of columns, a
    value a row), ``_CHUNK`` records a call: by ``source.map`` (a ``datasets.Dataset``, with
    ``num_proc`` processes) or a loop over the list (with a progress bar).  The columns of ids
    (named ``*_ids``) come back :class:`Ragged`, the others as lists."""
    if _hf_dataset(source) is not None:
        mapped = source.map(_map_batch, batched=True, batch_size=_CHUNK, with_indices=True,
                            remove_columns=source.column_names, num_proc=num_proc,
                            fn_kwargs={"tokenize_rows": tokenize_rows, "tokenizer": tokenizer, "plan": plan},
                            desc="fastdpo: tokenizing records")
        table = mapped.with_format("arrow")[:]
        return {k: Ragged.of_arrow(table.column(k)) if k.endswith("_ids") else table.column(k).to_pylist()
                for k in table.column_names}
    n = len(source)
    columns: dict[str, list] = {}
    bar = _progress(n) if n > _CHUNK else None
    for start in range(0, n, _CHUNK):
        rows = source[start: start + _CHUNK]
        for k, v in tokenize_rows(rows, start, tokenizer, plan).items():
            columns.setdefault(k, []).extend(v)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return {k: Ragged.of_lists(v) if k.endswith("_ids") else v for k, v in columns.items()}


def warn_seam(cut: list[bool], record: Sequence[int], noun: str, stacklevel: int) -> None:
    """The warning for rows (of ``noun``, row ``j`` from ``records[record[j]]``) whose tokenized
    prompt is not a prefix of the tokenized prompt + completion (``cut[j]``)."""
    if any(cut):
        warnings.warn(
            f"{sum(cut)} of {len(cut)} {noun} (the first records[{record[cut.index(True)]}]): the tokenized prompt is "
            f"not a prefix of the tokenized prompt + completion (tokens merge across the seam, or the chat template "
            f"renders the prompt alone differently); as TRL does, the completion starts where the two diverge and the "
            f"prompt keeps only the tokens they share", stacklevel=stacklevel + 1)


def kept_by_prompt(prompt_lengths: Tensor, max_length: int | None, noun: str, stacklevel: int) -> Tensor:
    """The rows (of ``noun``) TRL 1.16 keeps: all of them, or with ``max_length`` (and its
    ``"keep_start"`` truncation) those whose prompt is shorter than ``max_length`` (a longer one
    leaves no completion token); a warning says how many are dropped, a ``ValueError`` when all are."""
    n = len(prompt_lengths)
    if max_length is None:
        return torch.arange(n)
    keep = prompt_lengths < max_length
    dropped = n - int(keep.sum())
    if dropped == n:
        raise ValueError(f"max_length={max_length} drops all {n} {noun}: each prompt alone has max_length tokens or "
                         f"more (the shortest {int(prompt_lengths.min())}), which leaves no completion token (TRL "
                         f"drops them)")
    if dropped:
        warnings.warn(f"max_length={max_length} drops {dropped} of {n} {noun} whose prompt alone has max_length "
                      f"tokens or more (no completion token would be left), as TRL does", stacklevel=stacklevel + 1)
    return keep.nonzero().flatten()
