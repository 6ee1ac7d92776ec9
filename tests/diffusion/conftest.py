"""One intra-op thread for the tiny models here: they gain nothing from more, and on a shared
machine extra threads only spin against other jobs."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
