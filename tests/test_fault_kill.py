"""Fault suite: drivers SIGKILLed mid-way on a Ray cluster, then re-run.

The preprocessing, training, tuning and batch-inference drivers are real processes connected to a real head
(tests/ray_head.py), killed with SIGKILL (no handler, no cleanup), as a spot node's or a user's
``kill -9`` would. The re-run does only the work the killed run had not finished, and its outputs
equal those of an undisturbed run. Each killed run is a ``python -c`` wrapper of the job that
pauses after each unit of work it records, so the kill lands between the first unit and the
last on any machine (on a fast one, every unit finished within one 50 ms poll and nothing was
left to re-run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import dataset_contents, make_checkpoint, make_dataset
from tests.ray_head import local_head

# Enough patients that the kill lands between the first finished patient and the last.
PATIENTS = {f"P{k}": (("lymphoma", "lung", "melanoma")[k % 3], "internal") for k in range(8)}
ARRAYS = ("anomaly_map", "counterfactual", "counterfactual_w0")
def paused_after_each(module: str, function: str, run: str) -> str:
    """A ``python -c`` program (argv follows ``-c``) running ``python -m <run>`` with a 5 s pause
    after every call of ``<module>.<function>``: a killed run's fault lands after the first unit
    of work and before the last whatever the machine's speed (on a fast one, polling alone let
    all the work finish between two 50 ms polls)."""
    return f"""
import sys, time
import {module} as target
original = target.{function}
def paused(*args, **kwargs):
    result = original(*args, **kwargs)
    time.sleep(5)
    return result
target.{function} = paused
import {run} as job
sys.exit(job.main(sys.argv[1:]))
"""


# ray_jobs.infer's driver, paused after every patient it has written (its parts merged).
SLOW_WRITES_DRIVER = paused_after_each("ray_jobs.infer", "finish_patient", "ray_jobs.infer")
# The pipeline's driver, paused after each patient result the preprocessing records.
SLOW_PREPROCESS_PIPELINE = paused_after_each("igconda.data.build", "record_result",
                                             "ray_jobs.pipeline")


# ray_jobs.tune's driver with a 5 s pause once Tune has saved its experiment state with each
# newly finished trial (TUNE_GLOBAL_CHECKPOINT_S=0: the state is saved every step, not every
# 10 s, so the finished trial is on disk before the pause).
SLOW_TUNE_DRIVER = """
import os, sys, time
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
from ray import tune
class PauseAfterEachFinishedTrial(tune.Callback):
    finished = 0
    def on_step_end(self, iteration, trials, **info):
        done = sum(t.status == "TERMINATED" for t in trials)
        if done > self.finished:
            self.finished = done
            time.sleep(5)
class RunConfig(tune.RunConfig):
    def __init__(self, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), PauseAfterEachFinishedTrial()]
        super().__init__(**kwargs)
tune.RunConfig = RunConfig
import ray_jobs.tune as job
sys.exit(job.main(sys.argv[1:]))
"""


# The pipeline's driver whose training holds rank 0 at the start of epoch 2, once Ray Train has
# registered epoch 1's checkpoint (the hold's marker file is argv[1], then the pipeline's argv).
HELD_TRAINING_PIPELINE = """
import sys
import ray_jobs.train as train
build, marker = train.build_trainer, sys.argv.pop(1)
def held_after_the_first_checkpoint(*args, **kwargs):
    fault = {"epoch": 2, "rank": 0, "marker": marker, "hold": True,
             "run": [kwargs["storage_path"], kwargs["run_name"]]}
    return build(*args, **kwargs, fault=fault)
