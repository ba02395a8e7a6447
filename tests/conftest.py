"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine avoid oversubscription stalls, and runs are
    bit-exact (MKL may lower its thread count under machine load, which changes float summation order between two
    otherwise identical runs). Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def hhh_pairs(tmp_path_factory):
    """BIG-bench hhh_alignment for every test: the real cached pairs when this machine has them; otherwise the
    stand-in of ``tests/hhh_standin.py``, built through the real loader into a session cache
    (``$ALIGNKIT_CACHE``) that links every other cached asset, so the user's cache is never touched."""
    from alignkit.data.builtin import HHH_CACHE_NAME, HHH_DIR_ENV, ensure_hhh
    from alignkit.models.embedded import cache_dir, cached

    if cached(HHH_CACHE_NAME) is not None:
        yield
        return
    from hhh_standin import write_standin

    real = cache_dir()
    overlay = tmp_path_factory.mktemp("alignkit-cache")
    for entry in real.iterdir():
        if entry.name != HHH_CACHE_NAME and not entry.name.startswith("."):
            (overlay / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    saved = {k: os.environ.get(k) for k in ("ALIGNKIT_CACHE", HHH_DIR_ENV)}
    os.environ["ALIGNKIT_CACHE"] = str(overlay)
    os.environ[HHH_DIR_ENV] = str(write_standin(tmp_path_factory.mktemp("hhh-standin")))
    try:
        ensure_hhh(verbose=False)
        del os.environ[HHH_DIR_ENV]
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

