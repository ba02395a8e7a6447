"""Supervised fine-tuning loss."""

from __future__ import annotations

from torch import Tensor

from alignkit.ops.stats import masked_mean


def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-example negative log-likelihood (Radford et al. 2018; Ouyang et al. 2022 sec. 3.5):

        L_i = -(1 / |y_i|) sum_t m_{i,t} log pi(y_{i,t} | x_i, y_{i,<t})

    token_logps: [B, T] log-probs of the target tokens; mask: [B, T], 1 on completion tokens.
    Returns [B]; an example with no completion token gets 0.
    """
    return -masked_mean(token_logps, mask, dim=-1)  # [B]
