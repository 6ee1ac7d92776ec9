"""ray_jobs.shared_storage: the multi-node pre-flight, on a real two-node Ray cluster.

Both nodes of ``ray.cluster_utils.Cluster`` run on this machine and so share its filesystem; a
node that does not share a folder is stood in by the check's ``read`` hook, which on the worker
node reads the same path under another root (that node's "own disk").
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from ray_jobs import shared_storage
from ray_jobs.shared_storage import PROBE_PREFIX, SharedStorageError, check_shared, check_visible
from tests.conftest import LOCAL_RAY, REPO


def read_on_own_disk(path: str, *, node: str, shared: str, own: str) -> bytes | None:
    """On ``node``, read ``path`` with its ``shared`` root replaced by ``own``; elsewhere as is."""
    import ray

    if ray.get_runtime_context().get_node_id() == node:
        path = own + path[len(shared):]
    return shared_storage.read_bytes(path)


def no_probe(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(PROBE_PREFIX)]


# ---- without a cluster ---------------------------------------------------------------------

@pytest.mark.parametrize("path, uri", [("s3://bucket/ray", True), ("gs://b/x", True),
                                       ("file:///mnt/x", False), ("/mnt/nfs/x", False),
                                       ("runs/x", False)])
def test_uris_are_not_probed(path, uri):
    assert shared_storage.is_uri(path) is uri


def test_one_node_or_a_uri_is_a_no_op_that_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_storage, "_alive_nodes", lambda: {"n1": "10.0.0.1"})
    assert check_shared(tmp_path / "out", "the output") == []
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(shared_storage, "_alive_nodes", lambda: pytest.fail("no query for a URI"))
    assert check_shared("s3://bucket/out", "the output") == []
    assert check_visible("s3://bucket/data/dataset.json", "the dataset") == []


# ---- on a two-node cluster -----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_nodes():
    """A head and one worker node (1 CPU each) on 127.0.0.1; yields (head id, worker id).

    The session's local Ray runtime, if one is up, is stopped for the module and restarted after.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        yield cluster.head_node.node_id, worker.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_session:
            ray.init(**LOCAL_RAY)


@pytest.mark.ray
def test_a_shared_folder_passes_on_every_node_and_the_probe_is_removed(two_nodes, tmp_path):
    out = tmp_path / "study" / "train"
    assert check_shared(out, "the training's --output") == sorted(two_nodes)
    assert out.is_dir() and no_probe(out)
    (out / "dataset.json").write_text('{"patients": 3}')
    assert check_visible(out / "dataset.json", "the dataset") == sorted(two_nodes)


@pytest.mark.ray
def test_a_folder_one_node_does_not_share_is_refused_naming_the_node(two_nodes, tmp_path):
    head, worker = two_nodes
    shared, own = tmp_path / "mnt", tmp_path / "worker_disk" / "mnt"
    read = functools.partial(read_on_own_disk, node=worker, shared=str(shared), own=str(own))
    out = shared / "study" / "data"
    with pytest.raises(SharedStorageError) as err:
        check_shared(out, "the dataset's parent folder", read=read)
    message = str(err.value)
    assert f"the dataset's parent folder ({out / PROBE_PREFIX}" in message
    assert "1 of 2 Ray node(s)" in message and f"node {worker[:12]}): sees no such file" in message
    assert f"node {head[:12]}" not in message
    assert "NFS/EFS" in message and "s3://" in message and "docs/cluster.md" in message
    assert no_probe(out)

    # An input with another copy at the same path on the worker's disk: read, but not the same.
    (out / "dataset.json").write_text('{"patients": 3}')
    (own / "study" / "data").mkdir(parents=True)
    (own / "study" / "data" / "dataset.json").write_text('{"patients": 2}')
    with pytest.raises(SharedStorageError, match=rf"node {worker[:12]}\): sees different content"):
        check_visible(out / "dataset.json", "--data's dataset.json", read=read)


# ---- the jobs refuse before any work -------------------------------------------------------

@pytest.fixture
def worker_disk(two_nodes, tmp_path, monkeypatch):
    """The jobs' checks as made with a worker node whose disk at ``tmp_path`` is not the driver's."""
    _, worker = two_nodes
    read = functools.partial(read_on_own_disk, node=worker, shared=str(tmp_path),
                             own=f"{tmp_path}-worker-disk")
    for name in ("check_shared", "check_visible"):
        monkeypatch.setattr(shared_storage, name, functools.partial(getattr(shared_storage, name), read=read))
    return worker


@pytest.mark.ray
def test_the_jobs_refuse_what_a_node_does_not_see_before_any_work(worker_disk, tmp_path, test_config,
                                                                     checkpoint, capsys, caplog,
                                                                     monkeypatch):
    from ray_jobs import infer, preprocess, train, tune
    from tests.helpers import make_checkpoint, make_dataset

    config = str(REPO / "configs" / "test.yaml")
    assert preprocess.main(["--manifest", str(tmp_path / "m.csv"), "--output", str(tmp_path / "data"),
                            "--config", config, "--no-progress"]) == 2
    assert f"the folder holding --output {tmp_path / 'data'}" in caplog.text
    assert f"node {worker_disk[:12]}): sees no such file" in caplog.text
    assert not (tmp_path / "data").exists()

    # A train split with both classes: training checks its data before Ray, its output after.
    make_dataset(tmp_path / "data", test_config, {"T1": ("lymphoma", "internal")}, split="train")
    assert train.main(["--data", str(tmp_path / "data"), "--output", str(tmp_path / "train"),
                       "--config", config, "--no-tracking"]) == 2
    assert "the training's --output (rank 0 logs to its MLflow store)" in capsys.readouterr().err
    assert not (tmp_path / "train" / "ray_results").exists()  # nothing started

    assert tune.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"),
                      "--output", str(tmp_path / "tune")]) == 2
    assert "the tuning's --output (Tune's trial results" in capsys.readouterr().err

    # Inference's actors write the prediction files' parts under --output: it is checked first.
    data = make_dataset(tmp_path / "data", test_config, {"L1": ("lymphoma", "internal")})
    ckpt = make_checkpoint(tmp_path / "ckpt", test_config)
    assert infer.main(["--checkpoint", str(ckpt), "--data", str(data), "--output",
                       str(tmp_path / "infer"), "--no-volumes"]) == 2
    assert "the inference's --output (the actors write slices/ there)" in capsys.readouterr().err
    # With --output seen by every node, what the workers read is checked next.
    monkeypatch.setattr(shared_storage, "check_shared", lambda *args, **kwargs: None)
    assert infer.main(["--checkpoint", str(ckpt), "--data", str(data), "--output",
                       str(tmp_path / "infer"), "--no-volumes"]) == 2
    assert f"--checkpoint (its metadata.json) ({ckpt / 'metadata.json'})" in capsys.readouterr().err
    assert not list((tmp_path / "infer").rglob("*.parquet"))
