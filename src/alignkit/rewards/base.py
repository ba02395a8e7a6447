"""The reward-function interface and loading user reward functions by name.

A reward function scores a batch of (prompt, completion) pairs; ``extras`` carries the
per-row record fields (``answer``, ...) of the RL prompt data (DESIGN: "extra fields passed
to reward functions"). Rows follow the rollout's layout (group-contiguous for G > 1).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class RewardError(ValueError):
    """A reward function failed while scoring (raised, or returned NaN/inf); the message names the component."""


class RewardSpecError(ValueError):
    """A reward specification (``module:function``, a component) cannot be used; the message names it."""


@runtime_checkable
class RewardFn(Protocol):
    """``(prompts, completions, extras) -> [B] float32`` with a ``name`` for logging (``rewards/<name>``)."""

    name: str

    def __call__(self, prompts: list[str], completions: list[str], extras: list[dict]) -> Tensor: ...


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


def _import_module(module_part: str, spec: str):
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_part == e.name or module_part.startswith(e.name + ".")):
            raise RewardSpecError(
                f"reward function {spec!r}: module {module_part!r} not found "
                "(is it installed or on PYTHONPATH? a file can be given as 'path/to/file.py:function')"
            ) from None
        raise RewardSpecError(
            f"reward function {spec!r}: importing module {module_part!r} failed: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise RewardSpecError(
            f"reward function {spec!r}: importing module {module_part!r} failed: {type(e).__name__}: {e}"
        ) from e


def load_callable(spec: str) -> Callable:
    """Resolve ``"package.module:function"`` or ``"path/to/file.py:function"`` to the callable.

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
