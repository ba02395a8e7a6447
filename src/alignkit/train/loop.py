"""The shared training loop (torch + accelerate): every offline algorithm is a ``step_fn``.

    def step_fn(model, batch) -> StepOutput:
        ...  # forward, per-example loss from alignkit.losses, mean over the micro-batch
        return StepOutput(loss=losses.mean(), metrics={"rewards/chosen": ...}, num_tokens=int(mask.sum()))

    summary = train_loop(cfg.train, model=model, train_examples=examples, collate_fn=collate,
                         step_fn=step_fn, run_dir=Path(cfg.train.output_dir), eval_fn=evaluate)

One optimizer step = up to ``grad_accum`` micro-batches of ``batch_size`` examples. The data
order is a permutation drawn per epoch from ``(seed, epoch)``; an epoch's last micro-batch
may be smaller (nothing is dropped), and an optimizer step never spans two epochs, so
``steps_per_epoch = ceil(n_micro_batches / grad_accum)``. Micro-batch ``i`` of a step
contributes ``loss_i * n_i / N`` (``n_i`` its examples, ``N`` the step's), so the accumulated
gradient is the gradient of the mean loss over the step's examples, whatever the split.

Checkpoints (``train/checkpoint.py``) hold the trainable weights, optimizer, scheduler, RNG
states, the data position and the algorithm's extra state; ``resume=True`` continues from
the latest one and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from alignkit.config import TrainConfig
from alignkit.train.run import make_accelerator
from alignkit.train.checkpoint import (
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from alignkit.train.logging import MetricsLogger


@dataclass
class StepOutput:
    """What ``step_fn(model, batch)`` returns for one micro-batch."""

    loss: torch.Tensor
    """Scalar: the mean loss over the micro-batch's examples (the loop weights micro-batches)."""
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    """Scalars to log (e.g. ``rewards/chosen``); averaged over the step's micro-batches by examples."""
    num_tokens: int | torch.Tensor = 0
    """Non-pad tokens processed (for tokens/s)."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the step and last good checkpoint."""


# ---------------------------------------------------------------------- data order
def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: a permutation drawn from ``(seed, epoch)``,
    cut into chunks of ``batch_size`` (the last one may be smaller)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    perm = torch.randperm(n_examples, generator=generator).tolist()
    return [perm[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def steps_per_epoch(n_micro_batches: int, grad_accum: int) -> int:
    return math.ceil(n_micro_batches / grad_accum)


def total_steps(cfg: TrainConfig, n_micro_batches: int) -> int:
    """``max_steps`` if set, else ``epochs * ceil(n_micro_batches / grad_accum)``."""
    return cfg.max_steps or cfg.epochs * steps_per_epoch(n_micro_batches, cfg.grad_accum)


class _EpochBatches(Sampler[list[int]]):
    """Batch sampler over one epoch's micro-batches, starting at a given one (for resume)."""

    def __init__(self, n_examples: int, batch_size: int, seed: int, skip_factor: int):
        super().__init__()
        self.n_examples, self.batch_size, self.seed = n_examples, batch_size, seed
        self.skip_factor = skip_factor  # micro-batches of the whole epoch per local micro-batch
        self.drop_last = False
        self.reset(0, 0)

    def reset(self, epoch: int, start: int) -> None:
        batches = epoch_batches(self.n_examples, self.batch_size, self.seed, epoch)
        self.batches = batches[start * self.skip_factor :]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _WithSize:
    """Collate wrapper: ``(number of examples, collate_fn(examples))``."""

    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, examples: list) -> tuple[int, Any]:
        return len(examples), self.collate_fn(examples)


def _step_batches(loader, sampler: _EpochBatches, grad_accum: int, epoch: int, batch_in_epoch: int):
    """Yield ``(epoch, batch_in_epoch after the step, [(n_i, batch_i), ...])`` per optimizer step,
    epoch after epoch."""
    while True:
        sampler.reset(epoch, batch_in_epoch)
        pending = []
        for item in loader:
            pending.append(item)
            batch_in_epoch += 1
            if len(pending) == grad_accum:
                yield epoch, batch_in_epoch, pending
                pending = []
        if pending:
            yield epoch, batch_in_epoch, pending
        epoch, batch_in_epoch = epoch + 1, 0


# ---------------------------------------------------------------------- helpers
def _checked_loss(loss: torch.Tensor, step: int, micro: int, n_micro: int, last_ckpt: Path | None) -> float:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"step_fn must return a scalar loss (mean over the micro-batch), got {shape}")
    value = loss.detach().float().item()
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at step {step} (micro-batch {micro + 1}/{n_micro}); stopped before "
            f"backward. Last good checkpoint: {_ckpt_text(last_ckpt)}"
        )
    return value


def _ckpt_text(path: Path | None) -> str:
    return str(path) if path is not None else "none (no checkpoint saved yet)"


def _as_metric(value: float | torch.Tensor) -> float | torch.Tensor:
    return value.detach().float() if isinstance(value, torch.Tensor) else float(value)


