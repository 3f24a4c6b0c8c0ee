"""Preference data: pair and unpaired datasets of token ids, and text records made into them.

* :mod:`.datasets` -- :class:`~.datasets.PreferenceDataset`, :class:`~.datasets.KTODataset`
  and their collate functions;
* :mod:`.text` -- text records (TRL's formats) tokenized as TRL 1.16's ``DPOTrainer`` does
  (:class:`~.text.TokenizedPreferenceDataset` and its ``from_records``);
* :mod:`.batch` -- :class:`~.batch.PairBatch`, what both pair datasets' ``collate`` give.

May import: :mod:`fastdpo._checks` only (tests/test_architecture.py holds it to that).
"""
