"""GRPO: alignkit vs TRL on the same job; then alignkit's PPO step cost vs its SFT step cost.

Part 1, GRPO. Both frameworks get the same policy (the embedded SmolLM2-135M-Instruct cut to its first
``--layers`` layers, loaded from the same folder; the reference is the same initial weights), the same
prompts in the same order (``builtin:arithmetic`` train, alignkit's prompt-sampler order; TRL reads
the dataset unshuffled), the same reward (``common.arithmetic_reward``: one plain Python function that
both call), G completions per prompt, ``--max-new-tokens``, temperature, top_p 1 / no top-k, ``loss_type=grpo``
(per-sequence token mean, rewards scaled by the group std), clip eps 0.2, KL beta, lr, fp32,
one optimizer step per iteration over all P*G samples (TRL: generation batch = P*G, one gradient
step per generation), grad clip 1.0, AdamW (torch, non-fused), no checkpoints, no eval.

Per iteration we report generation / scoring / training seconds:
- alignkit logs ``time/generation``, ``time/scoring``, ``time/training`` (old + reference log-probs +
  forward/backward + optimizer step) in ``metrics.jsonl``;
- TRL: the step (``on_step_begin`` -> ``on_step_end``) timed by a callback; generation and scoring from
  TRL's own profiling contexts (``transformers.generate``, ``_calculate_rewards``), which only log to
  wandb/mlflow/trackio, so their ``_log_metrics`` is wrapped to record durations; training = the rest.

Part 2, alignkit PPO vs SFT on the same tokens (alignkit only): ``alignkit ppo`` with a small budget and a
fresh one-output score head on the truncated model as reward model (its value model is a copy), then an
SFT run whose records have the same prompt and response lengths as the PPO rollouts and whose optimizer
steps see the same sequences per step (``rollout / num_minibatches``) as PPO's. Reported: seconds per
optimizer step and the ratio PPO / SFT (whole iteration, and its training part alone); with equal
tokens per step this is also the per-token ratio.

Each run is a subprocess (its own peak RSS). ``--repeats R`` alternates which framework goes first and
pools iterations 2..n of all runs (median and min); ``--threads 1`` gives stable timings on a shared CPU.

    .venv/bin/python benchmarks/bench_grpo.py                 # the defaults: a few minutes
    .venv/bin/python benchmarks/bench_grpo.py --threads 1 --repeats 2
    .venv/bin/python benchmarks/bench_grpo.py --skip-ppo --iterations 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

FRAMEWORKS = ("alignkit", "trl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iterations", type=int, default=4, help="GRPO iterations = optimizer steps")
    p.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    p.add_argument("--num-generations", type=int, default=4, help="G")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward/backward (default P*G)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="GRPO runs per framework, alternating which goes first; iterations 2..n of all runs are pooled")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per worker (0: torch default)")
    p.add_argument("--skip-ppo", action="store_true")
    p.add_argument("--ppo-iterations", type=int, default=2)
    p.add_argument("--ppo-rollout", type=int, default=8, help="prompts (= responses) per PPO iteration")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--ppo-minibatches", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/<date>-grpo.json)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--worker", choices=("alignkit", "trl", "ppo", "sft"), help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


# ================================================================================================ prompts
def prompt_order(n_prompts: int, count: int, seed: int) -> list[int]:
    """Indices of the first ``count`` prompts alignkit's ``PromptSampler`` draws (its epoch permutations)."""
    from alignkit.rollout.prompts import PromptSampler

    sampler = PromptSampler([{"i": i} for i in range(n_prompts)], seed)
    return [p["i"] for p in sampler.next(count)]


def arithmetic_records() -> list[dict[str, str]]:
    """``builtin:arithmetic`` train, exactly as alignkit loads it."""
    from alignkit.data.builtin import load_builtin

    return load_builtin("builtin:arithmetic", "train")


