"""How many CPU threads torch uses: chosen so that alignkit's own processes cannot over-subscribe the cores.

torch's default is one intra-op thread per core *per process*. Two processes on two cores (a 2-process
``accelerate launch``, or a test beside a run) then run four busy threads on two cores, and spin-waiting OpenMP
threads make generation up to ten times slower. The rule, applied once when a command starts:

1. ``OMP_NUM_THREADS`` (or ``ALIGNKIT_NUM_THREADS``) set -> that number, as the user asked;
2. otherwise the cores this process may run on (``sched_getaffinity``: a container's or ``taskset``'s limit)
   divided by the processes of this run on this machine (``LOCAL_WORLD_SIZE``, set by accelerate/torchrun),
   at least 1.

Inter-op threads are set to 1 (alignkit runs no parallel graph branches) and the Hugging Face tokenizers'
own thread pool is turned off unless the user set ``TOKENIZERS_PARALLELISM``. Other programs running beside
alignkit are not counted: on a busy machine set ``OMP_NUM_THREADS`` yourself.

**The allocator** (:func:`configure_allocator`, glibc only). glibc serves every block above its mmap threshold
(128 kB, raised only slowly) with a fresh ``mmap`` and returns it on free, so a CPU decoding loop that makes a
[batch, vocabulary] logits tensor (12 MB at batch 64 with a 49k vocabulary) and its softmax, and grows the KV
cache, pays page faults on every step. Raising the threshold to its 32 MB ceiling and keeping freed memory
(trim threshold 1 GB) lets those blocks be reused: sampling 64 rows x 48 tokens of the embedded model took
13.8-14.8 s instead of 16.9-17.0 s (``benchmarks/README.md``). ``ALIGNKIT_MALLOC=default`` leaves glibc as it is.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(environ: dict[str, str] | None = None, cores: int | None = None) -> tuple[int, str]:
    """(threads, why) by the rule of the module docstring."""
    env = os.environ if environ is None else environ
    for key in ("ALIGNKIT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = env.get(key, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} is not a whole number of threads") from None
            if n < 1:
                raise ValueError(f"{key}={value!r}: the number of threads must be at least 1")
            return n, f"{key}={n}"
    cores = available_cores() if cores is None else cores
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = max(1, cores // max(1, local))
    return n, f"{cores} cores / {local} local process{'es' if local > 1 else ''}"


def configure_threads() -> int:
    """Apply :func:`choose_threads` to torch (once per process); returns the thread count."""
    n, _ = choose_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep what is there
        pass
    return n


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def configure_allocator(environ: dict[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds (module docstring); True when applied. A no-op off glibc, or with
    ``ALIGNKIT_MALLOC=default``."""
    import ctypes
    import platform

    env = os.environ if environ is None else environ
    if env.get("ALIGNKIT_MALLOC", "").strip().lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
