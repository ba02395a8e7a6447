"""The shared training loop (torch + accelerate): every offline algorithm is a ``step_fn``.

    def step_fn(model, batch) -> StepOutput:
        ...  # forward, per-example loss from alignkit.losses, mean over the micro-batch
        return StepOutput(loss=losses.mean(), metrics={"rewards/chosen": ...}, num_tokens=int(mask.sum()))

    summary = train_loop(cfg.train, model=model, train_examples=examples, collate_fn=collate,
                         step_fn=step_fn, run_dir=Path(cfg.train.output_dir), eval_fn=evaluate)

One optimizer step = up to ``grad_accum`` GLOBAL micro-batches of ``P * batch_size`` examples (``P`` processes,
``batch_size`` per process). The data order is a permutation drawn per epoch from ``(seed, epoch)``, cut into
global micro-batches; an epoch's last one may be smaller (nothing is dropped), and an optimizer step never spans
two epochs, so ``steps_per_epoch = ceil(n_global_micro_batches / grad_accum)``. Process ``r`` takes the
contiguous part ``r`` of each global micro-batch (:func:`process_share`); a process whose part of a short last
micro-batch is empty runs a weight-0 pass on one example, so every process makes the same forward/backward calls.

Weighting: process ``r``'s micro-batch ``i`` contributes ``loss_ri * n_ri / N * P`` (``n_ri`` its examples, ``N``
the step's examples over all processes); DDP averages gradients over the ``P`` processes, so the accumulated
gradient is the gradient of the mean loss over the step's ``N`` examples, whatever the split: ``P`` processes of
batch ``b`` train exactly as one process of batch ``P * b`` (up to float rounding). Logged loss and metrics are
example-weighted means over all processes; ``epoch``, ``samples_seen`` and ``tokens_per_s`` count all processes.
A loss that depends on batch statistics (KTO's z0) is computed over each process's own micro-batch.

Checkpoints (``train/checkpoint.py``) hold the trainable weights, optimizer, scheduler, RNG states, the data
position (in global micro-batches) and the algorithm's extra state; the main process writes them, every process
reads them on ``resume=True``, which continues from the latest one and reproduces the uninterrupted run exactly
(with the same number of processes).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, gather_object, parse_flag_from_env, send_to_device, set_seed
from tqdm.auto import tqdm

from alignkit.config import TrainConfig
from alignkit.models.loading import save_model
from alignkit.ops.seeds import derive_seed
from alignkit.train.checkpoint import (
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from alignkit.train.logging import MetricsLogger
from alignkit.train.optim import build_optimizer
from alignkit.train.run import RunError, make_accelerator, no_checkpoint_message, write_summary


@dataclass
class StepOutput:
    """What ``step_fn(model, batch)`` returns for one micro-batch."""

    loss: torch.Tensor
    """Scalar: the mean loss over the micro-batch's examples (the loop weights micro-batches)."""
    metrics: dict[str, float | torch.Tensor | tuple] = field(default_factory=dict)
    """Scalars to log (e.g. ``rewards/chosen``), averaged over the step's micro-batches (all processes) by examples;
    or ``(sum, count)`` pairs for a ratio over the whole step (e.g. ``nll/token``: summed NLL, response tokens),
    which no split of the step into micro-batches or processes changes."""
    num_tokens: int | torch.Tensor = 0
    """Non-pad tokens processed (for tokens/s)."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the step and last good checkpoint."""


