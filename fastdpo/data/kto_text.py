"""Text records for KTO -> the token ids and batches :class:`fastdpo.KTO` takes, as TRL 1.16's
``KTOTrainer`` makes them.

:func:`tokenize_kto_records` (what :meth:`fastdpo.TokenizedKTODataset.from_records` runs) does
what ``KTOTrainer._prepare_dataset`` does to a text dataset, in this order: preference pairs
(records with ``chosen`` and ``rejected``) are unpaired as TRL's ``unpair_preference_dataset``
unpairs them (after TRL's ``extract_prompt`` when they have no prompt): each chunk of records
gives its chosen completions, labelled True, then its rejected ones, labelled False; plain
completions end with the EOS token (appended unless already there); each prompt and prompt +
completion is tokenized (messages through the tokenizer's chat template, the prompt with the
generation prompt); the completion starts where the two diverge; with ``max_length``,
completions whose prompt alone has ``max_length`` tokens are dropped.  The steps DPO's text
records take too are :mod:`.records`'s, one copy each.

:class:`TokenizedKTODataset` holds the result.  It is a :class:`~.datasets.KTODataset`, whose
``collate`` does what TRL's ``DataCollatorForUnpairedPreference`` does with the KL completions
``_prepare_dataset`` adds (each batch's completions rotated by one): so the KL sequences are
built per batch, at collate time, rather than stored per item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .datasets import KTODataset, as_label
from .records import (
    Plan,
    Ragged,
    check_arguments,
    common_prefix_length,
    encode,
    kept_by_prompt,
    open_records,
    pair_fields,
    text_fields,
    tokenize_all,
    warn_seam,
)

__all__ = ["TokenizedKTODataset", "tokenize_kto_records"]

FIELDS = ("prompt", "completion", "chosen", "rejected")  # the text fields a record may have


def _unpaired_fields(i: int, rec, plan: Plan) -> tuple:
    """``records[i]``'s (prompt, completion, label), checked."""
    prompt, completion = text_fields(i, rec, ("prompt", "completion"), plan)
    if rec.get("label") is None:
        raise ValueError(f"records[{i}] has no 'label' field (True for a desirable completion, False for an "
                         f"undesirable one)")
    return prompt, completion, as_label(f"records[{i}]['label']", rec["label"])


def tokenize_rows(rows: Sequence, start: int, tokenizer, plan: Plan) -> dict[str, list]:
    """``records[start:start + len(rows)]`` as unpaired rows: ``prompt_ids``, ``completion_ids``
    (one list of ids a row), ``label``, ``record`` (the index of the record a row comes from) and
    ``prompt_cut`` (True where the tokenized prompt is not a prefix of the tokenized prompt +
    completion).  Pairs give two rows each: the chunk's chosen completions (label True), then its
    rejected ones (False), the order of TRL's ``unpair_preference_dataset`` (one ``map`` batch
    of ``records._CHUNK`` records at a time)."""
    where = list(range(start, start + len(rows)))
    if plan.paired:
        pairs = [pair_fields(i, rec, plan) for i, rec in zip(where, rows)]
        texts = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
        label = [True] * len(rows) + [False] * len(rows)
        names = ["chosen"] * len(rows) + ["rejected"] * len(rows)
        where, rows = where * 2, list(rows) * 2  # a pair's tools and template arguments go with both rows
    else:
        fields = [_unpaired_fields(i, rec, plan) for i, rec in zip(where, rows)]
        texts = [(p, c) for p, c, _ in fields]
        label = [lab for _, _, lab in fields]
        names = ["completion"] * len(rows)
    out = {"prompt_ids": [], "completion_ids": [], "label": label, "record": where, "prompt_cut": []}
    for i, name, (prompt, whole) in zip(where, names, encode(texts, rows, where, tokenizer, plan)):
        n = common_prefix_length(prompt, whole)
        if len(whole) <= n:
            raise ValueError(f"records[{i}][{name!r}] tokenizes to nothing: prompt + {name} is {len(whole)} tokens, "
                             f"the prompt it shares {n} (KTO scores at least one completion token)")
        out["prompt_ids"].append(list(prompt[:n]))
        out["completion_ids"].append(list(whole[n:]))
        out["prompt_cut"].append(n < len(prompt))
    return out


