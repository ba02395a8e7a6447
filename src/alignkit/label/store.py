"""The labelling database: projects, annotators, items, assignments and votes in one SQLite file.

SQLite in WAL mode (readers never block the writer; a killed process leaves a database that opens cleanly), one
short ``BEGIN IMMEDIATE`` transaction per state change (assign an item, cast a vote, undo), and constraints that
make double counting impossible: ``UNIQUE(annotator_id, item_id)`` on votes and a client-generated ``vote_id``
that makes a retried POST return the vote already stored instead of adding one.

``synchronous=NORMAL``: a committed vote survives the death of the server process (``kill -9``); only a power cut
may lose the last commits. Tokens are stored as SHA-256 hashes.

Labels are stored in the item's stored response order (positions shown to an annotator are a per-annotator
permutation, :func:`display_order`):

* pairwise: ``"0"`` / ``"1"`` (that response is better), ``"tie"``, ``"both_bad"``;
* ranking: a list of K ranks, 1 = best (``ranks[i]`` is the rank of response i);
* binary: ``"good"`` / ``"bad"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from alignkit.label.candidates import Candidate

PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

LEASE_S = 600.0
"""An item handed to an annotator counts towards its overlap for this long; unlabelled after that, it may go to
someone else (the first annotator can still label it)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, task TEXT NOT NULL, overlap INTEGER NOT NULL,
  gold_rate REAL NOT NULL, guidelines TEXT NOT NULL, seed INTEGER NOT NULL, source TEXT NOT NULL,
  created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
  id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id), name TEXT NOT NULL,
  token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, UNIQUE(project_id, name));
CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id), record INTEGER NOT NULL,
  line INTEGER NOT NULL, prompt TEXT NOT NULL, responses TEXT NOT NULL, indices TEXT NOT NULL, models TEXT,
  gold TEXT, is_gold INTEGER NOT NULL, priority INTEGER NOT NULL,
  n_done INTEGER NOT NULL DEFAULT 0, open INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS items_queue ON items(project_id, is_gold, open, priority);
CREATE TABLE IF NOT EXISTS assignments (
  annotator_id INTEGER NOT NULL REFERENCES annotators(id), item_id INTEGER NOT NULL REFERENCES items(id),
  assigned_at REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(annotator_id, item_id));
CREATE INDEX IF NOT EXISTS assignments_item ON assignments(item_id);
CREATE TABLE IF NOT EXISTS votes (
  id INTEGER PRIMARY KEY, vote_id TEXT NOT NULL UNIQUE, annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  item_id INTEGER NOT NULL REFERENCES items(id), label TEXT NOT NULL, rationale TEXT NOT NULL DEFAULT '',
  seconds REAL NOT NULL, created_at REAL NOT NULL, UNIQUE(annotator_id, item_id));
"""


class LabelError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: the admin (every project) or one annotator of one project."""

    kind: str  # "admin" | "annotator"
    annotator_id: int | None = None
    project_id: int | None = None
    name: str = "admin"


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    task: str
    overlap: int
    gold_rate: float
    guidelines: str
    seed: int


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


def display_order(seed: int, annotator_id: int, item_id: int, k: int) -> list[int]:
    """The order in which annotator sees item's k responses: ``order[d]`` = stored index shown at position d.
    A fixed function of (project seed, annotator, item), so the page and the vote that follows agree."""
    rng = random.Random(f"{seed}:{annotator_id}:{item_id}")
    order = list(range(k))
    rng.shuffle(order)
    return order


