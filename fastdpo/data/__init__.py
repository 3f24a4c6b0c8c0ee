"""Preference data: pair and unpaired datasets of token ids, and text records made into them.

* :mod:`.datasets` -- :class:`~.datasets.PreferenceDataset`, :class:`~.datasets.KTODataset`
  and their collate functions;
* :mod:`.text` -- text records (TRL's formats) tokenized as TRL 1.16's ``DPOTrainer`` does.

May import: :mod:`fastdpo._checks` only (tests/test_architecture.py holds it to that).
"""
