"""alignkit vs TRL on the same offline jobs: SFT, reward model (Bradley-Terry), DPO (sigmoid).

For each job both frameworks get the same tokens, the same model (the embedded SmolLM2-135M-Instruct
cut to its first ``--layers`` transformer layers), the same initial weights, the same batches in the
same order and the same hyperparameters:

- data: ``steps * batch_size * grad_accum`` records, so each run is exactly one epoch:
  SFT = the built-in sentiment demonstrations; RM and DPO = BIG-bench HHH train pairs with every
  text cut to ``--max-chars`` characters and kept only if prompt + response fits ``--max-length``
  tokens (neither framework truncates anything). Tokens are alignkit's tokenisation (chat template,
  response + EOS); TRL gets them pre-tokenised for SFT and RM, and as the rendered prompt text +
  raw responses for DPO (TRL tokenises; the token totals are checked to be equal);
- order: alignkit's epoch-0 permutation; TRL reads the dataset in that order (sequential sampler);
- fp32, constant LR, no warm-up, AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0, torch's
  non-fused implementation in both: ``--trl-optim``), grad-norm clip 1.0, dropout off, no eval,
  no checkpoint during the run, no gradient checkpointing; DPO beta 0.1, sigmoid loss, reference
  log-probs precomputed before training in both; RM with one output (a fresh score head, drawn from
  the same seed in both), one pair per batch element.

Each (framework, job) runs in its own subprocess; its peak RSS is read there (``ru_maxrss``).
Timings: ``loop s`` = the optimizer steps only, from the first step's forward to the end of the last
optimizer step; step k runs from its start to the start of step k+1 (so the logging after a step and
the fetch of the next batch count in both frameworks). alignkit: clocks at its ``step_fn`` calls and at
the loop's final checkpoint save; TRL: a callback's ``on_step_begin`` / ``on_step_end``. Model loading,
tokenisation, reference precompute and saving are outside the loop and reported separately. With
``--repeats R`` (frameworks alternate who goes first) the reported loop is the sum over steps of each
step's fastest repeat: the CPU is shared, and that is the least-disturbed estimate of the same work.

    .venv/bin/python benchmarks/bench_offline.py                      # the defaults: a few minutes
    .venv/bin/python benchmarks/bench_offline.py --threads 1 --repeats 2   # stable on a shared CPU
    .venv/bin/python benchmarks/bench_offline.py --jobs dpo --layers 2 --steps 4
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

JOBS = ("sft", "rm", "dpo")
FRAMEWORKS = ("alignkit", "trl")
KIND = {"sft": "sft", "rm": "preference", "dpo": "preference"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of sft,rm,dpo")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--layers", type=int, default=4, help="keep the first N transformer layers (30 = full model)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (= one epoch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-chars", type=int, default=160, help="HHH texts are cut to this many characters")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-optim", default="adamw_torch",
                   help="TRL optimizer; alignkit uses torch.optim.AdamW (= adamw_torch). "
                        "TRL's default is adamw_torch_fused")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per (job, framework), alternating which framework goes first; "
                        "per step the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per worker (0: torch default)")
    p.add_argument("--matmul-seconds", type=float, default=4.0)
    p.add_argument("--timeout", type=float, default=900.0, help="per worker, seconds")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/<date>-offline.json)")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, logs and run dirs here (default: a temp dir)")
    # internal: one worker run
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


# ================================================================================================ data
def cut(text: str, max_chars: int) -> str:
    """``text`` cut at the last space before ``max_chars`` (whole text if shorter)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[: head.rfind(" ")] if " " in head else head


def sft_records(n: int) -> list[dict[str, str]]:
    from alignkit.data.builtin import sft_demonstrations

    demos = sft_demonstrations()
    if n > len(demos):
        raise SystemExit(f"SFT needs {n} records (steps*batch*grad_accum) but only {len(demos)} demos exist")
    return demos[:n]


