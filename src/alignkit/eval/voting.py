"""Accuracy against n for answer-level selection: majority vote (self-consistency) and pass@n.

- Majority vote (Wang et al. 2023, self-consistency): among n sampled solutions pick the most frequent final
  answer; solutions without an answer do not vote, and a tie goes to the answer that appears first in the subset.
  ``majority_vote_accuracy`` estimates the expected accuracy over random size-n subsets of the N samples of each
  problem by Monte-Carlo (``n_subsets`` per problem, seeded; exact for n = N, where the one subset is all samples
  in order).
- pass@n (Chen et al. 2021, eq. 1): 1 - C(N - c, n) / C(N, n) with c of N samples right, the chance that a random
  size-n subset holds a right one: the ceiling of any selection rule.
"""

from __future__ import annotations

import math
import random
from collections import Counter


def majority_answer(answers: list) -> object | None:
    """The most frequent non-None answer; ties go to the one seen first; None when no answer was given."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def majority_vote_accuracy(answers: list[list], targets: list, n: int, n_subsets: int = 200, seed: int = 0) -> float:
    """Expected accuracy of majority vote over n of the N samples per problem. answers: [P][N] (None = no answer)."""
    if not answers or any(len(a) < n for a in answers) or n < 1:
        raise ValueError(f"majority vote over n={n} needs at least n samples for every problem")
    rng = random.Random(seed)
    total = 0.0
    for row, target in zip(answers, targets):
        if n == len(row):
            total += float(majority_answer(row) == target)
            continue
        hits = sum(majority_answer([row[j] for j in rng.sample(range(len(row)), n)]) == target for _ in range(n_subsets))
        total += hits / n_subsets
    return total / len(answers)


def pass_at_n(correct: list[list[bool]], n: int) -> float:
    """Unbiased pass@n (Chen et al. 2021): mean over problems of 1 - C(N - c, n) / C(N, n)."""
    if not correct or any(len(c) < n for c in correct) or n < 1:
        raise ValueError(f"pass@{n} needs at least n samples for every problem")
    return sum(1.0 - math.comb(len(c) - sum(c), n) / math.comb(len(c), n) for c in correct) / len(correct)
