"""Tests for REINFORCE++ and REINFORCE++-baseline (alignkit.algorithms.reinforce_pp; Hu 2025): per-token
KL-penalised rewards, reward-to-go returns, advantages normalised over every response token of the batch, the
group-mean baseline, the config check, and `alignkit reinforce-pp` end to end. Tiny models, CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from alignkit import cli
from alignkit.algorithms import reinforce_pp
from alignkit.config import ConfigError, ReinforcePPConfig, load_config
from alignkit.models.tiny import save_tiny_models
from alignkit.online.run import OnlineRun
from alignkit.ops.advantages import kl_penalized_rewards, reward_to_go
from alignkit.ops.kl import kl_k3
from alignkit.ops.stats import masked_whiten

REWARD_MODULE = '''
def varied(prompts, completions, **extras):
    """Deterministic and (almost always) different between samples: character-code sum mod 10,
    plus the number of 'a' characters."""
    return [float(sum(map(ord, c)) % 10 + c.count("a")) for c in completions]
'''

METRIC_KEYS = (
    "scores", "rewards/callable", "objective/scores", "objective/entropy", "objective/kl",
    "objective/non_score_reward", "returns", "loss/policy", "grad_norm", "policy/clipfrac", "policy/approxkl",
    "policy/ratio", "response_length", "no_eos_frac", "lr", "time/generation", "time/scoring", "time/training",
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reinforce_pp_assets")
    paths = save_tiny_models(root)
    (root / "reward_fns.py").write_text(REWARD_MODULE, encoding="utf-8")
    prompts = ["say a", "write aaa", "hello there", "abc", "count to three", "a b c"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return {"policy": str(paths["policy"]), "prompts": str(root / "prompts.jsonl"),
            "reward": str(root / "reward_fns.py")}


def base_overrides(assets: dict, out: Path) -> list[str]:
    return [
        f"model.name_or_path={assets['policy']}",
        f"data.train={assets['prompts']}",
        f"reward.components=[{{type: callable, path: '{assets['reward']}:varied'}}]",
        f"train.output_dir={out}",
        "generation.max_new_tokens=6",
        "train.lr=1e-3",
        "reinforce_pp.num_iterations=2",
        "reinforce_pp.ppo_epochs=2",
        "reinforce_pp.micro_batch_size=3",
        "reinforce_pp.kl_coef=0.1",
    ]


# ---------------------------------------------------------------- returns and per-token rewards
def test_reward_to_go_hand_computed():
    """G_t = sum_{s >= t} gamma^(s - t) r_s over real tokens; padding contributes nothing and gets 0.
    r = [1, 2, 3 | 9] (3 real), [0.5, -1 | 7, 7] (2 real):
    gamma 1:   [6, 5, 3, 0] and [-0.5, -1, 0, 0];
    gamma 0.5: [1 + 0.5 (2 + 0.5 * 3) = 2.75, 3.5, 3, 0] and [0.5 - 0.5 = 0, -1, 0, 0]."""
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.5, -1.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert_close(reward_to_go(rewards, mask), torch.tensor([[6.0, 5.0, 3.0, 0.0], [-0.5, -1.0, 0.0, 0.0]]))
    assert_close(reward_to_go(rewards, mask, gamma=0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0], [0.0, -1.0, 0.0, 0.0]]))


def test_kl_penalized_rewards_and_their_returns_hand_computed():
    """REINFORCE++ per-token reward r_t = -beta k1_t + s [t = last real token], beta 0.5, then G_t (gamma 1):
    row 0: k1 = [-1 + 1.2, -0.5 + 0.4, -2 + 2.3] = [0.2, -0.1, 0.3], s = 1 -> r = [-0.1, 0.05, 0.85],
           G = [0.8, 0.9, 0.85];
    row 1: k1 = [0.4, 0, (padding)], s = -2 at column 1 -> r = [-0.2, -2, 0], G = [-2.2, -2, 0]."""
    logprobs = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]])
    ref_logprobs = torch.tensor([[-1.2, -0.4, -2.3], [-0.7, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, torch.tensor([1.0, -2.0]), mask, kl_coef=0.5)
    assert_close(kl, torch.tensor([[0.2, -0.1, 0.3], [0.4, 0.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.1, 0.05, 0.85], [-0.2, -2.0, 0.0]]))
    assert_close(reward_to_go(rewards, mask.float()), torch.tensor([[0.8, 0.9, 0.85], [-2.2, -2.0, 0.0]]))


def test_group_baseline_hand_computed():
    """s_i - mean of its group, groups of G = 3 contiguous rows: [1, 2, 3 | 4, 4, 7] -> [-1, 0, 1 | -1, -1, 2]."""
    out = reinforce_pp.group_baseline(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0]), 3)
    assert_close(out, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


def test_token_loss_clipped_surrogate_and_k3_only_in_the_baseline_variant():
    """ratio 1: l = -A (plain) and -A + beta k3 (baseline, beta 0.1); ratio 1.5 with eps 0.2: A = +1 -> -1.2
    (clipped), A = -1 -> +1.5 (pessimistic bound, unclipped)."""
    old = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    advantages = torch.tensor([[1.0, -1.0]])
    plain, stats = reinforce_pp.make_token_loss(0.2, 0.0)(old, old, ref, advantages)
    assert_close(plain, -advantages)
    assert {"policy/clipfrac", "policy/approxkl", "policy/ratio"} <= set(stats)
    baseline, _ = reinforce_pp.make_token_loss(0.2, 0.1)(old, old, ref, advantages)
    assert_close(baseline, -advantages + 0.1 * kl_k3(old, ref))
    assert float(kl_k3(old, ref).abs().min()) > 0  # the k3 term is really there
    moved, _ = reinforce_pp.make_token_loss(0.2, 0.0)(old + math.log(1.5), old, None, advantages)
    assert_close(moved, torch.tensor([[-1.2, 1.5]]))


def test_advantages_normalised_over_all_tokens_of_the_batch():
    """Whitening over every response token (not per sequence): returns [3, 3, 3 | 1 | pad] -> tokens 3, 3, 3, 1:
    mean 2.5, unbiased std 1 -> A = [0.5, 0.5, 0.5 | -1.5]; per-sequence whitening would give 0 everywhere."""
    returns = torch.tensor([[3.0, 3.0, 3.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages = masked_whiten(returns, mask, all_reduce=lambda x: x) * mask
    assert_close(advantages, torch.tensor([[0.5, 0.5, 0.5], [-1.5, 0.0, 0.0]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- config
def test_baseline_needs_groups(assets, tmp_path, capsys):
    message = "reinforce_pp.baseline needs reinforce_pp.num_generations >= 2"
    with pytest.raises(ConfigError, match=message):
        load_config(ReinforcePPConfig, None, ["reinforce_pp.baseline=true"])
    ok = load_config(ReinforcePPConfig, None, ["reinforce_pp.baseline=true", "reinforce_pp.num_generations=2"])
    assert ok.reinforce_pp.baseline and ok.reinforce_pp.num_generations == 2
    out = tmp_path / "run"
    assert cli.main(["reinforce-pp", *base_overrides(assets, out), "reinforce_pp.baseline=true"]) == 2  # usage error
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written for an invalid config


# ---------------------------------------------------------------- end to end
def token_whiten(per_row: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B] values, each repeated over its row's L_i tokens, whitened over all sum_i L_i tokens (unbiased std):
    (v_i - m) / sd with m = sum_i L_i v_i / N and sd^2 = sum_i L_i (v_i - m)^2 / (N - 1). Returns [B]."""
    n = lengths.sum()
    m = (lengths * per_row).sum() / n
    sd = ((lengths * (per_row - m) ** 2).sum() / (n - 1)).sqrt()
    return (per_row - m) / sd


