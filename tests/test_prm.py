"""Process reward models: loss, step alignment, padding invariance, verifier, MC labels, aggregations, beam search,
dense rewards, voting, and end-to-end `alignkit prm`, PRM best-of-n and `alignkit prm-eval` on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForTokenClassification

from alignkit.algorithms.prm import collate_stepwise
from alignkit.cli import main
from alignkit.config import RewardComponent, RewardSection, StepwiseDataConfig
from alignkit.data.chains import apply_op, chain_arithmetic_problems, chain_split_of
from alignkit.data.formats import load_examples
from alignkit.data.io import DataError
from alignkit.data.pipeline import prepare_data
from alignkit.data.tokenize import encode, encode_steps, split_steps, tokenize_stepwise
from alignkit.eval.voting import majority_answer, majority_vote_accuracy, pass_at_n
from alignkit.losses import prm_step_loss
from alignkit.models.tiny import save_tiny_models, tiny_config, tiny_tokenizer
from alignkit.rewards.combine import build_reward
from alignkit.rewards.prm import (
    PRMScorer,
    aggregate_steps,
    dense_step_rewards,
    load_prm_scorer,
    step_end_tokens,
    token_logits,
)
from alignkit.rewards.steps import is_correct_answer, mc_step_labels, parse_equation, verify_chain_steps
from alignkit.rollout.step_search import prefix_text, step_beam_search

pytestmark = pytest.mark.usefixtures("one_thread")

STEPWISE = [
    {"prompt": "Start with 2. Add 3.", "steps": ["2 + 3 = 5", "Answer: 5"], "labels": [True, True]},
    {"prompt": "Start with 2. Add 3.", "steps": ["2 + 3 = 6", "Answer: 6"], "labels": [False, False]},
    {"prompt": "Start with 4. Add 1.", "steps": ["4 + 1 = 5", "Answer: 5"], "labels": [1.0, 0.5]},
    {"prompt": "Start with 1. Add 1.", "steps": ["1 + 1 = 2", "Answer: 3"], "labels": [1, 0]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_prm(seed: int = 0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(tiny_config(len(tok), num_labels=1)).eval()
    return model, tok


# ---------------------------------------------------------------- the loss
def test_prm_step_loss_hand_computed():
    """Row 0: steps at t=0 (z=0, y=1) and t=1 (z=ln 3 so sigma=0.75, y=0); t=2 is not a step.
        -log sigma(0) = ln 2 = 0.693147;  -log(1 - 0.75) = ln 4 = 1.386294;  mean = 1.039721
    Row 1: one soft label y=0.5 at z=0: -(0.5 ln 0.5 + 0.5 ln 0.5) = ln 2. Row 2 has no steps: 0."""
    z = torch.tensor([[0.0, math.log(3.0), 5.0], [0.0, 9.0, -9.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert_close(prm_step_loss(z, y, m), torch.tensor([1.039721, 0.693147, 0.0]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parsing, alignment, padding
def test_split_steps_parser():
    assert split_steps("7 + 5 = 12\n\n 12 * 3 = 36 \nAnswer: 36\n") == ["7 + 5 = 12", "12 * 3 = 36", "Answer: 36"]
    assert split_steps("a;;b; c", ";") == ["a", "b", "c"]
    assert split_steps("  \n\n") == []
    with pytest.raises(ValueError, match="non-empty"):
        split_steps("x", "")


@pytest.mark.parametrize("sep", ["\n", "\n\n", " ki "])
def test_labels_align_to_separator_tokens(sep):
    tok = tiny_tokenizer()
    prompt_ids = encode(tok, "Q?")
    steps = ["1 + 1 = 2", "2 * 3 = 6", "Answer: 6"]
    ids, ends = encode_steps(tok, prompt_ids, steps, sep)
    sep_ids = encode(tok, sep)
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    for k, end in enumerate(ends):
        assert ids[end - len(sep_ids) + 1 : end + 1] == sep_ids  # the last separator token
        assert tok.decode(ids[: end + 1]) == "Q?" + "".join(s + sep for s in steps[: k + 1])
    # through the data path: labels sit exactly at those positions, nowhere else
    ex = {"prompt": [{"role": "user", "content": "Q?"}], "steps": steps, "labels": [True, 0.25, False]}
    (row,), _ = tokenize_stepwise([ex], tok, StepwiseDataConfig(train="x", step_separator=sep))
    batch = collate_stepwise([row, row | {"input_ids": row["input_ids"][:-2] + [5, 6, 7, 8]}], tok.pad_token_id)
    positions = batch["step_mask"][0].nonzero().flatten().tolist()
    assert positions == row["step_ends"] and all(row["input_ids"][p] == sep_ids[-1] for p in positions)
    assert batch["step_labels"][0, positions].tolist() == [1.0, 0.25, 0.0]
    assert batch["step_labels"][0].sum() == 1.25


def test_truncation_keeps_whole_steps_and_bad_labels_name_field(tmp_path):
    tok = tiny_tokenizer()
    ex = {"prompt": [{"role": "user", "content": "Q"}], "steps": ["aaaa", "bbbb", "cccc"], "labels": [1, 1, 0],
          "_source": "s.jsonl", "_line": 3}
    n_prompt = len(encode(tok, tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)))
    (row,), stats = tokenize_stepwise([ex], tok, StepwiseDataConfig(train="x", max_length=n_prompt + 11))
    assert row["labels"] == [1.0, 1.0] and len(row["input_ids"]) == n_prompt + 10 and stats.responses_truncated == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [STEPWISE[0], {**STEPWISE[1], "labels": [0, 2]}])
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2.*labels\[1\].*\[0, 1\]"):
        prepare_data(StepwiseDataConfig(train=str(bad)), "stepwise", tok, 0, lambda m: None)
    with pytest.raises(DataError, match=r"line 1.*steps\[1\]"):
        load_examples(str(write_jsonl(tmp_path / "b2.jsonl", [{**STEPWISE[0], "steps": ["ok", 3]}])), "stepwise")


def test_step_scores_padding_invariant():
    """A row's step scores are the same alone, right-padded in a batch, or left-padded in a batch."""
    model, tok = tiny_prm()
    scorer = PRMScorer(model, tok, batch_size=8)
    prompts, steps = ["Q1? ", "A much longer question? "], [["1 + 1 = 2", "Answer: 2"], ["x"]]
    alone = [scorer.score_steps([p], [s])[0] for p, s in zip(prompts, steps)]
    batched = scorer.score_steps(prompts, steps)
    for a, b in zip(alone, batched):
        assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    # the same ids left-padded: logits at the real positions agree with right padding
    rows = [encode_steps(tok, encode(tok, p), s, "\n") for p, s in zip(prompts, steps)]
    width = max(len(r) for r, _ in rows)
    right = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows])
    left = torch.tensor([[0] * (width - len(r)) + r for r, _ in rows])
    rmask = (torch.arange(width) < torch.tensor([[len(r)] for r, _ in rows])).long()  # [2, T] right-padded
    lmask = rmask.flip(-1)  # the same rows padded on the left
    with torch.no_grad():
        zr, zl = token_logits(model, right, rmask), token_logits(model, left, lmask)
    for i, (r, ends) in enumerate(rows):
        shift = width - len(r)
        assert_close(zr[i, ends], zl[i, [e + shift for e in ends]], atol=1e-5, rtol=0)
        assert_close(torch.sigmoid(zr[i, ends]), torch.tensor(alone[i]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- verifier and labels
def test_verifier_on_crafted_steps():
    ops = [["+", 5], ["*", 3]]  # start 7: 12, 36
    assert verify_chain_steps(["7 + 5 = 12", "12 * 3 = 36", "Answer: 36"], 7, ops) == [True, True, True]
    assert verify_chain_steps(["7 + 5 = 12", "12 x 3 = 36", "answer 36."], 7, ops) == [True, True, True]
    # arithmetic slip: it and everything after are wrong, even though the next step is consistent with it
    assert verify_chain_steps(["7 + 5 = 13", "13 * 3 = 39", "Answer: 39"], 7, ops) == [False, False, False]
    # right arithmetic, but not using the previous result / wrong operation / wrong operand
    assert verify_chain_steps(["7 + 5 = 12", "10 * 3 = 30"], 7, ops) == [True, False]
    assert verify_chain_steps(["7 * 5 = 35"], 7, ops) == [False]
    assert verify_chain_steps(["7 + 4 = 11"], 7, ops) == [False]
    # an answer before all operations, a wrong answer, text, a step after the answer
    assert verify_chain_steps(["7 + 5 = 12", "Answer: 12"], 7, ops) == [True, False]
    assert verify_chain_steps(["7 + 5 = 12", "12 * 3 = 36", "Answer: 35"], 7, ops) == [True, True, False]
    assert verify_chain_steps(["Let us think.", "7 + 5 = 12"], 7, ops) == [False, False]
    assert verify_chain_steps(["7 + 5 = 12", "12 * 3 = 36", "Answer: 36", "36 + 0 = 36"], 7, ops) == [True] * 3 + [False]
    assert verify_chain_steps(["2 - 9 = -7", "Answer: -7"], 2, [["-", 9]]) == [True, True]
    assert parse_equation("12 * 3 = 36") == (12, "*", 3, 36) and parse_equation("12 * 3") is None


def test_chain_problems_are_consistent_and_split():
    train = chain_arithmetic_problems("train", 30, n_ops=3)
    test = chain_arithmetic_problems("test", 10, n_ops=3)
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    for p in train + test:
        assert chain_split_of(p["problem"]) == ("train" if p in train else "test")
        x, lines = p["start"], []
        for (op, b), want in zip(p["ops"], p["intermediates"]):
            lines.append(f"{x} {op} {b} = {apply_op(x, op, b)}")
            x = apply_op(x, op, b)
            assert x == want
        lines.append(f"Answer: {x}")
        assert str(x) == p["answer"] and verify_chain_steps(lines, p["start"], p["ops"]) == [True] * 4
        assert p["prompt"][-1] == {"role": "user", "content": p["problem"]}
    with pytest.raises(ValueError, match="split"):
        chain_arithmetic_problems("dev", 1)


def test_mc_labels_with_scripted_sampler():
    """Answer 36. Completions from a prefix (scripted): after step 1 (right) 3 of 4 reach 36; after step 2 (wrong)
    none does; after step 3, 1 of 4 (the continuation writes the number itself). Hard = any, soft = fraction."""
    steps = ["7 + 5 = 12", "12 * 3 = 35", "35 + 1 = 36"]
    script = {1: ["Answer: 36", "12 * 3 = 36", "Answer: 36", "Answer: 1"], 2: ["Answer: 35"] * 4,
              3: ["Answer: 36", "Answer: 0", "Answer: 0", "Answer: 0"]}
    calls = []

    def sample(prefix, n):
        calls.append((list(prefix), n))
        return script[len(prefix)]

    assert mc_step_labels(steps, "36", sample, 4, "hard") == [1.0, 0.0, 1.0]
    assert mc_step_labels(steps, "36", sample, 4, "soft") == [0.75, 0.0, 0.25]
    assert calls[:3] == [(steps[:1], 4), (steps[:2], 4), (steps[:3], 4)]
    # a continuation without a number: the prefix's last number counts ("35 + 1 = 36" then nothing)
    assert mc_step_labels(steps[2:], "36", lambda p, n: [""] * n, 2, "soft") == [1.0]
    with pytest.raises(ValueError, match="returned 1"):
        mc_step_labels(steps, "36", lambda p, n: ["x"], 2)
    assert is_correct_answer("so 1/2", "0.5") and not is_correct_answer("none", "3")


# ---------------------------------------------------------------- aggregations, dense rewards
def test_aggregations_hand_computed():
    """[0.9, 0.5, 0.8]: min 0.5, product 0.36, last 0.8. [0.6]: 0.6 each. No steps: 0 each."""
    scores = [[0.9, 0.5, 0.8], [0.6], []]
    assert_close(aggregate_steps(scores, "min"), torch.tensor([0.5, 0.6, 0.0]))
    assert_close(aggregate_steps(scores, "product"), torch.tensor([0.36, 0.6, 0.0]))
    assert_close(aggregate_steps(scores, "last"), torch.tensor([0.8, 0.6, 0.0]))
    with pytest.raises(ValueError, match="unknown step aggregation 'mean'"):
        aggregate_steps(scores, "mean")


def test_dense_step_rewards_on_policy_tokens():
    tok = tiny_tokenizer()  # one token per character
    ids = encode(tok, "1+1=2\n\n2*3=6\nAnswer: 6")
    ends = step_end_tokens(tok, ids, "\n")
    assert ends == [5, 12, len(ids) - 1]  # the first "\n" after each step; the last step ends at the last token
    dense = dense_step_rewards([[0.9, 0.5, 0.8]], [ends], width=len(ids) + 2)
    expected = torch.zeros(1, len(ids) + 2)
    expected[0, 5], expected[0, 12], expected[0, len(ids) - 1] = 0.9, 0.5, 0.8
    assert_close(dense, expected)
    assert dense_step_rewards([[1.0, 2.0]], [[1, 9]], width=4).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="row 0: 1 step rewards for 2 step ends"):
        dense_step_rewards([[1.0]], [[0, 1]], 3)


# ---------------------------------------------------------------- beam search
def test_step_beam_search_with_deterministic_stub():
    """Scores are fixed per step text; a partial solution scores the min of its steps (PRM min aggregation).
    Round 1 candidates from the empty beam: a (0.9), b (0.6), c (0.3) -> keep a, b (width 2).
    Round 2: a+d (min 0.9, 0.4 = 0.4), a+e (0.9, 0.8 = 0.8, ends), b+d (0.4), b+e (0.6, ends) -> a+e 0.8, b+e 0.6:
    both finished, so round 3 expands nothing and a+e wins. Greedy on the first step alone would keep only a."""
    value = {"a": 0.9, "b": 0.6, "c": 0.3, "d": 0.4, "e": 0.8}
    expand_calls = []

    def expand(prefixes, k):
        expand_calls.append(list(prefixes))
        out = []
        for p in prefixes:
            body = p.split("|", 1)[1]
            out.append([("a", False), ("b", False), ("c", False)][:k] if not body else [("d", False), ("e", True)][:k])
        return out

    def score(prompts, partial):
        return [min(value[s] for s in steps) for steps in partial]

    (best,) = step_beam_search(["Q|"], expand, score, beam_width=2, expand_per_beam=3, max_steps=5, separator=";")
    assert best.steps == ["a", "e"] and best.done and best.score == pytest.approx(0.8)
    assert expand_calls == [["Q|"], ["Q|a;", "Q|b;"]]
    assert prefix_text("Q|", ["a", "e"], ";") == "Q|a;e;"
    # width 1 is greedy on the first step; two prompts run in the same calls
    res = step_beam_search(["Q|", "R|"], expand, score, beam_width=1, expand_per_beam=3, max_steps=5, separator=";")
    assert [b.steps for b in res] == [["a", "e"], ["a", "e"]]
    with pytest.raises(ValueError, match=">= 1"):
        step_beam_search(["Q|"], expand, score, 0, 1, 1)


# ---------------------------------------------------------------- voting
def test_majority_vote_and_pass_at_n_hand_computed():
    assert majority_answer([3, None, 5, 5, 3]) == 3  # tie 2-2: the first seen
    assert majority_answer([None, None]) is None
    answers, targets = [[1, 2, 2, None], [7, 7, 7, 7]], [2, 7]
    assert majority_vote_accuracy(answers, targets, 4) == 1.0  # [1,2,2,None] -> 2
    # n = 1: P(pick the right one) = 2/4 and 4/4 -> 0.75 in expectation; Monte-Carlo within 0.1
    assert abs(majority_vote_accuracy(answers, targets, 1, n_subsets=400) - 0.75) < 0.1
    # pass@n: 1 - C(N - c, n) / C(N, n): c=1 of 4, n=2 -> 1 - 3/6 = 0.5; c=0 -> 0
    assert pass_at_n([[True, False, False, False], [False] * 4], 2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least n"):
        pass_at_n([[True]], 2)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prm_assets")
    paths = save_tiny_models(root)
    data = write_jsonl(root / "steps.jsonl", STEPWISE)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Start with {i}. Add 1.", "answer": str(i + 1)}
                                                     for i in range(3)])
    return {"policy": str(paths["policy"]), "data": str(data), "prompts": str(prompts), "root": root}