def preference_source() -> tuple[str, list[dict[str, str]]]:
    """(name, pairs): the BIG-bench HHH train pairs where this machine has them; otherwise pairs of real texts of
    similar length that ship with every set-up: a HarmBench / Do-Not-Answer request as the prompt, two different
    SFT demonstrations as the replies (timing depends on lengths, not on which reply is better). The name goes into
    the results, so runs on different data are not compared unawares."""
    from alignkit.data.builtin import hhh_unavailable, load_hhh, sft_demonstrations
    from alignkit.data.safety import harmful_prompts

    if hhh_unavailable() is None:
        return "hhh", load_hhh("train")
    print("bench: the BIG-bench HHH pairs are not available; preference jobs use red-team prompts with two SFT "
          "demonstrations as replies", flush=True)
    demos = [d["completion"] for d in sft_demonstrations()]
    return "redteam+demos", [{"prompt": r["prompt"], "chosen": demos[i % len(demos)],
                              "rejected": demos[(i + len(demos) // 2) % len(demos)]}
                             for i, r in enumerate(harmful_prompts("train"))]


def preference_records(source: tuple[str, list[dict[str, str]]], n: int, max_chars: int, max_length: int,
                       tokenizer) -> list[dict[str, str]]:
    """First ``n`` pairs of ``source`` (:func:`preference_source`), texts cut to ``max_chars``, whose longer sequence
    fits ``max_length``."""
    from alignkit.config import DataConfig
    from alignkit.data.tokenize import tokenize_preference

    data_cfg = DataConfig(train="x", max_length=10**6)
    out = []
    name, pairs = source
    for r in pairs:
        rec = {"prompt": cut(r["prompt"], max_chars), "chosen": cut(r["chosen"], max_chars),
               "rejected": cut(r["rejected"], max_chars)}
        if rec["chosen"] == rec["rejected"]:
            continue
        (ex,), _ = tokenize_preference([{**rec, "prompt": [{"role": "user", "content": rec["prompt"]}]}],
                                       tokenizer, data_cfg)
        if max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) <= max_length:
            out.append(rec)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} {name} pairs fit max_length={max_length} with max_chars={max_chars}; need {n}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def epoch_order(n: int, batch_size: int, seed: int) -> list[int]:
    """alignkit's epoch-0 example order (micro-batches of ``batch_size``, concatenated)."""
    from alignkit.train.loop import epoch_batches

    return [i for batch in epoch_batches(n, batch_size, seed, 0) for i in batch]


# ================================================================================================ workers
def alignkit_config(job: str, spec: dict, run_dir: Path):
    from alignkit import config as AC

    model = C.alignkit_model_config(spec)
    data = AC.DataConfig(train=spec["data"][job], max_length=spec["max_length"], eval_fraction=0.0)
    train = AC.TrainConfig(
        output_dir=str(run_dir), seed=spec["seed"], lr=spec["lr"], weight_decay=0.0, adam_betas=(0.9, 0.999),
        max_steps=spec["steps"], batch_size=spec["batch_size"], grad_accum=spec["grad_accum"], max_grad_norm=1.0,
        scheduler="constant", warmup_steps=0, mixed_precision=spec.get("mixed_precision", "no"), eval_every=0,
        save_every=0, log_every=1, save_model=False, cpu=True, optimizer=spec.get("optimizer", "adamw"),
        padding_free=bool(spec.get("padding_free")) and job != "rm",  # the RM loop has no padding-free path
    )
    if job == "sft":
        return AC.SFTConfig(model=model, data=data, train=train)
    if job == "rm":
        return AC.RMConfig(model=model, data=data, train=train, rm=AC.RMSection(group_by_prompt=False))
    return AC.DPOConfig(model=model, data=data, train=train,
                        dpo=AC.DPOSection(loss="dpo", beta=0.1, precompute_ref_logps=True))


def token_count(job: str, examples: list[dict]) -> int:
    """Non-pad tokens one epoch processes: SFT one sequence per example, RM/DPO chosen + rejected."""
    if job == "sft":
        return sum(len(e["input_ids"]) for e in examples)
    return sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)


def instrument_alignkit(module, marks: dict) -> None:
    """Record (wall, process CPU) clocks at the first ``step_fn`` call and at the final checkpoint save,
    and the wall clock at the first micro-batch of every optimizer step.

    The loop span is first step -> end of the last optimizer step (the loop's final ``save_checkpoint``
    follows it immediately), the same span the TRL callback measures. Timing only: nothing else changes.
    """
    import alignkit.train.loop as loop

    original_save, original_loop = loop.save_checkpoint, module.train_loop

    def save_marked(*a, **kw):
        marks.setdefault("loop_end", (time.perf_counter(), time.process_time()))
        return original_save(*a, **kw)

    def loop_marked(cfg, *, step_fn, **kw):
        calls = []

        def step_marked(model, batch):
            now = time.perf_counter()
            marks.setdefault("loop_start", (now, time.process_time()))
            if len(calls) % cfg.grad_accum == 0:  # first micro-batch of an optimizer step
                marks.setdefault("step_starts", []).append(now)
            calls.append(now)
            return step_fn(model, batch)

        return original_loop(cfg, step_fn=step_marked, **kw)

    loop.save_checkpoint = save_marked
    module.train_loop = loop_marked


