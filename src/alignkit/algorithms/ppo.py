"""PPO against a reward model with a KL penalty to the reference policy (InstructGPT step 3).

Ziegler et al. (2019); Stiennon et al. (2020); Ouyang et al. (2022); Huang et al. (2024), "The N+
implementation details of RLHF with PPO". Four models: the policy pi (trainable, LoRA optional),
the frozen reference pi_ref (adapter-disabled policy under LoRA, else a frozen copy), the frozen
reward model r_phi, and the value model V (a trainable copy of the reward model, or ``ppo.value_model``).

A reward model with the policy's tokenizer scores the rollout's token ids. One with another tokenizer
(e.g. a MiniLM encoder) scores text in the format ``alignkit rm`` trained it on: the prompt messages
rendered with ITS tokenizer (``render_prompt``: its chat template, else the plain contents) + the
decoded response + its EOS; the value model then needs a backbone of its own (``ppo.value_model``).

One iteration:
  1. rollout: sample ``rollout_batch_size`` prompts, generate one response each (``generation.*``);
  2. experience (no grad): log pi and log pi_ref of the response tokens (logits / temperature),
     values, score s = r_phi(x, y) at the last real token (- missing-EOS penalty, + extra components),
     per-token reward r_t = -beta (log pi_t - log pi_ref_t) + s·[t = last], GAE advantages/returns;
  3. ``ppo_epochs`` epochs, each a fresh permutation split into ``num_minibatches`` minibatches of
     ``micro_batch_size`` micro-batches (grad accumulation): loss = pg_loss + vf_coef * vf_loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from alignkit.config import ModelConfig, PPOConfig, PPOSection, RLDataConfig
from alignkit.data.formats import load_examples
from alignkit.data.tokenize import render_prompt
from alignkit.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignkit.models.loading import copy_frozen, is_peft, load_policy, load_tokenizer, reference_context, save_model
from alignkit.models.value import ValueModel, response_values
from alignkit.ops.advantages import compute_gae
from alignkit.ops.kl import AdaptiveKLController, FixedKLController, kl_k1
from alignkit.ops.stats import masked_mean, masked_sum, masked_whiten
from alignkit.rewards.combine import apply_missing_eos_penalty, build_reward
from alignkit.rewards.reward_model import RewardModelScorer, load_reward_model_scorer
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts, response_logprobs
from alignkit.rollout.prompts import PromptSampler, load_prompts, prompt_batch
from alignkit.train.checkpoint import atomic_save_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.train.logging import MetricsLogger
from alignkit.train.run import autocast_dtype, autocast_for, log, prepare_run_dir, set_seed, write_summary


# ---------------------------------------------------------------- rewards with KL
def last_response_index(response_mask: Tensor) -> Tensor:
    """[B, R] -> [B]: column of the last response token (the EOS, or the last token when there is no EOS)."""
    cols = torch.arange(response_mask.shape[1], device=response_mask.device)  # [R]
    return (cols * (response_mask != 0).long()).argmax(dim=1)


def per_token_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, response_mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Ziegler et al. (2019) eq. 2 spread over tokens (Stiennon et al. 2020; N+ details):

        kl_t = log pi(y_t) - log pi_ref(y_t)                (k1)
        r_t  = -beta * kl_t + s * [t = last response token]

    logprobs, ref_logprobs, response_mask: [B, R]; scores: [B]. Returns (rewards, kl), both [B, R]
    and zero outside the response. With pi == pi_ref every r_t is 0 except the score.
    """
    mask = response_mask.to(logprobs.dtype)
    kl = kl_k1(logprobs, ref_logprobs) * mask  # [B, R]
    non_score_reward = -kl_coef * kl  # [B, R]
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    rewards = non_score_reward.clone()
    rewards[rows, last_response_index(response_mask)] += scores.to(rewards.dtype)
    return rewards, kl


