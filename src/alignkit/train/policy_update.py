"""Shared pieces of the critic-free policy-gradient methods (GRPO, Dr. GRPO, DAPO, RLOO).

One iteration of such a method is

    sample G completions per prompt -> score -> advantages (method-specific)
    -> old / reference log-probs (no grad) -> ``ppo_epochs`` clipped updates

and everything except the advantages and the per-token loss is the same for all of them.
This module holds that common part:

- rollout batch helpers: :func:`select_rows`, :func:`concat_rollouts`, :class:`ScoredRollout`;
- :func:`rollout_logprobs`: old log-probs (sampling temperature), entropy and reference log-probs;
- :func:`update_policy`: ``num_epochs`` optimizer steps, each over the WHOLE rollout batch with
  gradient accumulation over micro-batches. Each micro-batch's aggregated loss is weighted so the
  accumulated gradient equals the gradient of the full-batch aggregate (``aggregate_token_losses``),
  whatever the micro-batch size (grad-accum 1x8 == 8x1);
- :class:`PolicyRun`: the run plumbing (models, optimizer, prompts, rewards, checkpoints, eval,
  logging) that both algorithms share, so each algorithm file only holds its own maths.

Design choice: one optimizer step per epoch over all samples of the iteration (TRL's GRPO with
``steps_per_generation = 1``; the GRPO paper's mu = ``ppo_epochs``). With ``ppo_epochs = 1`` the
update is exactly on-policy (ratio 1, no clipping); later epochs reuse the same samples and the
clipped ratio keeps them close to the sampling policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import get_scheduler

from alignkit.models.loading import (
    copy_frozen,
    disable_dropout,
    is_peft,
    load_policy,
    load_tokenizer,
    reference_context,
    save_model,
)
from alignkit.ops.stats import aggregate_token_losses, masked_mean, masked_sum
from alignkit.rewards.combine import apply_missing_eos_penalty, build_reward
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts, response_logprobs
from alignkit.rollout.prompts import PromptSampler, load_prompts, prompt_batch
from alignkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.train.logging import MetricsLogger
from alignkit.train.run import RunError, log, make_accelerator, prepare_run_dir, set_seed, write_summary

TokenLossFn = Callable[[Tensor, Tensor, "Tensor | None", Tensor], "tuple[Tensor, dict[str, Tensor]]"]
"""``(logprobs [b, T], old_logprobs [b, T], ref_logprobs [b, T] | None, advantages [b] or [b, T])
-> (per-token losses [b, T], {metric name: per-token values [b, T]})``; the metrics are averaged over
the response tokens of the batch (and over epochs) by :func:`update_policy`."""


# ---------------------------------------------------------------- rollout rows
def trim_padding(rollout: Rollout) -> Rollout:
    """Drop prompt columns that are padding in every row (left) and response columns that are
    padding in every row (right). Real tokens and their log-probs are unchanged (position ids
    come from the attention mask)."""
    first = int(rollout.prompt_mask.any(dim=0).long().argmax()) if rollout.prompt_mask.numel() else 0
    width = int(rollout.response_mask.sum(dim=1).max()) if len(rollout) else 0
    return Rollout(
        prompt_ids=rollout.prompt_ids[:, first:],
        prompt_mask=rollout.prompt_mask[:, first:],
        response_ids=rollout.response_ids[:, :width],
        response_mask=rollout.response_mask[:, :width],
        has_eos=rollout.has_eos,
        prompt_texts=rollout.prompt_texts,
        response_texts=rollout.response_texts,
        extras=rollout.extras,
    )


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    """The rollout restricted to ``rows`` (in that order), padding trimmed."""
    return trim_padding(rollout.select(rows))


def _pad_cols(x: Tensor, width: int, value: int, left: bool) -> Tensor:
    extra = width - x.shape[1]
    return F.pad(x, (extra, 0) if left else (0, extra), value=value)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts row-wise: prompts re-padded on the LEFT, responses on the RIGHT."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len(rollouts) == 1:
        return rollouts[0]
    p = max(r.prompt_ids.shape[1] for r in rollouts)
    w = max(r.response_ids.shape[1] for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([_pad_cols(r.prompt_ids, p, pad_token_id, True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_cols(r.prompt_mask, p, 0, True) for r in rollouts]),
        response_ids=torch.cat([_pad_cols(r.response_ids, w, pad_token_id, False) for r in rollouts]),
        response_mask=torch.cat([_pad_cols(r.response_mask, w, 0, False) for r in rollouts]),
        has_eos=torch.cat([r.has_eos for r in rollouts]),
        prompt_texts=[t for r in rollouts for t in r.prompt_texts],
        response_texts=[t for r in rollouts for t in r.response_texts],
        extras=[e for r in rollouts for e in r.extras],
    )


@dataclass
class ScoredRollout:
    """A rollout with its scores: ``scores`` [B] the raw combined reward, ``parts`` its named
    components (``rewards/<name>`` -> [B]), ``rewards`` [B] what the advantages are computed from
    (scores plus shaping such as the missing-EOS penalty). All on CPU, rows in rollout order."""

    rollout: Rollout
    scores: Tensor
    rewards: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rollout)

    def select(self, rows: list[int]) -> "ScoredRollout":
        idx = torch.tensor(rows, dtype=torch.long)
        return ScoredRollout(
            select_rows(self.rollout, rows), self.scores[idx], self.rewards[idx], {k: v[idx] for k, v in self.parts.items()}
        )

    @staticmethod
    def concat(batches: list["ScoredRollout"], pad_token_id: int) -> "ScoredRollout":
        return ScoredRollout(
            concat_rollouts([b.rollout for b in batches], pad_token_id),
            torch.cat([b.scores for b in batches]),
            torch.cat([b.rewards for b in batches]),
            {k: torch.cat([b.parts[k] for b in batches]) for k in batches[0].parts},
        )


def equal_reward_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B*G] group-contiguous rewards -> [B] bool, True where all G rewards of a group are equal
    (their group advantages are 0: the group carries no policy-gradient signal)."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    return (grouped == grouped[:, :1]).all(dim=1)


# ---------------------------------------------------------------- log-probs
@torch.no_grad()
def rollout_logprobs(
    model, rollout: Rollout, temperature: float, micro_batch_size: int, ref_model=None, use_reference: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(old_logprobs [B, R], entropy [B, R], ref_logprobs [B, R] or None), all from
    ``log_softmax(logits / temperature)``, zero outside ``response_mask``.

    The reference is ``ref_model`` if given, else (``use_reference``) ``model`` with its LoRA
    adapters disabled (``reference_context``); no reference at all when neither.
    """
    old_logprobs, entropy = response_logprobs(
        model, rollout, temperature, return_entropy=True, micro_batch_size=micro_batch_size
    )
    ref_logprobs = None
    if ref_model is not None:
        ref_logprobs = response_logprobs(ref_model, rollout, temperature, micro_batch_size=micro_batch_size)
    elif use_reference:
        with reference_context(model):
            ref_logprobs = response_logprobs(model, rollout, temperature, micro_batch_size=micro_batch_size)
    return old_logprobs, entropy, ref_logprobs


