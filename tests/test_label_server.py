"""The labelling app over real HTTP: `alignkit label serve` in a subprocess on a free port.

Security (login, CSRF, another project, the admin page, escaping), then reliability: 20 concurrent annotators cast
2,000 votes (none lost or double-counted), and `kill -9` mid-run loses nothing that was acknowledged.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter

import pytest

from label_server import Client, make_db, serve

XSS = ["<script>alert('pwned')</script>", "<img src=x onerror=alert(1)>"]


def pair_records(n: int, k: int = 2, prefix: str = "p") -> list[dict]:
    return [{"prompt": f"{prefix} prompt {i}", "responses": [f"{prefix}{i} answer {j}" for j in range(k)]} for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label_server")
    records = [{"prompt": "Is this safe? <b>bold</b>", "responses": XSS}] + pair_records(5)
    db, admin, tokens = make_db(tmp, records, ["ann", "other"], overlap=2)
    _, _, other_tokens = make_db(tmp, pair_records(3, prefix="q"), ["stranger"], project="secret", db=db)
    with serve(db) as (url, _):
        yield {"url": url, "admin": admin, "tokens": {**tokens, **other_tokens}, "db": db}


def test_login_required_and_bad_tokens_refused(server):
    c = Client(server["url"])
    status, _, headers = c.request("GET", "/p/demo")
    assert status == 303 and headers["location"] == "/login"
    status, body, _ = c.request("POST", "/api/p/demo/vote", {"item_id": 1, "choice": "A", "vote_id": "x" * 10})
    assert status == 401 and "log in" in body["detail"]
    status, body, _ = c.request("POST", "/api/login", {"token": "not-a-token"})
    assert status == 401 and body["detail"] == "unknown token"


def test_csrf_token_required_for_cookie_posts(server):
    c = Client(server["url"], server["tokens"]["ann"])
    status, html, headers = c.page("/p/demo")
    assert status == 200 and c.csrf and "HttpOnly" in Client(server["url"]).request(
        "POST", "/api/login", {"token": server["tokens"]["ann"]})[2]["set-cookie"]
    item_id = c.request("GET", "/api/p/demo/next")[1]["item_id"]
    vote = {"item_id": item_id, "choice": "A", "vote_id": uuid.uuid4().hex}
    status, body, _ = c.request("POST", "/api/p/demo/vote", vote, csrf=False)
    assert status == 403 and "CSRF" in body["detail"]
    status, body, _ = c.request("POST", "/api/p/demo/vote", vote, headers={"X-CSRF-Token": "0" * 64}, csrf=False)
    assert status == 403
    status, body, _ = c.request("POST", "/api/p/demo/vote", vote, headers={"Content-Type": "text/plain"})
    assert status == 415  # a cross-site form cannot send JSON
    status, body, _ = c.request("POST", "/api/p/demo/vote", vote)
    assert status == 200 and not body["duplicate"]
    status, body, _ = c.request("POST", "/api/p/demo/vote", vote)  # a retry: acknowledged, not counted again
    assert status == 200 and body["duplicate"]
    status, body, _ = c.request("POST", "/api/p/demo/undo", {})
    assert status == 200 and body["undone_item"] == item_id


def test_annotator_cannot_read_another_project_or_the_admin_page(server):
    c = Client(server["url"], server["tokens"]["ann"])
    for path in ("/p/secret", "/api/p/secret/next", "/p/demo/admin", "/api/p/demo/stats", "/p/secret/admin",
                 "/p/no-such-project"):
        status, body, _ = c.request("GET", path)
        assert status == 403, (path, status, body)
    status, _, _ = c.request("POST", "/api/p/secret/vote", {"item_id": 1, "choice": "A", "vote_id": "y" * 12})
    assert status == 403
    admin = Client(server["url"], server["admin"])
    status, stats, _ = admin.request("GET", "/api/p/demo/stats")
    assert status == 200 and stats["project"] == "demo"
    status, html, _ = admin.request("GET", "/p/secret/admin")
    assert status == 200 and "Fleiss" in html
    status, _, _ = admin.request("POST", "/api/p/demo/vote", {"item_id": 1, "choice": "A", "vote_id": "z" * 12},
                                 headers={"Authorization": f"Bearer {server['admin']}"}, cookie=False)
    assert status == 403  # the admin token cannot vote


def test_responses_are_escaped_and_scripts_are_blocked(server):
    c = Client(server["url"], server["tokens"]["other"])
    seen = set()
    for _ in range(8):
        status, html, headers = c.page("/p/demo")
        assert status == 200
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold</b>" not in html
        if "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html:
            assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
            seen.add("xss item")
        item_id = c.request("GET", "/api/p/demo/next")[1]["item_id"]
        if item_id is None:
            break
        assert c.request("POST", "/api/p/demo/vote", {"item_id": item_id, "choice": "tie",
                                                       "vote_id": uuid.uuid4().hex})[0] == 200
    assert seen == {"xss item"}


def test_markdown_rendering_keeps_raw_html_escaped(tmp_path):
    md = "**Bold** and `code`\n\n[a link](javascript:alert(1)) ![img](http://example.com/x.png)"
    db, _, tokens = make_db(tmp_path, [{"prompt": "Format *this*", "responses": [md, XSS[0] + " " + XSS[1]]}], ["m"],
                            overlap=1)
    with serve(db, None, "--markdown") as (url, _):
        status, html, _ = Client(url, tokens["m"]).page("/p/demo")
    assert status == 200
    assert "<strong>Bold</strong>" in html and "<code>code</code>" in html and "<em>this</em>" in html
    assert 'href="javascript' not in html and "[a link](javascript:alert(1))" in html  # refused: left as text
    assert "<img" not in html and "<script>alert" not in html  # images off; raw HTML escaped
    assert "&lt;script&gt;alert('pwned')&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html


# ---------------------------------------------------------------- reliability
def annotator_loop(url: str, token: str, project: str, n_votes: int, acked: list, errors: list, stop: threading.Event,
                   retry_every: int = 7) -> None:
    """Label until ``n_votes`` acks (or ``stop``): GET next, POST vote; every ``retry_every``-th vote is POSTed twice
    with the same vote_id, as a client retrying after a lost answer would."""
    try:
        c = Client(url, token, timeout=60)
        c.page(f"/p/{project}")
        n = 0
        while n < n_votes and not stop.is_set():
            status, nxt, _ = c.request("GET", f"/api/p/{project}/next")
            if status != 200 or nxt["item_id"] is None:
                errors.append((status, nxt))
                return
            vote = {"item_id": nxt["item_id"], "choice": "AB"[n % 2], "vote_id": uuid.uuid4().hex}
            for _ in range(2 if n % retry_every == 0 else 1):
                status, body, _ = c.request("POST", f"/api/p/{project}/vote", vote)
                if status != 200:
                    errors.append((status, body))
                    return
            acked.append(vote["vote_id"])
            n += 1
    except (OSError, ConnectionError) as e:  # the server was killed
        errors.append(("connection", repr(e)))


def check_db(db) -> dict:
    con = sqlite3.connect(db)
    try:
        out = {
            "integrity": con.execute("PRAGMA integrity_check").fetchone()[0],
            "votes": con.execute("SELECT COUNT(*) FROM votes").fetchone()[0],
            "vote_ids": {r[0] for r in con.execute("SELECT vote_id FROM votes")},
            "pairs": con.execute("SELECT COUNT(DISTINCT annotator_id || '-' || item_id) FROM votes").fetchone()[0],
            "max_per_item": con.execute("SELECT COALESCE(MAX(c), 0) FROM (SELECT COUNT(*) c FROM votes GROUP BY item_id)").fetchone()[0],
            "n_done_consistent": con.execute("SELECT COUNT(*) FROM items i WHERE n_done != "
                                              "(SELECT COUNT(*) FROM votes v WHERE v.item_id=i.id)").fetchone()[0] == 0,
            "per_annotator": Counter(dict(con.execute("SELECT annotator_id, COUNT(*) FROM votes GROUP BY annotator_id"))),
        }
    finally:
        con.close()
    return out


def test_twenty_annotators_two_thousand_votes_none_lost_or_double_counted(tmp_path, capsys):
    names = [f"a{i:02d}" for i in range(20)]
    db, _, tokens = make_db(tmp_path, pair_records(250, k=3), names, overlap=3)  # 750 pairs x 3 = 2250 slots
    acked, errors, stop = [], [], threading.Event()
    with serve(db) as (url, _):
        threads = [threading.Thread(target=annotator_loop, args=(url, tokens[n], "demo", 100, acked, errors, stop))
                   for n in names]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    assert errors == []
    s = check_db(db)
    lost = len(set(acked) - s["vote_ids"])
    double = s["votes"] - s["pairs"]
    with capsys.disabled():
        print(f"\nload test: 20 annotators, {len(acked)} acknowledged votes ({20 * len(range(0, 100, 7))} of them sent twice) in "
              f"{seconds:.1f} s = {len(acked) / seconds:.0f} votes/s over HTTP; in the database {s['votes']} votes, "
              f"lost {lost}, double-counted {double}, max votes per item {s['max_per_item']} (overlap 3)")
    assert len(acked) == 2000 and s["votes"] == 2000 and lost == 0 and double == 0
    assert s["vote_ids"] == set(acked) and s["max_per_item"] <= 3 and s["integrity"] == "ok"
    assert set(s["per_annotator"].values()) == {100} and s["n_done_consistent"]


def test_kill_9_mid_run_loses_no_acknowledged_vote(tmp_path, capsys):
    names = [f"k{i:02d}" for i in range(10)]
    db, _, tokens = make_db(tmp_path, pair_records(300, k=3), names, overlap=3)
    acked, errors, stop = [], [], threading.Event()
    with serve(db) as (url, proc):
        threads = [threading.Thread(target=annotator_loop, args=(url, tokens[n], "demo", 10**6, acked, errors, stop))
                   for n in names]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(acked) < 150 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    n_acked = len(acked)
    s = check_db(db)  # opens the database the killed server left (WAL and all)
    missing = set(acked) - s["vote_ids"]
    in_flight = s["votes"] - len(set(acked))
    with capsys.disabled():
        print(f"\nkill -9 test: server killed after {n_acked} acknowledged votes; the database opens, integrity_check "
              f"'{s['integrity']}', {s['votes']} votes stored, acknowledged votes lost {len(missing)}, "
              f"stored but unacknowledged (in flight at the kill) {in_flight}")
    assert n_acked >= 150 and s["integrity"] == "ok" and not missing and s["votes"] == s["pairs"]
    assert 0 <= in_flight <= len(names) and s["n_done_consistent"]
    # the server starts again on the same database and labelling continues
    with serve(db) as (url, _):
        c = Client(url, tokens[names[0]])
        c.page("/p/demo")
        item_id = c.request("GET", "/api/p/demo/next")[1]["item_id"]
        assert c.request("POST", "/api/p/demo/vote", {"item_id": item_id, "choice": "A",
                                                       "vote_id": uuid.uuid4().hex})[0] == 200
    assert check_db(db)["votes"] == s["votes"] + 1
