"""fastdpo: fused, exact DPO losses for PyTorch.

``from fastdpo import DPO`` is a drop-in for ``from x_transformers.dpo import DPO``; ``ORPO`` and
``CPO`` (with SimPO and AlphaPO) are the reference-free families, ``KTO`` the unpaired one, on
the same fused head.  ``fastdpo.train.train(TrainConfig(...))`` (``fastdpo train`` on the command
line) trains a Hugging Face causal LM on text preference records.
"""

from .cpo import CPO
from .data import KTODataset, PreferenceDataset
from .dpo import DPO, precompute_reference_scores
from .family_losses import CPO_LOSS_TYPES
from .kto import KTO, KTO_LOSS_TYPES
from .linear import linear_sequence_logprobs
from .losses import LOSS_TYPES, check_loss_config, dpo_loss, preference_loss, reward_metrics
from .ops import sequence_logprobs, sequence_logprobs_pair
from .orpo import ORPO
from .preference import PreferenceModule
from .text import TokenizedPreferenceDataset
from .train import TrainConfig

__all__ = [
    "DPO",
    "ORPO",
    "CPO",
    "CPO_LOSS_TYPES",
    "KTO",
    "KTO_LOSS_TYPES",
    "PreferenceModule",
    "LOSS_TYPES",
    "check_loss_config",
    "preference_loss",
    "reward_metrics",
    "PreferenceDataset",
    "KTODataset",
    "TokenizedPreferenceDataset",
    "dpo_loss",
    "linear_sequence_logprobs",
    "precompute_reference_scores",
    "sequence_logprobs",
    "sequence_logprobs_pair",
    "TrainConfig",
]
__version__ = "0.1.0"
