"""Reward-model ensembles, multi-objective heads, the constrained (Lagrangian) reward and the RM evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from alignkit.algorithms.reward_model import head_weights, multi_head_step
from alignkit.cli import main
from alignkit.config import RewardComponent, RewardConstraint, RewardSection
from alignkit.losses.reward import masked_bradley_terry_loss
from alignkit.models.tiny import save_tiny_models
from alignkit.rewards.combine import ConstrainedReward, build_reward, lagrange_update
from alignkit.rewards.ensemble import (
    AGGREGATES,
    load_ensemble,
    normalize_members,
    read_manifest,
    standardize,
)
from alignkit.rewards.evaluation import expected_calibration_error, pair_report
from alignkit.rewards.reward_model import load_reward_model_scorer

pytestmark = pytest.mark.usefixtures("one_thread")

PREFS = [
    {"prompt": "Say something nice.", "chosen": "You are great!", "rejected": "No.", "category": "helpful"},
    {"prompt": "Greet me.", "chosen": "Hello, friend.", "rejected": "Go away.", "category": "harmless"},
    {"prompt": "Rate the food.", "chosen": "Delicious.", "rejected": "Awful stuff.", "category": "helpful"},
    {"prompt": "How was the film?", "chosen": "Loved it", "rejected": "Hated it", "category": "harmless"},
]


# ---------------------------------------------------------------- aggregation maths
def test_aggregates_hand_computed():
    """Members K = 2 on N = 2 completions: r = [[1, 0], [3, 2]].
    mean = [2, 1]; min = [1, 0]; 1/K variance = ((1-2)^2 + (3-2)^2)/2 = 1 (both columns), std = 1;
    uwo (lambda 0.5) = mean - 0.5 * 1 = [1.5, 0.5]; lcb (lambda 2) = mean - 2 * 1 = [0, -1].
    K = 3, one completion r = [0, 3, 6]: mean 3, var (9 + 0 + 9)/3 = 6, std sqrt 6 = 2.449490;
    lcb (lambda 1) = 0.550510, uwo (lambda 0.1) = 2.4, min 0."""
    r = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert_close(AGGREGATES["mean"](r), torch.tensor([2.0, 1.0]))
    assert_close(AGGREGATES["min"](r), torch.tensor([1.0, 0.0]))
    assert_close(AGGREGATES["uwo"](r, 0.5), torch.tensor([1.5, 0.5]))
    assert_close(AGGREGATES["lcb"](r, 2.0), torch.tensor([0.0, -1.0]))
    r3 = torch.tensor([[0.0], [3.0], [6.0]])
    assert_close(AGGREGATES["lcb"](r3, 1.0), torch.tensor([3.0 - math.sqrt(6.0)]))
    assert_close(AGGREGATES["uwo"](r3, 0.1), torch.tensor([2.4]))
    assert_close(AGGREGATES["min"](r3), torch.tensor([0.0]))


def test_standardize_members_on_reference_samples():
    """ref = [[1, 3], [0, 4]]: means [2, 2], Bessel stds [sqrt 2, 2 sqrt 2];
    gain = [1/sqrt 2, 1/(2 sqrt 2)], bias = [-sqrt 2, -1/sqrt 2]; normalised ref = [[-1, 1], [-1, 1]] / sqrt 2."""
    ref = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    gain, bias = standardize(ref)
    assert_close(gain, torch.tensor([1 / math.sqrt(2), 1 / (2 * math.sqrt(2))]))
    assert_close(bias, torch.tensor([-math.sqrt(2), -1 / math.sqrt(2)]))
    assert_close(normalize_members(ref, gain, bias), torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]) / math.sqrt(2))


# ---------------------------------------------------------------- constrained reward
def test_lagrange_multiplier_rises_when_violated_and_falls_to_zero_when_satisfied():
    """lambda <- max(0, lambda + lr (d - E[c])). lambda 0.5, d 0.5, lr 1: E[c] = 0.2 -> 0.8 (violated: rises);
    E[c] = 1.5 -> max(0, -0.5) = 0 (satisfied: falls to 0); cap lambda_max 0.6 -> 0.6."""
    assert lagrange_update(0.5, 0.2, 0.5, 1.0) == pytest.approx(0.8)
    assert lagrange_update(0.5, 1.5, 0.5, 1.0) == 0.0
    assert lagrange_update(0.5, 0.2, 0.5, 1.0, lam_max=0.6) == pytest.approx(0.6)
    lam, trajectory = 0.0, []
    for mean_c in [0.0, 0.0, 0.1, 0.9, 0.9, 0.9, 0.9]:  # violated three times (0.1, 0.2, 0.28), then satisfied
        lam = lagrange_update(lam, mean_c, threshold=0.5, lr=0.2)
        trajectory.append(lam)
    assert trajectory[0] < trajectory[1] < trajectory[2]
    assert trajectory[3] < trajectory[2] and trajectory[-1] == 0.0


class _Const:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def __call__(self, prompts, completions, extras):
        return torch.tensor(self.values, dtype=torch.float32)


def test_constrained_reward_total_logging_and_update():
    """R = w_a r_a + lambda r_c: r_a = [1, 2], r_c = [-1, 0], lambda 0.5 -> [0.5, 2]; batch mean r_c = -0.5 under
    threshold 0 with lr 1 -> lambda 1.0."""
    reward = ConstrainedReward([("help", _Const("help", [1.0, 2.0]), 1.0), ("safe", _Const("safe", [-1.0, 0.0]), 1.0)],
                               "safe", threshold=0.0, lr=1.0, lambda_init=0.5)
    total, parts = reward(["p", "p"], ["a", "b"], [{}, {}])
    assert_close(total, torch.tensor([0.5, 2.0]))
    assert_close(parts["rewards/lambda"], torch.tensor([0.5, 0.5]))
    out = reward.end_iteration({k: float(v.mean()) for k, v in parts.items()})
    assert reward.lam == pytest.approx(1.0) and out["rewards/lambda_next"] == pytest.approx(1.0)
    assert reward.state_dict() == {"lambda": 1.0}
    with pytest.raises(ValueError, match="reward.constraint.name 'nope' is not a component"):
        ConstrainedReward([("help", _Const("help", [1.0]), 1.0)], "nope", 0.0, 1.0)


def test_constraint_config_builds_a_constrained_reward():
    section = RewardSection(components=[RewardComponent(type="length", target_length=5, name="len"),
                                        RewardComponent(type="format", pattern="a", name="fmt")],
                            constraint=RewardConstraint(name="fmt", threshold=0.5, lr=0.3))
    reward = build_reward(section)
    assert isinstance(reward, ConstrainedReward) and reward.constrained == "fmt" and reward.lr == 0.3


# ---------------------------------------------------------------- calibration and the report
def test_ece_hand_computed():
    """probs [0.9, 0.9, 0.2, 0.6], labels [1, 0, 0, 1], 10 bins:
    bin 9: n 2, conf 0.9, acc 0.5 -> 2/4 * 0.4 = 0.2; bin 2: conf 0.2, acc 0 -> 1/4 * 0.2 = 0.05;
    bin 6: conf 0.6, acc 1 -> 1/4 * 0.4 = 0.1; ECE = 0.35."""
    ece, bins = expected_calibration_error(torch.tensor([0.9, 0.9, 0.2, 0.6]), torch.tensor([1, 0, 0, 1]))
    assert ece == pytest.approx(0.35)
    assert [(b["lo"], b["n"]) for b in bins] == [(0.2, 1), (0.6, 1), (0.9, 2)]
    perfect, _ = expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1, 0]))
    assert perfect == 0.0


def test_pair_report_accuracy_categories_disagreement_and_length():
    """K = 2 members, margins [[1, -1, 2], [1, 1, -4]]: mean margins [1, 0, -1] -> accuracy 1/3;
    member accuracies [2/3, 2/3]; margin std per pair [0, 1, 3] -> mean 4/3; members disagree on pairs 2, 3 -> 2/3."""
    chosen = torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, -4.0]])
    rejected = torch.zeros(2, 3)
    r = pair_report(chosen, rejected, ["a", "b", "a"], torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert r["accuracy"] == pytest.approx(1 / 3)
    assert r["accuracy_by_category"] == {"a": 0.5, "b": 0.0}
    assert r["member_accuracy"] == pytest.approx([2 / 3, 2 / 3])
    assert r["disagreement_margin_std"] == pytest.approx(4 / 3)
    assert r["disagreement_sign_frac"] == pytest.approx(2 / 3)
    assert "length_correlation" in r and isinstance(r["length_warning"], bool)
    # scores that grow with length -> a warning
    long = pair_report(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.1, 0.2]]), None,
                       torch.tensor([10.0, 20.0, 30.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert long["length_correlation"] > 0.9 and long["length_warning"]


# ---------------------------------------------------------------- multi-head loss masking
def test_head_weights_mask_other_categories_and_error_names_the_category():
    pairs = [{"category": "helpful"}, {"category": None}, {"category": "harmless"}]
    assert head_weights(pairs, ["helpful", "harmless"], True, None) == [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="pair 0 has category 'helpful'"):
        head_weights(pairs, ["harmless"], True, None)
    boot = head_weights(pairs, ["m0", "m1"], False, 0)
    assert boot == head_weights(pairs, ["m0", "m1"], False, 0)  # reproducible
    assert all(float(w).is_integer() and w >= 0 for row in boot for w in row)


def test_masked_bt_loss_and_masked_head_gets_no_gradient():
    """Equal scores at weight 1 give log 2; weight 0 gives 0."""
    loss = masked_bradley_terry_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert_close(loss, torch.tensor([[math.log(2), 0.0], [0.0, math.log(2)]]))

    class TwoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(3, 2)

        def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False):
            return type("O", (), {"logits": self.score(torch.nn.functional.one_hot(input_ids[:, 0], 3).float())})

    model = TwoHead()
    batch = {"input_ids": torch.tensor([[0], [1]]), "attention_mask": torch.ones(2, 1, dtype=torch.long),
             "chosen_idx": torch.tensor([0]), "rejected_idx": torch.tensor([1]),
             "head_weight": torch.tensor([[1.0, 0.0]])}  # the pair trains head 0 only
    multi_head_step(model, batch).loss.backward()
    assert float(model.score.weight.grad[1].abs().sum()) == 0.0 and float(model.score.bias.grad[1]) == 0.0
    assert float(model.score.weight.grad[0].abs().sum()) > 0.0


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ens")
    paths = save_tiny_models(root)
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ["a", "bb", "cat", "dog"]))
    return {"policy": str(paths["policy"]), "reward": str(paths["reward"]), "prefs": str(prefs),
            "prompts": str(prompts), "root": root}


def rm_args(assets, out, *extra):
    return [f"model.name_or_path={assets['reward']}", f"data.train={assets['prefs']}", f"data.eval={assets['prefs']}",
            f"train.output_dir={out}", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3", "train.cpu=true",
            *extra]


@pytest.fixture(scope="module")
def seeds_ensemble(assets) -> Path:
    out = assets["root"] / "rm_seeds"
    assert main(["rm", *rm_args(assets, out, "rm.ensemble_size=3")]) == 0
    return out


def test_rm_ensemble_seeds_saves_one_directory_and_round_trips(seeds_ensemble):
    model_dir = seeds_ensemble / "model"
    manifest = read_manifest(model_dir)
    assert manifest["mode"] == "seeds" and [m["path"] for m in manifest["members"]] == ["member_0", "member_1",
                                                                                          "member_2"]
    ens = load_ensemble(model_dir)
    prompts, completions = ["Hi ", "Yo "], ["great", "bad thing"]
    scores = ens.member_scores(prompts, completions)
    assert scores.shape == (3, 2)
    for k in range(3):  # each member as a plain reward model gives the same (normalised) scores
        alone = load_reward_model_scorer(str(model_dir / f"member_{k}"))
        assert_close(alone(prompts, completions), scores[k])
    assert len({tuple(s.tolist()) for s in scores}) == 3  # members differ (seed + bootstrap)
    summary = json.loads((seeds_ensemble / "summary.json").read_text())
    ev = summary["rm_eval"]
    assert ev["n_members"] == 3 and len(ev["member_accuracy"]) == 3 and "disagreement_margin_std" in ev
    assert set(ev["accuracy_by_category"]) == {"helpful", "harmless"}
    assert (seeds_ensemble / "reliability.png").stat().st_size > 0 and (seeds_ensemble / "rm_eval.json").is_file()
    lcb = load_ensemble(model_dir, aggregate="lcb", aggregate_lambda=1.0)
    assert_close(lcb(prompts, completions), scores.mean(0) - scores.std(0, unbiased=False))


def test_rm_ensemble_heads_and_multi_objective(assets):
    out = assets["root"] / "rm_heads"
    assert main(["rm", *rm_args(assets, out, "rm.ensemble_size=2", "rm.ensemble_mode=heads")]) == 0
    ens = load_ensemble(out / "model")
    assert ens.mode == "heads" and ens.member_scores(["Hi "], ["ok"]).shape == (2, 1)
    out = assets["root"] / "rm_mo"
    assert main(["rm", *rm_args(assets, out, "rm.heads=[helpful,harmless]")]) == 0
    scorer = load_reward_model_scorer(str(out / "model"))
    assert scorer.head_names == ["helpful", "harmless"] and scorer.heads(["Hi "], ["ok"]).shape == (1, 2)
    section = RewardSection(components=[RewardComponent(type="model", path=str(out / "model"), head="harmless")])
    reward = build_reward(section)
    total, _ = reward(["Hi "], ["ok"], [{}])
    assert_close(total, scorer.heads(["Hi "], ["ok"])[:, 1])
    with pytest.raises(ValueError, match="head 'honest' is not an output"):
        build_reward(RewardSection(components=[RewardComponent(type="model", path=str(out / "model"),
                                                                head="honest")]))


def test_ensemble_errors_name_the_file(tmp_path, seeds_ensemble):
    with pytest.raises(ValueError, match="ensemble.json is missing"):
        load_ensemble(tmp_path)
    (tmp_path / "ensemble.json").write_text('{"format": "alignkit-reward-ensemble", "members": [{"path": "gone"}]}')
    with pytest.raises(ValueError, match=r"ensemble.json: members\[0\].path 'gone' is not a directory"):
        load_ensemble(tmp_path)
    (tmp_path / "ensemble.json").write_text("{oops")
    with pytest.raises(ValueError, match="ensemble.json: not valid JSON"):
        load_ensemble(tmp_path)
    with pytest.raises(ValueError, match="aggregate 'lcb' needs an ensemble directory"):
        build_reward(RewardSection(components=[RewardComponent(
            type="model", path=str(seeds_ensemble / "model" / "member_0"), aggregate="lcb")]))


def test_ensemble_component_in_grpo_and_best_of_n_logs_members(assets, seeds_ensemble, tmp_path):
    component = (f"reward.components=[{{type: model, name: ens, path: '{seeds_ensemble / 'model'}', aggregate: lcb, "
                 "aggregate_lambda: 0.5}]")
    out = tmp_path / "grpo"
    assert main(["grpo", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}", component,
                 f"train.output_dir={out}", "generation.max_new_tokens=4", "train.lr=1e-3",
                 "grpo.num_generations=2", "grpo.prompts_per_iteration=2", "grpo.num_iterations=1"]) == 0
    line = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][0]
    for key in ("rewards/ens", "rewards/ens/member_0", "rewards/ens/member_2", "rewards/ens/std"):
        assert key in line, key
    members = [line[f"rewards/ens/member_{k}"] for k in range(3)]
    assert line["rewards/ens"] <= sum(members) / 3 + 1e-6  # lcb is below the mean
    out = tmp_path / "bon"
    assert main(["bon", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}", component,
                 f"output_dir={out}", "bon.n=3", "generation.max_new_tokens=4"]) == 0
    assert json.loads((out / "summary.json").read_text())["mean_best_score"] >= \
        json.loads((out / "summary.json").read_text())["mean_sample_score"]


def test_constrained_grpo_logs_lambda_and_resumes_it(assets, tmp_path):
    """A constraint that cannot hold (format 'zzzz' never matches: E[c] = 0 < 0.5): lambda rises every iteration."""
    reward = ("reward.components=[{type: length, target_length: 3, name: short}, "
              "{type: format, pattern: 'zzzz', name: fmt}]")
    out = tmp_path / "cgrpo"
    args = ["grpo", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}", reward,
            "reward.constraint={name: fmt, threshold: 0.5, lr: 0.2}", f"train.output_dir={out}",
            "generation.max_new_tokens=4", "train.lr=1e-3", "grpo.num_generations=2", "grpo.prompts_per_iteration=2",
            "grpo.num_iterations=3", "grpo.save_every=1"]
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lam = [x["rewards/lambda"] for x in lines if "rewards/lambda_next" in x]
    assert lam == pytest.approx([0.0, 0.1, 0.2])
    assert [x["rewards/lambda_next"] for x in lines if "rewards/lambda_next" in x] == pytest.approx([0.1, 0.2, 0.3])


def test_rm_eval_command_on_an_ensemble_and_a_single_model(assets, seeds_ensemble, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["rm-eval", f"model={seeds_ensemble / 'model'}", f"data={assets['prefs']}", f"output_dir={out}"]) == 0
    report = json.loads((out / "rm_eval.json").read_text())
    assert report["n_pairs"] == 4 and report["n_members"] == 3 and 0.0 <= report["ece"] <= 1.0
    assert set(report["accuracy_by_category"]) == {"helpful", "harmless"}
    assert (out / "reliability.png").stat().st_size > 0
    # the ensemble report equals the one `alignkit rm` printed after training (same pairs, same scores)
    trained = json.loads((seeds_ensemble / "rm_eval.json").read_text())
    for key in ("accuracy", "margin", "ece", "member_accuracy", "disagreement_margin_std", "length_correlation"):
        assert report[key] == pytest.approx(trained[key], abs=1e-5), key
    out = tmp_path / "ev1"
    assert main(["rm-eval", f"model={seeds_ensemble / 'model' / 'member_1'}", f"data={assets['prefs']}",
                 f"output_dir={out}"]) == 0
    assert json.loads((out / "rm_eval.json").read_text())["n_members"] == 1
    capsys.readouterr()
    assert main(["rm-eval", f"data={assets['prefs']}", f"output_dir={tmp_path / 'ev2'}"]) == 1
    assert "rm-eval needs model" in capsys.readouterr().err


def test_ppo_with_an_ensemble_reward_model_needs_a_value_backbone(assets, seeds_ensemble, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["ppo", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
                 f"ppo.reward_model={seeds_ensemble / 'model'}", f"train.output_dir={out}"]) == 1
    assert "is a reward-model ensemble: the value model cannot be initialised from it" in capsys.readouterr().err
    assert not out.exists()


def test_label_queue_orders_pairs_by_a_real_ensembles_disagreement(seeds_ensemble, tmp_path, capsys):
    """`alignkit label create --ensemble` on an ensemble trained by `alignkit rm`: the queue serves pairs in
    decreasing order of the members' disagreement (std over members of the score difference)."""
    from alignkit.label.select import pair_disagreement
    from alignkit.label.store import Store
    from alignkit.rewards.ensemble import load_ensemble

    responses = ["You are great!", "No.", "Hello, friend.", "Go away now."]
    cands = tmp_path / "c.jsonl"
    cands.write_text(json.dumps({"prompt": "Say something nice.", "responses": responses}) + "\n")
    db = tmp_path / "l.db"
    assert main(["label", "create", "--db", str(db), "--project", "p", "--candidates", str(cands), "--ensemble",
                 str(seeds_ensemble / "model"), "--overlap", "1", "--annotators", "a"]) == 0
    out = capsys.readouterr().out
    assert "ordered by ensemble disagreement" in out
    ens = load_ensemble(seeds_ensemble / "model")
    prompt = ens.tokenizer.apply_chat_template([{"role": "user", "content": "Say something nice."}], tokenize=False,
                                               add_generation_prompt=True)
    scores = ens.member_scores([prompt] * 4, responses)  # [K=3, 4]
    assert scores.shape == (3, 4)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    dis = pair_disagreement(scores, pairs).tolist()
    store = Store(db)
    project = store.project("p")
    a = store.authenticate(out.split("invite token for a: ")[1].split()[0]).annotator_id
    served = []
    while (item := store.next_item(project, a)) is not None:
        served.append(dis[pairs.index(tuple(sorted(item["indices"])))])
        store.vote(project, a, item["id"], "A", f"vote-{len(served):05d}")
    assert len(served) == 6 and served == sorted(served, reverse=True) and served[0] > served[-1]