# ---------------------------------------------------------------------- processes
def distributed_state(cfg: TrainConfig) -> PartialState:
    """This launch's processes (``accelerate launch``), as the loop's accelerator will see them.

    The first ``PartialState`` of a process fixes its device type: created here with ``cfg.cpu`` (or accelerate's
    ``ACCELERATE_USE_CPU``) so that a call before :func:`train_loop` (e.g. :func:`map_over_processes`) agrees with
    the loop's ``Accelerator``."""
    return PartialState(cpu=cfg.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def is_main_process(cfg: TrainConfig) -> bool:
    """True on the process that writes files (the only one without ``accelerate launch``)."""
    return distributed_state(cfg).is_main_process


def finish_run(cfg: TrainConfig, model, tokenizer, run_dir: Path, result: dict, data_report: dict) -> dict:
    """The end of an offline run: ``<run_dir>/model`` (when ``train.save_model``; LoRA merged), the data report in
    the result, and ``summary.json`` (written last: it marks a finished run). Files come from the main process."""
    if cfg.save_model:
        result["model_dir"] = str(Path(run_dir) / "model")
        if is_main_process(cfg):
            save_model(model, tokenizer, Path(run_dir) / "model")
    result["data"] = data_report
    if is_main_process(cfg):
        write_summary(run_dir, result)
    return result


def map_over_processes(cfg: TrainConfig, fn: Callable[[list], list], items: list) -> list:
    """``fn(items)`` computed as ``P`` contiguous shards, one per process, gathered in order on every process.

    For per-example work before training (reference log-probs): ``P`` processes do it ``P`` times faster and all
    of them end up with every result. ``fn`` must return one result per item; with one process it is ``fn(items)``.
    """
    state = distributed_state(cfg)
    if state.num_processes == 1:
        return fn(items)
    mine = process_share(list(range(len(items))), state.num_processes, state.process_index)
    results = fn([items[i] for i in mine]) if mine else []
    if len(results) != len(mine):
        raise ValueError(f"map_over_processes: fn returned {len(results)} results for {len(mine)} items")
    gathered = gather_object([results])  # P lists, in process order = item order
    return [r for part in gathered for r in part]


def check_launch(accelerator: Accelerator) -> None:
    """Refuse launches this loop would run wrongly, with the reason.

    - N processes that accelerate sees as 1 (``torchrun`` on a machine without GPUs, CPU not asked for) would train
      N unsynchronised copies writing the same files.
    - FSDP / DeepSpeed shard the weights or the optimizer state: checkpoints here are written by the main process
      from its own copy, and DeepSpeed steps the optimizer inside ``backward`` (per micro-batch), so exact resume,
      the saved model and ``grad_accum`` would all be wrong. DDP (configs/accelerate/multi_gpu.yaml) is supported.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    kind = accelerator.distributed_type
    if world > accelerator.num_processes:
        raise ValueError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate runs {accelerator.num_processes} "
            f"({kind}): every process would train alone on all the data. On a machine "
            "without GPUs set train.cpu=true (or ACCELERATE_USE_CPU=true) so the processes join over gloo"
        )
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(
            f"alignkit's training loops do not support {kind} yet (sharded weights/optimizer state: their checkpoints "
            "and saved model would be one process's shard, and DeepSpeed steps inside backward). Launch with "
            "data parallelism instead: accelerate launch --config_file configs/accelerate/multi_gpu.yaml (docs/gpus.md)"
        )
    for engine in ("FSDP", "DEEPSPEED"):
        if parse_flag_from_env(f"ACCELERATE_USE_{engine}") and kind == DistributedType.MULTI_CPU:
            warnings.warn(f"{engine} was requested, but accelerate runs CPU processes as plain DDP ({kind})",
                          stacklevel=3)


# ---------------------------------------------------------------------- data order
def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: a permutation drawn from ``(seed, epoch)``,
    cut into chunks of ``batch_size`` (the last one may be smaller). The loop cuts it into global
    micro-batches of ``num_processes * batch_size``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    perm = torch.randperm(n_examples, generator=generator).tolist()
    return [perm[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def process_share(global_batch: list[int], num_processes: int, rank: int) -> list[int]:
    """Process ``rank``'s contiguous part of a global micro-batch: ``P`` parts as equal as can be, the first
    ``len % P`` one larger (a full global micro-batch of ``P * b`` gives every process ``b``; parts may be empty)."""
    q, extra = divmod(len(global_batch), num_processes)
    start = rank * q + min(rank, extra)
    return global_batch[start : start + q + (rank < extra)]


def steps_per_epoch(n_micro_batches: int, grad_accum: int) -> int:
    return math.ceil(n_micro_batches / grad_accum)


def total_steps(cfg: TrainConfig, n_micro_batches: int) -> int:
    """``max_steps`` if set, else ``epochs * ceil(n_micro_batches / grad_accum)`` (global micro-batches)."""
    return cfg.max_steps or cfg.epochs * steps_per_epoch(n_micro_batches, cfg.grad_accum)


def _step_batches(n_examples: int, global_batch: int, grad_accum: int, seed: int, epoch: int, batch_in_epoch: int):
    """Yield ``(epoch, batch_in_epoch after the step, [global micro-batch, ...])`` per optimizer step, epoch
    after epoch, starting at global micro-batch ``batch_in_epoch`` of ``epoch`` (resume)."""
    while True:
        batches = epoch_batches(n_examples, global_batch, seed, epoch)
        for start in range(batch_in_epoch, len(batches), grad_accum):
            micro = batches[start : start + grad_accum]
            yield epoch, start + len(micro), micro
        epoch, batch_in_epoch = epoch + 1, 0


# ---------------------------------------------------------------------- helpers
def _checked_loss(loss: torch.Tensor, step: int, micro: int, n_micro: int, last_ckpt: Path | None,
                  raise_now: bool = True) -> float:
    """The loss as a float; a NaN/inf one raises at once when ``raise_now`` (one process). With several
    processes every one must reach the step's all-reduce first, so the loop raises there, on all of them."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"step_fn must return a scalar loss (mean over the micro-batch), got {shape}")
    value = loss.detach().float().item()
    if raise_now and not math.isfinite(value):
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at step {step} (micro-batch {micro + 1}/{n_micro}); stopped before "
            f"backward. Last good checkpoint: {_ckpt_text(last_ckpt)}"
        )
    return value


