"""Loss math on per-sequence scores: cheap ops on (B,) or (N,) vectors, no model, no batch layout.

* :mod:`.config` -- DPO's loss options: the type names, :class:`LossConfig`, its one check;
* :mod:`.pairwise` -- DPO's pair losses (every TRL ``loss_type``), their mix, reward metrics;
* :mod:`.reference_free` -- ORPO's and CPO's (SimPO, AlphaPO) losses, no reference;
* :mod:`.kto` -- KTO's loss, KL baseline and metrics on unpaired completions;
* :mod:`.weighting` -- LD-DPO's token weights and WPO's pair weights.

May import: :mod:`fastdpo._checks` only (tests/test_architecture.py holds it to that).
"""

from .config import (
    DISCOPOP_TAU, F_ALPHA_DIVERGENCE_COEF, F_DIVERGENCES, LOSS_TYPES, SIMPO_GAMMA, LossConfig, check_loss_config,
)
from .pairwise import dpo_loss, f_divergence_score, pair_losses, preference_loss, reward_metrics

__all__ = [
    "DISCOPOP_TAU", "F_ALPHA_DIVERGENCE_COEF", "F_DIVERGENCES", "LOSS_TYPES", "SIMPO_GAMMA", "LossConfig",
    "check_loss_config", "dpo_loss", "f_divergence_score", "pair_losses", "preference_loss", "reward_metrics",
]
