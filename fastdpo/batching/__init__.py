"""From token ids to the batch the models run: checks, the positions that count, packed layouts.

* :mod:`.batch` -- :class:`~.batch.Batch` and its builders (pairs, unpaired sequences), every
  argument checked; the packing plan a module keeps;
* :mod:`.packing` -- the packed layout: pairs laid out in rows, each prompt once; when it pays;
* :mod:`.attention` -- attention by parts over a packed row (no masked block computed);
* :mod:`.sequence_parallel` -- packed rows dealt to the processes of a group, and the
  collectives around attention (Ulysses) and scores;
* :mod:`.ring` -- ring attention over a packed layout dealt to the processes of a group (where
  the heads do not divide by the group);
* :mod:`.options` -- the options every module takes on which tokens count and how pairs pack.

May import: :mod:`fastdpo._checks` and :mod:`fastdpo._options` only: a model's adapter is asked what it accepts, never
imported (tests/test_architecture.py holds it to that).
"""
