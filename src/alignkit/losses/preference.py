"""Direct preference losses: DPO, cDPO, IPO, ORPO, SimPO, KTO.

Each function returns per-example losses [B] and detached implicit rewards; none reduces
over the batch. Notation: logps are summed token log-probs of a response unless the
docstring says "average"; h = (log pi_w - log pi_l) - (log pref_w - log pref_l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLossOutput(NamedTuple):
    losses: Tensor  # [B]
    chosen_rewards: Tensor  # [B] detached implicit rewards
    rejected_rewards: Tensor  # [B] detached


class KTOLossOutput(NamedTuple):
    losses: Tensor  # [B]
    rewards: Tensor  # [B] detached beta * (log pi - log pref)
    kl: Tensor  # scalar z0, detached, >= 0


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> PreferenceLossOutput:
    """DPO, Rafailov et al. (2023) eq. 7; cDPO (Mitchell 2023) via label smoothing eps:

        h = pi_logratios - ref_logratios
        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    reference_free: ref_logratios := 0 (and the rewards use log pref = 0).
    Rewards (eq. 5 implicit reward): beta * (log pi - log pref), detached.
    """
    _check_label_smoothing(label_smoothing)
    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # [B]
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # [B]
    logits = pi_logratios - ref_logratios  # h, [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
        -beta * logits
    )
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """IPO, Azar et al. (2023) "A General Theoretical Paradigm...", eq. 17 (beta = tau):

        L = (h - 1 / (2 beta))^2,   minimum at h = 1 / (2 beta)
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss needs beta > 0, got {beta}")
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # [B]
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # [B]
    logits = pi_logratios - ref_logratios
    losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stable near 0 (Maechler 2012); x is clamped to <= -eps(dtype)."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, lam: float = 0.1
) -> PreferenceLossOutput:
    """ORPO, Hong et al. (2024) eqs. 2-7; inputs are AVERAGE token log-probs (log P):

        log odds(y) = log P - log(1 - P)
        L = -log P(y_w) + lam * (-log sigma(log odds(y_w) - log odds(y_l)))

    No reference model. Rewards: lam * average log-probs, detached.
    """
    log_odds = (policy_chosen_logps - _log1mexp(policy_chosen_logps)) - (
        policy_rejected_logps - _log1mexp(policy_rejected_logps)
    )  # [B]
    losses = -policy_chosen_logps - lam * F.logsigmoid(log_odds)
    chosen_rewards = lam * policy_chosen_logps.detach()
    rejected_rewards = lam * policy_rejected_logps.detach()
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO, Meng et al. (2024) eq. 6; inputs are AVERAGE token log-probs:

        z = beta (avg log pi(y_w) - avg log pi(y_l)) - gamma,   gamma = gamma_beta_ratio * beta
        L = -(1 - eps) log sigma(z) - eps log sigma(-z)

    No reference model. Rewards: beta * average log-probs, detached.
    """
    _check_label_smoothing(label_smoothing)
    gamma = gamma_beta_ratio * beta
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO, Ethayarajh et al. (2024) eq. 8 (loss = lambda_y - v(x, y)):

        r = log pi(y|x) - log pref(y|x)
        z0 = max(0, mean over mismatched (x, y') of log pi(y'|x) - log pref(y'|x)), detached
        desirable (label True):    lambda_D (1 - sigma(beta (r - z0)))
        undesirable (label False): lambda_U (1 - sigma(beta (z0 - r)))

    policy_logps, ref_logps, labels: [B]; policy_kl_logps, ref_kl_logps: [B'] mismatched pairs.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()  # z0, scalar
    logratios = policy_logps - ref_logps  # r, [B]
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(labels.bool(), desirable, undesirable)
    return KTOLossOutput(losses, beta * logratios.detach(), kl)


@dataclass(frozen=True)
class PreferenceLossSpec:
    """One row of :data:`PREFERENCE_LOSSES`: the loss, what it takes, and which settings set its keywords."""

    fn: Callable[..., PreferenceLossOutput]
    needs_reference: bool  # fn takes (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    average_logps: bool  # inputs are per-token averages rather than sums
    settings: tuple[tuple[str, str], ...] = ()
    """``(fn keyword, setting name)`` pairs: the setting (a field of the ``dpo:`` config section) gives the keyword."""

    def kwargs(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """fn's keyword arguments from ``settings`` (setting name -> value, e.g. the resolved ``dpo:`` section)."""
        return {keyword: settings[name] for keyword, name in self.settings}


_DPO_SETTINGS = (("beta", "beta"), ("label_smoothing", "label_smoothing"), ("reference_free", "reference_free"))
PREFERENCE_LOSSES: dict[str, PreferenceLossSpec] = {
    "dpo": PreferenceLossSpec(dpo_loss, needs_reference=True, average_logps=False, settings=_DPO_SETTINGS),
    "cdpo": PreferenceLossSpec(dpo_loss, needs_reference=True, average_logps=False, settings=_DPO_SETTINGS),
    "ipo": PreferenceLossSpec(ipo_loss, needs_reference=True, average_logps=False, settings=(("beta", "beta"),)),
    "orpo": PreferenceLossSpec(orpo_loss, needs_reference=False, average_logps=True,
                               settings=(("lam", "orpo_lambda"),)),
    "simpo": PreferenceLossSpec(simpo_loss, needs_reference=False, average_logps=True,
                                settings=(("beta", "beta"), ("gamma_beta_ratio", "simpo_gamma_beta_ratio"),
                                          ("label_smoothing", "label_smoothing"))),
}
"""Name -> loss. cdpo is dpo with ``label_smoothing`` > 0 (the config requires it)."""