class _Rows(Sequence):
    """The kept rows as :class:`~.datasets.KTODataset` reads its ``data``: mappings of ``prompt``,
    ``completion`` (1-D int64) and ``label`` (a bool)."""

    def __init__(self, prompt: Ragged, completion: Ragged, label: Tensor, rows: Tensor):
        self._prompt, self._completion, self._label, self._rows = prompt, completion, label, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        j = int(self._rows[index])
        return {"prompt": self._prompt[j], "completion": self._completion[j], "label": bool(self._label[j])}


class TokenizedKTODataset(KTODataset):
    """Tokenized unpaired completions for :class:`fastdpo.KTO`, made from text records by
    :meth:`from_records` (see there for how text becomes ids).

    A :class:`~fastdpo.KTODataset` (its ``data`` the kept rows, read from flat storage): ``ds[i]``
    is ``(prompt, completion, label)``, two 1-D int64 tensors (TRL 1.16's prepared
    ``prompt_ids`` and ``completion_ids``, whole, not yet truncated) and a 0-d bool tensor.
    ``ds.indices[i]`` is the record it came from (a pair gives two items; completions dropped by
    ``max_length`` are skipped).  ``ds.pad_id`` is the tokenizer's pad token, else its EOS token.

    :meth:`~fastdpo.KTODataset.collate` makes the mapping ``KTO.forward`` takes, ``kto(**batch)``,
    as TRL's ``DataCollatorForUnpairedPreference`` makes its batch: ``seq``, ``prompt_mask``,
    ``seq_mask`` (N, L), ``label`` (N,) and, with ``kl=True``, ``kl_seq``, ``kl_prompt_mask``,
    ``kl_seq_mask`` (N, L'): each prompt + completion (and each prompt + the batch's previous
    completion) cut to its first ``max_length`` tokens and right padded with ``pad_id``.  TRL's
    ``input_ids`` are ``seq``, its ``attention_mask`` ``seq_mask``, its ``completion_mask``
    ``~prompt_mask & seq_mask`` (and the same of its ``KL_`` keys); with ``KTO(...,
    logprob_reduction="sum", mask_alignment="target")`` the loss is TRL's.
    """

    def __init__(self, prompt: Ragged, completion: Ragged, label: Tensor, rows: Tensor, *, pad_id: int,
                 max_length: int | None, kl: bool, indices: list[int]):
        super().__init__(_Rows(prompt, completion, label, rows), pad_id=pad_id, kl=kl, max_length=max_length)
        self.indices = indices

    @classmethod
    def from_records(
        cls, records, tokenizer, *, max_length: int | None = None, truncation_mode: str = "keep_start",
        tools=None, chat_template_kwargs: Mapping | None = None, num_proc: int | None = None, kl: bool = True,
    ) -> TokenizedKTODataset:
        """Text records for KTO tokenized once, here, exactly as TRL 1.16's ``KTOTrainer``
        prepares them (``_prepare_dataset``), batched as its ``DataCollatorForUnpairedPreference``
        does.

        Args:
            records: a list of dicts, a ``datasets.Dataset`` (tokenized by its ``map``, with
                ``num_proc`` processes) or the path of a JSON Lines file.  Each record is an
                unpaired completion, ``prompt``, ``completion`` and ``label`` (a bool: True for
                a desirable completion), or, as ``records[0]`` is, a preference pair,
                ``chosen``, ``rejected`` and ``prompt`` if ``records[0]`` has one: TRL unpairs
                those (``unpair_preference_dataset``; without a prompt, it is the start chosen
                and rejected share, TRL's ``extract_prompt``), and so does this: the chosen
                completions of each chunk of 1000 records, labelled True, then its rejected ones,
                labelled False (TRL's order; with ``num_proc``, chunks within each process's
                share of the records).  All text fields plain text, or all lists of messages
                (dicts with ``role`` and ``content``; the completions as assistant messages).  A
                record's own ``tools`` (a list, or a JSON str) and ``chat_template_kwargs`` go
                to the chat template with it.
            tokenizer: a ``transformers`` tokenizer.  Plain text: each completion gets its EOS
                token unless it ends with it, and prompt and prompt + completion are tokenized
                as ``tokenizer(text=...)`` (with its special tokens, e.g. BOS).  Messages:
                rendered and tokenized by its chat template, the prompt with the generation
                prompt.  The completion starts where the tokenized prompt and prompt +
                completion diverge (tokens can merge across the seam; a warning says how many
                completions that touches).  Batches are padded with its pad token, else its EOS
                token.
            max_length: None (no truncation) or the most tokens of a prompt + completion (and
                of a KTO KL sequence): each is cut to its first ``max_length`` tokens, and
                completions whose prompt alone has ``max_length`` tokens are dropped (with a
                warning saying how many; a ``ValueError`` if all are).
            truncation_mode: ``"keep_start"`` only: TRL 1.16's ``KTOTrainer`` has no other (a
                ``ValueError`` for ``"keep_end"``); here so that one set of options serves
                :meth:`fastdpo.TokenizedPreferenceDataset.from_records` and this.
            tools, chat_template_kwargs: for messages, the tools and template arguments of
                every record (a record's own ``tools`` replace ``tools``; its
                ``chat_template_kwargs`` are merged over these).
            num_proc: processes for ``datasets.Dataset.map`` (a ``datasets.Dataset`` only).
            kl: collate builds the KL sequences (True, for ``loss_type="kto"``) or not (False,
                for ``"apo_zero_unpaired"``, for which TRL builds none).

        Returns: the dataset: ``ds[i]`` is ``(prompt, completion, label)`` and ``ds.collate``
        makes the mapping ``kto(**batch)`` takes (``seq``, ``prompt_mask``, ``seq_mask``,
        ``label``, and with ``kl`` ``kl_seq``, ``kl_prompt_mask``, ``kl_seq_mask``).  Errors
        name the record and field.
        """
        return tokenize_kto_records(records, tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                                    tools=tools, chat_template_kwargs=chat_template_kwargs, num_proc=num_proc, kl=kl)


