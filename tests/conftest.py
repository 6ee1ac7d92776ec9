"""Shared fixtures: the tiny test config, a tiny checkpoint, one local Ray runtime per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from igconda.config import StudyConfig, load_config

REPO = Path(__file__).resolve().parents[1]
STS_CROPS = REPO.parent / "shared" / "data" / "sts-crops"

# The jobs honour MLFLOW_TRACKING_URI when no --tracking-uri is given (igconda.tracking); a
# developer's or CI's exported server must not receive the tests' runs, nor change what they
# check. Removed before any Ray runtime starts, so its workers do not inherit it either.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def test_config() -> StudyConfig:
    """configs/test.yaml: tiny model, tiny volumes, T = 10."""
    return load_config(REPO / "configs" / "test.yaml")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tiny models (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``): on a shared 2-core machine two spinning threads are far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, test_config) -> Path:
    """A random-weight tiny-model checkpoint (tests.helpers.make_checkpoint), one per module."""
    from tests.helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", test_config)


@pytest.fixture(scope="session")
def sts_crops() -> Path:
    """The real FDG sarcoma crops beside the checkout (../shared/data/sts-crops)."""
    path = Path(os.environ.get("IGCONDA_STS_CROPS", STS_CROPS))
    if not (path / "manifest.csv").is_file():
        pytest.fail(f"sts-crops data not found at {path}; set IGCONDA_STS_CROPS")
    return path


#: ``ray.init`` arguments of the tests' local Ray runtime (a test that needs another runtime, e.g.
#: a two-node cluster, restarts this one afterwards with them).
# address="local": a runtime of its own, never a cluster another process started on this machine.
LOCAL_RAY = {"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False,
             "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO)}}}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for every Ray-marked test (started once: it costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray
    ray.shutdown()
