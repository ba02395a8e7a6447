"""Atomic checkpoints for exact resume.

Layout of ``run_dir/checkpoints/``::

    step-00000004/
        weights.safetensors   trainable weights only (a peft model: the adapter tensors; else all of them)
        optimizer.pt          optimizer.state_dict()        (torch.save)
        scheduler.pt          lr scheduler state_dict()     (torch.save)
        scaler.pt             fp16 GradScaler state, only when there is one
        rng.pt                python, numpy, torch CPU and CUDA generator states
        state.json            step, epoch, batch_in_epoch, samples_seen, loop_state, extra_state,
                              format_version
    step-00000006/
    latest                    text file: "step-00000006"

A checkpoint directory is written under a temporary name, fsync-ed and renamed, so a
directory named ``step-*`` is always complete; a crash mid-save leaves the previous
checkpoint untouched. Pruned checkpoints are renamed to ``.old-*`` before they are deleted, so
a kill mid-prune leaves no half-deleted ``step-*`` either; the ``.tmp-*``/``.old-*`` leftovers of
a killed process are removed by the next save and when a run (re)starts.

Loading never runs code from a checkpoint: the ``.pt`` files are read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only), and anything else is refused (:class:`CheckpointError`).
"""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alignkit.io_utils import (  # atomic_save_dir: algorithms import it from here
    atomic_save_dir,
    atomic_write_text,
    remove_dir,
    remove_stale_temporaries,
)
from alignkit.models.loading import is_peft

FORMAT_VERSION = 1
WEIGHTS_NAME = "weights.safetensors"
STATE_NAME = "state.json"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint file that alignkit refuses to load (e.g. a pickle that would run code)."""


# ---------------------------------------------------------------------- weights
def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and persistent buffers, by name."""
    persistent = set(model.state_dict().keys())
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n in persistent)
    return tensors


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: for a peft model the trainable (adapter) parameters; else all
    parameters and persistent buffers. Tied weights appear once."""
    if is_peft(model):
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        tensors = _named_tensors(model)
    return {n: t.detach().cpu().contiguous() for n, t in tensors.items()}


def load_trainable_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (from :func:`trainable_state_dict`) into ``model`` in place."""
    targets = _named_tensors(model)
    expected = (
        {n for n, p in model.named_parameters() if p.requires_grad} if is_peft(model) else set(targets)
    )
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights in {source} do not match the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
            "(was the checkpoint written for a different model or LoRA setup?)"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            target = targets[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"checkpoint weight {name!r} in {source} has shape {tuple(value.shape)}, "
                    f"model expects {tuple(target.shape)}"
                )
            target.copy_(value)


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA, if initialised) generator states; loads with ``weights_only=True``."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- checkpoints
def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    return _step_of(path) is not None and (path / STATE_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of ``run_dir``, oldest step first (temporary dirs ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _is_complete(p)), key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``checkpoints/latest`` if complete, else the complete one with the
    highest step; ``None`` if there is none."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if candidate.name and _is_complete(candidate):
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _remove_leftovers(root: Path) -> None:
    """Delete ``.tmp-*``/``.old-*`` entries left by a process that died mid-save (never a live one's)."""
    remove_stale_temporaries(root)


def remove_run_leftovers(run_dir: str | Path) -> list[Path]:
    """The temporaries a killed run left in ``run_dir`` (``.tmp-model-<pid>/``, ``.tmp-summary.json-<pid>``) and in
    its ``checkpoints/`` (``.tmp-step-*``, ``.old-step-*``, ``.tmp-latest-<pid>``), removed unless their process lives."""
    return remove_stale_temporaries(Path(run_dir)) + remove_stale_temporaries(checkpoints_dir(run_dir))


def remove_checkpoints(run_dir: str | Path) -> None:
    """Delete ``run_dir/checkpoints`` (renamed first: a kill midway leaves no half-deleted checkpoint)."""
    remove_dir(checkpoints_dir(run_dir))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop_state: dict,
    extra_state: dict | None = None,
    *,
    scaler: Any = None,
    keep: int | None = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step-{step:08d}`` atomically, point ``checkpoints/latest`` at it,
    and delete all but the newest ``keep`` checkpoints (``None``: keep all).

    ``model`` must be unwrapped (no DDP wrapper). ``loop_state`` and ``extra_state`` must be
    JSON-serialisable; ``loop_state``'s ``epoch``, ``batch_in_epoch`` and ``samples_seen`` are also
    written at the top level of state.json.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step:08d}"
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": loop_state.get("epoch"),
        "batch_in_epoch": loop_state.get("batch_in_epoch"),
        "samples_seen": loop_state.get("samples_seen"),
        "loop_state": loop_state,
        "extra_state": extra_state or {},
    }
    state_text = json.dumps(state, indent=2)  # fail on non-JSON state before writing anything

    def write(tmp: Path) -> None:
        save_file(trainable_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_NAME).write_text(state_text, encoding="utf-8")

    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    atomic_save_dir(final, write)
    atomic_write_text(root / LATEST_NAME, final.name)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                remove_dir(old)  # renamed to .old-* first: a step-* directory is always complete
    return final


def read_checkpoint_state(path: str | Path) -> dict:
    """state.json of a checkpoint directory (with a clear error for a wrong or future format)."""
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {STATE_NAME} is missing")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version {version}; this alignkit reads {FORMAT_VERSION}"
        )
    return state


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    scaler: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Restore trainable weights, optimizer, scheduler (and fp16 scaler), then the RNG states.

    Returns the content of state.json. ``model`` must be unwrapped (no DDP wrapper).
    """
    path = Path(path)
    state = read_checkpoint_state(path)
    try:
        weights = load_file(str(path / WEIGHTS_NAME))
    except SafetensorError as e:  # its message does not name the file
        raise CheckpointError(f"checkpoint weights {path / WEIGHTS_NAME} are corrupt or truncated ({e}); resume from "
                         "another checkpoint, or start afresh") from None
    load_trainable_state_dict(model, weights, str(path))
    optimizer.load_state_dict(load_pt(path / "optimizer.pt"))
    scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(load_pt(path / "scaler.pt"))
    if restore_rng:
        set_rng_state(load_pt(path / "rng.pt"))
    return state


def load_pt(file: Path) -> Any:
    """``torch.load(file, weights_only=True)``: tensors, numbers, strings and containers, never code. AdamW (any
    number of param groups), the LR schedules of ``train.optim`` (LambdaLR over partials), the GradScaler and
    :func:`rng_state` all load this way. Anything else is refused with :class:`CheckpointError`."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {file}: it holds Python objects other than tensors and plain data, which could run "
            f"code when loaded (alignkit never writes such checkpoints; was the file replaced?). Detail: {first}"
        ) from None