def whitened_advantages(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float, whiten_rewards: bool
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016 eq. 16): returns = A + V computed BEFORE whitening; then
    A <- (A - mean A) / std A over response tokens. Optional reward whitening scales r_t (no shift)."""
    mask = response_mask.to(rewards.dtype)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)  # [B, R] each
    advantages = masked_whiten(advantages, mask) * mask
    return advantages, returns


def build_kl_controller(ppo: PPOSection) -> AdaptiveKLController | FixedKLController:
    """Fixed beta, or Ziegler's adaptive beta (``ppo.adaptive_kl``) aiming at ``ppo.kl_target``."""
    if ppo.adaptive_kl:
        return AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(ppo.kl_coef)


def build_reference(policy: nn.Module) -> tuple[nn.Module, object]:
    """(model, context factory) for reference log-probs: the policy with adapters disabled under
    LoRA (no second copy), else a frozen deep copy of the initial policy."""
    if is_peft(policy):
        return policy, lambda: reference_context(policy)
    return copy_frozen(policy), contextlib.nullcontext


# ---------------------------------------------------------------- models and batches
class PolicyAndValue(nn.Module):
    """The two trainable models under one module, so one checkpoint holds both. Under LoRA it carries
    the policy's ``peft_config``: the checkpoint then stores only trainable tensors (adapters + value model)."""

    def __init__(self, policy: nn.Module, value_model: ValueModel) -> None:
        super().__init__()
        self.policy, self.value_model = policy, value_model
        if is_peft(policy):
            self.peft_config = policy.peft_config


def values_of(value_model: ValueModel, rollout: Rollout, micro_batch_size: int | None = None) -> Tensor:
    return response_values(value_model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                           rollout.response_mask, micro_batch_size)  # [B, R]


# ---------------------------------------------------------------- a reward model with another tokenizer
def reward_prompt_texts(rl: RLDataConfig, tokenizer, rm_tokenizer) -> dict[str, str]:
    """The policy's prompt text -> the reward model's rendering of the same messages, for every train/eval record.

    ``alignkit rm`` trained r_phi on ``render_prompt(rm_tokenizer, messages) + completion + EOS``; for an encoder
    without a chat template that is ``"<user text>\n\n"``, not the policy's chat markup.
    """
    texts: dict[str, str] = {}
    for spec, split, limit in ((rl.train, "train", rl.limit), (rl.eval, "test", rl.eval_limit)):
        if spec:
            records, _ = load_examples(spec, "prompt", on_error=rl.on_error, split=split, limit=limit)
            for ex in records:
                key = render_prompt(tokenizer, ex["prompt"], rl.system_prompt)
                texts[key] = render_prompt(rm_tokenizer, ex["prompt"], rl.system_prompt)
    return texts


class TextRewardModel:
    """r_phi(x, y) for a reward model whose tokenizer differs from the policy's: the reward model's rendering
    of the prompt + the decoded response + its EOS (``RewardModelScorer.__call__``), read at its last token."""

    def __init__(self, scorer: RewardModelScorer, prompt_texts: dict[str, str]) -> None:
        self.scorer, self.prompt_texts = scorer, prompt_texts

    def __call__(self, rollout: Rollout) -> Tensor:
        missing = [t for t in rollout.prompt_texts if t not in self.prompt_texts]
        if missing:
            raise ValueError(f"no reward-model rendering of prompt {missing[0]!r} (not in data.train/data.eval)")
        return self.scorer([self.prompt_texts[t] for t in rollout.prompt_texts], rollout.response_texts)  # [B]


def reward_model_scores(reward_model: RewardModelScorer | TextRewardModel, rollout: Rollout) -> Tensor:
    """[B] r_phi(x, y): on the rollout's own ids (shared tokenizer) or through text (:class:`TextRewardModel`)."""
    if isinstance(reward_model, TextRewardModel):
        return reward_model(rollout)
    return reward_model.score_ids(rollout.input_ids, rollout.attention_mask)


