"""Tests for GRPO / Dr. GRPO / DAPO (alignkit.algorithms.grpo), RLOO (alignkit.algorithms.rloo), the shared
clipped update (alignkit.online.update) and the rollout rows it works on (alignkit.online.rollout).
Tiny models, a few tokens, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from alignkit import cli
from alignkit.algorithms import grpo, rloo
from alignkit.config import ConfigError, GRPOConfig, GRPOSection, LoraConfig, load_config
from alignkit.models.loading import apply_lora
from alignkit.models.reference import Reference
from alignkit.models.tiny import save_tiny_models, tiny_causal_lm
from alignkit.online.rollout import ScoredRollout, concat_rollouts, equal_reward_groups, select_rows
from alignkit.online.run import OnlineRun
from alignkit.online.update import update_policy
from alignkit.ops.advantages import group_advantages
from alignkit.ops.kl import kl_k3
from alignkit.ops.stats import aggregate_token_losses
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts, response_logprobs
from alignkit.train.optim import build_optimizer
from alignkit.train.run import make_accelerator

REWARD_MODULE = '''
def varied(prompts, completions, **extras):
    """Deterministic and (almost always) different between samples: character-code sum mod 10,
    plus the number of 'a' characters."""
    return [float(sum(map(ord, c)) % 10 + c.count("a")) for c in completions]


def constant(prompts, completions, **extras):
    return [1.0 for _ in completions]
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grpo_assets")
    paths = save_tiny_models(root)
    (root / "reward_fns.py").write_text(REWARD_MODULE, encoding="utf-8")
    prompts = ["say a", "write aaa", "hello there", "abc", "count to three", "a b c"]
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {"root": root, "policy": str(paths["policy"]), "prompts": str(root / "prompts.jsonl"),
            "reward": str(root / "reward_fns.py")}


def base_overrides(assets: dict, out: Path, reward_fn: str = "varied") -> list[str]:
    return [
        f"model.name_or_path={assets['policy']}",
        f"data.train={assets['prompts']}",
        f"reward.components=[{{type: callable, path: '{assets['reward']}:{reward_fn}'}}]",
        f"train.output_dir={out}",
        "generation.max_new_tokens=6",
        "train.lr=1e-3",
    ]


def hand_rollout(lengths: list[int], width: int = 4) -> Rollout:
    """Prompts [5, 6]; response row i has ``lengths[i]`` real tokens (ids 7, 8, ...), right-padded with 0."""
    b = len(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, R]
    ids = (torch.arange(width)[None, :] + 7).repeat(b, 1).masked_fill(mask == 0, 0)
    return Rollout(
        prompt_ids=torch.tensor([[5, 6]] * b), prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=ids, response_mask=mask, has_eos=torch.zeros(b, dtype=torch.bool),
        prompt_texts=["p"] * b, response_texts=["r"] * b, extras=[{} for _ in range(b)],
    )


class RecordingRun(OnlineRun):
    """The real harness (``OnlineRun``'s log-probs, backward, step, all_sum) around an in-memory policy, without
    a run directory, data or reward. ``step`` first records the gradients it is about to apply (it zeroes them)."""

    def step(self, param_groups=None):
        self.grads = [p.grad.clone() for p in self.model.parameters() if p.requires_grad]
        return super().step(param_groups)


def harness(model, tok, temperature: float = 1.0, reference: Reference | None = None, optimizer=None) -> RecordingRun:
    """``optimizer`` default: SGD at lr 0 (update_policy then leaves the weights unchanged)."""
    cfg = load_config(GRPOConfig, None, [f"generation.temperature={temperature}", "train.cpu=true"])
    if optimizer is None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return RecordingRun(
        cfg=cfg, name="test", run_dir=None, accelerator=make_accelerator("no", cpu=True), tokenizer=tok, model=model,
        value=None, reference=reference, optimizer=optimizer, scheduler=scheduler, reward=None, reward_cfg=None,
        reward_models={}, backend=HFGenerateBackend(model, tok), sampler=None, eval_prompts=[], logger=None,
    )


def sample_rollout(model, tok, n_prompts: int = 2, g: int = 3, max_new_tokens: int = 5) -> Rollout:
    prompt_ids = torch.tensor([[1, 40, 41, 42], [0, 1, 50, 51]][:n_prompts])
    prompt_mask = (prompt_ids != 0).long()
    return generate_rollouts(
        HFGenerateBackend(model, tok), tok, prompt_ids, prompt_mask, SamplingParams(max_new_tokens=max_new_tokens,
        temperature=0.7), num_samples=g, prompt_seeds=list(range(n_prompts)),
    )


# ---------------------------------------------------------------- variants and config
def test_loss_type_defaults_and_overrides():
    """grpo: seq_mean + std scaling, eps_high = eps_low; dr_grpo: seq_sum_const, no std (Liu et al.);
    dapo: token_mean, clip-higher eps_high 0.28 (Yu et al.); explicit settings win."""
    assert grpo.resolve_variant(GRPOSection()) == grpo.Variant("seq_mean", True, 0.2, 0.2)
    assert grpo.resolve_variant(GRPOSection(loss_type="dr_grpo")) == grpo.Variant("seq_sum_const", False, 0.2, 0.2)
    assert grpo.resolve_variant(GRPOSection(loss_type="dapo")) == grpo.Variant("token_mean", True, 0.2, 0.28)
    explicit = GRPOSection(loss_type="dapo", eps_high=0.3, scale_rewards=False, eps_low=0.1)
    assert grpo.resolve_variant(explicit) == grpo.Variant("token_mean", False, 0.1, 0.3)
    assert grpo.resolve_variant(GRPOSection(loss_type="dr_grpo", scale_rewards=True)).scale_by_std is True


def test_overlong_cache_longer_than_generation_is_an_error(assets, tmp_path, capsys):
    cfg = load_config(GRPOConfig, None, ["grpo.overlong_cache=10", "generation.max_new_tokens=8"])
    with pytest.raises(ConfigError, match=r"grpo.overlong_cache \(10\) must be <= generation.max_new_tokens \(8\)"):
        grpo.check_config(cfg)
    out = tmp_path / "run"
    rc = cli.main(["grpo", *base_overrides(assets, out), "grpo.overlong_cache=10"])
    assert rc == 1
    assert "grpo.overlong_cache (10) must be <= generation.max_new_tokens (6)" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a run that fails validation


def test_bad_reward_function_fails_before_anything_is_written(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in base_overrides(assets, out) if not a.startswith("reward.")]
    rc = cli.main(["rloo", *args, f"reward.components=[{{type: callable, path: '{tmp_path}/missing.py:f'}}]"])
    assert rc == 1
    assert "missing.py' not found" in capsys.readouterr().err
    assert not out.exists()


def test_overlong_penalty_added_to_rewards():
    """L_max 4, cache 2 (expected length 2): lengths 1, 3, 4 -> penalties 0, (2 - 3)/2 = -0.5, (2 - 4)/2 = -1;
    rewards [1, 1, 1] -> [1, 0.5, 0]; scores (raw) unchanged."""
    scored = ScoredRollout(hand_rollout([1, 3, 4]), torch.ones(3), torch.ones(3), {"rewards/x": torch.ones(3)})
    out = grpo.add_overlong_penalty(scored, max_len=4, cache_len=2)
    assert_close(out.rewards, torch.tensor([1.0, 0.5, 0.0]))
    assert_close(out.parts["rewards/overlong_penalty"], torch.tensor([0.0, -0.5, -1.0]))
    assert_close(out.scores, torch.ones(3))
    assert grpo.add_overlong_penalty(scored, 4, None) is scored


# ---------------------------------------------------------------- rollout helpers
def test_select_and_concat_rollouts_repad():
    """Rows keep their tokens; prompts are re-padded on the left, responses on the right."""
    a, b = hand_rollout([1, 2], width=2), hand_rollout([4], width=4)
    b.prompt_ids, b.prompt_mask = torch.tensor([[9, 5, 6]]), torch.tensor([[1, 1, 1]])
    cat = concat_rollouts([a, b], pad_token_id=0)
    assert cat.prompt_ids.tolist() == [[0, 5, 6], [0, 5, 6], [9, 5, 6]]
    assert cat.prompt_mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert cat.response_mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    sub = select_rows(cat, [0, 1])  # all-padding columns trimmed
    assert sub.prompt_ids.tolist() == [[5, 6], [5, 6]] and sub.response_ids.tolist() == [[7, 0], [7, 8]]
    with pytest.raises(ValueError, match="concat_rollouts needs at least one rollout"):
        concat_rollouts([], 0)


def test_equal_reward_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert equal_reward_groups(rewards, 2).tolist() == [True, False, True]


# ---------------------------------------------------------------- update: aggregation and gradients
@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_grpo_vs_dr_grpo_vs_dapo_aggregation_on_unequal_lengths(micro_batch_size):
    """Two responses of lengths 4 and 1, advantages A = [+1, -1], first epoch (ratio 1, so l = -A per token):
    seq_mean (GRPO)           = (1/2)(mean(-1,-1,-1,-1) + (+1))        = 0
    token_mean (DAPO)         = (4 * -1 + 1) / 5                       = -0.6
    seq_sum_const (Dr. GRPO)  = (4 * -1 + 1) / (B * L_max = 2 * 4)     = -0.375
    and the gradient is -sum_{i,t} w_{i,t} A_i grad log pi with per-token weights
    w = 1/(B |o_i|) (GRPO: the short answer's token weighs 1/2, each long-answer token 1/8),
    1/sum|o| = 1/5 (DAPO), 1/(B L_max) = 1/8 (Dr. GRPO: no length bias), whatever the micro-batch size."""
    model, tok = tiny_causal_lm(seed=1)
    rollout = hand_rollout([4, 1])
    mask = rollout.response_mask.float()
    advantages = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        old = response_logprobs(model, rollout, 1.0)
    token_loss = grpo.make_token_loss(beta=0.0, eps_low=0.2, eps_high=0.2)
    expected_loss = {"seq_mean": 0.0, "token_mean": -0.6, "seq_sum_const": -0.375}
    weights = {
        "seq_mean": torch.tensor([[1 / 8] * 4, [1 / 2, 0, 0, 0]]),
        "token_mean": torch.full((2, 4), 1 / 5) * mask,
        "seq_sum_const": torch.full((2, 4), 1 / 8) * mask,
    }
    for mode in ("seq_mean", "token_mean", "seq_sum_const"):
        run = harness(model, tok)
        stats = update_policy(run, rollout, old, None, advantages, token_loss, mode,
                              micro_batch_size=micro_batch_size, max_len=4)
        assert_close(torch.tensor(stats["loss/policy"]), torch.tensor(expected_loss[mode]), atol=1e-6, rtol=0)
        assert stats["policy/ratio"] == pytest.approx(1.0) and stats["policy/clipfrac"] == 0.0
        logprobs = response_logprobs(model, rollout, 1.0)  # [2, 4] with grad
        manual = -(weights[mode] * advantages[:, None] * logprobs).sum()
        want = torch.autograd.grad(manual, [p for p in model.parameters() if p.requires_grad])
        for g_got, g_want in zip(run.grads, want):
            assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)
    assert len(set(expected_loss.values())) == 3  # the three aggregations genuinely differ here


def test_equal_rewards_give_zero_policy_gradient_only_kl_remains():
    """All-equal rewards in a group -> A = 0 -> the clipped surrogate contributes no gradient:
    beta = 0 -> every gradient is exactly 0; beta = 0.1 -> the gradient equals that of
    beta * seq_mean(k3(log pi, log pref)) alone (the policy was moved away from the reference)."""
    model, tok = tiny_causal_lm(seed=2)
    reference = Reference.of_policy(model)  # a frozen copy of the initial weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = harness(model, tok, temperature=0.7, reference=reference)
    rollout = sample_rollout(model, tok, n_prompts=2, g=2)
    advantages = group_advantages(torch.tensor([0.7, 0.7, 3.0, 3.0]), group_size=2)
    assert_close(advantages, torch.zeros(4))
    old, _ = run.policy_logprobs(rollout, 4)
    ref_lp = run.ref_logprobs(rollout, 4)
    update_policy(run, rollout, old, None, advantages, grpo.make_token_loss(0.0, 0.2, 0.2), "seq_mean",
                  micro_batch_size=4)
    assert all(float(g.abs().max()) == 0.0 for g in run.grads)

    update_policy(run, rollout, old, ref_lp, advantages, grpo.make_token_loss(0.1, 0.2, 0.2), "seq_mean",
                  micro_batch_size=3)
    logprobs = response_logprobs(model, rollout, 0.7)
    kl_only = 0.1 * aggregate_token_losses(kl_k3(logprobs, ref_lp), rollout.response_mask.float(), "seq_mean")
    want = torch.autograd.grad(kl_only, [p for p in model.parameters() if p.requires_grad])
    assert sum(float(g.abs().sum()) for g in want) > 0  # the KL term really pulls
    for g_got, g_want in zip(run.grads, want):
        assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_first_iteration_ratio_one_and_k3_zero(lora):
    """At the first step the policy is the reference (frozen copy, or LoRA with B = 0 and adapters off):
    k3 = 0 on every token; the update's recomputed log-probs equal the rollout's old log-probs
    (same temperature, same masks, no dropout): ratio 1, approxkl 0, clipfrac 0."""
    model, tok = tiny_causal_lm(seed=3)
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    reference = Reference.of_policy(model)
    assert reference.kind == ("adapters_off" if lora else "frozen")
    optimizer, _ = build_optimizer(model, load_config(GRPOConfig).train, total_steps=1)
    run = harness(model, tok, temperature=0.7, reference=reference, optimizer=optimizer)
    rollout = sample_rollout(model, tok)
    old, entropy = run.policy_logprobs(rollout, 2)
    ref_lp = run.ref_logprobs(rollout, 2)
    mask = rollout.response_mask.bool()
    assert_close(kl_k3(old, ref_lp)[mask], torch.zeros(int(mask.sum())), atol=1e-6, rtol=0)
    assert bool((entropy[mask] > 0).all())
    advantages = group_advantages(torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 1.0]), 3)
    stats = update_policy(run, rollout, old, ref_lp, advantages, grpo.make_token_loss(0.04, 0.2, 0.28), "token_mean",
                          micro_batch_size=4)
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert stats["policy/clipfrac"] == 0.0
    assert stats["grad_norm"] > 0


def test_update_policy_errors():
    model, tok = tiny_causal_lm(seed=0)
    empty = select_rows(hand_rollout([1]), [])
    with pytest.raises(ValueError, match="update_policy got an empty rollout batch"):
        update_policy(harness(model, tok), empty, torch.zeros(0, 0), None, torch.zeros(0),
                      grpo.make_token_loss(0.0, 0.2, 0.2), "seq_mean", micro_batch_size=1)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"the model has no trainable parameters \(requires_grad=False everywhere\)"):
        build_optimizer(model, load_config(GRPOConfig).train, total_steps=1)


# ---------------------------------------------------------------- DAPO dynamic sampling
class ListSampler:
    """Hands out prompts in a fixed order; records how many were asked for each time."""

    def __init__(self, names: list[str]):
        self.names, self.pos, self.calls = names, 0, []

    def next(self, n: int) -> list[dict]:
        self.calls.append(n)
        out = [{"name": x} for x in self.names[self.pos : self.pos + n]]
        self.pos += n
        return out


def fake_sample(sampler: ListSampler, group_size: int):
    """``sample(k)``: the sampler's next k prompts, G rows each. 'c*' prompts: all G rewards 1.0 (equal group);
    'v*' prompts: rewards 0, 1, ..., G-1."""

    def sample(k: int) -> ScoredRollout:
        names = [p["name"] for p in sampler.next(k) for _ in range(group_size)]
        rollout = hand_rollout([1] * len(names), width=1)
        rollout.prompt_texts = names
        rewards = torch.tensor([1.0 if n.startswith("c") else float(i % group_size) for i, n in enumerate(names)])
        return ScoredRollout(rollout, rewards.clone(), rewards, {})

    return sample


def test_dapo_drops_equal_groups_and_refills():
    """Want 4 groups of G = 2. Round 0 draws c1 v1 c2 c3 -> keeps v1, drops 3; refill round 1 draws the
    3 missing: v2 c4 v3 -> keeps 2, drops 1; refill round 2 draws 1: v4 -> kept 4 = full.
    dropped 4, refilled 3, rounds 2, missing 0; the batch is v1 v2 v3 v4 (2 rows each), in order."""
    sampler = ListSampler(["c1", "v1", "c2", "c3", "v2", "c4", "v3", "v4", "v5"])
    batch, sampled, stats = grpo.collect_groups(fake_sample(sampler, 2), 4, 2, True, max_refill_rounds=3,
                                                pad_token_id=0)
    assert sampler.calls == [4, 3, 1]
    assert stats == {"dapo/dropped_groups": 4, "dapo/refilled_groups": 3, "dapo/refill_rounds": 2,
                     "dapo/kept_groups": 4, "dapo/missing_groups": 0}
    assert batch.rollout.prompt_texts == ["v1", "v1", "v2", "v2", "v3", "v3", "v4", "v4"]
    assert_close(batch.rewards, torch.tensor([0.0, 1.0] * 4))
    assert len(sampled) == 2 * 8 and not bool(equal_reward_groups(batch.rewards, 2).any())


def test_dapo_refill_size_common_to_all_processes():
    """``refill_size`` (under several processes: the largest need of any process) sets how many prompts a refill
    draws, but a process keeps only the groups it still misses. Need 3 everywhere: round 0 c1 v1 c2 c3 keeps v1;
    round 1 draws 3: v2 c4 v3 keeps 2; round 2 draws 3 although 1 is missing: v4 v5 c5 keeps v4 only (v5 is
    surplus, not kept). dropped 3 + 1 + 1 (c5), refilled 2 + 1."""
    sampler = ListSampler(["c1", "v1", "c2", "c3", "v2", "c4", "v3", "v4", "v5", "c5"])
    batch, sampled, stats = grpo.collect_groups(fake_sample(sampler, 2), 4, 2, True, 3, 0,
                                                refill_size=lambda missing: 3 if missing else 0)
    assert sampler.calls == [4, 3, 3]
    assert stats == {"dapo/dropped_groups": 5, "dapo/refilled_groups": 3, "dapo/refill_rounds": 2,
                     "dapo/kept_groups": 4, "dapo/missing_groups": 0}
    assert batch.rollout.prompt_texts == ["v1", "v1", "v2", "v2", "v3", "v3", "v4", "v4"]
    assert len(sampled) == 2 * 10


def test_dapo_short_after_max_refill_rounds_and_nothing_left():
    """max_refill_rounds 1: round 0 c1 v1 c2 c3 keeps 1, round 1 v2 c4 v3 keeps 2 -> train on 3, missing 1.
    All-constant prompts with no refills -> no batch at all (the caller logs and skips the update).
    Without dynamic sampling equal groups stay in the batch (their advantages are 0)."""
    names = ["c1", "v1", "c2", "c3", "v2", "c4", "v3", "v4"]
    batch, _, stats = grpo.collect_groups(fake_sample(ListSampler(names), 2), 4, 2, True, 1, 0)
    assert (stats["dapo/kept_groups"], stats["dapo/missing_groups"], stats["dapo/refill_rounds"]) == (3, 1, 1)
    assert len(batch) == 6
    batch, sampled, stats = grpo.collect_groups(fake_sample(ListSampler(["c1", "c2"]), 2), 2, 2, True, 0, 0)
    assert batch is None and stats["dapo/missing_groups"] == 2 and len(sampled) == 4
    batch, sampled, stats = grpo.collect_groups(fake_sample(ListSampler(names), 2), 4, 2, False, 3, 0)
    assert len(batch) == 8 and stats == {} and batch is sampled


# ---------------------------------------------------------------- RLOO
def test_rloo_rewards_hand_computed():
    """R = r - kl_coef * KL: r = [1, 2], KL = [0.5, -1], kl_coef 0.1 -> [0.95, 2.1]."""
    assert_close(rloo.rloo_rewards(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), 0.1), torch.tensor([0.95, 2.1]))


def test_rloo_e2e_advantages_sum_to_zero_per_group(assets, tmp_path, monkeypatch):
    """Inside the algorithm's batch: A = rloo_advantages(R, k) with k = 3, so each group of 3 sums to 0 and
    A_i = R_i - mean_{j != i} R_j; at iteration 1 the policy is the reference (KL = 0, R = the sampled batch's
    rewards). LoRA on (reference = adapters disabled). Writes model/, metrics.jsonl, summary.json."""
    seen, batches = [], []
    real_update, real_sample = rloo.update_policy, OnlineRun.sample

    def spy(run, rollout, old, ref, advantages, *args, **kwargs):
        seen.append((advantages.detach().clone(), ref is not None))
        return real_update(run, rollout, old, ref, advantages, *args, **kwargs)

    def spy_sample(self, *args, **kwargs):
        batches.append(real_sample(self, *args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(rloo, "update_policy", spy)
    monkeypatch.setattr(OnlineRun, "sample", spy_sample)
    out = tmp_path / "rloo"
    rc = cli.main(["rloo", *base_overrides(assets, out), "rloo.num_generations=3", "rloo.prompts_per_iteration=2",
                   "rloo.num_iterations=2", "rloo.ppo_epochs=2", "model.lora.enabled=true", "model.lora.r=4"])
    assert rc == 0
    assert len(seen) == 2 and all(has_ref for _, has_ref in seen)
    for advantages, _ in seen:
        assert advantages.shape == (6,)
        assert_close(advantages.view(2, 3).sum(1), torch.zeros(2), atol=1e-5, rtol=0)
        assert float(advantages.abs().sum()) > 0
    assert len(batches) == 2  # one sample per iteration, no eval prompts
    r = batches[0].rewards.view(2, 3)  # iteration 1: R = r (KL = 0)
    leave_one_out = r - (r.sum(1, keepdim=True) - r) / 2
    assert_close(seen[0][0].cpu(), leave_one_out.reshape(-1), atol=1e-5, rtol=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["objective/rlhf_reward"] == pytest.approx(first["scores"], abs=1e-5)
    for key in ("objective/entropy", "policy/clipfrac", "policy/approxkl", "advantages/std", "response_length",
                "no_eos_frac", "lr", "rewards/callable", "time/generation", "time/scoring", "time/training"):
        assert key in first, key
    assert (out / "model" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["eval_before"] is None


# ---------------------------------------------------------------- GRPO end to end + resume
def grpo_args(assets: dict, out: Path) -> list[str]:
    return [*base_overrides(assets, out), f"data.eval={assets['prompts']}", "data.eval_limit=2",
            "grpo.num_generations=3", "grpo.prompts_per_iteration=2", "grpo.num_iterations=3",
            "grpo.save_every=1", "grpo.ppo_epochs=2"]


@pytest.fixture(scope="module")
def grpo_run(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert cli.main(["grpo", *grpo_args(assets, out)]) == 0
    return out


def metrics_without_time(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_grpo_e2e_writes_model_metrics_summary(grpo_run):
    records = metrics_without_time(grpo_run)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 3]  # eval before, 3 iterations, eval after
    assert "eval/scores" in records[0] and "eval/scores" in records[-1]
    first = records[1]
    for key in ("objective/kl", "objective/entropy", "scores", "rewards/callable", "advantages/std",
                "policy/clipfrac", "policy/approxkl", "response_length", "no_eos_frac", "frac_equal_groups", "lr"):
        assert key in first, key
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at iteration 1
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["loss_type"] == "grpo"
    assert set(summary["eval_before"]) >= {"scores", "response_length"} and summary["eval_after"] is not None
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(grpo_run / "model") is not None


def test_grpo_resume_after_kill_equals_uninterrupted(assets, grpo_run, tmp_path, monkeypatch):
    """Kill during iteration 3 (after checkpoint 2), --resume: same final weights and the same metrics."""
    out = tmp_path / "killed"
    real_update, calls = grpo.update_policy, []

    def killing_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated kill")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(grpo, "update_policy", killing_update)
    with pytest.raises(RuntimeError, match="simulated kill"):
        cli.main(["grpo", *grpo_args(assets, out)])
    assert not (out / "model").exists()
    assert [r["step"] for r in metrics_without_time(out)] == [0, 1, 2]  # iteration 3 died before its line
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]
    monkeypatch.setattr(grpo, "update_policy", real_update)
    assert cli.main(["grpo", *grpo_args(assets, out), "--resume"]) == 0
    assert metrics_without_time(out) == metrics_without_time(grpo_run)
    want, got = load_file(grpo_run / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    initial = load_file(Path(assets["policy"]) / "model.safetensors")
    assert any(not torch.equal(initial[n], got[n]) for n in initial if n in got)  # training did change it


def test_dapo_all_equal_groups_are_dropped_and_logged(assets, tmp_path, capsys):
    """Constant reward: every group is dropped, refills find none -> no update (weights unchanged),
    and the shortfall is logged, never silent."""
    out = tmp_path / "dapo"
    rc = cli.main(["grpo", *base_overrides(assets, out, reward_fn="constant"), "grpo.loss_type=dapo",
                   "grpo.drop_equal_groups=true", "grpo.max_refill_rounds=1", "grpo.num_generations=2",
                   "grpo.prompts_per_iteration=2", "grpo.num_iterations=1", "grpo.beta=0"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "grpo iteration 1: dynamic sampling kept no group (on some process): no update this iteration" in err
    assert "reference: none" in err  # beta = 0: no reference model at all
    (record,) = metrics_without_time(out)
    assert record["dapo/dropped_groups"] == 4 and record["dapo/missing_groups"] == 2
    assert record["dapo/kept_groups"] == 0 and record["dapo/refill_rounds"] == 1
    assert record["frac_equal_groups"] == 1.0 and "loss/policy" not in record
    initial = load_file(Path(assets["policy"]) / "model.safetensors")
    final = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(initial[n], final[n]) for n in initial if n in final)
