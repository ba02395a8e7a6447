"""Shared test fixtures."""

from __future__ import annotations

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
