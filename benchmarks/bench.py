"""One benchmark command (``make bench``): this machine's limits, alignkit vs TRL training, generation vs the bound.

In ONE invocation:

1. **limits**: fp32 and bf16 matmul GFLOP/s (``torch.mm`` of ``--matmul-n`` squares) and memory-copy bandwidth
   (GB/s, read + write bytes both counted), with the thread count the jobs use;
2. **training**: SFT, RM, DPO (``bench_offline.py`` workers) and GRPO (``bench_grpo.py`` workers), alignkit and
   TRL on identical work, alternating, ``--repeats`` times, for each model (``cut4``: the embedded model's first
   4 layers, full fine-tuning; ``full-lora``: all 30 layers with the same LoRA adapters on both sides) and each
   setting (``a``: equal numerics; ``b``: each side's best recommended settings on this hardware; see
   ``setting_spec``);
3. **generation**: the embedded model through alignkit's rollout engine (``HFGenerateBackend``), greedy and
   sampled, at batch 1 and at the quickstart's generation batch, with the dynamic and the static KV cache,
   against the memory-bandwidth bound (``decode_bytes``);
4. **output**: ``benchmarks/results/<date>-bench.json`` and printed tables, then the change against the previous
   ``*-bench.json`` (or ``--compare FILE``), flagging rows more than ``--flag`` worse.

    .venv/bin/python benchmarks/bench.py            # ~30 min on the idle 2-core machine (estimate, README)
    .venv/bin/python benchmarks/bench.py --quick    # a 2-3 minute smoke: tiny sizes, numbers not comparable
    .venv/bin/python benchmarks/bench.py --jobs sft,dpo --models cut4 --settings b --skip-generation
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo  # noqa: E402
import bench_offline  # noqa: E402
import common as C  # noqa: E402

JOBS = ("sft", "rm", "dpo", "grpo")
FRAMEWORKS = ("alignkit", "trl")
SETTINGS = ("a", "b")
LORA = {"r": 16, "alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
"""The LoRA both sides get on the full model (dropout 0): every linear of every layer, so the backward runs
down to layer 0 in both."""

# Sizes. cut4 = the old bench_offline / bench_grpo defaults; full-lora sized so that the default run takes about
# 25 minutes on the idle 2-core machine (README: the estimate and how it was made).
SIZES = {
    "default": {
        "cut4": {"layers": 4, "lora": None, "steps": 8, "batch_size": 4,
                 "grpo": {"iterations": 4, "prompts": 2, "G": 4, "max_new_tokens": 32}},
        "full-lora": {"layers": None, "lora": LORA, "steps": 3, "batch_size": 2,
                      "grpo": {"iterations": 2, "prompts": 2, "G": 2, "max_new_tokens": 16}},
        "generation": {"new_tokens": None, "batch": None},  # None: the quickstart's max_new_tokens / generation batch
        "matmul_seconds": 3.0, "bandwidth_seconds": 2.0, "matmul_n": 2048,
    },
    "quick": {
        "cut4": {"layers": 2, "lora": None, "steps": 2, "batch_size": 2,
                 "grpo": {"iterations": 2, "prompts": 1, "G": 2, "max_new_tokens": 8}},
        "full-lora": {"layers": None, "lora": LORA, "steps": 1, "batch_size": 1,
                      "grpo": {"iterations": 1, "prompts": 1, "G": 2, "max_new_tokens": 4}},
        "generation": {"new_tokens": 8, "batch": 4},
        "matmul_seconds": 0.5, "bandwidth_seconds": 0.5, "matmul_n": 768,
    },
}
QUICK_JOBS = ("sft", "grpo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tiny sizes, jobs {','.join(QUICK_JOBS)} unless --jobs, 1 repeat unless --repeats")
    p.add_argument("--jobs", default=None, help="comma-separated subset of sft,rm,dpo,grpo")
    p.add_argument("--models", default="cut4,full-lora")
    p.add_argument("--settings", default="a,b")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--repeats", type=int, default=None, help="runs per (job, model, setting, framework); default 2")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every measurement (0: torch's default, i.e. OMP_NUM_THREADS or the cores)")
    p.add_argument("--generation-batch", type=int, default=None,
                   help="the larger generation batch (default: the quickstart's generation_batch_size)")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 2048; --quick 768)")
    p.add_argument("--compare", type=Path, default=None, help="previous result (default: newest earlier *-bench.json)")
    p.add_argument("--flag", type=float, default=0.10, help="flag rows this much worse than the previous result")
    p.add_argument("--timeout", type=float, default=1200.0, help="per worker, seconds")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--worker", choices=("generation",), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


# ================================================================================================ settings
def bf16_decision(limits: dict) -> dict[str, Any]:
    """Setting (b) autocasts to bf16 only when this machine's measured bf16 matmul beats fp32."""
    fp32, bf16 = limits["matmul_fp32"]["peak_gflops"], limits["matmul_bf16"]["peak_gflops"]
    use = bf16 > fp32
    return {"bf16": use, "why": f"bf16 matmul {bf16:.1f} GFLOP/s {'>' if use else '<='} fp32 {fp32:.1f} GFLOP/s"}