def step_spans(starts: list[float], end: float) -> list[float]:
    """Seconds of each optimizer step: from its start to the next step's start (the last: to ``end``),
    so logging and fetching the next batch count in the step they follow, in both frameworks."""
    return [b - a for a, b in zip(starts, [*starts[1:], end])]


def alignkit_worker(job: str, spec: dict, t_start: float) -> dict[str, Any]:
    import importlib

    from alignkit.data.pipeline import prepare_data
    from alignkit.models.loading import load_tokenizer
    from alignkit.train.logging import read_metrics

    module = importlib.import_module({"sft": "alignkit.algorithms.sft", "rm": "alignkit.algorithms.reward_model",
                                      "dpo": "alignkit.algorithms.dpo"}[job])
    marks: dict[str, tuple[float, float]] = {}
    instrument_alignkit(module, marks)
    run_dir = Path(spec["workdir"]) / f"alignkit-{job}-{spec['repeat']}"
    cfg = alignkit_config(job, spec, run_dir)
    rss_import = C.peak_rss_mb()
    load_before = C.load_average()
    t0 = time.perf_counter()
    summary = module.train(cfg)
    train_call_s = time.perf_counter() - t0
    load_after = C.load_average()
    peak = C.peak_rss_mb()
    examples = prepare_data(cfg.data, KIND[job], load_tokenizer(cfg.model.name_or_path), cfg.train.seed,
                            lambda *_: None).train
    tokens = token_count(job, examples)
    loop_s = marks["loop_end"][0] - marks["loop_start"][0]
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return {
        "n_examples": len(examples), "tokens": tokens, "steps": summary["global_step"],
        "loop_s": loop_s, "loop_cpu_s": marks["loop_end"][1] - marks["loop_start"][1],
        "step_s": step_spans(marks["step_starts"], marks["loop_end"][0]),
        "train_call_s": train_call_s, "outside_loop_s": train_call_s - loop_s,
        "framework_reported": {"wall_time_s": summary["wall_time_s"], "tokens_per_s": summary["tokens_per_s"],
                               "step_clock_s": tokens / summary["tokens_per_s"]},
        "losses": losses, "final_loss": losses[-1] if losses else None,
        "peak_rss_mb": peak, "rss_after_import_mb": rss_import,
        "load_average_before": load_before, "load_average_after": load_after,
        "worker_total_s": time.perf_counter() - t_start,
    }


def trl_dataset(job: str, spec: dict, tokenizer):
    """The job's records as TRL takes them, in alignkit's epoch order."""
    from datasets import Dataset

    from alignkit.config import DataConfig
    from alignkit.data.pipeline import prepare_data

    data_cfg = DataConfig(train=spec["data"][job], max_length=spec["max_length"], eval_fraction=0.0)
    examples = prepare_data(data_cfg, KIND[job], tokenizer, spec["seed"], lambda *_: None).train
    order = epoch_order(len(examples), spec["batch_size"], spec["seed"])
    if job == "sft":
        rows = [{"input_ids": examples[i]["input_ids"], "completion_mask": examples[i]["response_mask"]} for i in order]
    elif job == "rm":
        rows = [{"chosen_ids": examples[i]["chosen_input_ids"], "rejected_ids": examples[i]["rejected_input_ids"]}
                for i in order]
    else:
        raw = [json.loads(line) for line in Path(spec["data"][job]).read_text(encoding="utf-8").splitlines()]
        rows = [{"prompt": examples[i]["prompt_text"], "chosen": raw[i]["chosen"], "rejected": raw[i]["rejected"]}
                for i in order]
    return Dataset.from_list(rows), token_count(job, examples)