# ================================================================================================ GRPO workers
def alignkit_grpo_config(spec: dict, run_dir: Path):
    from alignkit import config as AC

    return AC.GRPOConfig(
        model=C.alignkit_model_config(spec),
        data=AC.RLDataConfig(train="builtin:arithmetic"),
        train=AC.TrainConfig(output_dir=str(run_dir), seed=spec["seed"], lr=spec["lr"], weight_decay=0.0,
                             adam_betas=(0.9, 0.999), scheduler="constant", warmup_steps=0, max_grad_norm=1.0,
                             save_model=False, cpu=True, log_every=1, optimizer=spec.get("optimizer", "adamw"),
                             mixed_precision=spec.get("mixed_precision", "no")),
        generation=AC.GenerationSection(max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
                                        top_p=1.0, top_k=0, batch_size=spec["prompts"]),
        reward=AC.RewardSection(components=[AC.RewardComponent(type="callable", name="arithmetic",
                                                               path="common:arithmetic_reward")]),
        grpo=AC.GRPOSection(loss_type="grpo", num_generations=spec["G"], prompts_per_iteration=spec["prompts"],
                            num_iterations=spec["iterations"], ppo_epochs=1, micro_batch_size=spec["micro_batch_size"],
                            beta=spec["beta"], eps_low=0.2, scale_rewards=True),
    )


def alignkit_grpo_worker(spec: dict, t_start: float) -> dict[str, Any]:
    from alignkit.algorithms import grpo
    from alignkit.train.logging import read_metrics

    run_dir = Path(spec["workdir"]) / f"alignkit-grpo-{spec['repeat']}"
    cfg = alignkit_grpo_config(spec, run_dir)
    rss_import, load_before = C.peak_rss_mb(), C.load_average()
    t0 = time.perf_counter()
    grpo.train(cfg)
    train_call_s = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time/generation" in r]
    iters = [{"generation_s": r["time/generation"], "scoring_s": r["time/scoring"], "training_s": r["time/training"],
              "step_s": r["time/generation"] + r["time/scoring"] + r["time/training"],
              "completion_length": r["response_length"], "reward": r["scores"], "loss": r.get("loss/policy")}
             for r in rows]
    return {"iterations": iters, "train_call_s": train_call_s, "peak_rss_mb": C.peak_rss_mb(),
            "rss_after_import_mb": rss_import, "load_average_before": load_before,
            "load_average_after": C.load_average(), "worker_total_s": time.perf_counter() - t_start}


def trl_grpo_worker(spec: dict, t_start: float) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback

    import trl
    import trl.extras.profiling as profiling
    from alignkit.models.loading import load_tokenizer

    durations: list[tuple[int, str, float]] = []  # (step, block name, seconds)
    original_log = profiling.ProfilingContext._log_metrics

    def record(self, duration: float) -> None:
        durations.append((self.step, self.name, duration))
        original_log(self, duration)

    profiling.ProfilingContext._log_metrics = record

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._t0)

    rss_import, load_before = C.peak_rss_mb(), C.load_average()
    records = arithmetic_records()
    order = prompt_order(len(records), spec["prompts"] * spec["iterations"], spec["seed"])
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": records[i]["prompt"]}],
                                  "answer": records[i]["answer"]} for i in order])
    tokenizer = load_tokenizer(C.EMBEDDED_MODEL)
    rows = spec["prompts"] * spec["G"]
    args = trl.GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / f"trl-grpo-{spec['repeat']}"), max_steps=spec["iterations"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=rows // spec["micro_batch_size"], num_generations=spec["G"],
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim=spec.get("trl_optim", "adamw_torch"),
        max_grad_norm=1.0,
        beta=spec["beta"], loss_type="grpo", scale_rewards="group", epsilon=0.2, num_iterations=1,
        shuffle_dataset=False, seed=spec["seed"], logging_steps=1, report_to="none", save_strategy="no",
        eval_strategy="no", bf16=bool(spec.get("trl_bf16")), fp16=False, gradient_checkpointing=False,
        use_cpu=True, disable_tqdm=True, log_completions=False,
        model_init_kwargs={"dtype": "float32", **({"num_hidden_layers": spec["layers"]} if spec.get("layers") else {})},
    )
    timer = StepTimer()
    peft = {"peft_config": C.peft_lora_config(spec)} if spec.get("lora") else {}
    trainer = trl.GRPOTrainer(model=C.embedded_model_dir(), reward_funcs=C.arithmetic_reward, args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer], **peft)
    t0 = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    iters = []
    for i, step_s in enumerate(timer.steps):
        gen = sum(d for s, n, d in durations if s == i and n.endswith(".transformers.generate"))
        score = sum(d for s, n, d in durations if s == i and n.endswith("._calculate_rewards"))
        log = logs[i] if i < len(logs) else {}
        iters.append({"generation_s": gen, "scoring_s": score, "training_s": step_s - gen - score, "step_s": step_s,
                      "completion_length": log.get("completions/mean_length"), "reward": log.get("reward"),
                      "loss": log.get("loss")})
    blocks: dict[str, float] = {}
    for _, name, d in durations:
        blocks[name] = blocks.get(name, 0.0) + d
    return {"iterations": iters, "train_call_s": train_call_s, "profiling_totals_s": blocks,
            "peak_rss_mb": C.peak_rss_mb(), "rss_after_import_mb": rss_import, "load_average_before": load_before,
            "load_average_after": C.load_average(), "worker_total_s": time.perf_counter() - t_start}


