"""Tracking outages: an unreachable MLflow server costs no result and no exit status, per-epoch
logging cannot stall, and ``python -m ray_jobs.relog`` logs the on-disk results afterwards.

No Ray here: the inference outputs are made by the predictor in-process, so the infer job finds
every patient complete and only scores, writes and logs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from igconda import tracking
from igconda.inference import CounterfactualPredictor
from igconda.tuned_model import write_model_folder
from ray_jobs import infer, relog
from tests.helpers import make_checkpoint, make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOWN = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused at once
PATIENTS = {"L1": ("lymphoma", "internal"), "N1": ("lung", "internal")}


@pytest.fixture
def small_timeouts(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.fixture(scope="module")
def study(tmp_path_factory, test_config):
    """A study folder with train/best, tune/, model/, data/ and infer/ predictions on disk."""
    root = tmp_path_factory.mktemp("study")
    best = make_checkpoint(root / "train" / "best", test_config)
    data = make_dataset(root / "data", test_config, PATIENTS)
    (data / "dataset.json").write_text(json.dumps({"patients": len(PATIENTS)}))
    (root / "tune").mkdir()
    (root / "tune" / "best.json").write_text(json.dumps({
        "noise_level": 4, "guidance_scale": 3.0, "stride": 2, "map_kind": "abs", "threshold": 0.1,
        "thresholds": {"igconda_abs": 0.1}, "mean_dsc": 0.4, "mean_dice_tau": 0.3}))
    pd.DataFrame([{"noise_level": 4, "guidance_scale": g, "map_kind": "abs", "stride": 2,
                   "mean_dsc": 0.3 + g / 10, "num_slices": 5} for g in (1.0, 3.0)]
                 ).to_csv(root / "tune" / "grid.csv", index=False)
    write_model_folder(best, {"noise_level": 4, "guidance_scale": 3.0, "stride": 2,
                              "map_kind": "abs", "threshold": 0.1, "source": {}}, root / "model")
    # The infer job's per-patient predictions, stamped as the job would stamp them.
    argv = _infer_argv(root, DOWN)
    _, settings = infer.resolve_config(infer.parse_args(argv))
    predictor = CounterfactualPredictor(best, noise_level=4, guidance_scale=3.0, stride=2,
                                        map_kind="abs", threshold=0.1, device="cpu",
                                        keep_inputs=True, score=False)
    for pid, source in infer.list_patients(data, "test").items():
        table = pq.read_table(source, columns=list(infer.PREDICTOR_INPUT)).to_pandas()
        batch = {k: (np.stack(table[k].map(np.asarray)) if k in ("image", "mask")
                     else table[k].to_numpy()) for k in table.columns}
        infer.write_patient(predictor(batch), root / "infer" / "slices" / f"{pid}.parquet",
                            settings, infer.input_digest(source))
    return root


def _infer_argv(root: Path, uri: str) -> list[str]:
    return ["--checkpoint", str(root / "train" / "best"), "--data", str(root / "data"),
            "--output", str(root / "infer"), "--tracking-uri", uri, "--no-volumes"]


def test_infer_with_the_tracking_server_down_keeps_its_results_and_exits_0(study, small_timeouts,
                                                                          capsys):
    started = time.perf_counter()
    assert infer.main(_infer_argv(study, DOWN)) == 0
    assert time.perf_counter() - started < 60
    captured = capsys.readouterr()
    assert "2 already complete, 0 to run" in captured.out
    assert f"warning: MLflow tracking at {DOWN} failed while logging the inference run" in captured.err
    assert f"python -m ray_jobs.relog --infer {study / 'infer'}" in captured.err
    assert "MLflow run not logged" in captured.out and "Traceback" not in captured.err
    # Everything is on disk.
    summary = json.loads((study / "infer" / "summary.json").read_text())
    assert summary["patients"] == 2 and summary["skipped"] == ["L1", "N1"]
    assert (study / "infer" / "tables" / "methods.csv").is_file()
    assert {"qualitative_lymphoma.png", "lesion_size.png"} <= {
        p.name for p in (study / "infer" / "figures").iterdir()}


def test_relog_restores_a_study_into_a_local_store(study, tmp_path, capsys):
    if not (study / "infer" / "summary.json").is_file():  # the outage test did not run first
        assert infer.main(_infer_argv(study, str(tmp_path / "scratch"))) == 0
    store = tmp_path / "store"
    assert relog.main(["--output", str(study), "--tracking-uri", str(store),
                       "--register-model", "igconda-relogged"]) == 0
    uri = tracking.resolve_tracking_uri(str(store), study)
    runs = {r["tags"]["igconda.stage"]: r for r in tracking.find_runs(uri, "igconda")
            if r["tags"].get("igconda.relogged") == "true"}
    assert set(runs) == {"pipeline", "train", "tune", "model", "infer"}
    parent = runs["pipeline"]["run_id"]
    assert all(runs[s]["tags"]["mlflow.parentRunId"] == parent for s in ("train", "tune", "model", "infer"))
    trials = tracking.find_runs(uri, "igconda", f"tags.mlflow.parentRunId = '{runs['tune']['run_id']}'")
    assert sorted(float(t["params"]["guidance_scale"]) for t in trials) == [1.0, 3.0]

    infer_run = runs["infer"]
    assert infer_run["params"]["D"] == "4" and infer_run["params"]["map_kind"] == "abs"
    assert "igconda_abs/lung/dsc_max_mean" in infer_run["metrics"]
    methods = pd.read_csv(study / "infer" / "tables" / "methods.csv")
    lung = methods[(methods.method == "igconda_abs") & (methods.group == "lung")].iloc[0]
    assert infer_run["metrics"]["igconda_abs/lung/dsc_max_mean"] == pytest.approx(lung["dsc_max_mean"])
    assert "tables/methods.csv" in tracking.list_artifacts(uri, infer_run["run_id"], "tables")
    import mlflow

    inputs = mlflow.MlflowClient(uri).get_run(infer_run["run_id"]).inputs.dataset_inputs
    assert [i.tags[0].value for i in inputs] == ["test"]  # the data it ran on, as run input

    tune_run = runs["tune"]
    assert tune_run["metrics"]["best_noise_level"] == 4 and tune_run["metrics"]["tau/igconda_abs"] == 0.1
    assert "tune/best.json" in tracking.list_artifacts(uri, tune_run["run_id"], "tune")
    assert runs["train"]["params"]["train.epochs"] == "2"
    assert "best_checkpoint/model.safetensors" in tracking.list_artifacts(
        uri, runs["train"]["run_id"], "best_checkpoint")

    # The model folder is a registered pyfunc model that MLflow loads by itself.
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/igconda-relogged/1")
    finally:
        # set_tracking_uri exports MLFLOW_TRACKING_URI, which every job honours: left set, it
        # sends later tests' jobs (told no store) to this one.
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    source = pq.read_table(study / "data" / "slices" / "test" / "N1.parquet").to_pandas()
    out = loaded.predict(source[["slice_index", "height", "width", "image"]].head(2))
    stored = pq.read_table(study / "infer" / "slices" / "N1.parquet").to_pandas().head(2)
    np.testing.assert_allclose(np.stack(out["anomaly_map"].to_numpy()),
                               np.stack(stored["anomaly_map"].map(np.asarray)), atol=1e-5)


def test_relog_with_nothing_to_log_is_exit_2(tmp_path, capsys):
    assert relog.main(["--output", str(tmp_path)]) == 2
    assert "nothing to re-log" in capsys.readouterr().err
    assert relog.main(["--infer", str(tmp_path / "nope")]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_run_logger_pauses_after_a_failure_so_epochs_do_not_stall(small_timeouts):
    logger = tracking.RunLogger(DOWN, "0" * 32, pause_after_failure_s=60)
    started = time.perf_counter()
    with pytest.raises(Exception, match="127.0.0.1:1"):  # MLflow's client error, naming the URL
        logger.log_metrics({"train_loss": 1.0}, step=1)
    assert time.perf_counter() - started < 15
    started = time.perf_counter()
    for epoch in range(2, 12):  # the next epochs are skipped at once, not retried
        logger.log_metrics({"train_loss": 1.0 / epoch}, step=epoch)
    assert time.perf_counter() - started < 0.5 and logger.skipped == 10


def test_outage_tolerant_warns_with_the_relog_command(capsys):
    with tracking.outage_tolerant("logging X", DOWN, on_disk="/study/x", relog="--infer /study/x") as state:
        raise ConnectionError("refused")
    assert state["ok"] is False and isinstance(state["error"], ConnectionError)
    err = capsys.readouterr().err
    assert f"warning: MLflow tracking at {DOWN} failed while logging X (ConnectionError: refused)" in err
    assert "on disk in /study/x" in err and "python -m ray_jobs.relog --infer /study/x" in err
    with pytest.raises(KeyboardInterrupt), tracking.outage_tolerant("logging X", DOWN):
        raise KeyboardInterrupt


def test_mlflow_http_retries_are_bounded_unless_set(monkeypatch):
    import importlib

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    importlib.reload(tracking)
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2  # igconda's bound, not MLflow's 7
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7  # a user's setting wins


def _infer_folder(study: Path, tmp_path: Path) -> Path:
    """A copy of the study's finished inference folder."""
    import shutil

    if not (study / "infer" / "summary.json").is_file():  # the outage test did not run first
        assert infer.main(_infer_argv(study, str(tmp_path / "scratch"))) == 0
    shutil.copytree(study / "infer", tmp_path / "infer")
    return tmp_path / "infer"


