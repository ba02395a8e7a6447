"""A local Hugging Face causal LM as a judge: it reads the normalised probabilities of the options "(A)"/"(B)".

The judging chat (:mod:`alignkit.judges.prompts`) is rendered with the model's own chat template, and the
assistant turn is opened with "The better response is (", so the next token is the option letter. For one item::

    P(first better) = P(A | ctx) / (P(A | ctx) + P(B | ctx)) = sigmoid(log P(A | ctx) − log P(B | ctx))

(Bai et al. 2022, Constitutional AI, Sec. 4.1: "we compute the log-probability of the responses (A) and (B)
and normalise"). The log-space form is exact and does not underflow.

Token ids (:func:`option_continuations`): the context is encoded with and without each letter appended; the
tokens where "ctx + A" and "ctx + B" part ways are the options. In most vocabularies (SmolLM2: "Ġ(" then "A";
the tiny test tokenizer: one token per character) these are one token each and a single forward pass reads
both from the last position. A tokenizer that merges "(" with the letter ("(A" one token) yields multi-token
continuations; then the summed log-prob of each continuation is compared instead (one forward per option).

Batches are LEFT-padded with position ids from the attention mask, so padding does not change a probability.
With ``chain_of_thought`` the model first writes its reasoning after "Let's think step by step:" (greedy, or
sampled at ``temperature``), then "Therefore, the better response is (" is appended and the letter is read;
the base class clamps those probabilities to [0.4, 0.6].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignkit.judges.base import Judge
from alignkit.judges.prompts import ANSWER_PREFIX, COT_ANSWER, COT_PREFIX, OPTIONS, judging_messages
from alignkit.ops.logprobs import forward_logits, sequence_logprobs
from alignkit.ops.seeds import derive_seed
from alignkit.rollout.engine import HFGenerateBackend, SamplingParams, generate_rollouts

RESAMPLE_TEMPERATURE = 1.0
"""Temperature of the reasoning when a chain-of-thought judge is asked again (``sample`` >= 1) but configured
greedy (``temperature`` 0)."""


def _pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)  # [B, T]
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)  # [B, T]
    return ids, mask


def option_continuations(tokenizer, context: str, options: Sequence[str] = OPTIONS) -> tuple[list[int], list[list[int]]]:
    """Split ``context + option`` into the shared token prefix and each option's continuation tokens.

    E.g. SmolLM2 with a context ending in " (": ``enc(ctx + "A") = enc(ctx) + [id("A")]``, so the prefix is
    ``enc(ctx)`` and the continuations ``[[id("A")], [id("B")]]``. When the tokenizer merges the last context
    characters with a letter, the prefix is shorter and the continuations carry the merged tokens.
    """
    encoded = [tokenizer.encode(context + opt, add_special_tokens=False) for opt in options]
    n = 0
    while all(n < len(e) for e in encoded) and len({e[n] for e in encoded}) == 1:
        n += 1
    conts = [e[n:] for e in encoded]
    if any(not c for c in conts):
        raise ValueError(f"the options {list(options)} are not distinguishable after tokenisation of the judge prompt")
    return encoded[0][:n], conts


class HFJudge(Judge):
    """Pairwise judge from a local causal LM (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, chain_of_thought: bool = False,
                 max_tokens: int = 256, temperature: float = 0.0, name: str = "hf", seed: int = 0):
        if tokenizer.padding_side != "left":
            tokenizer.padding_side = "left"
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.chain_of_thought = batch_size, chain_of_thought
        self.max_tokens, self.temperature, self.name, self.seed = max_tokens, temperature, name, seed
        self.deterministic = not chain_of_thought  # reading the option probabilities involves no sampling
        self._usage = {"requests": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0, "option_mass": 0.0}

    @classmethod
    def from_config(cls, cfg) -> "HFJudge":
        """Load ``cfg.model`` (``embedded``, ``tiny-random``, a local path, a hub id) like a policy, frozen."""
        from alignkit.config import ModelConfig
        from alignkit.models.loading import load_policy, load_tokenizer

        name = "smollm2-135m-instruct" if cfg.model == "embedded" else cfg.model
        tokenizer = load_tokenizer(name, padding_side="left")
        model = load_policy(ModelConfig(name_or_path=name), tokenizer, trainable=False)
        if torch.cuda.is_available():
            model = model.to("cuda")
        return cls(model, tokenizer, batch_size=cfg.batch_size, chain_of_thought=cfg.chain_of_thought,
                   max_tokens=cfg.max_tokens, temperature=cfg.temperature, name=f"hf:{cfg.model}")

    def usage(self) -> dict[str, float]:
        return dict(self._usage)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, prompt: str, first: str, second: str, principle: str) -> str:
        """The judge's context up to (and including) the assistant's opening words, as text."""
        messages = judging_messages(prompt, first, second, principle, self.chain_of_thought)
        chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + (COT_PREFIX if self.chain_of_thought else ANSWER_PREFIX)

    # ---------------------------------------------------------------- reading the options
    @torch.no_grad()
    def option_probabilities(self, contexts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For each context (ending right before the letter): (P(first better) [N], P(A) + P(B) [N], the
        probability mass the model puts on the two options at all). Contexts are batched in length order (less
        padding; the results do not depend on the batching) and returned in the callers' order."""
        if not contexts:
            return np.zeros(0), np.zeros(0)
        p_first, mass = [], []
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))  # similar lengths share a batch
        for start in range(0, len(contexts), self.batch_size):
            chunk = [contexts[i] for i in order[start:start + self.batch_size]]
            split = [option_continuations(self.tokenizer, c) for c in chunk]
            self._check_length(split)
            if all(len(cont) == 1 for _, conts in split for cont in conts):
                lp = self._next_token_logprobs(split)  # [b, 2]
            else:
                lp = self._continuation_logprobs(split)  # [b, 2]
            p_first.append(torch.sigmoid(lp[:, 0] - lp[:, 1]))  # [b]
            mass.append(lp.exp().sum(-1))  # [b]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))  # back to the callers' order
        return (torch.cat(p_first)[inverse].double().cpu().numpy(), torch.cat(mass)[inverse].double().cpu().numpy())

    def _check_length(self, split) -> None:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        longest = max(len(prefix) + max(len(c) for c in conts) for prefix, conts in split)
        if limit is not None and longest > limit:
            raise ValueError(f"judge {self.name}: a judging prompt has {longest} tokens, more than the model's "
                             f"{limit} positions; shorten the prompts/responses or use a judge with a longer context")

    def _next_token_logprobs(self, split) -> torch.Tensor:
        ids, mask = _pad_left([prefix for prefix, _ in split], self.tokenizer.pad_token_id)  # [b, T]
        logits = forward_logits(self.model, ids.to(self.device), mask.to(self.device), logits_to_keep=1)[:, -1]  # [b, V]
        logps = torch.log_softmax(logits.float(), dim=-1)  # [b, V]
        option_ids = torch.tensor([[cont[0] for cont in conts] for _, conts in split], device=logps.device)  # [b, 2]
        self._usage["requests"] += len(split)
        self._usage["prompt_tokens"] += float(mask.sum())
        return logps.gather(1, option_ids)  # [b, 2]

    def _continuation_logprobs(self, split) -> torch.Tensor:
        rows = [prefix + cont for prefix, conts in split for cont in conts]  # [2b] option-major per item
        ids, mask = _pad_left(rows, self.tokenizer.pad_token_id)  # [2b, T]
        lengths = [len(cont) for _, conts in split for cont in conts]
        response_mask = torch.zeros_like(mask)
        for r, k in enumerate(lengths):
            response_mask[r, -k:] = 1  # the continuation tokens are the last k columns (left padding)
        lp = sequence_logprobs(self.model, ids.to(self.device), mask.to(self.device), response_mask.to(self.device))
        self._usage["requests"] += len(split)
        self._usage["prompt_tokens"] += float(mask.sum())
        return lp.float().view(len(split), len(OPTIONS))  # [b, 2]

    # ---------------------------------------------------------------- chain of thought
    def _reason(self, contexts: list[str], sample: int) -> list[str]:
        """Generate each context's reasoning (greedy unless sampling)."""
        temperature = self.temperature if sample == 0 else (self.temperature or RESAMPLE_TEMPERATURE)
        params = SamplingParams(max_new_tokens=self.max_tokens, temperature=temperature or 1.0,
                                do_sample=temperature > 0)
        backend = HFGenerateBackend(self.model, self.tokenizer)
        out = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            ids, mask = _pad_left([self.tokenizer.encode(c, add_special_tokens=False) for c in chunk],
                                  self.tokenizer.pad_token_id)
            seeds = [derive_seed(self.seed, sample, start + i) for i in range(len(chunk))] if params.do_sample else None
            rollout = generate_rollouts(backend, self.tokenizer, ids.to(self.device), mask.to(self.device), params,
                                        prompt_texts=chunk, prompt_seeds=seeds)
            self._usage["completion_tokens"] += float(rollout.response_mask.sum())
            out += rollout.response_texts
        return out

    def prefer_first(self, prompts, first, second, principles, sample: int = 0) -> np.ndarray:
        contexts = [self.render(p, f, s, c) for p, f, s, c in zip(prompts, first, second, principles)]
        if self.chain_of_thought:
            reasons = self._reason(contexts, sample)
            contexts = [c + " " + r.strip() + COT_ANSWER for c, r in zip(contexts, reasons)]
        p_first, mass = self.option_probabilities(contexts)
        self._usage["option_mass"] += float(mass.sum())
        return p_first
