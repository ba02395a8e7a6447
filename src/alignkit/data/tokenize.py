"""Turn normalised examples into token ids with an exact prompt/response split.

A sequence is ``prompt_ids + response_ids`` where

* ``prompt_ids`` tokenises ``render_prompt(...)`` (the chat template with the generation prompt);
* ``response_ids`` tokenises ``completion + tokenizer.eos_token`` (EOS is part of the response,
  so the model learns to stop);

each tokenised separately with ``add_special_tokens=False`` and concatenated, so no token
merges across the boundary and ``response_mask`` (1 on response tokens, EOS included) is exact.

Truncation policy (counted in ``TruncationStats`` and logged with ``summary()``):

1. if ``data.max_prompt_length`` is set, a longer prompt keeps its LAST ``max_prompt_length``
   tokens (left truncation: the end of the prompt, next to the response, matters most);
2. a prompt that still has ``>= data.max_length`` tokens leaves no room for a response: a
   ``DataError`` naming the record's file/line and field ``prompt`` (skipped with ``on_error=skip``);
3. the response is cut from the right to fit ``max_length`` (a cut response loses its EOS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from alignkit.data.io import DataError, unit_for

MAX_REASONS = 20


@dataclass
class TruncationStats:
    """Token-length bookkeeping for one tokenisation pass.

    ``max_prompt_tokens`` and ``max_total_tokens`` are measured BEFORE truncation, so they say
    which ``max_prompt_length``/``max_length`` would have kept everything.
    """

    n_examples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    max_prompt_tokens: int = 0
    max_total_tokens: int = 0
    n_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (
            f"tokenised {self.n_examples} examples: {self.prompts_truncated} prompts truncated (left), "
            f"{self.responses_truncated} responses truncated (right); longest prompt {self.max_prompt_tokens} "
            f"tokens, longest prompt+response {self.max_total_tokens} tokens"
        )
        if self.n_skipped:
            line += f"; {self.n_skipped} skipped (prompt too long)"
        return line


@dataclass(frozen=True)
class _Prompt:
    text: str  # rendered prompt, before truncation
    ids: list[int]  # after left truncation
    n_tokens: int  # before truncation
    truncated: bool


# ---------------------------------------------------------------- text
PROMPT_MESSAGES_KEY = "prompt_messages"
"""Key of an RL prompt's ``extras`` holding its messages (reward functions receive it with the other fields)."""


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """``system_prompt`` prepended as a system message when given and the messages have none."""
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], system_prompt: str | None = None) -> str:
    """The prompt text that precedes the response.

    With a chat template: ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``,
    ``system_prompt`` being prepended as a system message when given and the messages have none.
    Without one (base models), the plain fallback joins the contents, each followed by a blank
    line: ``"".join(m["content"] + "\\n\\n" for m in messages)``.
    """
    messages = with_system_prompt(messages, system_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(m["content"] + "\n\n" for m in messages)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS added by the tokenizer (special tokens in the text are kept)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer: Any, completion: str) -> list[int]:
    """``completion + eos_token`` as ids: the EOS is a response token, trained on."""
    return encode(tokenizer, completion + (tokenizer.eos_token or ""))


def tokenize_pair(
    tokenizer: Any, prompt_ids: list[int], response_ids: list[int], max_length: int
) -> tuple[list[int], list[int], bool]:
    """Concatenate ``prompt_ids + response_ids``, cutting the response from the right to fit ``max_length``.

    Returns ``(input_ids, response_mask, truncated)``; ``response_mask`` is 0 on the prompt and 1 on
    the kept response tokens. The prompt must leave room for at least one response token.
    """
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room for the response (max_length {max_length})")
    kept = response_ids[:room]
    input_ids = list(prompt_ids) + list(kept)
    response_mask = [0] * len(prompt_ids) + [1] * len(kept)
    return input_ids, response_mask, len(kept) < len(response_ids)


def _where(ex: dict[str, Any]) -> tuple[str, int | None, str]:
    source = ex.get("_source", "<examples>")
    return source, ex.get("_line"), unit_for(source)


def _encode_prompt(ex: dict[str, Any], tokenizer: Any, data_cfg: Any) -> _Prompt:
    """Render + tokenise the prompt, left-truncate to ``max_prompt_length``, check it leaves room."""
    text = render_prompt(tokenizer, ex["prompt"], getattr(data_cfg, "system_prompt", None))
    ids = encode(tokenizer, text)
    n_tokens, max_prompt = len(ids), getattr(data_cfg, "max_prompt_length", None)
    truncated = max_prompt is not None and n_tokens > max_prompt
    if truncated:
        ids = ids[-max_prompt:]  # keep the tail: the last turn and the generation prompt
    if len(ids) >= data_cfg.max_length:
        source, line, unit = _where(ex)
        raise DataError(
            source, line, "prompt",
            f"prompt leaves no room for the response ({len(ids)} prompt tokens, max_length {data_cfg.max_length}); "
            "set data.max_prompt_length to truncate prompts from the left",
            unit=unit,
        )
    return _Prompt(text, ids, n_tokens, truncated)


