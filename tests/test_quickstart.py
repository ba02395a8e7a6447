"""The quickstart itself, on the embedded model, with a reduced budget (the full run is `make quickstart`)."""

import json
import math
import shutil
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.pipelines.quickstart import annotate, calibrate_temperature, best_vs_worst_pairs, gold_pairs


def test_annotator_temperature_hits_target_agreement():
    gaps = [0.1, 0.5, 0.9, -0.3, 0.0]
    tau = calibrate_temperature(gaps, 0.75)
    expected = sum(1 / (1 + math.exp(-abs(g) / tau)) for g in gaps if g) / 4
    assert expected == pytest.approx(0.75, abs=1e-6)


def test_simulated_annotators_agree_with_gold_near_target():
    # 200 prompts x 4 samples with spread-out gold scores: the realised agreement is close to the 72% target
    import random

    rng = random.Random(0)
    groups = [(f"p{i}", [f"r{i}-{k}" for k in range(4)], [rng.uniform(-1, 1) for _ in range(4)]) for i in range(200)]
    records, stats = annotate(groups, 0.72, n_annotators=5, seed=0)
    assert stats["n_pairs"] == 200 * 6 == len(records)
    assert 0.68 < stats["agreement_with_gold"] < 0.76
    assert all(r["chosen"] != r["rejected"] for r in records)


def test_majority_of_three_votes_agrees_more_than_one_annotator():
    import random

    rng = random.Random(1)
    groups = [(f"p{i}", [f"r{i}-{k}" for k in range(4)], [rng.uniform(-1, 1) for _ in range(4)]) for i in range(300)]
    records, stats = annotate(groups, 0.72, n_annotators=5, seed=0, votes_per_pair=3)
    assert 0.69 < stats["agreement_with_gold"] < 0.75  # each vote is still a 72% annotator
    assert stats["majority_agreement_with_gold"] > stats["agreement_with_gold"] + 0.05
    assert all(len(set(r["annotators"])) == 3 and r["votes"] in (2, 3) for r in records)


def test_votes_per_pair_must_be_odd_and_fit_the_pool():
    for bad in (2, 7, 0):
        with pytest.raises(ValueError, match="votes_per_pair must be odd and in \\[1, n_annotators=5\\], got"):
            annotate([("p", ["a", "b"], [0.1, 0.2])], 0.72, n_annotators=5, seed=0, votes_per_pair=bad)


def test_best_vs_worst_pairs_follow_the_vote_ranking():
    # 4 responses; votes received: a 3+3+2 = 8, b 0+3+3 = 6, c 0+0+1 = 1, d 1+0+2 = 3 -> order a, b, d, c
    def rec(c, r, v):
        return {"prompt": "p", "chosen": c, "rejected": r, "votes": v, "n_votes": 3, "gold_chosen": 0.0,
                "gold_rejected": 0.0}

    rows = [rec("a", "b", 3), rec("a", "c", 3), rec("a", "d", 2), rec("b", "c", 3), rec("b", "d", 3), rec("d", "c", 2)]
    assert [(r["chosen"], r["rejected"]) for r in best_vs_worst_pairs(rows, per_prompt=2)] == [("a", "c"), ("b", "d")]
    assert len(best_vs_worst_pairs(rows, per_prompt=1)) == 1
    tied = [rec("x", "y", 2), rec("y", "z", 2), rec("z", "x", 2)]  # a vote cycle: every response gets 3 votes
    assert best_vs_worst_pairs(tied, per_prompt=1) == []


def test_gold_pairs_orient_by_gold_and_drop_ties():
    pairs = gold_pairs(["p"], [["a", "b", "c"]], [[0.5, -0.2, 0.5]])
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("a", "b"), ("c", "b")}


REDUCED = ["n_train_prompts=3", "samples_per_prompt=2", "n_eval_prompts=2", "eval_samples=2", "kl_samples=2",
           "max_new_tokens=6", "max_steps=1", "hhh_epochs=1", "show_samples=1", "bon_n=3", "ppo_iterations=1",
           "ppo_rollout_batch_size=2", "ppo_samples_per_prompt=2", "value_layers=1"]


