"""Advantage estimators: GAE (PPO), group-normalised (GRPO), leave-one-out (RLOO)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.ops.kl import kl_k1
from alignkit.ops.stats import last_index


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation, Schulman et al. (2016) eq. 16; Huang et al. (2024) N+ details.

        delta_t = r_t + gamma * V_{t+1} - V_t,   V_T = 0
        A_t = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t   (before any advantage whitening)

    rewards, values, mask: [B, T] over response tokens, right-padded (mask 1 on real tokens
    incl. EOS). Rewards and values are zeroed on padding first, so the value after the last
    real token is 0. Outputs are targets: no gradient, zero on padding.
    """
    values = values * mask  # [B, T]
    rewards = rewards * mask  # [B, T]
    T = rewards.shape[-1]
    lastgaelam = torch.zeros_like(rewards[:, 0])  # [B]
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]
    returns = advantages + values
    return advantages * mask, returns * mask


def compute_gae_loop(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Reference GAE as a plain double loop over samples and timesteps (same contract as
    ``compute_gae``); used to test the vectorised version."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=rewards.dtype)
    returns = torch.zeros(B, T, dtype=rewards.dtype)
    for i in range(B):
        m = [float(mask[i, t]) for t in range(T)]
        r = [float(rewards[i, t]) * m[t] for t in range(T)]
        v = [float(values[i, t]) * m[t] for t in range(T)]
        a_next = 0.0
        for t in reversed(range(T)):
            v_next = v[t + 1] if t + 1 < T else 0.0
            delta = r[t] + gamma * v_next - v[t]
            a_next = delta + gamma * lam * a_next
            advantages[i, t] = a_next * m[t]
            returns[i, t] = (a_next + v[t]) * m[t]
    return advantages.to(rewards.device), returns.to(rewards.device)


def _grouped(rewards: Tensor, group_size: int, name: str) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{name} expects rewards of shape [B*G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{name}: {rewards.numel()} rewards is not a multiple of the group size {group_size}"
        )
    return rewards.view(-1, group_size)  # [B, G]


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages, Shao et al. (2024) DeepSeekMath sec. 4.1.2 (outcome supervision):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    Dr. GRPO (Liu et al. 2025) drops the std division (``scale_by_std=False``).
    rewards: [B*G], group-contiguous. Groups whose rewards are all equal get exactly 0.
    """
    if group_size < 1:
        raise ValueError(f"group_advantages: group_size must be >= 1, got {group_size}")
    grouped = _grouped(rewards, group_size, "group_advantages")  # [B, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    advantages = torch.where(all_equal, torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)  # [B*G]


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out, Ahmadian et al. (2024) eq. 6 (Kool et al. 2019):

        A_i = r_i - 1/(k-1) sum_{j != i} r_j = k/(k-1) (r_i - mean(r))
    rewards: [B*k], group-contiguous. Returns [B*k]; each group's advantages sum to 0.
    """
    if k < 2:
        raise ValueError(f"rloo_advantages needs k >= 2 samples per prompt, got k={k}")
    grouped = _grouped(rewards, k, "rloo_advantages")  # [B, k]
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def kl_penalized_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, response_mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards of PPO and REINFORCE++ (Ziegler et al. 2019 eq. 2 spread over tokens; Stiennon et al.
    2020; Hu 2025):

        kl_t = log pi(y_t) - log pi_ref(y_t)                (k1)
        r_t  = -beta * kl_t + s * [t = last response token]

    logprobs, ref_logprobs, response_mask: [B, R]; scores: [B]. Returns (rewards, kl), both [B, R] and zero
    outside the response. With pi == pi_ref every r_t is 0 except the score.
    """
    mask = response_mask.to(logprobs.dtype)
    kl = kl_k1(logprobs, ref_logprobs) * mask  # [B, R]
    rewards = -kl_coef * kl  # [B, R]
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    rewards[rows, last_index(response_mask)] += scores.to(rewards.dtype)
    return rewards, kl


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over response tokens (REINFORCE returns; Hu 2025 uses gamma = 1).

    rewards, mask: [B, T] right-padded; padding contributes nothing and gets 0. Returns [B, T].
    """
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)  # [B, T]
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask
