"""The human spot-check: how often a judge agrees with human preference labels (Bai et al. 2022 and the seeds
recommend checking AI labels against human ones before training on them).

Each pair ``(prompt, chosen, rejected)`` is judged in both orders (:meth:`Judge.compare` with A = chosen), so
position bias cancels in ``p_a`` and is measured on the side:

- ``agreement``: fraction of pairs with ``p_a > 0.5`` (the debiased verdict picks the human's choice); an exact
  tie (``p_a = 0.5``) counts one half, as a coin flip would;
- ``agreement_chosen_first`` / ``agreement_chosen_second``: the same from one order alone (``p_ab``, ``p_ba``):
  a large gap between them is position bias;
- ``mean_p_chosen``: the soft agreement, mean ``p_a``;
- ``position_bias_rate``: fraction of pairs whose verdict flips with the order; ``first_position_preference``:
  mean P(the first-shown wins) over both orders (0.5 = none);
- the same agreement per ``category`` (e.g. HHH's harmless / helpful / honest / other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from alignkit.judges.base import Comparison, Judge


def agreement_rate(p: np.ndarray) -> float:
    """Fraction of ``p > 0.5`` plus half the fraction of exact ties: [0.9, 0.2, 0.5, 0.7] -> (2 + 0.5) / 4 = 0.625."""
    p = np.asarray(p, dtype=np.float64)
    if not len(p):
        return float("nan")
    return float(np.mean(p > 0.5) + 0.5 * np.mean(p == 0.5))


def summarise_agreement(comp: Comparison, categories: Sequence[str]) -> dict:
    """Agreement with the human label (A = chosen) overall and per category, plus position-bias numbers."""
    summary = {
        "pairs": int(len(comp.p_a)),
        "agreement": agreement_rate(comp.p_a),
        "agreement_chosen_first": agreement_rate(comp.p_ab),
        "agreement_chosen_second": agreement_rate(comp.p_ba),
        "mean_p_chosen": float(np.mean(comp.p_a)) if len(comp.p_a) else float("nan"),
        "position_bias_rate": comp.position_bias_rate,
        "first_position_preference": comp.first_position_preference,
        "by_category": {},
    }
    cats = np.asarray(list(categories), dtype=object)
    for cat in sorted(set(categories)):
        sel = cats == cat
        summary["by_category"][cat] = {"pairs": int(sel.sum()), "agreement": agreement_rate(comp.p_a[sel]),
                                       "position_bias_rate": float(comp.flipped[sel].mean())}
    return summary


def judge_pairs(judge: Judge, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                principle: str | None = None, chunk: int = 16,
                progress: Callable[[int, int], None] | None = None) -> Comparison:
    """``judge.compare(prompts, chosen, rejected)`` in chunks (``progress(done, total)`` after each), joined."""
    parts, total = [], len(prompts)
    for start in range(0, total, chunk):
        sl = slice(start, start + chunk)
        parts.append(judge.compare(prompts[sl], chosen[sl], rejected[sl], principle))
        if progress is not None:
            progress(min(start + chunk, total), total)
    usage: dict[str, float] = {}
    for part in parts:
        for k, v in part.usage.items():
            usage[k] = usage.get(k, 0.0) + v
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0)  # noqa: E731
    return Comparison(p_a=cat("p_a"), p_ab=cat("p_ab"), p_ba=cat("p_ba"), usage=usage)
