"""``alignkit label <create|invite|serve|stats|export>``: the labelling app's commands (flags, no config file).

    alignkit label create --db labels.db --project haiku --candidates runs/sample/candidates.jsonl \\
        --task pairwise --overlap 3 --gold-rate 0.1 --annotators alice,bob,carol --guidelines "Prefer ..."
    alignkit label serve --db labels.db                      # http://127.0.0.1:8000, log in with a token
    alignkit label stats --db labels.db --project haiku
    alignkit label export --db labels.db --project haiku --format pairs --out prefs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignkit.data.io import DataError
from alignkit.data.tokenize import render_prompt
from alignkit.io_utils import atomic_write_text
from alignkit.label.agreement import format_stats, project_stats
from alignkit.label.candidates import TASKS, load_candidates
from alignkit.label.export import EXPORTERS, export
from alignkit.label.store import LabelError, Store, project_items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit label", description="Collect human preferences in the browser: "
                                     "create a project from a candidates file, serve it, watch agreement, export "
                                     "training data. See docs/labelling.md.")
    sub = parser.add_subparsers(dest="sub", metavar="SUBCOMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--db", default="labels.db", help="the SQLite database (default: labels.db)")
        return p

    p = add("create", "make a project from a candidates file ({prompt, responses: [...], models?, gold?} per line)")
    p.add_argument("--project", required=True, help="project name (unique in the database)")
    p.add_argument("--candidates", required=True, help="candidates file (e.g. from `alignkit sample`)")
    p.add_argument("--task", choices=TASKS, default="pairwise",
                   help="pairwise: A/B/tie/both bad on each pair of responses; ranking: order all K; binary: good/bad")
    p.add_argument("--overlap", type=int, default=3, help="annotators per item (default 3)")
    p.add_argument("--gold-rate", type=float, default=0.1,
                   help="fraction of each annotator's items drawn from the gold questions (records with 'gold')")
    p.add_argument("--guidelines", default="", help="text shown on the labelling page, or @file to read it from a file")
    p.add_argument("--annotators", default="", help="comma-separated names to invite now (their tokens are printed)")
    p.add_argument("--seed", type=int, default=0, help="seeds the queue order and the on-screen positions")
    p.add_argument("--ensemble", default=None,
                   help="a reward-model ensemble directory: queue first the items its members disagree on most")

    p = add("invite", "add an annotator to a project and print their invite token")
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True)

    p = add("serve", "run the labelling web app")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--markdown", action="store_true",
                   help="render prompts and responses as Markdown (raw HTML stays escaped); default: plain text")

    p = add("stats", "progress, Cohen's/Fleiss' kappa, Krippendorff's alpha, per-annotator quality")
    p.add_argument("--project", required=True)
    p.add_argument("--threshold", type=float, default=0.6, help="flag annotators below this gold/majority agreement")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("export", "write training data from the votes")
    p.add_argument("--project", required=True)
    p.add_argument("--format", choices=list(EXPORTERS), default="pairs",
                   help="pairs: {prompt, chosen, rejected} for rm/dpo; ranked: {prompt, responses, ranking}; kto")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--min-votes", type=int, default=1, help="skip items with fewer votes")
    return parser


def _prompt_text(prompt, tokenizer) -> str:
    """The prompt as the ensemble's reward models saw it in training: rendered with their tokenizer's chat template
    (``render_prompt``); a scorer without a tokenizer gets the text as written."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer is None:
        return "".join(m["content"] + "\n\n" for m in messages)
    return render_prompt(tokenizer, messages)


