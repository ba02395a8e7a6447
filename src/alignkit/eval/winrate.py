"""Win rates, length-controlled win rates, bootstrap confidence intervals and Bradley–Terry rankings.

- Win rate of A over a baseline B on the same prompts: mean over prompts of the outcome o_i ∈ [0, 1]
  (1 A better, 0 worse, ½ tie; a judge's debiased P(A better) is used as is).
- Length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval"): fit the logistic GLM
  logit P(A ≻ B) = θ + φ·Δℓ_i / sd(Δℓ) (Δℓ = len A − len B; fractional outcomes, binomial family, statsmodels)
  and report σ(θ), the prediction at zero length difference. Δℓ is scaled, not centred, so θ stays the
  intercept at Δℓ = 0.
- 95% bootstrap CIs: resample prompts with replacement (percentile interval).
- Bradley–Terry (Bradley & Terry 1952; Chatbot Arena, Chiang et al. 2024): P(i ≻ j) = σ(β_i − β_j), β by
  maximum likelihood on (fractional) pairwise outcomes, β_0 := 0 (the first system is the anchor), CIs by
  bootstrapping prompts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np


def outcomes_from_scores(a: Sequence[float], b: Sequence[float], tie_tol: float = 0.0) -> np.ndarray:
    """[N] 1 where a > b, 0 where a < b, ½ where |a − b| <= tie_tol."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score lists differ in length: {a.shape} vs {b.shape}")
    d = a - b
    return np.where(np.abs(d) <= tie_tol, 0.5, (d > 0).astype(np.float64))


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean outcome (ties count ½). [1, 0, ½, 1] -> 0.625."""
    o = np.asarray(outcomes, dtype=np.float64)
    return float(o.mean()) if o.size else float("nan")


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] | None = None,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` (default: the mean) over the rows of ``values`` (prompts), resampled
    with replacement ``n_boot`` times from ``numpy.random.default_rng(seed)``. Rows may be tuples (an [N, k]
    array): ``stat`` then receives the resampled [N, k] rows."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    stat = stat or (lambda v: float(np.mean(v)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = np.array([stat(x[i]) for i in idx], dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def lc_win_rate(outcomes: Sequence[float], len_diff: Sequence[float]) -> float:
    """σ(θ) of the logistic GLM  logit P(A ≻ B) = θ + φ·Δℓ/sd(Δℓ)  (statsmodels, binomial family, fractional
    outcomes). Without length variation (sd 0) it is the plain win rate; NaN when the fit fails (e.g. every
    outcome 0 or 1 and perfectly separated by length)."""
    import statsmodels.api as sm

    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(len_diff, dtype=np.float64)
    if y.shape != d.shape or y.size == 0:
        raise ValueError(f"lc_win_rate needs equal, non-empty outcome and length lists; got {y.shape}, {d.shape}")
    sd = float(d.std())
    if sd == 0:
        return win_rate(y)
    X = np.column_stack([np.ones_like(d), d / sd])  # [N, 2]: no centring, so θ is the value at Δℓ = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.GLM(y, X, family=sm.families.Binomial()).fit()
        theta = float(fit.params[0])
    except Exception:  # noqa: BLE001 - perfect separation or a singular design: report "not estimable"
        return float("nan")
    return 1.0 / (1.0 + math.exp(-theta)) if math.isfinite(theta) and abs(theta) < 30 else float("nan")


def bradley_terry(n_systems: int, comparisons: Sequence[tuple[int, int, float]], l2: float = 1e-6) -> np.ndarray:
    """MLE log-strengths β [K] with β_0 = 0 from comparisons (i, j, o), o = P(i ≻ j) observed ∈ [0, 1]:
    maximise Σ o log σ(β_i − β_j) + (1 − o) log σ(β_j − β_i) (a tiny ridge ``l2`` keeps β finite when a system
    wins or loses every comparison). scipy L-BFGS on the exact gradient."""
    from scipy.optimize import minimize

    if n_systems < 2:
        return np.zeros(n_systems)
    c = np.asarray(comparisons, dtype=np.float64).reshape(-1, 3)
    i, j, o = c[:, 0].astype(int), c[:, 1].astype(int), c[:, 2]

    def nll(free: np.ndarray) -> tuple[float, np.ndarray]:
        beta = np.concatenate([[0.0], free])
        z = beta[i] - beta[j]
        loss = np.sum(o * np.logaddexp(0, -z) + (1 - o) * np.logaddexp(0, z)) + l2 * np.sum(free ** 2)
        g_z = -(o - 1 / (1 + np.exp(-z)))  # d loss / d z
        grad = np.zeros(n_systems)
        np.add.at(grad, i, g_z)
        np.add.at(grad, j, -g_z)
        return float(loss), grad[1:] + 2 * l2 * free

    res = minimize(nll, np.zeros(n_systems - 1), jac=True, method="L-BFGS-B")
    return np.concatenate([[0.0], res.x])


def bradley_terry_ci(n_systems: int, per_prompt: Sequence[Sequence[tuple[int, int, float]]], n_boot: int = 200,
                     seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """β [K] on all comparisons and its percentile CI ([K] low, [K] high) from resampling PROMPTS (each prompt's
    comparisons move together)."""
    groups = [list(g) for g in per_prompt]
    beta = bradley_terry(n_systems, [c for g in groups for c in g])
    rng = np.random.default_rng(seed)
    boots = np.array([bradley_terry(n_systems, [c for k in rng.integers(0, len(groups), len(groups)) for c in groups[k]])
                      for _ in range(n_boot)])  # [n_boot, K]
    alpha = (1 - level) / 2
    return beta, np.quantile(boots, alpha, axis=0), np.quantile(boots, 1 - alpha, axis=0)
