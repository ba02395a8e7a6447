"""Which items to label first: active selection by reward-model disagreement, else random stratified by prompt.

Both return a permutation of item indices (the queue order); the store serves items in that order.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from torch import Tensor


def stratified_order(groups: list[int], seed: int) -> list[int]:
    """Random order stratified by prompt: ``groups[i]`` is item i's prompt (candidate record).

    The prompts are shuffled (seeded), each prompt's items are shuffled, then the items are dealt round-robin:
    every prompt's first item comes before any prompt's second, so labelling any prefix of the queue covers
    as many prompts as possible. E.g. groups [0, 0, 1, 1, 2] gives 3 items (one per prompt), then 2 items.
    """
    rng = random.Random(seed)
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    keys = sorted(by_group)
    rng.shuffle(keys)
    for g in keys:
        rng.shuffle(by_group[g])
    order = []
    for r in range(max((len(v) for v in by_group.values()), default=0)):
        order += [by_group[g][r] for g in keys if r < len(by_group[g])]
    return order


def pair_disagreement(member_scores: Tensor, pairs: list[tuple[int, int]]) -> Tensor:
    """How much reward-ensemble members disagree about each pair.

    ``member_scores`` [M, R]: the score of each of R responses by each of M members; ``pairs`` [(i, j)] index
    responses. For a pair, d_m = s_m,i - s_m,j is member m's preference margin; the disagreement is the standard
    deviation of d over the members (population std, divisor M). Members that agree on the margin give 0,
    whatever the margin; members that prefer opposite responses give a large value.

    Example: scores [[1, 0], [0, 1]] (two members, opposite preferences), pair (0, 1): d = [1, -1], std = 1.0;
    scores [[3, 1], [2, 0]]: d = [2, 2], std = 0.
    Returns [len(pairs)].
    """
    if member_scores.dim() != 2:
        raise ValueError(f"member_scores must be [members, responses], got shape {tuple(member_scores.shape)}")
    if not pairs:
        return torch.zeros(0)
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    d = member_scores[:, i] - member_scores[:, j]  # [M, n_pairs]
    return d.std(dim=0, unbiased=False)  # [n_pairs]


def item_disagreement(member_scores: Tensor, items: list[list[int]]) -> Tensor:
    """Disagreement of each item, given as the response indices it shows: a pair -> :func:`pair_disagreement`;
    K > 2 responses (ranking) -> the mean over its K-choose-2 pairs; one response (binary) -> the std of its score
    over the members. Returns [len(items)]."""
    out = []
    for idx in items:
        if len(idx) == 1:
            out.append(member_scores[:, idx[0]].std(unbiased=False))
        else:
            pairs = [(a, b) for n, a in enumerate(idx) for b in idx[n + 1:]]
            out.append(pair_disagreement(member_scores, pairs).mean())
    return torch.stack(out) if out else torch.zeros(0)


def disagreement_order(disagreement: list[float], groups: list[int], seed: int) -> list[int]:
    """Most disagreed-about items first; equal values keep the stratified random order (so ties are not biased
    towards the first prompts of the file)."""
    base = stratified_order(groups, seed)
    position = {item: n for n, item in enumerate(base)}
    return sorted(range(len(disagreement)), key=lambda i: (-float(disagreement[i]), position[i]))