# ---------------------------------------------------------------- experience
def score_rollout(scorer, extra_reward, rollout: Rollout, penalty: float | None, mode: str = "subtract"):
    """s = r_phi(prompt + response) at the last real token (+ Σ_k w_k r_k), minus the missing-EOS penalty.

    ``scorer``: a RewardModelScorer (shared tokenizer), a TextRewardModel, or None (components only).
    Returns (scores [B] after the penalty, raw scores [B] before it, {"rewards/<name>": [B]}).
    """
    device = rollout.prompt_ids.device
    raw, parts = torch.zeros(len(rollout), device=device), {}
    if scorer is not None:
        raw = reward_model_scores(scorer, rollout).to(device)  # [B]
        parts["rewards/reward_model"] = raw
    if extra_reward is not None:
        total, extra_parts = extra_reward(rollout.prompt_texts, rollout.response_texts, rollout.extras)
        raw = raw + total.to(device)
        parts.update({k: v.to(device) for k, v in extra_parts.items()})
    return apply_missing_eos_penalty(raw, rollout.has_eos, penalty, mode), raw, parts


@dataclass
class Experience:
    rollout: Rollout
    logprobs: Tensor  # [B, R] log pi_old(y_t), temperature-scaled
    ref_logprobs: Tensor  # [B, R]
    entropy: Tensor  # [B, R]
    values: Tensor  # [B, R] V_old(s_t)
    scores: Tensor  # [B] after the missing-EOS penalty
    raw_scores: Tensor  # [B] before it
    reward_parts: dict[str, Tensor]
    kl: Tensor  # [B, R] k1 per token
    rewards: Tensor  # [B, R]
    advantages: Tensor  # [B, R] whitened
    returns: Tensor  # [B, R]
    kl_coef: float


@torch.no_grad()
def make_experience(policy, ref_model, ref_ctx, value_model, scorer, extra_reward, rollout: Rollout,
                    ppo: PPOSection, kl_coef: float, temperature: float, penalty: float | None,
                    penalty_mode: str = "subtract") -> Experience:
    """Everything PPO needs from a rollout, computed once with the pre-update models."""
    mbs = ppo.micro_batch_size
    logprobs, entropy = response_logprobs(policy, rollout, temperature, return_entropy=True, micro_batch_size=mbs)
    with ref_ctx():
        ref_logprobs = response_logprobs(ref_model, rollout, temperature, micro_batch_size=mbs)  # [B, R]
    values = values_of(value_model, rollout, mbs)  # [B, R]
    scores, raw_scores, parts = score_rollout(scorer, extra_reward, rollout, penalty, penalty_mode)
    rewards, kl = per_token_rewards(logprobs, ref_logprobs, scores, rollout.response_mask, kl_coef)
    advantages, returns = whitened_advantages(rewards, values, rollout.response_mask, ppo.gamma, ppo.lam,
                                              ppo.whiten_rewards)
    return Experience(rollout, logprobs, ref_logprobs, entropy, values, scores, raw_scores, parts, kl, rewards,
                      advantages, returns, kl_coef)


# ---------------------------------------------------------------- PPO update
def _clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Total grad norm of ``params``, clipped to ``max_norm`` (train.max_grad_norm; None: no clipping)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, math.inf if max_norm is None else max_norm))


