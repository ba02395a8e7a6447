"""A trained process reward model (PRM) as a scorer: step scores, solution scores, dense per-token rewards.

Lightman et al. (2023), Wang et al. (2024, Math-Shepherd): the PRM reads p_k = sigma(z_{s_k}) at the separator
s_k ending each step (sequences built by ``alignkit.data.tokenize.encode_steps``, as in training), and a solution's
score aggregates its steps:

    min:     min_k p_k          (Wang et al. 2024; a solution is as good as its worst step)
    product: prod_k p_k         (Lightman et al. 2023: the probability that every step is correct)
    last:    p_K                (the last step's score, which has seen the whole solution)

A completion without any step scores 0. ``PRMScorer`` is a reward function (``rewards.base.RewardFn``): the
aggregated score is a sequence reward for best-of-n, rejection sampling, GRPO, RLOO or PPO (reward component
``{type: prm, path: ..., aggregation: min}``). ``dense_step_rewards`` places per-step scores on the policy's own
response tokens for methods with per-token rewards (PPO's ``ops.advantages.kl_penalized_rewards``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from alignkit.data.tokenize import encode_steps, split_steps
from alignkit.ops.logprobs import position_ids_from_mask
from alignkit.ops.stats import last_index

PRM_CONFIG_ATTR = "alignkit_prm"
"""Saved in the PRM's config by ``alignkit prm``: ``{"separator": "\\n"}``."""


# ---------------------------------------------------------------- aggregations: [B, K] step scores -> [B]
def aggregate_min(p: Tensor, mask: Tensor) -> Tensor:
    """min_k p_k over real steps; p, mask [B, K] -> [B] (0 where a row has no step)."""
    has = mask.bool().any(-1)
    return torch.where(has, p.masked_fill(~mask.bool(), float("inf")).min(-1).values, torch.zeros_like(p[:, 0]))


def aggregate_product(p: Tensor, mask: Tensor) -> Tensor:
    """prod_k p_k over real steps; p, mask [B, K] -> [B] (0 where a row has no step)."""
    has = mask.bool().any(-1)
    return torch.where(has, p.masked_fill(~mask.bool(), 1.0).prod(-1), torch.zeros_like(p[:, 0]))


def aggregate_last(p: Tensor, mask: Tensor) -> Tensor:
    """p_K, the last real step's score; p, mask [B, K] -> [B] (0 where a row has no step)."""
    has = mask.bool().any(-1)
    rows = torch.arange(p.shape[0], device=p.device)
    return torch.where(has, p[rows, last_index(mask)], torch.zeros_like(p[:, 0]))


STEP_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "min": aggregate_min,
    "product": aggregate_product,
    "last": aggregate_last,
}


