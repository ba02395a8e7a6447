"""Atomic file writing: a file or directory either appears complete under its final name or not at all.

The lowest layer of alignkit (the standard library only): checkpoints (``train.checkpoint``), saved models
(``models.loading.save_model``) and the files of a pipeline all write through these, so a crash or a full
disk never leaves a half-written file that a later run (``--resume``) would trust.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
    except BaseException as e:
        disk_full = _disk_full_error(e, tmp, final_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full is not None:
            raise disk_full from e
        raise
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    _fsync_dir(parent)
    if old.exists():
        shutil.rmtree(old)


# Writers that report a full disk as something else than OSError(ENOSPC): torch.save (a zip stream writer) raises
# RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed" / "[enforce fail at
# inline_container.cc] . unexpected pos ..."), safetensors raises SafetensorError("... No space left on device").
_WRITE_FAILURE = re.compile(r"PytorchStreamWriter failed|unexpected pos|file write failed|No space left|os error 28|"
                            r"StorageFull|Disk quota exceeded|os error 122")
LOW_SPACE_BYTES = 1 << 20
"""A failed write with less free space than this left on the file system is reported as a full disk."""


def _disk_full_error(e: BaseException, tmp: Path, final: Path) -> OSError | None:
    """``OSError(ENOSPC, ..., final)`` for a write that failed because the disk is full, whatever the writer
    raised (see ``_WRITE_FAILURE``); None for any other error (and for an OSError, which already says what it is)."""
    if isinstance(e, OSError) or not isinstance(e, Exception) or not _WRITE_FAILURE.search(str(e)):
        return None
    try:
        free = shutil.disk_usage(tmp).free
    except OSError:
        return None
    if free >= LOW_SPACE_BYTES and not re.search(r"No space left|os error 28|StorageFull", str(e)):
        return None  # a write failure on a disk with room left: not ours to rename
    return OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                   str(final))


_LEFTOVER = re.compile(r"^\.(tmp|old)-.+-(\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the ``.tmp-<name>-<pid>`` / ``.old-<name>-<pid>`` files and directories that the writers here left in
    ``directory`` when their process was killed (never those of a live process, nor this one's). Returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        match = _LEFTOVER.match(path.name)
        if not match:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves it half-deleted under its own name: it is renamed to
    ``.old-<name>-<pid>`` first (which :func:`remove_stale_temporaries` cleans up if the kill comes mid-delete)."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.parent / f".old-{path.name}-{os.getpid()}"
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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


def atomic_save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary file in the same directory, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def atomic_write_json(path: Path, obj: Any, **dumps_kwargs: Any) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` written with :func:`atomic_write_text` (serialised before anything is
    written, so an unserialisable object leaves the old file in place)."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs))
