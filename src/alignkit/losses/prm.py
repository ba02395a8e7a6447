"""Process reward model loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def prm_step_loss(step_logits: Tensor, step_labels: Tensor, step_mask: Tensor) -> Tensor:
    """Per-step binary cross-entropy of a process reward model, Lightman et al. (2023) sec. 2.6, Wang et al. (2024)
    Math-Shepherd eq. 3, read at each step's separator token s_k:

        L = -1/K sum_k [ y_k log sigma(z_{s_k}) + (1 - y_k) log(1 - sigma(z_{s_k})) ]

    step_logits z: [B, T] the PRM's logit at every position; step_labels y: [B, T] in [0, 1] (soft Math-Shepherd
    labels allowed), read only where step_mask [B, T] is 1 (the separator positions s_k). Returns [B], each
    sequence's mean over its K steps (0 for a sequence without steps).
    """
    mask = step_mask.to(step_logits.dtype)  # [B, T]
    bce = F.binary_cross_entropy_with_logits(step_logits, step_labels.to(step_logits.dtype), reduction="none")  # [B, T]
    return (bce * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
