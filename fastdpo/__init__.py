"""fastdpo: fused, exact DPO losses for PyTorch.

``from fastdpo import DPO`` is a drop-in for ``from x_transformers.dpo import DPO``; ``ORPO`` and
``CPO`` (with SimPO and AlphaPO) are the reference-free families, ``KTO`` the unpaired one, on
the same fused head.  ``fastdpo.train.train(TrainConfig(...))`` (``fastdpo train`` on the command
line) trains a Hugging Face causal LM on text preference records.
"""

from .data.batch import PairBatch
from .data.datasets import KTODataset, PreferenceDataset
from .data.kto_text import TokenizedKTODataset
from .data.text import TokenizedPreferenceDataset
from .losses.kto import KTO_LOSS_TYPES
from .losses import LOSS_TYPES, check_loss_config, dpo_loss, preference_loss, reward_metrics
from .losses.reference_free import CPO_LOSS_TYPES
from .modules.base import PreferenceModule
from .modules.cpo import CPO
from .modules.dpo import DPO, precompute_reference_scores
from .modules.kto import KTO
from .modules.orpo import ORPO
from .scoring.linear_op import linear_sequence_logprobs
from .scoring.logits_op import sequence_logprobs, sequence_logprobs_pair, sequence_logprobs_with_reference
from .train.config import TrainConfig

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
    "PairBatch",
    "KTODataset",
    "TokenizedPreferenceDataset",
    "TokenizedKTODataset",
    "dpo_loss",
    "linear_sequence_logprobs",
    "precompute_reference_scores",
    "sequence_logprobs",
    "sequence_logprobs_pair",
    "sequence_logprobs_with_reference",
    "TrainConfig",
]
__version__ = "0.1.0"
