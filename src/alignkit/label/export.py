"""Votes -> the data formats alignkit trains on (``alignkit label export``).

* ``pairs`` (pairwise and ranking projects) -> ``{"prompt", "chosen", "rejected", "votes", "label_prob"}`` for
  ``alignkit rm`` / ``alignkit dpo``. For each pair of responses the votes are counted: n_chosen, n_rejected,
  n_tie, n_both_bad (a ranking counts as one vote for its higher-ranked response in each of its pairs).
  ``chosen`` is the response with more votes; ``label_prob = (n_chosen + n_tie / 2) / (n_chosen + n_rejected +
  n_tie)``, the soft label (a tie is half a vote each way; both-bad votes say nothing about which is better and
  are left out). A pair is not exported when n_chosen == n_rejected (no majority, including all-tie), when
  both-bad votes are a strict majority of its votes (neither response should be learned as "chosen"), or when
  it has fewer than ``min_votes`` votes.
* ``ranked`` (ranking projects) -> ``{"prompt", "responses", "ranking", "votes"}``: each response's mean rank over
  the annotators, turned into ranks 1..K (1 = best; equal means share a rank). alignkit expands it to all
  K-choose-2 pairs.
* ``kto`` (binary projects) -> ``{"prompt", "completion", "label", "votes", "label_prob"}``: label = majority of
  good/bad votes, ``label_prob`` = the fraction of good votes; equal counts are not exported.

Gold items are quality checks and are never exported. ``models`` (when the candidates had them) is kept as
``chosen_model``/``rejected_model``, ``models`` or ``model``. Every record also has ``"source": {"project",
"line"}``, the candidates-file line it came from.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

FORMATS = {"pairs": ("pairwise", "ranking"), "ranked": ("ranking",), "kto": ("binary",)}


def pair_votes(task: str, items: dict[int, dict], votes: list[dict]) -> dict[tuple[int, int, int], dict]:
    """{(record, i, j): {"item": item, "counts": {"i": n, "j": n, "tie": n, "both_bad": n}}} with i < j the
    responses' indices in the candidate record, over the non-gold votes."""
    out: dict[tuple[int, int, int], dict] = {}
    for v in votes:
        item = items[v["item_id"]]
        if item["gold"] is not None:
            continue
        idx, label = item["indices"], v["label"]
        if task == "pairwise":
            cast = [(0, 1, {"0": "i", "1": "j"}.get(label, label))]
        else:
            cast = [(a, b, "i" if label[a] < label[b] else "j") for a, b in combinations(range(len(idx)), 2)]
        for a, b, what in cast:
            key = (item["record"], idx[a], idx[b])
            entry = out.setdefault(key, {"item": item, "pos": (a, b), "counts": dict.fromkeys(("i", "j", "tie", "both_bad"), 0)})
            entry["counts"][what] += 1
    return out


def export_pairs(project, data: dict, min_votes: int = 1) -> tuple[list[dict], dict]:
    """Preference-pair records and a summary ``{"exported", "no_majority", "both_bad", "too_few_votes"}``."""
    records, summary = [], defaultdict(int)
    for (record, i, j), e in sorted(pair_votes(project.task, data["items"], data["votes"]).items()):
        c, item, (a, b) = e["counts"], e["item"], e["pos"]
        total = sum(c.values())
        if total < min_votes:
            summary["too_few_votes"] += 1
            continue
        if 2 * c["both_bad"] > total:
            summary["both_bad"] += 1
            continue
        if c["i"] == c["j"]:
            summary["no_majority"] += 1
            continue
        (w, nw), (lo, nl) = sorted([(a, c["i"]), (b, c["j"])], key=lambda t: -t[1])
        rec = {"prompt": item["prompt"], "chosen": item["responses"][w], "rejected": item["responses"][lo],
               "votes": {"chosen": nw, "rejected": nl, "tie": c["tie"], "both_bad": c["both_bad"]},
               "label_prob": (nw + c["tie"] / 2) / (nw + nl + c["tie"])}
        if item["models"] is not None:
            rec["chosen_model"], rec["rejected_model"] = item["models"][w], item["models"][lo]
        rec["source"] = {"project": project.name, "line": item["line"]}
        records.append(rec)
        summary["exported"] += 1
    return records, dict(summary)


def mean_rank_ranking(mean_ranks: list[float]) -> list[int]:
    """Mean ranks -> ranks 1..K (1 = best); equal means share the better rank. E.g. [1.5, 1.5, 3.0] -> [1, 1, 3];
    [2.0, 1.0, 2.5] -> [2, 1, 3]."""
    return [1 + sum(m2 < m for m2 in mean_ranks) for m in mean_ranks]


def export_ranked(project, data: dict, min_votes: int = 1) -> tuple[list[dict], dict]:
    by_item: dict[int, list[list[int]]] = defaultdict(list)
    for v in data["votes"]:
        if data["items"][v["item_id"]]["gold"] is None:
            by_item[v["item_id"]].append(v["label"])
    records, summary = [], defaultdict(int)
    for item_id in sorted(by_item):
        rankings, item = by_item[item_id], data["items"][item_id]
        if len(rankings) < min_votes:
            summary["too_few_votes"] += 1
            continue
        means = [sum(r[k] for r in rankings) / len(rankings) for k in range(len(item["responses"]))]
        ranking = mean_rank_ranking(means)
        if len(set(ranking)) == 1:
            summary["no_majority"] += 1
            continue
        rec = {"prompt": item["prompt"], "responses": item["responses"], "ranking": ranking,
               "votes": {"n": len(rankings), "mean_rank": means}}
        if item["models"] is not None:
            rec["models"] = item["models"]
        rec["source"] = {"project": project.name, "line": item["line"]}
        records.append(rec)
        summary["exported"] += 1
    return records, dict(summary)


def export_kto(project, data: dict, min_votes: int = 1) -> tuple[list[dict], dict]:
    counts: dict[int, dict[str, int]] = defaultdict(lambda: {"good": 0, "bad": 0})
    for v in data["votes"]:
        if data["items"][v["item_id"]]["gold"] is None:
            counts[v["item_id"]][v["label"]] += 1
    records, summary = [], defaultdict(int)
    for item_id in sorted(counts):
        c, item = counts[item_id], data["items"][item_id]
        if c["good"] + c["bad"] < min_votes:
            summary["too_few_votes"] += 1
            continue
        if c["good"] == c["bad"]:
            summary["no_majority"] += 1
            continue
        rec = {"prompt": item["prompt"], "completion": item["responses"][0], "label": c["good"] > c["bad"],
               "votes": dict(c), "label_prob": c["good"] / (c["good"] + c["bad"])}
        if item["models"] is not None:
            rec["model"] = item["models"][0]
        rec["source"] = {"project": project.name, "line": item["line"]}
        records.append(rec)
        summary["exported"] += 1
    return records, dict(summary)


EXPORTERS = {"pairs": export_pairs, "ranked": export_ranked, "kto": export_kto}


def export(project, data: dict, fmt: str, min_votes: int = 1) -> tuple[list[dict], dict]:
    """Records in format ``fmt`` (module docstring) and a summary of what was exported and skipped."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORTERS)}")
    if project.task not in FORMATS[fmt]:
        fits = [f for f, tasks in FORMATS.items() if project.task in tasks]
        raise ValueError(f"format {fmt!r} needs a {' or '.join(FORMATS[fmt])} project; project {project.name!r} "
                         f"is {project.task} (its formats: {', '.join(fits)})")
    return EXPORTERS[fmt](project, data, min_votes)