def tokenize_kto_records(records, tokenizer, *, max_length: int | None = None, truncation_mode: str = "keep_start",
                         tools=None, chat_template_kwargs: Mapping | None = None, num_proc: int | None = None,
                         kl: bool = True) -> TokenizedKTODataset:
    """What :meth:`fastdpo.TokenizedKTODataset.from_records` does (its docstring says how)."""
    check_arguments(tokenizer, max_length, truncation_mode, tools, chat_template_kwargs, num_proc)
    if truncation_mode != "keep_start":
        raise ValueError(f"truncation_mode={truncation_mode!r}: TRL 1.16's KTOTrainer has only 'keep_start' (its "
                         f"collator keeps each sequence's first max_length tokens), and so does KTODataset")
    source, plan, pad_id = open_records(records, tokenizer, FIELDS, tools=tools,
                                        chat_template_kwargs=chat_template_kwargs, num_proc=num_proc)
    columns = tokenize_all(source, tokenize_rows, tokenizer, plan, num_proc)
    prompt, record = columns["prompt_ids"], columns["record"]
    warn_seam(columns["prompt_cut"], record, "completions", stacklevel=3)
    rows = kept_by_prompt(prompt.lengths, max_length, "completions", stacklevel=3)
    label = torch.tensor(columns["label"], dtype=torch.bool)
    return TokenizedKTODataset(prompt, columns["completion_ids"], label, rows, pad_id=pad_id, max_length=max_length,
                               kl=kl, indices=[record[j] for j in rows.tolist()])
