"""Run the ``alignkit`` CLI under ``accelerate launch`` with several CPU processes (gloo), for tests.

    from multiproc import launch
    proc = launch(["sft", "model.name_or_path=...", "train.output_dir=..."], num_processes=2, cwd=tmp_path)
    proc.stdout, proc.stderr  # what every process printed; a non-zero exit raises with both shown

How accelerate starts N CPU processes: ``accelerate launch --cpu`` uses its "simple" launcher, which starts ONE
process (N processes on CPU would need mpirun), so N > 1 is launched as ``--multi_gpu`` (torchrun) with
``ACCELERATE_USE_CPU=true`` in the environment; every process then joins a ``MULTI_CPU`` group over gloo. Without
that variable each torchrun process on a GPU-less machine would see a world of one (alignkit refuses to train then).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args: list[str], num_processes: int, module: str = "alignkit.cli",
                   config_file: str | Path | None = None) -> list[str]:
    """``python -m accelerate.commands.launch ... -m <module> <args>`` for ``num_processes`` CPU processes
    (settings from ``config_file``, an accelerate config such as configs/accelerate/multi_gpu.yaml, if given)."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if config_file is not None:
        how = ["--config_file", str(config_file), "--main_process_port", str(free_port())]
    elif num_processes > 1:
        how = ["--multi_gpu", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no"]  # fmt: skip
    else:
        how = ["--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *how,
        "--num_processes", str(num_processes), "--num_machines", "1", "--num_cpu_threads_per_process", "1",
        "-m", module, *map(str, args),
    ]  # fmt: skip


def launch(
    args: list[str],
    num_processes: int = 2,
    cwd: str | Path | None = None,
    timeout: float = 300,
    *,
    module: str = "alignkit.cli",
    config_file: str | Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``alignkit <args>`` (``module``'s main) in ``num_processes`` CPU processes under ``accelerate launch``.

    ``config_file``: an accelerate config (e.g. configs/accelerate/multi_gpu.yaml) instead of the flags for CPU
    processes; ``num_processes`` still overrides its count. The children get ``OMP_NUM_THREADS=1`` (tests share few cores), ``ACCELERATE_USE_CPU=true`` and ``env``'s
    extra variables. ``check``: a non-zero exit or a timeout raises ``AssertionError`` showing the command and the
    tail of stdout/stderr. Returns the completed process (text stdout/stderr).
    """
    cmd = launch_command(args, num_processes, module, config_file)
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                 "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{_tails(e.stdout, e.stderr)}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{_tails(proc.stdout, proc.stderr)}")
    return proc


def _tails(stdout, stderr, n: int = 6000) -> str:
    def text(x) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

    return f"--- stdout (tail) ---\n{text(stdout)[-n:]}\n--- stderr (tail) ---\n{text(stderr)[-n:]}"
