"""Fault suite: a worker node lost in the middle of batch inference, and of training, on a
multi-node Ray cluster (``ray.cluster_utils.Cluster`` on 127.0.0.1; the node is removed with
``remove_node(allow_graceful=False)``: its raylet and workers get SIGKILL, as a lost spot
machine). The work holds at a known point until the node is gone, so the loss lands mid-way
on any machine.

Inference: a head without CPUs (it hosts only the driver) and two worker nodes of 1 CPU run
``ray_jobs.infer`` with one predictor actor once undisturbed, then again into another folder
while the node hosting the actor is removed as the actor holds its first batch. The job must
return normally with every patient's file, every slice exactly once, and the undisturbed run's
values: Ray Data's actor pool restarts the lost actor elsewhere and retries its task (its
defaults ``max_restarts=-1``, ``max_task_retries=-1``; with ``max_restarts=0`` this test fails
with ActorUnavailableError).

Training: two DDP workers on two nodes; one node is removed after epoch 1's checkpoint. Ray
Train (FailureConfig) restarts the group on the remaining nodes (one is a spare) from that
checkpoint and the run finishes every epoch.
"""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def ray_cluster(head_cpus: int, worker_cpus: list[int], hold: Path | None = None, **node_args):
    """A ``ray.cluster_utils.Cluster`` on 127.0.0.1 with fast node-death detection; yields
    (cluster, [worker nodes]) with this process connected to it. With ``hold``, predictor
    actors hold their first batch while that file is missing (:func:`hold_first_prediction`).

    The session's local Ray runtime, if one is up, is stopped for the test and restarted after.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": False, "_system_config": FAST_NODE_DEATH,
        **node_args})
    try:
        workers = [cluster.add_node(num_cpus=n, **node_args) for n in worker_cpus]
        cluster.wait_for_nodes()
        env = {"PYTHONPATH": str(REPO), **({"IGCONDA_TEST_HOLD": str(hold)} if hold else {})}
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={
            "env_vars": env,
            "worker_process_setup_hook": "tests.test_fault_node_loss.hold_first_prediction"})
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_session:
            ray.init(**LOCAL_RAY)


def hold_first_prediction() -> None:
    """Ray ``worker_process_setup_hook``: while the file ``$IGCONDA_TEST_HOLD`` does not exist,
    the first batch a predictor actor is given writes it and waits (up to 10 minutes) before
    predicting, so that the test takes the actor's node away with that batch in flight on any
    machine; once the file exists (the restarted actor, or a run not to disturb) batches go
    through at once. (On this tiny model one actor task predicts every slice within a second,
    so a node lost "soon after the actor is up" could land after all the work.)"""
    marker = os.environ.get("IGCONDA_TEST_HOLD")
    if not marker:
        return
    from igconda.inference import CounterfactualPredictor

    predict = CounterfactualPredictor.__call__

    def held(self, batch):
        if not os.path.exists(marker):
            Path(marker).write_text(f"predictor in process {os.getpid()} holding its first batch\n")
            time.sleep(600)
        return predict(self, batch)

    CounterfactualPredictor.__call__ = held


@pytest.fixture
def cluster(tmp_path):
    """A head without CPUs and two worker nodes (1 CPU each): every actor and read task runs
    on a worker node. Predictor actors hold their first batch while ``tmp_path/held`` is
    missing (:func:`hold_first_prediction`)."""
    with ray_cluster(0, [1, 1], hold=tmp_path / "held") as nodes:
        yield nodes


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
        return infer.run(infer.infer_request(infer.parse_args([
            "--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
            "--tracking-uri", str(tmp_path / "mlruns.db"), "--batch-size", "4",
            "--concurrency", "1", "--no-volumes"])))

    held = tmp_path / "held"
    held.write_text("the undisturbed run: no hold\n")
    t0 = time.perf_counter()
    job(reference)
    reference_s = time.perf_counter() - t0
    assert written(reference) == sorted(PATIENTS)
    held.unlink()  # the disturbed run's predictor holds its first batch

    fault: dict = {}

    def lose_a_worker() -> None:
        # Once the predictor actor holds its first batch (hold_first_prediction): the node is
        # lost with that batch in flight, whatever the machine's speed.
        by_id = {node.node_id: node for node in workers}
        deadline = time.time() + 300
        while not held.exists() and time.time() < deadline:
            time.sleep(0.05)
        hosts = [a["Address"]["NodeID"] for a in predictor_actors()
                 if a["State"] == "ALIVE" and a["Address"]["NodeID"] in by_id]
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
    assert held.exists()  # the node went with the predictor's first batch in flight
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


@pytest.fixture
def training_cluster():
    """A head with 1 CPU (the driver, the Train controller, Ray Data's reads) and three worker
    nodes of 2 CPUs. Train workers of 1.5 CPUs fit one per worker node, so two workers run on
    two nodes and the third node is the spare a restarted group moves to."""
    with ray_cluster(1, [2, 2, 2], object_store_memory=150 * 2**20) as nodes:
        yield nodes


def train_worker_nodes() -> list[str]:
    """The nodes of the live Ray Train workers (``RayTrainWorker`` actors)."""
    from ray._private import state

    return [a["Address"]["NodeID"] for a in state.actors().values()
            if "RayTrainWorker" in a["ActorClassName"] and a["State"] == "ALIVE"]


@pytest.mark.ray
@pytest.mark.e2e
def test_losing_a_worker_node_mid_training_resumes_from_the_last_checkpoint(training_cluster,
                                                                           tmp_path):
    """Two DDP workers on two nodes; the node of one is removed after epoch 1's checkpoint, at
    the start of epoch 2. Ray Train (FailureConfig max_failures 1) restarts the worker group on
    the remaining nodes from that checkpoint, and the run finishes all 3 epochs."""
    from igconda import checkpoint as ckpt
    from igconda.config import load_config
    from ray_jobs.train import build_trainer
    from ray_jobs.train_runs import latest_checkpoint
    from tests.test_train_loop import make_slice_dataset

    ray_cluster, workers = training_cluster
    data = make_slice_dataset(tmp_path / "data", {"train": 4, "valid": 2})
    config = load_config(REPO / "configs" / "test.yaml", overrides={
        "train": {"epochs": 3, "num_workers": 2, "max_failures": 1}})
    storage, held = tmp_path / "storage", tmp_path / "held"
    # Rank 1 holds at the start of epoch 2, once Ray Train has registered epoch 1's checkpoint,
    # until its node (or rank 0's) is gone; the restarted rank 1 finds the marker and carries on.
    trainer = build_trainer(config, data=str(data), storage_path=str(storage), run_name="nodeloss",
                            cpus_per_worker=1.5, torch_threads=1,
                            fault={"epoch": 2, "rank": 1, "marker": str(held), "hold": True,
                                   "run": [str(storage), "nodeloss"]})
    fault: dict = {}

    def lose_a_worker_node() -> None:
        by_id = {node.node_id: node for node in workers}
        deadline = time.time() + 600
        while not held.exists() and time.time() < deadline:
            time.sleep(0.05)
        hosts = sorted(set(train_worker_nodes()) & set(by_id))
        if not held.exists() or len(hosts) != 2:
            fault["error"] = f"no held worker, or workers not on two nodes: {hosts}, {ray_actors()}"
            return
        fault.update(node=hosts[0], at=time.perf_counter(),
                     latest=latest_checkpoint(str(storage), "nodeloss"))
        ray_cluster.remove_node(by_id[hosts[0]], allow_graceful=False)
        # Where the restarted group runs: two workers again, not on the lost node.
        while time.time() < deadline:
            restarted = train_worker_nodes()
            if len(restarted) == 2 and fault["node"] not in restarted:
                fault["restarted_on"] = sorted(restarted)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=lose_a_worker_node, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    result = trainer.fit()
    total_s = time.perf_counter() - t0
    thread.join(timeout=60)
    if "error" in fault:
        pytest.fail(fault["error"])
    assert "node" in fault, "the worker node was never removed"
    assert fault["latest"].name == "checkpoint_epoch_000001"  # the node went after epoch 1's
    print(f"\ntraining node loss: {total_s:.1f} s, {time.perf_counter() - fault['at']:.1f} s after "
          f"the node was lost")
    # The group was restarted with both workers, on the two nodes left (one was the spare).
    assert len(set(fault.get("restarted_on", []))) == 2, fault

    assert result.error is None
    last = latest_checkpoint(str(storage), "nodeloss")
    assert last.name == "checkpoint_epoch_000003"
    state = ckpt.load_train_state(last)
    assert state["epoch"] == 3
    assert state["resumed_at"] == [1]  # restarted once, from epoch 1's checkpoint, not from scratch
    assert [h["epoch"] for h in state["history"]] == [1.0, 2.0, 3.0]  # every epoch, once