def test_relog_completes_a_training_run_an_outage_left_running(study, tmp_path, capsys):
    import shutil

    import torch

    from igconda import checkpoint as ckpt

    train = tmp_path / "train"
    shutil.copytree(study / "train", train)
    history = [{"epoch": 1.0, "train_loss": 0.9, "valid_loss": 0.8},
               {"epoch": 2.0, "train_loss": 0.7, "valid_loss": 0.6}]
    torch.save({"history": history}, train / ckpt.BEST_DIR / ckpt.STATE_FILE)
    ckpt.write_best_pointer(train, {"uri": str(train / ckpt.BEST_DIR), "epoch": 2, "valid_loss": 0.6})
    uri = tracking.resolve_tracking_uri(str(tmp_path / "store"), tmp_path)
    # The server went away after epoch 1 was logged: the run stayed RUNNING without the rest.
    run_id = tracking.create_run(uri, "igconda", "train-01")
    tracking.RunLogger(uri, run_id).log_metrics({"train_loss": 0.9, "valid_loss": 0.8}, step=1)
    tracking.write_run_record(train, uri, run_id, "igconda")

    argv = ["--train", str(train), "--tracking-uri", str(tmp_path / "store")]
    assert relog.main(argv) == 0
    assert f"relog: completed the training run {run_id}" in capsys.readouterr().out
    run = tracking.get_run(uri, run_id)
    assert run["status"] == "FINISHED"
    for key, values in (("train_loss", [0.9, 0.7]), ("valid_loss", [0.8, 0.6])):
        assert tracking.get_metric_history(uri, run_id, key) == list(zip([1, 2], values, strict=True)), key
    assert run["tags"]["best_checkpoint.epoch"] == "2" and run["metrics"]["best/valid_loss"] == 0.6
    assert "best_checkpoint/model.safetensors" in tracking.list_artifacts(uri, run_id, "best_checkpoint")
    # A second re-log leaves the finished run as it is.
    assert relog.main(argv) == 0
    assert "completed the training run" not in capsys.readouterr().out
    assert len(tracking.get_metric_history(uri, run_id, "valid_loss")) == 2