# ---------------------------------------------------------------- update
def microbatch_weight(mode: str, mb_mask: Tensor, batch_size: int, total_tokens: Tensor) -> Tensor | float:
    """Factor that turns a micro-batch's aggregate into its share of the full-batch aggregate.

    seq_mean, seq_sum_const: both are (1/B) sum_i (...)_i, so a micro-batch of b rows weighs b / B.
    token_mean: sum_{i,t} l / N_tokens, so a micro-batch with n tokens weighs n / N_tokens.
    """
    if mode == "token_mean":
        return mb_mask.sum() / total_tokens.clamp(min=1)
    return mb_mask.shape[0] / batch_size


def update_policy(
    model,
    optimizer,
    scheduler,
    rollout: Rollout,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    token_loss_fn: TokenLossFn,
    aggregation: str,
    *,
    temperature: float,
    micro_batch_size: int,
    max_grad_norm: float | None,
    num_epochs: int = 1,
    max_len: int | None = None,
    accelerator=None,
) -> dict[str, float]:
    """``num_epochs`` optimizer steps on one rollout batch; returns metrics averaged over epochs.

    Each epoch: loss = aggregate_token_losses(token_loss_fn(...), response_mask, aggregation, max_len)
    over all B rows, accumulated over micro-batches of ``micro_batch_size`` rows (weights from
    :func:`microbatch_weight`), then gradient clipping to ``max_grad_norm`` (None: no clipping, the
    norm is still reported), ``optimizer.step()``, ``scheduler.step()``. Gradients are zeroed at the
    start of each epoch, so after the call ``.grad`` holds the last epoch's gradient.
    Returned: ``loss/policy``, ``grad_norm`` and the token-mean of each metric of ``token_loss_fn``.
    """
    B = len(rollout)
    if B == 0:
        raise ValueError("update_policy got an empty rollout batch")
    response_mask = rollout.response_mask.to(old_logprobs.dtype)  # [B, R]
    total_tokens = response_mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    stat_sums: dict[str, float] = {}
    n_tokens, loss_sum, grad_norm_sum = 0.0, 0.0, 0.0
    model.train()
    for _ in range(num_epochs):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, B, micro_batch_size):
            end = min(start + micro_batch_size, B)
            mb = select_rows(rollout, list(range(start, end)))
            w = mb.response_ids.shape[1]
            mb_mask = response_mask[start:end, :w]  # [b, w]
            mb_adv = advantages[start:end]
            if mb_adv.dim() == 2:
                mb_adv = mb_adv[:, :w]
            logprobs = response_logprobs(model, mb, temperature)  # [b, w]
            mb_ref = ref_logprobs[start:end, :w] if ref_logprobs is not None else None
            token_losses, stats = token_loss_fn(logprobs, old_logprobs[start:end, :w], mb_ref, mb_adv)  # [b, w]
            loss = aggregate_token_losses(token_losses, mb_mask, aggregation, max_len)
            loss = loss * microbatch_weight(aggregation, mb_mask, B, total_tokens)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            loss_sum += float(loss.detach())
            n_tokens += float(mb_mask.sum())
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(masked_sum(v.detach().float(), mb_mask))
        max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
        if accelerator is not None:
            grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm_sum += float(grad_norm)
        optimizer.step()
        scheduler.step()
    metrics = {"loss/policy": loss_sum / num_epochs, "grad_norm": grad_norm_sum / num_epochs}
    metrics.update({k: v / max(n_tokens, 1.0) for k, v in stat_sums.items()})
    return metrics


