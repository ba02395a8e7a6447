"""Reward-model (preference) loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Bradley-Terry pairwise loss, Ouyang et al. (2022) InstructGPT eq. 1; Stiennon et al. (2020):

        L = -log sigma(r(x, y_w) - r(x, y_l) - m)

    ``margin`` m (Llama 2, Touvron et al. 2023 eq. 2) is optional. Inputs [B]; returns [B].
    Equal scores give log 2.
    """
    logits = chosen_rewards - rejected_rewards  # [B]
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def masked_bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, weight: Tensor) -> Tensor:
    """Bradley-Terry loss of H reward heads, each pair weighted per head:

        L[p, h] = w[p, h] * -log sigma(r_h(x, y_w) - r_h(x, y_l))

    w masks the heads a pair does not train (multi-objective heads: 1 for the head of the pair's category, else 0)
    or carries a bootstrap count (a heads-ensemble: w ~ Poisson(1), the online bootstrap). Inputs [P, H]; returns
    [P, H]; the caller divides the sum by sum(w). Equal scores at w = 1 give log 2.
    """
    return weight * bradley_terry_loss(chosen_rewards, rejected_rewards)  # [P, H]