def _reduce_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Mean over processes (``tokens_per_s``: sum). Identity on one process."""
    if accelerator.num_processes == 1:
        return metrics
    keys = list(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float32, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum").tolist()
    n = accelerator.num_processes
    return {k: v if k == "tokens_per_s" else v / n for k, v in zip(keys, values)}


def _warn_if_dropout(model: torch.nn.Module) -> None:
    active = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if active:
        warnings.warn(
            f"{len(active)} dropout module(s) with p > 0 (e.g. {active[0]!r}); alignkit trains with "
            "dropout off "
            "(logprob ratios and resume assume a deterministic forward)",
            stacklevel=3,
        )


def _format_stats(step: int, metrics: dict[str, float]) -> str:
    return f"step {step}: " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items())


# ---------------------------------------------------------------------- the loop
def train_loop(
    cfg: TrainConfig,
    *,
    model: torch.nn.Module,
    train_examples: list,
    collate_fn: Callable[[list], Any],
    step_fn: Callable[[torch.nn.Module, Any], StepOutput],
    run_dir: Path,
    eval_fn: Callable[[torch.nn.Module], dict[str, float] | None] | None = None,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    logger: MetricsLogger | None = None,
    extra_state_fn: Callable[[], dict] | None = None,
    load_extra_state_fn: Callable[[dict], None] | None = None,
    desc: str = "train",
    keep_checkpoints: int | None = 2,
) -> dict:
    """Train ``model`` with AdamW over its trainable parameters; returns a summary dict.

    ``step_fn(model, batch) -> StepOutput`` computes one micro-batch's mean loss;
    ``eval_fn(model) -> dict | None`` runs every ``cfg.eval_every`` steps and at the end (logged
    as ``eval/<key>``). ``extra_state_fn()`` returns JSON-serialisable algorithm state stored in
    each checkpoint and handed back to ``load_extra_state_fn`` on resume. Logs go to
    ``run_dir/metrics.jsonl`` and ``run_dir/tb``; checkpoints to ``run_dir/checkpoints``.

    The model is put in train mode (dropout is expected to be disabled by the caller).
    Raises :class:`NonFiniteLossError` on a NaN/inf loss or gradient norm, without saving.
    """
    run_dir = Path(run_dir)
    n_examples = len(train_examples)
    if n_examples == 0:
        raise ValueError("train_examples is empty: nothing to train on")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")

    accelerator = accelerator or make_accelerator(cfg.mixed_precision, cfg.cpu)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    resume_from = _resume_checkpoint(run_dir, resume)
    own_logger = logger is None
    logger = logger if logger is not None else MetricsLogger(run_dir, enabled=main)

    # Micro-batches per epoch on this process (accelerate gives each process every P-th one).
    n_batches = math.ceil(math.ceil(n_examples / cfg.batch_size) / accelerator.num_processes)
    n_steps = total_steps(cfg, n_batches)
    plan = {
        "n_examples": n_examples,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "total_steps": n_steps,
        "num_processes": accelerator.num_processes,
    }

    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    # Not passed through accelerator.prepare: its wrapper steps once per process per step,
    # while our step count is already per process.
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=n_steps
    )
    sampler = _EpochBatches(n_examples, cfg.batch_size, cfg.seed, skip_factor=accelerator.num_processes)
    loader = DataLoader(
        train_examples,
        batch_sampler=sampler,
        collate_fn=_WithSize(collate_fn),
        # DataLoader draws a base seed per iterator: from this generator, not from the global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    step, epoch, batch_in_epoch, samples_seen, tokens_seen = 0, 0, 0, 0, 0
    if resume_from is not None:
        # Restores the RNG states too: nothing below may draw random numbers before training.
        state = load_checkpoint(resume_from, unwrapped, optimizer, scheduler, scaler=accelerator.scaler)
        _check_same_plan(state["loop_state"], plan, resume_from)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        samples_seen, tokens_seen = state["samples_seen"], state["loop_state"].get("tokens_seen", 0)
        if state["extra_state"] and load_extra_state_fn is None:
            warnings.warn(f"{resume_from} has extra_state but no load_extra_state_fn", stacklevel=2)
        if load_extra_state_fn is not None:
            load_extra_state_fn(state["extra_state"])
    logger.truncate_after(step)  # drop lines an interrupted run wrote after its checkpoint (or a stale run's)

    _warn_if_dropout(unwrapped)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if main:
        tqdm.write(
            f"{desc}: {n_examples} examples, {n_batches} micro-batches of {cfg.batch_size} per epoch"
            f"{' per process' if accelerator.num_processes > 1 else ''}, grad_accum {cfg.grad_accum}, "
            f"{n_steps} optimizer steps, {sum(p.numel() for p in params):,} trainable parameters"
            + (f"; resuming from {resume_from}" if resume_from else "")
        )

    last_ckpt: Path | None = resume_from
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] | None = None
    first_step = step + 1
    window_tokens, window_time, run_tokens, run_time = 0, 0.0, 0, 0.0
    t_start = time.perf_counter()

    def evaluate(at_step: int) -> dict[str, float] | None:
        metrics = eval_fn(model)
        model.train()
        if metrics:
            logger.log(metrics, at_step, prefix="eval/")
            if main:
                tqdm.write(f"{desc} eval " + _format_stats(at_step, metrics))
        return metrics

    def save(at_step: int) -> Path:
        loop_state = {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "samples_seen": samples_seen,
            "tokens_seen": int(tokens_seen),
            **plan,
        }
        path = checkpoints_dir(run_dir) / f"step-{at_step:08d}"
        if main:
            extra = extra_state_fn() if extra_state_fn is not None else None
            path = save_checkpoint(
                run_dir, at_step, unwrapped, optimizer, scheduler, loop_state, extra,
                scaler=accelerator.scaler, keep=keep_checkpoints,
            )  # fmt: skip
        accelerator.wait_for_everyone()
        return path

    batches = _step_batches(loader, sampler, cfg.grad_accum, epoch, batch_in_epoch)
    bar = tqdm(total=n_steps, initial=step, desc=desc, disable=not main, dynamic_ncols=True)
    try:
        if step >= n_steps and main:
            tqdm.write(f"{desc}: already complete at step {step} ({resume_from})")
        while step < n_steps:
            t0 = time.perf_counter()
            _, batch_end, micro = next(batches)
            step += 1
            log_now = step % cfg.log_every == 0 or step in (1, n_steps)
            collect = log_now or step == first_step

            # ---- forward/backward over the micro-batches: grad = d/dtheta sum_i (n_i/N) loss_i
            n_step = sum(n_i for n_i, _ in micro)
            loss, step_tokens = 0.0, 0
            metric_sums: dict[str, float | torch.Tensor] = {}
            for i, (n_i, batch) in enumerate(micro):
                weight = n_i / n_step
                last = i == len(micro) - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    out = step_fn(model, batch)
                    loss_i = _checked_loss(out.loss, step, i, len(micro), last_ckpt)
                    accelerator.backward(out.loss * weight)
                loss += weight * loss_i
                step_tokens += out.num_tokens
                if collect:
                    for k, v in out.metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + weight * _as_metric(v)

            # ---- update
            lr = scheduler.get_last_lr()[0]
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)  # pre-clip norm
            grad_norm = None if grad_norm is None else float(grad_norm)
            if accelerator.scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite grad norm ({grad_norm}) at step {step}; stopped before the update. "
                    f"Last good checkpoint: {_ckpt_text(last_ckpt)}"
                )
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- position after this step
            samples_seen += n_step
            step_tokens = int(step_tokens)
            tokens_seen += step_tokens
            run_tokens += step_tokens
            window_tokens += step_tokens
            epoch, batch_in_epoch = (epoch + 1, 0) if batch_end == n_batches else (epoch, batch_end)
            dt = time.perf_counter() - t0
            window_time += dt
            run_time += dt
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

            # ---- log, evaluate, checkpoint
            if collect:
                stats = {
                    "loss": loss,
                    "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                    "lr": lr,
                    "tokens_per_s": float(window_tokens) / window_time if window_time > 0 else 0.0,
                    "epoch": epoch + batch_in_epoch / n_batches,
                }
                clash = sorted(set(stats) & set(metric_sums))
                if clash:
                    raise ValueError(f"step_fn metrics {clash} clash with the loop's own; rename them")
                stats.update({k: float(v) for k, v in metric_sums.items()})
                stats = _reduce_over_processes(accelerator, stats)
                if step == first_step and main:
                    tqdm.write(f"{desc} " + _format_stats(step, stats))
                if log_now:
                    logger.log(stats, step)
                    last_train = stats
                    window_tokens, window_time = 0, 0.0
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < n_steps:
                last_eval = evaluate(step)
            if cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                last_ckpt = save(step)

        if step >= first_step:  # trained in this call: final evaluation and checkpoint
            if eval_fn is not None:
                last_eval = evaluate(step)
            last_ckpt = save(step)
    finally:
        bar.close()
        batches.close()
        if own_logger:
            logger.close()
        else:
            logger.flush()

    return {
        "global_step": step,
        "train": last_train,
        "eval": last_eval,
        "tokens_per_s": float(run_tokens) / run_time if run_time > 0 else 0.0,
        "wall_time_s": time.perf_counter() - t_start,
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
    }


def _resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(
                f"no checkpoint to resume in {checkpoints_dir(run_dir)} (run without resume to start fresh)"
            )
        return path
    existing = list_checkpoints(run_dir)
    if existing:
        raise FileExistsError(
            f"{checkpoints_dir(run_dir)} already holds checkpoints (latest {existing[-1].name}); "
            "resume to continue that run, or choose a new output_dir"
        )
    return None


def _check_same_plan(saved: dict, plan: dict, path: Path) -> None:
    """Exact resume needs the same data, batching and step count as the interrupted run."""
    changed = [f"{k}: {saved.get(k)} at checkpoint, {v} now" for k, v in plan.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"cannot resume exactly from {path}: the run changed ({'; '.join(changed)}). "
            "Use the same data and train settings, or start a new run"
        )