@pytest.mark.slow
def test_quickstart_reduced_budget(tmp_path):
    out = tmp_path / "qs"
    rc = main(["quickstart", f"output_dir={out}", *REDUCED])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    policies = summary["policies"]
    assert set(policies) == {"base", "sft", "dpo", "ppo", "bon"}
    for row in policies.values():
        assert -1.0 <= row["gold_mean"] <= 1.0
    # KL to the SFT reference is estimated from samples (2 prompts x kl_samples=2 of each prompt's samples) for every
    # sampled policy: exactly 0 for the SFT policy against itself (both log-prob passes in fp32 on the same rows),
    # and not 0 for the base policy, which SFT moved away from
    for name in ("base", "sft", "dpo", "ppo"):
        assert policies[name]["kl_n"] == 4, name
    assert policies["sft"]["kl_mean"] == 0.0 and policies["sft"]["kl_se"] == 0.0
    assert {policies[n]["kl_estimator"] for n in ("base", "sft", "dpo", "ppo")} == {"exact"}
    # the reward model's held-out pairs: gold-labelled pairs among the first min(rm_test_samples=4, 3) SFT samples of
    # each of the 2 prompts: at most 3 pairs per prompt
    test_pairs = (out / "data/preferences_test_gold.jsonl").read_text().splitlines()
    assert 0 < len(test_pairs) <= 2 * 3 and summary["reward_model_sentiment"]["n_test_pairs"] == len(test_pairs)
    assert math.isfinite(policies["base"]["kl_mean"]) and policies["base"]["kl_mean"] != 0.0
    # best-of-3 (bon_n=3 > eval_samples=2: SFT drew 3 samples per prompt): KL = log 3 - 2/3, by hand
    assert policies["bon"]["name"] == "best-of-3" and policies["bon"]["kl_n"] is None
    assert policies["bon"]["kl_mean"] == pytest.approx(0.4319456220014432, abs=1e-12)
    assert [r["n"] for r in summary["best_of_n_curve"]] == [1, 2, 3]
    assert summary["best_of_n_curve"][2]["kl"] == pytest.approx(policies["bon"]["kl_mean"])
    # ... and each pick is the proxy-argmax (the first on ties) among its prompt's 3 SFT samples
    sft = json.loads((out / "eval/sft.json").read_text())["samples"]
    picks = json.loads((out / "eval/bon.json").read_text())["samples"]
    assert len(sft) == 2 * 3 and len(picks) == 2
    for i, pick in enumerate(picks):
        group = sft[3 * i : 3 * i + 3]
        best = max(range(3), key=lambda j: (group[j]["proxy"], -j))
        assert pick == group[best]
    assert 0.0 <= summary["reward_model_hhh"]["test_accuracy"] <= 1.0
    for path in summary["artifacts"].values():
        assert Path(path).exists(), path
    assert (out / "reward_vs_kl.png").stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "dpo " in (out / "summary.md").read_text().split("paired by prompt")[1]
    assert set(summary["vs_sft"]) == {"base", "dpo", "ppo", "bon"}