def ppo_update(models: PolicyAndValue, optimizer, scheduler, exp: Experience, ppo: PPOSection, temperature: float,
               max_grad_norm: float | None, amp=contextlib.nullcontext) -> list[dict[str, float]]:
    """ppo_epochs x num_minibatches optimizer steps on one batch of experience; stats per minibatch.

    Micro-batch losses are token sums divided by the minibatch's token count, so accumulating them
    equals the masked mean over the whole minibatch. ``amp()`` (mixed precision) is entered around each
    micro-batch forward only: one autocast context spanning optimizer steps would keep serving its cached
    low-precision copies of the OLD weights (torch.autocast's weight-cast cache) — stale forwards, ratio == 1.
    """
    policy, value_model = models.policy, models.value_model
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    b = len(exp.rollout)
    minibatch_size = b // ppo.num_minibatches
    stats = []
    for _ in range(ppo.ppo_epochs):
        b_inds = torch.randperm(b)  # fresh permutation every epoch
        for mb_start in range(0, b, minibatch_size):
            mb_inds = b_inds[mb_start : mb_start + minibatch_size]
            n_tokens = exp.rollout.response_mask[mb_inds].sum().clamp(min=1).float()
            acc = dict.fromkeys(("approxkl", "clipfrac", "vf_clipfrac", "vpred", "error", "pg_loss", "vf_loss",
                                 "ratio"), 0.0)
            ratio_min, ratio_max = math.inf, -math.inf
            for micro_start in range(0, minibatch_size, ppo.micro_batch_size):
                inds = mb_inds[micro_start : micro_start + ppo.micro_batch_size]
                micro = exp.rollout.select(inds)  # same columns as the experience tensors
                mask = micro.response_mask.float()  # [b, R]
                with amp():
                    new_logprobs = response_logprobs(policy, micro, temperature)  # [b, R]
                    vpred = values_of(value_model, micro)  # [b, R]
                pg = ppo_policy_loss(new_logprobs, exp.logprobs[inds], exp.advantages[inds], ppo.cliprange)
                vf = ppo_value_loss(vpred, exp.values[inds], exp.returns[inds], ppo.cliprange_value)
                pg_loss = masked_sum(pg.pg_losses, mask) / n_tokens
                vf_loss = masked_sum(vf.vf_losses, mask) / n_tokens
                loss = pg_loss + ppo.vf_coef * vf_loss
                loss.backward()
                with torch.no_grad():
                    for key, x in (("approxkl", pg.approxkl), ("clipfrac", pg.clipfrac), ("ratio", pg.ratio),
                                   ("vf_clipfrac", vf.vf_clipfrac), ("vpred", vpred),
                                   ("error", (vpred - exp.returns[inds]) ** 2)):
                        acc[key] += float(masked_sum(x, mask) / n_tokens)
                    acc["pg_loss"] += float(pg_loss)
                    acc["vf_loss"] += float(vf_loss)
                    real = pg.ratio[mask.bool()]
                    if real.numel():
                        ratio_min, ratio_max = min(ratio_min, float(real.min())), max(ratio_max, float(real.max()))
            policy_grad_norm = _clip(policy_params, max_grad_norm)
            value_grad_norm = _clip(value_params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.append({
                "policy/approxkl": acc["approxkl"], "policy/clipfrac": acc["clipfrac"], "policy/ratio": acc["ratio"],
                "policy/ratio_min": ratio_min, "policy/ratio_max": ratio_max, "val/clipfrac": acc["vf_clipfrac"],
                "val/vpred": acc["vpred"], "val/error": acc["error"], "loss/policy": acc["pg_loss"],
                "loss/value": acc["vf_loss"], "policy/grad_norm": policy_grad_norm, "val/grad_norm": value_grad_norm,
            })
    return stats


def iteration_metrics(exp: Experience, mb_stats: list[dict[str, float]]) -> dict[str, float]:
    """Rollout statistics + the minibatch statistics averaged over the iteration."""
    mask = exp.rollout.response_mask.float()
    kl_sum = exp.kl.sum(1)  # [B] sequence KL
    metrics = {
        "objective/kl": float(kl_sum.mean()),
        "objective/entropy": float((exp.entropy * mask).sum(1).mean()),
        "objective/scores": float(exp.scores.mean()),
        "objective/non_score_reward": float((-exp.kl_coef * kl_sum).mean()),
        "objective/rlhf_reward": float((exp.scores - exp.kl_coef * kl_sum).mean()),
        "scores": float(exp.raw_scores.mean()),  # reward model + components, before the missing-EOS penalty
        "returns": float(masked_mean(exp.returns, mask)),
        "advantages": float(masked_mean(exp.advantages, mask)),
        "response_length": float(mask.sum(1).mean()),
        "no_eos_frac": float((~exp.rollout.has_eos).float().mean()),
        "kl_coef": exp.kl_coef,
    }
    metrics.update({k: float(v.float().mean()) for k, v in exp.reward_parts.items()})
    for key in mb_stats[0]:
        values = [s[key] for s in mb_stats]
        if key == "policy/ratio_min":
            metrics[key] = min(values)
        elif key == "policy/ratio_max":
            metrics[key] = max(values)
        else:
            metrics[key] = sum(values) / len(values)
    return metrics


@torch.no_grad()
def evaluate_policy(policy, ref_model, ref_ctx, scorer, extra_reward, tokenizer, prompts: list[dict],
                    params: SamplingParams, batch_size: int, device, penalty, penalty_mode) -> dict[str, float]:
    """Sample on held-out prompts: mean score and sampled KL(pi || pi_ref) = mean_y Σ_t (log pi - log pi_ref)."""
    backend = HFGenerateBackend(policy, tokenizer)
    totals = {"scores": 0.0, "kl": 0.0, "response_length": 0.0, "no_eos_frac": 0.0}
    for start in range(0, len(prompts), batch_size):
        batch = prompt_batch(prompts[start : start + batch_size], tokenizer.pad_token_id)
        rollout = generate_rollouts(backend, tokenizer, batch["input_ids"].to(device),
                                    batch["attention_mask"].to(device), params, 1, batch["prompt_texts"],
                                    batch["extras"])
        logprobs = response_logprobs(policy, rollout, params.temperature, micro_batch_size=batch_size)
        with ref_ctx():
            ref_logprobs = response_logprobs(ref_model, rollout, params.temperature, micro_batch_size=batch_size)
        scores, _, _ = score_rollout(scorer, extra_reward, rollout, penalty, penalty_mode)
        totals["scores"] += float(scores.sum())
        totals["kl"] += float(kl_k1(logprobs, ref_logprobs).sum())
        totals["response_length"] += float(rollout.response_lengths.sum())
        totals["no_eos_frac"] += float((~rollout.has_eos).sum())
    return {k: v / len(prompts) for k, v in totals.items()}


def check_config(cfg: PPOConfig) -> None:
    ppo = cfg.ppo
    if not ppo.reward_model and not cfg.reward.components:
        raise ValueError("ppo.reward_model is not set: give the directory of a reward model trained with `alignkit rm` "
                         "(or reward.components, whose combined reward is then the score)")
    if not ppo.reward_model and not ppo.value_model:
        raise ValueError("ppo.value_model is not set: without ppo.reward_model the value model needs a backbone, e.g. "
                         f"ppo.value_model={cfg.model.name_or_path} ppo.value_layers=4")
    if ppo.rollout_batch_size % ppo.num_minibatches != 0:
        raise ValueError(f"ppo.rollout_batch_size ({ppo.rollout_batch_size}) must be divisible by "
                         f"ppo.num_minibatches ({ppo.num_minibatches})")


def check_tokenizers(cfg: PPOConfig, tokenizer, rm_tokenizer) -> bool:
    """Whether the reward model shares the policy's vocabulary (else it scores text). The value model reads
    the policy's token ids: its backbone (``ppo.value_model``, default the reward model) must share it."""
    ppo = cfg.ppo

    def describe_tokenizer(tok) -> str:
        return f"{tok.name_or_path} ({type(tok).__name__}, {len(tok)} tokens)"

    shared = rm_tokenizer is not None and rm_tokenizer.get_vocab() == tokenizer.get_vocab()
    if ppo.value_model:
        value_tokenizer = load_tokenizer(ppo.value_model)
        if value_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"ppo.value_model {ppo.value_model!r} has a different tokenizer "
                             f"({describe_tokenizer(value_tokenizer)}) than the policy ({describe_tokenizer(tokenizer)}); "
                             "the value model reads the policy's token ids, so they must share one vocabulary")
    elif rm_tokenizer is not None and not shared:
        raise ValueError(
            f"ppo.reward_model {ppo.reward_model!r} has a different tokenizer ({describe_tokenizer(rm_tokenizer)}) than "
            f"the policy ({describe_tokenizer(tokenizer)}). It can score the decoded text, but the value model reads "
            "the policy's token ids and cannot start from it: give it a backbone with the policy's tokenizer, e.g. "
            f"ppo.value_model={cfg.model.name_or_path} ppo.value_layers=4")
    return shared


