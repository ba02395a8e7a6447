"""Derived seeds: one integer per (run seed, epoch/round/iteration, row, ...), so that every random draw is a
function of where it happens, not of what ran before it (exact resume; the same samples whatever the batch
size or the number of processes)."""

from __future__ import annotations

_PRIME = 1_000_003
_MOD = 2**63


def derive_seed(seed: int, *parts: int) -> int:
    """``(((seed * p + a) * p + b) ...) mod 2**63`` for parts ``a, b, ...``: distinct parts give distinct streams."""
    h = int(seed) % _MOD
    for part in parts:
        h = (h * _PRIME + int(part)) % _MOD
    return h
