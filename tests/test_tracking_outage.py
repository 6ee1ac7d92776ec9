"""Fault suite: a real ``mlflow server`` stopped while the training and the inference jobs run.

The server (tests/mlflow_server.py: SQLite store, proxied artifacts, 127.0.0.1) is terminated
with SIGTERM, as a crashed or restarted tracking host would go away. Each job must keep every
result on disk, exit 0 with a warning that names the folder and the re-log command, and not
stall on MLflow's retries; once the server is back on the same store, ``python -m
ray_jobs.relog`` must leave every run the outage interrupted ended, and the results in MLflow.

Select the suite with ``pytest -m mlflow_server tests/test_tracking_outage.py``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable

import pytest

from igconda import checkpoint as ckpt
from igconda import tracking
from tests.helpers import make_checkpoint, make_dataset
from tests.mlflow_server import MlflowServer
from tests.test_train_loop import make_slice_dataset

pytestmark = [pytest.mark.mlflow_server, pytest.mark.ray, pytest.mark.e2e,
              pytest.mark.usefixtures("one_torch_thread")]

#: With MLflow's own retries (7, backoff factor 2) each failing call alone costs about 4 minutes;
#: with igconda's bound (igconda.tracking.HTTP_LIMITS) a refused connection costs seconds.
OUTAGE_BUDGET_S = 120
PATIENTS = {"L1": ("lymphoma", "internal"), "N1": ("lung", "internal")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running(server) -> MlflowServer:
    """The module's server, started again if a test left it stopped."""
    if not server.is_up():
        server.start()
    return server


class StopWhen(threading.Thread):
    """Stop ``server`` as soon as ``condition()`` holds (polled); ``stopped_at`` is when it was
    down (``time.monotonic``), None if the condition never held."""

    def __init__(self, server: MlflowServer, condition: Callable[[], bool],
                 then: Callable[[], object] = lambda: None):
        super().__init__(daemon=True)
        self.server, self.condition, self.then = server, condition, then
        self.stopped_at: float | None = None
        self.cancelled = threading.Event()

    def run(self) -> None:
        while not self.cancelled.wait(0.1):
            try:
                if self.condition():
                    self.server.stop()
                    self.stopped_at = time.monotonic()
                    self.then()
                    return
            except Exception:  # the run or its record is not there yet
                pass

    def cancel(self) -> None:
        self.cancelled.set()
        self.join(timeout=60)


def _without_logging_errors(err: str) -> str:
    """``err`` less logging's own ``--- Logging error ---`` reports: Ray Data's progress thread
    logs to whatever ``sys.stderr`` is at that moment, which under pytest may be an earlier
    test's closed capture. What is left is what the job itself printed."""
    return re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", err, flags=re.DOTALL)


def _report(capsys, line: str) -> None:
    """Show a timing on the terminal (``pytest -s``) past the capture the test asserts on."""
    with capsys.disabled():
        print(f"\n[outage] {line}", flush=True)


def _logged_steps(uri: str, run_id: str, key: str) -> list[int]:
    return [step for step, _ in tracking.get_metric_history(uri, run_id, key)]


def _relogged(uri: str, stage: str) -> dict:
    runs = [r for r in tracking.find_runs(uri, "igconda", f"tags.\"igconda.stage\" = '{stage}'")
            if r["tags"].get("igconda.relogged") == "true"]
    assert len(runs) == 1, runs
    return runs[0]


