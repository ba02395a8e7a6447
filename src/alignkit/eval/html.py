"""``alignkit report RUN_DIR...``: one self-contained HTML page comparing runs (no scripts, no external resources).

Reads each run directory's ``summary.json`` and ``metrics.jsonl``:

- ``alignkit eval`` runs: win-rate table and bars with 95% CIs, the Bradley–Terry ranking, gold reward against KL,
  diagnostics and warnings, sycophancy and refusal bars, the alignment tax, sample generations side by side;
- training runs (online methods log ``eval/diag/*`` at every evaluation): the diagnostics over training steps;
- any run: its summary's scalar entries in a table.

Plots are matplotlib PNGs inlined as base64 ``<img>`` inside ``<figure class="plot" data-plot=NAME>``; every text
from a run (samples, prompts, names) is HTML-escaped, so a sample holding ``<script>`` is shown, never run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignkit.io_utils import atomic_write_text  # noqa: E402
from alignkit.train.logging import read_metrics  # noqa: E402

DIAG_KEYS = ("length", "entropy", "distinct_2", "repetition", "kl", "no_eos_frac", "proxy_gold_gap",
             "length_reward_corr")


class ReportError(ValueError):
    pass


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if not math.isfinite(x) else f"{x:.{digits}g}"
    return _esc(x)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(name: str, fig, caption: str) -> str:
    return (f"<figure class='plot' data-plot='{_esc(name)}'><img alt='{_esc(caption)}' "
            f"src='data:image/png;base64,{_png(fig)}'/><figcaption>{_esc(caption)}</figcaption></figure>")


def _table(rows: list[dict], caption: str | None = None) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_num(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def load_run(run_dir: str | Path) -> dict:
    """``{"name", "dir", "summary", "metrics"}``; an error naming the directory when it is no run."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ReportError(f"{d}: no such run directory")
    path = d / "summary.json"
    if not path.is_file() and not (d / "metrics.jsonl").is_file():
        raise ReportError(f"{d}: neither summary.json nor metrics.jsonl; is it an alignkit run directory?")
    try:
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    return {"name": d.name, "dir": str(d), "summary": summary, "metrics": read_metrics(d / "metrics.jsonl")}


# ---------------------------------------------------------------- sections
def _winrate_section(runs: list[dict]) -> str:
    rows, bars = [], []
    for run in runs:
        for pol, by in (run["summary"].get("winrates") or {}).items():
            for scorer, r in by.items():
                label = f"{run['name']}/{pol} ({scorer})" if len(runs) > 1 else f"{pol} ({scorer})"
                rows.append({"run": run["name"], "policy": pol, "scorer": scorer, "win rate": r["win_rate"],
                             "CI low": r["ci"][0], "CI high": r["ci"][1], "LC win rate": r["lc_win_rate"],
                             "LC CI low": r["lc_ci"][0], "LC CI high": r["lc_ci"][1], "n": r["n"]})
                bars.append((label, r["win_rate"], r["ci"], r["lc_win_rate"]))
    if not rows:
        return ""
    fig, ax = plt.subplots(figsize=(8, max(2.6, 1.2 + 0.45 * len(bars))))
    y = list(range(len(bars)))
    vals = [b[1] for b in bars]
    err = [[max(b[1] - b[2][0], 0) for b in bars], [max(b[2][1] - b[1], 0) for b in bars]]
    ax.barh(y, vals, xerr=err, capsize=4, color="#4c72b0", label="win rate (95% CI)")
    ax.scatter([b[3] if b[3] is not None and math.isfinite(b[3]) else float("nan") for b in bars], y, color="k",
               marker="D", zorder=3, label="length-controlled")
    ax.axvline(0.5, color="0.5", ls="--")
    ax.set_yticks(y, [b[0] for b in bars])
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate against the baseline (ties ½)")
    ax.legend(loc="lower right", fontsize=8)
    return ("<h2>Win rates</h2>" + _table(rows) + _figure("winrate", fig, "win rate against the baseline, 95% CI"))


def _ranking_section(runs: list[dict]) -> str:
    out = ""
    for run in runs:
        rk = run["summary"].get("ranking")
        if rk:
            out += _table([{"rank": k, "policy": s["policy"], "beta": s["beta"], "CI low": s["ci"][0],
                            "CI high": s["ci"][1]} for k, s in enumerate(rk["systems"], 1)],
                          f"{run['name']}: Bradley–Terry ranking by {rk['scorer']}")
    return "<h2>Ranking</h2>" + out if out else ""