def setting_spec(setting: str, use_bf16: bool) -> dict[str, Any]:
    """What each side runs with in a setting (README: why each choice).

    a: equal numerics: fp32, torch's for-each AdamW on both sides, padded batches.
    b: each side's best recommended settings on this CPU: alignkit ``train.optimizer=adamw_fused``,
       ``train.padding_free`` (SFT, DPO); TRL ``optim=adamw_torch_fused`` (its default), ``padding_free`` for SFT
       (TRL 1.16's DPOTrainer disables it, its RewardTrainer has none); gradient checkpointing off on both (it only
       costs time here); bf16 autocast on both only if the measured bf16 matmul is faster than fp32.
    """
    if setting == "a":
        return {"optimizer": "adamw", "trl_optim": "adamw_torch", "padding_free": False, "trl_padding_free": False,
                "mixed_precision": "no", "trl_bf16": False}
    if setting == "b":
        return {"optimizer": "adamw_fused", "trl_optim": "adamw_torch_fused", "padding_free": True,
                "trl_padding_free": True, "mixed_precision": "bf16" if use_bf16 else "no", "trl_bf16": use_bf16}
    raise ValueError(f"unknown setting {setting!r} (a or b)")


# ================================================================================================ arithmetic
def decode_bytes(weight_bytes: float, kv_bytes_per_position: float, rows: int, context: int, steps: int) -> float:
    """Bytes a ``steps``-token decode must read at least: all weights once per step, plus the KV cache of every row.

    Step t (t = 0..steps-1) reads the weights (W) and the K and V of ``context + t`` positions in each of ``rows``
    rows (the prefill is counted as step 0: a lower bound of its traffic)::

        bytes = steps W + kv rows sum_t (context + t) = steps W + kv rows (steps context + steps (steps - 1) / 2)

    E.g. W = 1000, kv = 10, rows = 2, context = 5, steps = 3: 3000 + 10*2*(15 + 3) = 3360.
    """
    return steps * weight_bytes + kv_bytes_per_position * rows * (steps * context + steps * (steps - 1) / 2)


def kv_bytes_per_position(config: Any, bytes_per_value: int = 4) -> int:
    """K and V of one position in every layer: 2 L h_kv d_h values (fp32: 4 bytes each)."""
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    d_h = getattr(config, "head_dim", None) or config.hidden_size // h
    return 2 * config.num_hidden_layers * kv * d_h * bytes_per_value


def bound_fraction(measured_s: float, bytes_read: float, bandwidth_gbs: float) -> float:
    """Fraction of the bandwidth bound reached: (bytes / bandwidth) / measured time.
    E.g. 3.6e9 bytes at 12 GB/s = 0.3 s; measured 0.6 s -> 0.5."""
    return bytes_read / (bandwidth_gbs * 1e9) / measured_s


def flop_fraction(flops_per_token: float, tokens_per_s: float, peak_gflops: float) -> float:
    """Training throughput as a fraction of the matmul rate: flops/token x tokens/s over the measured FLOP/s.
    E.g. 6 x 1e8 FLOPs/token at 100 tokens/s = 60 GFLOP/s; at a peak of 100 GFLOP/s -> 0.6."""
    return flops_per_token * tokens_per_s / (peak_gflops * 1e9)