train.build_trainer = held_after_the_first_checkpoint
import ray_jobs.pipeline as pipeline
sys.exit(pipeline.main(sys.argv[1:]))
"""


def written(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "slices").glob("*.parquet")) if folder.exists() else []


@pytest.mark.ray
@pytest.mark.e2e
def test_a_killed_inference_driver_reruns_only_the_missing_patients(tmp_path, test_config,
                                                                     repo_root):
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config, PATIENTS)
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    def job(output: Path, slow_writes: bool = False) -> list[str]:
        args = ["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
                "--tracking-uri", str(tmp_path / "mlruns.db"), "--batch-size", "4",
                "--concurrency", "1", "--no-volumes"]
        if not slow_writes:
            return [sys.executable, "-m", "ray_jobs.infer", *args]
        return [sys.executable, "-c", SLOW_WRITES_DRIVER, *args]  # the run to be killed

    with local_head() as (_, env):
        done = subprocess.run(job(reference), cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert written(reference) == sorted(PATIENTS)

        driver = subprocess.Popen(job(killed, slow_writes=True), cwd=repo_root, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while not written(killed) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL, "the job ended before it was killed"
        survivors = written(killed)
        assert 1 <= len(survivors) < len(PATIENTS), survivors
        kept = {pid: (killed / "slices" / f"{pid}.parquet").stat().st_mtime_ns for pid in survivors}

        again = subprocess.run(job(killed), cwd=repo_root, env=env, capture_output=True,
                               text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{len(survivors)} already complete, {len(PATIENTS) - len(survivors)} to run" in \
        again.stdout + again.stderr

    # Exactly the undisturbed run's outputs: the same patients, slices and values.
    assert written(killed) == sorted(PATIENTS)
    leftovers = [p.name for p in killed.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert leftovers == []
    assert not (killed / "slices" / ".parts").exists()  # the killed run's parts: merged or removed
    for pid in PATIENTS:
        ours = pq.read_table(killed / "slices" / f"{pid}.parquet").to_pandas()
        theirs = pq.read_table(reference / "slices" / f"{pid}.parquet").to_pandas()
        assert ours["slice_index"].tolist() == theirs["slice_index"].tolist()
        assert ours["slice_index"].is_unique
        for column in ARRAYS:
            np.testing.assert_allclose(np.stack(ours[column]), np.stack(theirs[column]),
                                       atol=1e-5, err_msg=f"{pid} {column}")
    # The survivors were kept as the killed run left them, not recomputed.
    assert {pid: (killed / "slices" / f"{pid}.parquet").stat().st_mtime_ns for pid in survivors} == kept
    assert (killed / "tables" / "methods.csv").is_file()


@pytest.mark.ray
@pytest.mark.e2e
def test_a_pipeline_killed_during_training_resumes_to_the_undisturbed_weights(tmp_path, repo_root):
    """Killed after its first checkpoint, the re-run pipeline resumes the training (it does not
    start again) and ends with the weights of a training that was never interrupted."""
    from safetensors.numpy import load_file

    from igconda import checkpoint as ckpt

    def pipeline(output: Path, held: Path | None = None) -> list[str]:
        args = ["--config", "configs/test.yaml", "--output", str(output), "--stop-after", "train",
                "--num-workers", "1", "--tracking-uri", str(output)]
        if held is None:
            return [sys.executable, "-m", "ray_jobs.pipeline", *args]
        return [sys.executable, "-c", HELD_TRAINING_PIPELINE, str(held), *args]

    from ray_jobs.train_runs import default_storage_path, latest_checkpoint

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with local_head() as (_, env):
        done = subprocess.run(pipeline(reference), cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        held = tmp_path / "held"
        driver = subprocess.Popen(pipeline(killed, held), cwd=repo_root, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + 900
        # Killed while the training holds at the start of epoch 2, once Ray Train has registered
        # epoch 1's checkpoint (before that there is no run to resume, and the re-run rightly
        # trains from scratch; waiting for the checkpoint alone raced the rest of the training).
        while not held.exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert latest_checkpoint(default_storage_path(killed / "train")).name == \
            "checkpoint_epoch_000001"
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL, "the pipeline ended before it was killed"
        assert not (killed / "train" / "best").exists()

        again = subprocess.run(pipeline(killed), cwd=repo_root, env=env, capture_output=True,
                               text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the interrupted training" in again.stdout
    assert "preprocess: output found, skipping" in again.stdout
    ours = load_file(str(killed / "train" / "best" / ckpt.MODEL_FILE))
    theirs = load_file(str(reference / "train" / "best" / ckpt.MODEL_FILE))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.ray
@pytest.mark.e2e
def test_a_pipeline_killed_during_preprocessing_resumes_the_missing_patients(tmp_path, repo_root):
    """Killed once the preprocessing has recorded its first patient, the re-run pipeline
    preprocesses only the others, and the dataset equals an undisturbed run's file for file."""
    from igconda.config import load_config
    from igconda.data.phantoms import generate_study

    manifest = generate_study(tmp_path / "cohorts", load_config(repo_root / "configs" / "test.yaml").phantoms,
                              progress=False)
    patients = len(manifest.read_text().strip().splitlines()) - 1

    def pipeline(output: Path, slow: bool = False) -> list[str]:
        args = ["--config", "configs/test.yaml", "--manifest", str(manifest), "--output",
                str(output), "--stop-after", "preprocess", "--tracking-uri", str(output)]
        return [sys.executable, *(["-c", SLOW_PREPROCESS_PIPELINE] if slow else
                                  ["-m", "ray_jobs.pipeline"]), *args]

    def recorded(study: Path) -> list[Path]:
        return list(study.glob(".data.tmp-*/.results/*.json"))

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with local_head() as (_, env):
        t0 = time.perf_counter()
        done = subprocess.run(pipeline(reference), cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=600)
        reference_s = time.perf_counter() - t0
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        driver = subprocess.Popen(pipeline(killed, slow=True), cwd=repo_root, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + 600
        while not recorded(killed) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL, "the pipeline ended before it was killed"
        survivors = len(recorded(killed))
        assert 1 <= survivors < patients
        assert not (killed / "data").exists()  # no half-written dataset in the output's place

        t0 = time.perf_counter()
        again = subprocess.run(pipeline(killed), cwd=repo_root, env=env, capture_output=True,
                               text=True, timeout=600)
        rerun_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (f"{survivors} of {patients} patients already done, {patients - survivors} to run"
            in again.stdout + again.stderr)
    assert dataset_contents(killed / "data") == dataset_contents(reference / "data")
    assert [p.name for p in killed.iterdir() if p.name.startswith(".")] == []  # no build left
    assert [p.name for p in killed.rglob("*") if ".tmp" in p.name] == []
    print(f"\npreprocess kill: undisturbed {reference_s:.1f} s, re-run after the kill {rerun_s:.1f} s "
          f"({survivors} of {patients} patients kept)")


def finished_trials(output: Path) -> tuple[int, int]:
    """(finished, all) trials in the tuning experiment a driver saved under ``output``."""
    import logging

    from ray.tune import ExperimentAnalysis

    # Running trials have no result file yet: Tune warns about each one on every poll.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    for experiment in (output / "ray_results").glob("tune-*"):
        try:
            trials = ExperimentAnalysis(str(experiment)).trials
        except Exception:  # not saved yet, or being written
            return 0, 0
        return sum(t.status == "TERMINATED" for t in trials), len(trials)
    return 0, 0


@pytest.mark.ray
@pytest.mark.e2e
def test_a_killed_tuning_driver_resumes_and_chooses_as_an_undisturbed_one(tmp_path, test_config,
                                                                          repo_root):
    """Killed once Tune has recorded a finished trial, the re-run keeps that trial, runs the
    others, and writes the undisturbed run's grid and best.json (the DDIM encode/decode is
    deterministic, so the trials' scores are equal, not merely close)."""
    import json

    import pandas as pd

    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config, {f"T{k}": ("lymphoma", "internal")
                                                         for k in range(3)}, split="tune")
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    def job(output: Path, slow: bool = False) -> list[str]:
        args = ["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
                "--config", "configs/test.yaml", "--tracking-uri", str(tmp_path / "mlruns.db")]
        return [sys.executable, *(["-c", SLOW_TUNE_DRIVER] if slow else ["-m", "ray_jobs.tune"]),
                *args]

    with local_head() as (_, env):
        t0 = time.perf_counter()
        done = subprocess.run(job(reference), cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=600)
        reference_s = time.perf_counter() - t0
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        driver = subprocess.Popen(job(killed, slow=True), cwd=repo_root, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + 600
        while finished_trials(killed)[0] == 0 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL, "the tuning ended before it was killed"
        finished, trials = finished_trials(killed)
        assert 1 <= finished < trials
        assert not (killed / "best.json").exists()

        t0 = time.perf_counter()
        again = subprocess.run(job(killed), cwd=repo_root, env=env, capture_output=True,
                               text=True, timeout=600)
        rerun_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{finished} of {trials} trials already finished" in again.stdout

    # The same grid (every score; only the timings differ) and the same choice.
    timing = ["seconds"]
    ours, theirs = (pd.read_csv(d / "grid.csv").drop(columns=timing) for d in (killed, reference))
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    ours, theirs = (json.loads((d / "best.json").read_text()) for d in (killed, reference))
    for varies in ("tuning_seconds", "mlflow_run_id", "seconds"):
        ours.pop(varies), theirs.pop(varies)
    assert ours == theirs
    assert [p.name for p in killed.rglob("*") if ".tmp" in p.name] == []
    print(f"\ntune kill: undisturbed {reference_s:.1f} s, re-run after the kill {rerun_s:.1f} s "
          f"({finished} of {trials} trials kept)")
