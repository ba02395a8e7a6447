"""PPO against a reward model with a KL penalty to the reference policy (InstructGPT step 3).

Ziegler et al. (2019); Stiennon et al. (2020); Ouyang et al. (2022); Huang et al. (2024), "The N+
implementation details of RLHF with PPO". Four models: the policy pi (trainable, LoRA optional), the frozen
reference pi_ref (``OnlineRun``'s ``Reference``), the frozen reward model r_phi (``ppo.reward_model``, scored
like any ``reward.components`` entry of type ``model``: a reward model with another tokenizer re-renders the
prompt in its own format, as ``alignkit rm`` trained it), and the value model V (a trainable copy of the
reward model, or ``ppo.value_model``).

One iteration:
  1. rollout: ``rollout_batch_size`` prompts, ``samples_per_prompt`` responses each (``generation.*``);
     with ``score_baseline: loo`` each score minus the mean score of its prompt's other responses;
  2. experience (no grad): log pi and log pi_ref of the response tokens (logits / temperature), values,
     score s = r_phi(x, y) (+ extra components, - missing-EOS penalty), per-token reward
     r_t = -beta (log pi_t - log pi_ref_t) + s·[t = last] (``ops.kl_penalized_rewards``) (with ``ppo.dense_prm``
     + c·p_k at the token ending step k, a process reward model's step score), GAE
     advantages/returns, advantages whitened over the whole batch (every process's tokens);
  3. ``ppo_epochs`` epochs, each a fresh permutation split into ``num_minibatches`` minibatches of
     ``micro_batch_size`` micro-batches (grad accumulation): loss = pg_loss + vf_coef * vf_loss,
     token means over the minibatch (over every process's share of it).

Under several processes each process holds ``rollout_batch_size / N`` rows and permutes its own rows, so with
``num_minibatches = 1`` training equals one process exactly; with more minibatches their split differs (same
distribution, not the same sequence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignkit.config import ModelConfig, PPOConfig, RewardComponent, RewardSection
from alignkit.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignkit.models.loading import load_tokenizer
from alignkit.models.value import ValueModel, response_values
from alignkit.online.run import OnlineRun, save_module_dir
from alignkit.ops.advantages import compute_gae, kl_penalized_rewards, rloo_advantages
from alignkit.ops.kl import AdaptiveKLController, FixedKLController
from alignkit.ops.seeds import derive_seed
from alignkit.ops.stats import masked_sum, masked_whiten
from alignkit.rewards.prm import PRMDenseReward, load_prm_scorer
from alignkit.rewards.ensemble import is_ensemble_dir
from alignkit.rollout.engine import Rollout, response_logprobs


# ---------------------------------------------------------------- set-up
def check_config(cfg: PPOConfig) -> None:
    ppo = cfg.ppo
    if not ppo.reward_model and not cfg.reward.components:
        raise ValueError("ppo.reward_model is not set: give the directory of a reward model trained with `alignkit rm` "
                         "(e.g. ppo.reward_model=runs/rm/model), or reward.components, whose combined reward is then "
                         "the score")
    if ppo.reward_model and not ppo.value_model and is_ensemble_dir(ppo.reward_model):
        raise ValueError(f"ppo.reward_model {ppo.reward_model!r} is a reward-model ensemble: the value model cannot be "
                         "initialised from it; give its backbone, e.g. "
                         f"ppo.value_model={cfg.model.name_or_path} ppo.value_layers=4")
    if not ppo.reward_model and not ppo.value_model:
        raise ValueError("ppo.value_model is not set: without ppo.reward_model the value model needs a backbone, e.g. "
                         f"ppo.value_model={cfg.model.name_or_path} ppo.value_layers=4")
    if ppo.rollout_batch_size * ppo.samples_per_prompt % ppo.num_minibatches != 0:
        raise ValueError(f"ppo.rollout_batch_size x ppo.samples_per_prompt ({ppo.rollout_batch_size} x "
                         f"{ppo.samples_per_prompt}) must be divisible by ppo.num_minibatches ({ppo.num_minibatches})")
    if ppo.score_baseline == "loo" and ppo.samples_per_prompt < 2:
        raise ValueError("ppo.score_baseline=loo needs ppo.samples_per_prompt >= 2 (the baseline of a response is the "
                         f"mean score of its prompt's other responses); got samples_per_prompt={ppo.samples_per_prompt}")


def reward_section(cfg: PPOConfig) -> RewardSection:
    """The score: the reward model (``ppo.reward_model``) + ``reward.components``, one combined reward; the
    missing-EOS penalty of ``reward`` if set, else ``ppo.missing_eos_penalty``."""
    ppo, r = cfg.ppo, cfg.reward
    model = [RewardComponent(type="model", path=ppo.reward_model, name="reward_model")] if ppo.reward_model else []
    penalty = r.missing_eos_penalty if r.missing_eos_penalty is not None else ppo.missing_eos_penalty
    return r.model_copy(update={"components": model + list(r.components), "missing_eos_penalty": penalty})


def _describe(tok) -> str:
    return f"{tok.name_or_path} ({type(tok).__name__}, {len(tok)} tokens)"


def check_value_tokenizer(cfg: PPOConfig) -> None:
    """The value model reads the policy's token ids: its backbone (``ppo.value_model``, default the reward model,
    N+ details) must share the policy's vocabulary. Checked before anything is written or loaded."""
    ppo = cfg.ppo
    source = ppo.value_model or ppo.reward_model
    policy_tok, value_tok = load_tokenizer(cfg.model.name_or_path), load_tokenizer(source)
    if value_tok.get_vocab() != policy_tok.get_vocab():
        key = "ppo.value_model" if ppo.value_model else "ppo.reward_model"
        raise ValueError(
            f"{key} {source!r} has a different tokenizer ({_describe(value_tok)}) than the policy "
            f"({_describe(policy_tok)}). The value model reads the policy's token ids, so its backbone must share the "
            f"policy's vocabulary: give one, e.g. ppo.value_model={cfg.model.name_or_path} ppo.value_layers=4"
            + ("" if ppo.value_model else " (the reward model can still score the decoded text)"))