@pytest.fixture(scope="module")
def trained_prm(assets) -> Path:
    out = assets["root"] / "prm"
    argv = ["prm", f"model.name_or_path={assets['policy']}", f"data.train={assets['data']}",
            f"data.eval={assets['data']}", f"train.output_dir={out}", "train.batch_size=2", "train.max_steps=3",
            "train.lr=1e-2", "train.cpu=true", "data.step_separator=';'"]
    assert main(argv) == 0
    return out


def test_cli_prm_trains_and_saves_a_scorer(trained_prm):
    summary = json.loads((trained_prm / "summary.json").read_text())
    assert summary["global_step"] == 3 and {"loss", "step_accuracy", "solution_accuracy"} <= set(summary["eval"])
    scorer = load_prm_scorer(str(trained_prm / "model"), aggregation="product")
    assert scorer.separator == ";"  # stored with the model
    (steps,) = scorer.score_completions(["Q"], ["1 + 1 = 2;Answer: 2;"])
    assert len(steps) == 2 and all(0 < p < 1 for p in steps)
    assert_close(scorer(["Q"], ["1 + 1 = 2;Answer: 2"]), torch.tensor([steps[0] * steps[1]]))
    # the reward component: same scores, one model per path
    cache: dict = {}
    reward = build_reward(RewardSection(components=[
        RewardComponent(type="prm", path=str(trained_prm / "model"), aggregation="min", name="prm_min"),
        RewardComponent(type="prm", path=str(trained_prm / "model"), aggregation="last", name="prm_last")]), None, cache)
    total, parts = reward(["Q"], ["1 + 1 = 2;Answer: 2"], [{}])
    assert_close(parts["rewards/prm_min"], torch.tensor([min(steps)]))
    assert_close(parts["rewards/prm_last"], torch.tensor([steps[1]]))
    assert len(cache) == 1