@pytest.mark.parametrize("baseline", [False, True])
def test_cli_reinforce_pp_end_to_end(assets, tmp_path, monkeypatch, baseline):
    """`alignkit reinforce-pp` (plain: G = 1, 4 prompts; baseline: G = 2, 2 prompts): metrics.jsonl has every key
    each iteration, model/ and summary.json are written. Inside the algorithm, at iteration 1 (policy ==
    reference, so k1 = 0) every token's return is its sequence's score (plain) or the score minus its group's
    mean (baseline), and the advantages are those returns whitened over ALL response tokens of the batch:
    mean 0, std 1 over tokens, 0 on padding. The baseline variant keeps the KL out of the reward (returns stay
    one value per sequence at every iteration; non_score_reward 0) and passes pi_ref to the loss (k3)."""
    seen, batches = [], []
    real_update, real_sample = reinforce_pp.update_policy, OnlineRun.sample

    def spy_update(run, rollout, old, ref, advantages, *args, **kwargs):
        seen.append((rollout.response_mask.clone(), ref is not None, advantages.detach().clone()))
        return real_update(run, rollout, old, ref, advantages, *args, **kwargs)

    def spy_sample(self, *args, **kwargs):
        batches.append(real_sample(self, *args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(reinforce_pp, "update_policy", spy_update)
    monkeypatch.setattr(OnlineRun, "sample", spy_sample)
    out = tmp_path / "run"
    variant = ["reinforce_pp.baseline=true", "reinforce_pp.num_generations=2", "reinforce_pp.prompts_per_iteration=2"] \
        if baseline else ["reinforce_pp.prompts_per_iteration=4"]
    assert cli.main(["reinforce-pp", *base_overrides(assets, out), *variant]) == 0

    assert len(seen) == 2 and len(batches) == 2 and all(has_ref for _, has_ref, _ in seen)
    for mask, _, advantages in seen:
        assert advantages.shape == mask.shape and len(mask) == 4
        m = mask.bool()
        assert bool((advantages[~m] == 0).all())
        assert float(advantages[m].mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(advantages[m].std()) == pytest.approx(1.0, abs=1e-4)
    mask, _, advantages = seen[0]
    scores = batches[0].rewards  # [4] after the missing-EOS penalty (none configured)
    if baseline:
        grouped = scores.view(2, 2)
        scores = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    lengths = mask.sum(1).float()
    expected = token_whiten(scores.double(), lengths.double()).float()  # [4]
    assert_close(advantages, expected[:, None] * mask, atol=1e-4, rtol=0)
    assert float(expected.abs().max()) > 0.1  # the scores differ: not a trivial check

    def one_value_per_row(mask, advantages) -> bool:
        return all(float(a[m.bool()].max() - a[m.bool()].min()) < 1e-5 for m, a in zip(mask, advantages))

    mask, _, advantages = seen[1]  # iteration 2: the policy has moved away from the reference
    assert one_value_per_row(mask, advantages) == baseline  # plain: -beta k1_t enters each token's return

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(METRIC_KEYS) <= set(r), set(METRIC_KEYS) - set(r)
        assert all(math.isfinite(v) for v in r.values())
        expected_non_score = 0.0 if baseline else -0.1 * r["objective/kl"]
        assert r["objective/non_score_reward"] == pytest.approx(expected_non_score, abs=1e-6)
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert records[1]["objective/kl"] != 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variant"] == ("baseline" if baseline else "plain") and summary["iterations"] == 2
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
