"""Preference data: pair and unpaired datasets of token ids, and text records made into them.

* :mod:`.datasets` -- :class:`~.datasets.PreferenceDataset`, :class:`~.datasets.KTODataset`
  and their collate functions;
* :mod:`.text` -- text preference records (TRL's formats) tokenized as TRL 1.16's
  ``DPOTrainer`` does (:class:`~.text.TokenizedPreferenceDataset` and its ``from_records``);
* :mod:`.kto_text` -- text records for KTO (unpaired, or pairs to unpair) tokenized as TRL
  1.16's ``KTOTrainer`` does (:class:`~.kto_text.TokenizedKTODataset`, a ``KTODataset``);
* :mod:`.records` -- the steps both take (reading and checking records, tokenizing a prompt
  and its completions, the ``datasets.map`` pipeline, TRL's ``max_length`` drop), one copy each;
* :mod:`.batch` -- :class:`~.batch.PairBatch`, what both pair datasets' ``collate`` give.

May import: :mod:`fastdpo._checks` only (tests/test_architecture.py holds it to that).
"""
