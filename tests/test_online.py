"""The online layer (alignkit.online) and what it guarantees every online method: row-seeded sampling, the
Reference, reward validation, finiteness checks, warm-up, exact resume and the equivalence of several processes
with one. Tiny models, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from alignkit import cli
from alignkit.config import LoraConfig
from alignkit.models.loading import apply_lora, disable_dropout
from alignkit.models.reference import Reference
from alignkit.models.tiny import save_tiny_models, tiny_causal_lm
from alignkit.ops.logprobs import token_logprobs
from alignkit.rewards.base import RewardError
from alignkit.rewards.combine import CombinedReward
from alignkit.rollout.engine import HFGenerateBackend, SamplingParams, filter_logits, generate_rollouts
from alignkit.train.logging import read_metrics

REWARDS = '''
import math

def varied(prompts, completions, **extras):
    return [float(sum(map(ord, c)) % 10 + c.count("a")) for c in completions]

def nan_sometimes(prompts, completions, **extras):
    return [math.nan if i == 1 else 1.0 for i, _ in enumerate(completions)]

def broken(prompts, completions, **extras):
    raise KeyError("answer")
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("online")
    paths = save_tiny_models(root)
    (root / "rewards.py").write_text(REWARDS, encoding="utf-8")
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in ["say a", "write aaa", "hello there", "abc", "count to three", "a b c", "x y", "zzz"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {"policy": str(paths["policy"]), "reward_model": str(paths["reward"]), "prompts": str(root / "prompts.jsonl"),
            "rewards": str(root / "rewards.py")}


def grpo_args(assets: dict, out: Path, fn: str = "varied", *extra: str) -> list[str]:
    return ["grpo", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
            f"reward.components=[{{type: callable, path: '{assets['rewards']}:{fn}'}}]", f"train.output_dir={out}",
            "generation.max_new_tokens=6", "train.lr=1e-3", "grpo.num_iterations=3", "grpo.num_generations=4",
            "grpo.prompts_per_iteration=4", "grpo.micro_batch_size=4", *extra]


def strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


# ---------------------------------------------------------------- row-seeded sampling
def test_filter_logits_top_k_and_top_p_hand_example():
    """probs [0.5, 0.3, 0.15, 0.05]: top-k 2 keeps {0, 1}; top-p 0.7 keeps the tokens whose mass above them is
    < 0.7, i.e. {0 (0), 1 (0.5)}; top-p 0.85 also keeps 2 (mass above 0.8); the top token always survives."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, 1.0)) == [0, 1]
    assert kept(filter_logits(logits, 0, 0.7)) == [0, 1]
    assert kept(filter_logits(logits, 0, 0.85)) == [0, 1, 2]
    assert kept(filter_logits(logits, 0, 0.01)) == [0]
    assert kept(filter_logits(logits, 0, 1.0)) == [0, 1, 2, 3]


def test_row_seeded_samples_do_not_depend_on_batching_or_padding():
    """The same row seeds give the same tokens whether the prompts are sampled together (one left-padded batch)
    or one at a time; other seeds give other samples."""
    model, tok = tiny_causal_lm(seed=0)
    disable_dropout(model)
    backend = HFGenerateBackend(model, tok)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (ids != 0).long()
    together = generate_rollouts(backend, tok, ids, mask, params, num_samples=3, prompt_seeds=[11, 12])
    one = [generate_rollouts(backend, tok, ids[i : i + 1, ids[i] != 0], mask[i : i + 1, ids[i] != 0], params,
                             num_samples=3, prompt_seeds=[s]) for i, s in enumerate([11, 12])]
    assert together.response_texts == one[0].response_texts + one[1].response_texts
    other = generate_rollouts(backend, tok, ids, mask, params, num_samples=3, prompt_seeds=[13, 14])
    assert other.response_texts != together.response_texts
    assert len(set(together.response_texts[:3])) > 1  # the samples of one prompt differ


def test_row_seeded_sampling_draws_from_the_tempered_distribution():
    """Gumbel-max with per-row noise is an exact sampler: the first-token frequencies over 3000 seeds match
    softmax(logits / T) (T = 0.7) within 4 standard errors for every token with probability > 2%."""
    model, tok = tiny_causal_lm(seed=0)
    disable_dropout(model)
    with torch.no_grad():  # a peaked next-token distribution (a random tiny model's is nearly uniform)
        model.lm_head.weight.mul_(4.0)
    ids = torch.tensor([[5, 6, 7]])
    n = 3000
    out = generate_rollouts(HFGenerateBackend(model, tok), tok, ids, torch.ones_like(ids),
                            SamplingParams(max_new_tokens=1, temperature=0.7), num_samples=n, prompt_seeds=[0])
    with torch.no_grad():
        probs = (model(ids).logits[0, -1] / 0.7).softmax(-1)  # [V]
    counts = torch.bincount(out.response_ids[:, 0], minlength=probs.numel()).double() / n
    big = probs > 0.02
    assert big.sum() >= 3
    se = (probs * (1 - probs) / n).sqrt()
    assert ((counts[big] - probs[big]).abs() < 4 * se[big]).all(), (counts[big], probs[big])


