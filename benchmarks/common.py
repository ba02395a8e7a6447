"""Shared helpers of the alignkit-vs-TRL benchmarks (``bench_offline.py``, ``bench_grpo.py``).

- worker subprocesses: every (framework, job) pair runs in its own Python process, so each one's
  peak resident memory (``ru_maxrss``) is its own and no allocator state leaks between them;
- the machine's fp32 matmul peak and the model FLOP count used for the achieved-FLOP/s estimate;
- the arithmetic reward both GRPO implementations call;
- markdown tables and the results JSON.

Nothing here imports TRL: only the TRL workers do.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
EMBEDDED_MODEL = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------- process
def peak_rss_mb() -> float:
    """Peak resident set size of THIS process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> list[float]:
    """1/5/15-minute load averages: the CPU is shared, so every timing is stored with the load it ran under."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "alignkit"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing version is reported as such
            versions[name] = "n/a"
    return {
        "alignkit_git": git_revision(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions,
        "load_average": load_average(),
    }


def set_threads(n: int | None, allocator: bool = False) -> int:
    """Use ``n`` intra-op threads in this process (None or 0: torch's default); returns the count in use.
    ``allocator``: also tune glibc's allocator as every alignkit command does (``ops.threads.configure_allocator``):
    the alignkit workers, not TRL's."""
    import torch

    if allocator:
        from alignkit.ops.threads import configure_allocator

        configure_allocator()
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def git_revision() -> str:
    """``HEAD`` of the repo, with ``+dirty`` when ``src/`` has uncommitted changes (what alignkit code ran)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_worker(argv: list[str], out_json: Path, log_path: Path, timeout_s: float,
               threads: int | None = None) -> dict[str, Any]:
    """Run ``python <argv...>`` as a subprocess that writes its result to ``out_json``.

    stdout/stderr go to ``log_path``; ``threads`` sets ``OMP_NUM_THREADS`` (the worker also calls
    :func:`set_threads`). Returns the worker's JSON plus ``process_wall_s`` (spawn to exit, imports
    included) and ``returncode``; on failure ``error`` holds the tail of the log.
    """
    t0 = time.perf_counter()
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout_s, check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -9
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {}
    if out_json.is_file():
        result = json.loads(out_json.read_text(encoding="utf-8"))
    result.update(process_wall_s=wall, returncode=code, log=str(log_path))
    if code != 0 or "error" in result:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        result.setdefault("error", "\n".join(tail) if code != -9 else f"timed out after {timeout_s:.0f} s")
    return result


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")


def results_path(kind: str) -> Path:
    """``benchmarks/results/<YYYY-MM-DD>-<kind>.json``, or ``...-<kind>-2.json``, ``-3``, ... so that an earlier
    result of the same day (one the docs may cite) is never overwritten."""
    stem = f"{time.strftime('%Y-%m-%d')}-{kind}"
    path, n = RESULTS_DIR / f"{stem}.json", 2
    while path.exists():
        path, n = RESULTS_DIR / f"{stem}-{n}.json", n + 1
    return path


# ---------------------------------------------------------------------------------------------- FLOPs
def matmul_peak_gflops(n: int = 2048, seconds: float = 3.0, dtype: str = "float32") -> dict[str, float]:
    """Achievable matmul throughput of this machine in ``dtype`` with torch's current thread count.

    One ``[n, n] @ [n, n]`` costs ``2 n^3`` FLOPs; repeated for ``seconds`` after one warm-up call (at least
    3 calls). Returns ``peak`` (best single matmul) and ``median`` GFLOP/s.
    """
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    torch.mm(a, b)  # warm-up (thread pool, allocator)
    flops = 2.0 * n**3
    rates: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "dtype": dtype, "calls": len(rates), "peak_gflops": max(rates),
            "median_gflops": statistics.median(rates), "threads": torch.get_num_threads()}


def copy_bandwidth_gbs(mib: int = 256, seconds: float = 2.0) -> dict[str, float]:
    """Memory bandwidth of a large fp32 tensor copy (``dst.copy_(src)``, ``mib`` MiB each, far above any cache).

    Each copy reads ``mib`` MiB and writes ``mib`` MiB: GB/s here COUNTS BOTH (2 x bytes / s), the traffic a
    decode step's weight reads are compared with. Repeated for ``seconds`` after one warm-up; ``peak`` is the
    best copy, ``median`` the median.
    """
    import torch

    n = mib * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)  # warm-up: pages touched
    nbytes = 2.0 * n * 4  # read + write
    rates: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        dst.copy_(src)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return {"mib": mib, "bytes_counted": "read + write", "calls": len(rates), "peak_gbs": max(rates),
            "median_gbs": statistics.median(rates), "threads": torch.get_num_threads()}


def matmul_params(config: Any, lm_head: bool, num_labels: int = 1) -> int:
    """Weights that take part in a matmul per token, for the ``6 N D`` training-FLOPs estimate
    (Kaplan et al. 2020, eq. 2.1: C ≈ 6 N D, forward 2 N D + backward 4 N D).

    Per decoder layer (Llama):  N_layer = d (h d_h) + 2 d (h_kv d_h) + (h d_h) d + 3 d d_ff
    Whole model:                N = L N_layer + (V d if lm_head else d num_labels)

    The input embedding is a lookup (no FLOPs) and is not counted; with tied embeddings the LM head
    reuses that matrix and IS counted. Attention-score FLOPs (4 T d per layer and token) and norms
    are left out: at T <= 128 they add about 5 %.
    """
    d = config.hidden_size
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    d_h = getattr(config, "head_dim", None) or d // h
    per_layer = d * h * d_h + 2 * d * kv * d_h + h * d_h * d + 3 * d * config.intermediate_size
    head = config.vocab_size * d if lm_head else d * num_labels
    return config.num_hidden_layers * per_layer + head


def lora_params(config: Any, r: int, target_modules: list[str], layers: list[int] | None = None) -> int:
    """Trainable LoRA weights: each adapted linear ``[d_in -> d_out]`` gains ``A [r, d_in]`` and ``B [d_out, r]``,
    i.e. ``r (d_in + d_out)``, in every adapted layer (all layers when ``layers`` is None)."""
    d = config.hidden_size
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    d_h = getattr(config, "head_dim", None) or d // h
    shapes = {"q_proj": (d, h * d_h), "k_proj": (d, kv * d_h), "v_proj": (d, kv * d_h), "o_proj": (h * d_h, d),
              "gate_proj": (d, config.intermediate_size), "up_proj": (d, config.intermediate_size),
              "down_proj": (config.intermediate_size, d)}
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)
    return per_layer * (config.num_hidden_layers if layers is None else len(layers))


def training_flops_per_token(n_params: int, n_lora: int = 0) -> float:
    """Matmul FLOPs per trained token.

    Full fine-tuning: 6 N (forward 2 N, backward 4 N: input gradients 2 N + weight gradients 2 N).
    LoRA on every layer: the frozen weights do the forward (2 N) and pass input gradients down to the first
    layer (2 N) but need no weight gradient, so 4 N; the adapters (N_lora) cost the full 6 N_lora. The
    LoRA side products ``x A`` are counted in N_lora; norms and attention scores are not (see matmul_params).
    E.g. N = 100, N_lora = 10: full 600; LoRA 4*100 + 6*10 = 460.
    """
    return 6.0 * n_params if n_lora == 0 else 4.0 * n_params + 6.0 * n_lora


def training_flops(n_params: int, tokens: int) -> float:
    """C = 6 N D (forward + backward) for D tokens through N matmul weights."""
    return 6.0 * n_params * tokens


def forward_flops(n_params: int, tokens: int) -> float:
    """C = 2 N D: a no-grad forward (reference / old log-probs) or one decoding step per token."""
    return 2.0 * n_params * tokens


def embedded_model_dir() -> str:
    """The converted SmolLM2-135M-Instruct folder (a plain ``from_pretrained`` directory)."""
    from alignkit.models.embedded import resolve_model_path

    return resolve_model_path(EMBEDDED_MODEL)


def alignkit_model_config(spec: dict) -> Any:
    """alignkit's ``ModelConfig`` for a benchmark spec: the embedded model cut to ``spec["layers"]`` (None: all
    30), fp32, and LoRA when ``spec["lora"]`` is set (``{"r", "alpha", "target_modules"}``, dropout 0)."""
    from alignkit import config as AC

    lora = spec.get("lora")
    lora_cfg = AC.LoraConfig(enabled=True, r=lora["r"], alpha=lora["alpha"], dropout=0.0,
                             target_modules=list(lora["target_modules"])) if lora else AC.LoraConfig()
    return AC.ModelConfig(name_or_path=EMBEDDED_MODEL, num_hidden_layers=spec.get("layers"), dtype="float32",
                          lora=lora_cfg)


def peft_lora_config(spec: dict, task_type: str = "CAUSAL_LM") -> Any:
    """The peft ``LoraConfig`` alignkit builds from :func:`alignkit_model_config` (for TRL's ``peft_config``)."""
    from peft import LoraConfig

    lora = spec["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                      target_modules=list(lora["target_modules"]), task_type=task_type)


def truncated_config(layers: int | None) -> Any:
    from transformers import AutoConfig

    kwargs = {} if layers is None else {"num_hidden_layers": layers}
    return AutoConfig.from_pretrained(embedded_model_dir(), **kwargs)


# ---------------------------------------------------------------------------------------------- reward
def arithmetic_correct(completion: str, answer: str) -> float:
    """1.0 if the last number written in ``completion`` equals ``answer`` exactly (as rationals), else 0.0.

    A plain function shared by both GRPO runs, so both optimise the same reward.
    """
    import re

    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    if not numbers:
        return 0.0
    try:
        return float(Fraction(numbers[-1]) == Fraction(str(answer).strip()))
    except (ValueError, ZeroDivisionError):
        return 0.0


def arithmetic_reward(prompts: list, completions: list, answer: list[str], **kwargs) -> list[float]:
    """The reward both GRPO runs call, with the calling convention both accept: TRL's
    ``(prompts, completions, **dataset_columns)`` and alignkit's ``callable`` reward component (each
    prompt-record field as a list keyword). ``completions`` are strings (alignkit) or, for
    conversational prompts in TRL, ``[{"role": "assistant", "content": ...}]`` lists."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [arithmetic_correct(t, a) for t, a in zip(texts, answer)]


# ---------------------------------------------------------------------------------------------- output
def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x != x:  # NaN
            return "n/a"
        return f"{x:,.{digits}f}"
    return str(x)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def command_line() -> str:
    """How this script was invoked, relative to the repo root (for the README)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_s = str(script)
    return " ".join([".venv/bin/python", script_s, *sys.argv[1:]])
