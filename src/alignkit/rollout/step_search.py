"""Step-level beam search guided by a step scorer (a process reward model).

Lightman et al. (2023) and Snell et al. (2024, "Scaling LLM Test-Time Compute", sec. 5.2) search over steps: each
beam is expanded by sampling candidate next steps (text up to the step separator), every candidate prefix is scored
by the PRM, and the top-b prefixes are kept; a beam that writes its final step (or stops) is finished and keeps its
score. The search needs two functions, so it runs the same with a model or a scripted stub:

    expand(prefixes: list[str], k: int) -> list[list[tuple[str, bool]]]   k (next step, solution ends) per prefix
    score(prompts: list[str], steps: list[list[str]]) -> list[float]       one score per partial solution

``sampled_step_expander`` builds ``expand`` from a generation backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from alignkit.rollout.engine import SamplingParams, generate_rollouts

Expand = Callable[[list[str], int], list[list[tuple[str, bool]]]]
Score = Callable[[list[str], list[list[str]]], list[float]]


@dataclass
class Beam:
    steps: list[str] = field(default_factory=list)
    score: float = float("-inf")
    done: bool = False


def prefix_text(prompt: str, steps: list[str], separator: str) -> str:
    """The text a policy continues: the rendered prompt, then each step followed by the separator."""
    return prompt + "".join(s + separator for s in steps)


def step_beam_search(
    prompts: list[str], expand: Expand, score: Score, beam_width: int, expand_per_beam: int, max_steps: int,
    separator: str = "\n",
) -> list[Beam]:
    """The best beam per prompt after at most ``max_steps`` steps (ties keep the earlier candidate).

    Each round: every unfinished beam of every prompt is expanded into ``expand_per_beam`` candidates in ONE
    ``expand`` call and ONE ``score`` call; each prompt then keeps its top ``beam_width`` among its finished beams
    and the new candidates (duplicates merged). Unfinished beams after ``max_steps`` rounds compete as they are.
    """
    if beam_width < 1 or expand_per_beam < 1 or max_steps < 1:
        raise ValueError(f"beam_width, expand_per_beam and max_steps must be >= 1, got {beam_width}, "
                         f"{expand_per_beam}, {max_steps}")
    beams: list[list[Beam]] = [[Beam()] for _ in prompts]
    for _ in range(max_steps):
        open_ = [(i, b) for i, bs in enumerate(beams) for b in bs if not b.done]
        if not open_:
            break
        proposals = expand([prefix_text(prompts[i], b.steps, separator) for i, b in open_], expand_per_beam)
        cands: list[tuple[int, Beam]] = []
        for (i, b), props in zip(open_, proposals):
            for step, ends in props:
                if step.strip():
                    cands.append((i, Beam(b.steps + [step.strip()], done=ends)))
                else:  # the policy stopped without a new step: the beam is finished as it is
                    cands.append((i, Beam(list(b.steps), b.score, done=True)))
        fresh = [(i, c) for i, c in cands if c.score == float("-inf")]
        if fresh:
            values = score([prompts[i] for i, _ in fresh], [c.steps for _, c in fresh])
            for (_, c), v in zip(fresh, values):
                c.score = float(v)
        for i in range(len(prompts)):
            pool = [b for b in beams[i] if b.done] + [c for j, c in cands if j == i]
            unique: dict[tuple, Beam] = {}
            for b in pool:
                unique.setdefault((tuple(b.steps), b.done), b)
            ranked = sorted(unique.values(), key=lambda b: -b.score)  # stable: earlier candidates win ties
            beams[i] = ranked[:beam_width] or beams[i]
    return [max(bs, key=lambda b: b.score) if bs else Beam() for bs in beams]


def sampled_step_expander(backend, tokenizer, params: SamplingParams, separator: str = "\n",
                          device: torch.device | None = None) -> Expand:
    """``expand`` from a generation backend: sample k continuations of each prefix and keep each one's first step
    (the text before the separator); the solution ends there if nothing follows in the sample (EOS or the token
    budget reached without another separator)."""

    def expand(prefixes: list[str], k: int) -> list[list[tuple[str, bool]]]:
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prefixes]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # [N, P] left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        rollout = generate_rollouts(backend, tokenizer, ids, mask, params, num_samples=k, prompt_texts=prefixes)
        out = []
        for i in range(len(prefixes)):
            props = []
            for text in rollout.response_texts[i * k : (i + 1) * k]:
                text = text.lstrip(separator) if separator.strip() == "" else text
                head, sep, rest = text.partition(separator)
                props.append((head.strip(), not sep or not rest.strip()))
            out.append(props)
        return out

    return expand