def test_generation_batch_size_does_not_change_a_run(assets, tmp_path):
    """GRPO with 1 prompt per generate() call and with 4 draws the same samples: same metrics, same weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(grpo_args(assets, a, "varied", "generation.batch_size=1")) == 0
    assert cli.main(grpo_args(assets, b, "varied", "generation.batch_size=4")) == 0
    ma, mb = strip_time(read_metrics(a / "metrics.jsonl")), strip_time(read_metrics(b / "metrics.jsonl"))
    assert [r["scores"] for r in ma] == [r["scores"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert_close(torch.tensor(ra["grad_norm"]), torch.tensor(rb["grad_norm"]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the reference
def test_reference_of_a_lora_policy_is_the_policy_with_adapters_off():
    base, _ = tiny_causal_lm(seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logps = token_logprobs(base, ids, torch.ones_like(ids))
    policy = apply_lora(base, LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref = Reference.of_policy(policy)
    assert ref.kind == "adapters_off" and ref.model is policy
    assert_close(ref.logprobs(token_logprobs, ids, torch.ones_like(ids)), base_logps)
    with torch.no_grad():
        assert not torch.allclose(token_logprobs(policy, ids, torch.ones_like(ids)), base_logps)


def test_reference_of_a_full_policy_is_a_frozen_copy():
    policy, _ = tiny_causal_lm(seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = Reference.of_policy(policy)
    before = ref.logprobs(token_logprobs, ids, torch.ones_like(ids))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    assert ref.kind == "frozen" and ref.model is not policy
    assert not any(p.requires_grad for p in ref.model.parameters())
    assert_close(ref.logprobs(token_logprobs, ids, torch.ones_like(ids)), before)
    with pytest.raises(RuntimeError, match="precomputed"):
        Reference.precomputed({}).logprobs(token_logprobs, ids, torch.ones_like(ids))


# ---------------------------------------------------------------- rewards and failures
def test_combined_reward_names_the_component_that_fails():
    ok = CombinedReward([("length", lambda p, c, e: [float(len(x)) for x in c], 1.0),
                         ("judge", lambda p, c, e: [float("inf")] * len(c), 1.0)])
    with pytest.raises(RewardError, match=r"reward component 'judge' returned a non-finite reward \(inf\)"):
        ok(["p", "q"], ["a", "b"], [{}, {}])

    def broken(p, c, e):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="reward component 'verifier' raised KeyError: 'answer'"):
        CombinedReward([("verifier", broken, 1.0)])(["p"], ["a"], [{}])


@pytest.mark.parametrize(("fn", "message"), [
    ("nan_sometimes", ":nan_sometimes' returned a non-finite reward (nan) for completion 1 of 4"),
    ("broken", "reward component 'callable' raised KeyError: 'answer'"),
])
def test_a_failing_reward_stops_the_run_with_a_clear_error(assets, tmp_path, capsys, fn, message):
    out = tmp_path / fn
    argv = ["rloo", *grpo_args(assets, out, fn)[1:5], "generation.max_new_tokens=4", "rloo.num_iterations=2",
            "rloo.prompts_per_iteration=2", "rloo.num_generations=2"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_an_exploding_update_stops_before_a_non_finite_checkpoint(assets, tmp_path, capsys, method):
    """train.lr=1e10: the weights blow up after the first update; the next iteration's log-probs (or loss, or
    gradient) are non-finite and the run stops naming the last good checkpoint; nothing non-finite is saved
    (before the online harness: a traceback, and PPO saved a NaN checkpoint that --resume would continue)."""
    out = tmp_path / "boom"
    common = ["train.lr=1e10", "train.max_grad_norm=null", "train.save_every=1"]
    argv = {
        "grpo": grpo_args(assets, out, "varied", *common, "grpo.num_iterations=4"),
        "rloo": ["rloo", *grpo_args(assets, out)[1:6], *common, "rloo.num_iterations=4", "rloo.num_generations=2",
                 "rloo.prompts_per_iteration=2"],
        "ppo": ["ppo", f"model.name_or_path={assets['policy']}", f"data.train={assets['prompts']}",
                f"ppo.reward_model={assets['reward_model']}", f"train.output_dir={out}", "generation.max_new_tokens=6",
                *common, "ppo.num_iterations=4", "ppo.rollout_batch_size=4", "ppo.num_minibatches=1",
                "ppo.micro_batch_size=2"],
    }[method]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "Last good checkpoint" in err and "Traceback" not in err
    for ckpt in (out / "checkpoints").glob("step-*"):
        for name, t in load_file(str(ckpt / "weights.safetensors")).items():
            assert torch.isfinite(t).all(), (ckpt.name, name)
    assert not (out / "model").exists()


def test_warmup_is_honoured_with_a_constant_schedule(assets, tmp_path):
    out = tmp_path / "warm"
    assert cli.main(grpo_args(assets, out, "varied", "train.scheduler=constant", "train.warmup_steps=2")) == 0
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3])


def test_resume_without_a_checkpoint_is_an_error(assets, tmp_path, capsys, monkeypatch):
    """A run killed before its first checkpoint (the default saves only at the end) cannot be resumed: a clear
    error that says how to start fresh, not a silent restart."""
    from alignkit.online.run import OnlineRun

    out = tmp_path / "killed"

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(OnlineRun, "sample", die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(grpo_args(assets, out))
    monkeypatch.undo()
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    assert cli.main([*grpo_args(assets, out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "run without --resume to start fresh" in err


def test_periodic_evaluation_every_n_iterations(assets, tmp_path):
    """train.eval_every=2 over 4 iterations with data.eval: eval/ lines at 0 (before), 2 (periodic) and 4 (after)."""
    out = tmp_path / "evals"
    argv = grpo_args(assets, out, "varied", "grpo.num_iterations=4", "train.eval_every=2",
                     f"data.eval={assets['prompts']}", "data.eval_limit=2")
    assert cli.main(argv) == 0
    evals = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/scores" in r]
    assert evals == [0, 2, 4]
