"""Helpers for the labelling-app tests: a real `alignkit label serve` in a subprocess on a free port, a project
with invite tokens, and a small HTTP client (stdlib urllib) that logs in like the browser does."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from alignkit.label.candidates import load_candidates
from alignkit.label.store import Store

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_db(tmp_path: Path, records: list[dict], annotators: list[str], project: str = "demo", task: str = "pairwise",
            overlap: int = 3, gold_rate: float = 0.0, guidelines: str = "Prefer the helpful, honest answer.",
            db: Path | None = None) -> tuple[Path, str | None, dict[str, str]]:
    """A database holding ``project``; returns (db path, admin token or None if the db existed, {name: token})."""
    db = db or tmp_path / "labels.db"
    cands = tmp_path / f"{project}.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in records))
    store = Store(db)
    admin = store.init()
    store.create_project(project, task, load_candidates(str(cands), task), overlap=overlap, gold_rate=gold_rate,
                         guidelines=guidelines, seed=5)
    tokens = {name: store.add_annotator(project, name) for name in annotators}
    store.close()
    return db, admin, tokens


@contextmanager
def serve(db: Path, port: int | None = None, *flags: str):
    """``alignkit label serve`` in a subprocess; yields (base url, Popen). Killed (SIGKILL) at the end if alive."""
    port = port or free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "label", "serve", "--db", str(db), "--port", str(port), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/login", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"label server did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
                time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Client:
    """One annotator's HTTP session: the cookie from ``POST /api/login`` and the CSRF token from the page."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url, self.cookie, self.csrf, self.timeout = url, None, "", timeout
        self.opener = urllib.request.build_opener(NoRedirect)
        if token is not None:
            self.login(token)

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None,
                cookie: bool = True, csrf: bool = True) -> tuple[int, dict | str, dict]:
        h = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if cookie and self.cookie:
            h["Cookie"] = self.cookie
        if csrf and self.csrf and method == "POST":
            h["X-CSRF-Token"] = self.csrf
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with self.opener.open(req, timeout=self.timeout) as r:
                status, raw, hdrs = r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, raw, hdrs = e.code, e.read().decode(), dict(e.headers)
        try:
            return status, json.loads(raw), hdrs
        except ValueError:
            return status, raw, hdrs

    def login(self, token: str) -> None:
        status, body, headers = self.request("POST", "/api/login", {"token": token})
        assert status == 200, body
        self.cookie = headers["set-cookie"].split(";")[0]
        self.csrf = ""

    def page(self, path: str) -> tuple[int, str, dict]:
        status, html, headers = self.request("GET", path)
        m = re.search(r'<script type="application/json" id="state">(.*?)</script>', html if isinstance(html, str) else "")
        if m:
            self.csrf = json.loads(m.group(1))["csrf"]
        return status, html, headers
