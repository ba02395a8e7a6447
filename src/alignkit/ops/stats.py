"""Masked reductions over padded token tensors, and token-loss aggregation modes.

Masks are 0/1 tensors broadcastable to ``x`` (1 = real token). Every reduction guards
against an empty mask (returns 0 there instead of NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATION_MODES = ("seq_mean", "token_mean", "seq_sum_const")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i * m_i over ``dim`` (all elements when ``dim`` is None)."""
    masked = x * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * m) / sum(m) over ``dim``; 0 where sum(m) == 0."""
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    safe_count = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe_count, torch.zeros_like(total))


def last_index(mask: Tensor) -> Tensor:
    """[B, T] -> [B] long: the last column where ``mask`` is non-zero (masks may pad on both sides); 0 for an
    all-zero row. The reward model's last real token (attention mask), PPO's last response token (response mask)."""
    cols = torch.arange(mask.shape[1], device=mask.device)  # [T]
    return (cols * (mask != 0).long()).argmax(dim=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (all of them, one scalar).

    var = mean_m((x - mean_m(x))^2), times n / (n - 1) when ``unbiased`` (Bessel).
    With n <= 1 the correction factor is taken as 1 (so the variance is 0, not inf/NaN).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, all_reduce=None) -> Tensor:
    """Whiten with masked statistics: (x - mean) / sqrt(var + eps); the mean is added back
    when ``shift_mean`` is False (scale only). Padding entries are transformed too and are
    not meaningful; reduce the result with the same mask.

    ``all_reduce`` (a sum over processes, e.g. the online harness's ``all_sum``): the mean and variance are
    those of the masked entries of ALL processes, so data parallelism whitens like one process would.
    """
    if all_reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mask = mask.to(x.dtype)
        total, n = all_reduce(torch.stack([masked_sum(x, mask), mask.expand_as(x).sum()]))
        mean = total / n.clamp(min=1)
        var = all_reduce(masked_sum((x - mean) ** 2, mask)) / n.clamp(min=1) * n / (n - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def aggregate_token_losses(
    token_losses: Tensor, mask: Tensor, mode: str, max_len: int | None = None
) -> Tensor:
    """Reduce per-token losses [B, T] to a scalar.

    - "seq_mean" (GRPO, Shao et al. 2024 eq. 3): (1/B) sum_i (1/|o_i|) sum_t l_{i,t}
    - "token_mean" (DAPO, Yu et al. 2025 eq. 8): sum_{i,t} l_{i,t} / sum_i |o_i|
    - "seq_sum_const" (Dr. GRPO, Liu et al. 2025): sum_{i,t} l_{i,t} / (B * max_len)
    """
    if mode == "seq_mean":
        return masked_mean(token_losses, mask, dim=-1).mean()  # [B] -> scalar
    if mode == "token_mean":
        return masked_mean(token_losses, mask)
    if mode == "seq_sum_const":
        if max_len is None or max_len <= 0:
            raise ValueError(f"mode 'seq_sum_const' needs a positive max_len, got {max_len!r}")
        return masked_sum(token_losses, mask) / (token_losses.shape[0] * max_len)
    raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}")
