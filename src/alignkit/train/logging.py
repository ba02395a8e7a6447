"""Metrics logging: one JSON line per call in ``run_dir/metrics.jsonl`` plus TensorBoard scalars.

    logger = MetricsLogger(run_dir)
    logger.log({"loss": 0.69, "grad_norm": 1.2}, step=1)             # {"step": 1, "loss": 0.69, ...}
    logger.log({"loss": 0.70}, step=1, prefix="eval/")                # {"step": 1, "eval/loss": 0.70}

``metrics.jsonl`` is append-only. On resume from step ``s``, :meth:`MetricsLogger.truncate_after`
drops the lines written after ``s`` by the interrupted run (and TensorBoard purges its events
after ``s``), so the file ends up equal to the one an uninterrupted run writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().float().item())
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise TypeError(f"metric {key!r} must be a number or a scalar tensor, got {type(value).__name__}")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file; a torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class MetricsLogger:
    """Writes ``run_dir/metrics.jsonl`` and TensorBoard events in ``run_dir/tb``.

    ``enabled=False`` makes every method a no-op (use it on non-main processes). Files are
    opened lazily, on the first :meth:`log`.
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb_dir = self.run_dir / "tb"
        self._file = None
        self._tb = None
        self._purge_step: int | None = None

    # ------------------------------------------------------------------ writing
    def log(self, metrics: dict[str, float], step: int, prefix: str = "") -> None:
        """Append ``{"step": step, prefix+k: v, ...}`` to metrics.jsonl and add each value to TensorBoard."""
        if not self.enabled:
            return
        values = {prefix + k: _to_float(prefix + k, v) for k, v in metrics.items()}
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        writer = self._writer()
        for k, v in values.items():
            if math.isfinite(v):
                writer.add_scalar(k, v, global_step=int(step))

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy import: only when logging

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=self._purge_step, flush_secs=10)
        return self._tb

    # ------------------------------------------------------------------ resume
    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl lines with ``"step" > step`` (and torn lines); TensorBoard purges them too.

        Called by the training loop when it resumes from a checkpoint at ``step``.
        """
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= step]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        # A new event file whose purge_step hides the interrupted run's events after `step`.
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = step + 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
