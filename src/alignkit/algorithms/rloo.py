"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics").

One iteration:

1. take ``rloo.prompts_per_iteration`` prompts; sample k = ``rloo.num_generations`` completions of
   each (rows group-contiguous);
2. score them with ``reward`` (+ missing-EOS penalty), and form the sequence-level reward with
   the KL penalty to the reference policy (the whole completion is one action):

       R_i = r_i - kl_coef * sum_t (log pi_old(y_t) - log pref(y_t))

   (the reference is the adapter-disabled policy under LoRA, else a frozen copy of the initial
   policy; none when kl_coef = 0);
3. leave-one-out advantages (``ops.rloo_advantages``, Ahmadian et al. eq. 6):

       A_i = R_i - 1/(k-1) sum_{j != i} R_j      (sum_i A_i = 0 within each prompt's group)

4. ``ppo_epochs`` optimizer steps on the clipped surrogate with the sequence-level advantage
   broadcast to every token of the completion:

       rho_{i,t} = pi(y_t) / pi_old(y_t)
       l_{i,t}  = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps))
       loss     = (1/B) sum_i (1/|o_i|) sum_t l_{i,t}        ("seq_mean")

   Choice (documented): per-token ratios with token losses averaged per sequence and then over
   the batch, as GRPO does, rather than one ratio of whole-sequence probabilities (TRL's RLOO):
   per-token ratios stay well conditioned for long completions, and on the first epoch
   (rho = 1) the gradient is -(1/B) sum_i A_i (1/|o_i|) grad log pi(o_i), i.e. REINFORCE with the
   leave-one-out baseline on the length-normalised log-likelihood. With ``ppo_epochs = 1`` the
   update is exactly on-policy and clipping never triggers.

Logged per iteration: scores, rewards/<name>, objective/scores (with the missing-EOS penalty),
objective/kl (mean sum_t log pi_old - log pref), objective/non_score_reward, objective/rlhf_reward
(mean R), objective/entropy, advantages/std, policy/clipfrac, policy/approxkl, policy/ratio,
loss/policy, grad_norm, response_length, no_eos_frac, lr, time/generation, time/training; eval/* at step 0 and at the end (greedy) when ``data.eval`` is set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.config import RLOOConfig
from alignkit.losses import ppo_policy_loss
from alignkit.online.run import OnlineRun
from alignkit.online.update import TokenLossFn, masked_token_mean, sequence_kl, update_policy
from alignkit.ops.advantages import rloo_advantages

AGGREGATION = "seq_mean"


def rloo_rewards(rewards: Tensor, kl: Tensor, kl_coef: float) -> Tensor:
    """Sequence-level KL-penalised reward R = r - kl_coef * KL, with KL = sum_t (log pi - log pref): [B]."""
    return rewards - kl_coef * kl


def make_token_loss(cliprange: float) -> TokenLossFn:
    """Clipped REINFORCE surrogate (``losses.ppo_policy_loss``) with a per-sequence advantage [B]."""

    def token_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor):
        pg = ppo_policy_loss(logprobs, old_logprobs, advantages, cliprange=cliprange)
        return pg.pg_losses, {"policy/clipfrac": pg.clipfrac, "policy/approxkl": pg.approxkl, "policy/ratio": pg.ratio}

    return token_loss


def train(cfg: RLOOConfig, resume: bool = False) -> dict:
    r = cfg.rloo
    k = r.num_generations
    run = OnlineRun.start(cfg, "rloo", resume, total_steps=r.num_iterations * r.ppo_epochs, reference=r.kl_coef > 0)
    token_loss = make_token_loss(r.cliprange)
    run.evaluate_before()
    metrics: dict[str, float] = {}
    for iteration in run.iterations(r.num_iterations):
        lr = run.lr
        batch = run.sample(*run.next_prompts(r.prompts_per_iteration), num_samples=k)
        rollout = batch.rollout
        mask = rollout.response_mask  # [B, R]
        old_logprobs, entropy = run.policy_logprobs(rollout, r.micro_batch_size)  # [B, R] each
        ref_logprobs = run.ref_logprobs(rollout, r.micro_batch_size)  # [B, R] or None
        kl = torch.zeros_like(batch.rewards)  # [B]
        if ref_logprobs is not None:
            kl = sequence_kl(old_logprobs, ref_logprobs, mask).float().cpu()
        rlhf_reward = rloo_rewards(batch.rewards, kl, r.kl_coef)  # [B]
        advantages = rloo_advantages(rlhf_reward, k)  # [B]
        stats = update_policy(run, rollout, old_logprobs, ref_logprobs, advantages.to(run.device), token_loss,
                              AGGREGATION, micro_batch_size=r.micro_batch_size, num_epochs=r.ppo_epochs)
        metrics = {**batch.stats(), **stats, "lr": lr}
        metrics["objective/scores"] = float(batch.rewards.mean())
        metrics["objective/rlhf_reward"] = float(rlhf_reward.mean())
        metrics["objective/entropy"] = masked_token_mean(entropy, mask)
        if ref_logprobs is not None:
            metrics["objective/kl"] = float(kl.mean())
            metrics["objective/non_score_reward"] = float((-r.kl_coef * kl).mean())
        metrics["advantages/std"] = run.global_std(advantages)
        run.end_iteration(iteration, metrics, r.save_every)
    return run.finish({"final_metrics": metrics})