def queue_order(task: str, candidates, seed: int, ensemble: str | None) -> list[int]:
    """Queue order of the non-gold items: by ensemble disagreement when ``ensemble`` is given, else random
    stratified by prompt."""
    from alignkit.label.select import disagreement_order, item_disagreement, stratified_order  # imports torch

    items = [it for it in project_items(task, candidates) if it["gold"] is None]
    groups = [it["record"] for it in items]
    if ensemble is None:
        return stratified_order(groups, seed)
    from alignkit.rewards.ensemble import load_ensemble  # only this path needs the reward-model layer

    members = load_ensemble(ensemble)
    disagreement = [0.0] * len(items)
    by_record: dict[int, list[int]] = {}
    for n, it in enumerate(items):
        by_record.setdefault(it["record"], []).append(n)
    for record, ns in by_record.items():
        c = candidates[record]
        prompt = _prompt_text(c.prompt, getattr(members, "tokenizer", None))
        scores = members.member_scores([prompt] * len(c.responses), c.responses)  # [M, K]
        d = item_disagreement(scores.float().cpu(), [items[n]["indices"] for n in ns])
        for n, value in zip(ns, d.tolist()):
            disagreement[n] = value
    return disagreement_order(disagreement, groups, seed)


def cmd_create(a) -> int:
    guidelines = a.guidelines
    if guidelines.startswith("@"):
        guidelines = Path(guidelines[1:]).read_text(encoding="utf-8")
    candidates = load_candidates(a.candidates, a.task)
    store = Store(a.db)
    admin = store.init()
    order = queue_order(a.task, candidates, a.seed, a.ensemble)
    store.create_project(a.project, a.task, candidates, order, overlap=a.overlap, gold_rate=a.gold_rate,
                         guidelines=guidelines, seed=a.seed, source=str(a.candidates))
    n_gold = sum(c.gold is not None for c in candidates)
    print(f"project {a.project!r} ({a.task}) in {a.db}: {len(candidates)} records ({n_gold} gold), "
          f"{len(order)} items to label, each by {a.overlap} annotators"
          + (", ordered by ensemble disagreement" if a.ensemble else ", random order stratified by prompt"))
    if admin:
        print(f"admin token (shown once; keep it secret): {admin}")
    else:
        print(f"(added to the existing database {a.db}: its admin token is unchanged)")
    for name in [n.strip() for n in a.annotators.split(",") if n.strip()]:
        print(f"invite token for {name}: {store.add_annotator(a.project, name)}")
    print(f"next: alignkit label serve --db {a.db}   (then open http://127.0.0.1:8000 and log in with a token)")
    return 0


def cmd_invite(a) -> int:
    store = Store(a.db)
    store.check_exists()
    print(f"invite token for {a.name}: {store.add_annotator(a.project, a.name)}")
    return 0


def cmd_serve(a) -> int:
    import uvicorn

    from alignkit.label.app import make_app

    app = make_app(a.db, markdown=a.markdown)
    print(f"alignkit label: serving {a.db} on http://{a.host}:{a.port} (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


def cmd_stats(a) -> int:
    store = Store(a.db)
    store.check_exists()
    project = store.project(a.project)
    s = project_stats(project, store.project_data(project), threshold=a.threshold)
    print(json.dumps(s, indent=1) if a.json else format_stats(s))
    return 0


def cmd_export(a) -> int:
    store = Store(a.db)
    store.check_exists()
    project = store.project(a.project)
    records, summary = export(project, store.project_data(project), a.format, a.min_votes)
    atomic_write_text(Path(a.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"exported {len(records)} {a.format} records to {a.out}; skipped: "
          + (", ".join(f"{k} {v}" for k, v in summary.items() if k != "exported") or "none"))
    if not records:
        print("note: nothing to export yet (no item has a majority)", file=sys.stderr)
    return 0


COMMANDS = {"create": cmd_create, "invite": cmd_invite, "serve": cmd_serve, "stats": cmd_stats, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.sub:
        parser.print_help()
        return 2
    try:
        return COMMANDS[a.sub](a)
    except (LabelError, DataError, ValueError, OSError) as e:
        print(f"alignkit label {a.sub}: error: {e}", file=sys.stderr)
        return 1
