"""Fault suite: a worker node lost in the middle of batch inference on a multi-node Ray cluster.

A ``ray.cluster_utils.Cluster`` on 127.0.0.1 (a head without CPUs, so that it hosts only the
driver, and two worker nodes of 1 CPU) runs ``ray_jobs.infer`` with one predictor actor once
undisturbed, then again into another folder while a thread kills the worker node that hosts the
actor (``remove_node(allow_graceful=False)``: its raylet and workers get SIGKILL, as a lost spot
machine) as soon as that actor is up. The job must return normally with every patient's file,
every slice exactly once, and the undisturbed run's values: Ray Data's actor pool restarts the
lost actor elsewhere and retries its task (its defaults ``max_restarts=-1``,
``max_task_retries=-1``; with ``max_restarts=0`` this test fails with ActorUnavailableError).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs import infer
from tests.conftest import LOCAL_RAY, REPO
from tests.helpers import make_checkpoint, make_dataset

# Enough patients that the node is lost between the first finished patient and the last.
PATIENTS = {f"P{k}": (("lymphoma", "lung", "melanoma")[k % 3], "internal") for k in range(6)}
ARRAYS = ("anomaly_map", "counterfactual", "counterfactual_w0")
# A killed node is declared dead after missed health checks (default about 30 s); 1 s x 3 here.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                   "health_check_failure_threshold": 3}


def written(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "slices").glob("*.parquet")) if folder.exists() else []


@pytest.fixture
def cluster():
    """A head without CPUs and two worker nodes (1 CPU each) on 127.0.0.1; yields (cluster, [worker
    nodes]). With no CPU on the head every actor and read task runs on a worker node.

    The session's local Ray runtime, if one is up, is stopped for the test and restarted after.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_session:
            ray.init(**LOCAL_RAY)


def ray_actors() -> list[tuple[str, str, str]]:
    from ray._private import state

    return [(a["ActorClassName"], a["State"], a["Address"]["NodeID"][:8])
            for a in state.actors().values()]


def predictor_actors() -> list[dict]:
    """The GCS's records of the inference's actor-pool actors (Ray Data's ``MapWorker``s).

    ``ray._private.state`` reads the GCS directly; the public ``ray.util.state`` needs the
    dashboard, which the cluster does not start.
    """
    from ray._private import state

    return [a for a in state.actors().values() if "MapWorker" in a["ActorClassName"]]


@pytest.mark.ray
@pytest.mark.e2e
def test_losing_a_worker_node_mid_inference_loses_no_slice(cluster, tmp_path, test_config):
    ray_cluster, workers = cluster
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config, PATIENTS)
    reference, disturbed = tmp_path / "reference", tmp_path / "disturbed"

    def job(output: Path) -> infer.InferResult:
        return infer.run(infer.parse_args([
            "--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
            "--tracking-uri", str(tmp_path / "mlruns.db"), "--batch-size", "4",
            "--concurrency", "1", "--no-volumes"]))

    t0 = time.perf_counter()
    job(reference)
    reference_s = time.perf_counter() - t0
    assert written(reference) == sorted(PATIENTS)

    fault: dict = {}

    def lose_a_worker() -> None:
        # As soon as the predictor actor is up (its model loaded, its input read): on this tiny
        # model one actor task predicts every slice in seconds, and a patient's file appears only
        # once the task's outputs reach the driver, so waiting for the first file is too late.
        by_id = {node.node_id: node for node in workers}
        deadline = time.time() + 300
        hosts: list[str] = []
        while not hosts and time.time() < deadline:
            hosts = [a["Address"]["NodeID"] for a in predictor_actors()
                     if a["State"] == "ALIVE" and a["Address"]["NodeID"] in by_id]
            time.sleep(0.05)
        if not hosts:
            fault["error"] = f"no predictor actor on a worker node: {ray_actors()}"
            return
        fault["done_before"] = len(written(disturbed))
        fault["node"] = hosts[0]
        fault["at"] = time.perf_counter()
        ray_cluster.remove_node(by_id[hosts[0]], allow_graceful=False)

    thread = threading.Thread(target=lose_a_worker, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    result = job(disturbed)  # returns normally: no exception
    disturbed_s = time.perf_counter() - t0
    thread.join(timeout=60)
    if "error" in fault:
        pytest.fail(fault["error"])
    assert "node" in fault, "the worker node was never removed"
    assert fault["done_before"] < len(PATIENTS), "the node was lost after the last patient"
    after_fault_s = time.perf_counter() - fault["at"]
    print(f"\nnode loss: reference {reference_s:.1f} s, disturbed {disturbed_s:.1f} s "
          f"({after_fault_s:.1f} s after the node was lost with {fault['done_before']} of "
          f"{len(PATIENTS)} patients written); actor restarts "
          f"{[a['NumRestarts'] for a in predictor_actors()]}")
    # The lost node's actor is restarted elsewhere (Ray Data's actor pool: max_restarts=-1).
    assert any(a["NumRestarts"] >= 1 for a in predictor_actors())

    assert sorted(result.computed) == sorted(PATIENTS)
    assert written(disturbed) == sorted(PATIENTS)
    assert not [p.name for p in disturbed.rglob("*") if p.is_file() and ".tmp" in p.name]
    for pid in PATIENTS:
        ours = pq.read_table(disturbed / "slices" / f"{pid}.parquet").to_pandas()
        theirs = pq.read_table(reference / "slices" / f"{pid}.parquet").to_pandas()
        expected = pq.read_metadata(data / "slices" / "test" / f"{pid}.parquet").num_rows
        assert len(ours) == expected and ours["slice_index"].is_unique  # each slice exactly once
        assert ours["slice_index"].tolist() == theirs["slice_index"].tolist()
        for column in ARRAYS:
            np.testing.assert_allclose(np.stack(ours[column]), np.stack(theirs[column]),
                                       atol=1e-5, err_msg=f"{pid} {column}")
    assert (disturbed / "tables" / "methods.csv").is_file()
