"""Chained arithmetic: multi-step problems whose every intermediate result can be checked (process supervision).

    "Start with 7. Add 5. Multiply by 3. Subtract 4."   ->   7 + 5 = 12 / 12 * 3 = 36 / 36 - 4 = 32 / Answer: 32

The prompt shows three worked examples as earlier chat turns (few-shot): with them SmolLM2-135M-Instruct writes
one equation per line and is right about a third of the time on two operations; with a prose instruction alone
it almost never keeps the format.

Our own generator (``reasoning_gym``'s ``chain_sum`` and ``basic_arithmetic`` give only the final answer, not the
chain of intermediate results). A record carries the chain so a verifier can label each written step:
``{"prompt", "answer", "start", "ops": [["+", 5], ["*", 3], ["-", 4]], "intermediates": [12, 36, 32]}``.
Train and test are a fixed partition of all problems by a hash of the problem text, as for ``builtin:arithmetic``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

OP_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
CHAIN_SYSTEM = "Solve the chain of operations one step per line, then give the answer."
CHAIN_SHOTS = (  # worked examples as earlier chat turns: a 135M model follows the format from them, not from prose
    ("Start with 2. Add 3. Multiply by 4.", "2 + 3 = 5\n5 * 4 = 20\nAnswer: 20"),
    ("Start with 6. Subtract 2. Add 5.", "6 - 2 = 4\n4 + 5 = 9\nAnswer: 9"),
    ("Start with 3. Multiply by 3. Subtract 7.", "3 * 3 = 9\n9 - 7 = 2\nAnswer: 2"),
)
TEST_MODULUS = 5  # a problem is in test iff sha1(problem) % 5 == 0 (about 20% of the space)


def apply_op(a: int, op: str, b: int) -> int:
    """a op b for op in + - *."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operation {op!r}; expected one of {sorted(OP_WORDS)}")


def chain_text(start: int, ops: list[tuple[str, int]]) -> str:
    """"Start with 7. Add 5. Multiply by 3." for start 7, ops [("+", 5), ("*", 3)]."""
    return " ".join([f"Start with {start}."] + [f"{OP_WORDS[op]} {b}." for op, b in ops])


def chain_split_of(problem: str) -> str:
    """"test" iff int(sha1(problem)) % 5 == 0, else "train": a fixed partition of all problems."""
    return "test" if int(hashlib.sha1(problem.encode("utf-8")).hexdigest(), 16) % TEST_MODULUS == 0 else "train"


def chain_messages(problem: str) -> list[dict[str, str]]:
    """The prompt: a system instruction, three worked examples as earlier turns, then the problem."""
    messages = [{"role": "system", "content": CHAIN_SYSTEM}]
    for question, solution in CHAIN_SHOTS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
    return messages + [{"role": "user", "content": problem}]


def chain_record(start: int, ops: list[tuple[str, int]]) -> dict[str, Any]:
    """One problem as a prompt record (``prompt`` a message list; ``answer`` a string, as reward functions expect)."""
    values, x = [], start
    for op, b in ops:
        x = apply_op(x, op, b)
        values.append(x)
    problem = chain_text(start, ops)
    return {"prompt": chain_messages(problem), "answer": str(values[-1]), "problem": problem,
            "start": start, "ops": [[op, b] for op, b in ops], "intermediates": values}


def chain_arithmetic_problems(
    split: str, n: int, seed: int = 0, *, n_ops: int = 2, max_operand: int = 9,
    operators: tuple[str, ...] = ("+", "-", "*"),
) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``split`` (``"train"`` or ``"test"``): a start in 1..max_operand, then ``n_ops``
    operations with operands in 1..max_operand (multiplication by 1..3 only, so numbers stay small)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1 or n_ops < 1 or max_operand < 1:
        raise ValueError(f"n, n_ops and max_operand must be >= 1, got {n}, {n_ops}, {max_operand}")
    unknown = [op for op in operators if op not in OP_WORDS]
    if unknown or not operators:
        raise ValueError(f"operators must be a non-empty subset of {sorted(OP_WORDS)}, got {list(operators)}")
    rng = random.Random(seed * 1_000_003 + (0 if split == "train" else 500_001))
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        start = rng.randint(1, max_operand)
        ops = []
        for _ in range(n_ops):
            op = rng.choice(operators)
            ops.append((op, rng.randint(1, min(3, max_operand) if op == "*" else max_operand)))
        rec = chain_record(start, ops)
        if rec["problem"] in seen or chain_split_of(rec["problem"]) != split:
            continue
        seen.add(rec["problem"])
        out.append(rec)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct {split} problems found for n={n}; ask for fewer or raise n_ops/max_operand")
