"""The labelling web app (``alignkit label serve``): FastAPI, server-rendered HTML, one small script, SQLite.

Pages: ``/login`` (paste an invite token), ``/p/<project>`` (the labelling page: one item at a time, keyboard
shortcuts for every action), ``/p/<project>/admin`` (progress, agreement, per-annotator quality; admin only), ``/``
(an annotator's project, or the admin's list of projects). JSON API under ``/api``.

Security:
* the token travels in an HttpOnly, SameSite=Strict cookie set by ``POST /api/login`` (or, for scripts, in an
  ``Authorization: Bearer`` header, which browsers never attach on their own);
* every state-changing request with the cookie must carry ``X-CSRF-Token``, an HMAC of the session's token
  embedded in the page (a cross-site form cannot read it), and a JSON body;
* an annotator sees only their own project's labelling page (403 elsewhere, and on every admin page);
* every text from the candidates file is HTML-escaped and shown as text (``white-space: pre-wrap``), and the
  Content-Security-Policy allows scripts from this server only, so a response holding ``<script>`` or
  ``onerror=`` is inert twice over. With ``markdown=True`` (``serve --markdown``) texts are rendered by
  markdown-it-py with raw HTML off (it is escaped), images off and its link check (no ``javascript:`` URLs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from html import escape
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from alignkit.label.agreement import project_stats
from alignkit.label.store import LabelError, Principal, Project, Store, display_order, hash_token

COOKIE = "alignkit_label"

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1rem;color:#222;background:#fafafa}
header{display:flex;justify-content:space-between;align-items:baseline;border-bottom:1px solid #ddd;margin-bottom:.8rem}
.guidelines{background:#eef4ff;border-left:4px solid #4a78d0;padding:.5rem .8rem;white-space:pre-wrap}
.prompt{background:#fff;border:1px solid #ccc;padding:.6rem .8rem;white-space:pre-wrap;margin:.6rem 0}
.responses{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:.8rem}
.response{background:#fff;border:2px solid #ccc;border-radius:6px;padding:.6rem .8rem}
.response pre,.prompt pre{white-space:pre-wrap;word-wrap:break-word;font-family:inherit;margin:.3rem 0}
.md{white-space:normal}.md pre{background:#f3f3f3;padding:.4rem;overflow-x:auto}.prompt pre{display:inline}
.response h3{margin:0;font-size:1rem;color:#555}.response.picked{border-color:#2a8a2a}
.rank{float:right;font-weight:bold;color:#2a8a2a}
.actions{margin:.8rem 0;display:flex;gap:.5rem;flex-wrap:wrap}
button{font-size:1rem;padding:.4rem .9rem;cursor:pointer}
kbd{border:1px solid #999;border-radius:3px;padding:0 .3rem;background:#fff;font-size:.85em}
.hint{color:#555;font-size:.9rem}.status{color:#a33;min-height:1.2em}
textarea{width:100%;height:3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#eee}td:first-child{text-align:left}.flag{color:#b00;font-weight:bold}
.figure{font-size:1.4rem;font-weight:bold}
"""

