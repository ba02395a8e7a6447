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

    @abstractmethod
    def prefer_first(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                     principles: Sequence[str]) -> np.ndarray:
        """[N] P(the response shown first is better than the one shown second), for one fixed order."""

    def usage(self) -> dict[str, float]:
        """Cumulative token / request accounting since construction (remote judges override)."""
        return {}

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                principles: Sequence[str] | str | None = None) -> Comparison:
        """Judge A against B on N items in both orders and average them (position debiasing)."""
        n = len(prompts)
        if not (len(a) == len(b) == n):
            raise ValueError(f"judge {self.name}: {n} prompts but {len(a)} A and {len(b)} B responses")
        if principles is None or isinstance(principles, str):
            principles = [principles or DEFAULT_PRINCIPLE] * n
        elif len(principles) != n:
            raise ValueError(f"judge {self.name}: {n} prompts but {len(principles)} principles")
        before = self.usage()
        p_ab = np.asarray(self.prefer_first(prompts, a, b, principles), dtype=np.float64)
        p_ba = np.asarray(self.prefer_first(prompts, b, a, principles), dtype=np.float64)
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

    def prefer_first(self, prompts, first, second, principles) -> np.ndarray:
        return np.asarray(self.fn(list(prompts), list(first), list(second), list(principles)), dtype=np.float64)