# ================================================================================================ training rows
def offline_side(runs: list[dict]) -> dict[str, Any] | None:
    """One framework's row from its repeats: median s/step over every steady step of every repeat (step 1 of a
    run carries one-off warm-up and is left out when a run has more steps), tokens/s = tokens per step over it,
    largest peak RSS, the final loss (the same batches in every repeat)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    steps = [s for r in ok for s in (r["step_s"][1:] or r["step_s"])]
    s_per_step = statistics.median(steps)
    tokens_per_step = ok[0]["tokens"] / ok[0]["steps"]
    return {"s_per_step": s_per_step, "tokens_per_s": tokens_per_step / s_per_step, "tokens": ok[0]["tokens"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "final_loss": ok[0]["final_loss"],
            "repeats_ok": len(ok)}


def grpo_side(runs: list[dict], spec: dict) -> dict[str, Any] | None:
    """GRPO row: median iteration seconds over iterations 2..n of every repeat (``bench_grpo``); tokens/s =
    completion tokens of an iteration (rows x mean completion length) per second of an iteration."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    summ = bench_grpo.per_iteration_summary(ok)
    rows = spec["prompts"] * spec["G"]
    loss = ok[0]["iterations"][-1].get("loss") if ok[0]["iterations"] else None
    return {"s_per_step": summ["step_s_median"], "generation_s": summ["generation_s_median"],
            "training_s": summ["training_s_median"],
            "tokens_per_s": rows * (summ["completion_length_mean"] or 0) / summ["step_s_median"],
            "peak_rss_mb": summ["peak_rss_mb"], "final_loss": loss, "repeats_ok": len(ok)}


def losses_agree(a: float | None, b: float | None, rtol: float = 0.02, atol: float = 0.01) -> bool | None:
    """|a - b| <= atol + rtol max(|a|, |b|); None when a side has no loss. E.g. 18.17 vs 18.25: 0.08 <= 0.375."""
    if a is None or b is None:
        return None
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def train_row(job: str, model: str, setting: str, sides: dict[str, dict | None], flops_per_token: float | None,
              peak_gflops: float) -> dict[str, Any]:
    """One table row: both sides, the ratio TRL/alignkit of s/step (> 1: alignkit faster), the FLOP fraction of
    each side (None for GRPO: a mix of generation and training) and whether the final losses agree."""
    for side in sides.values():
        if side is not None:
            side["flop_fraction"] = (flop_fraction(flops_per_token, side["tokens_per_s"], peak_gflops)
                                     if flops_per_token and side.get("tokens_per_s") else None)
    a, t = sides.get("alignkit"), sides.get("trl")
    return {"job": job, "model": model, "setting": setting, "sides": sides,
            "ratio": C.ratio(t and t["s_per_step"], a and a["s_per_step"]),
            "flops_per_token": flops_per_token, "peak_gflops_used": peak_gflops,
            "losses_agree": losses_agree(a and a["final_loss"], t and t["final_loss"])}


def model_flops_per_token(job: str, size: dict) -> float | None:
    """Matmul FLOPs per trained token (common.training_flops_per_token); GRPO: None."""
    if job == "grpo":
        return None
    config = C.truncated_config(size["layers"])
    n = C.matmul_params(config, lm_head=job != "rm")
    n_lora = C.lora_params(config, size["lora"]["r"], size["lora"]["target_modules"]) if size["lora"] else 0
    return C.training_flops_per_token(n, n_lora)


