"""Step labels for process supervision: a verifier for chained arithmetic, and Monte-Carlo rollout labels.

- ``verify_chain_steps`` (Lightman et al. 2023 label steps by hand; our task's steps are checkable by rule): step k
  is correct iff it is the equation ``a op b = c`` of the problem's next operation, ``a`` is the previous result
  (the start for the first), and ``c = a op b``; the final ``Answer: n`` step is correct iff all operations were
  done and n is the last result. A step after a wrong one is wrong too (its prefix cannot be completed correctly
  any more), as PRM800K labels a solution up to its first error.
- ``mc_step_labels`` (Wang et al. 2024, Math-Shepherd, eq. 1-2): from the prefix ending at step k sample N
  completions; hard label = 1 if ANY reaches the right final answer, soft label = the fraction that do.
"""

from __future__ import annotations

import re
from typing import Callable, Literal

from alignkit.rewards.rules import last_number

_EQUATION = re.compile(r"^\s*(-?\d+)\s*([-+*x×])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*$")
_ANSWER = re.compile(r"^\s*(?:final\s+)?answer\s*[:=]?\s*(-?\d+)\s*\.?\s*$", re.IGNORECASE)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_equation(step: str) -> tuple[int, str, int, int] | None:
    """"12 * 3 = 36" -> (12, "*", 3, 36); ``x`` and ``×`` read as ``*``; None if the step is not one equation."""
    m = _EQUATION.match(step)
    if m is None:
        return None
    op = "*" if m.group(2) in ("x", "×") else m.group(2)
    return int(m.group(1)), op, int(m.group(3)), int(m.group(4))


def verify_chain_steps(steps: list[str], start: int, ops: list[list]) -> list[bool]:
    """One label per step of a chained-arithmetic solution (rules in the module docstring).

    start 7, ops [["+", 5], ["*", 3]]: ["7 + 5 = 12", "12 * 3 = 36", "Answer: 36"] -> [True, True, True];
    ["7 + 5 = 13", "13 * 3 = 39", "Answer: 39"] -> [False, False, False] (the first error spoils the rest).
    """
    labels, value, done, ok = [], int(start), 0, True
    for step in steps:
        if ok:
            eq, ans = parse_equation(step), _ANSWER.match(step)
            if eq is not None and done < len(ops):
                a, op, b, c = eq
                want_op, want_b = ops[done][0], int(ops[done][1])
                ok = a == value and op == want_op and b == want_b and c == _OPS[op](a, b)
                value, done = c, done + 1
            elif ans is not None:
                ok = done == len(ops) and int(ans.group(1)) == value
                done = len(ops) + 1  # nothing may follow the answer
            else:
                ok = False
        labels.append(ok)
    return labels


def is_correct_answer(text: str, answer: str) -> bool:
    """The outcome: the last number written in ``text`` equals ``answer`` (as ``rewards.rules.arithmetic_reward``)."""
    got, want = last_number(text), last_number(str(answer))
    return got is not None and got == want


def mc_step_labels(
    steps: list[str],
    answer: str,
    sample: Callable[[list[str], int], list[str]],
    n: int,
    mode: Literal["hard", "soft"] = "hard",
    separator: str = "\n",
) -> list[float]:
    """Math-Shepherd labels (Wang et al. 2024, eq. 1 hard / eq. 2 soft) for each step of one solution.

    ``sample(prefix_steps, n)`` returns ``n`` continuations of the solution whose first steps are ``prefix_steps``
    (text after the prefix and its separator). A completed solution is ``prefix + separator + continuation``; it
    is right if its last number equals ``answer``. Step k's label is max (hard) or mean (soft) over the n
    completions from ``steps[:k + 1]``.
    """
    if n < 1:
        raise ValueError(f"Monte-Carlo labels need n >= 1 completions per step, got {n}")
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    labels = []
    for k in range(len(steps)):
        prefix = steps[: k + 1]
        continuations = sample(prefix, n)
        if len(continuations) != n:
            raise ValueError(f"sample() returned {len(continuations)} continuations, expected {n}")
        right = [is_correct_answer(separator.join(prefix) + separator + c, answer) for c in continuations]
        labels.append(float(any(right)) if mode == "hard" else sum(right) / n)
    return labels
