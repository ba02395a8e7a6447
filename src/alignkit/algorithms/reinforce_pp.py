"""REINFORCE++: critic-free PPO-style RL with global advantage normalisation (Hu 2025, arXiv 2501.03262).

One iteration:

1. take ``reinforce_pp.prompts_per_iteration`` prompts, sample ``num_generations`` completions of each and
   score them (``reward`` + missing-EOS penalty);
2. per-token rewards as PPO (``ops.kl_penalized_rewards``):  r_t = -beta * k1_t + s * [t = last token], with
   k1_t = log pi_old(y_t) - log pi_ref(y_t);  in the ``baseline`` variant the score first has its group mean
   subtracted, s_i <- s_i - mean_{j in group(i)} s_j (G >= 2), and the KL leaves the reward for the loss;
3. returns with gamma = 1:  G_t = sum_{s >= t} r_s  (``ops.reward_to_go``);
4. advantages normalised over the WHOLE global batch: A_t = (G_t - mean) / std over every response token of
   every sequence on every process (``ops.masked_whiten`` with the harness's all-reduce);
5. ``ppo_epochs`` steps of the clipped surrogate (token mean over the batch):

       l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))       [+ beta * k3_t in the baseline variant]

Everything else (sampling, reference, optimizer, checkpoints, processes) is ``online.OnlineRun``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.config import ReinforcePPConfig
from alignkit.losses import grpo_token_loss, ppo_policy_loss
from alignkit.online.run import OnlineRun
from alignkit.online.update import TokenLossFn, masked_token_mean, sequence_kl, update_policy
from alignkit.ops.advantages import kl_penalized_rewards, reward_to_go
from alignkit.ops.stats import masked_whiten

AGGREGATION = "token_mean"


def group_baseline(scores: Tensor, group_size: int) -> Tensor:
    """[B*G] group-contiguous scores -> s_i - mean of its group ([B*G])."""
    grouped = scores.view(-1, group_size)  # [B, G]
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def make_token_loss(cliprange: float, kl_in_loss: float) -> TokenLossFn:
    """Clipped surrogate on per-token advantages [b, T]; ``kl_in_loss`` > 0 adds beta * k3 (baseline variant)."""

    def token_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor):
        losses = grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, kl_in_loss, cliprange, cliprange)
        with torch.no_grad():
            pg = ppo_policy_loss(logprobs, old_logprobs, advantages, cliprange=cliprange)
        return losses, {"policy/clipfrac": pg.clipfrac, "policy/approxkl": pg.approxkl, "policy/ratio": pg.ratio}

    return token_loss


def train(cfg: ReinforcePPConfig, resume: bool = False) -> dict:
    r = cfg.reinforce_pp
    G = r.num_generations
    name = "reinforce++" + ("-baseline" if r.baseline else "")
    run = OnlineRun.start(cfg, name, resume, total_steps=r.num_iterations * r.ppo_epochs, reference=r.kl_coef > 0)
    token_loss = make_token_loss(r.cliprange, r.kl_coef if r.baseline else 0.0)
    run.evaluate_before()
    metrics: dict[str, float] = {}
    for iteration in run.iterations(r.num_iterations):
        lr = run.lr
        batch = run.sample(*run.next_prompts(r.prompts_per_iteration), num_samples=G)
        rollout = batch.rollout
        mask = rollout.response_mask  # [B, R]
        old_logprobs, entropy = run.policy_logprobs(rollout, r.micro_batch_size)  # [B, R] each
        ref_logprobs = run.ref_logprobs(rollout, r.micro_batch_size)  # [B, R] or None
        scores = group_baseline(batch.rewards, G) if r.baseline else batch.rewards  # [B]
        in_reward = 0.0 if (r.baseline or ref_logprobs is None) else r.kl_coef
        rewards, kl = kl_penalized_rewards(old_logprobs, ref_logprobs if ref_logprobs is not None else old_logprobs,
                                           scores.to(run.device), mask, in_reward)  # [B, R] each
        returns = reward_to_go(rewards, mask.float())  # [B, R]
        advantages = masked_whiten(returns, mask.float(), all_reduce=run.all_sum) * mask  # [B, R]
        stats = update_policy(run, rollout, old_logprobs, ref_logprobs, advantages, token_loss, AGGREGATION,
                              micro_batch_size=r.micro_batch_size, num_epochs=r.ppo_epochs)
        metrics = {**batch.stats(), **stats, "lr": lr}
        metrics["objective/scores"] = float(batch.rewards.mean())
        metrics["objective/entropy"] = masked_token_mean(entropy, mask)
        metrics["returns"] = masked_token_mean(returns, mask)
        if ref_logprobs is not None:
            metrics["objective/kl"] = float(sequence_kl(old_logprobs, ref_logprobs, mask).mean())
            metrics["objective/non_score_reward"] = float((-in_reward * kl.sum(1)).mean())
        run.end_iteration(iteration, metrics, r.save_every)
    return run.finish({"variant": "baseline" if r.baseline else "plain", "final_metrics": metrics})
