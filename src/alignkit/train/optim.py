"""The one optimizer + learning-rate schedule builder, shared by the offline loop and the online harness.

AdamW over the trainable parameters (or explicit parameter groups, e.g. PPO's policy and value model
with their own learning rates) and the ``train.scheduler`` schedule over ``total_steps`` optimizer steps,
with ``train.warmup_steps`` of linear warm-up for EVERY schedule (``constant`` included: it becomes
transformers' ``constant_with_warmup``, so warm-up is never silently ignored).
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_optimizer(params, train_cfg, total_steps: int):
    """(AdamW, LR scheduler) for ``params`` (``train.optimizer``: torch's default AdamW or its fused kernel): a module (its trainable parameters), a list of parameters,
    or a list of param-group dicts (``{"params": [...], "lr": ...}``; a group without ``lr`` uses ``train.lr``)."""
    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    optimizer = torch.optim.AdamW(
        groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), weight_decay=train_cfg.weight_decay,
        fused=True if train_cfg.optimizer == "adamw_fused" else None,
    )
    scheduler = get_scheduler(
        SCHEDULES[train_cfg.scheduler], optimizer, num_warmup_steps=train_cfg.warmup_steps,
        num_training_steps=max(int(total_steps), 1),
    )
    return optimizer, scheduler