# ---------------------------------------------------------------- optimizer
def build_optimizer(model, train_cfg, total_steps: int):
    """AdamW over the trainable parameters + the ``train.scheduler`` schedule over ``total_steps``
    optimizer steps, with ``train.warmup_steps`` of linear warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    optimizer = torch.optim.AdamW(
        params, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), weight_decay=train_cfg.weight_decay
    )
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[train_cfg.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def response_stats(scored: ScoredRollout) -> dict[str, float]:
    """scores (mean raw reward), rewards/<name>, response_length, no_eos_frac of a scored batch."""
    r = scored.rollout
    out = {"scores": float(scored.scores.mean())}
    out.update({k: float(v.mean()) for k, v in scored.parts.items()})
    out["response_length"] = float(r.response_lengths.float().mean())
    out["no_eos_frac"] = float((~r.has_eos.bool()).float().mean())
    return out


# ---------------------------------------------------------------- the run
@dataclass
class PolicyRun:
    """Everything an iteration loop needs besides its maths: built by :meth:`start`.

    - ``model`` (prepared by ``accelerate``), ``ref_model`` (a frozen copy of the initial policy, or
      None: no reference, or the adapter-disabled policy under LoRA, see ``use_reference``);
    - ``optimizer``/``scheduler`` over ``total_steps``; ``sampler`` (resumable prompt order);
    - ``reward_fn`` (``build_reward``), ``eval_prompts``; ``logger`` (metrics.jsonl + TensorBoard);
    - ``iteration``: the last finished iteration (from the checkpoint on ``--resume``), ``loop_state``.
    """

    cfg: Any
    run_dir: Path
    accelerator: Any
    tokenizer: Any
    model: Any
    ref_model: Any
    use_reference: bool
    optimizer: Any
    scheduler: Any
    reward_fn: Any
    sampler: Any
    eval_prompts: list[dict]
    logger: Any
    iteration: int = 0
    loop_state: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    last_saved: int = -1

    # ------------------------------------------------------------ setup
    @classmethod
    def start(cls, cfg, name: str, resume: bool, total_steps: int, needs_reference: bool) -> "PolicyRun":
        accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.cpu)
        if accelerator.num_processes > 1:
            raise RunError(f"{name} runs in a single process for now; got {accelerator.num_processes} processes")
        # data and rewards are validated before anything is written
        tokenizer = load_tokenizer(cfg.model.name_or_path)
        prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "train", log)
        eval_prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "eval", log)
        reward_models: dict = {}
        reward_fn = build_reward(cfg.reward, tokenizer, reward_models)
        run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, name)
        set_seed(cfg.train.seed)
        for scorer in reward_models.values():
            scorer.model.to(accelerator.device)
        model = load_policy(cfg.model, tokenizer)
        disable_dropout(model)  # also LoRA dropout: the first update must see ratio 1
        use_reference = needs_reference and is_peft(model)
        ref_model = copy_frozen(model) if needs_reference and not use_reference else None
        if ref_model is not None:
            ref_model.to(accelerator.device)
        optimizer, scheduler = build_optimizer(model, cfg.train, total_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        run = cls(
            cfg=cfg, run_dir=run_dir, accelerator=accelerator, tokenizer=tokenizer, model=model,
            ref_model=ref_model, use_reference=use_reference, optimizer=optimizer, scheduler=scheduler,
            reward_fn=reward_fn, sampler=PromptSampler(prompts, cfg.train.seed), eval_prompts=eval_prompts,
            logger=MetricsLogger(run_dir),
        )
        if resume:
            run._resume()
        ref = "adapter-disabled policy" if use_reference else ("frozen copy" if ref_model is not None else "none")
        log(f"{name}: {len(prompts)} prompts, {len(eval_prompts)} eval prompts, reference: {ref}, "
            f"device {accelerator.device}, starting after iteration {run.iteration}")
        return run

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            log(f"--resume: no checkpoint in {self.run_dir}; starting from the beginning")
            self.logger.truncate_after(-1)
            return
        state = load_checkpoint(path, self.unwrapped, self.optimizer, self.scheduler, scaler=self.accelerator.scaler)
        self.iteration = self.last_saved = int(state["step"])
        self.loop_state = dict(state["loop_state"])
        self.sampler.load_state_dict(self.loop_state["sampler"])
        self.logger.truncate_after(self.iteration)
        log(f"--resume: restored {path} (iteration {self.iteration})")

    def save_checkpoint(self, iteration: int) -> Path:
        self.iteration = self.last_saved = iteration
        self.loop_state.update(sampler=self.sampler.state_dict(), iteration=iteration)
        return save_checkpoint(
            self.run_dir, iteration, self.unwrapped, self.optimizer, self.scheduler, self.loop_state,
            scaler=self.accelerator.scaler,
        )

    # ------------------------------------------------------------ sampling and scoring
    def sample(self, prompts: list[dict], num_samples: int, do_sample: bool = True) -> ScoredRollout:
        """Generate ``num_samples`` completions per prompt (group-contiguous) and score them.

        rewards = scores with the missing-EOS penalty (``reward.missing_eos_penalty``) applied.
        Adds the elapsed seconds to ``timings["generation"]`` and ``timings["scoring"]``.
        """
        g = self.cfg.generation
        t0 = time.perf_counter()
        batch = prompt_batch(prompts, self.tokenizer.pad_token_id)
        rollout = generate_rollouts(
            HFGenerateBackend(self.model, self.tokenizer), self.tokenizer,
            batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            SamplingParams.from_section(g, do_sample=do_sample), num_samples=num_samples,
            prompt_texts=batch["prompt_texts"], extras=batch["extras"], batch_size=g.batch_size * num_samples,
        )
        t1 = time.perf_counter()
        scores, parts = self.reward_fn(rollout.prompt_texts, rollout.response_texts, rollout.extras)  # [B]
        rewards = apply_missing_eos_penalty(
            scores, rollout.has_eos.cpu(), self.cfg.reward.missing_eos_penalty, self.cfg.reward.missing_eos_mode
        )
        t2 = time.perf_counter()
        self.timings["generation"] = self.timings.get("generation", 0.0) + t1 - t0
        self.timings["scoring"] = self.timings.get("scoring", 0.0) + t2 - t1
        return ScoredRollout(rollout, scores, rewards, parts)

    def reset_timings(self) -> None:
        self.timings = {"generation": 0.0, "scoring": 0.0, "training": 0.0}

    def logprobs(self, rollout: Rollout, micro_batch_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        return rollout_logprobs(
            self.model, rollout, self.cfg.generation.temperature, micro_batch_size,
            ref_model=self.ref_model, use_reference=self.use_reference,
        )

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float] | None:
        """Greedy completions of the eval prompts, scored by the reward: scores (mean raw reward),
        rewards/<name>, response_length, no_eos_frac. None when there are no eval prompts."""
        if not self.eval_prompts:
            return None
        timings = dict(self.timings)
        bs = self.cfg.generation.batch_size
        chunks = [self.sample(self.eval_prompts[i : i + bs], 1, do_sample=False) for i in range(0, len(self.eval_prompts), bs)]
        self.timings = timings
        return response_stats(ScoredRollout.concat(chunks, self.tokenizer.pad_token_id))

    def evaluate_before(self) -> None:
        """Evaluate the initial policy once (kept in ``loop_state`` so a resumed run does not redo it)."""
        if "eval_before" in self.loop_state:
            return
        metrics = self.evaluate()
        self.loop_state["eval_before"] = metrics
        if metrics is not None:
            self.logger.log(metrics, step=0, prefix="eval/")

    # ------------------------------------------------------------ end
    def end_iteration(self, iteration: int, metrics: dict[str, float], save_every: int) -> None:
        """Add the time split, log one metrics line, and checkpoint every ``save_every`` iterations."""
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        self.logger.log(metrics, step=iteration)
        self.iteration = iteration
        if save_every and iteration % save_every == 0:
            self.save_checkpoint(iteration)

    def finish(self, name: str, last_metrics: dict[str, float], extra: dict | None = None) -> dict:
        """Final checkpoint, eval after training, final model (``model/``), summary.json."""
        if self.last_saved != self.iteration:
            self.save_checkpoint(self.iteration)
        eval_after = self.evaluate()
        if eval_after is not None:
            self.logger.log(eval_after, step=self.iteration, prefix="eval/")
        summary: dict[str, Any] = {
            "algorithm": name,
            "iterations": self.iteration,
            "final_metrics": last_metrics,
            "eval_before": self.loop_state.get("eval_before"),
            "eval_after": eval_after,
            **(extra or {}),
        }
        if self.cfg.train.save_model:
            summary["model_dir"] = str(save_model(self.unwrapped, self.tokenizer, self.run_dir / "model"))
        write_summary(self.run_dir, summary)
        self.logger.close()
        if eval_after is not None:
            before = self.loop_state.get("eval_before") or {}
            log(f"{name}: eval scores {before.get('scores', float('nan')):.4f} -> {eval_after['scores']:.4f}")
        log(f"{name} done: {self.run_dir}")
        return summary


def masked_token_mean(x: Tensor, mask: Tensor) -> float:
    return float(masked_mean(x.float(), mask.to(x.device).float()))


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B]: sum_t (log pi - log pref) over response tokens (k1 summed: the sequence-level KL estimate)."""
    return masked_sum(logprobs - ref_logprobs, mask.to(logprobs.dtype), dim=-1)
