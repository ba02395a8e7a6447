"""The quickstart itself, on the embedded model, with a reduced budget (the full run is `make quickstart`)."""

import json
import math
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.pipelines.quickstart import annotate, calibrate_temperature, gold_pairs


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


def test_gold_pairs_orient_by_gold_and_drop_ties():
    pairs = gold_pairs(["p"], [["a", "b", "c"]], [[0.5, -0.2, 0.5]])
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("a", "b"), ("c", "b")}


@pytest.mark.slow
def test_quickstart_reduced_budget(tmp_path):
    out = tmp_path / "qs"
    rc = main(["quickstart", f"output_dir={out}", "n_train_prompts=3", "samples_per_prompt=2", "n_eval_prompts=2",
               "eval_samples=2", "max_new_tokens=6", "max_steps=1", "hhh_epochs=1", "show_samples=1", "bon_n=2",
               "ppo_iterations=1", "ppo_rollout_batch_size=2", "value_layers=1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"base", "sft", "dpo", "ppo", "bon"}
    for row in summary["policies"].values():
        assert -1.0 <= row["gold_mean"] <= 1.0
    assert summary["policies"]["sft"]["kl_mean"] == pytest.approx(0.0, abs=1e-4)  # KL of the reference to itself
    assert 0.0 <= summary["reward_model_hhh"]["test_accuracy"] <= 1.0
    assert summary["policies"]["bon"]["kl_mean"] == pytest.approx(math.log(2) - 0.5)
    for path in summary["artifacts"].values():
        assert Path(path).exists(), path
    assert (out / "reward_vs_kl.png").stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "DPO - SFT gold reward" in (out / "summary.md").read_text()