def test_quickstart_resume_reuses_finished_stages_and_continues_an_interrupted_one(tmp_path, monkeypatch):
    """On tiny models (seconds): a run that crashes in DPO (after its last checkpoint, before model/ and summary.json)
    leaves SFT, the collected data, the base/SFT evaluations and both reward models in place; `--resume` reuses them
    (no stage trained or evaluated again, nothing deleted), continues DPO from its checkpoint, then runs PPO and the
    rest. A second `--resume` redoes nothing and reports the same numbers."""
    import zlib

    from alignkit.algorithms import dpo, ppo, reward_model, sft
    from alignkit.models.tiny import save_tiny_models
    from alignkit.pipelines import quickstart

    paths = save_tiny_models(tmp_path / "models")
    out = tmp_path / "qs"
    args = ["quickstart", f"output_dir={out}", f"policy={paths['policy']}", f"reward_model={paths['reward']}",
            f"hhh_reward_model={paths['reward']}", "lora_layers=1", "batch_size=2", "mixed_precision='no'", *REDUCED]
    # VADER scores a random tiny model's character soup 0; a hash of the text gives distinct gold scores
    monkeypatch.setattr(quickstart, "vader_scores", lambda texts: [zlib.crc32(t.encode()) % 2001 / 1000 - 1 for t in texts])
    calls: list[tuple[str, bool]] = []

    def recorded(module, crash: bool = False):
        real = module.train

        def train(cfg, resume=False):
            calls.append((Path(cfg.train.output_dir).name, resume))
            result = real(cfg, resume=resume)
            if crash and not resume:
                run_dir = Path(cfg.train.output_dir)
                (run_dir / "summary.json").unlink()
                shutil.rmtree(run_dir / "model")
                raise KeyboardInterrupt  # interrupted after the final checkpoint
            return result

        monkeypatch.setattr(module, "train", train)

    for module in (sft, reward_model, ppo):
        recorded(module)
    recorded(dpo, crash=True)
    evaluated: list[str] = []
    real_evaluate = quickstart.evaluate_policy

    def evaluate(name, *a, **kw):
        evaluated.append(name)
        return real_evaluate(name, *a, **kw)

    monkeypatch.setattr(quickstart, "evaluate_policy", evaluate)

    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert calls == [("sft", False), ("rm_sentiment", False), ("rm_hhh", False), ("dpo", False)]
    assert evaluated == ["base", "sft"]
    assert json.loads((out / "quickstart.json").read_text())["status"] == "running"
    kept = {p: p.read_bytes() for p in [out / "data/preferences.jsonl", out / "data/collect.json",
                                        out / "sft/model/model.safetensors", out / "rm_hhh/summary.json"]}

    def without_proxy(name):  # the final step adds the proxy scores to every evaluation
        row = json.loads((out / "eval" / f"{name}.json").read_text())
        row.pop("proxy_mean"), row.pop("proxy_se")
        return row, [{k: v for k, v in s.items() if k != "proxy"} for s in row.pop("samples")]

    evals = {name: without_proxy(name) for name in ("base", "sft")}

    calls.clear(), evaluated.clear()
    assert main(args + ["--resume"]) == 0
    assert calls == [("dpo", True), ("ppo", False)]
    assert evaluated == ["dpo", "ppo"]
    for path, content in kept.items():
        assert path.read_bytes() == content, path
    assert {name: without_proxy(name) for name in ("base", "sft")} == evals
    first = json.loads((out / "summary.json").read_text())
    assert set(first["policies"]) == {"base", "sft", "dpo", "ppo", "bon"} and first["resumed"]
    assert json.loads((out / "quickstart.json").read_text())["status"] == "done"
    assert set(first["timings_s"]) >= {"sft", "collect", "eval_base", "rm_hhh", "dpo", "ppo", "eval_ppo"}

    calls.clear(), evaluated.clear()
    assert main(args + ["--resume"]) == 0
    assert calls == [] and evaluated == []
    again = json.loads((out / "summary.json").read_text())
    assert again["policies"] == first["policies"] and again["best_of_n_curve"] == first["best_of_n_curve"]
    assert again["timings_s"] == {**first["timings_s"], "proxy_bon": again["timings_s"]["proxy_bon"]}


