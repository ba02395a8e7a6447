"""Import user code named in a config: ``module:function`` or ``path/to/file.py:function``.

The lowest layer (the standard library only), shared by every place a config names a Python callable: reward
components (:mod:`alignkit.rewards`), judges (:mod:`alignkit.judges`), the quickstart's gold score.

``module:function`` finds a module on ``sys.path`` and, failing that, in the current working directory;
``path/to/file.py:function`` imports that file. Either way the code is imported and run: a config that names a
callable runs its code, so use configs only from sources you trust.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path


class CallableSpecError(ValueError):
    """A ``module:function`` spec cannot be used (bad format, missing module/file/attribute, import failure); the
    message names the spec and the part that failed."""


def _import_file(file_part: str, spec: str, what: str):
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise CallableSpecError(f"{what} {spec!r}: file {str(path)!r} not found")
    mod_name = f"alignkit_user_code_{abs(hash(str(path.resolve())))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise CallableSpecError(
            f"{what} {spec!r}: {str(path)!r} cannot be imported as a Python module"
        )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise CallableSpecError(
            f"{what} {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}"
        ) from e
    return module


def _in_working_dir(module_part: str) -> bool:
    """Whether the top-level package of ``module_part`` lies in the current working directory (``x.py`` or
    ``x/``) while the current directory is not on ``sys.path`` (the ``alignkit`` script does not put it there)."""
    cwd = os.getcwd()
    on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
    top = module_part.split(".")[0]
    return cwd not in on_path and (Path(cwd, top + ".py").is_file() or Path(cwd, top).is_dir())


def _import_module(module_part: str, spec: str, what: str):
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
            raise CallableSpecError(
                f"{what} {spec!r}: module {module_part!r} not found in the current directory nor on "
                "PYTHONPATH (is it installed? a file can be given as 'path/to/file.py:function')"
            ) from None
        raise CallableSpecError(
            f"{what} {spec!r}: importing module {module_part!r} failed: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise CallableSpecError(
            f"{what} {spec!r}: importing module {module_part!r} failed: {type(e).__name__}: {e}"
        ) from e


def load_callable(spec: str, what: str = "function") -> Callable:
    """Resolve ``"package.module:function"`` or ``"path/to/file.py:function"`` to the callable (importing, i.e.
    running, that code). A module is looked for on ``sys.path``, then in the current working directory.

    The attribute part may be dotted (``module:Class.method``). Errors name the spec and say
    which part failed: format, module/file not found, import failure, missing attribute, not callable.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise CallableSpecError(
            f"{what} spec must be 'module:function' or 'file.py:function', got {spec!r}"
        )
    module_part, attr_part = spec.rsplit(":", 1)
    if not module_part or not attr_part:
        raise CallableSpecError(
            f"{what} spec must be 'module:function' or 'file.py:function', got {spec!r}"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _import_file(module_part, spec, what)
    else:
        module = _import_module(module_part, spec, what)
    obj = module
    for part in attr_part.split("."):
        if not hasattr(obj, part):
            raise CallableSpecError(f"{what} {spec!r}: {module_part!r} has no attribute {attr_part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CallableSpecError(
            f"{what} {spec!r}: {attr_part!r} is not callable (it is a {type(obj).__name__})"
        )
    return obj
