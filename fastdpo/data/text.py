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

The steps KTO's text records (:mod:`.kto_text`) take too are :mod:`.records`'s, one copy each;
what is here is the pair's: its fields, the one prompt boundary of its two completions, its
dataset and collate.  Neither TRL nor ``datasets`` is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batch import PairBatch
from .records import (
    Plan,
    Ragged,
    check_arguments,
    common_prefix_length,
    encode,
    kept_by_prompt,
    open_records,
    pair_fields,
    read_jsonl,
    tokenize_all,
    warn_seam,
    window,
)

__all__ = ["TokenizedPreferenceDataset", "read_jsonl", "tokenize_records"]

FIELDS = ("prompt", "chosen", "rejected")
ITEM_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")  # an item's ids: TRL's prepared columns


def tokenize_rows(rows: Sequence, start: int, tokenizer, plan: Plan) -> dict[str, list]:
    """``records[start:start + len(rows)]`` as ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (one
    list of ids a record) and ``prompt_cut`` (True where the tokenized prompt is not a prefix of
    the tokenized prompt + completion)."""
    where = range(start, start + len(rows))
    texts = [pair_fields(i, rec, plan) for i, rec in zip(where, rows)]
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_cut": []}
    for i, (prompt, chosen, rejected) in zip(where, encode(texts, rows, where, tokenizer, plan)):
        n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            if len(ids) <= n:
                raise ValueError(
                    f"records[{i}]: the {name} completion tokenizes to nothing (prompt + {name} is "
                    f"{len(ids)} tokens, the prompt it shares {n})"
                )
        out["prompt_ids"].append(list(prompt[:n]))
        out["chosen_ids"].append(list(chosen[n:]))
        out["rejected_ids"].append(list(rejected[n:]))
        out["prompt_cut"].append(n < len(prompt))
    return out


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

    def __init__(self, prompt: Ragged, chosen: Ragged, rejected: Ragged, rows: Tensor, *, pad_id: int,
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


def tokenize_records(records, tokenizer, *, max_length: int | None = None, truncation_mode: str = "keep_start",
                     tools=None, chat_template_kwargs: Mapping | None = None,
                     num_proc: int | None = None) -> TokenizedPreferenceDataset:
    """What :meth:`fastdpo.TokenizedPreferenceDataset.from_records` does (its docstring says how)."""
    check_arguments(tokenizer, max_length, truncation_mode, tools, chat_template_kwargs, num_proc)
    source, plan, pad_id = open_records(records, tokenizer, FIELDS, tools=tools,
                                        chat_template_kwargs=chat_template_kwargs, num_proc=num_proc)
    columns = tokenize_all(source, tokenize_rows, tokenizer, plan, num_proc)
    prompt, chosen, rejected = (columns[k] for k in ITEM_KEYS)
    warn_seam(columns["prompt_cut"], range(len(prompt)), "records", stacklevel=3)
    rows = _kept_rows(prompt.lengths, chosen.lengths, rejected.lengths, max_length, truncation_mode)
    return TokenizedPreferenceDataset(prompt, chosen, rejected, rows, pad_id=pad_id, max_length=max_length,
                                      truncation_mode=truncation_mode, indices=rows.tolist())


def _kept_rows(p: Tensor, c: Tensor, r: Tensor, max_length: int | None, mode: str) -> Tensor:
    """The records kept (TRL's rule, :func:`~.records.kept_by_prompt`, with ``"keep_start"``),
    checking that ``"keep_end"`` truncation keeps the same prompt before both completions of each
    pair (one ``prompt_mask`` marks both)."""
    n = len(p)
    if max_length is None:
        return torch.arange(n)
    if mode == "keep_start":
        return kept_by_prompt(p, max_length, "records", stacklevel=4)
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