# ================================================================================================ generation
def generation_worker(spec: dict) -> dict[str, Any]:
    """Decode with alignkit's ``HFGenerateBackend`` on the full embedded model (fp32), per (batch, mode, cache) (at
    the large batch the static cache runs greedy only):
    seconds of ``generate`` (prefill included; the best of ``spec['repeats']``), decode steps (columns generated),
    prefill seconds (one forward over the prompts), and for greedy the tokens (static must equal dynamic)."""
    import torch

    from alignkit.config import ModelConfig, RLDataConfig
    from alignkit.models.loading import load_policy, load_tokenizer
    from alignkit.rollout.engine import HFGenerateBackend, SamplingParams
    from alignkit.rollout.prompts import load_prompts, prompt_batch

    tok = load_tokenizer(C.EMBEDDED_MODEL)
    model = load_policy(ModelConfig(name_or_path=C.EMBEDDED_MODEL), tok, trainable=False).eval()
    prompts = load_prompts(RLDataConfig(train="builtin:sentiment"), tok, spec["new_tokens"], log=lambda *_: None)
    out: dict[str, Any] = {"runs": []}
    warm = prompt_batch(prompts[:1], tok.pad_token_id)  # one-off first-call costs (allocator, thread pool)
    HFGenerateBackend(model, tok).generate(warm["input_ids"], warm["attention_mask"], SamplingParams(2, do_sample=False))
    for batch in spec["batches"]:
        b = prompt_batch(prompts[:batch], tok.pad_token_id)
        ids, mask = b["input_ids"], b["attention_mask"]
        prefill_times = []
        with torch.no_grad():
            for _ in range(2 if batch == 1 else 1):  # batch 1: the faster of two (the large batch: ~30 s each)
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, use_cache=True)
                prefill_times.append(time.perf_counter() - t0)
        prefill_s = min(prefill_times)
        greedy_tokens: dict[str, list] = {}
        for mode in ("greedy", "sampled"):
            params = SamplingParams(max_new_tokens=spec["new_tokens"], do_sample=mode == "sampled")
            for cache in ("dynamic", "static"):
                if batch > 1 and mode == "sampled" and cache == "static":
                    continue  # the large batch costs ~40 s a run: the cache comparison is made on greedy
                backend = HFGenerateBackend(model, tok, cache_implementation=cache)
                times, raw = [], None
                for rep in range(spec["repeats"] if batch == 1 else 1):  # the large batch: one run (minutes)
                    torch.manual_seed(rep)
                    t0 = time.perf_counter()
                    raw = backend.generate(ids, mask, params)  # [B, R]
                    times.append(time.perf_counter() - t0)
                if mode == "greedy":
                    greedy_tokens[cache] = raw.tolist()
                out["runs"].append({"batch": batch, "mode": mode, "cache": cache, "seconds": min(times),
                                    "seconds_all": times, "steps": raw.shape[1], "prompt_width": ids.shape[1],
                                    "prefill_s": prefill_s})
        out.setdefault("static_equals_dynamic_greedy", {})[str(batch)] = greedy_tokens["static"] == greedy_tokens[
            "dynamic"]
    out["peak_rss_mb"] = C.peak_rss_mb()
    return out


def generation_rows(result: dict, bandwidth_gbs: float) -> list[dict[str, Any]]:
    """Per run: tokens/s (rows x steps / s), the bound's bytes and seconds, and the fraction reached, over the whole
    ``generate`` and over its decode part (minus the separately timed prefill)."""
    config = C.truncated_config(None)
    weight_bytes = 4 * C.matmul_params(config, lm_head=True)
    kv = kv_bytes_per_position(config)
    rows = []
    for r in result["runs"]:
        nbytes = decode_bytes(weight_bytes, kv, r["batch"], r["prompt_width"], r["steps"])
        decode_s = max(r["seconds"] - r["prefill_s"], 1e-9)
        rows.append({**r, "tokens_per_s": r["batch"] * r["steps"] / r["seconds"], "bound_bytes": nbytes,
                     "bound_s": nbytes / (bandwidth_gbs * 1e9),
                     "fraction_of_bound": bound_fraction(r["seconds"], nbytes, bandwidth_gbs),
                     "decode_fraction_of_bound": bound_fraction(decode_s, nbytes, bandwidth_gbs)})
    return rows


# ================================================================================================ diff
def flat_metrics(result: dict) -> dict[str, tuple[float, str]]:
    """Every comparable number of a result as ``key -> (value, better)`` with better = ``lower`` or ``higher``."""
    out: dict[str, tuple[float, str]] = {}
    lim = result.get("limits", {})
    for key in ("matmul_fp32", "matmul_bf16"):
        if key in lim:
            out[f"limits/{key} GFLOP/s"] = (lim[key]["peak_gflops"], "higher")
    if "copy" in lim:
        out["limits/copy GB/s"] = (lim["copy"]["peak_gbs"], "higher")
    for row in result.get("train_rows", []):
        for fw, side in row["sides"].items():
            if side is None:
                continue
            stem = f"train/{row['job']}/{row['model']}/{row['setting']}/{fw}"
            out[f"{stem} s/step"] = (side["s_per_step"], "lower")
            out[f"{stem} peak RSS MiB"] = (side["peak_rss_mb"], "lower")
    for row in result.get("generation_rows", []):
        out[f"generation/batch {row['batch']}/{row['mode']}/{row['cache']} tokens/s"] = (row["tokens_per_s"], "higher")
    return out