# ================================================================================================ PPO vs SFT
def save_fresh_reward_model(spec: dict) -> str:
    """A one-output score head (N(0, 1/sqrt(d+1)), alignkit's init) on the truncated model, saved loadable."""
    import torch

    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_reward_model, load_tokenizer, save_model

    torch.manual_seed(spec["seed"])
    tokenizer = load_tokenizer(C.EMBEDDED_MODEL)
    model = load_reward_model(ModelConfig(name_or_path=C.EMBEDDED_MODEL, num_hidden_layers=spec["layers"]), tokenizer)
    return str(save_model(model, tokenizer, Path(spec["workdir"]) / f"fresh-rm-{spec['repeat']}"))


def alignkit_ppo_worker(spec: dict, t_start: float) -> dict[str, Any]:
    from alignkit import config as AC
    from alignkit.algorithms import ppo
    from alignkit.train.logging import read_metrics

    rm_dir = save_fresh_reward_model(spec)
    run_dir = Path(spec["workdir"]) / f"alignkit-ppo-{spec['repeat']}"
    micro = spec["ppo_rollout"] // spec["ppo_minibatches"]
    cfg = AC.PPOConfig(
        model=AC.ModelConfig(name_or_path=C.EMBEDDED_MODEL, num_hidden_layers=spec["layers"], dtype="float32"),
        data=AC.RLDataConfig(train="builtin:arithmetic"),
        train=AC.TrainConfig(output_dir=str(run_dir), seed=spec["seed"], lr=spec["lr"], scheduler="constant",
                             max_grad_norm=1.0, save_model=False, cpu=True),
        generation=AC.GenerationSection(max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
                                        top_p=1.0, top_k=0, batch_size=spec["ppo_rollout"]),
        ppo=AC.PPOSection(reward_model=rm_dir, rollout_batch_size=spec["ppo_rollout"],
                          num_iterations=spec["ppo_iterations"], ppo_epochs=spec["ppo_epochs"],
                          num_minibatches=spec["ppo_minibatches"], micro_batch_size=micro, missing_eos_penalty=None),
    )
    rss_import = C.peak_rss_mb()
    ppo.train(cfg)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time/generation" in r]
    return {"iterations": [{"generation_s": r["time/generation"], "scoring_s": r["time/scoring"],
                            "training_s": r["time/training"], "response_length": r["response_length"],
                            "step_s": r["time/generation"] + r["time/scoring"] + r["time/training"]} for r in rows],
            "optimizer_steps_per_iteration": spec["ppo_epochs"] * spec["ppo_minibatches"],
            "peak_rss_mb": C.peak_rss_mb(), "rss_after_import_mb": rss_import,
            "load_average": C.load_average(), "worker_total_s": time.perf_counter() - t_start}


def sft_records_like_ppo(n: int, response_tokens: int, prompts: list[str], tokenizer) -> list[dict[str, str]]:
    """``n`` SFT records with PPO's prompts and a completion of ``response_tokens - 1`` tokens (+ EOS)."""
    from alignkit.data.builtin import sft_demonstrations

    filler = " ".join(d["completion"] for d in sft_demonstrations())
    ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n):
        start = (i * 7) % max(1, len(ids) - response_tokens)
        text = tokenizer.decode(ids[start : start + max(1, response_tokens - 1)])
        out.append({"prompt": prompts[i % len(prompts)], "completion": text})
    return out


