"""Tests for alignkit.ops.stats, ops.kl, ops.advantages."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.ops.advantages import compute_gae, compute_gae_loop, group_advantages, rloo_advantages
from alignkit.ops.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_exact,
    kl_k1,
    kl_k2,
    kl_k3,
)
from alignkit.ops.stats import aggregate_token_losses, last_index, masked_mean, masked_sum, masked_var, masked_whiten

LOG2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()  # [B, T]


# ---------------------------------------------------------------- stats
def test_masked_sum_and_mean_hand_computed():
    """row 0: (1 + 2) = 3, mean 1.5; row 1: no tokens -> sum 0, mean 0 (not NaN); global mean 3 / 2."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert_close(masked_sum(x, mask), torch.tensor(3.0))
    assert_close(masked_sum(x, mask, dim=-1), t(3.0, 0.0))
    assert_close(masked_mean(x, mask, dim=-1), t(1.5, 0.0))
    assert_close(masked_mean(x, mask), torch.tensor(1.5))
    assert_close(masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0))


def test_last_index_hand_examples():
    """Last non-zero column: [0,1,1,0] -> 2 (pads on both sides); [1,1,1,1] -> 3; [0,0,1,0] -> 2;
    [1,0,0,0] -> 0; an empty row -> 0. Works on bool and float masks alike."""
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    expected = torch.tensor([2, 3, 2, 0, 0])
    assert torch.equal(last_index(mask), expected)
    assert torch.equal(last_index(mask.bool()), expected)
    assert torch.equal(last_index(mask.float()), expected)


def test_masked_var_hand_computed():
    """masked entries 1, 2, 3, 4 (100 is padding): mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    -> biased 5 / 4 = 1.25, unbiased 5 / 3. A single entry gives 0, not inf/NaN."""
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(1.25))
    assert_close(masked_var(x, mask), torch.tensor(5.0 / 3.0))
    assert_close(masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]])), torch.tensor(0.0))


def test_masked_whiten_mean0_var1_on_masked_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g) * 3 + 7
    x[:, -2:] = 1000.0  # padding must not leak into the statistics
    mask = ragged_mask([9, 4, 7, 2], 9)
    mask[0, -2:] = 0
    white = masked_whiten(x, mask)
    assert_close(masked_mean(white, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert_close(masked_var(white, mask), torch.tensor(1.0), atol=1e-5, rtol=1e-5)
    scaled = masked_whiten(x, mask, shift_mean=False)  # scale only: mean kept
    assert_close(masked_mean(scaled, mask), masked_mean(x, mask), atol=1e-4, rtol=1e-5)
    assert_close(masked_var(scaled, mask), torch.tensor(1.0), atol=1e-5, rtol=1e-5)


def test_aggregate_modes_hand_computed_and_differ():
    """losses [[1, 2, 3, 4], [10, _, _, _]] with lengths 4 and 1:
    seq_mean = mean(2.5, 10) = 6.25; token_mean = (10 + 10) / 5 = 4; seq_sum_const(4) = 20 / (2 * 4) = 2.5."""
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 7.0, 7.0, 7.0]])
    mask = ragged_mask([4, 1], 4)
    assert_close(aggregate_token_losses(losses, mask, "seq_mean"), torch.tensor(6.25))
    assert_close(aggregate_token_losses(losses, mask, "token_mean"), torch.tensor(4.0))
    assert_close(aggregate_token_losses(losses, mask, "seq_sum_const", max_len=4), torch.tensor(2.5))


def test_aggregate_errors():
    losses, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'; valid modes: seq_mean, token_mean, seq_sum_const"):
        aggregate_token_losses(losses, mask, "mean")
    with pytest.raises(ValueError, match="'seq_sum_const' needs a positive max_len, got None"):
        aggregate_token_losses(losses, mask, "seq_sum_const")


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_hand_computed():
    """x = log pref - log pi = log 2: k1 = -log 2, k2 = 0.5 (log 2)^2 = 0.240227, k3 = 2 - 1 - log 2 = 0.306853;
    x = -log 2: k3 = 0.5 - 1 + log 2 = 0.193147."""
    logprobs = torch.zeros(2)
    ref = t(LOG2, -LOG2)
    assert_close(kl_k1(logprobs, ref), t(-LOG2, LOG2))
    assert_close(kl_k2(logprobs, ref), t(0.5 * LOG2**2, 0.5 * LOG2**2))
    assert_close(kl_k3(logprobs, ref), t(0.306853, 0.193147), atol=1e-6, rtol=0)
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def test_k1_k3_unbiased_exact_expectation():
    """E_{y~p}[k(x_y)] computed exactly over a small support: k1 and k3 equal KL(p || q), k2 does not."""
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, -1)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, -1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum()
    assert_close((p * kl_k1(logp, logq)).sum(), kl)
    assert_close((p * kl_k3(logp, logq)).sum(), kl)
    assert not torch.allclose((p * kl_k2(logp, logq)).sum(), kl)