def compare(old: dict[str, tuple[float, str]], new: dict[str, tuple[float, str]],
            threshold: float = 0.10) -> list[dict[str, Any]]:
    """Rows present in both: old -> new, change = new/old - 1, and ``worse`` when the change goes the bad way by
    more than ``threshold`` (s/step or memory up, throughput down). E.g. s/step 2.0 -> 2.3: +15 %, worse."""
    rows = []
    for key in sorted(old.keys() & new.keys()):
        (o, better), (n, _) = old[key], new[key]
        if o is None or n is None or o == 0:
            continue
        change = n / o - 1
        worse = change > threshold if better == "lower" else change < -threshold
        rows.append({"metric": key, "old": o, "new": n, "change": change, "worse": worse})
    return rows


def previous_result(results_dir: Path, kind: str = "bench", exclude: Path | None = None) -> Path | None:
    """The newest ``<date>-<kind>[-n].json`` in ``results_dir`` other than ``exclude`` (by date, then n).
    ``kind`` is ``bench`` or ``bench-quick``: a quick run is only compared with quick runs."""
    pattern = re.compile(r"^(\d{4}-\d{2}-\d{2})-" + re.escape(kind) + r"(?:-(\d+))?\.json$")
    found = []
    for p in results_dir.glob(f"*-{kind}*.json"):
        m = pattern.match(p.name)
        if m and (exclude is None or p.resolve() != exclude.resolve()):
            found.append(((m.group(1), int(m.group(2) or 1)), p))
    return max(found)[1] if found else None


# ================================================================================================ tables
def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def training_table(rows: list[dict]) -> str:
    def s(row, fw, key):
        side = row["sides"].get(fw)
        return None if side is None else side.get(key)

    body = []
    for r in rows:
        agree = {True: "yes", False: "NO", None: "n/a"}[r["losses_agree"]]
        body.append([r["job"], r["model"], r["setting"], s(r, "alignkit", "s_per_step"), s(r, "trl", "s_per_step"),
                     r["ratio"], s(r, "alignkit", "tokens_per_s"), s(r, "trl", "tokens_per_s"),
                     s(r, "alignkit", "peak_rss_mb"), s(r, "trl", "peak_rss_mb"),
                     s(r, "alignkit", "final_loss"), s(r, "trl", "final_loss"), agree,
                     _pct(s(r, "alignkit", "flop_fraction")), _pct(s(r, "trl", "flop_fraction"))])
    return C.markdown_table(["job", "model", "setting", "alignkit s/step", "TRL s/step", "ratio TRL/alignkit",
                             "alignkit tok/s", "TRL tok/s", "alignkit peak RSS MiB", "TRL peak RSS MiB",
                             "alignkit final loss", "TRL final loss", "losses agree", "alignkit % matmul rate",
                             "TRL % matmul rate"], body)


def generation_table(rows: list[dict]) -> str:
    return C.markdown_table(
        ["batch", "mode", "cache", "steps", "s", "prefill s", "tokens/s", "bound s", "% of bound", "decode % of bound"],
        [[r["batch"], r["mode"], r["cache"], r["steps"], r["seconds"], r["prefill_s"], r["tokens_per_s"], r["bound_s"],
          _pct(r["fraction_of_bound"]), _pct(r["decode_fraction_of_bound"])] for r in rows])


def limits_text(limits: dict, decision: dict) -> str:
    f, b, c = limits["matmul_fp32"], limits["matmul_bf16"], limits["copy"]
    return (f"matmul fp32 {f['peak_gflops']:.1f} GFLOP/s (median {f['median_gflops']:.1f}), bf16 {b['peak_gflops']:.1f}"
            f" GFLOP/s (median {b['median_gflops']:.1f}), {f['n']}x{f['n']}, {f['threads']} threads; copy bandwidth "
            f"{c['peak_gbs']:.1f} GB/s (median {c['median_gbs']:.1f}; read + write bytes counted, {c['mib']} MiB); "
            f"setting b bf16 autocast: {'on' if decision['bf16'] else 'off'} ({decision['why']})")


def compare_table(rows: list[dict]) -> str:
    return C.markdown_table(["metric", "old", "new", "change", "flag"],
                            [[r["metric"], r["old"], r["new"], f"{100 * r['change']:+.1f}%",
                              "WORSE" if r["worse"] else ""] for r in rows])


