"""Text preference records -> the token ids and batches :class:`fastdpo.DPO` takes, as TRL 1.16's
``DPOTrainer`` makes them.

:func:`tokenize_records` (what :meth:`fastdpo.TokenizedPreferenceDataset.from_records` runs) does what
``DPOTrainer._prepare_dataset`` does to a text dataset, in this order: the prompt of records
without one is the shared start of ``chosen`` and ``rejected`` (TRL's ``extract_prompt``); plain
completions end with the EOS token (appended unless already there); each record is tokenized as
prompt, prompt + chosen and prompt + rejected (conversational records through the tokenizer's
chat template, the prompt with the generation prompt); the completion starts where the tokenized
prompt and prompt + completion diverge (not after the prompt when tokens merge across the seam,
or the template renders the prompt alone differently); with ``max_length`` and ``"keep_start"``
truncation, records whose prompt alone has ``max_length`` tokens are dropped.
:class:`TokenizedPreferenceDataset` holds the result, and its :meth:`~TokenizedPreferenceDataset.collate`
does what ``DataCollatorForPreference`` does (each sequence cut to ``max_length`` from the end
or the start, right padding with the pad token, else the EOS token) and returns the mapping
``DPO.forward`` takes.

Everything here is fastdpo's own code: neither TRL nor ``datasets`` is imported (a
``datasets.Dataset`` given as records is tokenized through its own ``map``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import _checks
from .batch import PairBatch

TRUNCATION_MODES = ("keep_start", "keep_end")
FIELDS = ("prompt", "chosen", "rejected")
ITEM_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")  # an item's ids: TRL's prepared columns
# chat_template_kwargs the tokenizing call sets itself (TRL's would fail on them with a TypeError)
_OWN_TEMPLATE_ARGS = ("add_generation_prompt", "tokenize", "return_dict", "conversation")
_CHUNK = 512  # records tokenized per call of the tokenizer (plain text) and per step of the progress bar


@dataclass(frozen=True)
class _Plan:
    """How every record is read, decided once from the first record (as TRL decides from its
    dataset's first example)."""

    has_prompt: bool  # records carry a prompt; else it is the shared start of chosen and rejected
    conversational: bool  # lists of messages rendered by the chat template; else plain text
    eos: str | None  # appended to plain-text completions that do not end with it
    tools: Any = None  # the dataset-wide tools (a record's own 'tools' replaces them)
    template_kwargs: dict = field(default_factory=dict)  # a record's own are merged over these


# ----------------------------------------------------------------------------- records


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], Mapping) and "role" in x[0]


def _fields(i: int, rec, plan: _Plan) -> list:
    """``records[i]``'s (prompt, chosen, rejected), or (chosen, rejected) without a prompt, checked."""
    if not isinstance(rec, Mapping):
        raise TypeError(f"records[{i}] must be a mapping (a dict with 'chosen' and 'rejected'), got "
                        f"{type(rec).__name__}")
    names = FIELDS if plan.has_prompt else FIELDS[1:]
    for name in names:
        if rec.get(name) is None:
            raise ValueError(f"records[{i}] has no {name!r} field")
    if not plan.has_prompt and rec.get("prompt") is not None:
        raise ValueError(
            f"records[{i}] has a 'prompt' field but records[0] has none: give every record a prompt, or none "
            f"(the prompt is then the shared start of chosen and rejected)"
        )
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


def _template_kwargs(i: int, rec: Mapping, plan: _Plan, tokenizer) -> dict:
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


