"""Replies to whole conversations with the generation engine: the text-in, text-out call of the methods that write
their own prompts (Constitutional AI's critique and revision requests, evaluation).

    generate = ChatGenerator(model, tokenizer, max_prompt_length=768, batch_size=32)
    replies = generate([[{"role": "user", "content": "Hi"}], ...], SamplingParams(max_new_tokens=48), seeds=[...])

Each conversation is rendered with the tokenizer's chat template (generation prompt added), left-truncated to
``max_prompt_length`` tokens, and sampled through :func:`alignkit.rollout.engine.generate_rollouts` in chunks of
``batch_size`` rows. ``seeds[i]`` makes conversation i's reply a function of that seed alone (row-seeded
sampling), whatever batch it shares.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from alignkit.config import DataConfig, GenerationSection
from alignkit.data.tokenize import tokenize_prompts
from alignkit.rollout.backends import make_backend
from alignkit.rollout.engine import SamplingParams, generate_rollouts
from alignkit.rollout.prompts import prompt_batch


class _Counting:
    """A generation backend that advances a progress bar by the rows of each call."""

    def __init__(self, backend, bar):
        self.backend, self.bar = backend, bar

    def generate(self, prompt_ids, prompt_mask, params, row_seeds=None):
        out = self.backend.generate(prompt_ids, prompt_mask, params, row_seeds)
        self.bar.update(prompt_ids.shape[0])
        return out


class ChatGenerator:
    def __init__(self, model, tokenizer, max_prompt_length: int = 768, batch_size: int = 32,
                 autocast_dtype: torch.dtype | None = None, backend: str = "hf", desc: str | None = "generate"):
        self.tokenizer, self.batch_size, self.max_prompt_length = tokenizer, batch_size, max_prompt_length
        self.engine = make_backend(GenerationSection(backend=backend), model, tokenizer, autocast_dtype)
        self.desc = desc
        """Progress-bar label (None: no bar); each call shows one bar over its conversations."""

    def __call__(self, conversations: list[list[dict]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[str]:
        """One reply per conversation (a list of ``{"role", "content"}`` messages ending with a user turn)."""
        if not conversations:
            return []
        data = DataConfig(train="<conversations>", max_prompt_length=self.max_prompt_length,
                          max_length=self.max_prompt_length + params.max_new_tokens)
        prompts, _ = tokenize_prompts([{"prompt": c} for c in conversations], self.tokenizer, data)
        batch = prompt_batch(prompts, self.tokenizer.pad_token_id)
        with tqdm(total=len(conversations), desc=self.desc, unit="reply", dynamic_ncols=True,
                  disable=self.desc is None) as bar:
            rollout = generate_rollouts(_Counting(self.engine, bar), self.tokenizer, batch["input_ids"],
                                        batch["attention_mask"], params, prompt_texts=batch["prompt_texts"], batch_size=self.batch_size,
                                        prompt_seeds=seeds)
        return [t.strip() for t in rollout.response_texts]
