"""GRPO, Dr. GRPO and DAPO: critic-free RL with group-relative advantages.

One iteration (Shao et al. 2024, DeepSeekMath, Algorithm 1 with outcome supervision):

1. take ``grpo.prompts_per_iteration`` prompts; sample G = ``grpo.num_generations`` completions of
   each with the current policy (rows group-contiguous: p0,p0,..,p1,p1,..);
2. score them with ``reward`` (+ missing-EOS penalty; + DAPO overlong shaping if ``overlong_cache``);
3. DAPO dynamic sampling (``drop_equal_groups``): groups whose G rewards are all equal have zero
   advantage and no policy-gradient signal; drop them and sample more prompts to refill, up to
   ``max_refill_rounds`` rounds (what was dropped / refilled / still missing is logged);
4. advantages A_i = (r_i - mean(r_group)) [/ std(r_group)] (``ops.group_advantages``), one per
   sequence, broadcast to its tokens;
5. old log-probs and reference log-probs (temperature-scaled, no grad); the reference is the
   adapter-disabled policy under LoRA, else a frozen copy of the initial policy, and there is none
   when beta = 0;
6. ``ppo_epochs`` optimizer steps on the per-token loss (``losses.grpo_token_loss``)

       l_{i,t} = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps_low, 1 + eps_high)) + beta * k3_{i,t}

   aggregated by loss type:

   ===========  ==================================  ===========  =====================
   loss_type    aggregation                          std scaling  eps_high default
   ===========  ==================================  ===========  =====================
   grpo         seq_mean: (1/B) sum_i mean_t l       yes          eps_low
   dr_grpo      seq_sum_const: sum l / (B * L_max)   no           eps_low
   dapo         token_mean: sum l / sum_i |o_i|      yes          0.28 (clip-higher)
   ===========  ==================================  ===========  =====================

   with L_max = ``generation.max_new_tokens`` (Liu et al. 2025, Dr. GRPO; Yu et al. 2025, DAPO).

Logged per iteration (metrics.jsonl, TensorBoard): scores (mean raw reward), rewards/<name>,
objective/scores (mean shaped reward the advantages use), objective/kl (mean over sequences of
sum_t log pi_old - log pref, comparable with PPO/RLOO), objective/kl_k3 (token mean of the k3 term
in the loss), objective/entropy, advantages/std, policy/clipfrac, policy/approxkl, policy/ratio,
loss/policy, grad_norm, response_length, no_eos_frac, frac_equal_groups, dapo/* (dynamic sampling),
lr, time/generation, time/training; eval/* at step 0 and at the end (greedy).
Everything else (sampling, scoring, reference, optimizer, checkpoints, processes) is ``online.OnlineRun``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from alignkit.config import ConfigError, GRPOConfig, GRPOSection
from alignkit.losses import dapo_overlong_penalty, grpo_token_loss, ppo_policy_loss
from alignkit.online.rollout import ScoredRollout, equal_reward_groups
from alignkit.online.run import OnlineRun
from alignkit.online.update import TokenLossFn, masked_token_mean, sequence_kl, update_policy
from alignkit.ops.advantages import group_advantages
from alignkit.ops.kl import kl_k3
from alignkit.train.run import log


# ---------------------------------------------------------------- variants
class Variant(NamedTuple):
    aggregation: str
    scale_by_std: bool
    eps_low: float
    eps_high: float


# loss_type -> (aggregation, default std scaling, default eps_high or None for eps_low)
LOSS_TYPES: dict[str, tuple[str, bool, float | None]] = {
    "grpo": ("seq_mean", True, None),
    "dr_grpo": ("seq_sum_const", False, None),
    "dapo": ("token_mean", True, 0.28),
}


def resolve_variant(g: GRPOSection) -> Variant:
    """Derived settings of a loss type; explicit ``scale_rewards`` / ``eps_high`` win over the defaults."""
    aggregation, default_scale, default_eps_high = LOSS_TYPES[g.loss_type]
    scale = default_scale if g.scale_rewards is None else g.scale_rewards
    eps_high = g.eps_high if g.eps_high is not None else (default_eps_high or g.eps_low)
    return Variant(aggregation, scale, g.eps_low, eps_high)


def check_config(cfg: GRPOConfig) -> None:
    """Cross-section checks (before anything is written)."""
    g = cfg.grpo
    if g.overlong_cache is not None and g.overlong_cache > cfg.generation.max_new_tokens:
        raise ConfigError(
            f"grpo.overlong_cache ({g.overlong_cache}) must be <= generation.max_new_tokens "
            f"({cfg.generation.max_new_tokens}): it is the window before the maximum length"
        )


# ---------------------------------------------------------------- loss
def make_token_loss(beta: float, eps_low: float, eps_high: float) -> TokenLossFn:
    """GRPO per-token loss (``losses.grpo_token_loss``) plus the PPO diagnostics clipfrac / approxkl."""

    def token_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor):
        per_token_loss = grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, beta, eps_low, eps_high)
        with torch.no_grad():
            pg = ppo_policy_loss(logprobs, old_logprobs, advantages, cliprange=eps_low, cliprange_high=eps_high)
        return per_token_loss, {"policy/clipfrac": pg.clipfrac, "policy/approxkl": pg.approxkl, "policy/ratio": pg.ratio}

    return token_loss


# ---------------------------------------------------------------- rewards and dynamic sampling
def add_overlong_penalty(scored: ScoredRollout, max_len: int, cache_len: int | None) -> ScoredRollout:
    """DAPO soft overlong punishment (Yu et al. 2025 eq. 13) added to the rewards; logged as
    ``rewards/overlong_penalty``. ``cache_len = None``: unchanged."""
    if cache_len is None:
        return scored
    penalty = dapo_overlong_penalty(scored.rollout.response_lengths.cpu(), max_len, cache_len).float()  # [B]
    parts = {**scored.parts, "rewards/overlong_penalty": penalty}
    return ScoredRollout(scored.rollout, scored.scores, scored.rewards + penalty, parts)


def group_rows(groups: list[int], group_size: int) -> list[int]:
    return [g * group_size + j for g in groups for j in range(group_size)]


def collect_groups(
    sample: Callable[[int], ScoredRollout],
    num_prompts: int,
    group_size: int,
    drop_equal_groups: bool,
    max_refill_rounds: int,
    pad_token_id: int,
    refill_size: Callable[[int], int] = lambda missing: missing,
) -> tuple[ScoredRollout | None, ScoredRollout, dict[str, float]]:
    """``sample(k)`` draws k groups; with ``drop_equal_groups`` apply DAPO dynamic sampling (Yu et al. 2025,
    Algorithm 1): keep only groups whose rewards are not all equal, and sample as many new prompts as are
    missing, for at most ``max_refill_rounds`` extra rounds. ``refill_size(missing)``: how many to draw (under
    several processes every process must draw the same number: the largest need).

    Returns (batch to train on, or None if no group survived; every sampled row, for statistics;
    counters ``dapo/dropped_groups``, ``dapo/refilled_groups``, ``dapo/refill_rounds``,
    ``dapo/kept_groups``, ``dapo/missing_groups``; empty without dynamic sampling).
    """
    batch = sample(num_prompts)
    if not drop_equal_groups:
        return batch, batch, {}
    sampled, kept = [batch], []
    n_kept = dropped = refilled = rounds = 0
    while True:
        equal = equal_reward_groups(batch.rewards, group_size)  # [n]
        keep = [i for i, e in enumerate(equal.tolist()) if not e][: num_prompts - n_kept]
        dropped += int(equal.sum())
        refilled += len(keep) if rounds > 0 else 0
        if keep:
            kept.append(batch.select(group_rows(keep, group_size)))
        n_kept += len(keep)
        need = refill_size(num_prompts - n_kept)
        if need == 0 or rounds >= max_refill_rounds:
            break
        rounds += 1
        batch = sample(need)
        sampled.append(batch)
    stats = {
        "dapo/dropped_groups": dropped,
        "dapo/refilled_groups": refilled,
        "dapo/refill_rounds": rounds,
        "dapo/kept_groups": n_kept,
        "dapo/missing_groups": num_prompts - n_kept,
    }
    train_batch = ScoredRollout.concat(kept, pad_token_id) if kept else None
    return train_batch, ScoredRollout.concat(sampled, pad_token_id), stats


# ---------------------------------------------------------------- training
def train(cfg: GRPOConfig, resume: bool = False) -> dict:
    g = cfg.grpo
    check_config(cfg)
    variant = resolve_variant(g)
    G = g.num_generations
    run = OnlineRun.start(cfg, f"grpo ({g.loss_type})", resume, total_steps=g.num_iterations * g.ppo_epochs,
                          reference=g.beta > 0)
    log(f"grpo: {variant}, beta {g.beta}, G {G}, {g.prompts_per_iteration} prompts/iteration")
    token_loss = make_token_loss(g.beta, variant.eps_low, variant.eps_high)
    P = run.num_processes
    local_prompts = run.per_process(g.prompts_per_iteration, "grpo.prompts_per_iteration")

    def sample(k: int) -> ScoredRollout:  # k prompts of this process; the global draw is k * P
        scored = run.sample(*run.next_prompts(k * P), num_samples=G)
        return add_overlong_penalty(scored, cfg.generation.max_new_tokens, g.overlong_cache)

    run.evaluate_before()
    metrics: dict[str, float] = {}
    for iteration in run.iterations(g.num_iterations):
        lr = run.lr
        batch, sampled, dynamic = collect_groups(sample, local_prompts, G, g.drop_equal_groups,
                                                 g.max_refill_rounds, run.tokenizer.pad_token_id, run.all_max)
        metrics = {**sampled.stats(), **dynamic, "lr": lr}
        metrics["frac_equal_groups"] = float(equal_reward_groups(sampled.rewards, G).float().mean())
        if run.all_max(batch is None):  # every process updates or none does (DDP needs all in the backward)
            log(f"grpo iteration {iteration}: dynamic sampling kept no group (on some process): no update this iteration")
        else:
            rollout = batch.rollout
            mask = rollout.response_mask  # [B, R]
            old_logprobs, entropy = run.policy_logprobs(rollout, g.micro_batch_size)  # [B, R] each
            ref_logprobs = run.ref_logprobs(rollout, g.micro_batch_size)  # [B, R] or None
            advantages = group_advantages(batch.rewards, G, scale_by_std=variant.scale_by_std)  # [B]
            metrics.update(update_policy(
                run, rollout, old_logprobs, ref_logprobs, advantages.to(run.device), token_loss,
                variant.aggregation, micro_batch_size=g.micro_batch_size, num_epochs=g.ppo_epochs,
                max_len=cfg.generation.max_new_tokens,
            ))
            metrics["objective/scores"] = float(batch.rewards.mean())
            metrics["objective/entropy"] = masked_token_mean(entropy, mask)
            if ref_logprobs is not None:
                metrics["objective/kl"] = float(sequence_kl(old_logprobs, ref_logprobs, mask).mean())
                metrics["objective/kl_k3"] = masked_token_mean(kl_k3(old_logprobs, ref_logprobs), mask)
            metrics["advantages/std"] = run.global_std(advantages)
            metrics["advantages/abs_mean"] = float(advantages.abs().mean())
        run.end_iteration(iteration, metrics, g.save_every)
    return run.finish({"loss_type": g.loss_type, "variant": variant._asdict(), "final_metrics": metrics})
