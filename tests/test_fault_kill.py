"""Fault suite: a batch-inference driver SIGKILLed mid-way on a Ray cluster, then re-run.

The re-run computes only the patients whose outputs the killed run had not finished, and the
outputs equal those of an undisturbed run: every test slice exactly once, no half-written file.
The driver is a real process connected to a real head (tests/ray_head.py), killed with SIGKILL
(no handler, no cleanup), as a spot node's or a user's ``kill -9`` would.
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

from tests.helpers import make_checkpoint, make_dataset
from tests.ray_head import local_head

# Enough patients that the kill lands between the first finished patient and the last.
PATIENTS = {f"P{k}": (("lymphoma", "lung", "melanoma")[k % 3], "internal") for k in range(8)}
ARRAYS = ("anomaly_map", "counterfactual", "counterfactual_w0")
# ray_jobs.infer's driver with a 5 s pause after every patient it writes (argv follows ``-c``).
SLOW_WRITES_DRIVER = """
import sys, time
import ray_jobs.infer as infer
write = infer.write_patient
def slow_write(*args, **kwargs):
    write(*args, **kwargs)
    time.sleep(5)
infer.write_patient = slow_write
sys.exit(infer.main(sys.argv[1:]))
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
        # The run to be killed pauses after each patient it writes, so the kill lands between
        # the first finished patient and the last whatever the machine's speed (on a fast one
        # all patients were written within one 50 ms poll and nothing was left to re-run).
        return [sys.executable, "-c", SLOW_WRITES_DRIVER, *args]

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

    def pipeline(output: Path) -> list[str]:
        return [sys.executable, "-m", "ray_jobs.pipeline", "--config", "configs/test.yaml",
                "--output", str(output), "--stop-after", "train", "--num-workers", "1",
                "--tracking-uri", str(output)]

    from ray_jobs.train_runs import default_storage_path, has_run

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with local_head() as (_, env):
        done = subprocess.run(pipeline(reference), cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        driver = subprocess.Popen(pipeline(killed), cwd=repo_root, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + 900
        # Killed once Ray Train has registered the first checkpoint (before that, there is no
        # run to resume and the re-run rightly trains from scratch).
        while not has_run(default_storage_path(killed / "train")) and driver.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
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
