"""Choose the generation engine from the config (``generation.backend``): algorithms never name one.

    backend = make_backend(cfg.generation, model, tokenizer, autocast_dtype)
    raw = backend.generate(prompt_ids, prompt_mask, params, row_seeds)   # [B, R]
    backend.update_weights(model)   # after every policy update (a no-op for ``hf``, which samples the live model)
"""

from __future__ import annotations

import torch

from alignkit.config import GenerationSection
from alignkit.rollout.engine import GenerationBackend, HFGenerateBackend


def make_backend(gen: GenerationSection, model, tokenizer, autocast_dtype: torch.dtype | None = None) -> GenerationBackend:
    """The engine ``gen.backend`` names, sampling from ``model`` (the trainer's policy)."""
    if gen.backend == "hf":
        return HFGenerateBackend(model, tokenizer, autocast_dtype, gen.cache_implementation)
    if gen.backend == "vllm":
        from alignkit.rollout.vllm import VLLMBackend

        return VLLMBackend(gen, model, tokenizer)
    raise ValueError(f"generation.backend must be 'hf' or 'vllm', got {gen.backend!r}")
