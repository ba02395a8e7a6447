"""The reference policy pi_ref, decided in one place for every algorithm.

Three kinds, one interface (``Reference.logprobs``):

- ``adapters_off``: under LoRA, pi_ref is the policy itself with its adapters disabled (no second copy);
- ``frozen``: a frozen copy of the initial policy (full fine-tuning), or a separate checkpoint;
- ``precomputed``: log-probs computed once before training (offline methods; the model is then freed).

    ref = Reference.of_policy(policy)                       # LoRA -> adapters_off, else a frozen copy
    ref_logprobs = ref.logprobs(token_logprobs, input_ids, attention_mask, temperature=0.7)

``logprobs(fn, *args, **kwargs)`` runs ``fn(model, *args, **kwargs)`` (any log-prob function of the ops or
rollout layer) under ``torch.no_grad()``, in eval mode, with the adapters disabled when that is the kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from alignkit.models.loading import copy_frozen, is_peft, reference_context


class Reference:
    def __init__(self, kind: str, model=None, values: Any = None):
        if kind not in ("adapters_off", "frozen", "precomputed"):
            raise ValueError(f"Reference kind must be adapters_off, frozen or precomputed, got {kind!r}")
        self.kind, self.model, self.values = kind, model, values

    @classmethod
    def of_policy(cls, policy, ref_model=None, copy: bool = True) -> "Reference":
        """pi_ref for a policy about to be trained: ``ref_model`` if given (frozen), else the adapter-disabled
        policy under LoRA, else a frozen copy of the policy's current (initial) weights. ``copy=False`` uses the
        policy itself instead of a copy: valid only until its first update (to precompute log-probs)."""
        if ref_model is not None:
            ref_model.requires_grad_(False)
            return cls("frozen", ref_model.eval())
        unwrapped = getattr(policy, "module", policy)
        if is_peft(unwrapped):
            return cls("adapters_off", policy)
        return cls("frozen", copy_frozen(unwrapped) if copy else policy)

    @classmethod
    def precomputed(cls, values: Any) -> "Reference":
        """Log-probs computed before training (e.g. stored on each example); ``logprobs`` is then not available."""
        return cls("precomputed", values=values)

    def __repr__(self) -> str:
        return {"adapters_off": "adapter-disabled policy", "frozen": "frozen copy",
                "precomputed": "precomputed log-probs"}[self.kind]

    def to(self, device) -> "Reference":
        if self.kind == "frozen":
            self.model.to(device)
        return self

    def context(self):
        """The context in which ``self.model`` computes pi_ref (adapters off under LoRA)."""
        return reference_context(self.model) if self.kind == "adapters_off" else contextlib.nullcontext()

    def precompute(self, examples: list[dict], collate_fn: Callable[[list[dict]], dict], fn: Callable,
                   keys: tuple[str, ...], batch_size: int, amp: Callable = contextlib.nullcontext,
                   map_fn: Callable | None = None) -> None:
        """Store ``fn(pi_ref, collate_fn(chunk))`` (a tuple of [b] tensors, one per key) on each example under
        ``keys``, in chunks of ``batch_size`` under ``amp()``; ``map_fn(compute, examples)`` may share the work out
        over processes (``train.loop.map_over_processes``). Offline methods then read them from their batches."""
        device = next(self.model.parameters()).device

        def compute(chunk: list[dict]) -> list[tuple[float, ...]]:
            out: list[tuple[float, ...]] = []
            for start in range(0, len(chunk), batch_size):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in collate_fn(chunk[start : start + batch_size]).items()}
                with amp():
                    values = self.logprobs(fn, batch)  # tuple of [b]
                out += zip(*(v.tolist() for v in values))
            return out

        results = map_fn(compute, examples) if map_fn is not None else compute(examples)
        for e, values in zip(examples, results, strict=True):
            e.update(zip(keys, values))

    @torch.no_grad()
    def logprobs(self, fn: Callable, *args, **kwargs):
        """``fn(model, *args, **kwargs)`` evaluated as pi_ref (no grad, eval mode, adapters off if LoRA)."""
        if self.kind == "precomputed":
            raise RuntimeError("this reference holds precomputed log-probs; read them from .values")
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context():
                return fn(self.model, *args, **kwargs)
        finally:
            self.model.train(was_training)
