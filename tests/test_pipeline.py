"""The study pipeline: argument errors fast, and the tiny study end to end through ``ray job
submit`` against a local head (MLflow parent + one child run per stage, and the report)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from igconda import tracking
from igconda.data.study_layout import StudyLayout
from ray_jobs import pipeline, study_steps
from tests.ray_head import local_head


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  chanels: [8]\n")
    assert pipeline.main(["--config", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "model.chanels" in err


def test_study_paths_follow_the_stage_layout(tmp_path):
    paths = StudyLayout(tmp_path)
    assert paths.best_checkpoint == tmp_path / "train" / "best"
    assert paths.tuned == tmp_path / "tune" / "best.json"
    assert paths.report.name == "report.html"


@pytest.mark.ray
@pytest.mark.e2e
def test_tiny_study_through_ray_job_submit(tmp_path, repo_root):
    output = tmp_path / "study"
    with local_head() as (address, env):
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                  "--working-dir", ".", "--", sys.executable, "-m", "ray_jobs.pipeline",
                  "--config", "configs/test.yaml", "--output", str(output)]
        done = subprocess.run(submit, cwd=repo_root, env=env, timeout=1500, capture_output=True,
                              text=True)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    assert "succeeded" in log.lower()
    assert "report:" in done.stdout

    # Every stage left its output.
    assert (output / "cohorts" / "manifest.csv").is_file()
    assert (output / "data" / "dataset.json").is_file()
    assert (output / "train" / "best" / "model.safetensors").is_file()
    best = json.loads((output / "tune" / "best.json").read_text())
    assert {"noise_level", "guidance_scale"} <= set(best)
    assert (output / "infer" / "tables" / "methods.csv").is_file()
    html = (output / "report.html").read_text()
    assert "41" in html and "<img" in html

    # One MLflow parent run, and a child run for each stage under it.
    uri = tracking.resolve_tracking_uri("", output)
    runs = tracking.find_runs(uri, "igconda")
    parents = [r for r in runs if r["tags"].get("igconda.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["run_id"]]
    assert len(children) >= len(pipeline.STAGES)
    timings = json.loads((output / "timings.json").read_text())
    assert set(pipeline.STAGES) <= set(timings)


def test_train_plan_resumes_an_interrupted_run_and_force_starts_afresh(tmp_path):
    paths = StudyLayout(tmp_path)
    assert study_steps.train_plan(paths, forced=False) == "fresh"  # nothing there yet
    run = paths.train / "ray_results" / "train"
    run.mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert study_steps.train_plan(paths, forced=False) == "resume"  # checkpoints, no best
    assert study_steps.train_plan(paths, forced=True) == "fresh"
    paths.best_checkpoint.mkdir()
    (paths.best_checkpoint / "model.safetensors").write_bytes(b"weights")
    assert study_steps.train_plan(paths, forced=False) == "skip"  # finished
    assert study_steps.train_plan(paths, forced=True) == "fresh"


@pytest.mark.ray
@pytest.mark.e2e
def test_the_pipeline_resumes_an_interrupted_training(tmp_path, ray_session, repo_root,
                                                      monkeypatch, capsys):
    from igconda import checkpoint as ckpt
    from ray_jobs import train

    monkeypatch.chdir(repo_root)
    # mlflow.set_tracking_uri() in an earlier test of the session exports MLFLOW_TRACKING_URI,
    # which the pipeline honours; both runs must log to this study's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output = tmp_path / "study"
    common = ["--config", "configs/test.yaml", "--output", str(output), "--num-workers", "1",
              "--tracking-uri", str(output)]
    assert pipeline.main([*common, "--stop-after", "preprocess"]) == 0
    assert not (output / "train").exists()

    # A training stopped after epoch 1 of the config's 2: checkpoints, but no finished best/.
    assert train.main(["--data", str(output / "data"), "--output", str(output / "train"),
                       "--config", "configs/test.yaml", "--num-workers", "1", "--epochs", "1",
                       "--torch-threads", "1", "--tracking-uri", str(output)]) == 0
    first_run = json.loads((output / "train" / train.RUN_RECORD).read_text())["run_id"]
    ckpt_dir = output / "train" / "ray_results" / "train"
    shutil.rmtree(output / "train" / "best")
    (output / "train" / ckpt.BEST_POINTER).unlink()
    capsys.readouterr()

    assert pipeline.main([*common, "--stop-after", "train"]) == 0
    out = capsys.readouterr().out
    assert "resuming the interrupted training" in out and "checkpoint_epoch_000001" in out
    state = ckpt.load_train_state(ckpt_dir / "checkpoint_epoch_000002")
    assert state["resumed_at"] == [1] and [h["epoch"] for h in state["history"]] == [1.0, 2.0]
    assert (output / "train" / "best" / "model.safetensors").is_file()
    # The same MLflow run carries on.
    assert json.loads((output / "train" / train.RUN_RECORD).read_text())["run_id"] == first_run
    uri = tracking.resolve_tracking_uri(str(output), output)
    assert [s for s, _ in tracking.get_metric_history(uri, first_run, "train_loss")] == [1, 2]

    # --force train retrains from scratch instead of refusing the existing run.
    assert pipeline.main([*common, "--force", "train", "--stop-after", "train"]) == 0
    assert "training from scratch" in capsys.readouterr().out
    state = ckpt.load_train_state(ckpt_dir / "checkpoint_epoch_000002")
    assert state["resumed_at"] == [] and [h["epoch"] for h in state["history"]] == [1.0, 2.0]
    assert json.loads((output / "train" / train.RUN_RECORD).read_text())["run_id"] != first_run
