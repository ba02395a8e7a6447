"""Best-of-n with tied proxy scores: the unbiased estimator and the argmax pick (``best_indices``) agree."""

import itertools
import math
import random

import pytest
import torch

from alignkit.eval.bon import best_indices, bon_curve, bon_unbiased_estimate


def brute_force(proxy: list[float], gold: list[float], n: int) -> float:
    """Mean over every size-n subset (in sample order) of the gold score of its first proxy-argmax."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(proxy)), n):
        pick = subset[int(best_indices(torch.tensor([[proxy[i] for i in subset]]))[0])]
        total += gold[pick]
        count += 1
    return total / count


def test_all_samples_with_ties_pick_the_first_tied_maximum():
    """proxy [1, 1, 0, 2, 2, 2, 0.5]: the maximum 2 is tied at indices 3, 4, 5; argmax picks index 3, gold 1.
    (A stable ascending sort would rank index 5 last and give gold 11.)"""
    proxy = torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5])
    gold = torch.tensor([5.0, 7.0, 0.0, 1.0, 3.0, 11.0, -2.0])
    assert int(best_indices(proxy.unsqueeze(0))[0]) == 3
    assert bon_unbiased_estimate(proxy, gold, 7) == pytest.approx(1.0)


def test_hand_computed_pair_with_ties():
    """proxy [1, 1, 0], gold [5, 7, 0], n = 2: subsets {0,1} -> 0 (first of the tie, gold 5), {0,2} -> 0 (5),
    {1,2} -> 1 (7): (5 + 5 + 7) / 3 = 17/3."""
    assert bon_unbiased_estimate(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([5.0, 7.0, 0.0]), 2) == pytest.approx(17 / 3)


@pytest.mark.parametrize("N", [5, 7, 8])
def test_estimator_equals_brute_force_over_all_subsets_with_many_ties(N):
    rng = random.Random(N)
    for _ in range(20):
        proxy = [float(rng.randint(0, 2)) for _ in range(N)]  # 3 values over N samples: many ties
        gold = [float(rng.randint(-10, 10)) for _ in range(N)]
        for n in range(1, N + 1):
            expected = brute_force(proxy, gold, n)
            assert bon_unbiased_estimate(torch.tensor(proxy), torch.tensor(gold), n) == pytest.approx(expected), (
                proxy, gold, n)


def test_batched_estimate_with_ties_is_the_mean_over_prompts():
    """[P, N]: the mean of the per-prompt brute-force values; bon_curve's gold column uses the same estimator."""
    rng = random.Random(3)
    proxy = [[float(rng.randint(0, 1)) for _ in range(6)] for _ in range(4)]
    gold = [[float(rng.randint(-5, 5)) for _ in range(6)] for _ in range(4)]
    for n in (1, 2, 4, 6):
        expected = sum(brute_force(p, g, n) for p, g in zip(proxy, gold)) / 4
        assert bon_unbiased_estimate(torch.tensor(proxy), torch.tensor(gold), n) == pytest.approx(expected)
    curve = bon_curve(torch.tensor(proxy), torch.tensor(gold), ns=[3])
    assert curve[0]["gold"] == pytest.approx(sum(brute_force(p, g, 3) for p, g in zip(proxy, gold)) / 4)
    assert curve[0]["kl"] == pytest.approx(math.log(3) - 2 / 3)