def test_kl_exact_hand_computed_and_temperature():
    """p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3) = 0.143841; KL(p || p) = 0; the temperature
    divides both logits: logits (2 log 2, 0) at T = 2 are p' = (2/3, 1/3)."""
    p_logits = t(0.0, 0.0)
    q_logits = torch.log(t(0.25, 0.75))
    assert_close(kl_exact(p_logits, q_logits), torch.tensor(0.5 * LOG2 + 0.5 * math.log(2 / 3)))
    assert_close(kl_exact(q_logits, q_logits), torch.tensor(0.0))
    two = t(2 * LOG2, 0.0)  # at T = 2: (log 2, 0) -> (2/3, 1/3); vs uniform: 2/3 log(4/3) + 1/3 log(2/3)
    assert_close(kl_exact(two, t(0.0, 0.0), temperature=2.0), torch.tensor(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)))
    batch = torch.randn(2, 3, 5)  # [..., V] -> [...]
    assert kl_exact(batch, batch.flip(-1)).shape == (2, 3)
    assert (kl_exact(batch, batch.flip(-1)) >= 0).all()


def test_kl_exact_is_the_expectation_of_k1():
    """Rao-Blackwell: E_{y~p}[k1] over the support equals kl_exact of the same distributions."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    assert_close(kl_exact(a, b).double(), (logp.exp() * kl_k1(logp, logq)).sum(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- KL controllers
def test_adaptive_kl_at_target_unchanged():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.0, n_steps=512)
    assert ctl.value == pytest.approx(0.1)


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (6.6, 0.101),  # e = 6.6 / 6 - 1 = 0.1 -> mult 1 + 0.1 * 1000 / 10000 = 1.01
        (5.4, 0.099),  # e = -0.1 -> 0.99
        (9.0, 0.102),  # e = 0.5, clipped to 0.2 -> 1.02
        (0.0, 0.098),  # e = -1, clipped to -0.2 -> 0.98
    ],
)
def test_adaptive_kl_hand_examples_and_clip(current_kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl, n_steps=1000)
    assert ctl.value == pytest.approx(expected)


def test_kl_controller_state_roundtrip_and_fixed():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=1000)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value == pytest.approx(0.102)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target must be > 0, got 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon must be > 0, got 0"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


# ---------------------------------------------------------------- GAE
def test_gae_hand_computed():
    """gamma 1, lam 0.5, mask [1, 1, 0] (padding reward 5 and value 9 are ignored):
    t=1: delta = 1 + 0 - 0.2 = 0.8, A1 = 0.8; t=0: delta = 0 + 0.2 - 0.5 = -0.3, A0 = -0.3 + 0.5 * 0.8 = 0.1;
    returns = A + V = [0.6, 1.0, 0]."""
    rewards, values = torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for fn in (compute_gae, compute_gae_loop):
        advantages, returns = fn(rewards, values, mask, gamma=1.0, lam=0.5)
        assert_close(advantages, torch.tensor([[0.1, 0.8, 0.0]]))
        assert_close(returns, torch.tensor([[0.6, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_vectorised_equals_loop_ragged(gamma, lam):
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(5, 8, generator=g)
    values = torch.randn(5, 8, generator=g, requires_grad=True)
    mask = ragged_mask([8, 5, 1, 3, 7], 8)
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = compute_gae_loop(rewards, values.detach(), mask, gamma=gamma, lam=lam)
    assert_close(advantages, ref_adv)
    assert_close(returns, ref_ret)
    assert_close(returns, (advantages + values.detach()) * mask)  # returns = A + V, before whitening
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- group / RLOO advantages
def test_group_advantages_hand_example():
    """group 0 = [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.577350
    -> A = +-0.5 / (0.577350 + 1e-4); group 1 = [2, 2, 2, 2] -> 0."""
    rewards = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert_close(group_advantages(rewards, group_size=4), t(a, -a, -a, a, 0.0, 0.0, 0.0, 0.0))
    assert_close(group_advantages(rewards, 4, scale_by_std=False), t(0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0))


def test_group_advantages_all_equal_exactly_zero():
    """mean of six float32 0.3s differs from 0.3 by ~3e-8; unguarded that becomes ~3e-4 after /(std + eps)."""
    rewards = torch.full((12,), 0.3)
    rewards[6:] = -1.7
    assert torch.equal(group_advantages(rewards, 6), torch.zeros(12))
    assert torch.equal(group_advantages(rewards, 6, scale_by_std=False), torch.zeros(12))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="7 rewards is not a multiple of the group size 4"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match=r"expects rewards of shape \[B\*G\], got shape \(2, 4\)"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        group_advantages(torch.zeros(4), 0)


def test_rloo_hand_example():
    """k = 4, r = [1, 2, 3, 6]: A_0 = 1 - (2 + 3 + 6) / 3 = -8/3, A_1 = 2 - 10/3 = -4/3, A_2 = 3 - 3 = 0,
    A_3 = 6 - 2 = 4 (= 4/3 * (r - 3))."""
    assert_close(rloo_advantages(t(1.0, 2.0, 3.0, 6.0), k=4), t(-8 / 3, -4 / 3, 0.0, 4.0))


def test_rloo_invariants():
    g = torch.Generator().manual_seed(5)
    k = 5
    rewards = torch.randn(3 * k, generator=g, dtype=torch.float64)
    adv = rloo_advantages(rewards, k)
    assert_close(adv.view(3, k).sum(1), torch.zeros(3, dtype=torch.float64))
    assert_close(rloo_advantages(rewards + 3.7, k), adv)
    grouped = rewards.view(3, k)
    assert_close(adv, (k / (k - 1) * (grouped - grouped.mean(1, keepdim=True))).reshape(-1))


def test_rloo_errors():
    with pytest.raises(ValueError, match="needs k >= 2 samples per prompt, got k=1"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="5 rewards is not a multiple of the group size 2"):
        rloo_advantages(torch.zeros(5), 2)
