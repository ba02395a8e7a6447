"""PPO clipped policy and value losses, per token (not reduced).

Schulman et al. (2017) "Proximal Policy Optimization", eq. 7 (clipped surrogate);
Huang et al. (2024) "The N+ implementation details of RLHF with PPO" (value clipping,
variable names). Callers reduce with ``alignkit.ops.stats.masked_mean``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PolicyLossOutput(NamedTuple):
    pg_losses: Tensor  # [B, T] max(pg_losses1, pg_losses2), carries the gradient
    ratio: Tensor  # [B, T] detached
    clipfrac: Tensor  # [B, T] float 0/1, 1 where the clipped branch is active
    approxkl: Tensor  # [B, T] detached 0.5 * (logprobs - old_logprobs)^2


class ValueLossOutput(NamedTuple):
    vf_losses: Tensor  # [B, T] 0.5 * max(vf_losses1, vf_losses2)
    vf_clipfrac: Tensor  # [B, T] float 0/1


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate (Schulman et al. 2017 eq. 7), negated to a loss:

        rho = exp(log pi - log pi_old)
        L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))

    eps_low = ``cliprange``; eps_high = ``cliprange_high`` or ``cliprange`` (DAPO clip-higher).
    logprobs, old_logprobs: [B, T]; advantages: [B, T] or [B] (one per sequence, broadcast).
    """
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    eps_high = cliprange if cliprange_high is None else cliprange_high
    logratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(logratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + eps_high)
    pg_losses = torch.max(pg_losses1, pg_losses2)
    clipfrac = (pg_losses2 > pg_losses1).to(logprobs.dtype)
    approxkl = 0.5 * logratio.detach() ** 2
    return PolicyLossOutput(pg_losses, ratio.detach(), clipfrac, approxkl)


def ppo_value_loss(
    vpreds: Tensor, old_values: Tensor, returns: Tensor, cliprange_value: float = 0.2
) -> ValueLossOutput:
    """Clipped value loss (Huang et al. 2024, N+ details; OpenAI lm-human-preferences):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L = 0.5 * max((V - R)^2, (V_clip - R)^2)

    All inputs [B, T]; returns per-token losses and the clipped-branch indicator.
    """
    vpredclipped = old_values + torch.clamp(vpreds - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2  # [B, T]
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_losses = 0.5 * torch.max(vf_losses1, vf_losses2)
    vf_clipfrac = (vf_losses2 > vf_losses1).to(vpreds.dtype)
    return ValueLossOutput(vf_losses, vf_clipfrac)
