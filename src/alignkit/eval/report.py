"""Reward-vs-KL plot (the DPO paper's frontier, in miniature) and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignkit.io_utils import atomic_save_figure  # noqa: E402


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def plot_reward_vs_kl(policies: dict[str, dict], path: str | Path, bon_curve: list[dict] | None = None) -> Path:
    """Two panels: gold and proxy reward (mean ± s.e.) against KL(policy || reference), one point per policy;
    ``bon_curve`` (rows ``{"n", "kl", "gold", "proxy"}`` from :func:`alignkit.eval.bon.bon_curve`) adds the
    best-of-n frontier as a dashed line through n = 1, 2, ..."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "gold", "gold reward (VADER)"), (axes[1], "proxy", "proxy reward (reward model)")):
        curve = [r for r in bon_curve or [] if _ok(r.get("kl")) and _ok(r.get(key))]
        if curve:
            ax.plot([r["kl"] for r in curve], [r[key] for r in curve], "--", color="0.5", marker=".",
                    label="best-of-n, n = 1.." + str(curve[-1]["n"]))
            ax.legend(loc="lower right", fontsize=8)
        for name, row in policies.items():
            x, y, se = row.get("kl_mean"), row.get(f"{key}_mean"), row.get(f"{key}_se")
            if not (_ok(x) and _ok(y)):
                continue
            ax.errorbar([x], [y], yerr=[se] if _ok(se) else None, fmt="o", capsize=4, label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("KL(policy || SFT reference), nats")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_title("Gold reward vs KL")
    axes[1].set_title("Proxy reward vs KL")
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def html_report(title: str, markdown_text: str, png: Path | None, tables: list[tuple[str, list[dict]]]) -> str:
    """One HTML file: the plot inlined as base64, tables, and the text summary."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>"]
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f"<img alt='reward vs KL' src='data:image/png;base64,{data}'/>")
    for caption, rows in tables:
        if not rows:
            continue
        cols = list(rows[0])
        parts.append(f"<h2>{html.escape(caption)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols)
                     + "</tr>")
        for r in rows:
            cells = "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts.append(f"<h2>Summary</h2><pre>{html.escape(markdown_text)}</pre></body></html>")
    return "\n".join(parts)


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)