def test_training_survives_the_server_stopping_mid_run_and_relog_restores_the_run(
        ray_session, running, tmp_path, repo_root, monkeypatch, capsys):
    from ray_jobs import relog, train

    monkeypatch.chdir(repo_root)
    data = make_slice_dataset(tmp_path / "data", {"train": 4, "valid": 2})
    output = (tmp_path / "train").resolve()
    url = running.url

    # Rank 0 holds at the start of epoch 2 until the server is down, so the outage lands
    # between epoch 1's metrics and epoch 2's on any machine (a fast one could otherwise finish
    # the training within one poll).
    holding, server_down = tmp_path / "holding", tmp_path / "server_down"
    build = train.build_trainer
    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: build(*a, **k, fault={
        "epoch": 2, "rank": 0, "marker": str(holding), "hold": str(server_down)}))

    def first_epoch_logged() -> bool:
        run_id = json.loads((output / train.RUN_RECORD).read_text())["run_id"]
        return holding.exists() and bool(tracking.get_metric_history(url, run_id, "train_loss"))

    stopper = StopWhen(running, first_epoch_logged, then=server_down.touch)
    stopper.start()
    started = time.monotonic()
    try:
        code = train.main(["--data", str(data), "--output", str(output), "--config",
                           "configs/test.yaml", "--num-workers", "2", "--cpus-per-worker", "0.5",
                           "--torch-threads", "1", "--tracking-uri", url])
    finally:
        finished = time.monotonic()
        stopper.cancel()
    captured = capsys.readouterr()
    assert stopper.stopped_at is not None, "the server was never stopped"
    _report(capsys, f"training: {finished - started:.1f} s, the last "
                    f"{finished - stopper.stopped_at:.1f} s with the server down")

    # The job succeeded, and everything it makes is on disk.
    assert code == 0, captured.err[-3000:]
    assert (output / ckpt.BEST_DIR / "model.safetensors").is_file()
    pointer = ckpt.read_best_pointer(output)
    record = json.loads((output / train.RUN_RECORD).read_text())
    assert pointer["mlflow_run_id"] == record["run_id"] and record["tracking_uri"] == url
    checkpoints = sorted(p.name for p in (output / "ray_results" / "train").glob("checkpoint_epoch_*"))
    assert checkpoints == ["checkpoint_epoch_000001", "checkpoint_epoch_000002"]
    # The server was down when training ended (it was stopped mid-run, not after), and the
    # console says so, where the results are and how to re-log them.
    err = captured.err
    assert f"warning: MLflow tracking at {url} failed while logging the best checkpoint" in err
    assert f"failed while ending run {record['run_id']} as FINISHED" in err
    assert f"the results are on disk in {output}" in err
    assert f"re-log them with: python -m ray_jobs.relog --train {output}" in err
    assert "Traceback" not in _without_logging_errors(err), err[-6000:]
    # No stall on retries: what ran after the stop (the second epoch, the best checkpoint's
    # export, the failed logging) took far less than one call's default retries.
    assert finished - stopper.stopped_at < OUTAGE_BUDGET_S

    # The server is back on the same store: the outage left the run RUNNING, with epoch 1 at most.
    running.start()
    run_id = record["run_id"]
    assert tracking.get_run(url, run_id)["status"] == "RUNNING"
    assert 1 in _logged_steps(url, run_id, "train_loss")
    started = time.monotonic()
    assert relog.main(["--train", str(output), "--tracking-uri", url]) == 0
    assert f"relog: completed the training run {run_id}" in capsys.readouterr().out
    _report(capsys, f"training re-log: {time.monotonic() - started:.1f} s")

    # The training's own run is complete: every epoch once, the best checkpoint, FINISHED.
    run = tracking.get_run(url, run_id)
    assert run["status"] == "FINISHED"
    for key in ("train_loss", "valid_loss"):
        assert _logged_steps(url, run_id, key) == [1, 2], key
    assert run["metrics"]["best/valid_loss"] == pytest.approx(pointer["valid_loss"])
    assert run["tags"]["best_checkpoint.epoch"] == str(pointer["epoch"])
    assert run["params"]["train.epochs"] == "2"
    assert "best_checkpoint/model.safetensors" in tracking.list_artifacts(url, run_id, "best_checkpoint")
    # ... and the re-log's own record of the stage, as for any study.
    again = _relogged(url, "train")
    assert again["status"] == "FINISHED" and again["params"]["train.epochs"] == "2"
    assert _logged_steps(url, again["run_id"], "valid_loss") == [1, 2]
    assert "best_checkpoint/model.safetensors" in tracking.list_artifacts(
        url, again["run_id"], "best_checkpoint")


