"""Rejection-sampling fine-tuning: best-of-n samples of the current policy become its SFT data, iterated.

Touvron et al. (2023), Llama 2, sec. 3.2.3 ("Rejection Sampling fine-tuning"); Dong et al. (2023), RAFT;
Gulcehre et al. (2023), ReST. Each round:

1. draw ``rs.prompts_per_round`` prompts (all of them when unset) in a seeded, resumable order;
2. sample ``rs.n`` completions per prompt from the CURRENT policy and score them with ``reward``;
3. keep the best completion of each prompt, y* = argmax_j r(x, y_j) (first on ties; the sampled tokens
   themselves, EOS included, so nothing is re-tokenised);
4. fine-tune on the (x, y*) pairs with the SFT loss L = -(1/|y*|) sum_t log pi(y*_t | x, y*_<t)
   (``train.steps.sft_step``, the step of ``alignkit sft``) for ``train.epochs`` passes (or ``train.max_steps``
   steps) per round.

The round's picks are written to ``rounds/round-XXX.jsonl``. Logged per round: ``scores/best`` (mean score of the
round's training data) vs. ``objective/scores`` (mean of all samples, i.e. best-of-1), their gap, ``loss``
(SFT), ``nll/token``, response lengths. Checkpoints (one per round) and exact resume are ``online.OnlineRun``'s.
"""

from __future__ import annotations

import json
from functools import partial

import torch

from alignkit.config import RejectionSamplingConfig
from alignkit.data.collate import collate_sft
from alignkit.eval.bon import best_indices
from alignkit.io_utils import atomic_write_text
from alignkit.online.rollout import ScoredRollout
from alignkit.online.run import OnlineRun
from alignkit.ops.seeds import derive_seed
from alignkit.train.steps import sft_step


def best_examples(batch: ScoredRollout, n: int) -> tuple[list[dict], torch.Tensor]:
    """SFT examples ``{"input_ids", "response_mask", "prompt", "completion", "score", "all_scores"}`` of each
    prompt's best sample (by ``batch.rewards``), and the picks [P]."""
    rollout, scores = batch.rollout, batch.rewards.view(-1, n)  # [P, n]
    best = best_indices(scores)  # [P]
    examples = []
    for i, j in enumerate(best.tolist()):
        b = i * n + j
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
        response = rollout.response_ids[b][rollout.response_mask[b].bool()].tolist()  # EOS included
        examples.append({"input_ids": prompt + response, "response_mask": [0] * len(prompt) + [1] * len(response),
                         "prompt": rollout.prompt_texts[b], "completion": rollout.response_texts[b],
                         "score": float(scores[i, j]), "all_scores": scores[i].tolist()})
    return examples, best


def train(cfg: RejectionSamplingConfig, resume: bool = False) -> dict:
    rs, n, t = cfg.rs, cfg.rs.n, cfg.train

    def steps_per_round(n_train_prompts: int) -> int:
        return t.max_steps or t.epochs * -(-(rs.prompts_per_round or n_train_prompts) // (t.batch_size * t.grad_accum))

    run = OnlineRun.start(cfg, "rejection sampling", resume, reference=False,
                          total_steps=lambda n_train: rs.rounds * steps_per_round(n_train))
    n_prompts = rs.prompts_per_round or len(run.sampler.prompts)
    collate = partial(collate_sft, pad_token_id=run.tokenizer.pad_token_id)
    run.evaluate_before()
    for round_idx in run.iterations(rs.rounds):
        batch = run.sample(*run.next_prompts(n_prompts), num_samples=n)
        examples, best = best_examples(batch, n)
        keys = ("prompt", "completion", "score", "all_scores")
        picks = run.gather_objects([{k: e[k] for k in keys} for e in examples])  # every process's, in prompt order
        if run.is_main:
            path = run.run_dir / "rounds" / f"round-{round_idx:03d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in picks))
        stats = run.fit(examples, collate, sft_step, steps=steps_per_round(n_prompts), seed=derive_seed(cfg.train.seed, round_idx))
        scores, lengths = batch.rewards.view(-1, n), batch.rollout.response_lengths.float().cpu()  # [P, n], [P*n]
        best_scores = torch.tensor([e["score"] for e in examples])  # [P]
        stats.update({
            **{k: v for k, v in batch.stats().items() if k != "scores"},
            "scores/best": float(best_scores.mean()),
            "objective/scores": float(scores.mean()),
            "scores/best_minus_mean": float(best_scores.mean() - scores.mean()),
            "num_examples": len(examples),
            "response_length/best": float(lengths[torch.arange(scores.shape[0]) * n + best].mean()),
        })
        run.end_iteration(round_idx, stats, save_every=1, history=True)
    return run.finish({"rounds": rs.rounds, "n": n, "history": run.state.get("history", [])})