def stored_label(task: str, choice: Any, order: list[int]) -> Any:
    """A choice as the annotator made it on screen -> the stored label (module docstring).

    pairwise: ``"A"``/``"B"`` (left/right), ``"tie"``, ``"both_bad"``; ranking: the on-screen positions from
    best to worst (a permutation of 0..K-1); binary: ``"good"``/``"bad"``.
    """
    if task == "pairwise":
        if choice in ("A", "B"):
            return str(order[0 if choice == "A" else 1])
        if choice in ("tie", "both_bad"):
            return choice
        raise LabelError(f"pairwise choice must be A, B, tie or both_bad, got {choice!r}", 422)
    if task == "binary":
        if choice in ("good", "bad"):
            return choice
        raise LabelError(f"binary choice must be good or bad, got {choice!r}", 422)
    k = len(order)
    if not isinstance(choice, list) or sorted(c for c in choice if isinstance(c, int)) != list(range(k)):
        raise LabelError(f"ranking choice must list the {k} on-screen positions 0..{k - 1} from best to worst, "
                         f"got {choice!r}", 422)
    ranks = [0] * k
    for rank, pos in enumerate(choice, start=1):
        ranks[order[pos]] = rank
    return ranks


def gold_score(task: str, label: Any, gold: Any) -> float:
    """Agreement of one vote with the gold answer, in [0, 1]: 1/0 for pairwise (tie and both_bad are wrong when the
    gold names a better response) and binary; for a ranking, the fraction of response pairs ordered as in the gold
    (e.g. gold [1, 2, 3], label [1, 3, 2]: pairs (0,1) (0,2) agree, (1,2) does not -> 2/3)."""
    if task != "ranking":
        return float(label == gold)
    pairs = [(i, j) for i in range(len(gold)) for j in range(i + 1, len(gold))]
    return sum((label[i] < label[j]) == (gold[i] < gold[j]) for i, j in pairs) / len(pairs)


