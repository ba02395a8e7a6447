"""Prompts for online methods: load once, then draw batches in a seeded, resumable order."""

from __future__ import annotations

import torch

from alignkit.config import DataConfig, RLDataConfig
from alignkit.data.collate import collate_prompts
from alignkit.data.formats import load_examples
from alignkit.data.tokenize import tokenize_prompts
from alignkit.ops.seeds import derive_seed


def _as_data_config(rl: RLDataConfig, max_new_tokens: int, spec: str) -> DataConfig:
    return DataConfig(
        train=spec,
        max_length=rl.max_prompt_length + max_new_tokens,
        max_prompt_length=rl.max_prompt_length,
        on_error=rl.on_error,
        system_prompt=rl.system_prompt,
    )


def load_prompts(rl: RLDataConfig, tokenizer, max_new_tokens: int, split: str = "train", log=print) -> list[dict]:
    """``[{"prompt_input_ids", "prompt_text", "extras"}]`` from ``rl.train`` (or ``rl.eval`` for split="eval")."""
    spec = rl.train if split == "train" else rl.eval
    if not spec:
        if split == "train":
            raise ValueError("data.train is not set: give a prompt file or builtin:<name>")
        return []
    limit = rl.limit if split == "train" else rl.eval_limit
    raw, stats = load_examples(spec, "prompt", on_error=rl.on_error, split="train" if split == "train" else "test",
                               limit=limit)
    if stats.n_skipped:
        log(f"data.on_error=skip: skipped {stats.n_skipped} of {stats.n_read} prompt records in {spec}")
    prompts, tstats = tokenize_prompts(raw, tokenizer, _as_data_config(rl, max_new_tokens, spec))
    log(f"{split} prompts: {len(prompts)} from {spec}; {tstats.summary()}")
    return prompts


class PromptSampler:
    """Endless epochs over the prompts, each a fresh permutation of (seed, epoch); ``state_dict`` for resume."""

    def __init__(self, prompts: list[dict], seed: int) -> None:
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.prompts, self.seed = prompts, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next(self, n: int) -> list[dict]:
        return self.next_with_positions(n)[0]

    def next_with_positions(self, n: int) -> tuple[list[dict], list[tuple[int, int]]]:
        """The next ``n`` prompts and the (epoch, position) of each draw: a unique key to seed its samples."""
        out, positions = [], []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self.prompts[self._order[self.pos]])
            positions.append((self.epoch, self.pos))
            self.pos += 1
        return out, positions

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


def prompt_batch(prompts: list[dict], pad_token_id: int) -> dict:
    """Left-padded ``input_ids``/``attention_mask`` + ``prompt_texts`` + ``extras`` for generation."""
    batch = collate_prompts(prompts, pad_token_id)
    batch["prompt_texts"] = [p["prompt_text"] for p in prompts]
    return batch
