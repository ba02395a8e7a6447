"""Constitutions for Constitutional AI (Bai et al. 2022): a readable, versioned YAML file.

    constitution = load_constitution()                      # alignkit's default (data/constitutions/default.yaml)
    constitution = load_constitution("my_constitution.yaml")

Fields (see the default file for a full example):

* ``name``, ``version`` (string), optional ``description``;
* ``principles``: non-empty list of ``{name, critique_request, revision_request}`` (SL-CAI: one is sampled per
  critique round);
* ``judging_principles``: non-empty list of strings, pairwise questions such as "Which response is more helpful,
  honest and harmless?" (RL-CAI: one is sampled per comparison);
* ``examples``: few-shot critique/revision demonstrations ``{prompt, response, critique_request, critique,
  revision_request, revision}`` shown before every critique and revision request (may be empty).

A malformed file raises :class:`ConstitutionError` naming the file, the line and the field, e.g.
``my.yaml, line 14, field principles[2].revision_request: Field required``. Lines come from the YAML node
marks (``yaml.compose``), so a field missing from a mapping points at that mapping's first line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONSTITUTION = Path(__file__).parent / "constitutions" / "default.yaml"


class ConstitutionError(ValueError):
    """A constitution file is missing, not YAML, or has a bad field (the message names file, line, field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return " ".join(v.split())  # YAML folded blocks keep a trailing newline; one line of text reads better


class Principle(_Strict):
    name: str
    critique_request: str
    revision_request: str

    _text = field_validator("name", "critique_request", "revision_request")(_not_blank)


class FewShotExample(_Strict):
    prompt: str
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str

    _text = field_validator("*")(_not_blank)


class Constitution(_Strict):
    name: str
    version: str
    description: str = ""
    principles: list[Principle] = Field(min_length=1)
    judging_principles: list[Annotated[str, AfterValidator(_not_blank)]] = Field(min_length=1)
    examples: list[FewShotExample] = []
    source: str = ""
    """The file it was read from (set by :func:`load_constitution`)."""

    _text = field_validator("name", "version")(_not_blank)

    @field_validator("principles")
    @classmethod
    def _unique(cls, v: list[Principle]) -> list[Principle]:
        names = [p.name for p in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"principle names must be unique; repeated: {', '.join(dup)}")
        return v


def _node_at(root: yaml.Node, loc: tuple[Any, ...]) -> yaml.Node:
    """The deepest YAML node along a pydantic error location (mapping keys, sequence indices)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not match:
                return node
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution (default: alignkit's own). Errors name the file, line and field."""
    path = Path(path) if path else DEFAULT_CONSTITUTION
    if not path.is_file():
        raise ConstitutionError(f"constitution file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConstitutionError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or root is None:
        raise ConstitutionError(f"{path}, line 1: a constitution is a mapping with name, version, principles, "
                                f"judging_principles and examples; got {type(data).__name__}")
    try:
        return Constitution.model_validate({**data, "source": str(path)})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
            node = _node_at(root, loc)
            what = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"{path}, line {node.start_mark.line + 1}, field {_field_name(loc)}: {what}")
        raise ConstitutionError("invalid constitution:\n  " + "\n  ".join(lines)) from None