SCRIPT = r"""
"use strict";
(function () {
  const el = document.getElementById("state");
  if (!el) return;
  const S = JSON.parse(el.textContent);
  const status = document.getElementById("status");
  function say(msg) { status.textContent = msg; }
  function newId() {
    const b = new Uint8Array(16); crypto.getRandomValues(b);
    return Array.from(b, x => x.toString(16).padStart(2, "0")).join("");
  }
  async function post(path, body, tries) {
    for (let n = 0; n < tries; n++) {
      try {
        const r = await fetch(path, {method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json", "X-CSRF-Token": S.csrf}, body: JSON.stringify(body)});
        const data = await r.json().catch(() => ({}));
        if (!r.ok) { say(data.detail || ("error " + r.status)); return null; }
        return data;
      } catch (e) { say("network error, retrying..."); await new Promise(ok => setTimeout(ok, 500 * (n + 1))); }
    }
    say("could not reach the server; your last choice was not saved"); return null;
  }
  if (S.page === "login") {
    const form = document.getElementById("login");
    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      const r = await post("/api/login", {token: document.getElementById("token").value.trim()}, 1);
      if (r) location.href = r.redirect;
    });
    document.getElementById("token").focus();
    return;
  }
  let busy = false;
  const voteId = newId();  // one id per shown item: a retried POST is recognised and never counted twice
  async function vote(choice) {
    if (busy || S.item_id === null) return;
    busy = true; say("saving...");
    const rationale = document.getElementById("rationale");
    const r = await post("/api/p/" + encodeURIComponent(S.project) + "/vote",
      {item_id: S.item_id, choice: choice, vote_id: voteId, rationale: rationale ? rationale.value : ""}, 4);
    if (r) location.reload(); else busy = false;
  }
  async function undo() {
    if (busy) return; busy = true;
    const r = await post("/api/p/" + encodeURIComponent(S.project) + "/undo", {}, 3);
    if (r) location.reload(); else busy = false;
  }
  const order = [];  // ranking: on-screen positions picked so far, best first
  function showRanks() {
    document.querySelectorAll(".response").forEach((box, pos) => {
      const r = order.indexOf(pos);
      box.querySelector(".rank").textContent = r >= 0 ? "#" + (r + 1) : "";
      box.classList.toggle("picked", r >= 0);
    });
  }
  function pick(pos) {
    if (pos < 0 || pos >= S.k || order.includes(pos)) return;
    order.push(pos); showRanks();
    if (order.length === S.k - 1) {  // the last one is implied
      for (let p = 0; p < S.k; p++) if (!order.includes(p)) order.push(p);
      showRanks(); say("press Enter to submit, Backspace to change");
    }
  }
  const keys = {
    pairwise: {"1": () => vote("A"), "ArrowLeft": () => vote("A"), "2": () => vote("B"),
               "ArrowRight": () => vote("B"), "t": () => vote("tie"), "b": () => vote("both_bad")},
    binary: {"1": () => vote("good"), "ArrowLeft": () => vote("good"), "2": () => vote("bad"),
             "ArrowRight": () => vote("bad")},
    ranking: {"Enter": () => { if (order.length === S.k) vote(order.slice()); },
              "Backspace": () => { order.pop(); if (order.length === S.k - 1) order.pop(); showRanks(); }},
  };
  document.addEventListener("keydown", ev => {
    if (ev.target.tagName === "TEXTAREA") { if (ev.key === "Escape") ev.target.blur(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    let fn = (keys[S.task] || {})[ev.key];
    if (ev.key === "u") fn = undo;
    if (ev.key === "r") { const t = document.getElementById("rationale"); if (t) { ev.preventDefault(); t.focus(); } return; }
    if (!fn && S.task === "ranking" && /^[1-9]$/.test(ev.key)) fn = () => pick(Number(ev.key) - 1);
    if (fn) { ev.preventDefault(); fn(); }
  });
  document.querySelectorAll("[data-choice]").forEach(b => b.addEventListener("click", () => vote(b.dataset.choice)));
  document.querySelectorAll("[data-pick]").forEach(b => b.addEventListener("click", () => pick(Number(b.dataset.pick))));
  const u = document.getElementById("undo"); if (u) u.addEventListener("click", undo);
})();
"""

HINTS = {
    "pairwise": "<kbd>1</kbd>/<kbd>&larr;</kbd> A is better &middot; <kbd>2</kbd>/<kbd>&rarr;</kbd> B is better "
                "&middot; <kbd>t</kbd> tie &middot; <kbd>b</kbd> both bad",
    "ranking": "press the numbers of the responses from best to worst (<kbd>1</kbd>..<kbd>9</kbd>), "
               "<kbd>Backspace</kbd> to take one back, <kbd>Enter</kbd> to submit",
    "binary": "<kbd>1</kbd>/<kbd>&larr;</kbd> good &middot; <kbd>2</kbd>/<kbd>&rarr;</kbd> bad",
}


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a ``<script type="application/json">`` element (no ``</script>`` breakout)."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str, body: str, state: dict | None = None) -> HTMLResponse:
    state_tag = f'<script type="application/json" id="state">{_json_for_script(state)}</script>' if state else ""
    html = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
            f"<body>{body}{state_tag}<script src='/static/label.js'></script></body></html>")
    return HTMLResponse(html, headers=SECURITY_HEADERS)