def pad_steps(scores: list[list[float]]) -> tuple[Tensor, Tensor]:
    """Ragged per-solution step scores -> ([B, K] scores, [B, K] mask), right-padded."""
    width = max([len(s) for s in scores] + [1])
    p = torch.zeros(len(scores), width)
    mask = torch.zeros(len(scores), width, dtype=torch.long)
    for i, s in enumerate(scores):
        p[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
        mask[i, : len(s)] = 1
    return p, mask


def aggregate_steps(scores: list[list[float]], how: str) -> Tensor:
    """[B] solution scores from ragged step scores by ``how`` in ``STEP_AGGREGATIONS``."""
    if how not in STEP_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {how!r}; expected one of {sorted(STEP_AGGREGATIONS)}")
    p, mask = pad_steps(scores)
    return STEP_AGGREGATIONS[how](p, mask)


# ---------------------------------------------------------------- the model
def token_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The PRM's logit at every position: [B, T]. Position ids come from the mask, so a row's logits are the same
    whether it is padded on the left or on the right."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    return out.logits[..., 0].float()


def prm_separator(model, default: str = "\n") -> str:
    """The step separator a PRM was trained with (stored in its config by ``alignkit prm``)."""
    plain = getattr(model, "module", model)
    stored = getattr(getattr(plain, "config", None), PRM_CONFIG_ATTR, None) or {}
    return stored.get("separator", default)


class PRMScorer:
    """A frozen token-classifier PRM used as a reward function (aggregated score) or a step scorer."""

    def __init__(self, model, tokenizer, aggregation: str = "min", separator: str | None = None,
                 batch_size: int = 16, name: str = "prm"):
        if aggregation not in STEP_AGGREGATIONS:
            raise ValueError(f"unknown step aggregation {aggregation!r}; expected one of {sorted(STEP_AGGREGATIONS)}")
        if batch_size < 1:
            raise ValueError(f"PRMScorer batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.aggregation, self.batch_size, self.name = aggregation, batch_size, name
        self.separator = separator if separator is not None else prm_separator(model)

    @torch.no_grad()
    def score_steps(self, prompts: list[str], steps: list[list[str]]) -> list[list[float]]:
        """p_k = sigma(z_{s_k}) for each step of each (rendered prompt, steps) row; [] for a row without steps."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [encode_steps(self.tokenizer, self.tokenizer(p, add_special_tokens=False)["input_ids"], s, self.separator)
                for p, s in zip(prompts, steps)]
        out: list[list[float]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, (seq, _) in enumerate(chunk):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            probs = torch.sigmoid(token_logits(self.model, ids.to(device), mask.to(device))).cpu()  # [b, T]
            out += [probs[i, ends].tolist() if ends else [] for i, (_, ends) in enumerate(chunk)]
        return out

    def score_completions(self, prompts: list[str], completions: list[str]) -> list[list[float]]:
        """Step scores of completions split on the separator (``data.tokenize.split_steps``)."""
        return self.score_steps(prompts, [split_steps(c, self.separator) for c in completions])

    def __call__(self, prompts: list[str], completions: list[str], extras: list[dict] | None = None) -> Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if not prompts:
            return torch.zeros(0)
        return aggregate_steps(self.score_completions(prompts, completions), self.aggregation)


def load_prm_scorer(path: str, aggregation: str = "min", batch_size: int = 16, name: str = "prm") -> PRMScorer:
    """Load a PRM written by ``alignkit prm`` (frozen, eval mode) and its tokenizer."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_prm_model, load_tokenizer, resolve_path

    tokenizer = load_tokenizer(path)
    model = load_prm_model(ModelConfig(name_or_path=path), tokenizer, trainable=False)
    archs = getattr(model.config, "architectures", None) or []
    if not any("TokenClassification" in a for a in archs):
        raise ValueError(f"{path!r} ({resolve_path(path)}) is not a process reward model checkpoint "
                         f"(architectures={archs}); its step head would be random. Train one with `alignkit prm`.")
    return PRMScorer(model, tokenizer, aggregation=aggregation, batch_size=batch_size, name=name)


# ---------------------------------------------------------------- dense rewards on the policy's tokens
def step_end_tokens(tokenizer, response_ids: list[int], separator: str = "\n") -> list[int]:
    """Indices of the policy's response tokens at which each non-empty step ends: the token whose decoded text
    completes the separator after the step, or the last token for a final step without a separator. Steps are
    those of ``split_steps`` on the decoded response, in order."""
    ends, text, step_open = [], "", False
    for t, tok in enumerate(response_ids):
        before = len(text)
        text = tokenizer.decode(response_ids[: t + 1], skip_special_tokens=True)
        new = text[before:]
        for j, ch in enumerate(new):
            # a separator completes inside this token: close the open step
            upto = text[: before + j + 1]
            if upto.endswith(separator):
                if step_open:
                    ends.append(t)
                step_open = False
            elif not ch.isspace():
                step_open = True
    if step_open and response_ids:
        ends.append(len(response_ids) - 1)
    return ends


def dense_step_rewards(step_rewards: list[list[float]], step_ends: list[list[int]], width: int) -> Tensor:
    """[B, width] per-token rewards: row i gets ``step_rewards[i][k]`` at response token ``step_ends[i][k]``, 0
    elsewhere (Lightman et al.'s per-step signal as a dense reward; Math-Shepherd sec. 3.3 step-by-step PPO).

    Added to PPO's per-token rewards r_t (``ops.advantages.kl_penalized_rewards``) in place of the single final
    score, GAE then credits each step with the rewards from it on. A step whose end lies past ``width`` is dropped.
    """
    if len(step_rewards) != len(step_ends):
        raise ValueError(f"{len(step_rewards)} rows of step rewards for {len(step_ends)} rows of step ends")
    out = torch.zeros(len(step_rewards), width)
    for i, (r, e) in enumerate(zip(step_rewards, step_ends)):
        if len(r) != len(e):
            raise ValueError(f"row {i}: {len(r)} step rewards for {len(e)} step ends")
        for value, t in zip(r, e):
            if t < width:
                out[i, t] += value
    return out


class PRMDenseReward:
    """Per-token PRM rewards of a rollout: ``coef * p_k`` at the policy's response token that ends step k
    (``step_end_tokens``), 0 elsewhere; [B, R] on CPU (``dense_step_rewards``). The PRM scores the steps of the
    decoded response (``split_steps``) after the rendered prompt; when the policy's own tokens split into a
    different number of steps (a decode quirk), the first min(both) steps are used."""

    def __init__(self, scorer: PRMScorer, policy_tokenizer, coef: float = 1.0):
        self.scorer, self.policy_tokenizer, self.coef = scorer, policy_tokenizer, float(coef)

    def __call__(self, rollout) -> Tensor:
        sep = self.scorer.separator
        responses = [ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
        ends = [step_end_tokens(self.policy_tokenizer, r, sep) for r in responses]
        scores = self.scorer.score_completions(rollout.prompt_texts, rollout.response_texts)
        k = [min(len(s), len(e)) for s, e in zip(scores, ends)]
        return self.coef * dense_step_rewards([s[:n] for s, n in zip(scores, k)], [e[:n] for e, n in zip(ends, k)],
                                              rollout.response_ids.shape[1])
