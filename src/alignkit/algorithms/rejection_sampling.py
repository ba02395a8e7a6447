"""Rejection-sampling fine-tuning: best-of-n samples of the current policy become its SFT data, iterated.

Touvron et al. (2023), Llama 2, sec. 3.2.3 ("Rejection Sampling fine-tuning"); Dong et al. (2023),
RAFT; Gulcehre et al. (2023), ReST. Each round:

1. draw ``rs.prompts_per_round`` prompts (all of them when unset) in a seeded, resumable order;
2. sample ``rs.n`` completions per prompt from the CURRENT policy and score them with ``reward``;
3. keep the best completion of each prompt, y* = argmax_j r(x, y_j) (the sampled tokens themselves,
   EOS included, so nothing is re-tokenised);
4. fine-tune on the (x, y*) pairs with the SFT loss  L = -(1/|y*|) sum_t log pi(y*_t | x, y*_<t)
   through the shared training loop; ``train.epochs`` / ``train.max_steps`` apply per round, with a
   fresh AdamW each round (as each Llama 2 round fine-tuned on its new samples).

Logged per round (``metrics.jsonl``, step = round): ``scores/best`` (mean score of the round's
training data) vs. ``objective/scores`` (mean score of all samples, i.e. best-of-1), their gap,
``loss/sft`` and the generation/scoring/training times. The round's SFT loop keeps its own
per-step log in ``rounds/round-XXX/`` next to ``data.jsonl`` (the chosen completions).

Resume: after each round its weights (trainable ones; LoRA adapters under LoRA), prompt order
and history are saved to ``checkpoints/round-XXXX``. A killed run resumes at the last COMPLETED
round: a round interrupted midway is redone from its beginning (its partial directory is removed).
Each round is seeded from (seed, round), so the resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config import RejectionSamplingConfig
from alignkit.data.collate import collate_sft
from alignkit.eval.bon import best_indices
from alignkit.losses import sft_loss
from alignkit.models.loading import load_policy, load_tokenizer, save_model
from alignkit.ops.logprobs import first_response_index, token_logprobs
from alignkit.rewards.combine import apply_missing_eos_penalty, build_reward
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts
from alignkit.rollout.prompts import PromptSampler, load_prompts, prompt_batch
from alignkit.train.checkpoint import atomic_save_dir, load_trainable_state_dict, trainable_state_dict
from alignkit.train.logging import MetricsLogger
from alignkit.train.loop import StepOutput, train_loop
from alignkit.train.run import log, prepare_run_dir, set_seed, write_summary

_ROUND_DIR = re.compile(r"^round-(\d{4,})$")


# ---------------------------------------------------------------- SFT step on the selected samples
def sft_step(model, batch: dict) -> StepOutput:
    logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                           first_index=first_response_index(batch["response_mask"]))  # [B, T]
    losses = sft_loss(logps, batch["response_mask"])  # [B]
    return StepOutput(loss=losses.mean(), num_tokens=int(batch["attention_mask"].sum()))


def best_examples(rollout: Rollout, scores: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """[P, n] scores -> SFT examples ``{"input_ids", "response_mask", ...}`` of each prompt's best sample, and best [P]."""
    n = scores.shape[1]
    best = best_indices(scores)  # [P]
    examples = []
    for i, j in enumerate(best.tolist()):
        b = i * n + j
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
        response = rollout.response_ids[b][rollout.response_mask[b].bool()].tolist()  # EOS included
        examples.append({
            "input_ids": prompt + response,
            "response_mask": [0] * len(prompt) + [1] * len(response),
            "prompt": rollout.prompt_texts[b],
            "completion": rollout.response_texts[b],
            "score": float(scores[i, j]),
            "all_scores": scores[i].tolist(),
        })
    return examples, best


def round_seed(seed: int, round_idx: int) -> int:
    return (seed * 1_000_003 + round_idx) % (2**63)