def markdown_renderer():
    """Markdown -> HTML with raw HTML escaped, images disabled and markdown-it's link validation."""
    try:
        from markdown_it import MarkdownIt
    except ImportError as e:
        raise LabelError("--markdown needs the markdown-it-py package (pip install markdown-it-py)", 500) from e
    md = MarkdownIt("commonmark", {"html": False}).disable("image")
    return lambda text: f"<div class=md>{md.render(text)}</div>"


def _plain(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _prompt_html(prompt: Any, render=_plain) -> str:
    if isinstance(prompt, str):
        return f"<div class=prompt>{render(prompt)}</div>"
    return "".join(f"<div class=prompt><b>{escape(m['role'])}:</b> {render(m['content'])}</div>" for m in prompt)


def csrf_token(secret: str, token: str) -> str:
    return hmac.new(secret.encode(), hash_token(token).encode(), hashlib.sha256).hexdigest()


def make_app(db_path: str, markdown: bool = False) -> FastAPI:
    """The app over the database at ``db_path``; ``markdown``: render texts as Markdown (safely), else plain text."""
    render = markdown_renderer() if markdown else _plain
    store = Store(db_path)
    store.check_exists()
    secret = store.meta("csrf_secret")
    app = FastAPI(title="alignkit label", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LabelError)
    def _label_error(request: Request, exc: LabelError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=SECURITY_HEADERS)

    def token_of(request: Request) -> tuple[str | None, bool]:
        """(token, came from the cookie)."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        return request.cookies.get(COOKIE), True

    def principal_of(request: Request) -> tuple[Principal | None, str | None]:
        token, _ = token_of(request)
        return store.authenticate(token), token

    def who(request: Request) -> tuple[Principal, str]:
        p, token = principal_of(request)
        if p is None:
            raise LabelError("log in with your invite token first (/login)", 401)
        return p, token

    def check_post(request: Request) -> tuple[Principal, str]:
        p, token = who(request)
        _, from_cookie = token_of(request)
        if from_cookie and not hmac.compare_digest(request.headers.get("x-csrf-token", ""), csrf_token(secret, token)):
            raise LabelError("missing or wrong CSRF token (reload the page)", 403)
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise LabelError("expected a JSON body (Content-Type: application/json)", 415)
        return p, token

    def annotator_project(p: Principal, name: str) -> Project:
        if p.kind != "annotator":
            raise LabelError("the admin token cannot label; log in with an annotator's invite token", 403)
        try:
            project = store.project(name)
        except LabelError:
            raise LabelError("you are not an annotator of this project", 403) from None
        if project.id != p.project_id:
            raise LabelError("you are not an annotator of this project", 403)
        return project

    def admin_project(p: Principal, name: str) -> Project:
        if p.kind != "admin":
            raise LabelError("admin only", 403)
        return store.project(name)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise LabelError("the body is not valid JSON", 400) from None
        if not isinstance(body, dict):
            raise LabelError("expected a JSON object", 400)
        return body

    # ------------------------------------------------------------ static + login
    @app.get("/static/label.js")
    def script():
        return Response(SCRIPT, media_type="text/javascript", headers=SECURITY_HEADERS)

    @app.get("/login")
    def login_page():
        body = ("<header><h1>alignkit label</h1></header><form id=login><p>Paste the invite token you were given and "
                "press <kbd>Enter</kbd>.</p><input id=token type=password autocomplete=off size=40 "
                "aria-label='invite token'> <button type=submit>Log in</button></form><p id=status class=status></p>")
        return _page("log in", body, {"page": "login", "csrf": ""})

    @app.post("/api/login")
    async def login(request: Request):
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise LabelError("expected a JSON body (Content-Type: application/json)", 415)
        token = str((await body_of(request)).get("token", ""))
        p = await run_in_threadpool(store.authenticate, token)
        if p is None:
            raise LabelError("unknown token", 401)
        resp = JSONResponse({"redirect": "/", "name": p.name}, headers=SECURITY_HEADERS)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return resp

    @app.post("/api/logout")
    def logout(request: Request):
        check_post(request)
        resp = JSONResponse({"redirect": "/login"}, headers=SECURITY_HEADERS)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.get("/")
    def index(request: Request):
        p, _ = principal_of(request)
        if p is None:
            return RedirectResponse("/login", status_code=303)
        if p.kind == "annotator":
            return RedirectResponse(f"/p/{store.project_name(p.project_id)}", status_code=303)
        links = "".join(f"<li><a href='/p/{escape(n)}/admin'>{escape(n)}</a></li>" for n in store.projects())
        return _page("projects", f"<header><h1>Projects</h1><span>admin</span></header><ul>{links}</ul>")

    # ------------------------------------------------------------ labelling
    def item_view(project: Project, p: Principal) -> dict:
        item = store.next_item(project, p.annotator_id)
        progress = store.progress(project, p.annotator_id)
        if item is None:
            return {"item_id": None, "progress": progress}
        order = display_order(project.seed, p.annotator_id, item["id"], len(item["responses"]))
        return {"item_id": item["id"], "task": project.task, "prompt": item["prompt"],
                "responses": [item["responses"][i] for i in order], "progress": progress}

    @app.get("/api/p/{name}/next")
    def next_item(name: str, request: Request):
        p, _ = who(request)
        return JSONResponse(item_view(annotator_project(p, name), p), headers=SECURITY_HEADERS)

    @app.get("/p/{name}")
    def label_page(name: str, request: Request):
        p, token = principal_of(request)
        if p is None:
            return RedirectResponse("/login", status_code=303)
        if p.kind == "admin":
            return RedirectResponse(f"/p/{name}/admin", status_code=303)
        project = annotator_project(p, name)
        view = item_view(project, p)
        prog = view["progress"]
        head = (f"<header><h1>{escape(project.name)}</h1><span id=progress>Labelled <b>{prog['done']}</b> &middot; "
                f"{prog['remaining']} left</span><span>{escape(p.name)}</span></header>")
        guide = f"<div class=guidelines>{escape(project.guidelines)}</div>" if project.guidelines else ""
        undo = "<button id=undo>Undo last <kbd>u</kbd></button>"
        if view["item_id"] is None:
            body = head + guide + f"<h2 id=done>All done, thank you!</h2><div class=actions>{undo}</div>"
            state = {"page": "label", "project": project.name, "item_id": None, "task": project.task, "k": 0,
                     "csrf": csrf_token(secret, token)}
            return _page(project.name, body + "<p id=status class=status></p>", state)
        task, k = project.task, len(view["responses"])
        boxes = []
        for pos, text in enumerate(view["responses"]):
            title = ("AB"[pos] if task == "pairwise" else str(pos + 1)) if task != "binary" else "Response"
            pick = f" <button data-pick={pos}>{pos + 1}</button>" if task == "ranking" else ""
            boxes.append(f"<div class=response data-pos={pos}><h3>{title}{pick}<span class=rank></span></h3>"
                         f"{render(text)}</div>")
        if task == "pairwise":
            buttons = ("<button data-choice=A>A is better <kbd>1</kbd></button><button data-choice=B>B is better "
                       "<kbd>2</kbd></button><button data-choice=tie>Tie <kbd>t</kbd></button><button "
                       "data-choice=both_bad>Both bad <kbd>b</kbd></button>")
        elif task == "binary":
            buttons = "<button data-choice=good>Good <kbd>1</kbd></button><button data-choice=bad>Bad <kbd>2</kbd></button>"
        else:
            buttons = ""
        body = (head + guide + "<h2>Prompt</h2>" + _prompt_html(view["prompt"], render) + "<div class=responses>"
                + "".join(boxes) + f"</div><div class=actions>{buttons}{undo}</div>"
                "<textarea id=rationale placeholder='Rationale (optional; r to type here, Esc to leave)'></textarea>"
                f"<p class=hint>{HINTS[task]} &middot; <kbd>u</kbd> undo the last vote &middot; <kbd>r</kbd> "
                "rationale</p><p id=status class=status></p>")
        state = {"page": "label", "project": project.name, "item_id": view["item_id"], "task": task, "k": k,
                 "csrf": csrf_token(secret, token)}
        return _page(f"{project.name}: label", body, state)

    # the async handlers read the JSON body, then run the database work in the thread pool (never on the event loop)
    def cast(name: str, request: Request, body: dict) -> dict:
        p, _ = check_post(request)
        project = annotator_project(p, name)
        item_id = body.get("item_id")
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise LabelError("item_id must be an integer", 422)
        ack = store.vote(project, p.annotator_id, item_id, body.get("choice"), body.get("vote_id"),
                         body.get("rationale") or "")
        return {**ack, "progress": store.progress(project, p.annotator_id)}

    @app.post("/api/p/{name}/vote")
    async def vote(name: str, request: Request):
        body = await body_of(request)
        return JSONResponse(await run_in_threadpool(cast, name, request, body), headers=SECURITY_HEADERS)

    @app.post("/api/p/{name}/undo")
    def undo(name: str, request: Request):
        p, _ = check_post(request)
        project = annotator_project(p, name)
        undone = store.undo(project, p.annotator_id)
        return JSONResponse({"undone_item": undone, "progress": store.progress(project, p.annotator_id)},
                            headers=SECURITY_HEADERS)

    # ------------------------------------------------------------ admin
    @app.get("/api/p/{name}/stats")
    def stats_json(name: str, request: Request):
        p, _ = who(request)
        project = admin_project(p, name)
        return JSONResponse(project_stats(project, store.project_data(project)), headers=SECURITY_HEADERS)

    @app.get("/p/{name}/admin")
    def admin_page(name: str, request: Request):
        p, _ = principal_of(request)
        if p is None:
            return RedirectResponse("/login", status_code=303)
        project = admin_project(p, name)
        return _page(f"{project.name}: admin", admin_html(project_stats(project, store.project_data(project))))

    return app


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def admin_html(s: dict) -> str:
    rows = "".join(
        f"<tr><td>{escape(r['name'])}</td><td>{r['votes']}</td><td>{_fmt(r['gold_accuracy'], 2)} ({r['gold_n']})</td>"
        f"<td>{_fmt(r['majority_agreement'], 2)} ({r['majority_n']})</td><td>{_fmt(r['median_seconds'], 1)}</td>"
        f"<td class=flag>{escape('; '.join(r['flags']))}</td></tr>" for r in s["annotators"])
    cohen = "".join(f"<tr><td>{escape(c['a'])} ~ {escape(c['b'])}</td><td id='cohen-{escape(c['a'])}-{escape(c['b'])}'>"
                    f"{_fmt(c['kappa'])}</td><td>{c['n']}</td></tr>" for c in s["cohen_kappa"])
    return (f"<header><h1>{escape(s['project'])} &middot; admin</h1><span>{escape(s['task'])}, overlap {s['overlap']}"
            f"</span></header><h2>Progress</h2><p id=progress class=figure>{s['items_complete']} / {s['items']} items "
            f"complete ({100 * s['progress']:.1f}%)</p><p>{s['votes']} votes, {s['gold_items']} gold items</p>"
            f"<h2>Agreement</h2><table><tr><th>coefficient</th><th>value</th><th>units</th></tr>"
            f"<tr><td>Fleiss' &kappa; ({s['fleiss_raters']} raters)</td><td id=fleiss>{_fmt(s['fleiss_kappa'])}</td>"
            f"<td>{s['fleiss_units']}</td></tr><tr><td>Krippendorff's &alpha;</td><td id=alpha>"
            f"{_fmt(s['krippendorff_alpha'])}</td><td>{s['alpha_units']}</td></tr></table>"
            f"<h3>Cohen's &kappa; per pair of annotators</h3><table><tr><th>pair</th><th>&kappa;</th><th>shared units</th>"
            f"</tr>{cohen}</table><h2>Annotators</h2><table id=annotators><tr><th>annotator</th><th>votes</th>"
            f"<th>gold accuracy (n)</th><th>agreement with majority (n)</th><th>median s / item</th>"
            f"<th>flags (threshold {s['threshold']})</th></tr>{rows}</table>")
