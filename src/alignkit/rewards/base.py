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

import importlib
import importlib.util
import sys
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from alignkit.config import CALLABLE_REWARD_SIGNATURE


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


def _import_file(file_part: str, spec: str):
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise RewardSpecError(f"reward function {spec!r}: file {str(path)!r} not found")
    mod_name = f"alignkit_user_reward_{abs(hash(str(path.resolve())))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardSpecError(
            f"reward function {spec!r}: {str(path)!r} cannot be imported as a Python module"
        )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RewardSpecError(
            f"reward function {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}"
        ) from e
    return module


def _in_working_dir(module_part: str) -> bool:
    """Whether the top-level package of ``module_part`` lies in the current working directory (``x.py`` or
    ``x/``) while the current directory is not on ``sys.path`` (the ``alignkit`` script does not put it there)."""
    cwd = os.getcwd()
    on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
    top = module_part.split(".")[0]
    return cwd not in on_path and (Path(cwd, top + ".py").is_file() or Path(cwd, top).is_dir())


def _import_module(module_part: str, spec: str):
    try:
        try:
            return importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            if e.name != module_part.split(".")[0] or not _in_working_dir(module_part):
                raise
            # `alignkit ...` run from the folder holding mymod.py: look there too, after everything else, so a
            # local file never shadows an installed module
            sys.path.append(os.getcwd())
            return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_part == e.name or module_part.startswith(e.name + ".")):
            raise RewardSpecError(
                f"reward function {spec!r}: module {module_part!r} not found in the current directory nor on "
                "PYTHONPATH (is it installed? a file can be given as 'path/to/file.py:function')"
            ) from None
        raise RewardSpecError(
            f"reward function {spec!r}: importing module {module_part!r} failed: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise RewardSpecError(
            f"reward function {spec!r}: importing module {module_part!r} failed: {type(e).__name__}: {e}"
        ) from e


def load_callable(spec: str) -> Callable:
    """Resolve ``"package.module:function"`` or ``"path/to/file.py:function"`` to the callable (importing, i.e.
    running, that code). A module is looked for on ``sys.path``, then in the current working directory.

    The attribute part may be dotted (``module:Class.method``). Errors name the spec and say
    which part failed: format, module/file not found, import failure, missing attribute, not callable.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardSpecError(
            f"reward function spec must be 'module:function' or 'file.py:function', got {spec!r}"
        )
    module_part, attr_part = spec.rsplit(":", 1)
    if not module_part or not attr_part:
        raise RewardSpecError(
            f"reward function spec must be 'module:function' or 'file.py:function', got {spec!r}"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _import_file(module_part, spec)
    else:
        module = _import_module(module_part, spec)
    obj = module
    for part in attr_part.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward function {spec!r}: {module_part!r} has no attribute {attr_part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(
            f"reward function {spec!r}: {attr_part!r} is not callable (it is a {type(obj).__name__})"
        )
    return obj


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
