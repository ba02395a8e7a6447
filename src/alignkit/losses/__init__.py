"""Pure loss functions: per-example (or per-token) values, never reduced over the batch."""

from alignkit.losses.grpo import dapo_overlong_penalty, grpo_token_loss
from alignkit.losses.ppo import PolicyLossOutput, ValueLossOutput, ppo_policy_loss, ppo_value_loss
from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    KTOLossOutput,
    PreferenceLossOutput,
    PreferenceLossSpec,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from alignkit.losses.prm import prm_step_loss
from alignkit.losses.reward import bradley_terry_loss, soft_bradley_terry_loss
from alignkit.losses.sft import sft_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "KTOLossOutput",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "PreferenceLossSpec",
    "ValueLossOutput",
    "bradley_terry_loss",
    "dapo_overlong_penalty",
    "dpo_loss",
    "grpo_token_loss",
    "ipo_loss",
    "kto_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "prm_step_loss",
    "sft_loss",
    "simpo_loss",
    "soft_bradley_terry_loss",
]
