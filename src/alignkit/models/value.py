"""Per-token value model for PPO, initialised from the reward model (or another backbone).

Huang et al. (2024), "The N+ implementation details of RLHF with PPO": the critic is a
separate copy of the reward model; its value at position t is the reward model's score head
applied to that position's last hidden state,

    V(x, y_<=t) = w · h_L[t]      (the reward model's score is V at the last real token).

When the reward model cannot be the critic (another tokenizer than the policy), any checkpoint
sharing the policy's tokenizer (e.g. the policy itself, optionally cut to its first layers) is
loaded as a one-label classifier with a fresh head w ~ N(0, 1/(d+1)), b = 0 (Stiennon et al. 2020).

:class:`ValueModel` wraps an ``AutoModelForSequenceClassification`` (one label) whose backbone
is found through ``base_model_prefix`` (``model.model`` for Llama) and whose head is a linear
``score`` (decoders) or ``classifier`` layer. ``save_pretrained`` writes the wrapped
sequence-classification checkpoint, so the trained critic loads back with ``from_pretrained``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from alignkit.config import ModelConfig
from alignkit.models.loading import SCORE_HEAD_NAMES, find_score_head, load_reward_model, resolve_path
from alignkit.ops.logprobs import position_ids_from_mask


def find_backbone(model: nn.Module) -> nn.Module:
    """The transformer without its head: ``getattr(model, model.base_model_prefix)``."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):
        raise ValueError(
            f"ValueModel needs a transformers sequence-classification model whose backbone is "
            f"model.<base_model_prefix>; {type(model).__name__} has base_model_prefix={prefix!r} "
            f"and no such sub-module"
        )
    return backbone


class ValueModel(nn.Module):
    """Token-level critic: ``forward(input_ids, attention_mask) -> values [B, T]`` (float32).

    Column t is the head applied to the hidden state at t, read with padding-aware position
    ids, so a real token's value does not depend on how the batch pads it. Padding columns
    hold meaningless values; mask them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        find_backbone(model)  # validate now, fail early with a clear message
        head = find_score_head(model, per_position=True)
        if head is None:
            raise ValueError(
                f"ValueModel needs a linear score head named one of {list(SCORE_HEAD_NAMES)} on "
                f"{type(model).__name__} (decoder reward models such as LlamaForSequenceClassification have `score`)"
            )
        if head.out_features != 1:
            raise ValueError(
                f"ValueModel needs a reward model with one output; the score head of {type(model).__name__} has "
                f"{head.out_features} (load it with num_labels=1)"
            )
        self.model = model  # the only registered child: state_dict keys are the checkpoint's, prefixed "model."

    @classmethod
    def from_reward_model(cls, reward_model: nn.Module) -> "ValueModel":
        """A trainable deep copy of ``reward_model`` (the reward model itself stays frozen)."""
        model = copy.deepcopy(reward_model)
        model.requires_grad_(True)
        model.train()
        return cls(model)

    @classmethod
    def from_pretrained(cls, model_cfg: ModelConfig, tokenizer) -> "ValueModel":
        """A trainable one-label classifier loaded from ``model_cfg.name_or_path`` (``models.loading.load_reward_model``):
        a reward-model checkpoint keeps its trained head; any other (e.g. a causal LM) gets a fresh reward-style
        head. ``model_cfg.num_hidden_layers`` keeps only the first N layers (a cheap critic)."""
        from transformers import AutoConfig


        if model_cfg.lora.enabled:
            raise ValueError("the value model is trained in full; give it a ModelConfig without LoRA")
        if model_cfg.num_hidden_layers is not None:
            n_layers = AutoConfig.from_pretrained(resolve_path(model_cfg.name_or_path),
                                                  trust_remote_code=model_cfg.trust_remote_code).num_hidden_layers
            if model_cfg.num_hidden_layers > n_layers:  # the missing layers would be random
                raise ValueError(f"value model: {model_cfg.num_hidden_layers} layers asked for, but "
                                 f"{model_cfg.name_or_path!r} has only {n_layers}")
        model = load_reward_model(model_cfg, tokenizer)
        model.requires_grad_(True)
        model.train()
        return cls(model)

    @property
    def backbone(self) -> nn.Module:
        return find_backbone(self.model)

    @property
    def head(self) -> nn.Linear:
        return find_score_head(self.model, per_position=True)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # [B, T, d]
        return self.head(hidden).squeeze(-1).float()  # [B, T]

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:
        """Write the wrapped sequence-classification checkpoint (``from_pretrained``-loadable)."""
        self.model.save_pretrained(out_dir, **kwargs)


def response_values(value_model: ValueModel, input_ids: Tensor, attention_mask: Tensor, prompt_length: int,
                    response_mask: Tensor, micro_batch_size: int | None = None) -> Tensor:
    """V(s_t) for each response token t: the value at the position BEFORE token t (the state it is sampled in).

    ``input_ids``/``attention_mask`` [B, P + R], ``response_mask`` [B, R] -> values [B, R], zero outside
    the response (N+ details: ``full_values[:, P - 1 : -1]``, aligned with the log-prob of token t).
    """
    b, r = response_mask.shape
    step = b if micro_batch_size is None else micro_batch_size
    chunks = []
    for start in range(0, b, step):
        full = value_model(input_ids[start : start + step], attention_mask[start : start + step])  # [b, P + R]
        chunks.append(full[:, prompt_length - 1 : prompt_length - 1 + r])
    values = torch.cat(chunks, dim=0)  # [B, R]
    return values.masked_fill(response_mask.to(values.device) == 0, 0.0)
