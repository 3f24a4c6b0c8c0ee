"""The batch of pairs both pair datasets' ``collate`` give: :class:`PairBatch`."""

from __future__ import annotations

import torch
from torch import Tensor

# DPO.forward's keyword arguments, in the order of the tuple.
FIELDS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask")


class PairBatch(tuple):
    """A collated batch of B pairs, as :class:`fastdpo.PreferenceDataset` and
    :class:`fastdpo.TokenizedPreferenceDataset` both make it.

    A tuple ``(preferred_seq, unpreferred_seq, prompt_mask[, preferred_seq_mask,
    unpreferred_seq_mask])`` of (B, L) tensors, as x-transformers' preference datasets give
    (``p, u, m = batch``), that is also the mapping of ``DPO.forward``'s keyword arguments:
    ``dpo(**batch)``, ``batch["prompt_mask"]``, ``batch.keys()``, ``batch.items()``.  The two
    sequence masks are there when the dataset knows its real tokens (the tokenized one), absent
    otherwise (``DPO`` then derives them from ``pad_id``).
    """

    def __new__(cls, preferred_seq: Tensor, unpreferred_seq: Tensor, prompt_mask: Tensor,
                preferred_seq_mask: Tensor | None = None, unpreferred_seq_mask: Tensor | None = None) -> PairBatch:
        if (preferred_seq_mask is None) != (unpreferred_seq_mask is None):
            raise ValueError("give both sequence masks, or neither")
        masks = () if preferred_seq_mask is None else (preferred_seq_mask, unpreferred_seq_mask)
        return super().__new__(cls, (preferred_seq, unpreferred_seq, prompt_mask, *masks))

    def keys(self) -> tuple[str, ...]:
        return FIELDS[: len(self)]

    def values(self) -> tuple[Tensor, ...]:
        return tuple(self)

    def items(self) -> tuple[tuple[str, Tensor], ...]:
        return tuple(zip(self.keys(), self))

    def get(self, key: str, default=None):
        return self[key] if key in self.keys() else default

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self.keys().index(key))
            except ValueError:
                raise KeyError(key) from None
        return tuple.__getitem__(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys() if isinstance(key, str) else tuple.__contains__(self, key)

    def to(self, device: torch.device | str) -> PairBatch:
        """The batch with every tensor on ``device``."""
        return PairBatch(*(x.to(device) for x in self))

    def __repr__(self) -> str:
        return "PairBatch(" + ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.items()) + ")"
