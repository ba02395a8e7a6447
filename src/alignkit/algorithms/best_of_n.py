"""Best-of-n sampling: draw n completions per prompt from the policy, keep the one the reward scores highest.

Stiennon et al. (2020), Nakano et al. (2021), Gao et al. (2023). Best-of-n moves the policy away
from the base by exactly KL = log n - (n - 1) / n (no training), which makes it the yardstick for
reward over-optimisation: with a held-out ``bon.gold`` reward, the gold score of the picks vs. random
picks (and the unbiased estimator for every n' <= n) shows whether optimising the proxy helps.

Outputs in ``output_dir``:
- ``best_of_n.jsonl``: one line per prompt, ``{"prompt", "completion", "score", "all_scores"}``
  (+ ``"gold", "all_gold"`` with a gold reward), in prompt-file order;
- ``summary.json``: mean best score vs. mean sample score (= best-of-1), the analytic KL, and the
  gold comparison + over-optimisation curve when ``bon.gold`` is set.

Generation runs in chunks of ``generation.batch_size`` prompts through ``online.sample_and_score`` (the engine of
``generation.backend``); prompt i's samples are seeded by ``(seed, i)`` alone, so ``--resume`` skips the chunks
already written and the result equals an uninterrupted run, whatever the chunk size.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import gather_object
from torch import Tensor

from alignkit.config import BoNConfig, RewardSection
from alignkit.eval.bon import best_indices, bon_curve, bon_kl
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.online.rollout import sample_and_score
from alignkit.ops.seeds import derive_seed
from alignkit.rewards.combine import apply_missing_eos_penalty, build_reward
from alignkit.rollout.backends import make_backend
from alignkit.rollout.engine import GenerationBackend, SamplingParams
from alignkit.rollout.prompts import load_prompts
from alignkit.train.loop import check_launch, process_share
from alignkit.train.run import log, make_accelerator, prepare_run_dir, write_summary


def best_of_n(
    model,
    tokenizer,
    prompts: list[dict],
    n: int,
    params: SamplingParams,
    reward_fn: Callable,
    gold_fn: Callable | None = None,
    batch_size: int = 16,
    missing_eos_penalty: float | None = None,
    missing_eos_mode: str = "subtract",
    backend: GenerationBackend | None = None,
    prompt_seeds: list[int] | None = None,
) -> dict:
    """Best-of-n for ``prompts`` (dicts from :func:`alignkit.rollout.prompts.load_prompts`).

    Generates in chunks of ``batch_size`` prompts (``batch_size x n`` rows per ``generate()`` call).
    ``reward_fn``/``gold_fn``: a ``CombinedReward`` (``build_reward``). ``prompt_seeds`` [P]: per-prompt sampling
    seeds (None: torch's global generator). Returns ``{"picks": [per prompt: {"prompt", "completion", "score",
    "all_scores", "all_completions", "index", (+ "gold", "all_gold")}], "scores": [P, n], "gold_scores": [P, n] | None}``.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    if not prompts:
        raise ValueError("best_of_n got no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend = backend or make_backend_for(model, tokenizer)
    device = next(model.parameters()).device
    penalty = RewardSection(missing_eos_penalty=missing_eos_penalty, missing_eos_mode=missing_eos_mode)
    picks, all_scores, all_gold = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seeds = None if prompt_seeds is None else prompt_seeds[start : start + batch_size]
        scored = sample_and_score(backend, tokenizer, chunk, seeds, n, params, reward_fn, penalty, device)
        rollout = scored.rollout
        scores = scored.rewards.view(len(chunk), n)  # [p, n]
        gold = None
        if gold_fn is not None:
            gold_total, _ = gold_fn(rollout.prompt_texts, rollout.response_texts, rollout.extras)
            gold = apply_missing_eos_penalty(gold_total, rollout.has_eos.cpu(), missing_eos_penalty,
                                             missing_eos_mode).view(len(chunk), n)  # [p, n]
        best = best_indices(scores)  # [p]
        for i, p in enumerate(chunk):
            j = int(best[i])
            texts = rollout.response_texts[i * n : (i + 1) * n]
            pick = {"prompt": p["prompt_text"], "completion": texts[j], "score": float(scores[i, j]),
                    "all_scores": scores[i].tolist(), "all_completions": texts, "index": j}
            if gold is not None:
                pick["gold"] = float(gold[i, j])
                pick["all_gold"] = gold[i].tolist()
            picks.append(pick)
        all_scores.append(scores)
        if gold is not None:
            all_gold.append(gold)
    return {
        "picks": picks,
        "scores": torch.cat(all_scores, 0),  # [P, n]
        "gold_scores": torch.cat(all_gold, 0) if all_gold else None,  # [P, n]
    }


def make_backend_for(model, tokenizer, gen=None):
    from alignkit.config import GenerationSection

    return make_backend(gen or GenerationSection(), model, tokenizer)


def summarize(scores: Tensor, gold: Tensor | None, n: int, seed: int) -> dict:
    """Mean best vs. mean sample score, analytic KL; with gold: gold of picks vs. random picks + curve."""
    best = best_indices(scores)  # [P]
    rows = torch.arange(scores.shape[0])
    summary = {
        "n": n,
        "num_prompts": scores.shape[0],
        "kl": bon_kl(n),
        "mean_best_score": float(scores[rows, best].mean()),
        "mean_sample_score": float(scores.mean()),  # = best-of-1
    }
    if gold is not None:
        random_pick = torch.randint(0, n, (scores.shape[0],), generator=torch.Generator().manual_seed(seed))  # [P]
        summary["gold/best_of_n"] = float(gold[rows, best].mean())
        summary["gold/random"] = float(gold[rows, random_pick].mean())
        summary["gold/mean_sample"] = float(gold.mean())
        summary["curve"] = bon_curve(scores, gold)
    else:
        summary["curve"] = bon_curve(scores)
    return summary


# ---------------------------------------------------------------- resume bookkeeping
def _read_done(path: Path, chunk: int, total: int) -> list[dict]:
    """Records of the chunks fully written by an earlier run (a torn or partial last chunk is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    done = len(records) if len(records) >= total else (len(records) // chunk) * chunk
    return records[:done]


def _write_lines(path: Path, records: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def run(cfg: BoNConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.output_dir, resume, "bon")
    tokenizer = load_tokenizer(cfg.model.name_or_path, padding_side="left")
    prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "train", log)
    accelerator = make_accelerator()
    check_launch(accelerator)
    device, P, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    model = load_policy(cfg.model, tokenizer, trainable=False).to(device)
    backend = make_backend(cfg.generation, model, tokenizer)
    reward_models: dict = {}
    reward_fn = build_reward(cfg.reward, tokenizer, reward_models)
    gold_fn = build_reward(cfg.bon.gold, tokenizer, reward_models) if cfg.bon.gold is not None else None
    for scorer in reward_models.values():
        scorer.model.to(device)
    params = SamplingParams.from_section(cfg.generation)
    n, chunk = cfg.bon.n, cfg.generation.batch_size

    out_path = run_dir / cfg.bon.output_file
    records = _read_done(out_path, chunk, len(prompts)) if resume else []
    if accelerator.is_main_process:
        _write_lines(out_path, records, "w")
    if records:
        log(f"bon: resuming after {len(records)} of {len(prompts)} prompts already in {out_path}")
    t0 = time.time()
    for k in range(len(records) // chunk, (len(prompts) + chunk - 1) // chunk):
        # chunk k of the prompts, this process's share of it; prompt i is sampled with seed (seed, i) wherever it runs
        idx = process_share(list(range(k * chunk, min((k + 1) * chunk, len(prompts)))), P, rank)
        lines = []
        if idx:
            result = best_of_n(
                model, tokenizer, [prompts[i] for i in idx], n, params, reward_fn, gold_fn, batch_size=chunk,
                missing_eos_penalty=cfg.reward.missing_eos_penalty, missing_eos_mode=cfg.reward.missing_eos_mode,
                backend=backend, prompt_seeds=[derive_seed(cfg.seed, i) for i in idx],
            )
            for pick in result["picks"]:
                line = {key: pick[key] for key in ("prompt", "completion", "score", "all_scores")}
                if "gold" in pick:
                    line.update(gold=pick["gold"], all_gold=pick["all_gold"])
                lines.append(line)
        if P > 1:
            lines = [line for part in gather_object([lines]) for line in part]  # in process (= prompt) order
        if accelerator.is_main_process:
            _write_lines(out_path, lines, "a")
        records += lines
        best = sum(max(line["all_scores"]) for line in records) / len(records)
        log(f"bon: {len(records)}/{len(prompts)} prompts, mean best score {best:.4f}")

    scores = torch.tensor([r["all_scores"] for r in records], dtype=torch.float32)  # [P, n]
    gold = torch.tensor([r["all_gold"] for r in records], dtype=torch.float32) if gold_fn is not None else None
    summary = summarize(scores, gold, n, cfg.seed)
    summary.update(output_file=str(out_path), time_s=time.time() - t0, num_processes=P)
    if accelerator.is_main_process:
        write_summary(run_dir, summary)
    accelerator.wait_for_everyone()
    msg = f"bon done: best-of-{n} mean score {summary['mean_best_score']:.4f} vs samples {summary['mean_sample_score']:.4f}"
    if gold is not None:
        msg += f"; gold {summary['gold/best_of_n']:.4f} vs random {summary['gold/random']:.4f}"
    log(msg + f"; KL {summary['kl']:.4f} nats")
    return summary
