"""Preference datasets and their collate functions: pairs of token ids for :class:`fastdpo.DPO`
(:class:`PreferenceDataset`; from text records, :meth:`fastdpo.TokenizedPreferenceDataset.from_records`
in :mod:`fastdpo.data.text`: both give a :class:`~fastdpo.data.batch.PairBatch`), unpaired
labelled completions for :class:`fastdpo.KTO` (:class:`KTODataset`; from text records,
:meth:`fastdpo.TokenizedKTODataset.from_records` in :mod:`fastdpo.data.kto_text`, a subclass)."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import _checks
from .batch import PairBatch
from .text import TokenizedPreferenceDataset


def _tokens(index: int, key: str, item: Mapping, *, empty_ok: bool = False) -> Tensor:
    """``item[key]`` as checked 1-D int64 token ids (``data[index]`` in the messages)."""
    if key not in item:
        raise ValueError(f"data[{index}] has no {key!r} entry")
    x = item[key]
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x, dtype=torch.long) if empty_ok and len(x) == 0 else torch.as_tensor(x)
    name = f"data[{index}][{key!r}]"
    _checks.tensor(name, x, ndim=1)
    if x.numel() == 0 and not empty_ok:
        raise ValueError(f"{name} must hold at least one token, got an empty sequence")
    _checks.integer_tokens(name, x, ndim=1)
    return x.long()


def as_label(name: str, label) -> bool:
    """A KTO label (Python's or numpy's bool, or a one-element bool tensor: True = desirable) as a
    bool; a ``TypeError`` naming ``name`` for anything else (an int too: 0/1 labels are refused
    rather than guessed)."""
    if isinstance(label, Tensor) and label.numel() == 1 and label.dtype == torch.bool:
        label = bool(label)
    if not isinstance(label, bool) and type(label).__name__ != "bool_":  # Python's or numpy's bool
        raise TypeError(f"{name} must be a bool (True = desirable), got {type(label).__name__}")
    return bool(label)


class PreferenceDataset(Dataset):
    """Preference pairs ``(preferred, unpreferred, prompt_mask)`` for DPO.

    Follows the x-transformers preference-dataset pattern.  Each item of ``data`` is a mapping
    with ``preferred`` and ``unpreferred`` (1-D integer token ids, prompt then completion) and
    ``prompt_len`` (how many leading tokens are prompt, shared by both).

    ``ds[i]`` returns ``(preferred, unpreferred, prompt_mask)``, three (L,) tensors with
    ``prompt_mask = arange(L) < prompt_len``.  When the two sequences differ in length the
    shorter one is right-padded with ``pad_id`` (a ``ValueError`` if ``pad_id`` is None); give
    the same ``pad_id`` to ``DPO`` so padding is masked out.

    :meth:`collate` right-pads a batch of items of different lengths to a common length, so
    ``DataLoader(ds, batch_size=8, collate_fn=ds.collate)`` yields
    ``(preferred (B, L), unpreferred (B, L), prompt_mask (B, L))`` ready for ``dpo(p, u,
    prompt_mask=m)``, or ``dpo(**batch)`` (a :class:`~fastdpo.data.batch.PairBatch`).  Padded positions of ``prompt_mask`` are False: padding is removed by
    the sequence masks that ``DPO`` derives from ``pad_id``.
    """

    def __init__(self, data: Sequence[Mapping], *, pad_id: int | None = None):
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        self.data = data
        self.pad_id = pad_id

    @classmethod
    def from_records(cls, records, tokenizer, **options) -> TokenizedPreferenceDataset:
        """The earlier place of :meth:`fastdpo.TokenizedPreferenceDataset.from_records`, the class it
        returns (kept for one release, with a ``DeprecationWarning``)."""
        warnings.warn("PreferenceDataset.from_records is now TokenizedPreferenceDataset.from_records, the "
                      "class it returns", DeprecationWarning, stacklevel=2)
        return TokenizedPreferenceDataset.from_records(records, tokenizer, **options)

    def __len__(self) -> int:
        return len(self.data)

    def _tokens(self, index: int, key: str, item: Mapping) -> Tensor:
        return _tokens(index, key, item)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        item = self.data[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"data[{index}] must be a mapping, got {type(item).__name__}")
        preferred = self._tokens(index, "preferred", item)
        unpreferred = self._tokens(index, "unpreferred", item)
        if "prompt_len" not in item:
            raise ValueError(f"data[{index}] has no 'prompt_len' entry")
        prompt_len = item["prompt_len"]
        if isinstance(prompt_len, Tensor) and prompt_len.numel() == 1:
            prompt_len = prompt_len.item()
        try:  # any integer (numpy's too), but not a bool or a float
            if isinstance(prompt_len, bool):
                raise TypeError
            prompt_len = operator.index(prompt_len)
        except TypeError:
            raise TypeError(
                f"data[{index}]['prompt_len'] must be an int, got {type(prompt_len).__name__}"
            ) from None
        length = max(len(preferred), len(unpreferred))
        if not 0 <= prompt_len <= min(len(preferred), len(unpreferred)):
            raise ValueError(
                f"data[{index}]['prompt_len'] must be in [0, {min(len(preferred), len(unpreferred))}]"
                f" (the shorter sequence's length), got {prompt_len}"
            )
        if len(preferred) != len(unpreferred):
            preferred = self._pad(preferred, length, f"data[{index}]")
            unpreferred = self._pad(unpreferred, length, f"data[{index}]")
        prompt_mask = torch.arange(length) < prompt_len
        return preferred, unpreferred, prompt_mask

    def _pad(self, x: Tensor, length: int, where: str) -> Tensor:
        if len(x) == length:
            return x
        if self.pad_id is None:
            raise ValueError(
                f"{where}: sequences of different lengths need padding, but pad_id is None; "
                "pass PreferenceDataset(..., pad_id=...)"
            )
        return torch.cat((x, x.new_full((length - len(x),), self.pad_id)))

    def collate(
        self, batch: Sequence[tuple[Tensor, Tensor, Tensor]]
    ) -> PairBatch:
        """Stack items into (B, L) tensors, right-padding to the longest item with ``pad_id``: a
        :class:`~fastdpo.data.batch.PairBatch` ``(preferred_seq, unpreferred_seq, prompt_mask)``."""
        if len(batch) == 0:
            raise ValueError("collate got an empty batch")
        for i, entry in enumerate(batch):
            if not (isinstance(entry, Sequence) and len(entry) == 3) or not all(
                isinstance(x, Tensor) and x.ndim == 1 for x in entry
            ):
                raise TypeError(
                    f"batch item {i} must be a dataset item (preferred, unpreferred, prompt_mask) "
                    f"of three 1-D tensors, as ds[i] returns; got {type(entry).__name__}"
                )
        length = max(len(x) for entry in batch for x in entry)
        preferred, unpreferred, prompt = [], [], []
        for i, (p, u, m) in enumerate(batch):
            preferred.append(self._pad(p, length, f"batch item {i}"))
            unpreferred.append(self._pad(u, length, f"batch item {i}"))
            prompt.append(torch.cat((m, m.new_zeros(length - len(m)))))
        return PairBatch(torch.stack(preferred), torch.stack(unpreferred), torch.stack(prompt))


class KTODataset(Dataset):
    """Unpaired completions ``(prompt, completion, label)`` for :class:`fastdpo.KTO`.

    Each item of ``data`` is a mapping with ``prompt`` (1-D integer token ids, may be empty),
    ``completion`` (1-D integer token ids, at least one) and ``label`` (a bool: True for a
    desirable completion).  ``ds[i]`` returns ``(prompt, completion, label)``: two 1-D int64
    tensors and a 0-d bool tensor.

    :meth:`collate` makes the mapping ``KTO.forward`` takes (``kto(**batch)``), as TRL 1.16's
    ``DataCollatorForUnpairedPreference`` does with the KL completions of its
    ``_prepare_dataset``: ``seq`` (N, L), each prompt followed by its completion, right padded
    with ``pad_id``; ``prompt_mask`` and ``seq_mask`` (N, L) bool (True on the prompt; True on
    real tokens); ``label`` (N,) bool; and, with ``kl=True`` (default), the KL sequences
    ``kl_seq``, ``kl_prompt_mask``, ``kl_seq_mask`` (N, L'): prompt ``i`` followed by
    completion ``i - 1`` (the completions rotated by +1 within the batch, ``(x_1, y_N), (x_2,
    y_1), ..., (x_N, y_{N-1})``), padded on their own.  So ``DataLoader(ds, batch_size=B,
    collate_fn=ds.collate)`` without shuffling makes TRL's KL pairs (TRL rotates within each
    run of ``per_device_train_batch_size`` examples of its sequential sampler).  A batch of one
    is its own KL pair (TRL refuses a batch size of 1 for KTO: the KL term then equals the
    reward).  ``kl=False`` for ``loss_type="apo_zero_unpaired"``, which has no KL term.

    ``max_length``, when set, cuts each prompt + completion (and each KL sequence) to its first
    ``max_length`` tokens, as TRL's collator.  ``pad_id`` is needed when lengths differ in a
    batch (a ``ValueError`` otherwise).

    From text records (``{"prompt", "completion", "label"}``, or preference pairs, which TRL
    unpairs), :meth:`fastdpo.TokenizedKTODataset.from_records` tokenizes them as TRL 1.16's
    ``KTOTrainer`` does and returns this dataset's subclass (its ``pad_id`` and ``max_length``
    set, this ``collate``).
    """

    def __init__(self, data: Sequence[Mapping], *, pad_id: int | None = None, kl: bool = True,
                 max_length: int | None = None):
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        if not isinstance(kl, bool):
            raise TypeError(f"kl must be a bool, got {type(kl).__name__}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        self.data, self.pad_id, self.kl, self.max_length = data, pad_id, kl, max_length

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        item = self.data[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"data[{index}] must be a mapping, got {type(item).__name__}")
        prompt = _tokens(index, "prompt", item, empty_ok=True)
        completion = _tokens(index, "completion", item)
        if "label" not in item:
            raise ValueError(f"data[{index}] has no 'label' entry (True for a desirable completion)")
        return prompt, completion, torch.tensor(as_label(f"data[{index}]['label']", item["label"]))

    def _rows(self, prompts: list[Tensor], completions: list[Tensor], what: str) -> tuple[Tensor, Tensor, Tensor]:
        """(N, L) ids, prompt mask and sequence mask of prompt + completion rows, right padded."""
        rows = [torch.cat((p, c))[: self.max_length] for p, c in zip(prompts, completions)]
        length = max(len(r) for r in rows)
        if self.pad_id is None and any(len(r) != length for r in rows):
            raise ValueError(f"{what} of different lengths need padding, but pad_id is None; pass "
                             "KTODataset(..., pad_id=...)")
        pad = 0 if self.pad_id is None else self.pad_id
        seq = torch.full((len(rows), length), pad, dtype=torch.long)
        prompt_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        seq_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            seq[i, : len(r)] = r
            prompt_mask[i, : min(len(p), len(r))] = True
            seq_mask[i, : len(r)] = True
        return seq, prompt_mask, seq_mask

    def collate(self, batch: Sequence[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
        """The mapping ``KTO.forward`` takes, of a list of items (see the class docstring)."""
        if len(batch) == 0:
            raise ValueError("collate got an empty batch")
        for i, entry in enumerate(batch):
            if not (isinstance(entry, Sequence) and len(entry) == 3 and all(isinstance(x, Tensor) for x in entry)
                    and entry[0].ndim == 1 and entry[1].ndim == 1 and entry[2].dtype == torch.bool):
                raise TypeError(f"batch item {i} must be a dataset item (prompt, completion, label) as ds[i] "
                                f"returns; got {type(entry).__name__}")
        prompts, completions, labels = zip(*batch)
        out = dict(zip(("seq", "prompt_mask", "seq_mask"), self._rows(prompts, completions, "sequences")))
        out["label"] = torch.stack([x.reshape(()) for x in labels])
        if self.kl:
            rotated = completions[-1:] + completions[:-1]
            kl = self._rows(prompts, rotated, "KL sequences")
            out.update(zip(("kl_seq", "kl_prompt_mask", "kl_seq_mask"), kl))
        return out