def sft_like_ppo_worker(spec: dict, t_start: float) -> dict[str, Any]:
    """alignkit SFT over the same number of sequences per optimizer step as PPO, via bench_offline's worker."""
    import bench_offline

    from alignkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(C.EMBEDDED_MODEL)
    records = arithmetic_records()
    order = prompt_order(len(records), spec["ppo_rollout"] * spec["ppo_iterations"], spec["seed"])
    prompts = [records[i]["prompt"] for i in order]
    steps = spec["ppo_iterations"] * spec["ppo_epochs"] * spec["ppo_minibatches"]
    batch = spec["ppo_rollout"] // spec["ppo_minibatches"]
    rows = sft_records_like_ppo(steps * batch, spec["sft_response_tokens"], prompts, tokenizer)
    path = Path(spec["workdir"]) / f"sft_like_ppo-{spec['repeat']}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    offline_spec = {"layers": spec["layers"], "steps": steps, "batch_size": batch, "grad_accum": 1,
                    "max_length": 1024, "lr": spec["lr"], "seed": spec["seed"], "workdir": spec["workdir"],
                    "data": {"sft": str(path)}, "repeat": f"like-ppo-{spec['repeat']}"}
    return bench_offline.alignkit_worker("sft", offline_spec, t_start)


# ================================================================================================ dispatch
def worker_main(args: argparse.Namespace, t_start: float) -> int:
    spec = {**json.loads(args.spec.read_text(encoding="utf-8")), "repeat": args.repeat}
    fn = {"alignkit": alignkit_grpo_worker, "trl": trl_grpo_worker, "ppo": alignkit_ppo_worker,
          "sft": sft_like_ppo_worker}[args.worker]
    threads = C.set_threads(spec.get("threads"), allocator=args.worker != "trl")
    try:
        result = fn(spec, t_start)
        result["threads"] = threads
    except Exception as e:  # noqa: BLE001 - recorded verbatim in the results
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    result["worker"] = args.worker
    C.write_json(args.worker_out, result)
    return 0 if "error" not in result else 1


def mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def median(xs: list[float | None]) -> float | None:
    import statistics

    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def per_iteration_summary(runs: list[dict]) -> dict[str, Any]:
    """Pool iterations 2..n of every run (the first carries one-off warm-up: imports, allocator, the
    first TensorBoard write): median and min of each part; first iterations separately."""
    ok = [r for r in runs if "error" not in r]
    steady = [i for r in ok for i in (r["iterations"][1:] or r["iterations"])]
    out: dict[str, Any] = {}
    for k in ("generation_s", "scoring_s", "training_s", "step_s"):
        values = [i[k] for i in steady]
        out[f"{k}_median"], out[f"{k}_min"] = median(values), min(values) if values else None
    out["step_s_first_median"] = median([r["iterations"][0]["step_s"] for r in ok if r["iterations"]])
    out["completion_length_mean"] = mean([i["completion_length"] for r in ok for i in r["iterations"]])
    out["reward_mean"] = mean([i["reward"] for r in ok for i in r["iterations"]])
    out["peak_rss_mb"] = max((r["peak_rss_mb"] for r in ok), default=None)
    out["process_wall_s_median"] = median([r["process_wall_s"] for r in ok])
    out["n_steady_iterations"] = len(steady)
    return out


def grpo_table(summary: dict[str, dict]) -> str:
    rows = []
    for key, label in (("step_s_median", "step s, median"), ("generation_s_median", "  generation s, median"),
                       ("scoring_s_median", "  scoring s, median"), ("training_s_median", "  training s, median"),
                       ("step_s_min", "step s, min"), ("generation_s_min", "  generation s, min"),
                       ("training_s_min", "  training s, min"), ("step_s_first_median", "first step s, median"),
                       ("completion_length_mean", "completion tokens (mean)"), ("reward_mean", "reward (mean)"),
                       ("peak_rss_mb", "peak RSS MiB"), ("process_wall_s_median", "process wall s, median")):
        a = summary.get("alignkit", {}).get(key)
        t = summary.get("trl", {}).get(key)
        timed = key.startswith(("step_s", "generation_s", "training_s"))
        rows.append([label, a, t, C.ratio(t, a) if timed else None])
    return C.markdown_table(["GRPO (iterations 2..n)", "alignkit", "TRL", "ratio TRL/alignkit"], rows)


