"""RL-CAI: reinforcement learning from AI feedback (Bai et al. 2022, arXiv 2212.08073, sec. 4).

For each prompt x (a mix of red-team and helpfulness prompts):

    y_A, y_B ~ pi_SL(. | x)                                   two samples of the SL-CAI model
    c ~ Uniform(judging principles)                            seeded per prompt
    p = ½ (P(A | A, B) + 1 − P(first | B, A))                  the judge in both orders (alignkit.judges)

The soft label p trains a preference model with the soft Bradley–Terry loss
``-[p log sigma(r_A - r_B) + (1 - p) log sigma(r_B - r_A)]`` (:func:`alignkit.losses.soft_bradley_terry_loss`),
and then comes RL: PPO against that model (the paper) or DPO on the judged pairs (chosen = the judge's pick).
This module holds the data flow (sampling, judging, the records); the training runs are the ordinary reward-model,
PPO and DPO runs (``alignkit.pipelines.cai``).
"""

from __future__ import annotations

import random

from alignkit.data.constitution import Constitution
from alignkit.ops.seeds import derive_seed
from alignkit.rollout.engine import SamplingParams


def mix_prompts(harmful: list[dict], helpful: list[dict], n: int, helpful_fraction: float, seed: int) -> list[dict]:
    """``n`` prompts ``{"prompt", "category", "kind"}``: ``round(helpful_fraction * n)`` helpfulness prompts, the rest
    red-team prompts, each set shuffled with ``seed`` (fewer when a set runs out)."""
    rng = random.Random(seed)
    n_help = round(helpful_fraction * n)
    harm, help_ = list(harmful), list(helpful)
    rng.shuffle(harm)
    rng.shuffle(help_)
    rows = [{**r, "kind": "harmful"} for r in harm[:n - n_help]] + [{**r, "kind": "helpful"} for r in help_[:n_help]]
    rng.shuffle(rows)
    return rows


def sample_judging_principles(constitution: Constitution, n: int, seed: int) -> list[str]:
    """One pairwise principle per comparison; comparison i's draw depends only on (seed, i)."""
    return [random.Random(derive_seed(seed, i)).choice(constitution.judging_principles) for i in range(n)]


def judged_pairs(generate, judge, prompts: list[dict], constitution: Constitution, params: SamplingParams,
                 seed: int) -> tuple[list[dict], dict]:
    """Two samples per prompt, judged under a sampled principle in both orders. Returns the records ``{"prompt",
    "kind", "category", "principle", "response_a", "response_b", "p_a", "p_ab", "p_ba"}`` (prompts whose two
    samples are identical or empty are dropped: nothing to compare) and stats (position-bias rate, usage)."""
    texts = [r["prompt"] for r in prompts]
    conv = [[{"role": "user", "content": t}] for t in texts]
    a = generate(conv, params, [derive_seed(seed, i, 0) for i in range(len(texts))])
    b = generate(conv, params, [derive_seed(seed, i, 1) for i in range(len(texts))])
    keep = [i for i in range(len(texts)) if a[i].strip() and b[i].strip() and a[i] != b[i]]
    principles = sample_judging_principles(constitution, len(texts), seed)
    stats = {"n_prompts": len(texts), "n_dropped_identical_or_empty": len(texts) - len(keep)}
    if not keep:
        return [], {**stats, "n_pairs": 0}
    cmp = judge.compare([texts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep],
                        [principles[i] for i in keep])
    rows = []
    for j, i in enumerate(keep):
        rows.append({"prompt": texts[i], "kind": prompts[i].get("kind"), "category": prompts[i].get("category"),
                     "principle": principles[i], "response_a": a[i], "response_b": b[i], "p_a": float(cmp.p_a[j]),
                     "p_ab": float(cmp.p_ab[j]), "p_ba": float(cmp.p_ba[j])})
    stats.update(n_pairs=len(rows), position_bias_rate=cmp.position_bias_rate,
                 first_position_preference=cmp.first_position_preference,
                 mean_confidence=float(sum(abs(r["p_a"] - 0.5) for r in rows) / len(rows) + 0.5), usage=cmp.usage)
    return rows, stats


def soft_preference_record(row: dict) -> dict:
    """A judged pair -> a preference record: chosen = the judge's pick, ``label_prob`` = P(chosen better) >= 0.5
    (the reward model's soft Bradley–Terry target)."""
    a_wins = row["p_a"] >= 0.5
    return {"prompt": row["prompt"], "chosen": row["response_a"] if a_wins else row["response_b"],
            "rejected": row["response_b"] if a_wins else row["response_a"],
            "label_prob": row["p_a"] if a_wins else 1.0 - row["p_a"], "kind": row["kind"]}


def dpo_records(rows: list[dict]) -> list[dict]:
    """DPO pairs from the judged pairs: chosen = the judge's pick; exact ties (p = 0.5) carry no preference and are
    dropped."""
    return [{k: v for k, v in soft_preference_record(r).items() if k != "label_prob"} for r in rows if r["p_a"] != 0.5]