def _shared(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_rows(rows: Sequence, start: int, tokenizer, plan: _Plan) -> dict[str, list]:
    """``records[start:start + len(rows)]`` as ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (one
    list of ids a record) and ``prompt_cut`` (True where the tokenized prompt is not a prefix of
    the tokenized prompt + completion)."""
    texts = []
    for k, rec in enumerate(rows):
        fields = _fields(start + k, rec, plan)
        if not plan.has_prompt:
            fields = extract_prompt(start + k, *fields)
        texts.append(fields)
    if plan.conversational:
        encoded = []
        for k, (prompt, chosen, rejected) in enumerate(texts):
            kw = _template_kwargs(start + k, rows[k], plan, tokenizer)
            encoded.append((_chat_ids(tokenizer, prompt, kw, True), _chat_ids(tokenizer, prompt + chosen, kw, False),
                            _chat_ids(tokenizer, prompt + rejected, kw, False)))
    else:
        eos = plan.eos
        strings = [(p, p + (c if c.endswith(eos) else c + eos), p + (r if r.endswith(eos) else r + eos))
                   for p, c, r in texts]
        # One call per column: a tokenizer encodes a list of texts as it encodes each alone (no padding asked).
        columns = [tokenizer(text=[t[j] for t in strings])["input_ids"] for j in range(3)]
        encoded = list(zip(*columns))
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_cut": []}
    for k, (prompt, chosen, rejected) in enumerate(encoded):
        n = min(_shared(prompt, chosen), _shared(prompt, rejected))
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            if len(ids) <= n:
                raise ValueError(
                    f"records[{start + k}]: the {name} completion tokenizes to nothing (prompt + {name} is "
                    f"{len(ids)} tokens, the prompt it shares {n})"
                )
        out["prompt_ids"].append(list(prompt[:n]))
        out["chosen_ids"].append(list(chosen[n:]))
        out["rejected_ids"].append(list(rejected[n:]))
        out["prompt_cut"].append(n < len(prompt))
    return out


def _map_batch(batch: dict[str, list], indices: list[int], tokenizer, plan: _Plan) -> dict[str, list]:
    """``datasets.Dataset.map``'s function (batched, with indices)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return tokenize_rows(rows, indices[0] if indices else 0, tokenizer, plan)


# ----------------------------------------------------------------------------- storage


class _Ragged:
    """Rows of token ids of different lengths in one flat int64 tensor."""

    def __init__(self, values: Tensor, lengths: Tensor):
        self.values, self.lengths = values, lengths
        self.offsets = torch.cat((lengths.new_zeros(1), lengths.cumsum(0)))

    @classmethod
    def of_lists(cls, rows: list[list[int]]) -> _Ragged:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return cls(torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long), lengths)

    @classmethod
    def of_arrow(cls, column) -> _Ragged:
        import pyarrow.compute as pc  # present wherever a datasets.Dataset is

        column = column.combine_chunks()
        # (copies: arrow's arrays are read-only, which torch.from_numpy warns of)
        lengths = torch.tensor(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=torch.long)
        values = torch.tensor(column.flatten().to_numpy(zero_copy_only=False), dtype=torch.long)
        return cls(values, lengths)

    def __getitem__(self, i: int) -> Tensor:
        return self.values[self.offsets[i]: self.offsets[i + 1]].clone()


def window(prompt_len: int, completion_len: int, max_length: int | None, mode: str) -> tuple[int, int]:
    """``(start, kept_prompt)`` of a prompt + completion cut to ``max_length`` tokens as TRL's
    collator cuts it (the first ``max_length`` with ``"keep_start"``, the last with
    ``"keep_end"``): where the kept tokens start, and how many of them are prompt tokens."""
    if max_length is None:
        return 0, prompt_len
    if mode == "keep_start":
        return 0, min(prompt_len, max_length)
    start = max(prompt_len + completion_len - max_length, 0)
    return start, max(prompt_len - start, 0)


class TokenizedPreferenceDataset(Dataset):
    """Tokenized preference pairs for :class:`fastdpo.DPO`, made from text records by
    :meth:`from_records` (see there for how text becomes ids).

    ``ds[i]`` is a dict of 1-D int64 tensors ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    (TRL 1.16's prepared dataset's columns: whole, not yet truncated).  ``ds.indices[i]`` is the
    record it came from (records dropped by ``max_length`` are skipped).  ``ds.pad_id`` is the
    id batches are padded with (the tokenizer's pad token, else its EOS token).

    :meth:`collate` makes the :class:`~fastdpo.data.batch.PairBatch` ``DPO.forward`` takes,
    ``dpo(**batch)``, with both sequence masks, as TRL's
    ``DataCollatorForPreference`` makes its batch: each pair's prompt + chosen and prompt +
    rejected, each cut to ``max_length`` tokens (the first ones with ``"keep_start"``, the last
    with ``"keep_end"``), right padded with ``pad_id`` to the longest of the batch's 2B sequences:
    ``preferred_seq``, ``unpreferred_seq`` (B, L) int64, ``prompt_mask`` (B, L) bool (True on the
    kept prompt tokens, shared by the pair), ``preferred_seq_mask``, ``unpreferred_seq_mask`` (B,
    L) bool (True on real tokens: explicit, since the pad id is often the EOS id, and a
    completion's own EOS token is scored).  TRL's ``input_ids`` are ``cat(preferred_seq,
    unpreferred_seq)``, its ``attention_mask`` the sequence masks, its ``completion_mask``
    ``~prompt_mask & seq_mask``; with ``DPO(..., logprob_reduction="sum", mask_alignment="target")`` the loss is
    TRL's.
    """

    def __init__(self, prompt: _Ragged, chosen: _Ragged, rejected: _Ragged, rows: Tensor, *, pad_id: int,
                 max_length: int | None, truncation_mode: str, indices: list[int]):
        self._prompt, self._chosen, self._rejected, self._rows = prompt, chosen, rejected, rows
        self.pad_id, self.max_length, self.truncation_mode, self.indices = pad_id, max_length, truncation_mode, indices

    @classmethod
    def from_records(
        cls, records, tokenizer, *, max_length: int | None = None, truncation_mode: str = "keep_start",
        tools=None, chat_template_kwargs: Mapping | None = None, num_proc: int | None = None,
    ) -> TokenizedPreferenceDataset:
        """Text preference records tokenized once, here, exactly as TRL 1.16's ``DPOTrainer``
        prepares them (``_prepare_dataset``), batched as its ``DataCollatorForPreference`` does.

        Args:
            records: a list of dicts, a ``datasets.Dataset`` (tokenized by its ``map``, with
                ``num_proc`` processes) or the path of a JSON Lines file.  Each record has
                ``chosen`` and ``rejected`` and, if the first record has one, ``prompt``: all
                plain text, or all lists of messages (dicts with ``role`` and ``content``; the
                completions as assistant messages).  Without a prompt, the prompt is the start
                ``chosen`` and ``rejected`` share (TRL's ``extract_prompt``).  A record's own
                ``tools`` (a list, or a JSON str) and ``chat_template_kwargs`` go to the chat
                template with it.
            tokenizer: a ``transformers`` tokenizer.  Plain text: each completion gets its EOS
                token unless it ends with it, and prompt, prompt + chosen and prompt + rejected
                are tokenized as ``tokenizer(text=...)`` (with its special tokens, e.g. BOS).
                Messages: rendered and tokenized by its chat template (``apply_chat_template``),
                the prompt with the generation prompt.  The completion starts where the
                tokenized prompt and prompt + completion diverge (tokens can merge across the
                seam).  Batches are padded with its pad token, else its EOS token.
            max_length: None (no truncation) or the most tokens of a prompt + completion; with
                ``"keep_start"`` records whose prompt alone has ``max_length`` tokens are
                dropped (with a warning saying how many; a ``ValueError`` if all are).
            truncation_mode: ``"keep_start"`` (the first ``max_length`` tokens) or ``"keep_end"``
                (the last; a ``ValueError`` when it would cut a pair's two prompts to different
                lengths, which one ``prompt_mask`` cannot mark).
            tools, chat_template_kwargs: for messages, the tools and template arguments of
                every record (a record's own ``tools`` replace ``tools``; its
                ``chat_template_kwargs`` are merged over these).
            num_proc: processes for ``datasets.Dataset.map`` (a ``datasets.Dataset`` only).

        Returns: the dataset: ``ds[i]`` is a dict of
        ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``ds.collate`` makes the
        :class:`~fastdpo.data.batch.PairBatch` ``dpo(**batch)`` takes (``preferred_seq``, ``unpreferred_seq``, ``prompt_mask``,
        ``preferred_seq_mask``, ``unpreferred_seq_mask``).  Errors name the record and field.
        """
        return tokenize_records(records, tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                                tools=tools, chat_template_kwargs=chat_template_kwargs, num_proc=num_proc)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        j = int(self._rows[index])
        return dict(zip(ITEM_KEYS, (self._prompt[j], self._chosen[j], self._rejected[j])))

    def collate(self, batch: Sequence[Mapping[str, Tensor]]) -> PairBatch:
        """The :class:`~fastdpo.data.batch.PairBatch` of a list of items (see the class docstring):
        ``dpo(**batch)``."""
        if len(batch) == 0:
            raise ValueError("collate got an empty batch")
        pairs = []
        for i, item in enumerate(batch):
            if not isinstance(item, Mapping) or not all(
                isinstance(item.get(k), Tensor) and item[k].ndim == 1 for k in ITEM_KEYS
            ):
                raise TypeError(f"batch item {i} must be a dataset item (a dict of 1-D prompt_ids, chosen_ids, "
                                f"rejected_ids) as ds[i] returns; got {type(item).__name__}")
            p = item["prompt_ids"]
            cut = []
            for c in (item["chosen_ids"], item["rejected_ids"]):
                start, kept = window(len(p), len(c), self.max_length, self.truncation_mode)
                seq = torch.cat((p, c))[start:]
                cut.append((seq if self.max_length is None else seq[: self.max_length], kept))
            if cut[0][1] != cut[1][1]:
                raise ValueError(f"batch item {i}: truncation keeps {cut[0][1]} prompt tokens before the chosen and "
                                 f"{cut[1][1]} before the rejected completion; one prompt_mask cannot mark both")
            pairs.append(cut)
        length = max(len(seq) for pair in pairs for seq, _ in pair)
        b = len(pairs)
        seqs = torch.full((2, b, length), self.pad_id, dtype=torch.long)
        real = torch.zeros(2, b, length, dtype=torch.bool)
        prompt = torch.zeros(b, length, dtype=torch.bool)
        for i, pair in enumerate(pairs):
            for s, (seq, _) in enumerate(pair):
                seqs[s, i, : len(seq)] = seq
                real[s, i, : len(seq)] = True
            prompt[i, : pair[0][1]] = True
        return PairBatch(seqs[0], seqs[1], prompt, real[0], real[1])


# ----------------------------------------------------------------------------- the pipeline


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # shown only when tokenizing takes more than a second
    return tqdm(total=total, desc="fastdpo: tokenizing records", unit="record", delay=1.0)


def _check_arguments(tokenizer, max_length, truncation_mode, tools, chat_template_kwargs, num_proc) -> None:
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


def tokenize_records(records, tokenizer, *, max_length: int | None = None, truncation_mode: str = "keep_start",
                     tools=None, chat_template_kwargs: Mapping | None = None,
                     num_proc: int | None = None) -> TokenizedPreferenceDataset:
    """What :meth:`fastdpo.TokenizedPreferenceDataset.from_records` does (its docstring says how)."""
    _check_arguments(tokenizer, max_length, truncation_mode, tools, chat_template_kwargs, num_proc)
    dataset = _hf_dataset(records)
    if dataset is None:
        if isinstance(records, (str, os.PathLike)):
            records = read_jsonl(records)
        elif not isinstance(records, Sequence):
            raise TypeError(f"records must be a list of dicts, a datasets.Dataset or a JSON Lines path, got "
                            f"{type(records).__name__}")
        if num_proc is not None:
            raise ValueError("num_proc parallelizes datasets.Dataset.map: it needs records as a datasets.Dataset")
    n = len(records)
    if n == 0:
        raise ValueError("records is empty")
    first = records[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"records[0] must be a mapping (a dict with 'chosen' and 'rejected'), got "
                        f"{type(first).__name__}")
    conversational = any(_is_messages(first.get(k)) for k in FIELDS)
    if not conversational and (tools is not None or chat_template_kwargs):
        raise ValueError("tools and chat_template_kwargs go to the chat template, and these records are plain text "
                         "(records[0] has no list of messages)")
    pad_id = _pad_id(tokenizer)
    if not conversational and tokenizer.eos_token is None:
        raise ValueError("plain-text records need the tokenizer's EOS token (appended to each completion), and "
                         "tokenizer.eos_token is None: set it, or give the records as messages")
    plan = _Plan(first.get("prompt") is not None, conversational, tokenizer.eos_token, tools,
                 dict(chat_template_kwargs or {}))
    if dataset is not None:
        mapped = dataset.map(_map_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                             num_proc=num_proc, fn_kwargs={"tokenizer": tokenizer, "plan": plan},
                             desc="fastdpo: tokenizing records")
        table = mapped.with_format("arrow")[:]
        prompt, chosen, rejected = (_Ragged.of_arrow(table.column(f"{k}_ids")) for k in FIELDS)
        cut = table.column("prompt_cut").to_pylist()
    else:
        columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_cut": []}
        bar = _progress(n) if n > _CHUNK else None
        for start in range(0, n, _CHUNK):
            rows = records[start: start + _CHUNK]
            for k, v in tokenize_rows(rows, start, tokenizer, plan).items():
                columns[k].extend(v)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        prompt, chosen, rejected = (_Ragged.of_lists(columns[f"{k}_ids"]) for k in FIELDS)
        cut = columns["prompt_cut"]
    if any(cut):
        warnings.warn(
            f"{sum(cut)} of {n} records (the first records[{cut.index(True)}]): the tokenized prompt is not a prefix "
            f"of the tokenized prompt + completion (tokens merge across the seam, or the chat template renders the "
            f"prompt alone differently); as TRL does, the completion starts where the two diverge and the prompt "
            f"keeps only the tokens they share", stacklevel=3)
    rows = _kept_rows(prompt.lengths, chosen.lengths, rejected.lengths, max_length, truncation_mode)
    return TokenizedPreferenceDataset(prompt, chosen, rejected, rows, pad_id=pad_id, max_length=max_length,
                                      truncation_mode=truncation_mode, indices=rows.tolist())


def _kept_rows(p: Tensor, c: Tensor, r: Tensor, max_length: int | None, mode: str) -> Tensor:
    """The records kept (TRL's rule: with ``"keep_start"``, a prompt of ``max_length`` tokens or
    more leaves no completion token, and its record is dropped), checking that truncation keeps
    the same prompt before both completions of each pair (one ``prompt_mask`` marks both)."""
    n = len(p)
    if max_length is None:
        return torch.arange(n)
    if mode == "keep_start":
        keep = p < max_length
        dropped = n - int(keep.sum())
        if dropped == n:
            raise ValueError(f"max_length={max_length} drops every record: each prompt alone has max_length tokens or "
                             f"more (the shortest {int(p.min())}), which leaves no completion token (TRL drops them)")
        if dropped:
            warnings.warn(f"max_length={max_length} drops {dropped} of {n} records whose prompt alone has max_length "
                          f"tokens or more (no completion token would be left), as TRL does", stacklevel=4)
        return keep.nonzero().flatten()
    # keep_end: window()'s kept prompt, for every record at once
    kept_c = (p - (p + c - max_length).clamp(min=0)).clamp(min=0)
    kept_r = (p - (p + r - max_length).clamp(min=0)).clamp(min=0)
    bad = (kept_c != kept_r).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        longest = int(torch.maximum(p + c, p + r)[bad].max())
        raise ValueError(
            f"truncation_mode='keep_end' with max_length={max_length} keeps {int(kept_c[i])} prompt tokens before "
            f"records[{i}]'s chosen completion and {int(kept_r[i])} before its rejected one ({len(bad)} such records): "
            f"DPO takes one prompt_mask per pair, so it cannot score them as TRL does; use truncation_mode="
            f"'keep_start' (TRL's default; TRL 1.16 deprecates keep_end), or max_length >= {longest}"
        )
    return torch.arange(n)
