"""The labelling app in a real browser: Debian's Chromium driven by Playwright against `alignkit label serve`.

An annotator logs in with a token and labels 10 pairs with the keyboard alone, undoes one and sees progress; a
response holding <script> / onerror= shows as text and runs nothing; the admin page shows the agreement figures.
Screenshots of both pages are saved under test-artifacts/.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from alignkit.label.store import Store
from label_server import Client, make_db, serve

CHROMIUM = "/usr/bin/chromium"
MODELS = ["policy-alpha-sft", "policy-beta-dpo"]  # never shown: labelling is blind
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
XSS = ["<script>window.__pwned = 1; alert('pwned')</script> Sure, here is how.",
       "<img src=x onerror=\"window.__pwned = 2\"> I would rather not."]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (`make browser`) to run the browser tests",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

PROMPTS = ["How do I boil an egg?", "Name a prime number.", "Summarise: the cat sat on the mat.",
           "What is the capital of France?", "Give me a synonym for happy.", "Translate 'merci' to English.",
           "Is 17 even?", "Suggest a name for a goldfish.", "How many legs does a spider have?",
           "Write a two-word poem.", "What colour is the sky?", "Recommend a book."]
ANSWERS = [("Put it in boiling water for 8 minutes, then cool it in cold water.", "Eggs are round."),
           ("7", "Nine is prime."), ("A cat sat on a mat.", "The mat was blue and had a long history..."),
           ("Paris.", "Lyon, probably."), ("Joyful.", "Sad."), ("Thank you.", "Merci means goodbye."),
           ("No, 17 is odd.", "Yes."), ("Bubbles.", "Fish."), ("Eight.", "Six legs."),
           ("Moon rises.", "This is a poem with many words in it."), ("Blue, on a clear day.", "Green."),
           ("'Middlemarch' by George Eliot.", "I don't read.")]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label_browser")
    records = [{"prompt": "Tell me something <b>risky</b>.", "responses": XSS, "models": MODELS}]
    records += [{"prompt": p, "responses": list(a), "models": MODELS} for p, a in zip(PROMPTS, ANSWERS)]
    guidelines = ("Pick the response that is more helpful, honest and harmless. Use tie when they are equally good "
                  "and both bad when neither is acceptable. Responses are shown as plain text.")
    db, admin, tokens = make_db(tmp, records, ["alice", "bob", "carol"], overlap=3, guidelines=guidelines)
    _, _, rank_tokens = make_db(tmp, [{"prompt": "Order these greetings.", "responses": ["Hello!", "Hi.", "Yo"]}],
                                ["rita"], project="rank", task="ranking", overlap=1, db=db)
    _, _, bin_tokens = make_db(tmp, [{"prompt": "Is this polite?", "responses": ["Please sit.", "Sit!"]}],
                               ["ben"], project="bin", task="binary", overlap=1, db=db)
    tokens.update(rank_tokens, **bin_tokens)
    ARTIFACTS.mkdir(exist_ok=True)
    with serve(db) as (url, _):
        # bob and carol label everything first (over HTTP), so the admin page has agreement figures
        for name, flip in (("bob", set()), ("carol", {3, 7})):
            c = Client(url, tokens[name])
            c.page("/p/demo")
            for n in range(len(records) + 1):
                nxt = c.request("GET", "/api/p/demo/next")[1]
                if nxt["item_id"] is None:
                    break
                better = 0 if nxt["responses"][0] in [a[0] for a in ANSWERS] + [XSS[1]] else 1
                if n in flip:
                    better = 1 - better
                assert c.request("POST", "/api/p/demo/vote", {"item_id": nxt["item_id"], "choice": "AB"[better],
                                                               "vote_id": uuid.uuid4().hex})[0] == 200
        yield {"url": url, "admin": admin, "tokens": tokens, "db": db}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def state(page) -> dict:
    return json.loads(page.locator("#state").text_content())


def test_annotator_labels_ten_pairs_by_keyboard_undoes_one_and_sees_progress(app, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(app["url"] + "/")
    assert page.url.endswith("/login")
    page.keyboard.type(app["tokens"]["alice"])
    with page.expect_navigation(url="**/p/demo"):
        page.keyboard.press("Enter")
    assert "Labelled 0" in page.locator("#progress").text_content()
    assert "more helpful, honest and harmless" in page.locator(".guidelines").text_content()

    # the first item is the one with markup in it: shown as text, nothing ran
    texts = page.locator(".response pre").all_text_contents()
    assert sorted(texts) == sorted(XSS)
    assert "Tell me something <b>risky</b>." in page.locator(".prompt").text_content()
    assert page.locator(".response img").count() == 0 and page.evaluate("window.__pwned === undefined")
    page.screenshot(path=str(ARTIFACTS / "label_page_xss_item.png"), full_page=True)

    seen = []
    for n, key in enumerate(["1", "2", "ArrowLeft", "ArrowRight", "t", "b", "1", "2", "1", "ArrowRight"]):
        seen.append(state(page)["item_id"])
        assert not any(m in page.content() for m in MODELS)
        with page.expect_navigation():
            page.keyboard.press(key)
        assert f"Labelled {n + 1}" in page.locator("#progress").text_content()
    assert len(set(seen)) == 10
    assert state(page)["item_id"] not in seen
    with page.expect_navigation():
        page.keyboard.press("u")
    assert "Labelled 9" in page.locator("#progress").text_content()
    assert state(page)["item_id"] == seen[-1]  # the undone item is shown again
    assert "u</kbd> undo" in page.content() and "<kbd>t</kbd> tie" in page.content()
    page.screenshot(path=str(ARTIFACTS / "label_page.png"), full_page=True)
    assert (ARTIFACTS / "label_page.png").stat().st_size > 10_000
    with page.expect_navigation():
        page.keyboard.press("2")
    assert "Labelled 10" in page.locator("#progress").text_content()
    assert dialogs == [] and page.evaluate("window.__pwned === undefined")

    # the rationale box takes typing without triggering shortcuts
    page.keyboard.press("r")
    page.keyboard.type("both are fine but 1 is clearer")
    assert "Labelled 10" in page.locator("#progress").text_content()
    page.keyboard.press("Escape")
    with page.expect_navigation():
        page.keyboard.press("1")
    assert "Labelled 11" in page.locator("#progress").text_content()
    page.close()


def test_admin_page_shows_agreement(app, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(app["url"] + "/login")
    page.keyboard.type(app["admin"])
    with page.expect_navigation():
        page.keyboard.press("Enter")
    page.click("text=demo")
    page.wait_for_url("**/p/demo/admin")
    fleiss, alpha = page.locator("#fleiss").text_content(), page.locator("#alpha").text_content()
    assert fleiss != "n/a" and -1 <= float(fleiss) <= 1 and -1 <= float(alpha) <= 1
    assert float(page.locator("#cohen-bob-carol").text_content()) < 1.0  # carol flipped two answers
    assert page.locator("#annotators tr").count() == 4  # header + 3 annotators
    assert "items complete" in page.locator("#progress").text_content()
    page.screenshot(path=str(ARTIFACTS / "admin_page.png"), full_page=True)
    assert (ARTIFACTS / "admin_page.png").stat().st_size > 10_000
    # an annotator is refused the admin page
    other = browser.new_page()
    other.goto(app["url"] + "/login")
    other.keyboard.type(app["tokens"]["bob"])
    with other.expect_navigation(url="**/p/demo"):
        other.keyboard.press("Enter")
    response = other.goto(app["url"] + "/p/demo/admin")
    assert response.status == 403
    other.close()
    page.close()


def login(browser, app, name: str, project: str):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(app["url"] + "/login")
    page.keyboard.type(app["tokens"][name])
    with page.expect_navigation(url=f"**/p/{project}"):
        page.keyboard.press("Enter")
    return page


def test_ranking_and_binary_by_keyboard(app, browser):
    page = login(browser, app, "rita", "rank")
    shown = page.locator(".response pre").all_text_contents()
    page.keyboard.press("3")  # on-screen response 3 is best, then 1; the last one is implied
    page.keyboard.press("1")
    assert page.locator(".rank").all_text_contents() == ["#2", "#3", "#1"]
    page.keyboard.press("Backspace")  # takes back the last pick (1) and the implied last one
    assert page.locator(".rank").all_text_contents() == ["", "", "#1"]
    page.keyboard.press("1")
    page.screenshot(path=str(ARTIFACTS / "ranking_page.png"), full_page=True)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "All done" in page.locator("#done").text_content()
    store = Store(app["db"])
    vote = store.project_data(store.project("rank"))["votes"][0]
    responses = ["Hello!", "Hi.", "Yo"]
    ranks = {text: vote["label"][responses.index(text)] for text in shown}
    assert ranks == {shown[2]: 1, shown[0]: 2, shown[1]: 3}
    page.close()

    page = login(browser, app, "ben", "bin")
    first = page.locator(".response pre").text_content()
    with page.expect_navigation():
        page.keyboard.press("1")  # good
    with page.expect_navigation():
        page.keyboard.press("ArrowRight")  # bad
    votes = store.project_data(store.project("bin"))["votes"]
    items = store.project_data(store.project("bin"))["items"]
    assert {items[v["item_id"]]["responses"][0]: v["label"] for v in votes} == {
        first: "good", ({"Please sit.", "Sit!"} - {first}).pop(): "bad"}
    page.close()
