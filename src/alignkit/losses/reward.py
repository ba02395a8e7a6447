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


def soft_bradley_terry_loss(rewards_a: Tensor, rewards_b: Tensor, p: Tensor) -> Tensor:
    """Bradley-Terry loss on a soft label (Bai et al. 2022, Constitutional AI, sec. 4.1: the feedback model's
    normalised probability that A is better is the target):

        L = -[p log sigma(r_A - r_B) + (1 - p) log sigma(r_B - r_A)]

    ``p`` = P(A better) in [0, 1]; p = 1 is :func:`bradley_terry_loss`. Inputs [B]; returns [B].
    At r_A = r_B the loss is log 2 for every p; its minimum over r_A - r_B is at logit(p).
    """
    logits = rewards_a - rewards_b  # [B]
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def masked_bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, weight: Tensor) -> Tensor:
    """Bradley-Terry loss of H reward heads, each pair weighted per head:

        L[p, h] = w[p, h] * -log sigma(r_h(x, y_w) - r_h(x, y_l))

    w masks the heads a pair does not train (multi-objective heads: 1 for the head of the pair's category, else 0)
    or carries a bootstrap count (a heads-ensemble: w ~ Poisson(1), the online bootstrap). Inputs [P, H]; returns
    [P, H]; the caller divides the sum by sum(w). Equal scores at w = 1 give log 2.
    """
    return weight * bradley_terry_loss(chosen_rewards, rejected_rewards)  # [P, H]
