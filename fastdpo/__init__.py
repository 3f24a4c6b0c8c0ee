"""fastdpo: fused, exact DPO losses for PyTorch.

``from fastdpo import DPO`` is a drop-in for ``from x_transformers.dpo import DPO``.
"""

from .data import PreferenceDataset
from .dpo import DPO, precompute_reference_scores
from .linear import linear_sequence_logprobs
from .losses import LOSS_TYPES, check_loss_config, dpo_loss, preference_loss, reward_metrics
from .ops import sequence_logprobs, sequence_logprobs_pair

__all__ = [
    "DPO",
    "LOSS_TYPES",
    "check_loss_config",
    "preference_loss",
    "reward_metrics",
    "PreferenceDataset",
    "dpo_loss",
    "linear_sequence_logprobs",
    "precompute_reference_scores",
    "sequence_logprobs",
    "sequence_logprobs_pair",
]
__version__ = "0.1.0"
