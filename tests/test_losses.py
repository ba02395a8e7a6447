"""Tests for alignkit.losses: hand-computed values (arithmetic in the docstrings) and invariants."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.losses import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dapo_overlong_penalty,
    dpo_loss,
    grpo_token_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    simpo_loss,
)
from alignkit.ops.kl import kl_k3

LOG2 = math.log(2.0)


def softplus(z: float) -> float:
    """-log sigmoid(-z) = log(1 + e^z)."""
    return math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- SFT
def test_sft_loss_hand_computed():
    """row 0: -(-1 - 2 - 3) / 3 = 2.0; row 1: only the first token counts: 0.5;
    row 2: no completion token -> 0 (not NaN)."""
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert_close(sft_loss(token_logps, mask), t(2.0, 0.5, 0.0))


# ---------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_hand_computed_and_equal_scores():
    """r_w - r_l = 1 -> -log sigma(1) = log(1 + e^-1) = 0.313262; equal scores -> log 2;
    margin 0.5 on the first pair -> log(1 + e^-0.5) = 0.474077."""
    chosen, rejected = t(1.0, 0.3), t(0.0, 0.3)
    assert_close(bradley_terry_loss(chosen, rejected), t(softplus(-1.0), LOG2))
    assert_close(bradley_terry_loss(chosen, rejected, margin=t(0.5, 0.0)), t(softplus(-0.5), LOG2))
    assert_close(bradley_terry_loss(chosen, rejected)[0], torch.tensor(0.313262), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- DPO / cDPO
def test_dpo_hand_computed_and_rewards():
    """pi_logratios = -1 - (-3) = 2, ref_logratios = -2 - (-2) = 0, h = 2, beta = 0.5:
    loss = -log sigma(1) = log(1 + e^-1) = 0.313262.
    chosen reward 0.5 * (-1 + 2) = 0.5, rejected 0.5 * (-3 + 2) = -0.5."""
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert_close(out.losses, t(0.313262), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, t(0.5))
    assert_close(out.rejected_rewards, t(-0.5))


def test_dpo_at_reference_is_log2_with_gradient_minus_beta_over_2():
    """policy == reference -> h = 0 -> loss = -log sigma(0) = log 2;
    dL/dh = -beta sigma(-beta h) = -beta / 2; h moves one-for-one with log pi_w and against log pi_l."""
    beta = 0.3
    policy_chosen = torch.tensor([-5.0, -1.5], requires_grad=True)
    policy_rejected = torch.tensor([-7.0, -2.0], requires_grad=True)
    out = dpo_loss(policy_chosen, policy_rejected, t(-5.0, -1.5), t(-7.0, -2.0), beta=beta)
    assert_close(out.losses, t(LOG2, LOG2))
    out.losses.sum().backward()
    assert_close(policy_chosen.grad, t(-beta / 2, -beta / 2))
    assert_close(policy_rejected.grad, t(beta / 2, beta / 2))


def test_cdpo_label_smoothing_formula():
    """eps = 0.1, beta h = 1: -(0.9) log sigma(1) - 0.1 log sigma(-1)
    = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262 (= softplus(-1) + eps * 1)."""
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * softplus(-1.0) + 0.1 * softplus(1.0)
    assert_close(out.losses, t(expected))
    assert_close(out.losses, t(0.413262), atol=1e-6, rtol=0)


def test_dpo_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\], got 0.7"):
        dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), label_smoothing=0.7)


def test_dpo_reference_free_equals_zero_reference():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 10 for _ in range(4))
    free = dpo_loss(pc, pr, rc, rr, beta=0.2, reference_free=True)
    zero = dpo_loss(pc, pr, torch.zeros(5), torch.zeros(5), beta=0.2)
    for a, b in zip(free, zero):
        assert_close(a, b)
    # and the reference really is ignored: it differs from the referenced loss
    assert not torch.allclose(free.losses, dpo_loss(pc, pr, rc, rr, beta=0.2).losses)


def test_dpo_implicit_reward_accuracy():
    """rewards (beta = 1): pair 0: chosen -1 - (-2) = 1 > rejected -3 - (-2) = -1 (correct);
    pair 1: chosen -4 - (-2) = -2 < rejected -1 - (-2) = 1 (wrong) -> accuracy 1/2."""
    out = dpo_loss(t(-1.0, -4.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=1.0)
    assert_close(out.chosen_rewards, t(1.0, -2.0))
    assert_close(out.rejected_rewards, t(-1.0, 1.0))
    accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
    assert_close(accuracy, torch.tensor(0.5))
    assert not out.chosen_rewards.requires_grad


# ---------------------------------------------------------------- IPO
def test_ipo_hand_computed_and_minimum():
    """beta = 0.25 -> target 1 / (2 beta) = 2. h = 3 -> (3 - 2)^2 = 1; h = 0 -> 4;
    at h = 2 the loss and its gradient 2 (h - 2) are 0."""
    out = ipo_loss(t(-1.0, -2.0), t(-4.0, -2.0), t(-1.0, -1.0), t(-1.0, -1.0), beta=0.25)
    assert_close(out.losses, t(1.0, 4.0))
    policy_chosen = torch.tensor([0.0], requires_grad=True)
    at_min = ipo_loss(policy_chosen, t(-2.0), t(0.0), t(0.0), beta=0.25)  # h = 2
    at_min.losses.sum().backward()
    assert_close(at_min.losses, t(0.0))
    assert_close(policy_chosen.grad, t(0.0))


def test_ipo_rejects_nonpositive_beta():
    with pytest.raises(ValueError, match="ipo_loss needs beta > 0, got 0"):
        ipo_loss(t(-1.0), t(-2.0), t(-1.0), t(-1.0), beta=0.0)


# ---------------------------------------------------------------- ORPO
def test_orpo_hand_computed_odds():
    """P_w = 0.5 -> odds 1 -> log odds 0; P_l = 0.2 -> odds 0.25 -> log odds -log 4.
    log odds ratio = log 4 -> -log sigma(log 4) = log(1 + 1/4) = log 1.25 = 0.223144.
    L = -log 0.5 + 0.1 * 0.223144 = 0.693147 + 0.022314 = 0.715461; rewards 0.1 * avg logps."""
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), lam=0.1)
    assert_close(out.losses, t(LOG2 + 0.1 * math.log(1.25)))
    assert_close(out.losses, t(0.715461), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, t(0.1 * math.log(0.5)))
    assert_close(out.rejected_rewards, t(0.1 * math.log(0.2)))


def test_orpo_is_finite_near_probability_one():
    """avg logp -> 0 makes log(1 - e^x) -> -inf; the clamp keeps loss and gradient finite."""
    chosen = torch.tensor([0.0, -1e-9, -60.0], requires_grad=True)
    rejected = torch.tensor([-1e-12, -0.5, -70.0], requires_grad=True)
    out = orpo_loss(chosen, rejected)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # far from 0 the odds are ~P: log odds ratio ~ (-60) - (-70) = 10 -> loss ~ 60 + 0.1 * log(1 + e^-10)
    assert_close(out.losses[2], torch.tensor(60.0 + 0.1 * softplus(-10.0)))


def test_orpo_log_odds_accurate_near_zero():
    """x_w = -1e-4, x_l = -2e-4 (P close to 1): log odds(y) = x - log(1 - e^x), with 1 - e^x = -expm1(x)
    in float64: log odds ratio = -1e-4 + log(-expm1(-2e-4)) - log(-expm1(-1e-4)) ~= log 2 + 0.5e-4;
    lam = 1: L = 1e-4 + log(1 + e^-ratio) ~= 1e-4 + log 1.5. Naive float32 log1p(-exp(x)) is off by ~2e-4 here."""
    ratio = (-1e-4 - math.log(-math.expm1(-1e-4))) - (-2e-4 - math.log(-math.expm1(-2e-4)))
    out = orpo_loss(t(-1e-4), t(-2e-4), lam=1.0)
    assert_close(out.losses, t(1e-4 + softplus(-ratio)), atol=2e-6, rtol=0)


# ---------------------------------------------------------------- SimPO
def test_simpo_hand_computed_with_gamma():
    """beta = 2, gamma = 0.5 * 2 = 1, avg_w = -1, avg_l = -2: z = 2 * 1 - 1 = 1
    -> -log sigma(1) = 0.313262; with eps = 0.1: 0.313262 + 0.1 * 1 = 0.413262.
    rewards 2 * (-1) = -2 and 2 * (-2) = -4."""
    out = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.5)
    assert_close(out.losses, t(softplus(-1.0)))
    assert_close(out.chosen_rewards, t(-2.0))
    assert_close(out.rejected_rewards, t(-4.0))
    smoothed = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
    assert_close(smoothed.losses, t(0.413262), atol=1e-6, rtol=0)
    # gamma = 0 and equal averages -> log 2
    assert_close(simpo_loss(t(-1.0), t(-1.0), gamma_beta_ratio=0.0).losses, t(LOG2))


def test_simpo_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        simpo_loss(t(-1.0), t(-2.0), label_smoothing=-0.1)


# ---------------------------------------------------------------- KTO
def test_kto_hand_computed_branches():
    """r = -1 - (-2) = 1 for both; mismatched pairs: (-3) - (-4) = 1 and (-3) - (-3) = 0,
    z0 = mean = 0.5. beta = 0.5:
    desirable: 1 * (1 - sigma(0.5 * (1 - 0.5))) = 1 - sigma(0.25) = 0.437823
    undesirable: 1.5 * (1 - sigma(0.5 * (0.5 - 1))) = 1.5 * sigma(0.25) = 1.5 * 0.562177 = 0.843265
    rewards = 0.5 * 1 = 0.5."""
    out = kto_loss(
        t(-1.0, -1.0), t(-2.0, -2.0), torch.tensor([True, False]), t(-3.0, -3.0), t(-4.0, -3.0),
        beta=0.5, desirable_weight=1.0, undesirable_weight=1.5,
    )
    assert_close(out.losses, t(1 - sigmoid(0.25), 1.5 * sigmoid(0.25)))
    assert_close(out.losses, t(0.437823, 0.843265), atol=1e-6, rtol=0)
    assert_close(out.rewards, t(0.5, 0.5))
    assert_close(out.kl, torch.tensor(0.5))


def test_kto_z0_clamped_at_zero():
    """mismatched diffs (-3) - (-1) = -2 -> mean -2 -> z0 = max(0, -2) = 0;
    desirable r = 1: 1 - sigma(0.5) = 0.377541."""
    out = kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), t(-3.0), t(-1.0), beta=0.5)
    assert_close(out.kl, torch.tensor(0.0))
    assert_close(out.losses, t(1 - sigmoid(0.5)))


def test_kto_no_gradient_through_z0():
    policy_logps = torch.tensor([-1.0, -1.0], requires_grad=True)
    policy_kl_logps = torch.tensor([-3.0, -3.0], requires_grad=True)  # z0 = 0.5 > 0, not clamped
    out = kto_loss(policy_logps, t(-2.0, -2.0), torch.tensor([True, False]), policy_kl_logps, t(-4.0, -3.0))
    out.losses.sum().backward()
    assert policy_kl_logps.grad is None
    assert policy_logps.grad is not None and (policy_logps.grad != 0).all()
    assert not out.kl.requires_grad and not out.rewards.requires_grad


# ---------------------------------------------------------------- table
def test_preference_loss_table():
    assert set(PREFERENCE_LOSSES) == {"dpo", "cdpo", "ipo", "orpo", "simpo"}
    assert PREFERENCE_LOSSES["dpo"].fn is dpo_loss and PREFERENCE_LOSSES["cdpo"].fn is dpo_loss
    assert PREFERENCE_LOSSES["ipo"].fn is ipo_loss
    for name in ("dpo", "cdpo", "ipo"):
        assert PREFERENCE_LOSSES[name].needs_reference and not PREFERENCE_LOSSES[name].average_logps
    for name, fn in (("orpo", orpo_loss), ("simpo", simpo_loss)):
        spec = PREFERENCE_LOSSES[name]
        assert spec.fn is fn and not spec.needs_reference and spec.average_logps
    with pytest.raises(dataclasses.FrozenInstanceError):
        PREFERENCE_LOSSES["dpo"].needs_reference = False


def test_preference_loss_specs_name_the_settings_their_loss_takes():
    """Each row maps fn keywords to ``dpo:`` config fields (no per-loss branch in algorithms/dpo.py)."""
    import inspect

    from alignkit.config import DPOSection

    for name, spec in PREFERENCE_LOSSES.items():
        params = inspect.signature(spec.fn).parameters
        for keyword, setting in spec.settings:
            assert keyword in params and setting in DPOSection.model_fields, (name, keyword, setting)
    section = {"beta": 0.3, "label_smoothing": 0.1, "reference_free": True, "orpo_lambda": 0.2,
               "simpo_gamma_beta_ratio": 0.7, "precompute_ref_logps": True}
    assert PREFERENCE_LOSSES["dpo"].kwargs(section) == {"beta": 0.3, "label_smoothing": 0.1, "reference_free": True}
    assert PREFERENCE_LOSSES["cdpo"].kwargs(section) == PREFERENCE_LOSSES["dpo"].kwargs(section)
    assert PREFERENCE_LOSSES["ipo"].kwargs(section) == {"beta": 0.3}
    assert PREFERENCE_LOSSES["orpo"].kwargs(section) == {"lam": 0.2}
    assert PREFERENCE_LOSSES["simpo"].kwargs(section) == {"beta": 0.3, "gamma_beta_ratio": 0.7, "label_smoothing": 0.1}


def test_dpo_step_passes_each_loss_its_settings():
    """make_dpo_step's loss equals the loss function called by hand with the config's values."""
    from alignkit.algorithms.dpo import concatenated_logps, make_dpo_step
    from alignkit.config import DPOConfig
    from alignkit.models.tiny import tiny_causal_lm

    model, _ = tiny_causal_lm()
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 10, 11], [5, 6, 12, 0]])  # [chosen x2; rejected x2]
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "response_mask": torch.tensor([[0, 0, 1, 1]] * 4),
             "ref_chosen_logps": t(-3.0, -2.5), "ref_rejected_logps": t(-2.0, -4.0)}
    cases = {"dpo": ({"beta": 0.3}, lambda c, r: dpo_loss(c, r, t(-3.0, -2.5), t(-2.0, -4.0), beta=0.3)),
             "cdpo": ({"beta": 0.2, "label_smoothing": 0.1},
                      lambda c, r: dpo_loss(c, r, t(-3.0, -2.5), t(-2.0, -4.0), beta=0.2, label_smoothing=0.1)),
             "ipo": ({"beta": 0.5}, lambda c, r: ipo_loss(c, r, t(-3.0, -2.5), t(-2.0, -4.0), beta=0.5)),
             "orpo": ({"orpo_lambda": 0.4}, lambda c, r: orpo_loss(c, r, lam=0.4)),
             "simpo": ({"beta": 2.5, "simpo_gamma_beta_ratio": 0.2},
                       lambda c, r: simpo_loss(c, r, beta=2.5, gamma_beta_ratio=0.2))}
    for loss, (settings, by_hand) in cases.items():
        cfg = DPOConfig(dpo={"loss": loss, **settings})
        step, _ = make_dpo_step(cfg)
        with torch.no_grad():
            chosen, rejected = concatenated_logps(model, batch, average=PREFERENCE_LOSSES[loss].average_logps)  # [2]
            assert_close(step(model, batch).loss, by_hand(chosen, rejected).losses.mean(), msg=loss)


# ---------------------------------------------------------------- PPO
def test_ppo_first_minibatch_ratio_one():
    """logprobs == old_logprobs -> ratio 1, pg_losses = -A, approxkl 0, clipfrac 0
    (advantages given per sequence [B] are broadcast over T)."""
    logprobs = -torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    out = ppo_policy_loss(logprobs, logprobs.clone(), t(2.0, -0.5))
    assert_close(out.ratio, torch.ones(2, 3))
    assert_close(out.pg_losses, torch.tensor([[-2.0] * 3, [0.5] * 3]))
    assert_close(out.approxkl, torch.zeros(2, 3))
    assert_close(out.clipfrac, torch.zeros(2, 3))


def test_ppo_clipping_hand_example():
    """cliprange 0.2.
    ratio 1.5, A = +1: pg1 = -1.5, pg2 = -1 * 1.2 = -1.2 -> max -1.2, clipped (grad 0)
    ratio 1.5, A = -1: pg1 = 1.5, pg2 = 1.2 -> max 1.5, not clipped (grad -A * ratio = 1.5)
    ratio 0.5, A = +1: pg1 = -0.5, pg2 = -0.8 -> max -0.5, not clipped
    ratio 0.5, A = -1: pg1 = 0.5, pg2 = 0.8 -> max 0.8, clipped
    approxkl = 0.5 * log(1.5)^2 = 0.082201 and 0.5 * log(0.5)^2 = 0.240227."""
    logprobs = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = ppo_policy_loss(logprobs, torch.zeros(1, 4), advantages, cliprange=0.2)
    assert_close(out.ratio, torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    assert_close(out.pg_losses, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    assert_close(out.clipfrac, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert_close(out.approxkl, torch.tensor([[0.082201, 0.082201, 0.240227, 0.240227]]), atol=1e-6, rtol=0)
    out.pg_losses.sum().backward()
    assert_close(logprobs.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]))


def test_ppo_value_loss_hand_example():
    """cliprange_value 0.2, old value 0.
    V = 0.5, R = 1: unclipped (0.5 - 1)^2 = 0.25, clipped V = 0.2: (0.2 - 1)^2 = 0.64 -> 0.5 * 0.64 = 0.32, clipped
    V = 0.1, R = 1: inside the range, both 0.81 -> 0.405, not clipped
    V = 0.5, R = 0.1: unclipped 0.16, clipped (0.2 - 0.1)^2 = 0.01 -> 0.5 * 0.16 = 0.08, not clipped."""
    out = ppo_value_loss(t(0.5, 0.1, 0.5)[None], torch.zeros(1, 3), t(1.0, 1.0, 0.1)[None], cliprange_value=0.2)
    assert_close(out.vf_losses, torch.tensor([[0.32, 0.405, 0.08]]))
    assert_close(out.vf_clipfrac, torch.tensor([[1.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- GRPO / DAPO
def test_grpo_hand_computed_with_k3():
    """ratio 1, A = 2 -> surrogate -2; x = log pref - log pi = log 2 -> k3 = 2 - 1 - log 2 = 0.306853;
    beta = 0.04 -> -2 + 0.04 * 0.306853 = -1.987726."""
    zeros = torch.zeros(1, 1)
    loss = grpo_token_loss(zeros, zeros, torch.full((1, 1), LOG2), t(2.0), beta=0.04)
    assert_close(loss, torch.tensor([[-2.0 + 0.04 * (1 - LOG2)]]))
    assert_close(loss, torch.tensor([[-1.987726]]), atol=1e-6, rtol=0)


def test_grpo_k3_zero_at_equality_and_nonnegative():
    g = torch.Generator().manual_seed(2)
    logprobs = -torch.rand(4, 6, generator=g) * 5
    assert_close(kl_k3(logprobs, logprobs), torch.zeros(4, 6))
    ref = -torch.rand(4, 6, generator=g) * 5
    assert (kl_k3(logprobs, ref) >= 0).all()
    # the KL term is exactly what beta adds on top of the surrogate
    old = logprobs + 0.1 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    diff = grpo_token_loss(logprobs, old, ref, adv, beta=0.5) - grpo_token_loss(logprobs, old, ref, adv, beta=0.0)
    assert_close(diff, 0.5 * kl_k3(logprobs, ref))


def test_grpo_beta_zero_allows_no_reference_and_beta_needs_one():
    logprobs = torch.tensor([[math.log(1.5)]])
    loss = grpo_token_loss(logprobs, torch.zeros(1, 1), None, t(1.0), beta=0.0)
    assert_close(loss, torch.tensor([[-1.2]]))
    with pytest.raises(ValueError, match="ref_logprobs is required when beta != 0"):
        grpo_token_loss(logprobs, torch.zeros(1, 1), None, t(1.0), beta=0.04)


def test_grpo_clip_higher_asymmetric():
    """eps_low 0.2, eps_high 0.28: ratio 1.5, A = +1 -> -min(1.5, 1.28) = -1.28;
    ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8 (low side unchanged). Symmetric 0.2 gives -1.2 and 0.8."""
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5)]])
    adv = torch.tensor([[1.0, -1.0]])
    asym = grpo_token_loss(logprobs, torch.zeros(1, 2), None, adv, beta=0.0, eps_low=0.2, eps_high=0.28)
    sym = grpo_token_loss(logprobs, torch.zeros(1, 2), None, adv, beta=0.0, eps_low=0.2, eps_high=0.2)
    assert_close(asym, torch.tensor([[-1.28, 0.8]]))
    assert_close(sym, torch.tensor([[-1.2, 0.8]]))


def test_dapo_overlong_penalty_regions():
    """max_len 20, cache 4 -> free up to 16. L = 10, 16 -> 0; L = 18 -> (16 - 18) / 4 = -0.5;
    L = 20 -> (16 - 20) / 4 = -1; L = 25 -> -1."""
    penalty = dapo_overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    assert_close(penalty, t(0.0, 0.0, -0.5, -1.0, -1.0))


@pytest.mark.parametrize("cache_len", [0, 21])
def test_dapo_overlong_penalty_rejects_bad_cache(cache_len):
    with pytest.raises(ValueError, match="needs 0 < cache_len <= max_len"):
        dapo_overlong_penalty(torch.tensor([1]), max_len=20, cache_len=cache_len)
