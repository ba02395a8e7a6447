"""Rule-based and user-defined rewards: verifiable answers, format, length, gold sentiment.

Every reward here follows :class:`alignkit.rewards.base.RewardFn`:
``(prompts, completions, extras) -> [B] float32``. A user function (``type: callable``) is written as
``score(prompts, completions, **fields)`` instead (:class:`alignkit.rewards.base.UserRewardFn`);
:class:`CallableReward` adapts it.
"""

from __future__ import annotations

import inspect
import math
import re
from fractions import Fraction
from typing import Callable

import torch
from torch import Tensor

from alignkit.rewards.base import USER_REWARD_SIGNATURE, RewardSpecError, as_reward_tensor, load_callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _parse_number(text: str) -> Fraction | None:
    """'1,234' -> 1234, '-0.5' -> -1/2, '3/4' -> 3/4; None if not a number."""
    s = str(text).strip().replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        try:
            f = float(s)
        except ValueError:
            return None
        return Fraction(f) if math.isfinite(f) else None


def last_number(text: str) -> Fraction | None:
    """The final number written in ``text`` (None if there is none)."""
    found = _NUMBER.findall(text)
    return _parse_number(found[-1]) if found else None


def _require(extras: list[dict], key: str, reward: str, batch_size: int) -> list:
    if len(extras) != batch_size:
        raise ValueError(f"{reward}: got {len(extras)} extras for {batch_size} completions")
    values = []
    for i, e in enumerate(extras):
        if key not in e:
            raise ValueError(
                f"{reward} needs the field {key!r} in each prompt record; row {i} has only {sorted(e)}"
            )
        values.append(e[key])
    return values


def arithmetic_reward(prompts: list[str], completions: list[str], extras: list[dict]) -> Tensor:
    """1.0 if the completion's last number equals ``extras[i]["answer"]`` exactly, else 0.0.

    Numbers are compared as exact rationals ("4" == "4.0" == "8/2"); an answer that is not a
    number is compared as a stripped string with the completion's last line. A verifier in the
    style of reasoning_gym's ``basic_arithmetic`` (binary: right or wrong, no partial credit).
    """
    answers = _require(extras, "answer", "arithmetic_reward", len(completions))
    out = []
    for completion, answer in zip(completions, answers):
        target = _parse_number(answer)
        if target is None:
            lines = completion.strip().splitlines()
            out.append(float(bool(lines) and lines[-1].strip() == str(answer).strip()))
        else:
            out.append(float(last_number(completion) == target))
    return torch.tensor(out, dtype=torch.float32)


arithmetic_reward.name = "arithmetic"  # type: ignore[attr-defined]


class FormatReward:
    """1.0 if ``re.search(pattern, completion)`` matches, else 0.0 (DeepSeek-R1-style format reward)."""

    def __init__(self, pattern: str, name: str = "format"):
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise RewardSpecError(f"format reward: invalid regex {pattern!r}: {e}") from None
        self.pattern = pattern
        self.name = name

    def __call__(
        self, prompts: list[str], completions: list[str], extras: list[dict] | None = None
    ) -> Tensor:
        return torch.tensor(
            [float(self.regex.search(c) is not None) for c in completions], dtype=torch.float32
        )


class LengthReward:
    """r = -|len(y) - L| / L for a target length L (tokens with a tokenizer, else characters)."""

    def __init__(self, target_length: int, tokenizer=None, name: str = "length"):
        if target_length <= 0:
            raise RewardSpecError(f"length reward: target_length must be > 0, got {target_length}")
        self.target_length = target_length
        self.tokenizer = tokenizer
        self.name = name

    def length(self, completion: str) -> int:
        if self.tokenizer is None:
            return len(completion)
        return len(self.tokenizer(completion, add_special_tokens=False)["input_ids"])

    def __call__(
        self, prompts: list[str], completions: list[str], extras: list[dict] | None = None
    ) -> Tensor:
        lengths = torch.tensor([self.length(c) for c in completions], dtype=torch.float32)  # [B]
        return -(lengths - self.target_length).abs() / self.target_length


class VaderReward:
    """Gold sentiment: VADER compound score of the completion, in [-1, 1] (Hutto & Gilbert 2014)."""

    def __init__(self, name: str = "vader"):
        self.name = name

    def __call__(
        self, prompts: list[str], completions: list[str], extras: list[dict] | None = None
    ) -> Tensor:
        from alignkit.rewards.gold import vader_scores  # lazy: the lexicon loads on first use

        return as_reward_tensor(vader_scores(list(completions)), len(completions), "vader_scores")


class CallableReward:
    """A user function, called as :class:`alignkit.rewards.base.UserRewardFn` says (TRL-style keywords)::

        def score(prompts: list[str], completions: list[str], **fields) -> list[float]

    ``score(prompts=[...], completions=[...], **fields)``: each extras key becomes one list keyword argument
    (``answer=[...]``), with ``None`` for rows that lack it. ``spec`` is ``module:function`` (a module on
    ``sys.path`` or in the current working directory) or ``path/to/file.py:function``; loading it runs its code.
    This object is a :class:`alignkit.rewards.base.RewardFn` (``(prompts, completions, extras)``) like the built-ins.
    """

    def __init__(self, spec: str | Callable, name: str | None = None):
        if callable(spec):
            self.fn, self.spec = spec, getattr(spec, "__qualname__", repr(spec))
        else:
            self.fn, self.spec = load_callable(spec), spec
        self.name = name or self.spec.rsplit(":", 1)[-1]
        try:
            self.signature: inspect.Signature | None = inspect.signature(self.fn)
        except (TypeError, ValueError):  # some builtins have no introspectable signature
            self.signature = None

    def _check_call(self, kwargs: dict) -> None:
        """A clear error, before the call, when the function cannot take the documented keywords."""
        if self.signature is None:
            return
        try:
            self.signature.bind(prompts=[], completions=[], **kwargs)
        except TypeError as e:
            given = ", ".join(["prompts", "completions", *kwargs])
            raise RewardSpecError(
                f"reward function {self.spec!r} cannot be called with the keywords ({given}): {e}. A callable reward "
                f"must be `{USER_REWARD_SIGNATURE}`; each extra prompt-record field comes as a keyword list"
            ) from None

    def __call__(
        self, prompts: list[str], completions: list[str], extras: list[dict] | None = None
    ) -> Tensor:
        extras = extras if extras is not None else [{} for _ in completions]
        keys = sorted({k for e in extras for k in e} - {"prompts", "completions"})
        kwargs = {k: [e.get(k) for e in extras] for k in keys}
        self._check_call(kwargs)
        values = self.fn(prompts=list(prompts), completions=list(completions), **kwargs)
        return as_reward_tensor(values, len(completions), f"reward function {self.spec!r}")
