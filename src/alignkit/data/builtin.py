"""Built-in datasets: real human preferences (BIG-bench HHH), our sentiment prompts and demos, arithmetic.

Usable in configs as ``data.train = "builtin:<name>"`` (see :data:`BUILTIN_DATASETS`):

``builtin:hhh``
    BIG-bench ``hhh_alignment`` (Askell et al. 2021, "A General Language Assistant as a Laboratory for
    Alignment"): 221 human-written (chosen, rejected) assistant replies in four subsets, harmless 58,
    helpful 59, honest 61, other 43. Each example is one prompt with exactly two replies scored 1 and 0;
    it becomes ``{"prompt", "chosen", "rejected", "subset"}`` (the prompt is the raw user turn). The data
    ships inside the ``bigbench==1.0.0`` sdist on PyPI (358 MB; ``pip download`` of it fails on a direct-URL
    dependency), so :func:`ensure_hhh` reads the package index page, streams the tarball, checks its sha256
    and reads only the four ``task.json`` members. ``$ALIGNKIT_BIGBENCH_TARBALL`` points at a local copy
    instead (mirrors, offline machines); ``$PIP_INDEX_URL`` (a ``.../simple`` root) replaces PyPI.

    Split: the 221 pairs share only 102 distinct prompts (several pairs rank replies to the same prompt), so
    the split is by prompt, never by pair: within each subset, prompts are walked in sha1 order and each
    whole prompt goes to test unless that would push test past round(20%) of the subset's pairs. Result:
    train 176 / test 45 pairs (harmless 46/12, helpful 47/12, honest 49/12, other 34/9), 79 / 23 prompts,
    no prompt in both.

``builtin:sentiment``
    240 prompts asking for a short review: 40 everyday subjects x 6 phrasings, written for alignkit.
    Split by subject: 33 subjects (198 prompts) train, 7 subjects (42 prompts) test, so test subjects are
    never seen in training. Records ``{"prompt", "topic"}``; the gold reward is ``rewards.gold.vader_scores``.

``builtin:sft_demos``
    62 short reviews (1-3 sentences, mostly mildly positive or balanced) written for alignkit, for the brief
    SFT stage of the quickstart; their prompts are train-split sentiment prompts. Train split only.

``builtin:arithmetic``
    ``reasoning_gym`` ``basic_arithmetic`` questions (two terms of 1-2 digits, + and - by default) with
    ``{"prompt", "answer", "question"}``; train 200 / test 100 by default. A question belongs to test iff
    sha1(question) % 5 == 0, so train and test are disjoint for every n and seed.

``builtin:arithmetic_1digit``
    The same with small operands (reasoning_gym's one-digit range, which reaches 10; 180 train / 45 test of the
    ~240 distinct questions): the level where SmolLM2-135M is right often enough for GRPO's group baseline to
    see differences.

``builtin:chain_arithmetic``
    Chained operations for process reward models ("Start with 7. Add 5. Multiply by 3."), two operations on
    one-digit numbers, with the chain (``start``, ``ops``, ``intermediates``) for step verification
    (``alignkit.data.chains``); train 200 / test 50, disjoint.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

from alignkit.data.chains import chain_arithmetic_problems
from alignkit.models.embedded import AssetError, _log, cache_dir, cached, ensure_cached, local_override, sha256_file

SPLITS = ("train", "test")

# --------------------------------------------------------------------------------------------------------
# BIG-bench hhh_alignment
# --------------------------------------------------------------------------------------------------------

BIGBENCH_PROJECT = "bigbench"
BIGBENCH_FILENAME = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TARBALL_ENV = "ALIGNKIT_BIGBENCH_TARBALL"
HHH_DIR_ENV = "ALIGNKIT_HHH_DIR"
"""A folder holding ``{harmless,helpful,honest,other}/task.json``: ``bigbench/benchmark_tasks/hhh_alignment`` of a
git checkout of github.com/google/BIG-bench (or the checkout itself)."""
DEFAULT_INDEX_URL = "https://pypi.org/simple"
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
HHH_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/{subset}/task.json"
HHH_CACHE_NAME = "bigbench-hhh-alignment"
HHH_TEST_FRACTION = 0.2


def _check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, allowed))}")


def bigbench_index_url() -> str:
    """The project page on the package index: ``$PIP_INDEX_URL/bigbench/`` or PyPI's."""
    root = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL
    return root.rstrip("/") + f"/{BIGBENCH_PROJECT}/"


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def redact_url(url: str) -> str:
    """``https://user:secret@host/x`` -> ``https://***@host/x`` (for messages)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.username is None and parsed.password is None:
        return url
    return urllib.parse.urlunparse(parsed._replace(netloc="***@" + parsed.netloc.rpartition("@")[2]))


def _open_url(url: str, timeout: float = 60.0):
    """``urlopen`` that reads ``index.html`` for a ``file://`` folder (as pip does for local indexes) and
    turns ``user:password@`` in an index URL into a basic-auth header."""
    parsed = urllib.parse.urlparse(url)
    headers = {"Accept": "text/html", "User-Agent": "alignkit"}
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if path.is_dir():
            url = (path / "index.html").as_uri()
    elif parsed.username is not None:
        user = urllib.parse.unquote(parsed.username)
        password = urllib.parse.unquote(parsed.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        url = urllib.parse.urlunparse(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def find_sdist_url(index_url: str, filename: str = BIGBENCH_FILENAME) -> str:
    """The absolute URL (fragment dropped) of the link named ``filename`` on a PEP 503 "simple" page."""
    with _open_url(index_url) as resp:
        page = resp.read().decode("utf-8", errors="replace")
    parser = _LinkParser()
    parser.feed(page)
    for href in parser.hrefs:
        url = urllib.parse.urljoin(index_url, href)
        url = urllib.parse.urldefrag(url).url
        if Path(urllib.parse.urlparse(url).path).name == filename:
            return url
    n = len(parser.hrefs)
    raise AssetError(f"{redact_url(index_url)} has no link to {filename} ({n} links on the page)")


def download_file(url: str, dest: Path, verbose: bool = True) -> Path:
    """Stream ``url`` into ``dest`` (chunks; the whole file is never held in memory)."""
    with _open_url(url, timeout=120.0) as resp, open(dest, "wb") as out:
        size = resp.headers.get("Content-Length")
        mb = f" ({int(size) / 1e6:.0f} MB)" if size else ""
        _log(verbose, f"downloading {redact_url(url)}{mb} ...")
        shutil.copyfileobj(resp, out, 1 << 22)
    return dest


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(f"{path}: sha256 is {actual}, expected {expected} (corrupt or wrong file)")


def hhh_records_from_task(task: dict[str, Any], subset: str, where: str) -> list[dict[str, str]]:
    """BIG-bench ``examples`` ``[{"input", "target_scores": {reply: 1 | 0}}]`` -> preference records.

    Every example must have exactly two replies, one scored 1 (chosen) and one scored 0 (rejected).
    """
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise AssetError(f"{where}: no 'examples' list")
    records = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        prompt = ex.get("input") if isinstance(ex, dict) else None
        if not isinstance(prompt, str) or not isinstance(scores, dict):
            raise AssetError(f"{where}: example {i} lacks a string 'input' and a 'target_scores' object")
        if len(scores) != 2 or sorted(scores.values()) != [0, 1]:
            raise AssetError(
                f"{where}: example {i} has {len(scores)} responses with scores {sorted(scores.values())}; "
                "expected exactly 2 responses, one scored 1 (chosen) and one scored 0 (rejected)"
            )
        chosen = next(r for r, s in scores.items() if s == 1)
        rejected = next(r for r, s in scores.items() if s == 0)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": subset})
    return records


def read_hhh_tarball(path: Path, expected_sha256: str | None = BIGBENCH_SHA256) -> list[dict[str, str]]:
    """Check the tarball's sha256, then read only the four hhh_alignment ``task.json`` members.

    Members are read lazily in archive order and reading stops once all four are found; nothing is
    written to disk.
    """
    path = Path(path)
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    wanted = {HHH_MEMBER.format(subset=s): s for s in HHH_SUBSETS}
    tasks: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            subset = wanted.get(member.name)
            if subset is None or not member.isfile():
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            try:
                tasks[subset] = json.loads(fh.read().decode("utf-8"))
            except ValueError as e:
                raise AssetError(f"{path}:{member.name}: not valid JSON: {e}") from e
            if len(tasks) == len(wanted):
                break
    missing = [m for m, s in wanted.items() if s not in tasks]
    if missing:
        raise AssetError(f"{path}: missing member(s) {', '.join(missing)}")
    records = []
    for subset in HHH_SUBSETS:
        member = HHH_MEMBER.format(subset=subset)
        records += hhh_records_from_task(tasks[subset], subset, f"{path}:{member}")
    return records


def read_hhh_dir(path: Path) -> list[dict[str, str]]:
    """The four hhh_alignment ``task.json`` files of a BIG-bench checkout: ``path`` is the ``hhh_alignment``
    folder or the checkout's root."""
    path = Path(path)
    for root in (path, path / "bigbench" / "benchmark_tasks" / "hhh_alignment"):
        if all((root / s / "task.json").is_file() for s in HHH_SUBSETS):
            break
    else:
        raise AssetError(f"{HHH_DIR_ENV}={path}: no {{{','.join(HHH_SUBSETS)}}}/task.json in it (nor under "
                         "bigbench/benchmark_tasks/hhh_alignment/)")
    records = []
    for subset in HHH_SUBSETS:
        file = root / subset / "task.json"
        try:
            task = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise AssetError(f"{file}: not valid JSON: {e}") from e
        records += hhh_records_from_task(task, subset, str(file))
    return records


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def split_hhh(
    records: list[dict[str, str]], test_fraction: float = HHH_TEST_FRACTION
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic split by prompt: per subset, walk the prompts in sha1 order and move each one (with all
    its pairs) to test unless that would push test past ``round(test_fraction * n_subset)`` pairs.
    Pairs sharing a prompt always land together; records keep their input order within each split.
    """
    test_prompts: set[str] = set()
    for subset in dict.fromkeys(r["subset"] for r in records):
        rows = [r for r in records if r["subset"] == subset]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["prompt"]] = counts.get(r["prompt"], 0) + 1
        target, taken = round(test_fraction * len(rows)), 0
        for prompt in sorted(counts, key=_sha1):
            if taken + counts[prompt] <= target:
                test_prompts.add(prompt)
                taken += counts[prompt]
    train = [r for r in records if r["prompt"] not in test_prompts]
    test = [r for r in records if r["prompt"] in test_prompts]
    return train, test


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bigbench_tarball(workdir: Path, verbose: bool) -> Path:
    """The local override if set, else a fresh download from the package index into ``workdir``."""
    path = local_override(BIGBENCH_TARBALL_ENV, verbose)
    if path is not None:
        return path
    index_url = bigbench_index_url()
    url = index_url
    try:
        url = find_sdist_url(index_url)
        return download_file(url, workdir / BIGBENCH_FILENAME, verbose)
    except (OSError, http.client.HTTPException, AssetError) as e:  # URLError is an OSError
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        elif isinstance(e, urllib.error.URLError):
            reason = str(e.reason)
        else:
            reason = str(e) or type(e).__name__
        raise AssetError(
            f"could not download bigbench from {redact_url(url)}: {reason}; set {BIGBENCH_TARBALL_ENV}="
            f"/path/to/{BIGBENCH_FILENAME} to use a local copy, or {HHH_DIR_ENV}=<a BIG-bench git checkout>"
        ) from e


def ensure_hhh(verbose: bool = True) -> Path:
    """Cached folder with ``train.jsonl`` and ``test.jsonl`` of BIG-bench hhh_alignment (+ manifest)."""

    def build(out: Path) -> dict[str, Any]:
        folder = os.environ.get(HHH_DIR_ENV)
        if folder:
            _log(verbose, f"reading hhh_alignment from {folder} ({HHH_DIR_ENV}) ...")
            records = read_hhh_dir(Path(folder).expanduser())
        else:
            with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir()) as work:
                tarball = _bigbench_tarball(Path(work), verbose)
                _log(verbose, "reading hhh_alignment from the bigbench sdist ...")
                records = read_hhh_tarball(tarball, BIGBENCH_SHA256)
        train, test = split_hhh(records)
        _write_jsonl(out / "train.jsonl", train)
        _write_jsonl(out / "test.jsonl", test)
        return {
            "source": (f"{HHH_DIR_ENV}={folder}" if folder else
                       f"{BIGBENCH_FILENAME}:{HHH_MEMBER.format(subset='{' + ','.join(HHH_SUBSETS) + '}')}"),
            "source_sha256": None if folder else BIGBENCH_SHA256,
            "split": f"by prompt, per subset in sha1 order, test <= round({HHH_TEST_FRACTION} * n) pairs",
            "counts": {
                split: {s: sum(r["subset"] == s for r in rows) for s in HHH_SUBSETS}
                for split, rows in (("train", train), ("test", test))
            },
        }

    return ensure_cached(HHH_CACHE_NAME, build, verbose)


def load_hhh(split: str) -> list[dict[str, str]]:
    """BIG-bench hhh_alignment pairs ``{"prompt", "chosen", "rejected", "subset"}`` (train 176 / test 45)."""
    _check_split(split)
    folder = cached(HHH_CACHE_NAME) or ensure_hhh(verbose=True)
    return _read_jsonl(folder / f"{split}.jsonl")


HHH_USERS = ("the quickstart's HHH reward-model stage, the HHH accuracy of `alignkit eval` (alignment tax), "
             "`alignkit w2s task=hhh` and `builtin:hhh` datasets")
"""What cannot run without the HHH pairs (for messages)."""
_HHH_MISSING: dict[str, str] = {}


def hhh_unavailable() -> str | None:
    """None when the HHH pairs can be loaded (cached, or built now); else why not, once per process (a failed
    build is not retried), for the optional users (:data:`HHH_USERS`) to skip with that reason."""
    if cached(HHH_CACHE_NAME) is not None:
        return None
    key = str(cache_dir())
    if key not in _HHH_MISSING:
        try:
            ensure_hhh(verbose=True)
            return None
        except AssetError as e:
            _HHH_MISSING[key] = f"BIG-bench hhh_alignment is not available: {e}"
    return _HHH_MISSING[key]


# --------------------------------------------------------------------------------------------------------
# Sentiment prompts and SFT demonstrations (written for alignkit)
# --------------------------------------------------------------------------------------------------------

SENTIMENT_TRAIN_SUBJECTS = (
    "a neighbourhood coffee shop", "a science-fiction novel", "a pair of running shoes", "a city park",
    "a budget laptop", "a family-run Italian restaurant", "a cordless drill", "a weekend train trip",
    "a beginners' yoga class", "a board game for four players", "a true-crime podcast", "a wireless keyboard",
    "a secondhand bookshop", "a two-person camping tent", "a museum of modern art",
    "a meal-kit delivery service", "a rain jacket", "a stand-up comedy show", "a language-learning app",
    "a local bakery", "an electric kettle", "a public library", "a budget hotel near the station",
    "a children's picture book", "a pair of noise-cancelling headphones", "a ceramic frying pan",
    "a nature documentary", "a community swimming pool", "a puzzle video game", "a farmers' market",
    "a houseplant from a garden centre", "a bus tour of the old town", "a streaming music service",
)
SENTIMENT_TEST_SUBJECTS = (
    "a pottery workshop", "an office chair", "a jazz album", "a coastal hiking trail",
    "a vegetarian cookbook", "a bike-sharing scheme", "a smartwatch",
)
SENTIMENT_PHRASINGS = (
    "Write a short review of {s}.",
    "What did you think of {s}? Answer in two or three sentences.",
    "Describe your experience with {s} in a few sentences.",
    "Give a brief, honest opinion of {s}.",
    "How would you rate {s}? Explain briefly.",
    "Write a two-sentence review of {s}.",
)


def sentiment_prompts(split: str) -> list[dict[str, str]]:
    """Review prompts ``{"prompt", "topic"}``: 198 train (33 subjects), 42 test (7 unseen subjects)."""
    _check_split(split)
    subjects = SENTIMENT_TRAIN_SUBJECTS if split == "train" else SENTIMENT_TEST_SUBJECTS
    return [{"prompt": p.format(s=s), "topic": s} for s in subjects for p in SENTIMENT_PHRASINGS]


# (train subject, phrasing index, completion)
_SFT_DEMOS: tuple[tuple[str, int, str], ...] = (
    ("a neighbourhood coffee shop", 0,
     "Cosy little place with friendly staff and a flat white that was properly hot. It gets crowded "
     "around noon, so go early if you want a seat."),
    ("a neighbourhood coffee shop", 4,
     "I'd give it four out of five. The coffee is excellent and the pastries are fresh, though the "
     "music is a bit loud for working."),
    ("a science-fiction novel", 1,
     "I enjoyed it more than I expected. The world-building is clever and the ending surprised me, "
     "even if the middle chapters drag a little."),
    ("a science-fiction novel", 3,
     "It's an imaginative story with a likeable crew, but some of the science explanations go on too "
     "long. Worth reading if you like slow-burn space adventures."),
    ("a pair of running shoes", 2,
     "I've run about a hundred kilometres in them so far and my feet feel good after every run. They "
     "took a week to break in, but the cushioning has held up well."),
    ("a pair of running shoes", 5,
     "Light, comfortable and grippy on wet pavement. The laces are too short, but that is an easy fix."),
    ("a city park", 0,
     "A lovely green space with shady benches, a small pond and well-kept paths. It's a pleasant spot "
     "for a lunch break, though the bins could be emptied more often."),
    ("a city park", 2,
     "I walk my dog there most mornings and it's always calm and clean. The new playground is popular "
     "with families on weekends."),
    ("a budget laptop", 4,
     "Three and a half stars: it handles email, documents and video calls without trouble. The screen "
     "is dim and the battery lasts about five hours, which is fair for the price."),
    ("a budget laptop", 1,
     "For the money it's a solid machine. It boots quickly and the keyboard is comfortable, but don't "
     "expect it to run games."),
    ("a family-run Italian restaurant", 0,
     "Warm service, generous portions and a lasagne that tasted homemade. Prices are reasonable and "
     "the tiramisu is worth saving room for."),
    ("a family-run Italian restaurant", 5,
     "The pasta was fresh and the sauce was rich without being heavy. We waited a while for a table, "
     "but the staff kept us updated."),
    ("a cordless drill", 3,
     "It's a dependable tool for home jobs like hanging shelves and assembling furniture. The battery "
     "charges fast, although it feels a little heavy when drilling overhead."),
    ("a cordless drill", 2,
     "I used it to put up curtain rails in three rooms and it didn't struggle once. The included bits "
     "are basic, so I bought a better set separately."),
    ("a weekend train trip", 1,
     "It was a relaxing way to travel, with big windows and lovely views of the hills. The café car "
     "ran out of sandwiches, but the trip itself was smooth and on time."),
    ("a weekend train trip", 0,
     "Comfortable seats, a quiet carriage and scenery that made the three hours fly by. I'd book it "
     "again for a calm weekend away."),
    ("a beginners' yoga class", 2,
     "The instructor explained every pose clearly and offered easier versions for beginners like me. I "
     "left feeling stretched and relaxed."),
    ("a beginners' yoga class", 4,
     "Four stars. The class is friendly and well paced, although the room gets quite warm."),
    ("a board game for four players", 0,
     "Easy to learn in ten minutes, yet it kept all four of us engaged for an hour. The artwork is "
     "charming and the pieces feel sturdy."),
    ("a board game for four players", 3,
     "It's fun with the right group, but the rules for trading are a bit vague. We made our own house "
     "rule and had a great evening."),
    ("a true-crime podcast", 1,
     "The host tells each story carefully and respectfully, and the research is thorough. Some "
     "episodes are longer than they need to be, but I keep coming back."),
    ("a true-crime podcast", 5,
     "Gripping storytelling with solid research behind it. The ad breaks are frequent, though."),
    ("a wireless keyboard", 2,
     "Typing on it is quiet and comfortable, and it pairs quickly with both my laptop and my tablet. "
     "The batteries have lasted two months so far."),
    ("a wireless keyboard", 4,
     "I'd rate it three out of five. It works reliably, but the keys feel a bit mushy and there's no "
     "backlight."),
    ("a secondhand bookshop", 0,
     "A charming shop packed floor to ceiling with well-organised shelves. I found two novels I had "
     "been hunting for, and the owner gave great recommendations."),
    ("a secondhand bookshop", 1,
     "I loved browsing there on a rainy afternoon. Prices are fair and the poetry section is "
     "surprisingly good."),
    ("a two-person camping tent", 2,
     "We camped two nights in light rain and stayed completely dry. Setting it up took about fifteen "
     "minutes, and it packs down small enough for a backpack."),
    ("a two-person camping tent", 3,
     "It's a good tent for summer trips: light, easy to pitch and well ventilated. It's snug for two "
     "adults with gear, so taller people may want a bigger model."),
    ("a museum of modern art", 0,
     "An interesting collection with a few striking large installations. Some rooms felt sparse, but "
     "the free audio guide added useful context."),
    ("a museum of modern art", 4,
     "I'd give it four stars. The temporary exhibition was thought-provoking and the building itself "
     "is beautiful."),
    ("a meal-kit delivery service", 1,
     "The recipes were simple and the ingredients arrived fresh and well packed. It's pricier than "
     "doing my own shopping, but it saved me time on busy weeknights."),
    ("a meal-kit delivery service", 5,
     "Tasty, easy recipes with clearly labelled ingredients. There is a lot of plastic packaging, "
     "which I wish they would reduce."),
    ("a rain jacket", 2,
     "I wore it through a wet week in the hills and stayed dry underneath. It's not very breathable on "
     "steep climbs, but the hood fits well."),
    ("a rain jacket", 0,
     "A practical jacket that keeps the rain out and folds into its own pocket. The fit is a little "
     "boxy, but I'm happy with it."),
    ("a stand-up comedy show", 1,
     "It was a fun night out with plenty of laughs. A couple of jokes fell flat, but the headliner was "
     "excellent."),
    ("a stand-up comedy show", 3,
     "The opening act was uneven, but the main performer was sharp and genuinely funny. Good value for "
     "the ticket price."),
    ("a language-learning app", 2,
     "I've used it daily for two months and can now hold simple conversations in Spanish. The short "
     "lessons fit easily into my commute."),
    ("a language-learning app", 4,
     "Three and a half stars. It's great for vocabulary, but the grammar explanations are thin."),
    ("a local bakery", 0,
     "The sourdough has a crisp crust and a soft, tangy middle, and the cinnamon buns are a treat. "
     "Expect a short queue on Saturday mornings."),
    ("a local bakery", 5,
     "Everything I tried was fresh and full of flavour. The staff are cheerful even when it's busy."),
    ("an electric kettle", 3,
     "It boils quickly and quietly, and the water window is easy to read. The lid button is a little "
     "stiff, but otherwise it does its job well."),
    ("an electric kettle", 1,
     "Simple and reliable. It looks nice on the counter and switches off promptly once the water "
     "boils."),
    ("a public library", 2,
     "The staff helped me find local history records, and the reading room is quiet and bright. The "
     "Wi-Fi was slow, but it's still my favourite place to study."),
    ("a public library", 0,
     "A welcoming library with a good selection of new books and free events for children. Opening "
     "hours on Sundays are short, though."),
    ("a budget hotel near the station", 4,
     "Three stars. The room was clean and the bed comfortable, but the walls are thin and you can hear "
     "the trains at night."),
    ("a budget hotel near the station", 1,
     "It was fine for a one-night stay: clean, cheap and two minutes from the platform. Breakfast was "
     "basic but filling."),
    ("a children's picture book", 0,
     "Bright illustrations and a gentle rhyming story that my four-year-old asks for every night. The "
     "pages are thick enough to survive small hands."),
    ("a children's picture book", 3,
     "It's a sweet book with lovely art, although the story ends a little abruptly. Children will "
     "still enjoy pointing out the animals on each page."),
    ("a pair of noise-cancelling headphones", 2,
     "They block out most of the noise on my commute, and the sound is clear and balanced. After three "
     "hours they start to press on my ears a bit."),
    ("a pair of noise-cancelling headphones", 5,
     "Excellent noise cancelling and a battery that lasts all week. The carrying case is bulky."),
    ("a ceramic frying pan", 1,
     "Eggs slide right off and it cleans up in seconds. I've had it for six months and the coating "
     "still looks new."),
    ("a ceramic frying pan", 4,
     "Four stars: it heats evenly and nothing sticks, though the handle gets warm during long cooking."),
    ("a nature documentary", 0,
     "Beautifully filmed, with calm narration and remarkable footage of animals I had never seen "
     "before. One episode repeats earlier material, but the series is well worth watching."),
    ("a nature documentary", 3,
     "It's gorgeous to look at and quietly informative. I would have liked a little more about "
     "conservation efforts."),
    ("a community swimming pool", 2,
     "The water was clean, the lanes were clearly marked and the changing rooms were tidy. Early "
     "mornings are the best time to go if you want a quiet swim."),
    ("a puzzle video game", 1,
     "The puzzles start easy and build up nicely, and solving the harder ones feels rewarding. A "
     "couple of levels were frustrating, but the hint system helped."),
    ("a puzzle video game", 5,
     "A clever, relaxing game with a soothing soundtrack. It's on the short side, taking about eight "
     "hours to finish."),
    ("a farmers' market", 0,
     "A friendly market with fresh vegetables, local cheese and good bread. Prices are a little higher "
     "than at the supermarket, but the quality is worth it."),
    ("a houseplant from a garden centre", 2,
     "The plant arrived healthy and has put out three new leaves in a month on my windowsill. The care "
     "label was helpful, though the pot is plain plastic."),
    ("a bus tour of the old town", 4,
     "I'd give it four stars. The guide was funny and knowledgeable, but the bus was crowded and the "
     "stops were short."),
    ("a streaming music service", 1,
     "The recommendations are surprisingly good and the app rarely crashes. I wish the free tier had "
     "fewer adverts, but the paid plan is reasonably priced."),
    ("a streaming music service", 3,
     "It has a huge catalogue and works smoothly on all my devices. Podcasts are harder to find than "
     "music, which is a minor annoyance."),
)


def sft_demonstrations() -> list[dict[str, str]]:
    """62 demonstration reviews ``{"prompt", "completion"}``; every prompt is a train sentiment prompt."""
    return [{"prompt": SENTIMENT_PHRASINGS[k].format(s=s), "completion": text} for s, k, text in _SFT_DEMOS]


def _sft_demos_split(split: str) -> list[dict[str, str]]:
    if split != "train":
        raise ValueError(f"builtin:sft_demos has only a 'train' split (got {split!r}); "
                         "evaluate on builtin:sentiment 'test' prompts instead")
    return sft_demonstrations()


# --------------------------------------------------------------------------------------------------------
# Arithmetic (reasoning_gym basic_arithmetic)
# --------------------------------------------------------------------------------------------------------

ARITHMETIC_INSTRUCTION = "Answer with the number only."
ARITHMETIC_TEST_MODULUS = 5  # a question is in test iff sha1(question) % 5 == 0 (about 20% of the space)
_SEED_STRIDE = 1_000_003  # reasoning_gym seeds item i with seed + i, so nearby seeds would share items


def arithmetic_split_of(question: str) -> str:
    """"test" iff int(sha1(question)) % 5 == 0, else "train": a fixed partition of all questions."""
    return "test" if int(_sha1(question), 16) % ARITHMETIC_TEST_MODULUS == 0 else "train"


def arithmetic_prompts(
    split: str,
    n: int,
    seed: int = 0,
    *,
    max_terms: int = 2,
    max_digits: int = 2,
    operators: tuple[str, ...] = ("+", "-"),
) -> list[dict[str, str]]:
    """``n`` distinct questions of ``split`` as ``{"prompt", "answer", "question"}``.

    Items come from ``reasoning_gym.create_dataset("basic_arithmetic", seed=seed * 1_000_003 + split offset)``
    and are kept only if :func:`arithmetic_split_of` puts them in ``split``; check answers with
    ``answer == reply.strip()`` or reasoning_gym's ``score_answer``. Defaults are easy (two terms, at most
    2 digits, + and -) so that a 135M model gets some reward.
    """
    _check_split(split)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    import reasoning_gym

    size = 50 * n + 1000
    ds = reasoning_gym.create_dataset(
        "basic_arithmetic",
        size=size,
        seed=seed * _SEED_STRIDE + (0 if split == "train" else _SEED_STRIDE // 2),
        min_terms=2, max_terms=max_terms, min_digits=1, max_digits=max_digits, operators=list(operators),
        allow_parentheses=False, allow_negation=False,
    )
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for i in range(size):
        item = ds[i]
        q = item["question"]
        if q in seen or arithmetic_split_of(q) != split:
            continue
        seen.add(q)
        out.append({"prompt": f"{q} {ARITHMETIC_INSTRUCTION}", "answer": str(item["answer"]), "question": q})
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct {split} questions found in {size} draws for n={n}; "
                     "ask for fewer or raise max_terms/max_digits")


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------

def safety_prompts(split: str) -> list[dict[str, Any]]:
    """Refusal / over-refusal probes ``{"prompt", "category", "harmful"}``: the red-team requests fetched at set-up
    (HarmBench, Do-Not-Answer; ``harmful: true``) and our benign look-alikes in XSTest's categories (``false``)."""
    from alignkit.data.safety import benign_lookalikes, harmful_prompts

    _check_split(split)
    return ([{"prompt": r["prompt"], "category": r["category"], "harmful": True} for r in harmful_prompts(split)]
            + [{"prompt": r["prompt"], "category": r["category"], "harmful": False} for r in benign_lookalikes(split)])


BUILTIN_DATASETS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "hhh": load_hhh,
    "sentiment": sentiment_prompts,
    "sft_demos": _sft_demos_split,
    "arithmetic": lambda split: arithmetic_prompts(split, n=200 if split == "train" else 100),
    "safety": safety_prompts,
    "arithmetic_1digit": lambda split: arithmetic_prompts(split, n=180 if split == "train" else 45, max_digits=1),
    "chain_arithmetic": lambda split: chain_arithmetic_problems(split, n=200 if split == "train" else 50),
}
BUILTIN_PREFIX = "builtin:"


def load_builtin(spec: str, split: str) -> list[dict[str, Any]]:
    """``load_builtin("builtin:hhh", "train")``; a clear error for an unknown name."""
    name = spec[len(BUILTIN_PREFIX):] if spec.startswith(BUILTIN_PREFIX) else spec
    if name not in BUILTIN_DATASETS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_DATASETS)
        raise ValueError(f"unknown built-in dataset {spec!r}; known: {known}")
    return BUILTIN_DATASETS[name](split)