def build_value_model(cfg: PPOConfig, tokenizer, reward_models: dict) -> ValueModel:
    """N+ details: a trainable copy of the reward model; else ``ppo.value_model`` (or the reward model's checkpoint
    when only ``ppo.value_layers`` is set) loaded as a one-label classifier, cut to ``ppo.value_layers`` layers."""
    ppo = cfg.ppo
    if not ppo.value_model and ppo.value_layers is None:
        return ValueModel.from_reward_model(reward_models[ppo.reward_model].model)
    value_cfg = ModelConfig(name_or_path=ppo.value_model or ppo.reward_model, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code, num_hidden_layers=ppo.value_layers)
    return ValueModel.from_pretrained(value_cfg, tokenizer)


def build_kl_controller(ppo) -> AdaptiveKLController | FixedKLController:
    """Fixed beta, or Ziegler's adaptive beta (``ppo.adaptive_kl``) aiming at ``ppo.kl_target``."""
    if ppo.adaptive_kl:
        return AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(ppo.kl_coef)


def values_of(value_model, rollout: Rollout, micro_batch_size: int | None = None) -> Tensor:
    return response_values(value_model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                           rollout.response_mask, micro_batch_size)  # [B, R]


# ---------------------------------------------------------------- experience
def whitened_advantages(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float,
                        whiten_rewards: bool, all_reduce=None) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016 eq. 16): returns = A + V computed BEFORE whitening; then
    A <- (A - mean A) / std A over response tokens. Optional reward whitening scales r_t (no shift)."""
    mask = response_mask.to(rewards.dtype)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce) * mask
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)  # [B, R] each
    return masked_whiten(advantages, mask, all_reduce=all_reduce) * mask, returns


class Experience:
    """Everything PPO needs from a rollout, computed once with the pre-update models (all [B, R] unless noted)."""

    def __init__(self, run: OnlineRun, batch, kl_coef: float, dense_reward=None) -> None:
        ppo, mbs = run.cfg.ppo, run.cfg.ppo.micro_batch_size
        self.rollout, self.kl_coef = batch.rollout, kl_coef
        self.hidden = run.prefix_states(self.rollout, mbs)  # [B, P + R, d] or None: frozen layers, run once
        self.logprobs, self.entropy = run.policy_logprobs(self.rollout, mbs, hidden=self.hidden)
        self.ref_logprobs = run.ref_logprobs(self.rollout, mbs, hidden=self.hidden)
        with torch.no_grad(), run.autocast():
            self.values = values_of(run.value, self.rollout, mbs).float()
        self.scores, self.raw_scores, self.parts = batch.rewards.to(run.device), batch.scores, batch.parts  # [B]
        shaped = self.scores  # [B]
        if ppo.score_baseline == "loo":  # rows are prompt-major: p0 x G, p1 x G, ...
            shaped = rloo_advantages(self.scores, ppo.samples_per_prompt)
        self.rewards, self.kl = kl_penalized_rewards(self.logprobs, self.ref_logprobs, shaped,
                                                     self.rollout.response_mask, kl_coef)
        self.dense = None
        if dense_reward is not None:  # ppo.dense_prm: PRM step scores at the tokens that end the steps
            self.dense = dense_reward(self.rollout).to(self.rewards)  # [B, R]
            self.rewards = self.rewards + self.dense
        self.advantages, self.returns = whitened_advantages(self.rewards, self.values, self.rollout.response_mask,
                                                            ppo.gamma, ppo.lam, ppo.whiten_rewards, run.all_sum)


# ---------------------------------------------------------------- PPO update
def ppo_update(run: OnlineRun, exp: Experience, iteration: int) -> list[dict[str, float]]:
    """ppo_epochs x num_minibatches optimizer steps on one batch of experience; stats per minibatch.

    Micro-batch losses are token sums divided by the minibatch's token count (over all processes), so
    accumulating them equals the masked mean over the whole minibatch. Autocast is entered per micro-batch
    forward only: one autocast context spanning optimizer steps would keep serving its cached low-precision
    copies of the OLD weights (torch.autocast's weight-cast cache): stale forwards, ratio == 1.
    """
    ppo, temperature = run.cfg.ppo, run.cfg.generation.temperature
    groups = [[p for p in run.model.parameters() if p.requires_grad], list(run.value.parameters())]
    b = len(exp.rollout)
    minibatch_size = b // ppo.num_minibatches
    stats = []
    for epoch in range(ppo.ppo_epochs):
        g = torch.Generator().manual_seed(derive_seed(run.cfg.train.seed, iteration, epoch, run.accelerator.process_index))
        b_inds = torch.randperm(b, generator=g)  # fresh permutation every epoch
        for mb_start in range(0, b, minibatch_size):
            mb_inds = b_inds[mb_start : mb_start + minibatch_size]
            n_tokens = run.all_sum(exp.rollout.response_mask[mb_inds].sum().float()).clamp(min=1)
            acc = dict.fromkeys(("approxkl", "clipfrac", "vf_clipfrac", "vpred", "error", "pg_loss", "vf_loss",
                                 "ratio"), 0.0)
            ratio_min, ratio_max = math.inf, -math.inf
            for micro_start in range(0, minibatch_size, ppo.micro_batch_size):
                inds = mb_inds[micro_start : micro_start + ppo.micro_batch_size]
                micro = exp.rollout.select(inds)  # same columns as the experience tensors
                mask = micro.response_mask.float()  # [b, R]
                with run.autocast():
                    hidden = None if exp.hidden is None else exp.hidden[inds]
                    new_logprobs = response_logprobs(run.model, micro, temperature, hidden=hidden,
                                                     hidden_layers=run.shared_prefix())
                    vpred = values_of(run.value, micro).float()  # [b, R]
                pg = ppo_policy_loss(new_logprobs, exp.logprobs[inds], exp.advantages[inds], ppo.cliprange)
                vf = ppo_value_loss(vpred, exp.values[inds], exp.returns[inds], ppo.cliprange_value)
                pg_loss = masked_sum(pg.pg_losses, mask) / n_tokens
                vf_loss = masked_sum(vf.vf_losses, mask) / n_tokens
                run.backward((pg_loss + ppo.vf_coef * vf_loss) * run.num_processes)  # DDP averages over processes
                with torch.no_grad():
                    for key, x in (("approxkl", pg.approxkl), ("clipfrac", pg.clipfrac), ("ratio", pg.ratio),
                                   ("vf_clipfrac", vf.vf_clipfrac), ("vpred", vpred),
                                   ("error", (vpred - exp.returns[inds]) ** 2)):
                        acc[key] += float(masked_sum(x, mask) / n_tokens) * run.num_processes
                    acc["pg_loss"] += float(pg_loss) * run.num_processes
                    acc["vf_loss"] += float(vf_loss) * run.num_processes
                    real = pg.ratio[mask.bool()]
                    if real.numel():
                        ratio_min, ratio_max = min(ratio_min, float(real.min())), max(ratio_max, float(real.max()))
            policy_grad_norm, value_grad_norm = run.step(groups)
            stats.append({
                "policy/approxkl": acc["approxkl"], "policy/clipfrac": acc["clipfrac"], "policy/ratio": acc["ratio"],
                "policy/ratio_min": ratio_min, "policy/ratio_max": ratio_max, "val/clipfrac": acc["vf_clipfrac"],
                "val/vpred": acc["vpred"], "val/error": acc["error"], "loss/policy": acc["pg_loss"],
                "loss/value": acc["vf_loss"], "policy/grad_norm": policy_grad_norm, "val/grad_norm": value_grad_norm,
            })
    return stats


def iteration_metrics(run: OnlineRun, exp: Experience, mb_stats: list[dict[str, float]]) -> dict[str, float]:
    """Rollout statistics + the minibatch statistics averaged over the iteration (token means over all processes)."""
    mask = exp.rollout.response_mask.float()
    kl_sum = exp.kl.sum(1)  # [B] sequence KL
    metrics = {
        "objective/kl": float(kl_sum.mean()),
        "objective/entropy": float((exp.entropy * mask).sum(1).mean()),
        "objective/scores": float(exp.scores.mean()),
        "objective/non_score_reward": float((-exp.kl_coef * kl_sum).mean()),
        "objective/rlhf_reward": float((exp.scores - exp.kl_coef * kl_sum).mean()),
        "scores": float(exp.raw_scores.mean()),  # reward model + components, before the missing-EOS penalty
        "returns": run.global_masked_mean(exp.returns, mask),
        "advantages": run.global_masked_mean(exp.advantages, mask),
        "response_length": float(mask.sum(1).mean()),
        "no_eos_frac": float((~exp.rollout.has_eos).float().mean()),
        "kl_coef": exp.kl_coef,
    }
    metrics.update({k: float(v.float().mean()) for k, v in exp.parts.items()})
    if exp.dense is not None:
        metrics["objective/dense_prm"] = float(exp.dense.sum(1).mean())
    for key in mb_stats[0]:
        values = [s[key] for s in mb_stats]
        metrics[key] = min(values) if key == "policy/ratio_min" else max(values) if key == "policy/ratio_max" \
            else sum(values) / len(values)
    return metrics


# ---------------------------------------------------------------- main loop
def train(cfg: PPOConfig, resume: bool = False) -> dict:
    ppo = cfg.ppo
    check_config(cfg)
    check_value_tokenizer(cfg)
    run = OnlineRun.start(
        cfg, "ppo", resume, total_steps=ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches, reference=True,
        reward=reward_section(cfg), value_fn=lambda tok, rms: build_value_model(cfg, tok, rms), value_lr=ppo.value_lr,
    )
    run.per_process(ppo.rollout_batch_size // ppo.num_minibatches, "ppo.rollout_batch_size / ppo.num_minibatches")
    kl_ctl = build_kl_controller(ppo)
    if "kl_ctl" in run.state:
        kl_ctl.load_state_dict(run.state["kl_ctl"])
    dense = None
    if ppo.dense_prm:
        scorer = load_prm_scorer(ppo.dense_prm)
        scorer.model.to(run.device)
        dense = PRMDenseReward(scorer, run.tokenizer, ppo.dense_prm_coef)
    run.evaluate_before()
    metrics: dict[str, float] = {}
    for iteration in run.iterations(ppo.num_iterations):
        lr = run.lr
        batch = run.sample(*run.next_prompts(ppo.rollout_batch_size), num_samples=ppo.samples_per_prompt)
        exp = Experience(run, batch, kl_ctl.value, dense)
        mb_stats = ppo_update(run, exp, iteration)
        metrics = {**iteration_metrics(run, exp, mb_stats), "lr": lr}
        kl_ctl.update(run.reduce_metrics({"kl": metrics["objective/kl"]})["kl"],
                      n_steps=ppo.rollout_batch_size * ppo.samples_per_prompt)
        run.state["kl_ctl"] = kl_ctl.state_dict()  # Ziegler: n = batch size
        run.end_iteration(iteration, metrics, ppo.save_every)

    def save_value(run_dir, write: bool):
        if write:
            save_module_dir(run.accelerator.unwrap_model(run.value), run.tokenizer, run_dir / "value_model")
        return {"value_model_dir": str(run_dir / "value_model")}

    return run.finish({"final_metrics": metrics, "kl_coef": kl_ctl.value}, save_extra=save_value)
