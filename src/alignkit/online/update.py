"""The clipped policy update shared by the critic-free methods (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++).

One optimizer step per epoch over the WHOLE rollout batch (TRL's GRPO with ``steps_per_generation = 1``; the
GRPO paper's mu = ``ppo_epochs``), accumulated over micro-batches. Each micro-batch's aggregate is weighted so
the accumulated gradient is the gradient of the full-batch aggregate (``ops.stats.aggregate_token_losses``),
whatever the micro-batch size (grad-accum 1x8 == 8x1) and whatever the number of processes: the weights use
the GLOBAL row and token counts and undo DDP's mean over processes, so 2 processes x b rows step exactly like
1 process x 2b rows. With ``ppo_epochs = 1`` the update is on-policy (ratio 1, no clipping).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignkit.online.rollout import select_rows
from alignkit.ops.stats import aggregate_token_losses, masked_mean, masked_sum
from alignkit.rollout.engine import Rollout, response_logprobs

TokenLossFn = Callable[[Tensor, Tensor, "Tensor | None", Tensor], "tuple[Tensor, dict[str, Tensor]]"]
"""``(logprobs [b, T], old_logprobs [b, T], ref_logprobs [b, T] | None, advantages [b] or [b, T])
-> (per-token losses [b, T], {metric name: per-token values [b, T]})``; the metrics are averaged over the
response tokens of the batch (and over epochs) by :func:`update_policy`."""


def microbatch_weight(mode: str, mb_mask: Tensor, batch_size: int, total_tokens: Tensor) -> Tensor | float:
    """Factor that turns a micro-batch's aggregate into its share of the full-batch aggregate.

    seq_mean, seq_sum_const: both are (1/B) sum_i (...)_i, so a micro-batch of b rows weighs b / B.
    token_mean: sum_{i,t} l / N_tokens, so a micro-batch with n tokens weighs n / N_tokens.
    """
    if mode == "token_mean":
        return mb_mask.sum() / total_tokens.clamp(min=1)
    return mb_mask.shape[0] / batch_size


def update_policy(
    run,
    rollout: Rollout,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    token_loss_fn: TokenLossFn,
    aggregation: str,
    *,
    micro_batch_size: int,
    num_epochs: int = 1,
    max_len: int | None = None,
) -> dict[str, float]:
    """``num_epochs`` optimizer steps of ``run`` (an ``OnlineRun``) on this process's rollout rows; returns
    ``loss/policy``, ``grad_norm`` and the token-mean of each metric of ``token_loss_fn``, averaged over epochs."""
    B = len(rollout)
    if B == 0:
        raise ValueError("update_policy got an empty rollout batch")
    response_mask = rollout.response_mask.to(old_logprobs.dtype)  # [B, R]
    counts = run.all_sum(torch.tensor([float(B), float(response_mask.sum())]))  # rows, response tokens: global
    global_rows, global_tokens = float(counts[0]), counts[1].to(response_mask.device)
    P = run.num_processes
    stat_sums: dict[str, float] = {}
    n_tokens, loss_sum, grad_norm_sum = 0.0, 0.0, 0.0
    run.model.train()
    for _ in range(num_epochs):
        for start in range(0, B, micro_batch_size):
            end = min(start + micro_batch_size, B)
            mb = select_rows(rollout, list(range(start, end)))
            w = mb.response_ids.shape[1]
            mb_mask = response_mask[start:end, :w]  # [b, w]
            mb_adv = advantages[start:end]
            if mb_adv.dim() == 2:
                mb_adv = mb_adv[:, :w]
            with run.autocast():
                logprobs = response_logprobs(run.model, mb, run.cfg.generation.temperature)  # [b, w]
            mb_ref = ref_logprobs[start:end, :w] if ref_logprobs is not None else None
            token_losses, stats = token_loss_fn(logprobs, old_logprobs[start:end, :w], mb_ref, mb_adv)  # [b, w]
            loss = aggregate_token_losses(token_losses, mb_mask, aggregation, max_len)
            loss = loss * microbatch_weight(aggregation, mb_mask, global_rows, global_tokens) * P
            run.backward(loss)
            loss_sum += float(loss.detach()) / P
            n_tokens += float(mb_mask.sum())
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(masked_sum(v.detach().float(), mb_mask))
        grad_norm_sum += run.step()[0]
    loss_total = float(run.all_sum(torch.tensor(loss_sum, dtype=torch.float64)))
    metrics = {"loss/policy": loss_total / num_epochs, "grad_norm": grad_norm_sum / num_epochs}
    metrics.update({k: v / max(n_tokens, 1.0) for k, v in stat_sums.items()})
    return metrics


def masked_token_mean(x: Tensor, mask: Tensor) -> float:
    return float(masked_mean(x.float(), mask.to(x.device).float()))


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B]: sum_t (log pi - log pref) over response tokens (k1 summed: the sequence-level KL estimate)."""
    return masked_sum(logprobs - ref_logprobs, mask.to(logprobs.dtype), dim=-1)