def _ckpt_text(path: Path | None) -> str:
    return str(path) if path is not None else "none (no checkpoint saved yet)"


def _num(value: float | torch.Tensor) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _global_stats(accelerator: Accelerator, local: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``{name: (sum of n * value, n)}`` of this process -> ``{name: example-weighted mean over all processes}``.

    A name missing on some process (or micro-batch) is averaged over the examples that have it."""
    parts = [local] if accelerator.num_processes == 1 else gather_object([local])
    totals: dict[str, list[float]] = {}
    for part in parts:
        for k, (num, den) in part.items():
            t = totals.setdefault(k, [0.0, 0.0])
            t[0], t[1] = t[0] + num, t[1] + den
    return {k: num / den if den else float("nan") for k, (num, den) in totals.items()}


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
    keep_checkpoints: int | None = None,
) -> dict:
    """Train ``model``'s trainable parameters with :func:`alignkit.train.optim.build_optimizer` (AdamW, the
    ``train.scheduler`` schedule with ``train.warmup_steps`` of warm-up); returns a summary dict.

    ``step_fn(model, batch) -> StepOutput`` computes one micro-batch's mean loss; every process calls it equally
    often (forwards through a DDP module are collective). ``eval_fn(model) -> dict | None`` runs on every process
    every ``cfg.eval_every`` steps and at the end (the main process logs it as ``eval/<key>``). ``extra_state_fn()`` returns JSON-serialisable algorithm state stored in
    each checkpoint and handed back to ``load_extra_state_fn`` on resume. Logs go to
    ``run_dir/metrics.jsonl`` and ``run_dir/tb``; checkpoints to ``run_dir/checkpoints``: every ``cfg.save_every``
    steps, when ``cfg.save_every_minutes`` have passed since the last one, and at the end; the newest
    ``keep_checkpoints`` (default ``cfg.keep_checkpoints``, at least 1) are kept.

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
    check_launch(accelerator)
    main, P, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    set_seed(cfg.seed)
    resume_from = _resume_checkpoint(run_dir, resume)
    own_logger = logger is None
    logger = logger if logger is not None else MetricsLogger(run_dir, enabled=main)

    global_batch = P * cfg.batch_size  # examples per global micro-batch, over all processes
    n_batches = math.ceil(n_examples / global_batch)  # global micro-batches per epoch
    n_steps = total_steps(cfg, n_batches)
    plan = {
        "n_examples": n_examples,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "total_steps": n_steps,
        "num_processes": P,
    }

    # The scheduler is not passed through accelerator.prepare: its wrapper steps once per process per step.
    # Nor is the data: each process indexes its share of the global micro-batches itself (see the module doc).
    optimizer, scheduler = build_optimizer(trainable, cfg, n_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
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
        per = f"{P} processes x {cfg.batch_size}" if P > 1 else f"{cfg.batch_size}"
        tqdm.write(
            f"{desc}: {n_examples} examples, {n_batches} micro-batches of {per} per epoch, grad_accum "
            f"{cfg.grad_accum}, {n_steps} optimizer steps, {sum(p.numel() for p in params):,} trainable parameters"
            + (f"; resuming from {resume_from}" if resume_from else "")
        )

    last_ckpt: Path | None = resume_from
    keep = max(keep_checkpoints if keep_checkpoints is not None else cfg.keep_checkpoints, 1)
    last_save_time = time.monotonic()
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] | None = None
    first_step = step + 1
    window_tokens, window_time, run_tokens, run_time = 0, 0.0, 0, 0.0
    t_start = time.perf_counter()

    def evaluate(at_step: int) -> dict[str, float] | None:
        metrics = eval_fn(model)  # every process evaluates (forwards through a DDP/FSDP module are collective)
        model.train()
        if metrics:
            logger.log(metrics, at_step, prefix="eval/")
            if main:
                tqdm.write(f"{desc} eval " + _format_stats(at_step, metrics))
        return metrics

    def save(at_step: int) -> Path:
        nonlocal last_save_time
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
                scaler=accelerator.scaler, keep=keep,
            )  # fmt: skip
        accelerator.wait_for_everyone()
        last_save_time = time.monotonic()
        return path

    def time_to_save() -> bool:
        """``cfg.save_every_minutes`` since the last checkpoint, as the main process's clock says (every process
        must agree: a checkpoint waits for all of them)."""
        due = bool(cfg.save_every_minutes) and time.monotonic() - last_save_time >= 60 * cfg.save_every_minutes
        if P > 1:
            due = bool(accelerator.reduce(torch.tensor([float(due and main)], device=accelerator.device), "sum").item())
        return due

    batches = _step_batches(n_examples, global_batch, cfg.grad_accum, cfg.seed, epoch, batch_in_epoch)
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

            # ---- forward/backward over this process's micro-batches:
            #      grad = d/dtheta sum_i (n_ri / N) * P * loss_ri, averaged over processes by DDP
            n_step = sum(len(g) for g in micro)  # N: the step's examples over all processes
            loss_sum, step_tokens, bad_loss = 0.0, 0, None  # loss_sum: sum_i n_ri * loss_ri
            metric_sums: dict[str, tuple[float, float]] = {}
            for i, global_ids in enumerate(micro):
                ids = process_share(global_ids, P, rank)
                n_i = len(ids)
                batch = collate_fn([train_examples[j] for j in (ids or global_ids[:1])])  # empty share: weight 0
                batch = send_to_device(batch, accelerator.device)
                last = i == len(micro) - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    out = step_fn(model, batch)
                    loss_i = _checked_loss(out.loss, step, i, len(micro), last_ckpt, raise_now=P == 1)
                    accelerator.backward(out.loss * (n_i / n_step * P))
                if n_i == 0:
                    continue
                if not math.isfinite(loss_i):
                    bad_loss = bad_loss or (loss_i, i)
                loss_sum += n_i * loss_i
                step_tokens += int(out.num_tokens)
                if collect:
                    for k, v in out.metrics.items():
                        num, den = metric_sums.get(k, (0.0, 0))
                        add = (_num(v[0]), _num(v[1])) if isinstance(v, tuple) else (n_i * _num(v), n_i)
                        metric_sums[k] = (num + add[0], den + add[1])

            if P > 1:  # one small all-reduce per step: global loss and tokens, and whether any loss was NaN/inf
                totals = torch.tensor([loss_sum, step_tokens, bad_loss is not None], dtype=torch.float64)
                loss_sum, step_tokens, n_bad = accelerator.reduce(totals.to(accelerator.device), "sum").tolist()
                step_tokens = int(step_tokens)
                if n_bad:
                    where = f"here: {bad_loss[0]} in micro-batch {bad_loss[1] + 1}/{len(micro)}" if bad_loss else ""
                    raise NonFiniteLossError(
                        f"non-finite loss on {int(n_bad)} of {P} processes ({where or 'not on this one'}) at step "
                        f"{step}; stopped before the update. Last good checkpoint: {_ckpt_text(last_ckpt)}"
                    )
            loss = loss_sum / n_step

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

            # ---- position after this step (global: every process counts all processes' examples)
            samples_seen += n_step
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
                stats.update(_global_stats(accelerator, metric_sums))
                if step == first_step and main:
                    tqdm.write(f"{desc} " + _format_stats(step, stats))
                if log_now:
                    logger.log(stats, step)
                    last_train = stats
                    window_tokens, window_time = 0, 0.0
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < n_steps:
                last_eval = evaluate(step)
            if step < n_steps and ((cfg.save_every and step % cfg.save_every == 0) or time_to_save()):
                last_ckpt = save(step)

        if step >= first_step:  # trained in this call: final evaluation and checkpoint
            if eval_fn is not None:
                last_eval = evaluate(step)
            if keep_checkpoints is not None or cfg.keep_checkpoints > 0:  # 0: the run keeps only its final model,
                last_ckpt = save(step)  # so the final checkpoint (weights + optimizer state: 3x the model) is skipped
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
            raise RunError(no_checkpoint_message(run_dir))
        return path
    existing = list_checkpoints(run_dir)
    if existing:
        raise RunError(
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