def _record(stats: TruncationStats, prompt: _Prompt, responses: list[tuple[int, bool]]) -> None:
    """Count one example: its prompt and its (response length, truncated) list."""
    stats.n_examples += 1
    stats.prompts_truncated += int(prompt.truncated)
    stats.responses_truncated += sum(int(t) for _, t in responses)
    stats.max_prompt_tokens = max(stats.max_prompt_tokens, prompt.n_tokens)
    stats.max_total_tokens = max(stats.max_total_tokens, *(prompt.n_tokens + n for n, _ in responses))


def _map(
    examples: list[dict[str, Any]], data_cfg: Any, one: Callable[[dict[str, Any], TruncationStats], dict[str, Any]]
) -> tuple[list[dict[str, Any]], TruncationStats]:
    """Apply ``one`` to each example; a ``DataError`` raises or, with ``on_error=skip``, is counted."""
    stats, out = TruncationStats(), []
    skip = getattr(data_cfg, "on_error", "raise") == "skip"
    for ex in examples:
        try:
            out.append(one(ex, stats))
        except DataError as e:
            if not skip:
                raise
            stats.n_skipped += 1
            if len(stats.skipped_reasons) < MAX_REASONS:
                stats.skipped_reasons.append(str(e))
    return out, stats


# ---------------------------------------------------------------- per kind
def tokenize_sft(examples: list[dict[str, Any]], tokenizer: Any, data_cfg: Any) -> tuple[list[dict], TruncationStats]:
    """SFT examples -> ``{"input_ids", "response_mask"}`` (mask 1 on completion + EOS)."""

    def one(ex: dict[str, Any], stats: TruncationStats) -> dict[str, Any]:
        prompt = _encode_prompt(ex, tokenizer, data_cfg)
        response_ids = encode_response(tokenizer, ex["completion"])
        input_ids, response_mask, cut = tokenize_pair(tokenizer, prompt.ids, response_ids, data_cfg.max_length)
        _record(stats, prompt, [(len(response_ids), cut)])
        return {"input_ids": input_ids, "response_mask": response_mask}

    return _map(examples, data_cfg, one)


def _category(ex: dict[str, Any]) -> str | None:
    """A pair's category (``category``, or BIG-bench HHH's ``subset``): multi-objective reward heads, per-category
    accuracy."""
    value = ex.get("category", ex.get("subset"))
    return None if value is None else str(value)


def tokenize_preference(
    examples: list[dict[str, Any]], tokenizer: Any, data_cfg: Any
) -> tuple[list[dict], TruncationStats]:
    """Preference pairs -> chosen/rejected ids and masks sharing one prompt, plus ``group``, ``margin``
    (0.0 when absent), ``label_prob`` (P(chosen better); 1.0 when absent), ``prompt_text`` (the rendered prompt
    before truncation) and ``category`` (or None)."""

    def one(ex: dict[str, Any], stats: TruncationStats) -> dict[str, Any]:
        prompt = _encode_prompt(ex, tokenizer, data_cfg)
        chosen_ids = encode_response(tokenizer, ex["chosen"])
        rejected_ids = encode_response(tokenizer, ex["rejected"])
        c_ids, c_mask, c_cut = tokenize_pair(tokenizer, prompt.ids, chosen_ids, data_cfg.max_length)
        r_ids, r_mask, r_cut = tokenize_pair(tokenizer, prompt.ids, rejected_ids, data_cfg.max_length)
        _record(stats, prompt, [(len(chosen_ids), c_cut), (len(rejected_ids), r_cut)])
        return {
            "chosen_input_ids": c_ids,
            "chosen_response_mask": c_mask,
            "rejected_input_ids": r_ids,
            "rejected_response_mask": r_mask,
            "group": int(ex.get("group", 0)),
            "margin": float(ex.get("margin", 0.0)),
            "label_prob": float(ex.get("label_prob", 1.0)),
            "prompt_text": prompt.text,
            "category": _category(ex),
        }

    return _map(examples, data_cfg, one)


def tokenize_kto(examples: list[dict[str, Any]], tokenizer: Any, data_cfg: Any) -> tuple[list[dict], TruncationStats]:
    """KTO examples -> ``{"input_ids", "response_mask", "label", "prompt_input_ids", "completion_input_ids",
    "max_length"}``. ``prompt_input_ids`` (after left truncation) and the untruncated ``completion_input_ids``
    let the KTO trainer (``algorithms.kto.add_mismatched_pairs``) build the mismatched (x_i, y_{i+1}) rows of
    the KL estimate, cut to ``max_length``."""

    def one(ex: dict[str, Any], stats: TruncationStats) -> dict[str, Any]:
        prompt = _encode_prompt(ex, tokenizer, data_cfg)
        completion_ids = encode_response(tokenizer, ex["completion"])
        input_ids, response_mask, cut = tokenize_pair(tokenizer, prompt.ids, completion_ids, data_cfg.max_length)
        _record(stats, prompt, [(len(completion_ids), cut)])
        return {
            "input_ids": input_ids,
            "response_mask": response_mask,
            "label": bool(ex["label"]),
            "prompt_input_ids": prompt.ids,
            "completion_input_ids": completion_ids,
            "max_length": data_cfg.max_length,
        }

    return _map(examples, data_cfg, one)