def test_relog_ends_an_inference_run_an_outage_left_running(study, tmp_path, capsys):
    folder = _infer_folder(study, tmp_path)
    uri = tracking.resolve_tracking_uri(str(tmp_path / "store"), tmp_path)
    # The server went away while the run logged one of its score runs: both stayed RUNNING.
    stale = tracking.create_run(uri, "igconda", "infer")
    child = tracking.create_run(uri, "igconda", "score-igconda_abs", parent_run_id=stale)
    tracking.write_run_record(folder, uri, stale)

    assert relog.main(["--infer", str(folder), "--tracking-uri", str(tmp_path / "store")]) == 0
    relogged = [r for r in tracking.find_runs(uri, "igconda", "tags.\"igconda.stage\" = 'infer'")
                if r["tags"].get("igconda.relogged") == "true"]
    assert len(relogged) == 1 and relogged[0]["status"] == "FINISHED"
    new_id = relogged[0]["run_id"]
    assert f"ended the inference run {stale} an outage left RUNNING as FAILED" in capsys.readouterr().out
    ended = tracking.get_run(uri, stale)
    assert ended["status"] == "FAILED" and ended["tags"]["igconda.relogged_as"] == new_id
    assert tracking.get_run(uri, child)["status"] == "FAILED"
    # The folder's record now names the run that holds its results.
    assert tracking.read_run_record(folder) == {"tracking_uri": uri, "run_id": new_id,
                                                "experiment": None}


def test_an_outage_warning_is_printed_once_without_logging_set_up():
    import subprocess
    import sys

    code = ("from igconda import tracking; "
            "tracking.warn_outage('logging X', 'http://h:1', ConnectionError('refused'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: MLflow tracking at http://h:1 failed while logging X") == 1
