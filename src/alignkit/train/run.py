"""Run directories and seeding: what every algorithm does first.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``tb/``,
``checkpoints/``, ``model/`` (the final weights, loadable with ``from_pretrained``) and
``summary.json``. Resuming checks that the saved config equals the current one, so a run
is never silently continued with different settings.
"""

from __future__ import annotations

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


class RunError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[alignkit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def prepare_run_dir(cfg: BaseModel, output_dir: str | Path, resume: bool, name: str) -> Path:
    """Create the run dir and save the resolved config; on resume, refuse a changed config."""
    run_dir = Path(output_dir)
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
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise RunError(
            f"{run_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
            f"or choose another train.output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(saved, config_to_yaml(cfg))
    log(f"{name}: run dir {run_dir}\n--- resolved config ---\n{config_to_yaml(cfg)}-----------------------")
    return run_dir


def write_summary(run_dir: Path, summary: dict) -> Path:
    """``run_dir/summary.json``, written atomically: written last, it marks a finished run."""
    path = Path(run_dir) / "summary.json"
    atomic_write_json(path, summary, indent=2, default=float)
    return path


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