# ================================================================================================ parent
def measure_limits(size: dict, n: int) -> dict[str, Any]:
    return {"matmul_fp32": C.matmul_peak_gflops(n, size["matmul_seconds"], "float32"),
            "matmul_bf16": C.matmul_peak_gflops(n, size["matmul_seconds"], "bfloat16"),
            "copy": C.copy_bandwidth_gbs(seconds=size["bandwidth_seconds"])}


def run_training(args, size: dict, jobs: list[str], models: list[str], settings: list[str], frameworks: list[str],
                 repeats: int, decision: dict, limits: dict, workdir: Path) -> tuple[list[dict], dict]:
    rows, runs = [], {}
    for model in models:
        msize = size[model]
        for setting in settings:
            sdir = workdir / f"{model}-{setting}"
            sdir.mkdir(parents=True, exist_ok=True)
            base = {"layers": msize["layers"], "lora": msize["lora"], "seed": 0, "threads": args.threads,
                    "workdir": str(sdir), **setting_spec(setting, decision["bf16"])}
            peak = limits["matmul_bf16" if base["mixed_precision"] == "bf16" else "matmul_fp32"]["peak_gflops"]
            offline_jobs = [j for j in jobs if j != "grpo"]
            if offline_jobs:
                ns = SimpleNamespace(steps=msize["steps"], batch_size=msize["batch_size"], grad_accum=1,
                                     max_length=128, max_chars=160, lr=1e-5, seed=0, trl_optim=base["trl_optim"],
                                     layers=msize["layers"], threads=args.threads)
                spec = {**bench_offline.prepare_inputs(ns, offline_jobs, sdir), **base}
                spec_path = sdir / "spec.json"
                C.write_json(spec_path, spec)
                for job in offline_jobs:
                    r = bench_offline.run_job(job, frameworks, repeats, spec_path, sdir, args.timeout, args.threads,
                                              tag=f"{model}/{setting}/")
                    runs[f"{job}/{model}/{setting}"] = r
                    rows.append(train_row(job, model, setting, {fw: offline_side(rs) for fw, rs in r.items()},
                                          model_flops_per_token(job, msize), peak))
            if "grpo" in jobs:
                g = msize["grpo"]
                gdir = sdir / "grpo"
                gdir.mkdir(exist_ok=True)
                spec = {**base, "workdir": str(gdir), "iterations": g["iterations"], "prompts": g["prompts"],
                        "G": g["G"], "max_new_tokens": g["max_new_tokens"], "micro_batch_size": g["prompts"] * g["G"],
                        "lr": 1e-6, "beta": 0.04, "temperature": 1.0}
                spec_path = gdir / "spec.json"
                C.write_json(spec_path, spec)
                r = bench_grpo.run_grpo(frameworks, repeats, spec_path, gdir, args.timeout, args.threads,
                                        tag=f"{model}/{setting}/grpo/")
                runs[f"grpo/{model}/{setting}"] = r
                rows.append(train_row("grpo", model, setting, {fw: grpo_side(rs, spec) for fw, rs in r.items()},
                                      None, peak))
    return rows, runs


def run_generation(args, size: dict, repeats: int, workdir: Path) -> dict:
    from alignkit.config import QuickstartConfig

    q = QuickstartConfig()
    batch = args.generation_batch or size["generation"]["batch"] or q.generation_batch_size
    spec = {"new_tokens": size["generation"]["new_tokens"] or q.max_new_tokens, "batches": [1, batch],
            "repeats": repeats}
    gdir = workdir / "generation"
    gdir.mkdir(parents=True, exist_ok=True)
    spec_path, out = gdir / "spec.json", gdir / "result.json"
    C.write_json(spec_path, spec)
    print(f"[{time.strftime('%H:%M:%S')}] generation (batches {spec['batches']}, {spec['new_tokens']} new tokens) ...",
          flush=True)
    r = C.run_worker([__file__, "--worker", "generation", "--spec", str(spec_path), "--worker-out", str(out)],
                     out, gdir / "log.txt", args.timeout, args.threads)
    return {"spec": spec, **r}