def ppo_sft_summary(ppo_runs: list[dict], sft_runs: list[dict], spec: dict) -> tuple[dict[str, Any], str]:
    """Seconds per optimizer step, PPO (whole iteration / its training part) vs SFT on the same sequences.

    PPO: iterations 2..n of every run pooled (median, min). SFT: per run, loop / steps (median); and the
    sum over steps of each step's fastest repeat / steps (min). Both see ``rollout / num_minibatches``
    sequences of the same prompt + response lengths per optimizer step, so the per-step ratio is
    also the per-token ratio.
    """
    ppo_ok = [r for r in ppo_runs if "error" not in r]
    sft_ok = [r for r in sft_runs if "error" not in r]
    steps_per_it = ppo_ok[0]["optimizer_steps_per_iteration"]
    steady = [i for r in ppo_ok for i in (r["iterations"][1:] or r["iterations"])]
    whole = [(i["generation_s"] + i["scoring_s"] + i["training_s"]) / steps_per_it for i in steady]
    training = [i["training_s"] / steps_per_it for i in steady]
    resp = mean([i["response_length"] for r in ppo_ok for i in r["iterations"]])
    ppo_tokens_per_step = spec["ppo_rollout"] / spec["ppo_minibatches"] * (spec["ppo_prompt_tokens_mean"] + resp)
    sft_steps = sft_ok[0]["steps"]
    sft_median = median([r["loop_s"] / r["steps"] for r in sft_ok])
    sft_min = sum(min(x) for x in zip(*(r["step_s"] for r in sft_ok))) / sft_steps
    summary = {
        "ppo_step_s_whole_median": median(whole), "ppo_step_s_whole_min": min(whole),
        "ppo_step_s_training_median": median(training), "ppo_step_s_training_min": min(training),
        "ppo_generation_s_median": median([i["generation_s"] for i in steady]),
        "ppo_scoring_s_median": median([i["scoring_s"] for i in steady]),
        "ppo_training_s_median": median([i["training_s"] for i in steady]),
        "ppo_optimizer_steps_per_iteration": steps_per_it, "ppo_response_length": resp,
        "ppo_tokens_per_step": ppo_tokens_per_step, "sft_tokens_per_step": sft_ok[0]["tokens"] / sft_steps,
        "sft_step_s_median": sft_median, "sft_step_s_min": sft_min, "n_ppo_iterations": len(steady),
        "n_sft_runs": len(sft_ok),
    }
    for est in ("median", "min"):
        for part in ("whole", "training"):
            summary[f"ratio_{part}_{est}"] = summary[f"ppo_step_s_{part}_{est}"] / summary[f"sft_step_s_{est}"]
    rows = [[f"s per optimizer step, {est}", summary[f"ppo_step_s_whole_{est}"], summary[f"ppo_step_s_training_{est}"],
             summary[f"sft_step_s_{est}"], summary[f"ratio_whole_{est}"], summary[f"ratio_training_{est}"]]
            for est in ("median", "min")]
    table = C.markdown_table(["alignkit", "PPO (whole iteration)", "PPO (training part)", "SFT",
                              "ratio PPO whole / SFT", "ratio PPO training / SFT"], rows)
    table += (f"\n\nPPO iteration (median of iterations 2..n): generation {summary['ppo_generation_s_median']:.2f} s, "
              f"scoring + experience {summary['ppo_scoring_s_median']:.2f} s, training "
              f"{summary['ppo_training_s_median']:.2f} s ({steps_per_it} optimizer steps). Tokens per optimizer step: "
              f"PPO {ppo_tokens_per_step:.0f}, SFT {summary['sft_tokens_per_step']:.0f}.")
    return summary, table


def run_one(worker: str, rep: int, spec_path: Path, workdir: Path, timeout: float, threads: int | None,
            tag: str = "") -> dict:
    """One worker subprocess (``alignkit``/``trl`` GRPO, ``ppo``, ``sft``); its result dict."""
    out = workdir / f"result-{worker}-{rep}.json"
    print(f"[{time.strftime('%H:%M:%S')}] {tag}{worker} (repeat {rep}) ...", flush=True)
    r = C.run_worker([__file__, "--worker", worker, "--repeat", str(rep), "--spec", str(spec_path),
                      "--worker-out", str(out)], out, workdir / f"log-{worker}-{rep}.txt", timeout, threads)
    print("    " + (r["error"].splitlines()[-1] if "error" in r else f"done in {r['process_wall_s']:.1f} s, "
          f"steps {[round(i['step_s'], 1) for i in r.get('iterations', [])]}"), flush=True)
    return r