def test_quickstart_without_the_hhh_pairs_skips_that_stage_and_says_why(tmp_path, monkeypatch):
    """BIG-bench HHH missing: the HHH reward model is not trained (it feeds nothing else), the summary and report
    say why, and every other stage runs."""
    import zlib

    from alignkit.models.tiny import save_tiny_models
    from alignkit.pipelines import quickstart

    paths = save_tiny_models(tmp_path / "models")
    out = tmp_path / "qs"
    monkeypatch.setattr(quickstart, "vader_scores", lambda texts: [zlib.crc32(t.encode()) % 2001 / 1000 - 1 for t in texts])
    monkeypatch.setattr(quickstart, "hhh_unavailable", lambda: "BIG-bench hhh_alignment is not available: offline")
    assert main(["quickstart", f"output_dir={out}", f"policy={paths['policy']}", f"reward_model={paths['reward']}",
                 f"hhh_reward_model={paths['reward']}", "lora_layers=1", "batch_size=2", "mixed_precision='no'",
                 *REDUCED]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["reward_model_hhh"] == {"test_accuracy": None, "test_margin": None,
                                     "skipped": "BIG-bench hhh_alignment is not available: offline"}
    assert s["artifacts"]["hhh_reward_model"] is None and not (out / "rm_hhh").exists()
    assert "rm_hhh" not in s["timings_s"] and set(s["policies"]) == {"base", "sft", "dpo", "ppo", "bon"}
    assert "HHH reward model: not trained (BIG-bench hhh_alignment is not available: offline)." in \
        (out / "summary.md").read_text()


def test_quickstart_resume_refuses_a_missing_run_or_a_changed_config(tmp_path, capsys):
    from alignkit.config import QuickstartConfig, config_to_yaml

    out = tmp_path / "qs"
    assert main(["quickstart", f"output_dir={out}", "--resume"]) == 1
    assert "holds no quickstart run" in capsys.readouterr().err
    out.mkdir()
    (out / "quickstart.json").write_text(json.dumps({"status": "running", "timings_s": {}}))
    (out / "config.yaml").write_text(config_to_yaml(QuickstartConfig(output_dir=str(out))))
    assert main(["quickstart", f"output_dir={out}", "seed=1", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "--resume with a different config" in err and "seed: saved 0, now 1" in err
    assert err.count(": saved ") == 1  # the only difference
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "quickstart.json"]  # nothing deleted or written


def test_paired_difference_cancels_prompt_effects():
    from alignkit.eval.policy import paired_difference

    # prompt q is much more positive under both policies; a beats b by exactly 0.1 on each prompt
    a = [{"prompt": "p", "gold": 0.1}, {"prompt": "p", "gold": 0.3}, {"prompt": "q", "gold": 0.9}]
    b = [{"prompt": "p", "gold": 0.1}, {"prompt": "q", "gold": 0.8}, {"prompt": "r", "gold": 0.0}]
    mean, se, n = paired_difference(a, b)
    assert n == 2 and mean == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)


def test_evaluate_policy_scores_samples_and_estimates_kl_on_a_subset_of_rows():
    """evaluate_policy: gold per sample with its length/EOS; KL exactly 0 against itself; with kl_samples=1 of 3
    the KL is the mean summed log-ratio over each prompt's FIRST sample only (rows 0, 3)."""
    import torch

    from alignkit.config import DataConfig
    from alignkit.data.tokenize import tokenize_prompts
    from alignkit.eval.policy import evaluate_policy, sequence_kl
    from alignkit.models.loading import disable_dropout
    from alignkit.models.tiny import tiny_causal_lm
    from alignkit.rollout.engine import SamplingParams

    policy, tok = tiny_causal_lm(seed=0)
    reference, _ = tiny_causal_lm(seed=5)
    for m in (policy, reference):
        disable_dropout(m)
        m.eval()
    prompts, _ = tokenize_prompts([{"prompt": [{"role": "user", "content": c}]} for c in ("ab", "xyz")], tok,
                                  DataConfig(max_length=64))
    params = SamplingParams(max_new_tokens=5)

    def gold(texts):
        return [float(len(t)) for t in texts]

    same, rollout = evaluate_policy("p", policy, tok, prompts, gold, params, num_samples=3, reference=policy, seed=1)
    assert len(same.samples) == 6 and same.kl_mean == 0.0
    assert [s["gold"] for s in same.samples] == [float(len(t)) for t in rollout.response_texts]
    assert [s["length"] for s in same.samples] == rollout.response_lengths.tolist()
    assert [s["eos"] for s in same.samples] == rollout.has_eos.tolist()
    sub, _ = evaluate_policy("p", policy, tok, prompts, gold, params, num_samples=3, reference=reference,
                             rollout=rollout, kl_samples=1)
    expected = sequence_kl(policy, reference, rollout.select(torch.tensor([0, 3])))
    assert sub.kl_mean == pytest.approx(float(expected.mean()), abs=1e-6)
    full = sequence_kl(policy, reference, rollout)
    assert float(full.mean()) != pytest.approx(sub.kl_mean)  # the subset really is a subset


def test_reward_vs_kl_plot_and_html_report(tmp_path):
    """The plot draws one point per policy with a KL and the best-of-n curve; policies without KL (the base)
    and curve rows without the panel's value are skipped, not plotted as NaN; the HTML inlines the PNG."""
    import matplotlib.pyplot as plt

    from alignkit.eval import report

    policies = {"sft": {"kl_mean": 0.0, "gold_mean": 0.3, "gold_se": 0.02, "proxy_mean": 0.1, "proxy_se": 0.05},
                "dpo": {"kl_mean": 1.5, "gold_mean": 0.5, "gold_se": 0.03, "proxy_mean": 0.7, "proxy_se": None},
                "base": {"kl_mean": None, "gold_mean": 0.2, "gold_se": 0.02, "proxy_mean": 0.0, "proxy_se": 0.05}}
    curve = [{"n": 1, "kl": 0.0, "gold": 0.3, "proxy": 0.1}, {"n": 2, "kl": 0.19, "gold": 0.4, "proxy": 0.5},
             {"n": 3, "kl": 0.43, "proxy": 0.8}]
    drawn = []
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        for ax in fig.axes:
            drawn.append(([t.get_text() for t in ax.texts], [list(line.get_xdata()) for line in ax.get_lines()]))
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        png = report.plot_reward_vs_kl(policies, tmp_path / "p.png", curve)
    finally:
        plt.Figure.savefig = real_savefig
    (gold_texts, gold_lines), (proxy_texts, proxy_lines) = drawn
    assert sorted(gold_texts) == sorted(proxy_texts) == ["dpo", "sft"]  # no KL for the base: no point
    assert [0.0, 0.19] in gold_lines and [0.0, 0.19, 0.43] in proxy_lines  # the n=3 row has no gold
    page = report.html_report("t", "# summary", png, [("rows", [{"policy": "dpo", "kl": float("nan")}])])
    assert "data:image/png;base64," in page and "<td>-</td>" in page and "# summary" in page


def test_quickstart_two_processes_on_tiny_models(tmp_path):
    """`accelerate launch` with 2 CPU processes runs the whole quickstart: the training stages shard their data,
    collection and evaluation run alike on both (seeded), and one process writes. The collected preferences and
    the report's numbers equal a one-process run's (a user gold function in a file: `gold=file.py:function`)."""
    from multiproc import launch

    from alignkit.models.tiny import save_tiny_models

    paths = save_tiny_models(tmp_path / "models")
    gold = tmp_path / "gold.py"
    gold.write_text("import zlib\n\ndef score(texts):\n"
                    "    return [zlib.crc32(t.encode()) % 2001 / 1000 - 1 for t in texts]\n")

    def args(out):
        return ["quickstart", f"output_dir={out}", f"policy={paths['policy']}", f"reward_model={paths['reward']}",
                f"hhh_reward_model={paths['reward']}", "lora_layers=1", "batch_size=2", "mixed_precision='no'",
                f"gold={gold}:score", *REDUCED, "ppo_rollout_batch_size=4"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one)) == 0
    proc = launch(args(two), num_processes=2, cwd=tmp_path, timeout=600)
    assert proc.stdout.count("# alignkit quickstart") == 1  # one process printed (and wrote) the report
    assert (two / "data/preferences.jsonl").read_text() == (one / "data/preferences.jsonl").read_text()
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert set(s2["policies"]) == {"base", "sft", "dpo", "ppo", "bon"}
    for name in ("base", "sft", "bon"):  # before any multi-process training could differ by float rounding
        assert s2["policies"][name]["gold_mean"] == pytest.approx(s1["policies"][name]["gold_mean"], abs=1e-6), name
    assert (two / "report.html").is_file() and json.loads((two / "quickstart.json").read_text())["status"] == "done"
