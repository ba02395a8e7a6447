"""Reward-model evaluation on held-out pairs: accuracy (overall, by category), calibration, length, disagreement.

Shared by ``alignkit rm`` (the summary printed after training) and ``alignkit rm-eval``. Inputs are the RAW
scores of K members (K = 1 for one reward model) on P held-out pairs, chosen [K, P] and rejected [K, P]:

- accuracy = frac(mean_k (r_w - r_l) > 0) (REFERENCES: typical 65-80% on human data), per category too, and each
  member's own accuracy;
- calibration: the Bradley-Terry probability p = mean_k sigma(r_w,k - r_l,k) that the chosen response wins, scored
  against the labels. Every pair enters in both orders ((p, label 1) and (1 - p, label 0)), so a model that is
  always right but under-confident shows as such. Expected calibration error over B equal-width bins
  (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3):

      ECE = sum_b (n_b / n) * |acc_b - conf_b|

  with a reliability plot (accuracy against confidence per bin);
- length: the Pearson correlation of the score (member mean, after each member's normalisation when it has one)
  with the response length in tokens over all 2P responses; |corr| >= ``LENGTH_WARNING`` (0.3) prints a warning:
  the model may reward length rather than quality (Singhal et al. 2023, "A Long Way to Go");
- members' disagreement (K > 1): the mean over pairs of the members' std of the margin r_w - r_l (1/K), and the
  fraction of pairs whose margin sign the members do not all agree on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from alignkit.io_utils import atomic_save_figure

LENGTH_WARNING = 0.3
"""|corr(score, length)| at or above this prints a length-hacking warning."""


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 10) -> tuple[float, list[dict]]:
    """ECE = sum_b (n_b/n) |acc_b - conf_b| over ``n_bins`` equal-width bins of ``probs`` in [0, 1].

    probs, labels: [n] (labels 0/1). Bin b holds p in [b/B, (b+1)/B) (the last bin includes 1; a p within 1e-6
    below an edge counts as on it, so float32 inputs bin as written). Returns the ECE
    and the non-empty bins as ``{"lo", "hi", "n", "confidence", "accuracy"}``.
    """
    probs, labels = probs.double().flatten(), labels.double().flatten()
    if probs.shape != labels.shape or probs.numel() == 0:
        raise ValueError(f"probs and labels must be the same non-empty shape, got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    idx = (probs * n_bins + 1e-6).floor().long().clamp(0, n_bins - 1)  # [n]; 1e-6: float32 0.9 is on edge 0.9
    ece, bins = 0.0, []
    for b in range(n_bins):
        sel = idx == b
        n_b = int(sel.sum())
        if n_b == 0:
            continue
        conf, acc = float(probs[sel].mean()), float(labels[sel].mean())
        ece += n_b / probs.numel() * abs(acc - conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n_b, "confidence": conf, "accuracy": acc})
    return ece, bins


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two [n] vectors (0.0 when either is constant or n < 2)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2 or float(x.std()) == 0.0 or float(y.std()) == 0.0:
        return 0.0
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def pair_report(chosen: Tensor, rejected: Tensor, categories: list[str | None] | None = None,
                len_chosen: Tensor | None = None, len_rejected: Tensor | None = None,
                norm_chosen: Tensor | None = None, norm_rejected: Tensor | None = None, n_bins: int = 10) -> dict:
    """The evaluation of K members' raw scores chosen/rejected [K, P] (see the module docstring).

    ``norm_*`` [K, P]: the normalised scores for the length correlation (default: the raw ones);
    ``len_*`` [P]: response lengths in tokens; ``categories`` [P]: a category per pair or None."""
    if chosen.dim() == 1:
        chosen, rejected = chosen[None], rejected[None]  # [1, P]
    if chosen.shape != rejected.shape or chosen.shape[1] == 0:
        raise ValueError(f"chosen and rejected must be [K, P] with P >= 1, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    K, P = chosen.shape
    margins = (chosen - rejected).double()  # [K, P]
    mean_margin = margins.mean(0)  # [P]
    correct = mean_margin > 0
    out: dict = {"n_pairs": P, "n_members": K, "accuracy": float(correct.double().mean()),
                 "margin": float(mean_margin.mean())}
    if categories is not None and any(c is not None for c in categories):
        by: dict[str, list[bool]] = {}
        for c, ok in zip(categories, correct.tolist()):
            by.setdefault("none" if c is None else str(c), []).append(ok)
        out["accuracy_by_category"] = {c: sum(v) / len(v) for c, v in sorted(by.items())}
        out["n_by_category"] = {c: len(v) for c, v in sorted(by.items())}
    p_win = torch.sigmoid(margins).mean(0)  # [P] ensemble probability that chosen wins
    ece, bins = expected_calibration_error(torch.cat([p_win, 1 - p_win]), torch.cat([torch.ones(P), torch.zeros(P)]),
                                           n_bins)
    out["ece"], out["reliability"] = ece, bins
    if len_chosen is not None and len_rejected is not None:
        nc = norm_chosen if norm_chosen is not None else chosen
        nr = norm_rejected if norm_rejected is not None else rejected
        scores = torch.cat([nc.double().mean(0), nr.double().mean(0)])  # [2P]
        lengths = torch.cat([len_chosen, len_rejected]).double()
        out["length_correlation"] = pearson(scores, lengths)
        out["length_warning"] = abs(out["length_correlation"]) >= LENGTH_WARNING
    if K > 1:
        out["member_accuracy"] = (margins > 0).double().mean(1).tolist()
        out["disagreement_margin_std"] = float(margins.std(0, unbiased=False).mean())
        signs = margins > 0
        out["disagreement_sign_frac"] = float((signs.any(0) & ~signs.all(0)).double().mean())
    return out


def format_report(r: dict, title: str = "reward model evaluation") -> str:
    """The report as a few printed lines."""
    lines = [f"{title}: {r['n_pairs']} held-out pairs, accuracy {r['accuracy']:.1%}, mean margin {r['margin']:.3f}"]
    if "accuracy_by_category" in r:
        lines.append("  by category: " + ", ".join(f"{c} {a:.1%} (n={r['n_by_category'][c]})"
                                                  for c, a in r["accuracy_by_category"].items()))
    lines.append(f"  calibration: ECE {r['ece']:.3f} of sigma(r_w - r_l) over {len(r['reliability'])} non-empty bins")
    if "length_correlation" in r:
        lines.append(f"  corr(score, response length) = {r['length_correlation']:+.2f}")
        if r["length_warning"]:
            lines.append(f"  WARNING: |corr(score, length)| >= {LENGTH_WARNING}: the reward model may be rewarding "
                         "length (a length-hacking warning sign)")
    if r.get("n_members", 1) > 1:
        lines.append(f"  {r['n_members']} members: accuracies " + ", ".join(f"{a:.1%}" for a in r["member_accuracy"])
                     + f"; margin std across members {r['disagreement_margin_std']:.3f}; members disagree on the "
                     f"winner in {r['disagreement_sign_frac']:.1%} of pairs")
    return "\n".join(lines)


def plot_reliability(bins: list[dict], path: str | Path, title: str = "reward model calibration") -> Path:
    """Reliability diagram (accuracy against confidence per bin, the diagonal is perfect calibration) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if bins:
        ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=[b["hi"] - b["lo"] for b in bins],
               align="edge", alpha=0.5, edgecolor="C0", label="accuracy per bin")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C1",
                label="(confidence, accuracy)")
    ax.set_xlabel("predicted P(first response preferred)")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=100)
