"""Pairwise preference losses on per-sequence scores (cheap ops on (B,) vectors)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Per-pair DPO loss ``-log sigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))``, shape (B,).

    Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, eq. 7.  Written
    in the same order of operations as x-transformers' ``DPO`` so results agree bitwise given
    the same scores.
    """
    policy_logratios = policy_chosen - policy_rejected
    ref_logratios = ref_chosen - ref_rejected
    return -F.logsigmoid(beta * (policy_logratios - ref_logratios))