def test_cli_prm_errors(assets, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [STEPWISE[0], {"prompt": "p", "steps": ["a"], "labels": [1, 0]}])
    argv = ["prm", f"model.name_or_path={assets['policy']}", f"data.train={bad}", f"train.output_dir={tmp_path / 'o'}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "labels" in err and "one label per step" in err
    assert RewardComponent.model_fields["aggregation"].default == "min"
    with pytest.raises(ValueError, match="needs 'path'"):
        RewardComponent(type="prm")


def test_cli_bon_with_prm_reward(assets, trained_prm, tmp_path):
    out = tmp_path / "bon"
    path = trained_prm / "model"
    argv = ["bon", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
            "generation.max_new_tokens=8", "bon.n=3", f"output_dir={out}",
            f"reward.components=[{{type: prm, path: '{path}', aggregation: min}}]"]
    assert main(argv) == 0
    lines = [json.loads(x) for x in (out / "best_of_n.jsonl").read_text().splitlines()]
    scorer = load_prm_scorer(str(path), aggregation="min")
    assert len(lines) == 3
    for line in lines:
        assert line["score"] == max(line["all_scores"])
        again = scorer([line["prompt"]], [line["completion"]])
        assert_close(again, torch.tensor([line["score"]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("labels", ["verifier", "mc_soft"])
def test_cli_prm_eval_runs_end_to_end(assets, tmp_path, labels):
    out = tmp_path / "ev"
    argv = ["prm-eval", f"model.name_or_path={assets['policy']}", f"output_dir={out}", "n_train_problems=3",
            "train_samples=2", "n_test_problems=3", "ns=[1,2,4]", "max_new_tokens=12", "train.max_steps=2",
            "train.cpu=true", "beam_width=2", "beam_expand=2", "generation_batch_size=8", f"labels={labels}",
            "mc_rollouts=2"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == labels
    table = summary["accuracy"]
    assert table["n"] == [1, 2, 4]
    assert set(table) == {"n", "majority_vote", "orm", "prm_min", "prm_product", "prm_last", "pass@n"}
    assert all(len(v) == 3 and all(0.0 <= x <= 1.0 for x in v) for v in table.values() if v is not table["n"])
    assert 0.0 <= summary["beam_search"]["accuracy"] <= 1.0
    assert (out / "accuracy_vs_n.png").stat().st_size > 0
    rows = [json.loads(x) for x in (out / "data" / "prm_train.jsonl").read_text().splitlines()]
    assert rows and all(len(r["steps"]) == len(r["labels"]) for r in rows)
    allowed = {0.0, 0.5, 1.0} if labels == "mc_soft" else {True, False}  # soft: the fraction of 2 rollouts
    assert all(v in allowed for r in rows for v in r["labels"])
    samples = (out / "data" / "test_samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 4


# ---------------------------------------------------------------- dense PRM rewards in PPO
def test_prm_dense_reward_places_step_scores_on_policy_tokens():
    """Each row gets coef * p_k exactly at the response token that ends step k (PRM scores computed alone)."""
    from alignkit.rewards.prm import PRMDenseReward
    from alignkit.rollout.engine import Rollout

    model, tok = tiny_prm(seed=3)
    scorer = PRMScorer(model, tok)
    texts = ["1+1=2\n2*3=6\n", "Answer: 4"]
    resp = [encode(tok, t) for t in texts]
    width = max(len(r) for r in resp) + 1  # one padding column
    ids = torch.tensor([r + [0] * (width - len(r)) for r in resp])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in resp])
    prompts = ["Q1 ", "Q2 "]
    rollout = Rollout(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                      response_ids=ids, response_mask=mask, has_eos=torch.tensor([False, False]),
                      prompt_texts=prompts, response_texts=texts)
    dense = PRMDenseReward(scorer, tok, coef=2.0)(rollout)
    p0 = scorer.score_steps(["Q1 "], [["1+1=2", "2*3=6"]])[0]
    p1 = scorer.score_steps(["Q2 "], [["Answer: 4"]])[0]
    expected = torch.zeros(2, width)
    expected[0, 5], expected[0, 11], expected[1, 8] = 2 * p0[0], 2 * p0[1], 2 * p1[0]
    assert_close(dense, expected, atol=1e-6, rtol=0)


def test_cli_ppo_with_dense_prm_rewards(assets, trained_prm, tmp_path):
    out = tmp_path / "ppo"
    paths = save_tiny_models(tmp_path / "m")
    argv = ["ppo", f"model.name_or_path={assets['policy']}", f"ppo.reward_model={paths['reward']}",
            f"data.train={assets['prompts']}", f"train.output_dir={out}", "ppo.rollout_batch_size=2",
            "ppo.num_minibatches=1", "ppo.micro_batch_size=2", "ppo.ppo_epochs=1", "ppo.num_iterations=1",
            "generation.max_new_tokens=8", "generation.batch_size=2", f"ppo.dense_prm={trained_prm / 'model'}"]
    assert main(argv) == 0
    (record,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"objective/kl"' in x]
    assert "objective/dense_prm" in record and math.isfinite(record["objective/dense_prm"])
