"""Best-of-n: analytic KL to the base policy and the unbiased gold-score estimator.

Gao, Schulman & Hilton (2023), "Scaling Laws for Reward Model Overoptimization", sec. 2.2 and
appendix (after Stiennon et al. 2020, appendix G.3; Nakano et al. 2021):

- KL(best-of-n || base) = log n - (n - 1) / n                       (``bon_kl``)
- From N >= n samples of one prompt sorted ascending by the proxy reward, x_(1) <= ... <= x_(N),
  the expected gold score of best-of-n over all C(N, n) size-n subsets is

      E[R_gold(BoN_n)] = sum_{i=n}^{N} C(i - 1, n - 1) / C(N, n) * R_gold(x_(i))  (``bon_unbiased_estimate``)

  x_(i) is the proxy-argmax of a subset iff the subset holds x_(i) and n - 1 of the i - 1 samples
  below it. n = 1 gives the mean gold score; n = N gives the gold score of the proxy-argmax.
  Ties in the proxy go to the EARLIER sample, as ``argmax`` (and ``best_indices``) over a subset picks the
  first of its tied maxima: samples are sorted by (proxy ascending, index descending), so among equal
  proxies the one with the smallest index ranks highest.

``bon_curve`` evaluates both (gold and proxy) for several n: the over-optimisation curve of
gold score against d = sqrt(KL) (Gao et al. fit d (alpha - beta d) to it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bon_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2023 eq. 1). n = 1 -> 0."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def bon_weights(N: int, n: int) -> Tensor:
    """w_i = C(i - 1, n - 1) / C(N, n) for i = 1..N (0 for i < n): P(x_(i) is the best of a random n-subset).

    [N] float64, sums to 1. Exact integer binomials, then one division each (no overflow for large N).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}")
    if n > N:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt, got N = {N}")
    total = math.comb(N, n)
    return torch.tensor([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)], dtype=torch.float64)  # [N]


def _check_pair(proxy: Tensor, gold: Tensor) -> None:
    if proxy.shape != gold.shape or proxy.dim() not in (1, 2) or proxy.shape[-1] == 0:
        raise ValueError(
            f"proxy and gold must both be [N] (one prompt) or [P, N] (P prompts), N >= 1; "
            f"got {tuple(proxy.shape)} and {tuple(gold.shape)}"
        )


def bon_unbiased_estimate(proxy: Tensor, gold: Tensor, n: int) -> float:
    """Unbiased estimate of the gold score of best-of-n by ``proxy`` (Gao et al. 2023):

        sum_{i=n}^{N} C(i - 1, n - 1) / C(N, n) * gold(x_(i)),   x sorted by (proxy ascending, index descending).

    It equals the mean, over every size-n subset, of the gold score of the subset's ``argmax`` by proxy (the
    first sample among tied maxima, like :func:`best_indices`).
    proxy, gold: [N] samples of one prompt, or [P, N] (the estimate is averaged over the P prompts).
    """
    proxy, gold = torch.as_tensor(proxy), torch.as_tensor(gold)
    _check_pair(proxy, gold)
    if proxy.dim() == 1:
        proxy, gold = proxy.unsqueeze(0), gold.unsqueeze(0)  # [1, N]
    N = proxy.shape[-1]
    weights = bon_weights(N, n)  # [N]
    # a stable ascending sort of the REVERSED samples keeps tied ones in descending index order
    order = (N - 1) - torch.sort(proxy.double().flip(-1), dim=-1, stable=True).indices  # [P, N]
    gold_sorted = gold.double().gather(-1, order)  # [P, N]
    return float((gold_sorted * weights).sum(-1).mean())


def bon_curve(proxy: Tensor, gold: Tensor | None = None, ns: list[int] | None = None) -> list[dict[str, float]]:
    """Over-optimisation curve: for each n in ``ns`` (default 1..N),
    ``{"n", "kl" (= log n - (n-1)/n), "sqrt_kl", "proxy", "gold"}`` where proxy/gold are the unbiased
    best-of-n estimates from the same samples (``gold`` omitted when no gold scores are given).

    proxy, gold: [N] or [P, N] as in :func:`bon_unbiased_estimate`.
    """
    proxy = torch.as_tensor(proxy)
    _check_pair(proxy, proxy if gold is None else torch.as_tensor(gold))
    ns = list(range(1, proxy.shape[-1] + 1)) if ns is None else list(ns)
    curve = []
    for n in ns:
        kl = bon_kl(n)
        point = {"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), "proxy": bon_unbiased_estimate(proxy, proxy, n)}
        if gold is not None:
            point["gold"] = bon_unbiased_estimate(proxy, gold, n)
        curve.append(point)
    return curve


def best_indices(scores: Tensor) -> Tensor:
    """[P, n] scores of n samples per prompt -> [P] index of the best (the first one on ties, as
    :func:`bon_unbiased_estimate` assumes)."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [P, n] with n >= 1, got {tuple(scores.shape)}")
    return scores.argmax(dim=1)
