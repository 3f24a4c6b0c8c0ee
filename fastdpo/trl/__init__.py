"""Drop-in trainers for TRL 1.16: TRL's trainers with the loss computed by fastdpo.

``from fastdpo.trl import DPOTrainer`` in place of ``from trl import DPOTrainer``; the same
config, datasets, collator, callbacks, accelerate and PEFT set-up, logging, evaluation, saving
and hub code (TRL's own: each class here subclasses TRL's and overrides the one method that
computes the loss and, for DPO and KTO, the one that scores the reference for
``precompute_ref_log_probs``):

* :class:`DPOTrainer` (``trl.DPOTrainer``) with :class:`DPOConfig` (``trl.DPOConfig`` plus
  ``packing``) -- :class:`fastdpo.DPO`;
* :class:`KTOTrainer` (``trl.KTOTrainer``) -- :class:`fastdpo.KTO`;
* :class:`ORPOTrainer`, :class:`CPOTrainer` (TRL 1.16 ships these in ``trl.experimental``:
  ``trl.experimental.orpo.ORPOTrainer``, ``trl.experimental.cpo.CPOTrainer``) --
  :class:`fastdpo.ORPO`, :class:`fastdpo.CPO`.

May import: :mod:`fastdpo.modules`, :mod:`fastdpo.models`, :mod:`fastdpo.batching`,
:mod:`fastdpo.losses`, :mod:`fastdpo.data`, :mod:`fastdpo._checks` (tests/test_architecture.py),
and ``trl``, which ``import fastdpo`` never imports.
"""

from __future__ import annotations

import importlib.metadata

# The trainers override TRL methods whose contract changes between releases (DPOTrainer._compute_loss,
# compute_ref_log_probs, ORPOTrainer.get_batch_loss_metrics): one minor release is supported.
SUPPORTED = ("1.16",)

try:
    _version = importlib.metadata.version("trl")
except importlib.metadata.PackageNotFoundError:
    raise ImportError("fastdpo.trl needs TRL 1.16 (trl>=1.16,<1.17): pip install fastdpo[trl]") from None
if ".".join(_version.split(".")[:2]) not in SUPPORTED:
    raise ImportError(
        f"fastdpo.trl supports TRL 1.16 only (its trainers override TRL's loss methods), found trl {_version}: "
        f"pip install fastdpo[trl]"
    )

from .dpo import DPOConfig, DPOTrainer
from .kto import KTOTrainer
from .orpo_cpo import CPOTrainer, ORPOTrainer

__all__ = ["SUPPORTED", "CPOTrainer", "DPOConfig", "DPOTrainer", "KTOTrainer", "ORPOTrainer"]
