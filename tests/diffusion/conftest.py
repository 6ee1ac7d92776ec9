"""One intra-op thread for the tiny models here: they gain nothing from more, and on a shared
machine extra threads only spin against other jobs."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    """Every diffusion test runs its tiny models on one torch thread (tests/conftest.py)."""
