"""The judge interface: one pairwise comparison API for every kind of AI judge, position-debiased.

A judge answers "which of two responses to this prompt is better (under this principle)?" with a probability.
Language-model judges prefer whichever response they read first (or second) for reasons unrelated to quality,
so every comparison is asked in both orders and averaged (Bai et al. 2022, Constitutional AI; Zheng et al.
2023, "Judging LLM-as-a-judge")::

    p_A = ½ · ( P(first better | A, B)  +  1 − P(first better | B, A) )

A kind of judge implements only :meth:`Judge.prefer_first` — one order, a batch of items — and inherits the
averaging, the position-bias rate (how often the verdict flips when the order flips) and the chain-of-thought
clamp (CAI: labels from chain-of-thought answers are near 0/1 and over-confident; clamp them to [0.4, 0.6]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

COT_CLAMP = (0.4, 0.6)


@dataclass(frozen=True)
class Comparison:
    """Verdicts on N items. ``p_a[i]`` is the debiased probability that response A beats response B."""

    p_a: np.ndarray  # [N] ½·(p_ab + 1 − p_ba)
    p_ab: np.ndarray  # [N] P(A better) with A shown first
    p_ba: np.ndarray  # [N] P(A better) with A shown second (= 1 − P(first better | B, A))
    usage: dict[str, float] = field(default_factory=dict)  # tokens, requests, cache hits of this call

    @property
    def flipped(self) -> np.ndarray:
        """[N] bool: the preferred response changes with the order (a decisive verdict in one order, the other
        response or a tie in the other)."""
        return np.sign(self.p_ab - 0.5) != np.sign(self.p_ba - 0.5)

    @property
    def position_bias_rate(self) -> float:
        """Fraction of items whose verdict flips when the order is swapped (0 for a position-consistent judge)."""
        return float(self.flipped.mean()) if len(self.p_a) else 0.0

    @property
    def first_position_preference(self) -> float:
        """Mean P(the response shown first wins) over both orders: 0.5 for a judge without position bias."""
        if not len(self.p_a):
            return 0.5
        return float(np.mean(np.concatenate([self.p_ab, 1.0 - self.p_ba])))


def debias(p_first_ab: np.ndarray, p_first_ba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both orders -> (p_a, p_ab, p_ba). ``p_first_xy`` = P(the first shown is better) when x is shown first."""
    p_ab = np.asarray(p_first_ab, dtype=np.float64)
    p_ba = 1.0 - np.asarray(p_first_ba, dtype=np.float64)
    return 0.5 * (p_ab + p_ba), p_ab, p_ba


def clamp_cot(p: np.ndarray, bounds: tuple[float, float] = COT_CLAMP) -> np.ndarray:
    """CAI's clamp of chain-of-thought probabilities to [0.4, 0.6]."""
    return np.clip(p, *bounds)


def normalise_options(p_a_token: np.ndarray, p_b_token: np.ndarray) -> np.ndarray:
    """P("(A)"), P("(B)") (unnormalised, e.g. next-token probabilities) -> P(first better) = P_A / (P_A + P_B).
    Where both are 0 the judge has no opinion: 0.5."""
    p_a_token = np.asarray(p_a_token, dtype=np.float64)
    p_b_token = np.asarray(p_b_token, dtype=np.float64)
    total = p_a_token + p_b_token
    return np.where(total > 0, p_a_token / np.where(total > 0, total, 1.0), 0.5)


