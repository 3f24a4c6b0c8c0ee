"""Preference-pair dataset and its collate function, shaped for :class:`fastdpo.DPO`."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import _checks


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
    prompt_mask=m)``.  Padded positions of ``prompt_mask`` are False: padding is removed by
    the sequence masks that ``DPO`` derives from ``pad_id``.
    """

    def __init__(self, data: Sequence[Mapping], *, pad_id: int | None = None):
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        self.data = data
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.data)

    def _tokens(self, index: int, key: str, item: Mapping) -> Tensor:
        if key not in item:
            raise ValueError(f"data[{index}] has no {key!r} entry")
        x = item[key]
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        name = f"data[{index}][{key!r}]"
        _checks.tensor(name, x, ndim=1)
        if x.numel() == 0:
            raise ValueError(f"{name} must hold at least one token, got an empty sequence")
        _checks.integer_tokens(name, x, ndim=1)
        return x.long()

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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Stack items into (B, L) tensors, right-padding to the longest item with ``pad_id``."""
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
        return torch.stack(preferred), torch.stack(unpreferred), torch.stack(prompt)