def test_inference_survives_the_server_stopping_before_and_while_it_logs_and_relog_restores_it(
        ray_session, running, tmp_path, test_config, monkeypatch, capsys):
    from ray_jobs import infer, relog

    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config, PATIENTS)
    output = tmp_path / "infer"
    url = running.url
    argv = ["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
            "--tracking-uri", url, "--batch-size", "16", "--no-volumes"]

    # 1. The server goes away in the middle of the run's logging: its params and metrics are in,
    # its tables, figures and score runs are not (the moment that leaves the most behind).
    log_table = tracking.log_table

    def stop_then_log_table(*args, **kwargs):
        running.stop()
        return log_table(*args, **kwargs)

    monkeypatch.setattr(tracking, "log_table", stop_then_log_table)
    started = time.monotonic()
    assert infer.main(argv) == 0
    elapsed = time.monotonic() - started
    monkeypatch.setattr(tracking, "log_table", log_table)
    captured = capsys.readouterr()
    assert not running.is_up()
    _report(capsys, f"inference: {elapsed:.1f} s, the server stopped while it logged")
    assert sorted(p.stem for p in (output / "slices").glob("*.parquet")) == sorted(PATIENTS)
    summary = json.loads((output / "summary.json").read_text())
    assert sorted(summary["computed"]) == sorted(PATIENTS)
    assert (output / "tables" / "methods.csv").is_file() and any((output / "figures").glob("*.png"))
    assert f"warning: MLflow tracking at {url} failed while logging the inference run" in captured.err
    assert f"re-log them with: python -m ray_jobs.relog --infer {output}" in captured.err
    assert "MLflow run not logged" in captured.out
    assert "Traceback" not in _without_logging_errors(captured.err), captured.err[-6000:]
    stale = tracking.read_run_record(output)
    assert stale is not None and stale["tracking_uri"] == url

    # 2. Run again with the server still down (from the start): every patient is complete, the
    # tables are rebuilt, and the job exits 0 quickly.
    started = time.monotonic()
    assert infer.main(argv) == 0
    down_s = time.monotonic() - started
    captured = capsys.readouterr()
    assert "2 already complete, 0 to run" in captured.out and "MLflow run not logged" in captured.out
    assert "failed while logging the inference run" in captured.err
    assert down_s < OUTAGE_BUDGET_S
    _report(capsys, f"inference re-run: {down_s:.1f} s with the server down throughout")

    # 3. The server is back: the interrupted run is RUNNING until the re-log ends it.
    running.start()
    assert tracking.get_run(url, stale["run_id"])["status"] == "RUNNING"
    assert relog.main(["--infer", str(output), "--tracking-uri", url]) == 0
    restored = _relogged(url, "infer")
    assert restored["status"] == "FINISHED"
    assert restored["params"]["D"] == "4" and "igconda_abs/lung/dsc_max_mean" in restored["metrics"]
    assert "tables/methods.csv" in tracking.list_artifacts(url, restored["run_id"], "tables")
    scores = tracking.find_runs(url, "igconda", f"tags.mlflow.parentRunId = '{restored['run_id']}'")
    assert scores and {r["status"] for r in scores} == {"FINISHED"}
    interrupted = tracking.get_run(url, stale["run_id"])
    assert interrupted["status"] == "FAILED"
    assert interrupted["tags"]["igconda.relogged_as"] == restored["run_id"]
    assert not [r for r in tracking.find_runs(url, "igconda", "attributes.status = 'RUNNING'")]
    assert tracking.read_run_record(output)["run_id"] == restored["run_id"]