class Judge(ABC):
    """Pairwise judge. Subclasses implement :meth:`prefer_first`; callers use :meth:`compare`."""

    name: str = "judge"
    chain_of_thought: bool = False

    deterministic: bool = False
    """Asking again always gives the same answer (e.g. a local model read without sampling): self-consistency is
    then 1 by construction."""

    @abstractmethod
    def prefer_first(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                     principles: Sequence[str], sample: int = 0) -> np.ndarray:
        """[N] P(the response shown first is better than the one shown second), for one fixed order.

        ``sample`` = 0 asks as configured; ``sample`` = k >= 1 asks again as an independent draw (sampled at a
        temperature > 0, a distinct cache entry), which :func:`self_consistency` uses."""

    def usage(self) -> dict[str, float]:
        """Cumulative token / request accounting since construction (remote judges override)."""
        return {}

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                principles: Sequence[str] | str | None = None, sample: int = 0) -> Comparison:
        """Judge A against B on N items in both orders and average them (position debiasing). ``sample`` >= 1:
        an independent re-draw (see :meth:`prefer_first`)."""
        n = len(prompts)
        if not (len(a) == len(b) == n):
            raise ValueError(f"judge {self.name}: {n} prompts but {len(a)} A and {len(b)} B responses")
        if principles is None or isinstance(principles, str):
            principles = [principles or DEFAULT_PRINCIPLE] * n
        elif len(principles) != n:
            raise ValueError(f"judge {self.name}: {n} prompts but {len(principles)} principles")
        before = self.usage()
        p_ab = np.asarray(self.prefer_first(prompts, a, b, principles, sample=sample), dtype=np.float64)
        p_ba = np.asarray(self.prefer_first(prompts, b, a, principles, sample=sample), dtype=np.float64)
        for side in (p_ab, p_ba):
            if side.shape != (n,) or not np.all(np.isfinite(side)) or side.min(initial=0.5) < 0 or side.max(initial=0.5) > 1:
                raise ValueError(f"judge {self.name}: prefer_first must return {n} probabilities in [0, 1]")
        if self.chain_of_thought:
            p_ab, p_ba = clamp_cot(p_ab), clamp_cot(p_ba)
        p_a, p_ab, p_ba = debias(p_ab, p_ba)
        after = self.usage()
        return Comparison(p_a=p_a, p_ab=p_ab, p_ba=p_ba,
                          usage={k: after[k] - before.get(k, 0.0) for k in after})


DEFAULT_PRINCIPLE = "Which response is more helpful, honest and harmless?"


class CallableJudge(Judge):
    """Wraps ``fn(prompts, first, second, principles) -> [N] P(first better)`` (a Python callable)."""

    def __init__(self, fn, name: str = "callable", chain_of_thought: bool = False):
        self.fn, self.name, self.chain_of_thought = fn, name, chain_of_thought

    def prefer_first(self, prompts, first, second, principles, sample: int = 0) -> np.ndarray:
        return np.asarray(self.fn(list(prompts), list(first), list(second), list(principles)), dtype=np.float64)


def verdicts(p: np.ndarray) -> np.ndarray:
    """[N] probabilities -> [N] verdicts: +1 (A preferred), -1 (B preferred), 0 (tie at exactly 0.5)."""
    return np.sign(np.asarray(p, dtype=np.float64) - 0.5).astype(np.int64)


def consistency_of(draws: Sequence[np.ndarray]) -> dict[str, float]:
    """Agreement between R >= 2 repeated judgments of the same N items (each [N] debiased P(A better)).

    ``agreement``: over items and all R·(R-1)/2 pairs of draws, the fraction with the same verdict;
    ``unanimous``: fraction of items on which all R draws agree; ``mean_abs_diff``: mean |p_r - p_s| over pairs.
    E.g. draws [0.9, 0.2, 0.6], [0.8, 0.7, 0.6], [0.7, 0.3, 0.4]: verdicts (+,-,+), (+,+,+), (+,-,-);
    item 0 agrees in 3/3 pairs, item 1 in 1/3, item 2 in 1/3 -> agreement 5/9, unanimous 1/3.
    """
    if len(draws) < 2:
        raise ValueError(f"self-consistency needs at least 2 draws, got {len(draws)}")
    p = np.stack([np.asarray(d, dtype=np.float64) for d in draws])  # [R, N]
    v = verdicts(p)  # [R, N]
    same, diffs = [], []
    for r in range(len(p)):
        for s in range(r + 1, len(p)):
            same.append(v[r] == v[s])  # [N]
            diffs.append(np.abs(p[r] - p[s]))  # [N]
    unanimous = np.all(v == v[:1], axis=0)  # [N]
    return {"agreement": float(np.mean(same)) if p.shape[1] else 1.0,
            "unanimous": float(unanimous.mean()) if p.shape[1] else 1.0,
            "mean_abs_diff": float(np.mean(diffs)) if p.shape[1] else 0.0}


def self_consistency(judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                     principles: Sequence[str] | str | None = None, repeats: int = 3) -> dict[str, float]:
    """Ask the same comparisons ``repeats`` times as independent draws (``sample`` = 1..R: sampled at a
    temperature > 0, distinct cache entries) and report how often the (debiased) verdicts agree
    (:func:`consistency_of`), with the mean position-bias rate of the draws. A ``deterministic`` judge answers
    the same every time: agreement 1 by construction (reported as ``deterministic``: 1)."""
    comps = [judge.compare(prompts, a, b, principles, sample=r) for r in range(1, repeats + 1)]
    out = consistency_of([c.p_a for c in comps])
    out.update(repeats=float(repeats), deterministic=float(judge.deterministic),
               position_bias_rate=float(np.mean([c.position_bias_rate for c in comps])))
    return out
