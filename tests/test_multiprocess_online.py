"""Data parallelism for the online methods: `accelerate launch` with 2 CPU processes (gloo), each sampling and
training on its half of the prompts, trains exactly as 1 process on all of them, through the real CLI on tiny
models: the same samples (row-seeded sampling), the same advantages (group-wise, or whitened over every process's
tokens), the same gradient (losses weighted by global row/token counts).

Measured on this machine (fp32, CPU, torch 2.13): GRPO grad norms agree to ~1e-7 relative, PPO policy/value losses
to ~1e-6, final weights to ~1e-7 max-abs (float summation order of DDP's all-reduce); the tolerances below leave a
margin of ~100x. A run checkpointed by one process resumes under two and ends where the one-process run ends.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from multiproc import launch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.models.tiny import save_tiny_models
from alignkit.train.checkpoint import checkpoints_dir
from alignkit.train.logging import read_metrics

RTOL, ATOL, WEIGHTS_ATOL = 1e-4, 1e-6, 1e-5

REWARD = '''
def varied(prompts, completions, **extras):
    return [float(sum(map(ord, c)) % 10 + c.count("a")) for c in completions]
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_mp_online")
    paths = save_tiny_models(root)
    (root / "reward.py").write_text(REWARD)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                ["say a", "write aaa", "hello there", "abc", "count to three",
                                                 "a b c", "x y", "zzz"]))
    return {"policy": paths["policy"], "reward_model": paths["reward"], "root": root}


def grpo_args(tiny, out) -> list[str]:
    return ["grpo", f"model.name_or_path={tiny['policy']}", f"data.train={tiny['root'] / 'prompts.jsonl'}",
            f"reward.components=[{{type: callable, path: '{tiny['root'] / 'reward.py'}:varied'}}]",
            f"train.output_dir={out}", "generation.max_new_tokens=6", "train.lr=1e-3", "grpo.num_iterations=3",
            "grpo.num_generations=4", "grpo.prompts_per_iteration=4", "grpo.micro_batch_size=3", "train.save_every=1",
            "grpo.ppo_epochs=2"]


def ppo_args(tiny, out) -> list[str]:
    return ["ppo", f"model.name_or_path={tiny['policy']}", f"data.train={tiny['root'] / 'prompts.jsonl'}",
            f"ppo.reward_model={tiny['reward_model']}", f"train.output_dir={out}", "generation.max_new_tokens=6",
            "train.lr=1e-3", "ppo.num_iterations=3", "ppo.rollout_batch_size=8", "ppo.num_minibatches=1",
            "ppo.micro_batch_size=2", "ppo.ppo_epochs=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.01"]


def assert_same_run(one, two, keys: list[str], models=("model",), exact_scores: bool = True) -> None:
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] and len(m1) == 3
    for r1, r2 in zip(m1, m2):
        if exact_scores:  # the same samples, scored the same by a rule
            assert r1["scores"] == r2["scores"], r1["step"]
        else:  # a reward model scores them in other batches: float32 rounding
            assert r1["scores"] == pytest.approx(r2["scores"], rel=1e-6), r1["step"]
        for k in keys:
            assert r1[k] == pytest.approx(r2[k], rel=RTOL, abs=ATOL), (r1["step"], k, r1[k], r2[k])
    for name in models:
        a, b = load_file(str(one / name / "model.safetensors")), load_file(str(two / name / "model.safetensors"))
        assert a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < WEIGHTS_ATOL, (name, diff)


def test_grpo_two_processes_equal_one_and_resume_across_process_counts(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(grpo_args(tiny, one)) == 0
    proc = launch(grpo_args(tiny, two), num_processes=2, cwd=tmp_path)
    assert "2 process(es)" in proc.stderr
    assert_same_run(one, two, ["loss/policy", "grad_norm", "objective/kl", "objective/entropy", "advantages/std"])
    policy = load_file(str(tiny["policy"] / "model.safetensors"))
    final = load_file(str(one / "model" / "model.safetensors"))
    assert any(not torch.equal(policy[k], final[k]) for k in policy)  # it trained: the comparison can fail
    # written once: one checkpoint per kept step, no stray temporary directories from the second process
    assert sorted(p.name for p in checkpoints_dir(two).iterdir()) == ["latest", "step-00000002", "step-00000003"]

    # the one-process run, cut back to its iteration-2 checkpoint, resumed by two processes: same end
    full = tmp_path / "full"
    shutil.copytree(one, full)
    shutil.rmtree(checkpoints_dir(one) / "step-00000003")
    (checkpoints_dir(one) / "latest").write_text("step-00000002")
    shutil.rmtree(one / "model")
    launch([*grpo_args(tiny, one), "--resume"], num_processes=2, cwd=tmp_path)
    assert_same_run(full, one, ["loss/policy", "grad_norm"])


def test_ppo_two_processes_equal_one(tiny, tmp_path):
    """PPO with its value model, GAE advantages whitened over every process's tokens, token means over the
    global minibatch, and the adaptive KL coefficient updated from the global KL."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(ppo_args(tiny, one)) == 0
    launch(ppo_args(tiny, two), num_processes=2, cwd=tmp_path)
    assert_same_run(one, two, ["loss/policy", "loss/value", "policy/grad_norm", "val/grad_norm", "objective/kl",
                               "kl_coef", "advantages", "returns", "response_length"], models=("model", "value_model"),
                    exact_scores=False)


def test_best_of_n_two_processes_write_what_one_writes(tiny, tmp_path):
    """best-of-n shards each chunk of prompts over the processes and the main process writes the gathered picks:
    the file equals the one-process file line for line (prompt i is sampled with seed (seed, i) wherever it runs)."""
    def args(out):
        return ["bon", f"model.name_or_path={tiny['policy']}", f"data.train={tiny['root'] / 'prompts.jsonl'}",
                f"reward.components=[{{type: callable, path: '{tiny['root'] / 'reward.py'}:varied'}}]",
                "generation.max_new_tokens=6", "generation.batch_size=3", "bon.n=3", f"output_dir={out}"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one)) == 0
    launch(args(two), num_processes=2, cwd=tmp_path)
    lines = (one / "best_of_n.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len({json.loads(x)["completion"] for x in lines}) > 1
    assert (two / "best_of_n.jsonl").read_text().splitlines() == lines
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 2


def test_rejection_sampling_two_processes_equal_one(tiny, tmp_path):
    """Rejection sampling: each process samples its share of the round's prompts, the SFT steps on the picks are
    weighted over both processes (2 x batch 2 = 1 x batch 4), and the main process writes every process's picks."""
    def args(out, batch_size):
        return ["rs", f"model.name_or_path={tiny['policy']}", f"data.train={tiny['root'] / 'prompts.jsonl'}",
                f"reward.components=[{{type: callable, path: '{tiny['root'] / 'reward.py'}:varied'}}]",
                f"train.output_dir={out}", "generation.max_new_tokens=6", "train.lr=1e-3", "rs.n=3", "rs.rounds=2",
                "rs.prompts_per_round=4", "train.max_steps=1", f"train.batch_size={batch_size}"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one, 4)) == 0
    launch(args(two, 2), num_processes=2, cwd=tmp_path)
    for r in ("round-001.jsonl", "round-002.jsonl"):
        picks = (one / "rounds" / r).read_text().splitlines()
        assert len(picks) == 4 and (two / "rounds" / r).read_text().splitlines() == picks
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    for r1, r2 in zip(m1, m2):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=RTOL) and r1["scores/best"] == r2["scores/best"]
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHTS_ATOL
