"""Tests for best-of-n (eval/bon.py, algorithms/best_of_n.py), rejection sampling and online DPO."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from alignkit.algorithms import best_of_n as bon_mod
from alignkit.algorithms import online_dpo as odpo_mod
from alignkit.algorithms import rejection_sampling as rs_mod
from alignkit.cli import main
from alignkit.online import run as online_run
from alignkit.config import (
    ModelConfig,
    OnlineDPOConfig,
    RejectionSamplingConfig,
    RewardComponent,
    RewardSection,
    RLDataConfig,
    load_config,
)
from alignkit.eval.bon import best_indices, bon_curve, bon_kl, bon_unbiased_estimate, bon_weights
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.models.tiny import save_tiny_models
from alignkit.rewards.combine import build_reward
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams
from alignkit.rollout.prompts import load_prompts

REWARD_PY = '''
def score(prompts, completions, **kw):
    """Deterministic, varied: character codes mod 7 plus a length bonus."""
    return [float(sum(ord(ch) for ch in c) % 7) + 0.01 * len(c) for c in completions]

def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]

def const(prompts, completions, **kw):
    return [1.0] * len(completions)
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _parser_built_once():
    """cli.main rebuilds its argparse parser (with every config key's doc) on each call; build it once here
    so the eight CLI runs below do not pay for it eight times."""
    import alignkit.cli as cli

    parser = cli.build_parser()
    patch = pytest.MonkeyPatch()
    patch.setattr(cli, "build_parser", lambda: parser)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bon_assets")
    paths = save_tiny_models(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ["a", "bb", "cat", "dog", "eel"]))
    reward = root / "reward.py"
    reward.write_text(REWARD_PY)
    return {"policy": str(paths["policy"]), "prompts": str(prompts), "reward": str(reward), "root": root}


def reward_override(assets: dict, fn: str = "score", key: str = "reward.components") -> str:
    return f"{key}=[{{type: callable, path: '{assets['reward']}:{fn}'}}]"


def common(assets: dict) -> list[str]:
    return [f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
            "generation.max_new_tokens=6", "generation.batch_size=8"]


def close(actual: float, expected: float) -> None:
    """assert_close on two Python floats (float64, default tolerances)."""
    assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- analytic KL and the estimator
def test_bon_kl_values():
    """KL(BoN || base) = log n - (n-1)/n: n=1 -> 0; n=2 -> log 2 - 1/2 = 0.193147; n=4 -> log 4 - 3/4 = 0.636294."""
    assert bon_kl(1) == 0.0
    close(bon_kl(2), math.log(2) - 0.5)
    close(bon_kl(2), 0.1931472)
    close(bon_kl(4), 0.6362944)
    with pytest.raises(ValueError, match="integer n >= 1"):
        bon_kl(0)
    with pytest.raises(ValueError, match="integer n >= 1"):
        bon_kl(2.5)


def test_bon_unbiased_estimate_hand_example():
    """proxy [0.3, 0.1, 0.4, 0.2], gold [2, 4, 8, 6]; sorted ascending by proxy the golds are [4, 6, 2, 8].
    N = 4, weights C(i-1, n-1)/C(4, n):
      n=1: [1, 1, 1, 1]/4        -> (4 + 6 + 2 + 8)/4 = 5 (the mean)
      n=2: [0, 1, 2, 3]/6        -> (6 + 2*2 + 3*8)/6 = 34/6 = 5.666667
      n=3: [0, 0, 1, 3]/4        -> (2 + 3*8)/4 = 6.5
      n=4: [0, 0, 0, 1]          -> 8 (gold of the proxy argmax)"""
    proxy = torch.tensor([0.3, 0.1, 0.4, 0.2])
    gold = torch.tensor([2.0, 4.0, 8.0, 6.0])
    assert_close(bon_weights(4, 2), torch.tensor([0.0, 1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))
    for n, expected in [(1, 5.0), (2, 34 / 6), (3, 6.5), (4, 8.0)]:
        close(bon_unbiased_estimate(proxy, gold, n), expected)
    # [P, N]: averaged over prompts; second prompt's proxy argmax has gold 1 -> (8 + 1)/2 at n = N
    proxy2 = torch.stack([proxy, torch.tensor([0.9, 0.0, 0.1, 0.2])])
    gold2 = torch.stack([gold, torch.tensor([1.0, 5.0, 5.0, 5.0])])
    close(bon_unbiased_estimate(proxy2, gold2, 4), 4.5)


def test_bon_estimate_equals_brute_force_over_subsets():
    """Averaging gold(proxy-argmax of S) over all C(N, n) subsets S equals the closed form."""
    g = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(7, generator=g), torch.randn(7, generator=g)
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        brute = sum(float(gold[max(s, key=lambda i: proxy[i])]) for s in subsets) / len(subsets)
        close(bon_unbiased_estimate(proxy, gold, n), brute)


def test_bon_curve_and_errors():
    proxy = torch.tensor([0.3, 0.1, 0.4, 0.2])
    gold = torch.tensor([2.0, 4.0, 8.0, 6.0])
    curve = bon_curve(proxy, gold)
    assert [p["n"] for p in curve] == [1, 2, 3, 4]
    assert_close(torch.tensor([p["kl"] for p in curve]), torch.tensor([0.0, math.log(2) - 1 / 2, math.log(3) - 2 / 3, math.log(4) - 3 / 4]))
    close(curve[0]["proxy"], 0.25)  # mean proxy
    close(curve[-1]["proxy"], 0.4)  # max proxy
    close(curve[1]["gold"], 34 / 6)
    assert "gold" not in bon_curve(proxy, ns=[2])[0]
    with pytest.raises(ValueError, match="at least 5 samples per prompt, got N = 4"):
        bon_unbiased_estimate(proxy, gold, 5)
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        bon_unbiased_estimate(proxy, gold[:3], 2)
    with pytest.raises(ValueError, match=r"scores must be \[P, n\]"):
        best_indices(proxy)
    assert best_indices(torch.tensor([[1.0, 3.0, 3.0], [0.0, -1.0, -2.0]])).tolist() == [1, 0]  # first on ties


# ---------------------------------------------------------------- best-of-n library function
def test_best_of_n_picks_the_argmax_per_prompt(assets):
    tok = load_tokenizer(assets["policy"])
    model = load_policy(ModelConfig(name_or_path=assets["policy"]), tok)
    prompts = load_prompts(RLDataConfig(train=assets["prompts"], limit=3), tok, 6, "train", log=lambda m: None)
    section = RewardSection(components=[RewardComponent(type="callable", path=f"{assets['reward']}:score")])
    reward_fn = build_reward(section, tok)
    gold_fn = build_reward(RewardSection(components=[RewardComponent(type="callable", path=f"{assets['reward']}:length")]))
    torch.manual_seed(0)
    out = bon_mod.best_of_n(model, tok, prompts, 4, SamplingParams(6), reward_fn, gold_fn, batch_size=2)
    assert out["scores"].shape == (3, 4) and out["gold_scores"].shape == (3, 4)
    assert len(out["picks"]) == 3
    for pick, p in zip(out["picks"], prompts):
        # scores recomputed independently from the returned texts
        expected = [float(sum(ord(ch) for ch in c) % 7) + 0.01 * len(c) for c in pick["all_completions"]]
        assert_close(torch.tensor(pick["all_scores"]), torch.tensor(expected))
        j = max(range(4), key=lambda k: expected[k])
        assert pick["index"] == j and pick["completion"] == pick["all_completions"][j]
        assert pick["score"] == max(pick["all_scores"])
        assert pick["gold"] == float(len(pick["completion"])) and pick["prompt"] == p["prompt_text"]
    assert len({c for pick in out["picks"] for c in pick["all_completions"]}) > 3  # samples differ

    class Recording(HFGenerateBackend):  # batch_size counts prompts: a generate() call holds batch_size x n rows
        rows: list[int] = []

        def generate(self, ids, mask, params, row_seeds=None):
            self.rows.append(ids.shape[0])
            return super().generate(ids, mask, params, row_seeds)

    rec = Recording(model, tok)
    bon_mod.best_of_n(model, tok, prompts, 4, SamplingParams(6), reward_fn, batch_size=2, backend=rec)
    assert rec.rows == [8, 4]  # prompts 1-2 x 4 samples, then prompt 3 x 4
    with pytest.raises(ValueError, match="n >= 1"):
        bon_mod.best_of_n(model, tok, prompts, 0, SamplingParams(6), reward_fn)
    with pytest.raises(ValueError, match="got no prompts"):
        bon_mod.best_of_n(model, tok, [], 2, SamplingParams(6), reward_fn)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        bon_mod.best_of_n(model, tok, prompts, 2, SamplingParams(6), reward_fn, batch_size=0)


def test_bon_summary_hand_example():
    """scores [[1, 3], [2, 0]] -> best [3, 2]: mean best 2.5, mean sample 1.5; gold of picks [30, 20] -> 25."""
    scores = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    gold = torch.tensor([[10.0, 30.0], [20.0, 0.0]])
    s = bon_mod.summarize(scores, gold, 2, seed=0)
    assert_close(torch.tensor([s["mean_best_score"], s["mean_sample_score"], s["gold/best_of_n"]]),
                 torch.tensor([2.5, 1.5, 25.0]))
    close(s["kl"], math.log(2) - 0.5)
    assert s["gold/random"] in (5.0, 10.0, 15.0, 20.0, 25.0)  # one random pick per prompt
    close(s["curve"][0]["gold"], 15.0)


# ---------------------------------------------------------------- end-to-end: bon
def test_cli_bon_writes_outputs_and_resumes(assets, tmp_path):
    out = tmp_path / "bon"
    argv = ["bon", *common(assets), "bon.n=3", "generation.batch_size=2", f"output_dir={out}",
            reward_override(assets), reward_override(assets, "length", "bon.gold.components")]
    assert main(argv) == 0
    lines = read_jsonl(out / "best_of_n.jsonl")
    assert len(lines) == 5
    for line in lines:
        assert set(line) == {"prompt", "completion", "score", "all_scores", "gold", "all_gold"}
        assert line["score"] == max(line["all_scores"]) and len(line["all_scores"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    close(summary["kl"], math.log(3) - 2 / 3)
    assert summary["mean_best_score"] > summary["mean_sample_score"]
    assert {"gold/best_of_n", "gold/random", "curve"} <= set(summary) and len(summary["curve"]) == 3
    assert_close(torch.tensor(summary["curve"][-1]["proxy"]), torch.tensor(summary["mean_best_score"]), check_dtype=False)

    # a run killed after its first chunk of 2 prompts (plus a torn line) resumes to the same file
    full = (out / "best_of_n.jsonl").read_text()
    (out / "best_of_n.jsonl").write_text("".join(full.splitlines(keepends=True)[:3]) + '{"prompt": "to')
    assert main([*argv, "--resume"]) == 0
    assert (out / "best_of_n.jsonl").read_text() == full


def test_cli_bon_error_paths(assets, tmp_path, capsys):
    assert main(["bon", *common(assets), f"output_dir={tmp_path / 'x'}"]) == 1
    assert "reward.components is empty" in capsys.readouterr().err
    assert main(["bon", *common(assets), "bon.n=0"]) == 2
    assert "bon.n" in capsys.readouterr().err


# ---------------------------------------------------------------- end-to-end: rejection sampling
def test_cli_rs_trains_on_best_samples(assets, tmp_path):
    out = tmp_path / "rs"
    argv = ["rs", *common(assets), "rs.n=3", "rs.rounds=2", "rs.prompts_per_round=3", "train.max_steps=1",
            "train.batch_size=4", "train.lr=1e-3", f"train.output_dir={out}", reward_override(assets)]
    assert main(argv) == 0
    rounds = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rounds] == [1, 2]
    for r in rounds:
        # the SFT data (best of 3) scores at least the samples' mean, and here strictly more
        assert r["scores/best"] > r["objective/scores"] and r["num_examples"] == 3 and r["steps"] == 1
        assert r["loss"] > 0 and r["grad_norm"] > 0  # the SFT step on the picks ran
    data = read_jsonl(out / "rounds" / "round-001.jsonl")
    assert len(data) == 3 and all(d["score"] == max(d["all_scores"]) for d in data)
    close(rounds[0]["scores/best"], sum(d["score"] for d in data) / 3)
    assert (out / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    # a finished run is not overwritten by accident
    assert main(argv) == 1


# ---------------------------------------------------------------- online DPO
def test_best_worst_pairs_hand_example():
    """[[1, 3, 2], [5, 5, 5], [0, -1, 4]] -> chosen (argmax) [1, 0, 2], rejected (argmin) [0, 0, 1];
    row 1 ties (max == min) -> not a pair."""
    chosen, rejected, is_pair = odpo_mod.best_worst_pairs(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [0.0, -1.0, 4.0]]))
    assert chosen.tolist() == [1, 0, 2] and rejected.tolist() == [0, 0, 1] and is_pair.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="G >= 2 samples per prompt"):
        odpo_mod.best_worst_pairs(torch.tensor([[1.0], [2.0]]))


def test_pair_examples_take_the_sampled_tokens():
    """2 prompts x G=2; prompt 0 = [7, 8] (left-padded), prompt 1 = [9]; pairs: prompt 0 (chosen 1, rejected 0)."""
    rollout = Rollout(
        prompt_ids=torch.tensor([[7, 8], [7, 8], [0, 9], [0, 9]]),
        prompt_mask=torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1]]),
        response_ids=torch.tensor([[20, 2, 0], [30, 31, 2], [40, 2, 0], [50, 2, 0]]),
        response_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]]),
        has_eos=torch.tensor([True] * 4), prompt_texts=["p0", "p0", "p1", "p1"], response_texts=["a", "b", "c", "d"],
    )
    chosen, rejected, is_pair = odpo_mod.best_worst_pairs(torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    assert is_pair.tolist() == [True, False]
    ex = odpo_mod.pair_example(rollout, 0 * 2 + int(chosen[0]), 0 * 2 + int(rejected[0]))
    assert ex["chosen_input_ids"] == [7, 8, 30, 31, 2] and ex["chosen_response_mask"] == [0, 0, 1, 1, 1]
    assert ex["rejected_input_ids"] == [7, 8, 20, 2] and ex["rejected_response_mask"] == [0, 0, 1, 1]


def odpo_argv(assets: dict, out: Path, fn: str = "score", rounds: int = 2) -> list[str]:
    return ["online-dpo", *common(assets), f"online_dpo.rounds={rounds}", "online_dpo.prompts_per_round=3",
            "online_dpo.num_generations=3", "online_dpo.steps_per_round=2", "train.batch_size=2", "train.lr=1e-3",
            f"train.output_dir={out}", reward_override(assets, fn)]


def test_cli_online_dpo_logs_pairs_and_ties(assets, tmp_path):
    out = tmp_path / "odpo"
    assert main(odpo_argv(assets, out)) == 0
    rounds = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["n_pairs"] + r["n_ties"] == 3
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "objective/scores",
                    "scores/chosen", "scores/rejected"):
            assert key in r, key
        assert r["scores/chosen"] > r["scores/rejected"]  # best vs worst of each group
    assert rounds[0]["steps"] == 2 and rounds[0]["loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4 and (out / "model" / "model.safetensors").is_file()


def test_online_dpo_reward_name_clash_is_an_error(assets, tmp_path, capsys):
    argv = odpo_argv(assets, tmp_path / "clash", rounds=1)[:-1]
    argv.append(f"reward.components=[{{type: callable, name: margins, path: '{assets['reward']}:score'}}]")
    assert main(argv) == 1
    assert "['margins'] clash with DPO's rewards/<name> metrics" in capsys.readouterr().err


def test_online_dpo_all_ties_skip_updates(assets, tmp_path):
    """A constant reward: every group ties -> 0 pairs, 3 ties per round, no step, weights unchanged."""
    out = tmp_path / "ties"
    assert main([*odpo_argv(assets, out, "const", rounds=1)]) == 0
    (r,) = read_jsonl(out / "metrics.jsonl")
    assert r["n_pairs"] == 0 and r["n_ties"] == 3 and r["steps"] == 0 and "loss" not in r
    initial = load_file(str(Path(assets["policy"]) / "model.safetensors"))
    final = load_file(str(out / "model" / "model.safetensors"))
    for k, v in initial.items():
        assert torch.equal(final[k], v), k


def test_online_dpo_resume_after_kill_equals_uninterrupted(assets, tmp_path, monkeypatch):
    argv_full = odpo_argv(assets, tmp_path / "full")[1:]
    argv_kill = odpo_argv(assets, tmp_path / "kill")[1:]
    odpo_mod.train(load_config(OnlineDPOConfig, overrides=argv_full))

    real_save = online_run.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 1:
            raise Killed  # the process dies right after round 1's checkpoint
        return path

    monkeypatch.setattr(online_run, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        odpo_mod.train(load_config(OnlineDPOConfig, overrides=argv_kill))
    monkeypatch.setattr(online_run, "save_checkpoint", real_save)
    odpo_mod.train(load_config(OnlineDPOConfig, overrides=argv_kill), resume=True)

    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "kill" / "model" / "model.safetensors"))
    initial = load_file(str(Path(assets["policy"]) / "model.safetensors"))
    assert any(not torch.equal(full[k], initial[k]) for k in full)  # training changed the weights
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    strip_r = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(tmp_path / "kill" / "metrics.jsonl")]
    assert strip == strip_r


def test_rs_resume_after_kill_equals_uninterrupted(assets, tmp_path, monkeypatch):
    def args(out):
        return [*common(assets), "rs.n=2", "rs.rounds=2", "rs.prompts_per_round=2", "train.max_steps=1",
                "train.batch_size=2", "train.lr=1e-3", f"train.output_dir={out}", reward_override(assets)]

    rs_mod.train(load_config(RejectionSamplingConfig, overrides=args(tmp_path / "full")))
    real_save = online_run.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(run_dir, completed, *a, **kw):
        path = real_save(run_dir, completed, *a, **kw)
        if completed == 1:
            raise Killed
        return path

    monkeypatch.setattr(online_run, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        rs_mod.train(load_config(RejectionSamplingConfig, overrides=args(tmp_path / "kill")))
    monkeypatch.setattr(online_run, "save_checkpoint", real_save)
    rs_mod.train(load_config(RejectionSamplingConfig, overrides=args(tmp_path / "kill")), resume=True)
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "kill" / "model" / "model.safetensors"))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k



@pytest.mark.parametrize(("loss", "lora", "expected"), [("dpo", False, math.log(2)), ("ipo", False, 25.0), ("dpo", True, math.log(2))])
def test_online_dpo_first_step_is_at_the_reference(assets, tmp_path, loss, lora, expected):
    """Step 1 of round 1: policy == reference (frozen copy, or LoRA with B = 0 and adapters disabled), so h = 0:
    DPO loss = -log sigma(0) = log 2; IPO loss = (0 - 1/(2 beta))^2 = (1/0.2)^2 = 25 for beta = 0.1;
    implicit rewards beta (log pi - log pi_ref) = 0."""
    overrides = odpo_argv(assets, tmp_path / "o", rounds=1)[1:] + [
        "online_dpo.steps_per_round=1", f"online_dpo.loss={loss}", f"model.lora.enabled={str(lora).lower()}",
        "train.save_model=false",
    ]
    result = odpo_mod.train(load_config(OnlineDPOConfig, overrides=overrides))
    (r,) = result["history"]
    assert r["n_pairs"] >= 1
    # the reference and the policy batch the pairs differently (padding): equal up to float32 rounding
    assert_close(torch.tensor(r["loss"], dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                 rtol=1e-6, atol=1e-7)
    close(r["rewards/chosen"], 0.0)
    close(r["rewards/margins"], 0.0)
    assert not (tmp_path / "o" / "model").exists()
