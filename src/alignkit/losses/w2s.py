"""Weak-to-strong losses (Burns et al. 2023, "Weak-to-Strong Generalization", sec. 4.3.2 and appendix A.4).

A binary classifier with one logit z per example, p_f = σ(z).

- ``weak_label_ce``: L = CE(f, y_weak), y_weak the weak supervisor's soft label P(y = 1).
- ``aux_confidence_loss``: L = (1 − α)·CE(f, y_weak) + α·CE(f, ŷ_f), ŷ_f = 1[p_f > t] the student's OWN hardened
  prediction (no gradient through it), t adaptive: the (1 − q) quantile of p_f in the batch, q = the share of
  positive weak labels (mean of 1[y_weak > ½]), so that the hardened predictions keep the weak labels' class
  balance. α is warmed up from 0 by the caller (``alpha_schedule``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def binary_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """−[y log σ(z) + (1 − y) log σ(−z)] per example; soft targets allowed. [B], [B] -> [B]."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


def weak_label_ce(logits: Tensor, weak_probs: Tensor) -> Tensor:
    """CE against the weak supervisor's soft labels: [B] -> [B]."""
    return binary_ce(logits, weak_probs)


def adaptive_threshold(student_probs: Tensor, weak_probs: Tensor) -> Tensor:
    """t = quantile(p_f, 1 − q), q = mean 1[y_weak > ½]: the top-q share of the batch is hardened to 1."""
    q = (weak_probs > 0.5).float().mean()
    return torch.quantile(student_probs.detach().float(), (1 - q).clamp(0.0, 1.0))


def aux_confidence_loss(logits: Tensor, weak_probs: Tensor, alpha: float) -> Tensor:
    """(1 − α)·CE(f, y_weak) + α·CE(f, ŷ_f), ŷ_f = 1[σ(z) > t] (detached), t = :func:`adaptive_threshold`.
    logits, weak_probs: [B] -> [B]. α = 0 is plain weak-label training."""
    p = torch.sigmoid(logits)  # [B]
    t = adaptive_threshold(p, weak_probs)
    hard = (p.detach() > t).to(logits.dtype)  # [B]
    return (1 - alpha) * binary_ce(logits, weak_probs) + alpha * binary_ce(logits, hard)


def alpha_schedule(step: int, total_steps: int, alpha_max: float, warmup_frac: float) -> float:
    """α linearly from 0 to ``alpha_max`` over the first ``warmup_frac`` of the steps, then constant."""
    warm = warmup_frac * total_steps
    return alpha_max if warm <= 0 else alpha_max * min(step / warm, 1.0)