# ---------------------------------------------------------------- round checkpoints
def save_round(run_dir: Path, completed: int, model, state: dict, keep: int = 2) -> Path:
    """``checkpoints/round-XXXX``: trainable weights + state.json, written atomically; keeps the newest ``keep``."""
    root = run_dir / "checkpoints"
    final = root / f"round-{completed:04d}"

    def write(tmp: Path) -> None:
        save_file(trainable_state_dict(model), str(tmp / "weights.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps({"completed_rounds": completed, **state}), encoding="utf-8")

    atomic_save_dir(final, write)
    for old in list_rounds(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_rounds(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _ROUND_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(_ROUND_DIR.match(p.name).group(1)))


def load_round(path: Path, model) -> dict:
    load_trainable_state_dict(model, load_file(str(path / "weights.safetensors")), str(path))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- training
def train(cfg: RejectionSamplingConfig, resume: bool = False) -> dict:
    rs, tcfg = cfg.rs, cfg.train
    run_dir = prepare_run_dir(cfg, tcfg.output_dir, resume, "rejection sampling")
    set_seed(tcfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not tcfg.cpu else "cpu")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "train", log)
    sampler = PromptSampler(prompts, tcfg.seed)
    model = load_policy(cfg.model, tokenizer)
    reward_models: dict = {}
    reward_fn = build_reward(cfg.reward, tokenizer, reward_models)
    for scorer in reward_models.values():
        scorer.model.to(device)
    params = SamplingParams.from_section(cfg.generation)
    backend = HFGenerateBackend(model, tokenizer)
    pad, n = tokenizer.pad_token_id, rs.n
    n_prompts = rs.prompts_per_round or len(prompts)
    logger = MetricsLogger(run_dir)

    start_round, history = 0, []
    if resume:
        done = list_rounds(run_dir)
        if done:
            state = load_round(done[-1], model)
            start_round, history = state["completed_rounds"], state["history"]
            sampler.load_state_dict(state["sampler"])
            log(f"rejection sampling: resuming after round {start_round} from {done[-1]}")
        else:
            log(f"rejection sampling: --resume found no completed round in {run_dir}; starting at round 1")
    logger.truncate_after(start_round)

    for round_idx in range(start_round, rs.rounds):
        seed_r = round_seed(tcfg.seed, round_idx)
        set_seed(seed_r)  # the round does not depend on what ran before it
        round_dir = run_dir / "rounds" / f"round-{round_idx + 1:03d}"
        if round_dir.exists():  # left by a run killed during this round: redo the round from its start
            shutil.rmtree(round_dir)
        round_dir.mkdir(parents=True)
        model.to(device)

        # ---- 1-3. best-of-n with the current policy
        t0 = time.perf_counter()
        pb = prompt_batch(sampler.next(n_prompts), pad)
        rollout = generate_rollouts(
            backend, tokenizer, pb["input_ids"].to(device), pb["attention_mask"].to(device), params,
            num_samples=n, prompt_texts=pb["prompt_texts"], extras=pb["extras"],
            batch_size=cfg.generation.batch_size * n,  # generation.batch_size prompts per generate() call
        )
        t1 = time.perf_counter()
        total, parts = reward_fn(rollout.prompt_texts, rollout.response_texts, rollout.extras)
        scores = apply_missing_eos_penalty(total, rollout.has_eos.cpu(), cfg.reward.missing_eos_penalty,
                                           cfg.reward.missing_eos_mode).view(-1, n)  # [P, n]
        examples, best = best_examples(rollout, scores)
        t2 = time.perf_counter()
        with open(round_dir / "data.jsonl", "w", encoding="utf-8") as f:
            keys = ("prompt", "completion", "score", "all_scores")
            f.writelines(json.dumps({k: e[k] for k in keys}) + "\n" for e in examples)

        # ---- 4. SFT on the selected samples (a fresh optimizer each round)
        result = train_loop(
            tcfg.model_copy(update={"seed": seed_r}), model=model, train_examples=examples,
            collate_fn=partial(collate_sft, pad_token_id=pad), step_fn=sft_step, run_dir=round_dir,
            desc=f"rs round {round_idx + 1}",
        )
        shutil.rmtree(round_dir / "checkpoints", ignore_errors=True)  # the round checkpoint below replaces it
        t3 = time.perf_counter()

        best_scores = torch.tensor([e["score"] for e in examples])  # [P]
        lengths = rollout.response_lengths.float().cpu()  # [P * n]
        picked = torch.arange(scores.shape[0]) * n + best  # [P] rows of the picks
        stats = {
            "scores/best": float(best_scores.mean()),
            "objective/scores": float(scores.mean()),
            "scores/best_minus_mean": float(best_scores.mean() - scores.mean()),
            "loss/sft": float(result["train"].get("loss", float("nan"))),
            "sft/steps": result["global_step"],
            "num_examples": len(examples),
            "response_length": float(lengths.mean()),
            "response_length/best": float(lengths[picked].mean()),
            "no_eos_frac": float((~rollout.has_eos).float().mean()),
            "time/generation": t1 - t0,
            "time/scoring": t2 - t1,
            "time/training": t3 - t2,
            **{k: float(v.mean()) for k, v in parts.items()},
        }
        logger.log(stats, round_idx + 1)
        history.append({"round": round_idx + 1, **{k: v for k, v in stats.items() if not k.startswith("time/")}})
        log(f"rs round {round_idx + 1}/{rs.rounds}: best-of-{n} score {stats['scores/best']:.4f} vs sample mean "
            f"{stats['objective/scores']:.4f}; sft loss {stats['loss/sft']:.4f} over {len(examples)} examples")
        save_round(run_dir, round_idx + 1, model, {"sampler": sampler.state_dict(), "history": history})
    logger.close()

    summary = {"rounds": rs.rounds, "n": n, "history": history}
    if tcfg.save_model:
        summary["model_dir"] = str(save_model(model, tokenizer, run_dir / "model"))
    write_summary(run_dir, summary)
    log(f"rejection sampling done: {summary.get('model_dir', run_dir)}")
    return summary