def trl_token_count(job: str, dataset) -> int:
    """Non-pad tokens in TRL's prepared training dataset (after its own tokenisation for DPO)."""
    if job == "sft":
        return sum(len(x) for x in dataset["input_ids"])
    if job == "rm":
        return sum(len(c) + len(r) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"]))
    return sum(2 * len(p) + len(c) + len(r)
               for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))


def trl_worker(job: str, spec: dict, t_start: float) -> dict[str, Any]:
    from transformers import TrainerCallback
    from transformers.trainer_utils import set_seed

    import trl
    from alignkit.models.loading import load_policy, load_reward_model, load_tokenizer

    class StepTimer(TrainerCallback):
        """Loop span = first ``on_step_begin`` (after the first batch is fetched, before its forward) ->
        last ``on_step_end`` (after the last optimizer step), in wall and process-CPU seconds; plus
        the start of every step."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.first: tuple[float, float] | None = None
            self.last: tuple[float, float] | None = None

        def on_step_begin(self, args, state, control, **kw):
            self.starts.append(time.perf_counter())
            if self.first is None:
                self.first = (self.starts[0], time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.last = (time.perf_counter(), time.process_time())

    rss_import = C.peak_rss_mb()
    load_before = C.load_average()
    t_setup = time.perf_counter()
    tokenizer = load_tokenizer(C.EMBEDDED_MODEL)
    dataset, alignkit_tokens = trl_dataset(job, spec, tokenizer)
    # Same initial weights as alignkit: its loaders after the same seed (the RM head is drawn from it).
    set_seed(spec["seed"])
    model_cfg = C.alignkit_model_config(spec)  # LoRA (spec["lora"]) applied by the loader: the same adapters
    model = (load_reward_model if job == "rm" else load_policy)(model_cfg, tokenizer)
    common = dict(
        output_dir=str(Path(spec["workdir"]) / f"trl-{job}-{spec['repeat']}"), max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim=spec["trl_optim"],
        seed=spec["seed"], logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
        bf16=bool(spec.get("trl_bf16")), fp16=False, gradient_checkpointing=False, use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential", disable_tqdm=True, max_length=spec["max_length"],
    )
    timer = StepTimer()
    if job == "sft":
        padding_free = bool(spec.get("trl_padding_free"))
        # padding-free without packing refuses a max_length; alignkit's tokenisation already fits it
        args = trl.SFTConfig(**{**common, "max_length": None if padding_free else spec["max_length"]},
                             completion_only_loss=True, packing=False, padding_free=padding_free)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[timer])
    elif job == "rm":
        args = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                    callbacks=[timer])
    else:
        args = trl.DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[timer])
    setup_s = time.perf_counter() - t_setup
    tokens = trl_token_count(job, trainer.train_dataset)
    t0 = time.perf_counter()
    output = trainer.train()
    train_call_s = time.perf_counter() - t0
    load_after = C.load_average()
    peak = C.peak_rss_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    loop_s = timer.last[0] - timer.first[0]
    return {
        "n_examples": len(trainer.train_dataset), "tokens": tokens, "tokens_alignkit_tokenisation": alignkit_tokens,
        "steps": trainer.state.global_step, "loop_s": loop_s, "loop_cpu_s": timer.last[1] - timer.first[1],
        "step_s": step_spans(timer.starts, timer.last[0]),
        "train_call_s": train_call_s, "outside_loop_s": setup_s + train_call_s - loop_s, "setup_s": setup_s,
        "framework_reported": {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))},
        "losses": losses, "final_loss": losses[-1] if losses else None,
        "peak_rss_mb": peak, "rss_after_import_mb": rss_import,
        "load_average_before": load_before, "load_average_after": load_after,
        "worker_total_s": time.perf_counter() - t_start,
    }


def worker_main(args: argparse.Namespace, t_start: float) -> int:
    spec = {**json.loads(args.spec.read_text(encoding="utf-8")), "repeat": args.repeat}
    fn = alignkit_worker if args.worker == "alignkit" else trl_worker
    threads = C.set_threads(spec.get("threads"), allocator=args.worker != "trl")
    try:
        result = fn(args.job, spec, t_start)
        result["threads"] = threads
    except Exception as e:  # noqa: BLE001 - recorded verbatim in the results
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    result.update(framework=args.worker, job=args.job)
    C.write_json(args.worker_out, result)
    return 0 if "error" not in result else 1


# ================================================================================================ parent
def derived(result: dict, n_params: int, peak_gflops: float) -> dict[str, Any]:
    """tokens/s and achieved model FLOP/s (6 N D / loop time) as a fraction of the matmul peak."""
    if "error" in result or not result.get("loop_s"):
        return {}
    gflops = C.training_flops(n_params, result["tokens"]) / result["loop_s"] / 1e9
    return {"tokens_per_s": result["tokens"] / result["loop_s"], "model_gflops": gflops,
            "fraction_of_peak": gflops / peak_gflops, "matmul_params": n_params}


def aggregate(runs: list[dict]) -> dict[str, Any]:
    """One row per (job, framework) from its repeats.

    The CPU is shared with other users, so single steps are slowed at random. Both frameworks see the
    same batches in the same order, so step k is the same work in every run: ``loop_s`` is the sum over
    steps of the fastest repeat of that step (with one repeat: the run's loop). Also kept: each run's
    loop, their median, and the largest peak RSS.
    """
    import statistics

    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[-1])
    best = dict(min(ok, key=lambda r: r["loop_s"]))
    per_step = [min(steps) for steps in zip(*(r["step_s"] for r in ok))]
    best.update(
        loop_s=sum(per_step), step_s_min=per_step, loop_s_runs=[r["loop_s"] for r in ok],
        loop_s_median=statistics.median(r["loop_s"] for r in ok),
        loop_cpu_s_median=statistics.median(r["loop_cpu_s"] for r in ok),
        peak_rss_mb=max(r["peak_rss_mb"] for r in ok), repeats_ok=len(ok),
    )
    return best


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def summary_tables(best: dict[str, dict[str, dict]], peak: dict) -> str:
    def g(job: str, fw: str, key: str):
        return best.get(job, {}).get(fw, {}).get(key)

    main_rows, time_rows, flop_rows = [], [], []
    for job in best:
        a, t = g(job, "alignkit", "loop_s"), g(job, "trl", "loop_s")
        main_rows.append([
            job, a, t, C.ratio(t, a), g(job, "alignkit", "tokens_per_s"), g(job, "trl", "tokens_per_s"),
            g(job, "alignkit", "peak_rss_mb"), g(job, "trl", "peak_rss_mb"),
            g(job, "alignkit", "final_loss"), g(job, "trl", "final_loss"),
        ])
        am, tm = g(job, "alignkit", "loop_s_median"), g(job, "trl", "loop_s_median")
        ac, tc = g(job, "alignkit", "loop_cpu_s_median"), g(job, "trl", "loop_cpu_s_median")
        time_rows.append([
            job, g(job, "alignkit", "tokens"), g(job, "trl", "tokens"), am, tm, C.ratio(tm, am), ac, tc,
            C.ratio(tc, ac),
            g(job, "alignkit", "outside_loop_s"), g(job, "trl", "outside_loop_s"),
            g(job, "alignkit", "process_wall_s"), g(job, "trl", "process_wall_s"),
        ])
        flop_rows.append([
            job, g(job, "alignkit", "matmul_params"), g(job, "alignkit", "model_gflops"),
            _pct(g(job, "alignkit", "fraction_of_peak")), g(job, "trl", "model_gflops"),
            _pct(g(job, "trl", "fraction_of_peak")),
        ])
    parts = [
        C.markdown_table(["job", "alignkit s", "TRL s", "ratio TRL/alignkit", "alignkit tok/s", "TRL tok/s",
                          "alignkit peak RSS MiB", "TRL peak RSS MiB", "alignkit final loss", "TRL final loss"],
                         main_rows),
        "",
        C.markdown_table(["job", "alignkit tokens", "TRL tokens", "alignkit median loop s", "TRL median loop s",
                          "ratio", "alignkit median CPU s", "TRL median CPU s", "CPU ratio",
                          "alignkit outside-loop s", "TRL outside-loop s", "alignkit process s", "TRL process s"],
                         time_rows),
        "",
        f"matmul peak: {peak['peak_gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f}; fp32 "
        f"{peak['n']}x{peak['n']}, {peak['threads']} threads)",
        "",
        C.markdown_table(["job", "matmul params N", "alignkit GFLOP/s (6ND/t)", "alignkit % of peak",
                          "TRL GFLOP/s", "TRL % of peak"], flop_rows),
    ]
    errors = [f"- {job}/{fw}: {r['error']}" for job, fws in best.items() for fw, r in fws.items() if "error" in r]
    if errors:
        parts += ["", "errors:", *errors]
    return "\n".join(parts)


def prepare_inputs(args: argparse.Namespace, jobs: list[str], workdir: Path) -> dict[str, Any]:
    """Write each job's JSONL and the spec the workers read; returns the spec."""
    from alignkit.models.loading import load_tokenizer

    n = args.steps * args.batch_size * args.grad_accum
    tokenizer = load_tokenizer(C.EMBEDDED_MODEL)
    data: dict[str, str] = {}
    source = preference_source() if any(j != "sft" for j in jobs) else None
    for job in jobs:
        rows = sft_records(n) if job == "sft" else preference_records(source, n, args.max_chars, args.max_length,
                                                                      tokenizer)
        path = workdir / f"{job}.jsonl"
        write_jsonl(path, rows)
        data[job] = str(path)
    return {"layers": args.layers, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "max_length": args.max_length, "lr": args.lr, "seed": args.seed, "trl_optim": args.trl_optim,
            "workdir": str(workdir), "data": data, "n_examples": n, "threads": args.threads,
            "preference_data": source and source[0]}


def run_job(job: str, frameworks: list[str], repeats: int, spec_path: Path, workdir: Path, timeout: float,
            threads: int | None, tag: str = "") -> dict[str, list[dict]]:
    """``repeats`` worker runs of ``job`` per framework, alternating which framework goes first; each run's
    result dict (see the workers), keyed by framework. ``tag`` prefixes the progress lines (bench.py: model/setting)."""
    runs: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    for rep in range(repeats):
        for fw in (frameworks if rep % 2 == 0 else frameworks[::-1]):
            out = workdir / f"result-{fw}-{job}-{rep}.json"
            print(f"[{time.strftime('%H:%M:%S')}] {tag}{job} / {fw} (repeat {rep}) ...", flush=True)
            r = C.run_worker([__file__, "--worker", fw, "--job", job, "--repeat", str(rep), "--spec",
                              str(spec_path), "--worker-out", str(out)],
                             out, workdir / f"log-{fw}-{job}-{rep}.txt", timeout, threads)
            runs[fw].append(r)
            status = r["error"].splitlines()[-1] if "error" in r else (
                f"loop {r['loop_s']:.1f} s (CPU {r['loop_cpu_s']:.1f} s), {r['tokens'] / r['loop_s']:.0f} tok/s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MiB, final loss {r['final_loss']:.4f}, "
                f"load {r['load_average_before'][0]:.1f}")
            print(f"    {status}", flush=True)
    return runs


def parent_main(args: argparse.Namespace) -> int:
    jobs = [j for j in args.jobs.split(",") if j]
    frameworks = [f for f in args.frameworks.split(",") if f]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="alignkit-bench-offline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    machine = C.machine_info()  # before the runs: alignkit_git is the code the workers import
    spec = prepare_inputs(args, jobs, workdir)
    spec_path = workdir / "spec.json"
    C.write_json(spec_path, spec)
    print(f"workdir {workdir}; {spec['n_examples']} records per job; measuring the matmul peak...", flush=True)
    C.set_threads(args.threads)
    peak = C.matmul_peak_gflops(seconds=args.matmul_seconds)
    print(f"matmul peak {peak['peak_gflops']:.1f} GFLOP/s", flush=True)

    config = C.truncated_config(args.layers)
    runs = {job: run_job(job, frameworks, args.repeats, spec_path, workdir, args.timeout, args.threads)
            for job in jobs}

    best: dict[str, dict[str, dict]] = {}
    for job, fws in runs.items():
        n_params = C.matmul_params(config, lm_head=job != "rm")
        for fw, rs in fws.items():
            row = aggregate(rs)
            row.update(derived(row, n_params, peak["peak_gflops"]))
            best.setdefault(job, {})[fw] = row
    tables = summary_tables(best, peak)
    print("\n" + tables)
    out_path = args.out or C.results_path("offline")
    C.write_json(out_path, {"command": C.command_line(), "spec": spec, "repeats": args.repeats,
                            "machine": machine, "alignkit_git_at_end": C.git_revision(), "matmul_peak": peak,
                            "best": best, "runs": runs, "tables_markdown": tables})
    print(f"\nresults: {out_path}")
    return 0


def main() -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args()
    if args.worker:
        return worker_main(args, t_start)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
