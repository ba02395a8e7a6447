"""Validate raw records once and normalise them to one schema per kind of data.

    examples, stats = load_examples("prefs.jsonl", "preference")

Accepted record formats (TRL-compatible; extra fields are always kept and passed through):

* ``sft``: ``{"prompt", "completion"}`` or ``{"messages": [...]}`` (the last message must be
  the assistant's: it is the completion, the earlier messages are the prompt).
* ``preference``: ``{"prompt", "chosen", "rejected"}`` (strings, or message lists where
  chosen/rejected hold the assistant turn); TRL's implicit-prompt style
  ``{"chosen": [...], "rejected": [...]}`` (full conversations; their common message prefix
  is the prompt); ranked ``{"prompt", "responses": [...], "ranking": [...]}`` where
  ``ranking[i]`` is the rank of ``responses[i]`` and **1 is best**: a permutation of 1..K, where tied
  responses may share a rank (every rank in 1..K, and some response ranks 1). It expands to all
  K-choose-2 pairs (tied ranks give no pair). An optional number ``margin`` is kept, and an optional soft label
  ``label_prob`` in [0, 1] (the probability that chosen is better, e.g. from an AI judge; reward models then train
  on the soft Bradley-Terry loss).
* ``kto``: ``{"prompt", "completion", "label": bool}`` (in CSV, a label cell may read true/false, 1/0 or
  yes/no, in any case).
* ``prompt``: ``{"prompt", ...}``; the other fields (e.g. ``"answer"``) go to reward functions.
* ``stepwise``: ``{"prompt", "steps": [...], "labels": [...]}`` (process supervision).

A prompt is a string or a list of ``{"role": "system"|"user"|"assistant", "content": str}``
messages; a string prompt becomes ``[{"role": "user", "content": s}]``.

Normalised examples (``_source``/``_line`` keep the record's origin for later errors):

* sft: ``{"prompt": messages, "completion": str, **extras}``
* preference: ``{"prompt": messages, "chosen": str, "rejected": str, "group": int, **extras}``;
  ``group`` is the 0-based index of the source record, shared by all pairs of one ranking.
* kto: ``{"prompt": messages, "completion": str, "label": bool, **extras}``
* prompt: ``{"prompt": messages, **extras}``
* stepwise: ``{"prompt": messages, "steps": list[str], "labels": list[bool|int|float], **extras}``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Literal

from alignkit.data.io import DataError, Record, read_records, type_name

Kind = Literal["sft", "preference", "kto", "prompt", "stepwise"]
ROLES = ("system", "user", "assistant")
MAX_REASONS = 20

ACCEPTED_FORMATS: dict[str, str] = {
    "sft": '{"prompt", "completion"} or {"messages": [..., {"role": "assistant", ...}]}',
    "preference": '{"prompt", "chosen", "rejected"}, {"chosen": [messages], "rejected": [messages]} '
    '(implicit prompt) or {"prompt", "responses": [...], "ranking": [...]}',
    "kto": '{"prompt", "completion", "label": true|false}',
    "prompt": '{"prompt", ...extra fields}',
    "stepwise": '{"prompt", "steps": [...], "labels": [...]}',
}


@dataclass
class LoadStats:
    """Counts from ``load_examples``; ``n_kept``/``n_skipped`` count source records (not pairs)."""

    n_read: int = 0
    n_kept: int = 0
    n_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    """The first ``MAX_REASONS`` error messages of skipped records."""
    n_pairs_from_rankings: int = 0

    def summary(self) -> str:
        line = f"read {self.n_read} records, kept {self.n_kept}, skipped {self.n_skipped} malformed"
        if self.n_pairs_from_rankings:
            line += f", {self.n_pairs_from_rankings} pairs from rankings"
        return line


# ---------------------------------------------------------------- field checks
class _Ctx:
    """Where a record came from: builds ``DataError``s naming file, line/row and field."""

    def __init__(self, record: Record):
        self.record = record

    def error(self, field_name: str | None, what: str) -> DataError:
        r = self.record
        return DataError(r.source, r.line, field_name, what, unit=r.unit)

    def require(self, data: dict[str, Any], name: str) -> Any:
        if name not in data:
            raise self.error(name, "missing required field")
        return data[name]


def _text(ctx: _Ctx, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ctx.error(name, f"expected a non-empty string, got {type_name(value)}")
    if not value.strip():
        raise ctx.error(name, "expected a non-empty string, got an empty or whitespace-only string")
    return value


def _messages(ctx: _Ctx, value: Any, name: str) -> list[dict[str, Any]]:
    """A non-empty list of ``{"role", "content"}`` messages (extra message keys are kept)."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type_name(value)
        raise ctx.error(name, f"expected a non-empty list of messages, got {got}")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise ctx.error(where, f'expected a message {{"role", "content"}}, got {type_name(m)}')
        if "role" not in m:
            raise ctx.error(f"{where}.role", "missing required field")
        if m["role"] not in ROLES:
            raise ctx.error(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {m['role']!r}")
        if "content" not in m:
            raise ctx.error(f"{where}.content", "missing required field (a message needs content)")
        _text(ctx, m["content"], f"{where}.content")
        out.append(dict(m))
    return out


def _prompt(ctx: _Ctx, value: Any, name: str = "prompt") -> list[dict[str, Any]]:
    """A prompt: a non-empty string (becomes one user message) or a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(ctx, value, name)}]
    if isinstance(value, list):
        return _messages(ctx, value, name)
    raise ctx.error(name, f"expected a non-empty string or a list of messages, got {type_name(value)}")


def _response(ctx: _Ctx, value: Any, name: str) -> str:
    """A response: a non-empty string or a list holding exactly one assistant message."""
    if isinstance(value, str):
        return _text(ctx, value, name)
    if isinstance(value, list):
        msgs = _messages(ctx, value, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            roles = [m["role"] for m in msgs]
            raise ctx.error(name, f"expected exactly one assistant message, got roles {roles}")
        return msgs[0]["content"]
    raise ctx.error(name, f"expected a non-empty string or a list with one assistant message, got {type_name(value)}")


def _number(ctx: _Ctx, value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(name, f"expected a number, got {type_name(value)} {value!r}")
    return float(value)


TRUE_STRINGS = ("true", "1", "yes", "y", "t")
FALSE_STRINGS = ("false", "0", "no", "n", "f")


def _bool(ctx: _Ctx, value: Any, name: str, meaning: str) -> bool:
    """A bool; in a CSV file (cells are strings) also its usual spellings, case-insensitive:
    true/false, 1/0, yes/no (y/n, t/f)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and str(ctx.record.source).lower().endswith(".csv"):
        word = value.strip().lower()
        if word in TRUE_STRINGS:
            return True
        if word in FALSE_STRINGS:
            return False
        raise ctx.error(name, f"expected a bool ({meaning}; in CSV: true/false, 1/0 or yes/no), got str {value!r}")
    raise ctx.error(name, f"expected a bool ({meaning}), got {type_name(value)} {value!r}")


def _extras(data: dict[str, Any], used: tuple[str, ...], record: Record) -> dict[str, Any]:
    extras = {k: v for k, v in data.items() if k not in used}
    extras["_source"], extras["_line"] = record.source, record.line
    return extras


# ---------------------------------------------------------------- one normaliser per kind
def normalise_sft(record: Record, index: int) -> list[dict[str, Any]]:
    ctx, d = _Ctx(record), record.data
    if "messages" in d:
        if "prompt" in d or "completion" in d:
            raise ctx.error("messages", "use either 'messages' or 'prompt'/'completion', not both")
        msgs = _messages(ctx, d["messages"], "messages")
        last = len(msgs) - 1
        if msgs[-1]["role"] != "assistant":
            raise ctx.error(f"messages[{last}].role", f"expected the last message to be 'assistant', got {msgs[-1]['role']!r}")
        if last == 0:
            raise ctx.error("messages", "expected at least one prompt message before the final assistant message")
        return [{"prompt": msgs[:-1], "completion": msgs[-1]["content"], **_extras(d, ("messages",), record)}]
    if "prompt" in d or "completion" in d:
        prompt = _prompt(ctx, ctx.require(d, "prompt"))
        completion = _response(ctx, ctx.require(d, "completion"), "completion")
        return [{"prompt": prompt, "completion": completion, **_extras(d, ("prompt", "completion"), record)}]
    raise ctx.error(None, f"matches no SFT format; expected {ACCEPTED_FORMATS['sft']}")


def _implicit_prompt(ctx: _Ctx, chosen: Any, rejected: Any) -> tuple[list[dict], str, str]:
    """TRL implicit-prompt style: full conversations; the shared message prefix is the prompt."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise ctx.error("prompt", f"missing required field (needed when '{name}' is a {type_name(value)}, "
                            "not a full conversation)")
    c, r = _messages(ctx, chosen, "chosen"), _messages(ctx, rejected, "rejected")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n == 0:
        raise ctx.error("prompt", "missing required field, and chosen/rejected share no first message "
                        "to use as the implicit prompt")
    if n == len(c) or n == len(r):
        raise ctx.error("rejected", "chosen and rejected conversations have no differing final assistant turn "
                        "(identical, or one is a prefix of the other)")
    return c[:n], _response(ctx, c[n:], "chosen"), _response(ctx, r[n:], "rejected")


def _ranked_pairs(ctx: _Ctx, d: dict[str, Any]) -> list[tuple[str, str]]:
    """All K-choose-2 (chosen, rejected) pairs; ``ranking[i]`` is the rank of ``responses[i]``, 1 = best."""
    responses, ranking = ctx.require(d, "responses"), ctx.require(d, "ranking")
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"{len(responses)} responses" if isinstance(responses, list) else type_name(responses)
        raise ctx.error("responses", f"expected a list of at least 2 responses, got {got}")
    texts = [_response(ctx, r, f"responses[{i}]") for i, r in enumerate(responses)]
    if not isinstance(ranking, list):
        raise ctx.error("ranking", f"expected a list of integer ranks (1 = best), got {type_name(ranking)}")
    if len(ranking) != len(texts):
        raise ctx.error("ranking", f"expected one rank per response ({len(texts)}), got {len(ranking)} ranks")
    k = len(texts)
    for i, rank in enumerate(ranking):
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ctx.error(f"ranking[{i}]", f"expected an integer rank (1 = best), got {type_name(rank)} {rank!r}")
    if any(not 1 <= rank <= k for rank in ranking) or min(ranking) != 1:
        # scores given where ranks are expected would silently invert the pairs (a higher score is a worse rank)
        raise ctx.error("ranking", f"expected a permutation of 1..{k}, the rank of each response (1 = best; tied "
                        f"responses may share a rank), got {ranking}; scores (higher = better) are not ranks")
    pairs = []
    for i, j in combinations(range(len(texts)), 2):
        if ranking[i] == ranking[j]:
            continue  # a tie carries no preference
        w, lo = (i, j) if ranking[i] < ranking[j] else (j, i)
        if texts[w] == texts[lo]:
            raise ctx.error("responses", f"responses[{w}] and responses[{lo}] are identical but ranked differently")
        pairs.append((texts[w], texts[lo]))
    if not pairs:
        raise ctx.error("ranking", "all responses are tied; a ranking needs at least two different ranks")
    return pairs


def normalise_preference(record: Record, index: int) -> list[dict[str, Any]]:
    ctx, d = _Ctx(record), record.data
    if "responses" in d or "ranking" in d:
        prompt = _prompt(ctx, ctx.require(d, "prompt"))
        pairs = _ranked_pairs(ctx, d)
        used: tuple[str, ...] = ("prompt", "responses", "ranking")
    elif "chosen" in d or "rejected" in d:
        chosen, rejected = ctx.require(d, "chosen"), ctx.require(d, "rejected")
        if "prompt" in d:
            prompt = _prompt(ctx, d["prompt"])
            pair = (_response(ctx, chosen, "chosen"), _response(ctx, rejected, "rejected"))
        else:
            prompt, *pair = _implicit_prompt(ctx, chosen, rejected)
        if pair[0] == pair[1]:
            raise ctx.error("rejected", "identical to chosen; a preference pair needs two different responses")
        pairs, used = [tuple(pair)], ("prompt", "chosen", "rejected")
    else:
        raise ctx.error(None, f"matches no preference format; expected {ACCEPTED_FORMATS['preference']}")
    extras = _extras(d, used, record)
    if "margin" in extras:
        extras["margin"] = _number(ctx, extras["margin"], "margin")
    if "label_prob" in extras:
        extras["label_prob"] = _number(ctx, extras["label_prob"], "label_prob")
        if not 0.0 <= extras["label_prob"] <= 1.0:
            raise ctx.error("label_prob", f"expected a probability in [0, 1] that chosen is better, got "
                                          f"{extras['label_prob']!r}")
    return [{"prompt": prompt, "chosen": c, "rejected": r, "group": index, **extras} for c, r in pairs]


def normalise_kto(record: Record, index: int) -> list[dict[str, Any]]:
    ctx, d = _Ctx(record), record.data
    if not any(k in d for k in ("prompt", "completion", "label")):
        raise ctx.error(None, f"matches no KTO format; expected {ACCEPTED_FORMATS['kto']}")
    prompt = _prompt(ctx, ctx.require(d, "prompt"))
    completion = _response(ctx, ctx.require(d, "completion"), "completion")
    label = _bool(ctx, ctx.require(d, "label"), "label", "true = desirable, false = undesirable")
    return [{"prompt": prompt, "completion": completion, "label": label,
             **_extras(d, ("prompt", "completion", "label"), record)}]


def normalise_prompt(record: Record, index: int) -> list[dict[str, Any]]:
    ctx, d = _Ctx(record), record.data
    if "prompt" not in d:
        raise ctx.error("prompt", f"missing required field; expected {ACCEPTED_FORMATS['prompt']}")
    return [{"prompt": _prompt(ctx, d["prompt"]), **_extras(d, ("prompt",), record)}]


def normalise_stepwise(record: Record, index: int) -> list[dict[str, Any]]:
    ctx, d = _Ctx(record), record.data
    if not any(k in d for k in ("steps", "labels")):
        raise ctx.error(None, f"matches no stepwise format; expected {ACCEPTED_FORMATS['stepwise']}")
    prompt = _prompt(ctx, ctx.require(d, "prompt"))
    steps, labels = ctx.require(d, "steps"), ctx.require(d, "labels")
    if not isinstance(steps, list) or not steps:
        got = "an empty list" if isinstance(steps, list) else type_name(steps)
        raise ctx.error("steps", f"expected a non-empty list of strings, got {got}")
    steps = [_text(ctx, s, f"steps[{i}]") for i, s in enumerate(steps)]
    if not isinstance(labels, list):
        raise ctx.error("labels", f"expected a list with one label per step, got {type_name(labels)}")
    if len(labels) != len(steps):
        raise ctx.error("labels", f"expected one label per step ({len(steps)} steps), got {len(labels)} labels")
    for i, lab in enumerate(labels):
        if not isinstance(lab, (bool, int, float)):
            raise ctx.error(f"labels[{i}]", f"expected a bool or a number, got {type_name(lab)} {lab!r}")
    return [{"prompt": prompt, "steps": steps, "labels": list(labels),
             **_extras(d, ("prompt", "steps", "labels"), record)}]


NORMALISERS: dict[str, Callable[[Record, int], list[dict[str, Any]]]] = {
    "sft": normalise_sft,
    "preference": normalise_preference,
    "kto": normalise_kto,
    "prompt": normalise_prompt,
    "stepwise": normalise_stepwise,
}


# ---------------------------------------------------------------- entry points
def normalise_records(
    records: list[Record], kind: Kind, on_error: str = "raise", limit: int | None = None
) -> tuple[list[dict[str, Any]], LoadStats]:
    """Validate ``records`` as ``kind``; ``on_error="skip"`` drops (and counts) malformed ones.

    ``limit`` keeps the examples of the first ``limit`` valid records (applied after validation,
    so a malformed record anywhere still raises). All pairs of one ranking stay together.
    """
    if kind not in NORMALISERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(NORMALISERS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    normalise = NORMALISERS[kind]
    stats = LoadStats(n_read=len(records))
    examples: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        try:
            produced = normalise(record, index)
        except DataError as e:
            if on_error == "raise":
                raise
            stats.n_skipped += 1
            if len(stats.skipped_reasons) < MAX_REASONS:
                stats.skipped_reasons.append(str(e))
            continue
        stats.n_kept += 1
        if kind == "preference" and ("responses" in record.data or "ranking" in record.data):
            stats.n_pairs_from_rankings += len(produced)
        if limit is None or stats.n_kept <= limit:
            examples.extend(produced)
    return examples, stats


def load_examples(
    spec: str,
    kind: Kind,
    on_error: str = "raise",
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], LoadStats]:
    """Read ``spec`` (see ``alignkit.data.io.read_records``) and validate every record as ``kind``.

    Returns normalised examples (schema in the module docstring) and ``LoadStats``. Raises
    ``DataError`` naming file, line/row and field for the first malformed record (``on_error="raise"``),
    and naming the file when it holds no records or no valid record.
    """
    records = read_records(spec, split)
    if not records:
        raise DataError(spec, None, None, "contains no records (the file is empty)")
    examples, stats = normalise_records(records, kind, on_error=on_error, limit=limit)
    if not examples:
        first = stats.skipped_reasons[0] if stats.skipped_reasons else "none"
        raise DataError(
            spec, None, None, f"has no valid {kind} examples ({stats.n_skipped} of {stats.n_read} records "
            f"skipped as malformed; first: {first})"
        )
    return examples, stats
