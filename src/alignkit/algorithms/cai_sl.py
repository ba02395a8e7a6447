"""SL-CAI: the supervised phase of Constitutional AI (Bai et al. 2022, arXiv 2212.08073, sec. 3).

For each red-team prompt x:

    y_0 = model(x)                                                   answer
    for r in 1..R:
        c_r ~ Uniform(principles)                                    seeded: the same draw for any batch size
        critique_r = model(few-shot, x, y_{r-1}, c_r.critique_request)
        y_r        = model(few-shot, x, y_{r-1}, c_r.critique_request, critique_r, c_r.revision_request)

then fine-tune on (x, y_R), mixed with helpfulness data (prompts answered by the model itself, as in the paper,
so harmlessness training does not make the model evasive). Each round shows the model only the latest response
(not the whole chain of earlier critiques): shorter prompts, the same fixed point.

Prompts are chat conversations: the few-shot examples of the constitution come first as complete exchanges
(user prompt, assistant response, user critique request, assistant critique, user revision request, assistant
revision), then the exchange being critiqued. Generation is batched across prompts (one engine call per stage
and round) with row seeds ``derive_seed(seed, prompt index, round, stage)``.

This module holds only the data flow; the fine-tuning is the ordinary SFT run (``alignkit.pipelines.cai``).
"""

from __future__ import annotations

import random
from typing import Callable

from alignkit.data.constitution import Constitution, FewShotExample, Principle
from alignkit.ops.seeds import derive_seed
from alignkit.rollout.engine import SamplingParams

Generate = Callable[[list[list[dict]], SamplingParams, list[int]], list[str]]
"""``generate(conversations, params, seeds) -> replies`` (e.g. :class:`alignkit.rollout.chat.ChatGenerator`)."""

ANSWER, CRITIQUE, REVISION = 0, 1, 2  # stage ids in the row seeds


def sample_principles(constitution: Constitution, n_prompts: int, rounds: int, seed: int) -> list[list[Principle]]:
    """[n_prompts][rounds] principles drawn uniformly with replacement; prompt i's draws depend only on (seed, i)."""
    out = []
    for i in range(n_prompts):
        rng = random.Random(derive_seed(seed, i))
        out.append([rng.choice(constitution.principles) for _ in range(rounds)])
    return out


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def few_shot_messages(examples: list[FewShotExample]) -> list[dict]:
    """The constitution's demonstrations as complete exchanges (6 messages each)."""
    messages: list[dict] = []
    for ex in examples:
        messages += [_user(ex.prompt), _assistant(ex.response), _user(ex.critique_request), _assistant(ex.critique),
                     _user(ex.revision_request), _assistant(ex.revision)]
    return messages


def critique_conversation(few_shot: list[dict], prompt: str, response: str, principle: Principle) -> list[dict]:
    """Few-shot exchanges, then the prompt, the response and the principle's critique request (a user turn)."""
    return [*few_shot, _user(prompt), _assistant(response), _user(principle.critique_request)]


def revision_conversation(few_shot: list[dict], prompt: str, response: str, principle: Principle,
                          critique: str) -> list[dict]:
    """The critique conversation, the critique, then the principle's revision request."""
    return [*critique_conversation(few_shot, prompt, response, principle), _assistant(critique or "(no critique)"),
            _user(principle.revision_request)]


def critique_and_revise(generate: Generate, prompts: list[str], constitution: Constitution, rounds: int, seed: int,
                        answer_params: SamplingParams, critique_params: SamplingParams,
                        revision_params: SamplingParams, few_shot: int = 2) -> list[dict]:
    """Answer every prompt, then ``rounds`` x (critique, revision), batched across prompts. Returns one trace per
    prompt: ``{"prompt", "answer", "rounds": [{"principle", "critique_request", "critique", "revision_request",
    "revision"}], "final"}``. An empty revision keeps the previous response as ``final`` (``kept_previous``)."""
    shots = few_shot_messages(constitution.examples[:few_shot])
    n = len(prompts)
    principles = sample_principles(constitution, n, rounds, seed)
    answers = generate([[_user(p)] for p in prompts], answer_params, [derive_seed(seed, i, 0, ANSWER) for i in range(n)])
    traces = [{"prompt": p, "answer": a, "rounds": []} for p, a in zip(prompts, answers)]
    current = list(answers)
    for r in range(rounds):
        round_principles = [principles[i][r] for i in range(n)]
        critiques = generate(
            [critique_conversation(shots, p, y, c) for p, y, c in zip(prompts, current, round_principles)],
            critique_params, [derive_seed(seed, i, r + 1, CRITIQUE) for i in range(n)])
        revisions = generate(
            [revision_conversation(shots, p, y, c, k) for p, y, c, k in zip(prompts, current, round_principles, critiques)],
            revision_params, [derive_seed(seed, i, r + 1, REVISION) for i in range(n)])
        for i in range(n):
            c = round_principles[i]
            traces[i]["rounds"].append({"principle": c.name, "critique_request": c.critique_request,
                                        "critique": critiques[i], "revision_request": c.revision_request,
                                        "revision": revisions[i], "kept_previous": not revisions[i].strip()})
            if revisions[i].strip():
                current[i] = revisions[i]
    for trace, final in zip(traces, current):
        trace["final"] = final
    return traces


def sft_mix(traces: list[dict], helpful: list[dict], helpful_ratio: float, seed: int) -> list[dict]:
    """SFT records ``{"prompt", "completion", "kind"}``: every (prompt, final revision) plus
    ``round(helpful_ratio * len(traces))`` helpfulness pairs (``helpful``: ``{"prompt", "completion"}``), shuffled."""
    rows = [{"prompt": t["prompt"], "completion": t["final"], "kind": "revision"} for t in traces if t["final"].strip()]
    k = min(len(helpful), round(helpful_ratio * len(traces)))
    rows += [{"prompt": h["prompt"], "completion": h["completion"], "kind": "helpful"}
             for h in helpful[:k] if h["completion"].strip()]
    random.Random(seed).shuffle(rows)
    return rows