def build_value_model(cfg: PPOConfig, tokenizer, scorer: RewardModelScorer | None) -> ValueModel:
    """N+ details: a trainable copy of the reward model; else ``ppo.value_model`` (or the reward model's checkpoint
    when only ``ppo.value_layers`` is set) loaded as a one-label classifier, cut to ``ppo.value_layers`` layers."""
    ppo = cfg.ppo
    if not ppo.value_model and ppo.value_layers is None:
        return ValueModel.from_reward_model(scorer.model)
    value_cfg = ModelConfig(name_or_path=ppo.value_model or ppo.reward_model, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code, num_hidden_layers=ppo.value_layers)
    return ValueModel.from_pretrained(value_cfg, tokenizer)


# ---------------------------------------------------------------- main loop
def train(cfg: PPOConfig, resume: bool = False) -> dict:
    ppo, gen = cfg.ppo, cfg.generation
    check_config(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    shared_vocab = check_tokenizers(cfg, tokenizer, load_tokenizer(ppo.reward_model) if ppo.reward_model else None)
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, "ppo")
    set_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    penalty = cfg.reward.missing_eos_penalty if cfg.reward.missing_eos_penalty is not None else ppo.missing_eos_penalty
    penalty_mode = cfg.reward.missing_eos_mode

    # ---- data and the four models
    prompts = load_prompts(cfg.data, tokenizer, gen.max_new_tokens, "train", log)
    eval_prompts = load_prompts(cfg.data, tokenizer, gen.max_new_tokens, "eval", log)
    policy = load_policy(cfg.model, tokenizer).to(device)
    policy.train()  # dropout is off (load_policy); train mode only matters for gradient checkpointing
    ref_model, ref_ctx = build_reference(policy)
    scorer = load_reward_model_scorer(ppo.reward_model, batch_size=ppo.micro_batch_size) if ppo.reward_model else None
    value_model = build_value_model(cfg, tokenizer, scorer).to(device)
    reward_models = {ppo.reward_model: scorer} if scorer else {}
    extra_reward = build_reward(cfg.reward, tokenizer, reward_models) if cfg.reward.components else None
    if scorer is not None:
        scorer.model.to(device)
        if not shared_vocab:  # the reward model reads text in its own format
            texts = reward_prompt_texts(cfg.data, tokenizer, scorer.tokenizer)
            log(f"reward model with its own tokenizer: scoring text, e.g. {next(iter(texts.values()))!r} + response")
            scorer = TextRewardModel(scorer, texts)
    models = PolicyAndValue(policy, value_model)

    # ---- one optimizer, two param groups (policy lr, value lr); one schedule over all updates
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.train.lr},
         {"params": list(value_model.parameters()), "lr": ppo.value_lr or cfg.train.lr}],
        betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay,
    )
    total_updates = ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=total_updates)  # as the offline loop (train/loop.py)
    kl_ctl = build_kl_controller(ppo)
    sampler = PromptSampler(prompts, cfg.train.seed)
    logger = MetricsLogger(run_dir)

    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            log(f"--resume: no checkpoint in {run_dir}; starting from iteration 0")
        else:
            state = load_checkpoint(ckpt, models, optimizer, scheduler)  # also restores the RNG states
            start = int(state["loop_state"]["iteration"])
            kl_ctl.load_state_dict(state["extra_state"]["kl_ctl"])
            sampler.load_state_dict(state["extra_state"]["sampler"])
            log(f"resumed from {ckpt} (iteration {start}, kl_coef {kl_ctl.value:.4g})")
        logger.truncate_after(start)

    def checkpoint(iteration: int) -> None:
        save_checkpoint(run_dir, iteration, models, optimizer, scheduler, {"iteration": iteration},
                        {"kl_ctl": kl_ctl.state_dict(), "sampler": sampler.state_dict()})

    # train.mixed_precision: generation, experience and updates all run under the same autocast (bf16 matmuls on
    # CPU/GPU); the loss itself is fp32 (log_softmax upcasts), so ratio == 1 on the first minibatch still holds
    backend = HFGenerateBackend(policy, tokenizer, autocast_dtype(cfg.train))
    params = SamplingParams.from_section(gen)
    metrics: dict[str, float] = {}
    for iteration in tqdm(range(start + 1, ppo.num_iterations + 1), initial=start, total=ppo.num_iterations,
                          desc="ppo"):
        t0 = time.perf_counter()
        batch = prompt_batch(sampler.next(ppo.rollout_batch_size), tokenizer.pad_token_id)
        rollout = generate_rollouts(backend, tokenizer, batch["input_ids"].to(device),
                                    batch["attention_mask"].to(device), params, 1, batch["prompt_texts"],
                                    batch["extras"], batch_size=gen.batch_size)
        t1 = time.perf_counter()
        with autocast_for(cfg.train, device):
            exp = make_experience(policy, ref_model, ref_ctx, value_model, scorer, extra_reward, rollout, ppo,
                                  kl_ctl.value, gen.temperature, penalty, penalty_mode)
        t2 = time.perf_counter()
        mb_stats = ppo_update(models, optimizer, scheduler, exp, ppo, gen.temperature, cfg.train.max_grad_norm,
                              amp=lambda: autocast_for(cfg.train, device))
        t3 = time.perf_counter()
        kl_ctl.update(float(exp.kl.sum(1).mean()), n_steps=ppo.rollout_batch_size)  # Ziegler: n = batch size
        metrics = iteration_metrics(exp, mb_stats)
        metrics.update({"lr": scheduler.get_last_lr()[0], "time/generation": t1 - t0, "time/scoring": t2 - t1,
                        "time/training": t3 - t2})
        logger.log(metrics, step=iteration)
        if iteration == 1 or iteration % cfg.train.log_every == 0:
            log(f"iter {iteration}: score {metrics['objective/scores']:.4f} kl {metrics['objective/kl']:.4f} "
                f"approxkl {metrics['policy/approxkl']:.2e} vf_loss {metrics['loss/value']:.4f}")
        if (ppo.save_every and iteration % ppo.save_every == 0) or iteration == ppo.num_iterations:
            checkpoint(iteration)

    result: dict = {"iterations": ppo.num_iterations, "metrics": metrics, "kl_coef": kl_ctl.value}
    if eval_prompts:
        eval_bs = cfg.train.eval_batch_size or gen.batch_size
        eval_metrics = evaluate_policy(policy, ref_model, ref_ctx, scorer, extra_reward, tokenizer, eval_prompts,
                                       params, eval_bs, device, penalty, penalty_mode)
        logger.log(eval_metrics, step=ppo.num_iterations, prefix="eval/")
        result["eval"] = eval_metrics
        log(f"eval: score {eval_metrics['scores']:.4f} kl {eval_metrics['kl']:.4f}")
    logger.close()
    if cfg.train.save_model:
        result["model_dir"] = str(save_model(policy, tokenizer, run_dir / "model"))

        def write_value(tmp) -> None:
            value_model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_save_dir(run_dir / "value_model", write_value)
        result["value_model_dir"] = str(run_dir / "value_model")
    write_summary(run_dir, result)
    log(f"ppo done: {run_dir}")
    return result
