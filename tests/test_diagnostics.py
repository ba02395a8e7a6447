"""Reward-hacking diagnostics (alignkit.ops.diagnostics): each metric on crafted responses, each warning
triggered and not triggered, and the diagnostics logged at every evaluation of online runs (GRPO, RLOO, online
DPO, PPO share the harness's evaluate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignkit import cli
from alignkit.models.tiny import save_tiny_models
from alignkit.ops.diagnostics import (
    component_shares,
    diagnostic_warnings,
    distinct_n,
    pearson,
    repetition_rate,
    response_diagnostics,
)
from alignkit.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- metrics on crafted samples
def test_pearson_hand_computed():
    """x = 1,2,3; y = 2,4,7: mean 2, 13/3; Sxy = (-1)(-7/3) + 0 + (1)(8/3) = 5; Sxx = 2; Syy = 49/9+1/9+64/9 = 38/3;
    r = 5 / sqrt(2 * 38/3) = 0.99339."""
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [2]))


def test_distinct_n_hand_computed():
    """[[1,2,1,2],[1,2]]: unigrams 1,2,1,2,1,2 -> 2/6; bigrams (1,2),(2,1),(1,2),(1,2) -> 2/4."""
    seqs = [[1, 2, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(0.5)
    assert distinct_n([[1, 2, 3], [4, 5]], 2) == 1.0
    assert math.isnan(distinct_n([[1]], 2))


def test_repetition_rate_hand_computed():
    """[1,2,3,1,2,3]: 3-grams 123,231,312,123 -> 1 repeat of 4; [4,5,6] adds 1 unique: 1/5. The same 3-gram in two
    DIFFERENT responses is no repetition."""
    assert repetition_rate([[1, 2, 3, 1, 2, 3]]) == pytest.approx(0.25)
    assert repetition_rate([[1, 2, 3, 1, 2, 3], [4, 5, 6]]) == pytest.approx(0.2)
    assert repetition_rate([[1, 2, 3], [1, 2, 3]]) == 0.0


def test_component_shares_hand_computed():
    """a = [1, -1] (w 1) -> mean |.| 1; b = [2, 2] (w 0.5) -> 1: half each. b alone at w 3 -> 6 vs 1."""
    assert component_shares({"a": [1, -1], "b": [2, 2]}, {"b": 0.5}) == pytest.approx({"a": 0.5, "b": 0.5})
    assert component_shares({"a": [1, -1], "b": [2, 2]}, {"b": 3}) == pytest.approx({"a": 1 / 7, "b": 6 / 7})
    assert component_shares({"a": [0.0]}) == {"a": 0.0}


def test_response_diagnostics_on_crafted_set():
    """Three responses of 2, 4 and 6 tokens, rewards 0, 1, 2 (length-driven: corr 1); one without EOS; entropy
    summed 1.0, 2.0, 3.0 over 12 tokens -> 0.5 per token; log-ratios 0.3, 0.6, 0.9 -> KL 0.6; gold 0.1 each ->
    gap = 1 - 0.1."""
    tokens = [[5, 6], [5, 6, 7, 8], [9, 9, 9, 9, 9, 9]]
    d = response_diagnostics(tokens, [0.0, 1.0, 2.0], [True, True, False], entropy=[1.0, 2.0, 3.0],
                             entropy_tokens=[2, 4, 6], logratio=[0.3, 0.6, 0.9], gold=[0.1, 0.1, 0.1],
                             parts={"rewards/rm": [0.0, 1.0, 2.0], "rewards/len": [1.0, 1.0, 1.0]})
    assert d["length"] == pytest.approx(4.0)
    assert d["length_reward_corr"] == pytest.approx(1.0)
    assert d["distinct_1"] == pytest.approx(5 / 12)  # tokens 5,6,7,8,9
    assert d["distinct_2"] == pytest.approx(4 / 9)  # 56 | 56 67 78 | 99 x5: 9 bigrams, {56, 67, 78, 99}
    assert d["repetition"] == pytest.approx(3 / 6)  # 3-grams: 567 678 | 999 x4 -> 3 repeats of 6
    assert d["no_eos_frac"] == pytest.approx(1 / 3)
    assert d["entropy"] == pytest.approx(0.5)
    assert d["kl"] == pytest.approx(0.6)
    assert d["proxy_gold_gap"] == pytest.approx(1.0 - 0.1)
    assert d["share/rm"] == pytest.approx(0.5) and d["share/len"] == pytest.approx(0.5)


# ---------------------------------------------------------------- warnings: one triggers, one does not
BEFORE = {"length": 20.0, "gold": 0.30, "proxy": 0.0, "entropy": 2.0, "distinct_2": 0.8, "repetition": 0.02,
          "no_eos_frac": 0.05, "length_reward_corr": 0.1}


def _now(**kw):
    return {**BEFORE, **kw}


def test_no_warning_for_a_healthy_run():
    assert diagnostic_warnings(_now(length=22.0, gold=0.40, proxy=0.5, entropy=1.8), BEFORE) == []


def test_length_hacking_warning():
    w = diagnostic_warnings(_now(length=32.0, gold=0.31), BEFORE)  # +60%, gold flat
    assert any("length +60% while gold flat" in m and "length hacking" in m for m in w)
    assert not any("length" in m for m in diagnostic_warnings(_now(length=32.0, gold=0.45), BEFORE))  # gold rose
    assert not any("length" in m for m in diagnostic_warnings(_now(length=26.0, gold=0.30), BEFORE))  # +30% only


def test_length_hacking_without_gold_uses_the_correlation():
    before = {k: v for k, v in BEFORE.items() if k != "gold"}
    now = {**before, "length": 40.0, "length_reward_corr": 0.8}
    assert any("possible length hacking" in m for m in diagnostic_warnings(now, before))
    assert not diagnostic_warnings({**now, "length_reward_corr": 0.2}, before)


def test_mode_collapse_warnings():
    assert any("mode collapse" in m and "entropy" in m for m in diagnostic_warnings(_now(entropy=0.4), BEFORE))
    assert not diagnostic_warnings(_now(entropy=1.0), BEFORE)  # half the start: not yet
    assert any("entropy" in m for m in diagnostic_warnings({"entropy": 0.01}))  # absolute floor, no start
    assert any("distinct-2" in m for m in diagnostic_warnings(_now(distinct_2=0.1), BEFORE))
    assert not diagnostic_warnings(_now(distinct_2=0.5), BEFORE)


def test_repetition_warning():
    assert any("degenerate loops" in m for m in diagnostic_warnings(_now(repetition=0.45), BEFORE))
    assert not diagnostic_warnings(_now(repetition=0.2), BEFORE)
    assert not diagnostic_warnings({**BEFORE, "repetition": 0.35}, {**BEFORE, "repetition": 0.3})  # no rise


def test_eos_loss_warning():
    assert any("without EOS" in m for m in diagnostic_warnings(_now(no_eos_frac=0.7), BEFORE))
    assert not diagnostic_warnings(_now(no_eos_frac=0.2), BEFORE)
    # a change, so it needs the start: without one (a policy not trained from the baseline) a token cap that cuts
    # every answer is no warning
    assert not [m for m in diagnostic_warnings(_now(no_eos_frac=0.9)) if "without EOS" in m]


def test_proxy_up_gold_down_warning():
    assert any("over-optimisation" in m for m in diagnostic_warnings(_now(proxy=1.0, gold=0.2), BEFORE))
    assert not diagnostic_warnings(_now(proxy=1.0, gold=0.35), BEFORE)
    assert not diagnostic_warnings(_now(proxy=-0.1, gold=0.2), BEFORE)  # proxy fell too: no over-optimisation


def test_proxy_up_gold_down_needs_changes_beyond_their_standard_errors():
    """With standard errors on both sides, a gold drop of 0.1 warns only when it exceeds 2 s.e. of the difference:
    s.e. 0.03 each -> 2 * 0.042 = 0.085 < 0.1 warns; s.e. 0.05 each -> 0.141 > 0.1 is noise; the same for the
    proxy's rise."""
    before = {**BEFORE, "gold_se": 0.03, "proxy_se": 0.03}
    drop = {"proxy": 0.5, "gold": 0.20}
    assert any("over-optimisation" in m for m in diagnostic_warnings(
        _now(**drop, gold_se=0.03, proxy_se=0.03), before))
    assert not diagnostic_warnings(_now(**drop, gold_se=0.05, proxy_se=0.03), {**before, "gold_se": 0.05})
    assert not diagnostic_warnings(_now(proxy=0.1, gold=0.20, gold_se=0.03, proxy_se=0.1), {**before, "proxy_se": 0.1})
    # one side without its s.e. (an older result): the fixed thresholds alone decide
    assert any("over-optimisation" in m for m in diagnostic_warnings(_now(**drop, gold_se=0.05), BEFORE))


