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
