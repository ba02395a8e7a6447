"""GRPO per-token loss and DAPO overlong reward shaping."""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.losses.ppo import ppo_policy_loss
from alignkit.ops.kl import kl_k3


def grpo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tensor:
    """Per-token GRPO loss, Shao et al. (2024) DeepSeekMath eq. 3 (negated), with DAPO
    clip-higher (Yu et al. 2025, eps_low != eps_high):

        l_{i,t} = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps_low, 1 + eps_high))
                  + beta * D_KL,   D_KL = pref/pi - log(pref/pi) - 1  (k3, eq. 4)

    All log-prob tensors [B, T]; advantages [B] or [B, T]. beta = 0 drops the KL term, and
    then ``ref_logprobs`` may be None. Returns [B, T]; reduce with ``aggregate_token_losses``.
    """
    per_token_loss = ppo_policy_loss(
        logprobs, old_logprobs, advantages, cliprange=eps_low, cliprange_high=eps_high
    ).pg_losses  # [B, T]
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError(f"grpo_token_loss: ref_logprobs is required when beta != 0 (beta={beta})")
        per_token_loss = per_token_loss + beta * kl_k3(logprobs, ref_logprobs)
    return per_token_loss


def dapo_overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """Soft overlong punishment, Yu et al. (2025) DAPO eq. 13:

        R(L) = 0                              if L <= L_max - L_cache
               ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
               -1                             if L > L_max

    lengths: [B] response lengths. Returns [B] (float), added to the task reward.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"dapo_overlong_penalty needs 0 < cache_len <= max_len, got {cache_len=}, {max_len=}")
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    expected_len = max_len - cache_len
    linear = (expected_len - lengths) / cache_len  # [B]
    penalty = torch.where(lengths <= expected_len, torch.zeros_like(lengths), linear)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
