"""Run directories and seeding: what every algorithm does first.

A run directory holds ``config.yaml`` (the resolved config), ``log.txt`` (every ``log()`` line of the run, the
resolved config first), ``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``model/`` (the final weights, loadable with
``from_pretrained``) and ``summary.json``. Resuming checks that the saved config equals the current one, so a run
is never silently continued with different settings. Only the main process (``RANK`` 0) writes or prints.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel

from alignkit.config import config_to_yaml
from alignkit.io_utils import atomic_write_json, atomic_write_text
from alignkit.train.checkpoint import (
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    remove_checkpoints,
    remove_run_leftovers,
)

LOG_NAME = "log.txt"
_log_file: Path | None = None  # the log.txt of the run this process prepared last (main process only)


class RunError(RuntimeError):
    pass


def log(msg: str) -> None:
    """One line on stderr, also appended to the current run's ``log.txt``."""
    line = f"[alignkit {time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    _to_log_file(line)


def _to_log_file(text: str) -> None:
    if _log_file is None:
        return
    try:
        with open(_log_file, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError:
        pass  # the log file is a convenience; never fail a run over it


def is_main_launch_process() -> bool:
    """Whether this process writes the run dir: the only one, or rank 0 under ``accelerate launch``/``torchrun``
    (read from the environment, so it can be asked before any accelerate state exists)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: saved {a!r}, now {b!r}"]


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def changed_from_defaults(cfg: BaseModel) -> dict:
    """``{dotted key: value}`` of the settings that differ from the config class's defaults."""
    try:
        default = _flat(type(cfg)().model_dump(mode="json"))
    except Exception:  # a config class without defaults for every key: show nothing rather than fail
        return {}
    return {k: v for k, v in _flat(cfg.model_dump(mode="json")).items() if default.get(k, object()) != v}


def no_checkpoint_message(run_dir: Path) -> str:
    """The one message of every command for ``--resume`` on a run without a checkpoint."""
    return (f"--resume: no checkpoint in {checkpoints_dir(run_dir)} to resume from (the run stopped before its first "
            "checkpoint: train.save_every / train.save_every_minutes set how often one is written); "
            "run without --resume to start fresh (the same command, which overwrites config.yaml there)")


def _output_dir_key(cfg: BaseModel) -> str:
    return "train.output_dir" if hasattr(cfg, "train") else "output_dir"


def check_output_dir(run_dir: Path, key: str = "output_dir") -> None:
    """Refuse an output directory that cannot be one, naming it: a file, a path under a file, or a place this
    process cannot write. Creates ``run_dir`` (nothing else) when it passes."""
    if str(run_dir).strip() == "":
        raise RunError(f"{key} is empty: give a directory for the run")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{key} {run_dir} is a file, not a directory; choose another {key}")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"{key} {run_dir} lies under {parent}, which is a file, not a directory")
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".tmp-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"{key} {run_dir} cannot be written: {e.strerror or e}; choose another {key}") from None


def prepare_run_dir(cfg: BaseModel, output_dir: str | Path, resume: bool, name: str) -> Path:
    """Check the run dir, create it and save the resolved config (``config.yaml``, and first in ``log.txt``);
    on resume, refuse a changed config or a run with nothing to resume. Removes the temporaries a killed run left.
    The terminal shows a short header (command, run dir, model, data, the settings changed from the defaults);
    ``--print-config`` prints the whole config."""
    global _log_file
    run_dir = Path(output_dir)
    key = _output_dir_key(cfg)
    saved = run_dir / "config.yaml"
    current = cfg.model_dump(mode="json")
    if resume:
        if not saved.is_file():
            raise RunError(f"--resume: {run_dir} has no config.yaml; nothing to resume")
        diffs = _diff(yaml.safe_load(saved.read_text(encoding="utf-8")), current)
        if diffs:
            raise RunError(
                "--resume with a different config would not reproduce the run; differences:\n  " + "\n  ".join(diffs)
            )
        if hasattr(cfg, "train") and latest_checkpoint(run_dir) is None:
            raise RunError(no_checkpoint_message(run_dir))
    elif list_checkpoints(run_dir) or (checkpoints_dir(run_dir).is_dir() and (checkpoints_dir(run_dir) / "latest").is_file()):
        raise RunError(
            f"{run_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
            f"or choose another {key}"
        )
    if not is_main_launch_process():
        return run_dir
    check_output_dir(run_dir, key)
    remove_run_leftovers(run_dir)
    text = config_to_yaml(cfg)
    if not resume:
        atomic_write_text(saved, text)
        (run_dir / LOG_NAME).unlink(missing_ok=True)
    _log_file = run_dir / LOG_NAME
    _to_log_file(f"[alignkit {time.strftime('%Y-%m-%d %H:%M:%S')}] {name}{' --resume' if resume else ''}: "
                 f"run dir {run_dir}\n--- resolved config ---\n{text}-----------------------")
    model = getattr(getattr(cfg, "model", None), "name_or_path", None) or getattr(cfg, "policy", None)
    data = getattr(getattr(cfg, "data", None), "train", None)
    changed = {k: v for k, v in changed_from_defaults(cfg).items() if k not in ("model.name_or_path", "data.train")}
    head = f"{name}: run dir {run_dir}" + (f", model {model}" if model else "") + (f", data {data}" if data else "")
    log(head + "\n  settings changed from the defaults: "
        + (", ".join(f"{k}={v}" for k, v in changed.items()) or "none")
        + f"\n  full config: {saved} (or --print-config); log: {run_dir / LOG_NAME}")
    return run_dir


def write_summary(run_dir: Path, summary: dict) -> Path:
    """``run_dir/summary.json``, written atomically: written last, it marks a finished run. A run whose config says
    ``train.keep_checkpoints: 0`` then drops its checkpoints (a finished run needs none; the model is saved)."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    drop = _keep_checkpoints(run_dir) == 0 and checkpoints_dir(run_dir).is_dir()
    if drop:
        summary = {**summary, "checkpoint": None}
    atomic_write_json(path, summary, indent=2, default=float)
    if drop:
        remove_checkpoints(run_dir)
    return path


def _keep_checkpoints(run_dir: Path) -> int | None:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return int(saved["train"]["keep_checkpoints"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples: list, collate_fn, metrics_fn, batch_size: int) -> dict[str, float]:
    """Example-weighted mean of ``metrics_fn(model, batch) -> (n_examples, {name: value})`` over ``examples``."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    device = model_device(model)
    for chunk in batches(examples, batch_size):
        n, metrics = metrics_fn(model, to_device(collate_fn(chunk), device))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    model.train(was_training)
    return {k: v / max(count, 1) for k, v in totals.items()}


def autocast_dtype(train_cfg) -> torch.dtype | None:
    """``train.mixed_precision`` as a torch dtype (None for "no")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(train_cfg.mixed_precision))


def autocast_for(train_cfg, device: torch.device):
    """The autocast the training loop runs under (accelerate's ``mixed_precision``), for passes made outside it —
    e.g. precomputed reference log-probs, which must match the policy's first forward exactly."""
    dtype = autocast_dtype(train_cfg)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def with_autocast(context_factory, train_cfg, device: torch.device):
    """``context_factory()`` entered together with :func:`autocast_for`."""
    import contextlib

    def both():
        stack = contextlib.ExitStack()
        stack.enter_context(context_factory())
        stack.enter_context(autocast_for(train_cfg, device))
        return stack

    return both


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX (oneDNN).
    Elsewhere torch emulates bf16 on the CPU, ~20x slower than fp32 (measured on an AVX2-only EPYC)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_mixed_precision(value: str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``no``; other values unchanged."""
    return ("bf16" if native_bf16() else "no") if value == "auto" else value


def make_accelerator(mixed_precision: str = "no", cpu: bool = False):
    """A fresh ``accelerate.Accelerator`` for this run.

    accelerate keeps one process-wide ``AcceleratorState``; a second run in the same process (the
    quickstart chains several, with different mixed precision) must reset it first. The distributed
    ``PartialState`` is kept, so multi-process launches are unaffected.

    Several processes (``accelerate launch`` / ``torchrun``, WORLD_SIZE > 1) on a machine without CUDA run as
    accelerate's MULTI_CPU (gloo): accelerate only picks that when asked for the CPU, so we ask.
    """
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        cpu = True
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=cpu)
