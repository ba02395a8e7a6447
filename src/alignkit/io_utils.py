"""Atomic file writing: a file or directory either appears complete under its final name or not at all.

The lowest layer of alignkit (the standard library only): checkpoints (``train.checkpoint``), saved models
(``models.loading.save_model``) and the files of a pipeline all write through these, so a crash or a full
disk never leaves a half-written file that a later run (``--resume``) would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def atomic_save_dir(final_dir: Path, write_fn: Callable[[Path], None]) -> None:
    """Create ``final_dir`` atomically: ``write_fn(tmp)`` fills ``final_dir.parent/.tmp-<name>-<pid>``,
    its files are fsync-ed, then it is renamed to ``final_dir``.

    An existing ``final_dir`` is replaced only once the new one is complete (old -> ``.old-<name>-<pid>``,
    new -> ``final_dir``, old removed). If ``write_fn`` raises, the temporary directory is removed and
    ``final_dir`` is left as it was.
    """
    final_dir = Path(final_dir)
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final_dir.name}-{os.getpid()}"
    old = parent / f".old-{final_dir.name}-{os.getpid()}"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        write_fn(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    _fsync_dir(parent)
    if old.exists():
        shutil.rmtree(old)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (tmp file in the same directory, fsync, rename); creates the parent dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, **dumps_kwargs: Any) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` written with :func:`atomic_write_text` (serialised before anything is
    written, so an unserialisable object leaves the old file in place)."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs))
