"""Per-token KL estimators and KL-coefficient controllers.

Estimators: Schulman (2020), "Approximating KL Divergence". Tokens are sampled from the
policy pi; with x = log(pref / pi) = ref_logprobs - logprobs, each estimator k has
E_pi[k] ~= KL(pi || pref):
    k1 = -x                 (unbiased, can be negative)
    k2 = x^2 / 2            (biased, low variance)
    k3 = (e^x - 1) - x      (unbiased, always >= 0)

For evaluation, where both models' full next-token distributions are at hand, ``kl_exact`` sums over the
vocabulary instead of using the one sampled token: KL(pi(.|s_t) || pref(.|s_t)) at every sampled prefix s_t.
By the chain rule sum_t of it has the same expectation as the sequence's summed k1 (KL(pi || pref) of whole
responses) and lower variance, since the token choice at t is integrated out (a Rao-Blackwellised estimator).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = -x = log pi - log pref."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = x^2 / 2 with x = log pref - log pi."""
    x = ref_logprobs - logprobs
    return 0.5 * x**2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = e^x - 1 - x with x = log pref - log pi (>= 0, 0 at equality)."""
    x = ref_logprobs - logprobs
    return torch.expm1(x) - x


def kl_exact(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """[..., V], [..., V] -> [...]: KL(softmax(logits / T) || softmax(ref_logits / T)) = sum_v p_v (log p_v - log q_v)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class FixedKLController:
    """Constant KL coefficient beta; ``update`` is a no-op."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. (2019) "Fine-Tuning LMs from Human Preferences", eq. 2:

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))
