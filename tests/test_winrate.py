"""Win rate, length-controlled win rate, bootstrap CIs and Bradley–Terry (alignkit.eval.winrate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.eval.winrate import (
    bootstrap_ci,
    bradley_terry,
    bradley_terry_ci,
    lc_win_rate,
    outcomes_from_scores,
    win_rate,
)


def test_win_rate_hand_computed_ties_half():
    """a vs b: win, loss, tie, win -> (1 + 0 + ½ + 1) / 4 = 0.625."""
    o = outcomes_from_scores([0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.5, 0.6])
    assert o.tolist() == [1.0, 0.0, 0.5, 1.0]
    assert win_rate(o) == pytest.approx(0.625)
    assert outcomes_from_scores([1.0], [1.05], tie_tol=0.1).tolist() == [0.5]


def test_lc_win_rate_hand_computed():
    """Δℓ = +1 on five prompts with outcomes 1,1,1,1,0 (0.8) and −1 on five with 1,0,0,1,0 (0.4). Two parameters,
    two distinct Δℓ: the GLM fits both cells exactly, σ(θ ± φ') = 0.8 / 0.4, so
    θ = ½(logit 0.8 + logit 0.4) = ½ log(4 · 2/3) and LC = σ(θ) = sqrt(8/3) / (1 + sqrt(8/3)) = 0.62024.
    The raw win rate is 0.6: the length-favoured wins are discounted less than the others are raised."""
    o = [1, 1, 1, 1, 0, 1, 0, 0, 1, 0]
    d = [5] * 5 + [-5] * 5
    r = math.sqrt(8 / 3)
    assert lc_win_rate(o, d) == pytest.approx(r / (1 + r), abs=1e-6)
    assert win_rate(o) == pytest.approx(0.6)


def test_lc_win_rate_removes_a_pure_length_effect():
    """Outcomes driven only by length (the longer wins with P = σ(Δℓ/10)) and A longer on most prompts: the raw
    win rate is above 0.7, the LC win rate (no length difference) is ½."""
    rng = np.random.default_rng(0)
    d = rng.normal(20, 30, size=4000)  # A usually longer
    o = (rng.random(4000) < 1 / (1 + np.exp(-d / 10))).astype(float)
    assert win_rate(o) > 0.7
    assert lc_win_rate(o, d) == pytest.approx(0.5, abs=0.05)


def test_lc_win_rate_without_length_variation_is_the_win_rate():
    assert lc_win_rate([1, 0, 0.5], [3, 3, 3]) == pytest.approx(0.5)


def test_bootstrap_ci_hand_computed():
    """Values [0, 1]: a resample's mean is 0, ½ or 1 with probability ¼, ½, ¼, so the 2.5% / 97.5% percentiles of
    many resamples are 0 and 1. A constant sample gives a zero-width interval."""
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0) == (0.0, 1.0)
    assert bootstrap_ci([0.3] * 10) == (pytest.approx(0.3), pytest.approx(0.3))


def test_bootstrap_ci_matches_the_normal_approximation():
    """50 zeros and 50 ones: mean ½, s.e. sqrt(¼ / 100) = 0.05, 95% CI ≈ ½ ± 0.098; same seed, same interval."""
    x = [0.0] * 50 + [1.0] * 50
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=1)
    assert lo == pytest.approx(0.5 - 0.098, abs=0.02) and hi == pytest.approx(0.5 + 0.098, abs=0.02)
    assert bootstrap_ci(x, n_boot=2000, seed=1) == (lo, hi)


def test_bradley_terry_two_systems_hand_computed():
    """Two systems, i beats j in 3 of 4 comparisons: the MLE satisfies σ(β_1 − β_0) = ¾, so β_1 = log 3."""
    comps = [(1, 0, 1.0)] * 3 + [(1, 0, 0.0)]
    beta = bradley_terry(2, comps, l2=0.0)
    assert beta[0] == 0.0 and beta[1] == pytest.approx(math.log(3), abs=1e-4)


def test_bradley_terry_recovers_synthetic_strengths():
    """True β = 0, 0.5, 1.0, −1.0; 300 prompts x all 6 pairs, outcomes drawn from σ(β_i − β_j): the ranking is
    recovered and each β within 0.15; the bootstrap CI covers the truth."""
    true = np.array([0.0, 0.5, 1.0, -1.0])
    rng = np.random.default_rng(0)
    per_prompt = []
    for _ in range(300):
        comps = []
        for i in range(4):
            for j in range(i + 1, 4):
                p = 1 / (1 + np.exp(-(true[i] - true[j])))
                comps.append((i, j, float(rng.random() < p)))
        per_prompt.append(comps)
    beta, lo, hi = bradley_terry_ci(4, per_prompt, n_boot=50, seed=0)
    assert np.argsort(beta).tolist() == np.argsort(true).tolist()
    assert np.abs(beta - true).max() < 0.15
    assert np.all(lo[1:] <= true[1:]) and np.all(true[1:] <= hi[1:])
    assert np.all(hi - lo >= 0)
