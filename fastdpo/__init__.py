"""fastdpo: fused, exact DPO losses for PyTorch.

``from fastdpo import DPO`` is a drop-in for ``from x_transformers.dpo import DPO``.
"""

from .data import PreferenceDataset
from .dpo import DPO, precompute_reference_scores
from .linear import linear_sequence_logprobs
from .losses import dpo_loss
from .ops import sequence_logprobs, sequence_logprobs_pair

__all__ = [
    "DPO",
    "PreferenceDataset",
    "dpo_loss",
    "linear_sequence_logprobs",
    "precompute_reference_scores",
    "sequence_logprobs",
    "sequence_logprobs_pair",
]
__version__ = "0.1.0"
