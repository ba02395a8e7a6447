"""OnlineRun: the one harness every online method stands on (PPO, GRPO, RLOO, REINFORCE++, online DPO,
rejection sampling, best-of-n). An algorithm keeps only its maths — experience -> advantages -> loss:

    run = OnlineRun.start(cfg, "rloo", resume, total_steps=n_iters, reference=cfg.rloo.kl_coef > 0)
    run.evaluate_before()
    for it in run.iterations(n_iters):
        batch = run.sample(*run.next_prompts(k), num_samples=G)              # this process's rows
        old, entropy = run.policy_logprobs(batch.rollout, mbs)
        ...advantages...
        stats = update_policy(run, batch.rollout, old, ref, advantages, token_loss, "seq_mean", ...)
        run.end_iteration(it, {**batch.stats(), **stats})
    return run.finish()

What it owns, once for all methods:

- the ``accelerate`` Accelerator (``accelerate launch --num_processes N`` works unchanged), the policy (LoRA
  optional, dropout off) and an optional value model, both prepared (DDP) so gradients sync;
- the optimizer and LR schedule (``train.optim.build_optimizer``, shared with the offline loop);
- the reference policy (``models.reference.Reference``), the reward (``rewards.build_reward``), the generation
  engine chosen in config (``rollout.backends.make_backend``), synced after every update;
- the prompt order: each iteration draws the GLOBAL batch of prompts (same on every process, seeded, resumable)
  and process r takes its contiguous slice; row seeds make the samples independent of the process count;
- ``all_sum`` / ``reduce_metrics``: statistics over all processes (metrics are means over processes of equal
  shards); the finiteness checks (loss, gradient norm, log-probs, weights before a checkpoint);
- checkpoints (written by the main process, resumed by all; exact resume), periodic and final evaluation
  (greedy completions of ``data.eval``), metrics.jsonl + TensorBoard, progress bar, the final model and summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from alignkit.models.loading import disable_dropout, load_policy, load_tokenizer, save_model
from alignkit.models.reference import Reference
from alignkit.ops.diagnostics import diagnostic_warnings, response_diagnostics
from alignkit.ops.prefix import frozen_prefix_layers, prefix_states, shared_prefix_layers
from alignkit.ops.seeds import derive_seed
from alignkit.online.rollout import ScoredRollout, sample_and_score
from alignkit.rewards.combine import build_reward
from alignkit.rollout.backends import make_backend
from alignkit.rollout.engine import (
    TRUNCATED_SAMPLING_MESSAGE,
    Rollout,
    SamplingParams,
    response_logprobs,
    truncated_sampling_note,
)
from alignkit.rollout.prompts import PromptSampler, load_prompts
from alignkit.train.checkpoint import atomic_save_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.train.logging import MetricsLogger
from alignkit.train.loop import NonFiniteLossError, check_launch
from alignkit.train.optim import build_optimizer
from alignkit.train.run import (
    RunError,
    autocast_dtype,
    log,
    make_accelerator,
    no_checkpoint_message,
    prepare_run_dir,
    set_seed,
    write_summary,
)


class Trainables(torch.nn.Module):
    """The trainable models under one module, so one checkpoint holds all of them (policy adapters under LoRA,
    plus e.g. PPO's value model). Only a container for state dicts: forwards go through the prepared modules."""

    def __init__(self, **models: torch.nn.Module) -> None:
        super().__init__()
        for name, model in models.items():
            self.add_module(name, model)
        policy = models.get("policy")
        if policy is not None and hasattr(policy, "peft_config"):
            self.peft_config = policy.peft_config  # the checkpoint then stores only trainable tensors


@dataclass
class OnlineRun:
    cfg: Any
    name: str
    run_dir: Path
    accelerator: Any
    tokenizer: Any
    model: Any  # the policy, prepared (DDP-wrapped under several processes)
    value: Any  # a prepared value model, or None
    reference: Reference | None
    optimizer: Any
    scheduler: Any
    reward: Any
    reward_cfg: Any  # the ``reward:`` section in use (missing-EOS penalty)
    reward_models: dict
    backend: Any
    sampler: PromptSampler
    eval_prompts: list[dict]
    logger: MetricsLogger
    iteration: int = 0
    state: dict = field(default_factory=dict)
    """Algorithm state saved with every checkpoint (JSON), e.g. PPO's adaptive KL coefficient."""
    loop_state: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    last_saved: int = -1
    _bar: Any = None
    _n_iterations: int = 0
    _shared_prefix: int | None = None

    # ------------------------------------------------------------ setup
    @classmethod
    def start(
        cls,
        cfg,
        name: str,
        resume: bool,
        *,
        total_steps: int | Callable[[int], int],
        reference: bool,
        reward=None,
        value_fn: Callable[[Any, dict], torch.nn.Module] | None = None,
        value_lr: float | None = None,
    ) -> "OnlineRun":
        """Validate data and rewards, then build everything. ``reference``: whether the method needs pi_ref;
        ``reward``: a ``reward:`` section to use instead of ``cfg.reward``; ``value_fn(tokenizer, reward_models)``
        builds a trainable value model (its own param group at ``value_lr``). ``total_steps``: optimizer steps of
        the whole run (the LR schedule), or a function of the number of training prompts giving it."""
        accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.cpu)
        check_launch(accelerator)  # DDP only, and a real process group
        tokenizer = load_tokenizer(cfg.model.name_or_path)
        prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "train", log)
        eval_prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "eval", log)
        reward_models: dict = {}
        reward_cfg = reward if reward is not None else cfg.reward
        reward_fn = build_reward(reward_cfg, tokenizer, reward_models)
        run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, name)
        set_seed(cfg.train.seed)
        device = accelerator.device
        for scorer in reward_models.values():
            scorer.model.to(device)
        policy = load_policy(cfg.model, tokenizer)
        disable_dropout(policy)  # also LoRA dropout: the first update must see ratio 1
        ref = Reference.of_policy(policy).to(device) if reference else None
        value = value_fn(tokenizer, reward_models) if value_fn is not None else None
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad]}]
        if value is not None:
            groups.append({"params": list(value.parameters()), "lr": value_lr or cfg.train.lr})
        if callable(total_steps):
            total_steps = total_steps(len(prompts))
        optimizer, scheduler = build_optimizer(groups, cfg.train, total_steps)
        if value is not None:
            policy, value, optimizer = accelerator.prepare(policy, value, optimizer)
        else:
            policy, optimizer = accelerator.prepare(policy, optimizer)
        if ref is not None and ref.kind == "adapters_off":
            ref.model = policy
        backend = make_backend(cfg.generation, policy, tokenizer, autocast_dtype(cfg.train))
        run = cls(
            cfg=cfg, name=name, run_dir=run_dir, accelerator=accelerator, tokenizer=tokenizer, model=policy,
            value=value, reference=ref, optimizer=optimizer, scheduler=scheduler, reward=reward_fn,
            reward_cfg=reward_cfg, reward_models=reward_models, backend=backend, sampler=PromptSampler(prompts, cfg.train.seed),
            eval_prompts=eval_prompts, logger=MetricsLogger(run_dir, enabled=accelerator.is_main_process),
        )
        if resume:
            run._resume()
        if truncated_sampling_note(SamplingParams.from_section(cfg.generation)):
            log(f"{name}: note: {TRUNCATED_SAMPLING_MESSAGE} (logged as sampling/truncated)")
        log(f"{name}: {len(prompts)} prompts, {len(eval_prompts)} eval prompts, reference: {ref or 'none'}, "
            f"device {device}, {accelerator.num_processes} process(es), generation backend "
            f"{cfg.generation.backend}, starting after iteration {run.iteration}")
        return run

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def policy(self):
        """The unwrapped policy (no DDP wrapper): for saving and generation."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def trainables(self) -> Trainables:
        models = {"policy": self.policy}
        if self.value is not None:
            models["value_model"] = self.accelerator.unwrap_model(self.value)
        return Trainables(**models)

    # ------------------------------------------------------------ processes
    def all_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over processes (identity on one process)."""
        if self.num_processes == 1:
            return x
        return self.accelerator.reduce(x.to(self.device), reduction="sum").to(x.device)

    def all_max(self, x: int) -> int:
        """Largest value of an integer over processes."""
        if self.num_processes == 1:
            return int(x)
        return int(self.accelerator.gather(torch.tensor([int(x)], device=self.device)).max())

    def gather_objects(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in process order (= the global prompt order)."""
        if self.num_processes == 1:
            return list(items)
        from accelerate.utils import gather_object

        return [x for part in gather_object([list(items)]) for x in part]

    def global_masked_mean(self, x: Tensor, mask: Tensor) -> float:
        """Mean of the masked entries of ``x`` over every process (a token mean, weighted by tokens)."""
        mask = mask.to(x.device).double()
        total, n = self.all_sum(torch.stack([(x.double() * mask).sum(), mask.sum()]).cpu()).tolist()
        return total / n if n else 0.0

    def global_std(self, x: Tensor) -> float:
        """Standard deviation (Bessel-corrected) of the values of ``x`` on every process."""
        x = x.detach().double().flatten().cpu()
        n, total, sq = self.all_sum(torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(),
                                                  (x * x).sum()])).tolist()
        return math.sqrt(max(sq - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over processes (their shards are equal, so this is the global mean)."""
        if self.num_processes == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = self.all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.num_processes for k, v in zip(keys, values.tolist())}

    def per_process(self, n: int, what: str = "prompts per iteration") -> int:
        """``n / num_processes``; an error naming ``what`` unless it divides evenly."""
        if n % self.num_processes:
            raise RunError(f"{self.name}: {n} {what} cannot be split evenly over {self.num_processes} processes; "
                           f"use a multiple of {self.num_processes}")
        return n // self.num_processes

    def shard(self, items: list) -> list:
        """Process r's contiguous slice of a list that every process holds whole."""
        k = self.per_process(len(items))
        return items[self.accelerator.process_index * k : (self.accelerator.process_index + 1) * k]

    # ------------------------------------------------------------ sampling
    def next_prompts(self, n: int) -> tuple[list[dict], list[int]]:
        """The next ``n`` prompts of the global order and their sampling seeds, this process's share."""
        prompts, positions = self.sampler.next_with_positions(n)
        seeds = [derive_seed(self.cfg.train.seed, epoch, pos) for epoch, pos in positions]
        return self.shard(prompts), self.shard(seeds)

    def sample(self, prompts: list[dict], seeds: list[int] | None, num_samples: int = 1,
               do_sample: bool = True) -> ScoredRollout:
        """``num_samples`` completions per prompt, scored (``online.rollout.sample_and_score``); timed."""
        params = SamplingParams.from_section(self.cfg.generation, do_sample=do_sample)
        return sample_and_score(self.backend, self.tokenizer, prompts, seeds, num_samples, params, self.reward,
                                self.reward_cfg, self.device, batch_size=self.cfg.generation.batch_size,
                                timings=self.timings)

    # ------------------------------------------------------------ log-probs
    def shared_prefix(self) -> int:
        """Leading decoder layers that are frozen in the policy and the same in the reference (LoRA on the last
        layers with the adapter-disabled policy as reference): their states can be computed once per rollout
        (``train.reuse_frozen_prefix``; ``ops/prefix.py``). 0 when off or nothing is shared."""
        if self._shared_prefix is None:
            k = frozen_prefix_layers(self.model) if self.cfg.train.reuse_frozen_prefix else 0
            if k and self.reference is not None and self.reference.kind != "adapters_off":
                k = min(k, shared_prefix_layers(self.model, self.reference.model))
            self._shared_prefix = k
            if k:
                log(f"{self.name}: the first {k} decoder layers are frozen and shared with the reference: their "
                    f"states are computed once per rollout (train.reuse_frozen_prefix)")
        return self._shared_prefix

    @torch.no_grad()
    def prefix_states(self, rollout: Rollout, micro_batch_size: int) -> Tensor | None:
        """The states entering layer ``shared_prefix()`` for every row [B, P + R, d]; None when nothing is shared."""
        k = self.shared_prefix()
        if not k:
            return None
        with self.autocast():
            return prefix_states(self.model, rollout.input_ids, rollout.attention_mask, k, micro_batch_size)

    @torch.no_grad()
    def policy_logprobs(self, rollout: Rollout, micro_batch_size: int, entropy: bool = True,
                        hidden: Tensor | None = None):
        """log pi_old of the response tokens ([B, R], from logits / temperature) and their entropy ([B, R]).
        ``hidden``: ``prefix_states(rollout)``, to skip the shared layers."""
        with self.autocast():
            out = response_logprobs(self.model, rollout, self.cfg.generation.temperature, return_entropy=entropy,
                                    micro_batch_size=micro_batch_size, hidden=hidden,
                                    hidden_layers=self.shared_prefix())
        self.check_finite("policy log-probs", out[0] if entropy else out)
        return out

    def ref_logprobs(self, rollout: Rollout, micro_batch_size: int, hidden: Tensor | None = None) -> Tensor | None:
        """log pi_ref of the response tokens [B, R] (None without a reference); ``hidden`` as in
        ``policy_logprobs``."""
        if self.reference is None:
            return None
        with self.autocast():
            out = self.reference.logprobs(response_logprobs, rollout, self.cfg.generation.temperature,
                                          micro_batch_size=micro_batch_size, hidden=hidden,
                                          hidden_layers=self.shared_prefix())
        self.check_finite("reference log-probs", out)
        return out

    def autocast(self):
        dtype = autocast_dtype(self.cfg.train)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # ------------------------------------------------------------ updates
    def check_finite(self, what: str, x: Tensor | float) -> None:
        ok = math.isfinite(x) if isinstance(x, float) else bool(torch.isfinite(x).all())
        if not ok:
            raise NonFiniteLossError(
                f"{self.name}: non-finite {what} in iteration {self.iteration + 1}; stopped before the update "
                f"(the learning rate {self.cfg.train.lr:g} may be too high). Last good checkpoint: {self._ckpt_text()}"
            )

    def backward(self, loss: Tensor) -> None:
        self.check_finite("loss", float(loss.detach()))
        self.accelerator.backward(loss)

    def step(self, param_groups: list[list[torch.nn.Parameter]] | None = None) -> list[float]:
        """Clip the gradient norm of each group (``train.max_grad_norm``), check it, optimizer + LR step, zero the
        gradients, sync the generation engine. Returns the pre-clip norm of each group (default: all trainable)."""
        groups = param_groups or [[p for g in self.optimizer.param_groups for p in g["params"]]]
        max_norm = self.cfg.train.max_grad_norm or math.inf
        norms = []
        for params in groups:
            params = [p for p in params if p.grad is not None]
            norm = float(self.accelerator.clip_grad_norm_(params, max_norm)) if params else 0.0
            self.check_finite("gradient norm", norm)
            norms.append(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backend.update_weights(self.model)
        return norms

    def fit(self, examples: list, collate_fn: Callable[[list], dict], step_fn: Callable, *, seed: int,
            steps: int | None = None, epochs: int | None = None, dummy: Any = None) -> dict[str, float]:
        """Supervised steps inside an online run (online DPO's pairs, rejection sampling's best samples):
        ``steps`` optimizer steps (or ``epochs`` passes) over ``examples`` in a permutation drawn from ``seed``
        (cycled), ``train.grad_accum`` micro-batches of ``train.batch_size`` each. ``step_fn(model, batch)`` is an
        offline step (``train.loop.StepOutput``: the micro-batch's mean loss; metrics plain means or ``(sum, count)``
        pairs, reduced over the step's examples on every process). Each micro-batch weighs its share
        of the step's examples over ALL processes, so the gradient is that of the mean loss over the step,
        whatever the split; a process without examples runs ``dummy`` at weight 0 (DDP needs every process in the
        backward). Returns the metrics (``loss``, ``grad_norm``, the step's own) averaged over steps."""
        from alignkit.train.run import to_device

        t = self.cfg.train
        per_step, P = t.batch_size * t.grad_accum, self.num_processes
        n_max = self.all_max(len(examples))
        if n_max == 0:
            return {}
        if steps is None:
            steps = (epochs or 1) * math.ceil(n_max / per_step)
        n_micro = math.ceil(min(per_step, n_max) / t.batch_size)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        cursor, sums = 0, {}
        self.model.train()
        for _ in range(steps):
            idx = [order[(cursor + k) % len(order)] for k in range(min(per_step, len(order)))] if order else []
            cursor += len(idx)
            total = float(self.all_sum(torch.tensor(float(len(idx)))))
            num: dict[str, float] = {}  # metric -> (sum over this step's examples, count), then over processes
            den: dict[str, float] = {}
            for m in range(n_micro):
                micro = idx[m * t.batch_size : (m + 1) * t.batch_size]
                rows = [examples[i] for i in micro] or examples[:1] or [dummy]  # an empty share joins at weight 0
                with self.autocast():
                    out = step_fn(self.model, to_device(collate_fn(rows), self.device))
                self.backward(out.loss * len(micro) / total * P)  # DDP averages over processes
                for k, v in {"loss": out.loss, **out.metrics}.items():  # plain: a mean over the micro-batch
                    s_k, c_k = v if isinstance(v, tuple) else (_num(v) * len(micro), len(micro))
                    num[k], den[k] = num.get(k, 0.0) + _num(s_k) * bool(micro), den.get(k, 0.0) + _num(c_k) * bool(micro)
            keys = sorted(num)
            totals = self.all_sum(torch.tensor([num[k] for k in keys] + [den[k] for k in keys], dtype=torch.float64))
            stats = {k: float(totals[i]) / max(float(totals[len(keys) + i]), 1e-12) for i, k in enumerate(keys)}
            stats["grad_norm"] = self.step()[0]
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        return {**{k: v / steps for k, v in sums.items()}, "steps": steps}

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------ checkpoints
    def _ckpt_text(self) -> str:
        path = latest_checkpoint(self.run_dir)
        return str(path) if path is not None else "none (no checkpoint saved yet)"

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise RunError(no_checkpoint_message(self.run_dir))
        state = load_checkpoint(path, self.trainables(), self.optimizer, self.scheduler,
                                scaler=self.accelerator.scaler)
        self.iteration = self.last_saved = int(state["step"])
        self.loop_state = dict(state["loop_state"])
        self.state = dict(state["extra_state"])
        if "reward" in self.state and hasattr(self.reward, "load_state_dict"):
            self.reward.load_state_dict(self.state["reward"])
        self.sampler.load_state_dict(self.loop_state["sampler"])
        self.logger.truncate_after(self.iteration)
        self.backend.update_weights(self.model)
        log(f"--resume: restored {path} (iteration {self.iteration})")

    def save_checkpoint(self, iteration: int) -> None:
        for name, p in self.trainables().named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise NonFiniteLossError(f"{self.name}: weight {name!r} is not finite after iteration {iteration}; "
                                         f"no checkpoint written. Last good checkpoint: {self._ckpt_text()}")
        self.iteration = self.last_saved = iteration
        self.loop_state.update(sampler=self.sampler.state_dict(), iteration=iteration)
        if self.is_main:
            save_checkpoint(self.run_dir, iteration, self.trainables(), self.optimizer, self.scheduler,
                            self.loop_state, self.state, scaler=self.accelerator.scaler,
                            keep=max(self.cfg.train.keep_checkpoints, 1))
        self.accelerator.wait_for_everyone()
        self._t_saved = time.perf_counter()

    # ------------------------------------------------------------ the loop
    def iterations(self, n: int) -> Iterator[int]:
        """Iterations ``iteration + 1 .. n`` with a progress bar; timings reset at the start of each."""
        self._n_iterations = n
        self._bar = tqdm(total=n, initial=self.iteration, desc=self.name, disable=not self.is_main,
                         dynamic_ncols=True)
        try:
            for it in range(self.iteration + 1, n + 1):
                self.timings = {"generation": 0.0, "scoring": 0.0}
                self._t_iteration = time.perf_counter()
                yield it
        finally:
            self._bar.close()

    def end_iteration(self, iteration: int, metrics: dict[str, float], save_every: int = 0,
                      history: bool = False) -> dict[str, float]:
        """Reduce the metrics over processes, add the time split, log one line, advance the bar, and checkpoint
        every ``save_every`` iterations (0: ``train.save_every``), evaluate every ``train.eval_every``, and when ``train.save_every_minutes`` have passed
        since the last checkpoint (the main process's clock decides for all). ``history``: also keep the line (without
        timings) in ``state["history"]``, which the checkpoint and the summary carry."""
        metrics = self.reduce_metrics(metrics)
        reward_update = getattr(self.reward, "end_iteration", None)
        if reward_update is not None:  # e.g. a constrained reward's Lagrange multiplier, from this batch's means
            metrics.update(reward_update(metrics))
            self.state["reward"] = self.reward.state_dict()
        if history:
            self.state.setdefault("history", []).append({"iteration": iteration, **metrics})
        total = time.perf_counter() - getattr(self, "_t_iteration", time.perf_counter())
        self.timings["training"] = max(total - self.timings["generation"] - self.timings["scoring"], 0.0)
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        metrics.update(truncated_sampling_note(SamplingParams.from_section(self.cfg.generation)))
        self.logger.log(metrics, step=iteration)
        self.iteration = iteration
        if self._bar is not None:
            shown = {k: metrics[k] for k in ("scores", "objective/kl", "loss") if k in metrics}
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(1)
        every = save_every or self.cfg.train.save_every
        if (every and iteration % every == 0) or self._time_to_save():
            self.save_checkpoint(iteration)
        eval_every = self.cfg.train.eval_every
        if eval_every and iteration % eval_every == 0 and iteration < self._n_iterations:
            eval_metrics = self.evaluate()  # periodic; the final evaluation is finish()'s
            if eval_metrics is not None:
                self.logger.log(eval_metrics, step=iteration, prefix="eval/")
                self.warn(eval_metrics, iteration)
        return metrics

    def _time_to_save(self) -> bool:
        minutes = self.cfg.train.save_every_minutes
        if getattr(self, "_t_saved", None) is None:
            self._t_saved = getattr(self, "_t_iteration", time.perf_counter())  # the first iteration's start
        due = bool(minutes) and time.perf_counter() - self._t_saved >= 60 * minutes
        if self.num_processes > 1:
            due = bool(self.all_sum(torch.tensor([float(due and self.is_main)])).item())
        return due

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Greedy completions of the eval prompts (sharded over processes), scored by the reward: scores,
        rewards/<name>, response_length, no_eos_frac. None when there are no eval prompts."""
        if not self.eval_prompts:
            return None
        timings = dict(self.timings)
        p = self.num_processes
        prompts = self.eval_prompts[self.accelerator.process_index :: p]
        pad = len(self.eval_prompts[::p]) - len(prompts)  # equal shards: repeat a prompt, weight it 0
        prompts = prompts + prompts[:1] * pad if prompts else self.eval_prompts[:1] * pad
        scored = self.sample(prompts, None, 1, do_sample=False)
        self.timings = timings
        weights = torch.ones(len(prompts))
        if pad:
            weights[-pad:] = 0.0
        stats = {k: float((v * weights).sum()) for k, v in _row_stats(scored).items()}
        totals = self.all_sum(torch.tensor([stats[k] for k in sorted(stats)] + [float(weights.sum())],
                                           dtype=torch.float64))
        metrics = {k: float(v) / float(totals[-1]) for k, v in zip(sorted(stats), totals[:-1].tolist())}
        diag = self.diagnostics(scored, len(prompts) - pad)
        metrics.update({f"diag/{k}": v for k, v in diag.items()})
        return metrics

    @torch.no_grad()
    def diagnostics(self, scored: ScoredRollout, n_real: int) -> dict[str, float]:
        """Reward-hacking diagnostics (``ops.diagnostics.response_diagnostics``) of the first ``n_real`` rows of
        this process's eval rollout, over every process's rows: length and its correlation with the reward,
        distinct-1/2, repetition, token entropy and the log-ratio to the reference along the responses (one more
        forward of each), the no-EOS share, each component's share, and the proxy-gold gap when a reward
        component is named ``gold`` (give it weight 0 to monitor a gold score without training on it)."""
        r = scored.rollout
        mbs = self.cfg.generation.batch_size
        logp, ent = self.policy_logprobs(r, mbs)  # [B, R] each
        mask = r.response_mask.to(ent.device).float()  # [B, R]
        ent_sum, ntok = (ent * mask).sum(-1).cpu(), mask.sum(-1).cpu()  # [B]
        ref = self.ref_logprobs(r, mbs)
        logratio = ((logp - ref) * mask).sum(-1).cpu() if ref is not None else None  # [B]
        rows = []
        for i in range(n_real):
            ids = r.response_ids[i][r.response_mask[i].bool()].tolist()
            rows.append({"tokens": ids, "score": float(scored.scores[i]), "eos": bool(r.has_eos[i]),
                         "ent": float(ent_sum[i]), "ntok": int(ntok[i]),
                         "logratio": None if logratio is None else float(logratio[i]),
                         "parts": {k: float(v[i]) for k, v in scored.parts.items()}})
        rows = self.gather_objects(rows)
        parts = {k: [row["parts"][k] for row in rows] for k in (rows[0]["parts"] if rows else {})}
        weights = {f"rewards/{name}": w for name, _, w in getattr(self.reward, "components", [])}
        return response_diagnostics(
            [row["tokens"] for row in rows], [row["score"] for row in rows], [row["eos"] for row in rows],
            entropy=[row["ent"] for row in rows], entropy_tokens=[row["ntok"] for row in rows],
            logratio=None if logratio is None else [row["logratio"] for row in rows],
            gold=parts.get("rewards/gold"), parts=parts, weights=weights,
        )

    def warn(self, metrics: dict[str, float] | None, iteration: int) -> list[str]:
        """Plain-language warnings (``ops.diagnostics.diagnostic_warnings``) of an evaluation against the
        evaluation before training; printed, and kept in ``state["eval_warnings"]`` (the summary carries them)."""
        if not metrics:
            return []
        before = self.loop_state.get("eval_before") or {}
        msgs = diagnostic_warnings(_diag(metrics), _diag(before) or None)
        for m in msgs:
            log(f"{self.name}: WARNING (iteration {iteration}): {m}")
        if msgs:
            self.state.setdefault("eval_warnings", []).append({"iteration": iteration, "warnings": msgs})
        return msgs

    def evaluate_before(self) -> None:
        """Evaluate the initial policy once (kept in ``loop_state``, so a resumed run does not redo it)."""
        if "eval_before" in self.loop_state:
            return
        metrics = self.evaluate()
        self.loop_state["eval_before"] = metrics
        if metrics is not None:
            self.logger.log(metrics, step=0, prefix="eval/")

    # ------------------------------------------------------------ end
    def finish(self, summary: dict | None = None, save_extra: Callable[[Path], dict] | None = None) -> dict:
        """Final checkpoint, evaluation after training, the final model (``model/``, merged LoRA), summary.json.
        ``save_extra(run_dir, write) -> {key: path}`` names more artifacts and writes them when ``write`` (the main
        process), e.g. PPO's value model."""
        if self.last_saved != self.iteration:
            self.save_checkpoint(self.iteration)
        eval_after = self.evaluate()
        if eval_after is not None:
            self.logger.log(eval_after, step=self.iteration, prefix="eval/")
            self.warn(eval_after, self.iteration)
        out: dict[str, Any] = {"algorithm": self.name, "iterations": self.iteration,
                               "num_processes": self.num_processes, **(summary or {}),
                               "eval_before": self.loop_state.get("eval_before"), "eval_after": eval_after,
                               "eval_warnings": self.state.get("eval_warnings", [])}
        if self.cfg.train.save_model:  # the same result on every process; the main process writes
            out["model_dir"] = str(self.run_dir / "model")
            if self.is_main:
                save_model(self.policy, self.tokenizer, self.run_dir / "model")
            if save_extra is not None:
                out.update(save_extra(self.run_dir, self.is_main))
        if self.is_main:
            write_summary(self.run_dir, out)
        self.accelerator.wait_for_everyone()
        self.logger.close()
        if eval_after is not None:
            before = self.loop_state.get("eval_before") or {}
            log(f"{self.name}: eval scores {before.get('scores', float('nan')):.4f} -> {eval_after['scores']:.4f}")
        log(f"{self.name} done: {self.run_dir}")
        return out


def _diag(metrics: dict[str, float]) -> dict[str, float]:
    """The ``diag/`` entries of an evaluation's metrics, prefix removed."""
    return {k[len("diag/"):]: v for k, v in metrics.items() if k.startswith("diag/")}


def _num(x) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _row_stats(scored: ScoredRollout) -> dict[str, Tensor]:
    """Per-row values whose means are ``ScoredRollout.stats``: [B] each."""
    r = scored.rollout
    out = {"scores": scored.scores.float()}
    out.update({k: v.float() for k, v in scored.parts.items()})
    out["response_length"] = r.response_lengths.float().cpu()
    out["no_eos_frac"] = (~r.has_eos.bool()).float().cpu()
    return out


def save_module_dir(module: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
    """Atomically write an extra model (e.g. PPO's value model) loadable with ``from_pretrained``."""

    def write(tmp: Path) -> None:
        module.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_save_dir(out_dir, write)
    return out_dir