def parent_main(args: argparse.Namespace) -> int:
    size = SIZES["quick" if args.quick else "default"]
    jobs = [j for j in (args.jobs or ",".join(QUICK_JOBS if args.quick else JOBS)).split(",") if j]
    models = [m for m in args.models.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]
    frameworks = [f for f in args.frameworks.split(",") if f]
    for name, values, allowed in (("--jobs", jobs, JOBS), ("--models", models, ("cut4", "full-lora")),
                                  ("--settings", settings, SETTINGS), ("--frameworks", frameworks, FRAMEWORKS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {','.join(allowed)}")
    repeats = args.repeats or (1 if args.quick else 2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = C.machine_info()
    C.set_threads(args.threads)
    print(f"workdir {workdir}; measuring this machine's limits ...", flush=True)
    limits = measure_limits(size, args.matmul_n or size["matmul_n"])
    decision = bf16_decision(limits)
    print(limits_text(limits, decision), flush=True)

    payload: dict[str, Any] = {
        "command": C.command_line(), "quick": args.quick, "machine": machine, "limits": limits, "decisions": decision,
        "spec": {"jobs": jobs, "models": models, "settings": settings, "frameworks": frameworks, "repeats": repeats,
                 "threads": args.threads, "sizes": size,
                 "settings_spec": {s: setting_spec(s, decision["bf16"]) for s in settings}},
    }
    if not args.skip_training:
        rows, runs = run_training(args, size, jobs, models, settings, frameworks, repeats, decision, limits, workdir)
        payload.update(train_rows=rows, train_runs=runs)
    if not args.skip_generation:
        gen = run_generation(args, size, repeats, workdir)
        payload["generation"] = gen
        if "error" not in gen:
            payload["generation_rows"] = generation_rows(gen, limits["copy"]["peak_gbs"])

    parts = [limits_text(limits, decision)]
    if payload.get("train_rows"):
        parts += ["", "Training (s/step: median; ratio > 1: alignkit faster):", "", training_table(payload["train_rows"])]
        bad = [f"{r['job']}/{r['model']}/{r['setting']}" for r in payload["train_rows"] if r["losses_agree"] is False]
        if bad:
            parts += ["", f"FINAL LOSSES DISAGREE (beyond 2 % + 0.01): {', '.join(bad)}"]
        errors = [f"- {k}/{fw}: {r['error'].splitlines()[-1]}" for k, fws in payload["train_runs"].items()
                  for fw, rs in fws.items() for r in rs if "error" in r]
        if errors:
            parts += ["", "errors:", *errors]
    if payload.get("generation_rows"):
        eq = payload["generation"].get("static_equals_dynamic_greedy")
        parts += ["", "Generation (full embedded model, fp32; bound = copy bandwidth / bytes of weights + KV per step):",
                  "", generation_table(payload["generation_rows"]), "",
                  f"static cache greedy tokens equal dynamic: {eq}"]
    elif "generation" in payload:
        parts += ["", f"generation failed: {payload['generation'].get('error', '')[-500:]}"]
    kind = "bench-quick" if args.quick else "bench"
    out_path = args.out or C.results_path(kind)
    prev = args.compare or previous_result(C.RESULTS_DIR, kind, exclude=out_path)
    if prev is not None and prev.is_file():
        old = json.loads(prev.read_text(encoding="utf-8"))
        diff = compare(flat_metrics(old), flat_metrics(payload), args.flag)
        payload["compare"] = {"file": str(prev), "threshold": args.flag, "rows": diff}
        worse = [r["metric"] for r in diff if r["worse"]]
        parts += ["", f"Change against {prev.name} (flag: > {100 * args.flag:.0f}% worse):", "", compare_table(diff),
                  "", f"{len(worse)} of {len(diff)} rows worse" + (f": {', '.join(worse)}" if worse else "")]
    else:
        parts += ["", "no previous *-bench.json result to compare with"]
    tables = "\n".join(parts)
    payload.update(tables_markdown=tables, wall_s=time.perf_counter() - t_start, alignkit_git_at_end=C.git_revision())
    C.write_json(out_path, payload)
    print("\n" + tables + f"\n\nresults: {out_path} (wall {payload['wall_s']:.0f} s)")
    return 0


def main() -> int:
    args = build_parser().parse_args()
    if args.worker:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        C.set_threads(spec.get("threads"))
        try:
            result = generation_worker(spec)
        except Exception as e:  # noqa: BLE001 - recorded verbatim in the results
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        C.write_json(args.worker_out, result)
        return 0 if "error" not in result else 1
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