class Store:
    """The database at ``path``. Each thread has its own connection (opened on first use, kept), so one Store
    serves a server's whole thread pool; SQLite serialises the writers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        yield con

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception): one writer at a time."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------ set-up
    def init(self) -> str | None:
        """Create the schema; on a new database, create and return the admin token (shown once), else None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.executescript(SCHEMA)
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM meta WHERE key='admin_token_hash'").fetchone():
                return None
            token = new_token()
            con.execute("INSERT INTO meta VALUES ('admin_token_hash', ?)", (hash_token(token),))
            con.execute("INSERT INTO meta VALUES ('csrf_secret', ?)", (secrets.token_hex(32),))
            return token

    def check_exists(self) -> None:
        if not self.path.is_file():
            raise LabelError(f"{self.path}: no such labelling database (create one with `alignkit label create`)", 404)

    def meta(self, key: str) -> str:
        with self.connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            raise LabelError(f"{self.path}: not a labelling database (no {key})", 500)
        return row["value"]

    def create_project(self, name: str, task: str, candidates: list[Candidate], order: list[int] | None = None,
                       overlap: int = 3, gold_rate: float = 0.1, guidelines: str = "", seed: int = 0,
                       source: str = "") -> int:
        """A project whose items are made from ``candidates``: pairwise -> one item per pair of responses of a
        prompt (K-choose-2), ranking -> one item per prompt, binary -> one item per response. Gold records become
        gold items. ``order`` (a permutation of the non-gold items, see :mod:`alignkit.label.select`) is the queue
        order; None keeps file order."""
        if not PROJECT_NAME.fullmatch(name):
            raise LabelError(f"project name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it goes in URLs), "
                             "starting with a letter or digit")
        if overlap < 1:
            raise LabelError(f"overlap must be >= 1, got {overlap}")
        if not 0 <= gold_rate < 1:
            raise LabelError(f"gold_rate must be in [0, 1), got {gold_rate}")
        items = project_items(task, candidates)
        regular = [n for n, it in enumerate(items) if it["gold"] is None]
        if order is not None and sorted(order) != list(range(len(regular))):
            raise LabelError(f"order must be a permutation of the {len(regular)} non-gold items")
        priority = {regular[pos]: rank for rank, pos in enumerate(order if order is not None else range(len(regular)))}
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM projects WHERE name=?", (name,)).fetchone():
                raise LabelError(f"a project named {name!r} already exists in {self.path}", 409)
            pid = con.execute(
                "INSERT INTO projects (name, task, overlap, gold_rate, guidelines, seed, source, created_at) "
                "VALUES (?,?,?,?,?,?,?,?)", (name, task, overlap, gold_rate, guidelines, seed, source, time.time()),
            ).lastrowid
            con.executemany(
                "INSERT INTO items (project_id, record, line, prompt, responses, indices, models, gold, is_gold, "
                "priority) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(pid, it["record"], it["line"], json.dumps(it["prompt"]), json.dumps(it["responses"]),
                  json.dumps(it["indices"]), None if it["models"] is None else json.dumps(it["models"]),
                  None if it["gold"] is None else json.dumps(it["gold"]), int(it["gold"] is not None),
                  priority.get(n, n))
                 for n, it in enumerate(items)],
            )
        return pid

    def add_annotator(self, project: str, name: str) -> str:
        """Invite ``name`` to ``project``; returns their token (only its hash is stored)."""
        token = new_token()
        with self.transaction() as con:
            p = self._project_row(con, project)
            if con.execute("SELECT 1 FROM annotators WHERE project_id=? AND name=?", (p["id"], name)).fetchone():
                raise LabelError(f"project {project!r} already has an annotator named {name!r}", 409)
            con.execute("INSERT INTO annotators (project_id, name, token_hash, created_at) VALUES (?,?,?,?)",
                        (p["id"], name, hash_token(token), time.time()))
        return token

    # ------------------------------------------------------------ look-ups
    @staticmethod
    def _project_row(con: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = con.execute("SELECT * FROM projects WHERE name=?", (name,)).fetchone()
        if row is None:
            names = [r["name"] for r in con.execute("SELECT name FROM projects ORDER BY id")]
            raise LabelError(f"no project named {name!r} (projects: {', '.join(names) or 'none'})", 404)
        return row

    def project(self, name: str) -> Project:
        with self.connect() as con:
            r = self._project_row(con, name)
        return Project(r["id"], r["name"], r["task"], r["overlap"], r["gold_rate"], r["guidelines"], r["seed"])

    def project_name(self, project_id: int) -> str:
        with self.connect() as con:
            return con.execute("SELECT name FROM projects WHERE id=?", (project_id,)).fetchone()["name"]

    def projects(self) -> list[str]:
        with self.connect() as con:
            return [r["name"] for r in con.execute("SELECT name FROM projects ORDER BY id")]

    def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        h = hash_token(token)
        with self.connect() as con:
            if secrets.compare_digest(self.meta("admin_token_hash"), h):
                return Principal("admin")
            row = con.execute("SELECT id, project_id, name FROM annotators WHERE token_hash=?", (h,)).fetchone()
        return None if row is None else Principal("annotator", row["id"], row["project_id"], row["name"])

    def item(self, item_id: int) -> dict:
        with self.connect() as con:
            row = con.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone()
        if row is None:
            raise LabelError(f"no item {item_id}", 404)
        return _item_dict(row)

    # ------------------------------------------------------------ the annotator's queue
    def next_item(self, project: Project, annotator_id: int, now: float | None = None) -> dict | None:
        """The item this annotator should label now, assigned to them in one transaction (None: nothing left).

        Their open (handed out, not yet labelled) item first; then a gold item if they are behind the gold rate
        (gold items seen < floor((seen + 1) * gold_rate)); then the first item in queue order that they have not
        seen and that fewer than ``overlap`` annotators hold (labelled, or handed out less than ``LEASE_S`` ago).
        """
        now = time.time() if now is None else now
        with self.transaction() as con:
            row = con.execute(
                "SELECT item_id FROM assignments WHERE annotator_id=? AND done=0 ORDER BY assigned_at LIMIT 1",
                (annotator_id,)).fetchone()
            if row is not None:
                return self._with_item(con, row["item_id"])
            seen, gold_seen = con.execute(
                "SELECT COUNT(*), COALESCE(SUM(i.is_gold), 0) FROM assignments s JOIN items i "
                "ON i.id = s.item_id WHERE s.annotator_id=?", (annotator_id,)).fetchone()
            pick = None
            if project.gold_rate > 0 and gold_seen < math.floor((seen + 1) * project.gold_rate):
                pick = con.execute(
                    "SELECT id FROM items i WHERE project_id=? AND is_gold=1 AND NOT EXISTS "
                    "(SELECT 1 FROM assignments s WHERE s.item_id=i.id AND s.annotator_id=?) ORDER BY priority LIMIT 1",
                    (project.id, annotator_id)).fetchone()
            if pick is None:
                pick = con.execute(
                    "SELECT id FROM items i WHERE project_id=? AND is_gold=0 AND open=1 AND NOT EXISTS "
                    "(SELECT 1 FROM assignments s WHERE s.item_id=i.id AND s.annotator_id=?) AND n_done + "
                    "(SELECT COUNT(*) FROM assignments s WHERE s.item_id=i.id AND s.done=0 AND s.assigned_at>?) < ? "
                    "ORDER BY priority LIMIT 1", (project.id, annotator_id, now - LEASE_S, project.overlap)).fetchone()
            if pick is None:
                return None
            con.execute("INSERT INTO assignments (annotator_id, item_id, assigned_at) VALUES (?,?,?)",
                        (annotator_id, pick["id"], now))
            return self._with_item(con, pick["id"])

    @staticmethod
    def _with_item(con: sqlite3.Connection, item_id: int) -> dict:
        return _item_dict(con.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone())

    def vote(self, project: Project, annotator_id: int, item_id: int, choice: Any, vote_id: str,
             rationale: str = "", now: float | None = None) -> dict:
        """Record a vote in one transaction; returns ``{"vote_id", "item_id", "duplicate"}``.

        A ``vote_id`` already stored for this annotator returns that vote with ``duplicate: True`` (a retried
        POST), so a vote is never counted twice; a second, different vote on the same item is refused (409: undo
        first)."""
        now = time.time() if now is None else now
        if not isinstance(vote_id, str) or not 8 <= len(vote_id) <= 64:
            raise LabelError("vote_id must be a string of 8 to 64 characters (a fresh random id per vote)", 422)
        if not isinstance(rationale, str) or len(rationale) > 5000:
            raise LabelError("rationale must be a string of at most 5000 characters", 422)
        with self.transaction() as con:
            old = con.execute("SELECT annotator_id, item_id FROM votes WHERE vote_id=?", (vote_id,)).fetchone()
            if old is not None:
                if old["annotator_id"] != annotator_id or old["item_id"] != item_id:
                    raise LabelError("this vote_id is already used by another vote", 409)
                return {"vote_id": vote_id, "item_id": item_id, "duplicate": True}
            a = con.execute("SELECT s.assigned_at, s.done, i.project_id, i.responses FROM assignments s JOIN items i "
                            "ON i.id=s.item_id WHERE s.annotator_id=? AND s.item_id=?",
                            (annotator_id, item_id)).fetchone()
            if a is None or a["project_id"] != project.id:
                raise LabelError(f"item {item_id} is not assigned to you", 409)
            if a["done"]:
                raise LabelError(f"you already labelled item {item_id} (undo it first to change the label)", 409)
            k = len(json.loads(a["responses"]))
            label = stored_label(project.task, choice, display_order(project.seed, annotator_id, item_id, k))
            con.execute("INSERT INTO votes (vote_id, annotator_id, item_id, label, rationale, seconds, created_at) "
                        "VALUES (?,?,?,?,?,?,?)", (vote_id, annotator_id, item_id, json.dumps(label), rationale,
                                                   max(0.0, now - a["assigned_at"]), now))
            con.execute("UPDATE assignments SET done=1 WHERE annotator_id=? AND item_id=?", (annotator_id, item_id))
            con.execute("UPDATE items SET n_done=n_done+1, open=(is_gold=1 OR n_done+1<?) WHERE id=?",
                        (project.overlap, item_id))
        return {"vote_id": vote_id, "item_id": item_id, "duplicate": False}

    def undo(self, project: Project, annotator_id: int, now: float | None = None) -> int | None:
        """Delete the annotator's latest vote; the item becomes their open item again (shown next). Returns its id."""
        now = time.time() if now is None else now
        with self.transaction() as con:
            row = con.execute("SELECT id, item_id FROM votes WHERE annotator_id=? ORDER BY id DESC LIMIT 1",
                              (annotator_id,)).fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM votes WHERE id=?", (row["id"],))
            con.execute("UPDATE items SET n_done=n_done-1, open=(is_gold=1 OR n_done-1<?) WHERE id=?",
                        (project.overlap, row["item_id"]))
            # other open items go back to the queue: the undone one is shown next
            con.execute("DELETE FROM assignments WHERE annotator_id=? AND done=0", (annotator_id,))
            con.execute("UPDATE assignments SET done=0, assigned_at=? WHERE annotator_id=? AND item_id=?",
                        (now, annotator_id, row["item_id"]))
            return row["item_id"]

    def progress(self, project: Project, annotator_id: int) -> dict:
        """``{"done": votes cast, "remaining": items this annotator could still get, "total": done + remaining}``."""
        with self.connect() as con:
            done = con.execute("SELECT COUNT(*) FROM votes WHERE annotator_id=?", (annotator_id,)).fetchone()[0]
            open_items = con.execute("SELECT COUNT(*) FROM items WHERE project_id=? AND is_gold=0 AND open=1",
                                     (project.id,)).fetchone()[0]
            mine = con.execute("SELECT COUNT(*) FROM assignments s JOIN items i ON i.id=s.item_id WHERE "
                               "s.annotator_id=? AND s.done=1 AND i.is_gold=0 AND i.open=1", (annotator_id,)).fetchone()[0]
            remaining = open_items - mine
        return {"done": done, "remaining": remaining, "total": done + remaining}

    # ------------------------------------------------------------ everything, for stats and export
    def project_data(self, project: Project) -> dict:
        """``{"items": {id: item}, "votes": [vote], "annotators": {id: name}}`` for a project."""
        with self.connect() as con:
            items = {r["id"]: _item_dict(r) for r in con.execute("SELECT * FROM items WHERE project_id=?", (project.id,))}
            annotators = {r["id"]: r["name"] for r in
                          con.execute("SELECT id, name FROM annotators WHERE project_id=? ORDER BY id", (project.id,))}
            votes = [{"vote_id": r["vote_id"], "annotator_id": r["annotator_id"], "item_id": r["item_id"],
                      "label": json.loads(r["label"]), "rationale": r["rationale"], "seconds": r["seconds"],
                      "created_at": r["created_at"]}
                     for r in con.execute("SELECT v.* FROM votes v JOIN items i ON i.id=v.item_id WHERE i.project_id=? "
                                          "ORDER BY v.id", (project.id,))]
        return {"items": items, "votes": votes, "annotators": annotators}


def _item_dict(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "project_id": row["project_id"], "record": row["record"], "line": row["line"],
            "prompt": json.loads(row["prompt"]), "responses": json.loads(row["responses"]),
            "indices": json.loads(row["indices"]), "models": None if row["models"] is None else json.loads(row["models"]),
            "gold": None if row["gold"] is None else json.loads(row["gold"]), "priority": row["priority"]}


def project_items(task: str, candidates: list[Candidate]) -> list[dict]:
    """Candidates -> items (see :meth:`Store.create_project`); ``indices`` are the responses' indices in the record."""
    items = []
    for r, c in enumerate(candidates):
        k = len(c.responses)
        if task == "pairwise":
            groups = [[i, j] for i in range(k) for j in range(i + 1, k)]
        elif task == "ranking":
            groups = [list(range(k))]
        else:
            groups = [[i] for i in range(k)]
        for idx in groups:
            gold = c.gold
            if gold is not None and task == "binary":
                gold = "good" if c.gold[idx[0]] else "bad"
            items.append({"record": r, "line": c.line, "prompt": c.prompt, "responses": [c.responses[i] for i in idx],
                          "indices": idx, "models": None if c.models is None else [c.models[i] for i in idx],
                          "gold": gold})
    return items

