"""igconda.tracking against a local SQLite store and a real ``mlflow server``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from igconda import tracking
from tests.mlflow_server import MlflowServer


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    assert tracking.resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri(str(tmp_path / "store"), "ignored").endswith("/store/mlflow.db")
    for uri in ("http://127.0.0.1:5000", "sqlite:///x.db", "file:///tmp/mlruns", "databricks"):
        assert tracking.resolve_tracking_uri(uri, tmp_path) == uri


def test_mlflow_tracking_uri_is_used_when_no_uri_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    # explicit (--tracking-uri / tracking.tracking_uri) > MLFLOW_TRACKING_URI > local SQLite
    assert tracking.resolve_tracking_uri("", tmp_path) == "http://10.0.0.5:5000"
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://10.0.0.5:5000"
    assert tracking.resolve_tracking_uri("http://other:5000", tmp_path) == "http://other:5000"
    assert not (tmp_path / tracking.LOCAL_DB).exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "envstore"))  # a path, as for --tracking-uri
    assert tracking.resolve_tracking_uri("", tmp_path) == f"sqlite:///{(tmp_path / 'envstore').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty: the default
    assert tracking.resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    # One SQLite store per module: creating its tables costs seconds.
    return tracking.resolve_tracking_uri("", tmp_path_factory.mktemp("mlflow"))


def test_run_logger_records_params_metrics_tags_and_artifacts(local_store, tmp_path):
    parent = tracking.create_run(local_store, "exp", "parent")
    run_id = tracking.create_run(local_store, "exp", "child", tags={"model.attention": "011"},
                                 parent_run_id=parent)
    logger = tracking.RunLogger(local_store, run_id)
    logger.log_params({f"section.key{i}": i for i in range(150)})  # > one log_batch of params
    logger.log_params({"long": "x" * 7000})
    for epoch in (1, 2, 3):
        logger.log_metrics({"train_loss": 1.0 / epoch}, step=epoch)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"0123")
    logger.log_artifact(tmp_path / "ckpt", "best_checkpoint")
    tracking.end_run(local_store, run_id)

    run = tracking.get_run(local_store, run_id)
    assert run["status"] == "FINISHED"
    assert len([k for k in run["params"] if k.startswith("section.")]) == 150
    assert len(run["params"]["long"]) == 6000
    assert run["tags"]["model.attention"] == "011"
    assert run["tags"]["mlflow.parentRunId"] == parent
    assert tracking.get_metric_history(local_store, run_id, "train_loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert tracking.list_artifacts(local_store, run_id, "best_checkpoint") == [
        "best_checkpoint/model.safetensors"]
    # Artifacts of the default store live beside the database, not in the current directory.
    artifact_root = Path(local_store[len("sqlite:///"):]).parent / tracking.LOCAL_ARTIFACTS
    assert list(artifact_root.rglob("model.safetensors"))


def test_start_run_nests_under_a_parent(local_store):
    with tracking.start_run(local_store, "exp2", "pipeline") as parent:
        tracking.log_metrics({"time_s/total": 3.0})
        with tracking.start_run(local_store, "exp2", "stage") as child:
            tracking.log_params({"a": 1})
    runs = {r["run_id"]: r for r in tracking.find_runs(local_store, "exp2")}
    assert runs[child]["tags"]["mlflow.parentRunId"] == parent
    assert runs[parent]["metrics"]["time_s/total"] == 3.0


def test_start_run_leaves_the_exported_tracking_uri_as_it_found_it(local_store, tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    with tracking.start_run(local_store, "exp3", "outer"):
        assert os.environ[tracking.TRACKING_URI_ENV] == local_store  # subprocesses inherit it
        with tracking.start_run(local_store, "exp3", "inner"):
            pass
        assert os.environ[tracking.TRACKING_URI_ENV] == local_store  # the outer run still logs
    assert tracking.TRACKING_URI_ENV not in os.environ
    # A later job of this process that was told nothing uses its own folder, not that store.
    assert tracking.resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://example.invalid:5000")
    with tracking.start_run(local_store, "exp3", "again"):
        pass
    assert os.environ[tracking.TRACKING_URI_ENV] == "http://example.invalid:5000"

def test_child_run_nests_in_the_active_runs_experiment(local_store):
    with pytest.raises(RuntimeError, match="active run"):
        with tracking.child_run("orphan"):
            pass
    with tracking.start_run(local_store, "exp4", "infer") as parent:
        with tracking.child_run("score-x", {"igconda.method": "x"}) as child:
            tracking.log_metrics({"dsc_max_mean": 0.5})
    runs = {r["run_id"]: r for r in tracking.find_runs(local_store, "exp4")}
    assert runs[child]["tags"]["mlflow.parentRunId"] == parent
    assert runs[child]["tags"]["igconda.method"] == "x"
    assert runs[child]["metrics"]["dsc_max_mean"] == 0.5 and "dsc_max_mean" not in runs[parent]["metrics"]

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free local port, with SQLite and proxied local artifacts."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.mlflow_server
def test_logging_to_a_real_server(mlflow_server, tmp_path):
    run_id = tracking.create_run(mlflow_server, "server-exp", "train", tags={"data.version": "v1"})
    logger = tracking.RunLogger(mlflow_server, run_id)
    logger.log_params({"train.lr": 0.001})
    logger.log_metrics({"valid_loss": 0.5}, step=1)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.yaml").write_text("model: {}\n")
    logger.log_artifact(tmp_path / "best", "best_checkpoint")
    tracking.end_run(mlflow_server, run_id)
    run = tracking.get_run(mlflow_server, run_id)
    assert run["params"]["train.lr"] == "0.001"
    assert run["metrics"]["valid_loss"] == 0.5
    assert run["tags"]["data.version"] == "v1"
    assert tracking.list_artifacts(mlflow_server, run_id, "best_checkpoint") == ["best_checkpoint/config.yaml"]