def test_response_diagnostics_standard_errors_by_hand():
    d = response_diagnostics([[1, 2], [3], [4, 5]], [1.0, 2.0, 6.0], [True, True, False], gold=[0.0, 1.0, 1.0])
    # proxy: mean 3, sample var ((4 + 1 + 9) / 2) = 7, se = sqrt(7 / 3); gold: mean 2/3, var 1/3, se = 1/3
    assert d["proxy_se"] == pytest.approx(math.sqrt(7 / 3)) and d["gold_se"] == pytest.approx(1 / 3)
    assert math.isnan(response_diagnostics([[1]], [1.0], [True])["proxy_se"])  # one response: no s.e.


# ---------------------------------------------------------------- logged at every evaluation of an online run
REWARDS = '''
def varied(prompts, completions, **extras):
    return [float(sum(map(ord, c)) % 10) for c in completions]

def gold(prompts, completions, **extras):
    return [float(len(c) % 3) for c in completions]
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("diag_assets")
    paths = save_tiny_models(root)
    (root / "fns.py").write_text(REWARDS, encoding="utf-8")
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in ["say a", "write aaa", "hello there", "abc"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {"policy": str(paths["policy"]), "prompts": str(root / "prompts.jsonl"), "fns": str(root / "fns.py")}


@pytest.mark.parametrize("method", ["grpo", "rloo", "online-dpo"])
def test_online_runs_log_diagnostics_at_every_evaluation(assets, tmp_path: Path, method):
    out = tmp_path / method
    comps = (f"reward.components=[{{type: callable, name: proxy, path: '{assets['fns']}:varied'}}, "
             f"{{type: callable, name: gold, weight: 0, path: '{assets['fns']}:gold'}}]")
    section = {"grpo": ["grpo.num_generations=2", "grpo.prompts_per_iteration=2", "grpo.num_iterations=2"],
               "rloo": ["rloo.num_generations=2", "rloo.prompts_per_iteration=2", "rloo.num_iterations=2"],
               "online-dpo": ["online_dpo.prompts_per_round=2", "online_dpo.rounds=2", "online_dpo.steps_per_round=1",
                              "train.batch_size=2"]}[method]
    argv = [method, f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
            f"data.eval={assets['prompts']}", "data.eval_limit=3", comps, f"train.output_dir={out}",
            "generation.max_new_tokens=5", "train.eval_every=1", *section]
    code = cli.main(argv)
    assert code == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/scores" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # before, periodic, after
    for r in evals:
        for key in ("length", "length_reward_corr", "distinct_1", "distinct_2", "repetition", "entropy",
                    "no_eos_frac", "proxy_gold_gap", "share/proxy", "share/gold"):
            assert f"eval/diag/{key}" in r, (key, sorted(r))
        assert r["eval/diag/share/gold"] == 0.0  # weight 0: a monitor, not part of the reward
        assert 0 <= r["eval/diag/distinct_1"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert "eval_warnings" in summary


def test_diagnostics_two_processes_equal_one(assets, tmp_path: Path):
    """3 eval prompts over 2 processes (one shard padded with a repeated prompt, weighted 0): every process's rows are
    gathered, so the diagnostics equal those of one process."""
    from multiproc import launch

    def args(out):
        return ["grpo", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
                f"data.eval={assets['prompts']}", "data.eval_limit=3",
                f"reward.components=[{{type: callable, path: '{assets['fns']}:varied'}}]", f"train.output_dir={out}",
                "generation.max_new_tokens=5", "grpo.num_generations=2", "grpo.prompts_per_iteration=2",
                "grpo.num_iterations=1"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args(one)) == 0
    launch(args(two), num_processes=2, cwd=tmp_path)
    e1 = [r for r in read_metrics(one / "metrics.jsonl") if "eval/scores" in r]
    e2 = [r for r in read_metrics(two / "metrics.jsonl") if "eval/scores" in r]
    assert len(e1) == len(e2) == 2
    for r1, r2 in zip(e1, e2):
        keys = [k for k in r1 if k.startswith("eval/diag/")]
        assert len(keys) >= 8 and keys == [k for k in r2 if k.startswith("eval/diag/")]
        for k in keys:
            if math.isnan(r1[k]):
                assert math.isnan(r2[k]), k
            else:
                assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-6), k
