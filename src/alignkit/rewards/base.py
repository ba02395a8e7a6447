"""The reward-function interfaces and loading user reward functions by name.

Two signatures, one for each side:

* What you write for a ``{type: callable, path: "mymod:score"}`` component (:class:`UserRewardFn`), the
  TRL-style keyword convention::

      def score(prompts: list[str], completions: list[str], **fields) -> list[float]

  called as ``score(prompts=[...], completions=[...], answer=[...], ...)``: B rendered prompts, B completions,
  and each extra field of the prompt records (``answer``, ...) as one list of B values (``None`` for a row that
  lacks it). It returns B finite floats (a list, a numpy array or a tensor). For example::

      # mymod.py
      def score(prompts, completions, answer, **fields):
          return [1.0 if c.strip().endswith(str(a)) else 0.0 for c, a in zip(completions, answer)]

  :class:`alignkit.rewards.rules.CallableReward` makes the call, and nothing else calls user code.
* What every built-in component is (:class:`RewardFn`): ``(prompts, completions, extras) -> [B] float32``, where
  ``extras`` holds the per-row record fields as B dicts (DESIGN: "extra fields passed to reward functions").
  ``CallableReward`` turns a ``UserRewardFn`` into one. Rows follow the rollout's layout (group-contiguous
  for G > 1).

``module:function`` finds a module on ``sys.path`` and, failing that, in the current working directory;
``path/to/file.py:function`` imports that file. Either way the code is imported and run: a config that names a
callable reward runs its code, so use configs only from sources you trust.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from alignkit.config import CALLABLE_REWARD_SIGNATURE
from alignkit.user_code import CallableSpecError
from alignkit.user_code import load_callable as _load_user_callable


class RewardError(ValueError):
    """A reward function failed while scoring (raised, or returned NaN/inf); the message names the component."""


class RewardSpecError(ValueError):
    """A reward specification (``module:function``, a component) cannot be used; the message names it."""


@runtime_checkable
class RewardFn(Protocol):
    """A built-in reward component: ``(prompts, completions, extras) -> [B] float32`` with a ``name`` for logging
    (``rewards/<name>``); ``extras`` is one dict of record fields per row."""

    name: str

    def __call__(self, prompts: list[str], completions: list[str], extras: list[dict]) -> Tensor: ...


USER_REWARD_SIGNATURE = CALLABLE_REWARD_SIGNATURE


class UserRewardFn(Protocol):
    """The function a ``callable`` reward component names (see the module docstring)::

        def score(prompts: list[str], completions: list[str], **fields) -> list[float]

    Called with keywords only: ``prompts`` and ``completions`` (B strings each), plus each extra field of the
    prompt records as a list of B values (``None`` where a row lacks it), e.g. ``answer=[...]``. Returns B finite
    floats (list, numpy array or tensor)."""

    def __call__(self, *, prompts: list[str], completions: list[str], **fields: list) -> Sequence[float] | Tensor: ...


def load_callable(spec: str) -> Callable:
    """Resolve a reward function's ``"package.module:function"`` or ``"path/to/file.py:function"``
    (:func:`alignkit.user_code.load_callable`); errors are :class:`RewardSpecError` naming the spec."""
    try:
        return _load_user_callable(spec, what="reward function")
    except CallableSpecError as e:
        raise RewardSpecError(str(e)) from e.__cause__


def as_reward_tensor(values, batch_size: int, source: str) -> Tensor:
    """B numbers (list, array, tensor) -> float32 CPU tensor [B]; else an error naming ``source``."""
    if isinstance(values, Tensor):
        out = values.detach().to("cpu", torch.float32)
    elif isinstance(values, (list, tuple)) or hasattr(values, "__array__"):  # list, tuple, numpy array
        try:
            out = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RewardSpecError(
                f"{source} must return {batch_size} floats; got a {type(values).__name__} "
                f"with a non-numeric entry ({e}): {values!r:.200}"
            ) from None
    else:
        raise RewardSpecError(
            f"{source} must return a list/array/tensor of {batch_size} floats, "
            f"got {type(values).__name__}: {values!r:.200}"
        )
    if out.dim() != 1 or out.shape[0] != batch_size:
        raise RewardSpecError(
            f"{source} must return {batch_size} floats (one per completion), got shape {tuple(out.shape)}"
        )
    bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"{source} returned a non-finite reward ({out[bad[0]].item()}) for completion {bad[0]} of {batch_size}"
            f" ({len(bad)} non-finite in all); rewards must be finite numbers"
        )
    return out
