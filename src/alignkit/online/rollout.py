"""Scored rollouts: what every online method samples, and the one function that produces them.

    scored = sample_and_score(backend, tokenizer, prompts, seeds, num_samples, params, reward, reward_cfg, device)

generate -> decode -> every reward component -> missing-EOS penalty -> per-component metrics, in that order,
for PPO, GRPO, RLOO, REINFORCE++, online DPO, rejection sampling and best-of-n alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.rewards.combine import apply_missing_eos_penalty
from alignkit.rollout.engine import Rollout, SamplingParams, generate_rollouts
from alignkit.rollout.prompts import prompt_batch


# ---------------------------------------------------------------- rollout rows
def trim_padding(rollout: Rollout) -> Rollout:
    """Drop prompt columns that are padding in every row (left) and response columns that are padding in
    every row (right). Real tokens and their log-probs are unchanged (position ids come from the mask)."""
    first = int(rollout.prompt_mask.any(dim=0).long().argmax()) if rollout.prompt_mask.numel() else 0
    width = int(rollout.response_mask.sum(dim=1).max()) if len(rollout) else 0
    return Rollout(
        prompt_ids=rollout.prompt_ids[:, first:], prompt_mask=rollout.prompt_mask[:, first:],
        response_ids=rollout.response_ids[:, :width], response_mask=rollout.response_mask[:, :width],
        has_eos=rollout.has_eos, prompt_texts=rollout.prompt_texts, response_texts=rollout.response_texts,
        extras=rollout.extras,
    )


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    """The rollout restricted to ``rows`` (in that order), padding trimmed."""
    return trim_padding(rollout.select(rows))


def _pad_cols(x: Tensor, width: int, value: int, left: bool) -> Tensor:
    extra = width - x.shape[1]
    return F.pad(x, (extra, 0) if left else (0, extra), value=value)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts row-wise: prompts re-padded on the LEFT, responses on the RIGHT."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len(rollouts) == 1:
        return rollouts[0]
    p = max(r.prompt_ids.shape[1] for r in rollouts)
    w = max(r.response_ids.shape[1] for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([_pad_cols(r.prompt_ids, p, pad_token_id, True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_cols(r.prompt_mask, p, 0, True) for r in rollouts]),
        response_ids=torch.cat([_pad_cols(r.response_ids, w, pad_token_id, False) for r in rollouts]),
        response_mask=torch.cat([_pad_cols(r.response_mask, w, 0, False) for r in rollouts]),
        has_eos=torch.cat([r.has_eos for r in rollouts]),
        prompt_texts=[t for r in rollouts for t in r.prompt_texts],
        response_texts=[t for r in rollouts for t in r.response_texts],
        extras=[e for r in rollouts for e in r.extras],
    )


@dataclass
class ScoredRollout:
    """A rollout with its scores: ``scores`` [B] the raw combined reward, ``parts`` its named components
    (``rewards/<name>`` -> [B]), ``rewards`` [B] what the advantages are computed from (scores plus shaping
    such as the missing-EOS penalty). All on CPU, rows in rollout order (group-contiguous)."""

    rollout: Rollout
    scores: Tensor
    rewards: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rollout)

    def select(self, rows: list[int]) -> "ScoredRollout":
        idx = torch.tensor(rows, dtype=torch.long)
        return ScoredRollout(select_rows(self.rollout, rows), self.scores[idx], self.rewards[idx],
                             {k: v[idx] for k, v in self.parts.items()})

    @staticmethod
    def concat(batches: list["ScoredRollout"], pad_token_id: int) -> "ScoredRollout":
        return ScoredRollout(
            concat_rollouts([b.rollout for b in batches], pad_token_id),
            torch.cat([b.scores for b in batches]),
            torch.cat([b.rewards for b in batches]),
            {k: torch.cat([b.parts[k] for b in batches]) for k in batches[0].parts},
        )

    def stats(self) -> dict[str, float]:
        """scores (mean raw reward), rewards/<name>, response_length, no_eos_frac."""
        r = self.rollout
        out = {"scores": float(self.scores.mean())}
        out.update({k: float(v.mean()) for k, v in self.parts.items()})
        out["response_length"] = float(r.response_lengths.float().mean())
        out["no_eos_frac"] = float((~r.has_eos.bool()).float().mean())
        return out


def equal_reward_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B*G] group-contiguous rewards -> [B] bool, True where all G rewards of a group are equal
    (their group advantages are 0: the group carries no policy-gradient signal)."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    return (grouped == grouped[:, :1]).all(dim=1)


# ---------------------------------------------------------------- sample and score
def sample_and_score(
    backend,
    tokenizer,
    prompts: list[dict],
    prompt_seeds: list[int] | None,
    num_samples: int,
    params: SamplingParams,
    reward,
    reward_cfg,
    device: torch.device,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
) -> ScoredRollout:
    """Sample ``num_samples`` completions of each prompt (group-contiguous rows) and score them.

    ``reward(prompts, completions, extras) -> (total [B], {"rewards/<name>": [B]})`` (a ``CombinedReward``:
    it names the component that raises or returns a non-finite value); ``reward_cfg`` holds the missing-EOS
    penalty. ``batch_size``: prompts per ``generate()`` call. ``prompt_seeds``: see ``generate_rollouts``.
    ``timings``: seconds spent are added to its ``generation`` and ``scoring`` entries.
    """
    t0 = time.perf_counter()
    batch = prompt_batch(prompts, tokenizer.pad_token_id)
    rollout = generate_rollouts(
        backend, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device), params,
        num_samples=num_samples, prompt_texts=batch["prompt_texts"], extras=batch["extras"],
        batch_size=None if batch_size is None else batch_size * num_samples, prompt_seeds=prompt_seeds,
    )
    t1 = time.perf_counter()
    scores, parts = reward(rollout.prompt_texts, rollout.response_texts, rollout.extras)  # [B]
    rewards = apply_missing_eos_penalty(scores, rollout.has_eos.cpu(), reward_cfg.missing_eos_penalty,
                                        reward_cfg.missing_eos_mode)
    if timings is not None:
        timings["generation"] = timings.get("generation", 0.0) + t1 - t0
        timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - t1
    return ScoredRollout(rollout, scores, rewards, parts)