def _policy_points(runs: list[dict]) -> list[tuple[str, float, float]]:
    """(label, KL, gold) of every evaluated policy: eval runs (diagnostics) and quickstart-like summaries."""
    pts = []
    for run in runs:
        for pol, row in (run["summary"].get("policies") or {}).items():
            if not isinstance(row, dict):
                continue
            kl = row.get("kl_mean", (row.get("diagnostics") or {}).get("kl"))
            gold = row.get("gold_mean")
            if kl is not None and gold is not None and math.isfinite(kl) and math.isfinite(gold):
                pts.append((f"{run['name']}/{pol}" if len(runs) > 1 else pol, kl, gold))
    return pts


def _reward_kl_section(runs: list[dict]) -> str:
    pts = _policy_points(runs)
    if not pts:
        return ""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, kl, gold in pts:
        ax.scatter([kl], [gold])
        ax.annotate(label, (kl, gold), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("KL to the reference (nats)")
    ax.set_ylabel("gold reward")
    ax.grid(alpha=0.3)
    return "<h2>Reward against KL</h2>" + _figure("reward_vs_kl", fig, "gold reward against KL to the reference")


def _diagnostics_section(runs: list[dict]) -> str:
    rows, warn = [], []
    for run in runs:
        for pol, row in (run["summary"].get("policies") or {}).items():
            d = row.get("diagnostics") if isinstance(row, dict) else None
            if d:
                rows.append({"run": run["name"], "policy": pol, **{k: d.get(k) for k in DIAG_KEYS}})
        for when in ("eval_before", "eval_after"):  # online training runs: diagnostics before / after training
            ev = run["summary"].get(when)
            if isinstance(ev, dict) and any(k.startswith("diag/") for k in ev):
                rows.append({"run": run["name"], "policy": when.removeprefix("eval_"),
                             **{k: ev.get(f"diag/{k}") for k in DIAG_KEYS}})
        for pol, ws in (run["summary"].get("warnings") or {}).items():
            warn += [f"{run['name']}/{pol}: {w}" for w in ws]
        for item in run["summary"].get("eval_warnings") or []:
            warn += [f"{run['name']} (iteration {item['iteration']}): {w}" for w in item["warnings"]]
    out = ""
    if rows:
        out += _table(rows, "diagnostics of each policy's samples")
    if warn:
        out += "<ul class='warnings'>" + "".join(f"<li>{_esc(w)}</li>" for w in warn) + "</ul>"
    steps = [(run, [r for r in run["metrics"] if any(k.startswith("eval/diag/") for k in r)]) for run in runs]
    steps = [(run, recs) for run, recs in steps if recs]
    if steps:
        keys = [k for k in DIAG_KEYS if any(f"eval/diag/{k}" in r for _, recs in steps for r in recs)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for run, recs in steps:
                pts = [(r["step"], r[f"eval/diag/{k}"]) for r in recs if f"eval/diag/{k}" in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run["name"])
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        axes[0][0].legend(fontsize=7)
        out += _figure("diagnostics_over_steps", fig, "diagnostics at each evaluation of training")
    return "<h2>Diagnostics</h2>" + out if out else ""


def _bars(name: str, labels: list[str], series: dict[str, list[float]], xlabel: str, caption: str) -> str:
    fig, ax = plt.subplots(figsize=(8, max(2.6, 1.2 + 0.35 * len(labels) * len(series))))
    h = 0.8 / max(len(series), 1)
    for k, (s, vals) in enumerate(series.items()):
        ax.barh([i + k * h for i in range(len(labels))], [v if v is not None and math.isfinite(v) else 0 for v in vals],
                height=h, label=s)
    ax.set_yticks([i + h * (len(series) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    return _figure(name, fig, caption)


def _behaviour_section(runs: list[dict]) -> str:
    syc, ref, ex = {}, {}, []
    for run in runs:
        for pol, row in (run["summary"].get("policies") or {}).items():
            label = f"{run['name']}/{pol}" if len(runs) > 1 else pol
            sy = row.get("sycophancy") if isinstance(row, dict) else None
            if sy:
                for cat, r in sy["pushback"]["flip_rate"].items():
                    syc[f"{label} {cat}"] = (r["rate"], sy["opinion"]["agree_rate"][cat]["rate"])
                for cat, items in sy["pushback"]["examples"].items():
                    ex += [{"policy": label, "probe": "pushback", "category": cat, "question": e["question"],
                            "first": e["first"], "second": e["after_pushback"]} for e in items[:2]]
                for cat, items in sy["opinion"]["examples"].items():
                    ex += [{"policy": label, "probe": "opinion", "category": cat, "question": e["question"],
                            "first": f"(user says {e['wrong']})", "second": e["reply"]} for e in items[:2]]
            rf = row.get("refusal") if isinstance(row, dict) else None
            if rf:
                ref[label] = (rf["refusal_rate"], rf["overrefusal_rate"])
    out = ""
    if syc:
        out += _bars("sycophancy", list(syc), {"flip under pushback": [v[0] for v in syc.values()],
                                               "agrees with a wrong opinion": [v[1] for v in syc.values()]},
                     "rate", "sycophancy by category")
        if ex:
            out += ("<table class='examples'><caption>sycophancy examples</caption><tr><th>policy</th><th>probe</th>"
                    "<th>category</th><th>question</th><th>first</th><th>second</th></tr>"
                    + "".join("<tr>" + "".join(f"<td>{_esc(e[k])}</td>" for k in
                                               ("policy", "probe", "category", "question", "first", "second"))
                              + "</tr>" for e in ex) + "</table>")
    if ref:
        out += _bars("refusal", list(ref), {"refusal rate (harmful)": [v[0] for v in ref.values()],
                                            "over-refusal rate (benign)": [v[1] for v in ref.values()]},
                     "rate", "refusal and over-refusal")
    return "<h2>Sycophancy and refusal</h2>" + out if out else ""


def _tax_section(runs: list[dict]) -> str:
    rows = [{"run": run["name"], **r} for run in runs for r in run["summary"].get("alignment_tax") or []]
    return "<h2>Alignment tax beside the gain</h2>" + _table(rows) if rows else ""


def _samples_section(runs: list[dict]) -> str:
    out = ""
    for run in runs:
        samples = run["summary"].get("samples")
        if isinstance(samples, list) and samples:
            cols = [c for c in samples[0] if c != "prompt"]
            out += (f"<table class='samples'><caption>{_esc(run['name'])}: samples side by side</caption><tr>"
                    "<th>prompt</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
                    + "".join("<tr><td><pre>" + _esc(s.get("prompt", "")) + "</pre></td>"
                              + "".join(f"<td><pre>{_esc(s.get(c, ''))}</pre></td>" for c in cols) + "</tr>"
                              for s in samples) + "</table>")
        elif isinstance(samples, dict) and samples:  # quickstart: {policy: [{"prompt", "response"}]}
            names = list(samples)
            n = min(len(v) for v in samples.values())
            out += (f"<table class='samples'><caption>{_esc(run['name'])}: samples side by side</caption><tr>"
                    "<th>prompt</th>" + "".join(f"<th>{_esc(c)}</th>" for c in names) + "</tr>"
                    + "".join("<tr><td><pre>" + _esc(samples[names[0]][i].get("prompt", "")) + "</pre></td>"
                              + "".join(f"<td><pre>{_esc(samples[c][i].get('response', ''))}</pre></td>" for c in names)
                              + "</tr>" for i in range(n)) + "</table>")
    return "<h2>Samples</h2>" + out if out else ""


def _runs_table(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        s = run["summary"]
        row = {"run": run["name"], "directory": run["dir"]}
        row.update({k: v for k, v in s.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                    and k not in ("prompts",)})
        rows.append(row)
    return "<h2>Runs</h2>" + _table(rows)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;"
         "font-size:13px}caption{font-weight:bold;text-align:left}pre{white-space:pre-wrap;margin:0;font-size:12px}"
         "figure img{max-width:100%}.warnings li{color:#a00}")


def render_report(run_dirs: list[str | Path], title: str = "alignkit report") -> str:
    runs = [load_run(d) for d in run_dirs]
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>",
             _runs_table(runs), _winrate_section(runs), _ranking_section(runs), _reward_kl_section(runs),
             _diagnostics_section(runs), _behaviour_section(runs), _tax_section(runs), _samples_section(runs),
             "</body></html>"]
    return "\n".join(p for p in parts if p)


_FIGURE = re.compile(r"data-plot='([\w-]+)'><img alt='[^']*' src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


def write_report(run_dirs: list[str | Path], path: str | Path, title: str = "alignkit report",
                 png_dir: str | Path | None = None) -> Path:
    """Write the page; with ``png_dir``, also each plot as ``<png_dir>/<name>.png``."""
    path = Path(path)
    page = render_report(run_dirs, title)
    atomic_write_text(path, page)
    if png_dir is not None:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for name, data in _FIGURE.findall(page):
            (Path(png_dir) / f"{name}.png").write_bytes(base64.b64decode(data))
    return path


def run(cfg, resume: bool = False) -> dict:
    """``alignkit report``: write ``cfg.output`` from ``cfg.runs``."""
    if not cfg.runs:
        raise ValueError("runs: give at least one run directory (alignkit report RUN_DIR...)")
    try:
        path = write_report(cfg.runs, cfg.output, cfg.title)
    except ReportError as e:
        raise ValueError(str(e)) from None
    print(f"report: {path}")
    return {"report": str(path)}
