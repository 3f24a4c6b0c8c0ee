"""What users hold: the preference-loss modules around a model.

* :mod:`.base` -- :class:`~.base.PreferenceModule`: the policy, the reference, the routes, the
  checked batch; what every family shares;
* :mod:`.dpo` -- :class:`~.dpo.DPO` (the drop-in for x-transformers') and
  :func:`~.dpo.precompute_reference_scores`;
* :mod:`.orpo`, :mod:`.cpo` -- the reference-free families (CPO with SimPO and AlphaPO);
* :mod:`.kto` -- KTO, on unpaired completions;
* :mod:`.options` -- each module's constructor, written from its options (declared once).

May import: :mod:`fastdpo.scoring`, :mod:`fastdpo.batching`, :mod:`fastdpo.models`,
:mod:`fastdpo.losses`, :mod:`fastdpo._checks`, :mod:`fastdpo._options` (tests/test_architecture.py holds it to that).
"""
