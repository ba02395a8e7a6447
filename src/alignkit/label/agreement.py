"""Agreement between annotators and the quality figures of a project (``alignkit label stats``, the admin page).

What is compared ("units" and their nominal categories):

* pairwise: one unit per item; categories ``"0"``, ``"1"`` (which response is better), ``"tie"``, ``"both_bad"``.
  Tie and both-bad are categories of their own: two annotators agree only when they give the same one.
* ranking: one unit per pair of responses of an item; category ``"<"`` or ``">"`` (is the first response ranked
  above the second), so annotators who agree on most of a ranking get most of the credit.
* binary: one unit per item; categories ``"good"``, ``"bad"``.

Gold items are left out of agreement (they measure accuracy instead). Coefficients:

* Cohen's kappa for each pair of annotators on the units both labelled (``statsmodels.stats.inter_rater.cohens_kappa``);
* Fleiss' kappa on the units labelled by exactly r annotators, r the most common count >= 2 (Fleiss' kappa
  assumes the same number of raters per unit; ``statsmodels.stats.inter_rater.fleiss_kappa``);
* Krippendorff's alpha (nominal) on every unit with >= 2 labels (it handles missing labels; ``krippendorff``).

A coefficient is ``None`` when it is undefined (no shared units, or every label in one category).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any, Hashable

import numpy as np

from alignkit.label.store import gold_score

Units = dict[Hashable, dict[int, str]]
"""unit key -> {annotator id: category}."""


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def units_from_votes(task: str, items: dict[int, dict], votes: list[dict], gold: bool = False) -> Units:
    """The votes on non-gold items (``gold=True``: on gold items) as units (module docstring)."""
    units: Units = defaultdict(dict)
    for v in votes:
        item = items[v["item_id"]]
        if (item["gold"] is not None) != gold:
            continue
        label = v["label"]
        if task == "ranking":
            for i, j in combinations(range(len(label)), 2):
                units[(v["item_id"], i, j)][v["annotator_id"]] = "<" if label[i] < label[j] else ">"
        else:
            units[v["item_id"]][v["annotator_id"]] = str(label)
    return dict(units)


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two annotators' categories on the same units: (p_o - p_e) / (1 - p_e).

    Example: a = [x, x, y, y], b = [x, y, y, y]: p_o = 3/4; p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2; kappa = 0.5.
    """
    from statsmodels.stats.inter_rater import cohens_kappa

    if len(a) != len(b) or not a:
        return None
    cats = sorted(set(a) | set(b))
    table = np.zeros((len(cats), len(cats)))
    for x, y in zip(a, b):
        table[cats.index(x), cats.index(y)] += 1
    if len(cats) == 1:
        return None  # p_e = 1: kappa is 0/0
    return _finite(cohens_kappa(table, return_results=False))


def fleiss_kappa(units: Units) -> tuple[float | None, int, int]:
    """Fleiss' kappa on the units with exactly r labels, r the most common label count >= 2.

    Returns (kappa, number of units used, r). Example, 3 units x 3 raters, labels [x x x], [x x y], [y y y]:
    P_i = 1, 1/3, 1 -> mean 7/9; p_x = 5/9, p_y = 4/9 -> P_e = 41/81; kappa = (7/9 - 41/81) / (40/81) = 0.55.
    """
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

    counts = Counter(len(u) for u in units.values() if len(u) >= 2)
    if not counts:
        return None, 0, 0
    r = max(counts, key=lambda c: (counts[c], c))
    rows = [list(u.values()) for u in units.values() if len(u) == r]
    cats = sorted({c for row in rows for c in row})
    if len(cats) < 2:
        return None, len(rows), r
    table = np.array([[row.count(c) for c in cats] for row in rows])  # [units, categories]
    return _finite(sm_fleiss(table)), len(rows), r