def run_grpo(frameworks: list[str], repeats: int, spec_path: Path, workdir: Path, timeout: float,
             threads: int | None, tag: str = "") -> dict[str, list[dict]]:
    """``repeats`` GRPO runs per framework, alternating which goes first."""
    runs: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    for rep in range(repeats):
        for fw in (frameworks if rep % 2 == 0 else frameworks[::-1]):
            runs[fw].append(run_one(fw, rep, spec_path, workdir, timeout, threads, tag))
    return runs


def parent_main(args: argparse.Namespace) -> int:
    frameworks = [f for f in args.frameworks.split(",") if f]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="alignkit-bench-grpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = args.prompts * args.num_generations
    mb = args.micro_batch_size or rows
    if rows % mb:
        raise SystemExit(f"--micro-batch-size {mb} must divide prompts*G = {rows}")
    if args.ppo_rollout % args.ppo_minibatches:
        raise SystemExit("--ppo-rollout must be divisible by --ppo-minibatches")
    spec = {"layers": args.layers, "iterations": args.iterations, "prompts": args.prompts, "G": args.num_generations,
            "max_new_tokens": args.max_new_tokens, "micro_batch_size": mb, "lr": args.lr, "beta": args.beta,
            "temperature": args.temperature, "seed": args.seed, "workdir": str(workdir),
            "ppo_iterations": args.ppo_iterations, "ppo_rollout": args.ppo_rollout, "ppo_epochs": args.ppo_epochs,
            "ppo_minibatches": args.ppo_minibatches, "threads": args.threads}
    spec_path = workdir / "spec.json"
    C.write_json(spec_path, spec)
    machine = C.machine_info()  # before the runs: alignkit_git is the code the workers import

    def run(worker: str, rep: int = 0) -> dict:
        return run_one(worker, rep, spec_path, workdir, args.timeout, args.threads)

    grpo_runs = run_grpo(frameworks, args.repeats, spec_path, workdir, args.timeout, args.threads)
    summary = {fw: per_iteration_summary(rs) for fw, rs in grpo_runs.items()}
    table = grpo_table(summary)
    print("\n" + table)
    payload: dict[str, Any] = {"command": C.command_line(), "spec": spec, "machine": machine,
                               "grpo_summary": summary, "grpo_runs": grpo_runs, "grpo_table_markdown": table}

    if not args.skip_ppo:
        ppo_runs, sft_runs = [run("ppo", 0)], []
        if "error" not in ppo_runs[0]:
            resp = round(mean([i["response_length"] for i in ppo_runs[0]["iterations"]]))
            spec.update(sft_response_tokens=resp, ppo_prompt_tokens_mean=mean_prompt_tokens(spec))
            C.write_json(spec_path, spec)
            sft_runs.append(run("sft", 0))
            for rep in range(1, args.repeats):
                for worker in (("sft", "ppo") if rep % 2 else ("ppo", "sft")):
                    (sft_runs if worker == "sft" else ppo_runs).append(run(worker, rep))
        payload.update(ppo_runs=ppo_runs, sft_like_ppo_runs=sft_runs)
        if any("error" not in r for r in ppo_runs) and any("error" not in r for r in sft_runs):
            summary, ppo_table = ppo_sft_summary(ppo_runs, sft_runs, spec)
            payload["ppo_vs_sft"] = summary
            payload["ppo_vs_sft_table_markdown"] = ppo_table
            print("\n" + ppo_table)
    out_path = args.out or C.results_path("grpo")
    payload["alignkit_git_at_end"] = C.git_revision()
    C.write_json(out_path, payload)
    print(f"\nresults: {out_path}")
    return 0


def mean_prompt_tokens(spec: dict) -> float:
    """Mean prompt tokens (chat template included) of the prompts the PPO run drew."""
    from alignkit.data.tokenize import encode, render_prompt
    from alignkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(C.EMBEDDED_MODEL)
    records = arithmetic_records()
    order = prompt_order(len(records), spec["ppo_rollout"] * spec["ppo_iterations"], spec["seed"])
    lengths = [len(encode(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": records[i]["prompt"]}])))
               for i in order]
    return sum(lengths) / len(lengths)


def main() -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args()
    if args.worker:
        return worker_main(args, t_start)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