def tokenize_prompts(
    examples: list[dict[str, Any]], tokenizer: Any, data_cfg: Any
) -> tuple[list[dict], TruncationStats]:
    """RL prompts -> ``{"prompt_input_ids", "prompt_text", "extras"}``; ``extras`` holds the record's other
    fields (e.g. ``answer``) for reward functions, plus the prompt's messages under ``"prompt_messages"``.
    The prompt must leave room to generate (``< max_length``)."""

    def one(ex: dict[str, Any], stats: TruncationStats) -> dict[str, Any]:
        prompt = _encode_prompt(ex, tokenizer, data_cfg)
        _record(stats, prompt, [(0, False)])
        extras = {k: v for k, v in ex.items() if k != "prompt" and not k.startswith("_")}
        # the prompt as messages, so a reward model with another tokenizer can render it in its own format
        extras.setdefault(PROMPT_MESSAGES_KEY, with_system_prompt(ex["prompt"], getattr(data_cfg, "system_prompt", None)))
        return {"prompt_input_ids": prompt.ids, "prompt_text": prompt.text, "extras": extras}

    return _map(examples, data_cfg, one)


# ---------------------------------------------------------------- stepwise (process reward models)
# A stepwise sequence is ``prompt_ids + enc(step_1) + enc(sep) + enc(step_2) + enc(sep) + ...``: each step is
# tokenised on its own and followed by the separator's tokens, so the position where a PRM reads step k's score
# (the LAST separator token after step k, ``step_ends[k]``) is exact, whatever the tokenizer would merge across a
# boundary. Training (``tokenize_stepwise``) and scoring (``alignkit.rewards.prm``) build sequences this way.
def split_steps(text: str, separator: str = "\n") -> list[str]:
    """The steps of a solution: ``text`` split on ``separator``, each stripped, empty ones dropped.

    "7 + 5 = 12\\n\\n12 * 3 = 36\\n" -> ["7 + 5 = 12", "12 * 3 = 36"].
    """
    if not separator:
        raise ValueError("the step separator must be a non-empty string")
    return [s.strip() for s in text.split(separator) if s.strip()]


def encode_steps(tokenizer: Any, prompt_ids: list[int], steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """``(input_ids, step_ends)``: prompt + each step followed by the separator; ``step_ends[k]`` is the index of
    the last separator token after step k (where its score is read)."""
    sep_ids = encode(tokenizer, separator)
    if not sep_ids:
        raise ValueError(f"the step separator {separator!r} encodes to no tokens")
    ids, ends = list(prompt_ids), []
    for step in steps:
        ids += encode(tokenizer, step) + sep_ids
        ends.append(len(ids) - 1)
    return ids, ends


def tokenize_stepwise(
    examples: list[dict[str, Any]], tokenizer: Any, data_cfg: Any
) -> tuple[list[dict], TruncationStats]:
    """Stepwise examples -> ``{"input_ids", "step_ends", "labels"}`` (labels as floats in [0, 1]); the separator is
    ``data_cfg.step_separator`` (default newline).

    A solution longer than ``max_length`` keeps its first steps that fit (a cut step would have no separator to
    score); a label outside [0, 1] is a ``DataError`` naming the record and field ``labels[k]``.
    """

    separator = getattr(data_cfg, "step_separator", "\n")

    def one(ex: dict[str, Any], stats: TruncationStats) -> dict[str, Any]:
        labels = []
        for k, lab in enumerate(ex["labels"]):
            value = float(lab)
            if not 0.0 <= value <= 1.0:
                source, line, unit = _where(ex)
                raise DataError(source, line, f"labels[{k}]", f"expected a bool or a number in [0, 1] (the "
                                f"probability the step is correct), got {lab!r}", unit=unit)
            labels.append(value)
        prompt = _encode_prompt(ex, tokenizer, data_cfg)
        ids, ends = encode_steps(tokenizer, prompt.ids, ex["steps"], separator)
        kept = sum(1 for e in ends if e < data_cfg.max_length)
        if kept == 0:
            source, line, unit = _where(ex)
            raise DataError(source, line, "steps[0]", f"the first step does not fit in max_length "
                            f"{data_cfg.max_length} after a {len(prompt.ids)}-token prompt", unit=unit)
        cut = kept < len(ends)
        _record(stats, prompt, [(len(ids) - len(prompt.ids), cut)])
        return {"input_ids": ids[: ends[kept - 1] + 1], "step_ends": ends[:kept], "labels": labels[:kept]}

    return _map(examples, data_cfg, one)