def krippendorff_alpha(units: Units) -> tuple[float | None, int]:
    """Krippendorff's alpha, nominal, on the units with >= 2 labels: 1 - D_o / D_e. Returns (alpha, units used).

    Example (the Fleiss example): n = 9 pairable labels; observed disagreement D_o = (1/n) * sum over units of
    (mismatched ordered pairs)/(m_u - 1) = (4/2)/9 = 2/9; expected D_e = (sum_{c != k} n_c n_k)/(n(n - 1)) =
    2*5*4/72 = 5/9; alpha = 1 - (2/9)/(5/9) = 0.6.
    """
    import krippendorff

    used = [u for u in units.values() if len(u) >= 2]
    cats = sorted({c for u in used for c in u.values()})
    if not used or len(cats) < 2:
        return None, len(used)
    raters = sorted({a for u in used for a in u})
    data = np.full((len(raters), len(used)), np.nan)  # [raters, units], nan = not labelled
    for n, u in enumerate(used):
        for a, c in u.items():
            data[raters.index(a), n] = cats.index(c)
    return _finite(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")), len(used)


def majority_agreement(units: Units) -> dict[int, tuple[int, int]]:
    """Each annotator's agreement with the majority of the OTHER annotators (leave-one-out, so an annotator does
    not vote on their own reference): {annotator: (agreed, units compared)}. A unit counts only where the others'
    most common category is unique (strict plurality)."""
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for u in units.values():
        for a, c in u.items():
            others = Counter(c2 for a2, c2 in u.items() if a2 != a).most_common()
            if not others or (len(others) > 1 and others[0][1] == others[1][1]):
                continue
            out[a][0] += int(others[0][0] == c)
            out[a][1] += 1
    return {a: (n[0], n[1]) for a, n in out.items()}


def project_stats(project, data: dict, threshold: float = 0.6, min_n: int = 3) -> dict[str, Any]:
    """Progress, agreement coefficients and per-annotator quality of a project (``Store.project_data`` output).

    An annotator is flagged when their gold accuracy or their agreement with the majority is below ``threshold``,
    each judged only once they have at least ``min_n`` gold votes / compared units.
    """
    items, votes, names = data["items"], data["votes"], data["annotators"]
    regular = [i for i in items.values() if i["gold"] is None]
    per_item = Counter(v["item_id"] for v in votes)
    units = units_from_votes(project.task, items, votes)
    maj = majority_agreement(units)
    gold: dict[int, list[float]] = defaultdict(list)
    seconds: dict[int, list[float]] = defaultdict(list)
    count: Counter = Counter()
    for v in votes:
        item = items[v["item_id"]]
        count[v["annotator_id"]] += 1
        seconds[v["annotator_id"]].append(v["seconds"])
        if item["gold"] is not None:
            gold[v["annotator_id"]].append(gold_score(project.task, v["label"], item["gold"]))
    annotators = []
    for a, name in names.items():
        g, m = gold.get(a, []), maj.get(a, (0, 0))
        row = {"name": name, "votes": count[a],
               "gold_n": len(g), "gold_accuracy": sum(g) / len(g) if g else None,
               "majority_n": m[1], "majority_agreement": m[0] / m[1] if m[1] else None,
               "median_seconds": statistics.median(seconds[a]) if seconds[a] else None, "flags": []}
        if len(g) >= min_n and row["gold_accuracy"] < threshold:
            row["flags"].append(f"gold accuracy {row['gold_accuracy']:.2f} < {threshold}")
        if m[1] >= min_n and row["majority_agreement"] < threshold:
            row["flags"].append(f"majority agreement {row['majority_agreement']:.2f} < {threshold}")
        annotators.append(row)
    by_annotator: dict[int, dict] = defaultdict(dict)
    for key, u in units.items():
        for a, c in u.items():
            by_annotator[a][key] = c
    cohen = []
    for a, b in combinations(sorted(names), 2):
        shared = sorted(set(by_annotator[a]) & set(by_annotator[b]), key=str)
        kappa = cohen_kappa([by_annotator[a][k] for k in shared], [by_annotator[b][k] for k in shared])
        cohen.append({"a": names[a], "b": names[b], "n": len(shared), "kappa": kappa})
    fk, fk_n, fk_r = fleiss_kappa(units)
    alpha, alpha_n = krippendorff_alpha(units)
    complete = sum(1 for i in regular if per_item[i["id"]] >= project.overlap)
    return {
        "project": project.name, "task": project.task, "overlap": project.overlap,
        "items": len(regular), "gold_items": len(items) - len(regular), "votes": len(votes),
        "items_complete": complete, "progress": complete / len(regular) if regular else 0.0,
        "fleiss_kappa": fk, "fleiss_units": fk_n, "fleiss_raters": fk_r,
        "krippendorff_alpha": alpha, "alpha_units": alpha_n,
        "cohen_kappa": cohen, "annotators": annotators, "threshold": threshold,
        "flagged": [r["name"] for r in annotators if r["flags"]],
    }


def format_stats(s: dict) -> str:
    """``project_stats`` as the text ``alignkit label stats`` prints."""
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"project {s['project']} ({s['task']}, overlap {s['overlap']}): {s['items_complete']}/{s['items']} items "
             f"complete ({100 * s['progress']:.1f}%), {s['votes']} votes, {s['gold_items']} gold items",
             f"Fleiss' kappa {f(s['fleiss_kappa'])} ({s['fleiss_units']} units x {s['fleiss_raters']} raters); "
             f"Krippendorff's alpha {f(s['krippendorff_alpha'])} ({s['alpha_units']} units)",
             "Cohen's kappa per pair:"]
    lines += [f"  {c['a']} ~ {c['b']}: {f(c['kappa'])} on {c['n']} shared units" for c in s["cohen_kappa"]]
    lines.append("annotators: votes, gold accuracy (n), agreement with the others' majority (n), median s/item")
    for r in s["annotators"]:
        lines.append(f"  {r['name']}: {r['votes']}, {f(r['gold_accuracy'])} ({r['gold_n']}), "
                     f"{f(r['majority_agreement'])} ({r['majority_n']}), {f(r['median_seconds'])}"
                     + (f"  FLAG: {'; '.join(r['flags'])}" if r["flags"] else ""))
    return "\n".join(lines)
