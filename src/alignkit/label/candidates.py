"""Candidates files: the prompts and K responses that a labelling project is made from.

One JSON object per line (or any source :func:`alignkit.data.io.read_records` reads)::

    {"prompt": "Write a haiku about rain.", "responses": ["...", "..."], "models": ["sft", "dpo"]}

* ``prompt``: a non-empty string or a list of ``{"role", "content"}`` messages (as in every alignkit format);
* ``responses``: a list of at least 2 distinct non-empty strings (1 is enough for a ``binary`` project);
* ``models`` (optional): one name per response, e.g. which policy wrote it. Never shown to annotators (labelling
  is blind); kept in the database and in exports;
* ``gold`` (optional): the known answer, making the record a gold question (see :func:`gold_label`).

``alignkit sample`` writes this format. Every error names the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from alignkit.data.io import DataError, Record, read_records, type_name

TASKS = ("pairwise", "ranking", "binary")
PAIR_CHOICES = ("0", "1", "tie", "both_bad")
"""A pairwise label, in the stored order of the pair: response 0 better, response 1 better, tie, both bad."""


@dataclass(frozen=True)
class Candidate:
    prompt: Any  # str or list of messages, as in the file
    responses: list[str]
    models: list[str] | None
    gold: Any  # None, or the answer in stored form (see gold_label)
    line: int


def _error(record: Record, field: str | None, what: str) -> DataError:
    return DataError(record.source, record.line, field, what, unit=record.unit)


def _check_text(record: Record, value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _error(record, field, f"expected a non-empty string, got {type_name(value)}")
    if not value.strip():
        raise _error(record, field, "expected a non-empty string, got an empty or whitespace-only string")
    return value


def _check_prompt(record: Record, value: Any) -> Any:
    if isinstance(value, str):
        return _check_text(record, value, "prompt")
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise _error(record, f"prompt[{i}]", f'expected a message {{"role", "content"}}, got {type_name(m)}')
            if m.get("role") not in ("system", "user", "assistant"):
                raise _error(record, f"prompt[{i}].role", f"expected system, user or assistant, got {m.get('role')!r}")
            _check_text(record, m.get("content"), f"prompt[{i}].content")
        return value
    raise _error(record, "prompt", f"expected a non-empty string or a list of messages, got {type_name(value)}")


def gold_label(record: Record, task: str, gold: Any, k: int) -> Any:
    """The gold answer in stored form, checked against the task.

    * pairwise (exactly 2 responses): ``0`` or ``1``, the index of the better response -> ``"0"``/``"1"``;
    * ranking: a list of K ranks, 1 = best (a permutation of 1..K) -> the list;
    * binary: a list of K bools, true = good -> the list.
    """
    if task == "pairwise":
        if k != 2:
            raise _error(record, "gold", f"a pairwise gold question needs exactly 2 responses, got {k}")
        if isinstance(gold, bool) or gold not in (0, 1):
            raise _error(record, "gold", f"expected 0 or 1 (the index of the better response), got {gold!r}")
        return str(gold)
    if task == "ranking":
        if not isinstance(gold, list) or sorted(gold) != list(range(1, k + 1)) or any(isinstance(g, bool) for g in gold):
            raise _error(record, "gold", f"expected a permutation of 1..{k} (the rank of each response, 1 = best), "
                         f"got {gold!r}")
        return list(gold)
    if not isinstance(gold, list) or len(gold) != k or not all(isinstance(g, bool) for g in gold):
        raise _error(record, "gold", f"expected a list of {k} bools (true = good, one per response), got {gold!r}")
    return list(gold)


def parse_candidate(record: Record, task: str) -> Candidate:
    d = record.data
    for name in ("prompt", "responses"):
        if name not in d:
            raise _error(record, name, "missing required field; expected "
                         '{"prompt", "responses": [...], "models": [...] (optional), "gold" (optional)}')
    prompt = _check_prompt(record, d["prompt"])
    responses = d["responses"]
    need = 1 if task == "binary" else 2
    if not isinstance(responses, list) or len(responses) < need:
        got = f"{len(responses)} responses" if isinstance(responses, list) else type_name(responses)
        raise _error(record, "responses", f"expected a list of at least {need} responses for a {task} project, got {got}")
    texts = [_check_text(record, r, f"responses[{i}]") for i, r in enumerate(responses)]
    if task != "binary" and len(set(texts)) < len(texts):
        i = next(i for i, t in enumerate(texts) if texts.index(t) != i)
        raise _error(record, f"responses[{i}]", f"identical to responses[{texts.index(texts[i])}]; the responses of "
                     "a prompt must differ to be compared")
    models = d.get("models")
    if models is not None:
        if not isinstance(models, list) or len(models) != len(texts) or not all(isinstance(m, str) for m in models):
            raise _error(record, "models", f"expected a list of {len(texts)} strings (one model name per response), "
                         f"got {models!r}")
    gold = gold_label(record, task, d["gold"], len(texts)) if d.get("gold") is not None else None
    return Candidate(prompt, texts, models, gold, record.line)


def load_candidates(path: str, task: str) -> list[Candidate]:
    """Read and validate a candidates file for a ``task`` project; raises ``DataError`` naming line and field."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    records = read_records(path)
    if not records:
        raise DataError(path, None, None, "contains no records (the file is empty)")
    return [parse_candidate(r, task) for r in records]


def candidate_line(prompt: Any, responses: list[str], models: list[str] | None = None) -> str:
    """One line of a candidates file (what ``alignkit sample`` writes)."""
    record: dict[str, Any] = {"prompt": prompt, "responses": responses}
    if models is not None:
        record["models"] = models
    return json.dumps(record, ensure_ascii=False) + "\n"
