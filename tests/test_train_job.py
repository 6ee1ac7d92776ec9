"""The Ray Train job end to end: DDP on two CPU workers, checkpoints, the best pointer, MLflow,
--resume, recovery from a killed worker, and ``ray job submit`` against a ``ray start`` head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from igconda import checkpoint as ckpt
from igconda import tracking
from tests.ray_head import local_head
from tests.test_train_loop import make_slice_dataset

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_slice_dataset(tmp_path_factory.mktemp("data"), {"train": 4, "valid": 2})


def _job_args(data: Path, output: Path, *extra: str) -> list[str]:
    # 0.5 CPU per worker: ray_session has 2 CPUs and Ray Data's readers need one.
    return ["--data", str(data), "--output", str(output), "--config", "configs/test.yaml",
            "--num-workers", "2", "--cpus-per-worker", "0.5", "--torch-threads", "1", *extra]


@pytest.mark.e2e
def test_two_workers_train_checkpoint_log_and_resume(ray_session, dataset, tmp_path, repo_root,
                                                     monkeypatch):
    from ray_jobs import train as job

    monkeypatch.chdir(repo_root)
    output = tmp_path / "out"
    assert job.main(_job_args(dataset, output)) == 0

    pointer = ckpt.read_best_pointer(output)
    record = json.loads((output / job.RUN_RECORD).read_text())
    uri, run_id = record["tracking_uri"], record["run_id"]
    history = tracking.get_metric_history(uri, run_id, "valid_loss")
    assert [step for step, _ in history] == [1, 2]
    best_epoch, best_loss = min(history, key=lambda sv: sv[1])
    assert pointer["epoch"] == best_epoch and pointer["valid_loss"] == pytest.approx(best_loss)
    model, config = ckpt.load_model(output / ckpt.BEST_DIR)
    assert config.model.attention == "01" and config.train.num_workers == 2
    assert ckpt.load_metadata(output / ckpt.BEST_DIR)["world_size"] == 2
    # Both DDP replicas held identical weights at every checkpoint (checked across workers).
    assert [v for _, v in tracking.get_metric_history(uri, run_id, "replica_checksum_spread")] == [0.0, 0.0]

    run = tracking.get_run(uri, run_id)
    assert run["status"] == "FINISHED"
    assert set(config.flat()) <= set(run["params"])
    assert run["tags"]["igconda.variant"] == "01" and run["tags"]["igconda.method"] == "igconda"
    assert run["tags"]["igconda.data_version"].startswith("files:")
    assert not {"model.attention", "model.variant", "data.version"} & set(run["tags"])
    assert "best_checkpoint/model.safetensors" in tracking.list_artifacts(uri, run_id, "best_checkpoint")
    assert run["metrics"]["samples_per_s"] > 0

    # A second run into the same folder must be explicit.
    assert job.main(_job_args(dataset, output)) == 2

    # --resume continues after epoch 2, in the same MLflow run.
    assert job.main(_job_args(dataset, output, "--resume", "--epochs", "3")) == 0
    assert [s for s, _ in tracking.get_metric_history(uri, run_id, "train_loss")] == [1, 2, 3]
    latest = Path(output / "ray_results" / "train" / "checkpoint_epoch_000003")
    state = ckpt.load_train_state(latest)
    assert state["epoch"] == 3 and state["resumed_at"] == [2]
    assert [h["epoch"] for h in state["history"]] == [1.0, 2.0, 3.0]


def test_a_tracking_server_down_costs_neither_the_model_nor_the_exit_status(
        ray_session, dataset, tmp_path, repo_root, monkeypatch, capsys):
    from ray_jobs import train as job

    monkeypatch.chdir(repo_root)
    output = tmp_path / "out"
    assert job.main(_job_args(dataset, output, "--epochs", "1",
                              "--tracking-uri", "http://127.0.0.1:1")) == 0
    assert (output / ckpt.BEST_DIR / "model.safetensors").is_file()
    assert ckpt.read_best_pointer(output)["epoch"] == 1
    err = capsys.readouterr().err
    assert ("MLflow tracking at http://127.0.0.1:1 failed while opening the training run; "
            "training goes on without MLflow") in err
    assert f"python -m ray_jobs.relog --train {output.resolve()}" in err and "Traceback" not in err

    # The server fails after training, while the best checkpoint is logged: still exit 0, and the
    # run is ended (it used to stay RUNNING, with exit 1 after the model was saved).
    def upload_fails(*args, **kwargs):
        raise ConnectionError("server went away")

    import ray_jobs.train_tracking as train_tracking  # where fit_and_finish looks it up

    monkeypatch.setattr(train_tracking, "finish_mlflow_run", upload_fails)
    second = tmp_path / "second"
    assert job.main(_job_args(dataset, second, "--epochs", "1")) == 0
    assert (second / ckpt.BEST_DIR / "model.safetensors").is_file()
    assert "failed while logging the best checkpoint (ConnectionError: server went away)" in (
        capsys.readouterr().err)
    record = json.loads((second / job.RUN_RECORD).read_text())
    assert tracking.get_run(record["tracking_uri"], record["run_id"])["status"] == "FINISHED"


def test_small_splits_are_materialized_large_ones_streamed(ray_session, dataset, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from igconda.config import load_config
    from igconda.data.io import slices_root, tree_bytes
    from ray_jobs.train import build_trainer

    parquet = sum(p.stat().st_size for p in Path(slices_root(dataset)).rglob("*.parquet"))
    assert tree_bytes(slices_root(dataset)) >= parquet > 0
    config = load_config(Path(__file__).parents[1] / "configs" / "test.yaml")
    for max_mb, materialized in ((config.train.materialize_max_mb, True), (0, False)):
        trainer = build_trainer(config.replace("train", materialize_max_mb=max_mb), data=str(dataset),
                                storage_path=str(tmp_path / "storage"), run_name=f"m{max_mb}")
        kinds = {name: isinstance(ds, MaterializedDataset) for name, ds in trainer.datasets.items()}
        # train's block order is re-randomized each epoch (a lazy op on the materialized blocks).
        assert kinds["valid"] is materialized, kinds


def test_unhealthy_slices_are_oversampled_to_balance_the_classes(ray_session, dataset):
    import ray.data

    from ray_jobs.train_runs import label_counts, oversample_unhealthy

    path = str(Path(dataset) / "slices" / "train")
    counts = label_counts(path)
    labels = pq.read_table(path, columns=["label"])["label"].to_numpy()
    assert counts == {int(k): int((labels == k).sum()) for k in np.unique(labels)}
    healthy, unhealthy = counts[1], counts[2]
    train = ray.data.read_parquet(path).select_columns(["label", "patient_id"])
    balanced, repeats = oversample_unhealthy(train, counts)
    assert repeats == max(1, round(healthy / unhealthy))
    seen = balanced.to_pandas()["label"].value_counts().to_dict()
    assert seen == {1: healthy, 2: unhealthy * repeats}
    # Already balanced, or nothing to balance: the dataset comes back unchanged.
    assert oversample_unhealthy(train, {1: 5, 2: 5}) == (train, 1)
    assert oversample_unhealthy(train, {1: 5}) == (train, 1)


def test_a_killed_worker_is_recovered_from_the_last_checkpoint(ray_session, dataset, tmp_path):
    from igconda.config import load_config
    from ray_jobs.train import build_trainer

    # Streamed splits here (materialize_max_mb 0), so that path trains too; the other tests
    # train on splits materialized in the object store (the default for small data).
    config = load_config(Path(__file__).parents[1] / "configs" / "test.yaml",
                         overrides={"train": {"epochs": 2, "num_workers": 2, "max_failures": 1,
                                              "materialize_max_mb": 0}})
    marker = tmp_path / "killed"
    trainer = build_trainer(config, data=str(dataset), storage_path=str(tmp_path / "storage"),
                            run_name="faulty", cpus_per_worker=0.5, torch_threads=1,
                            fault={"epoch": 2, "rank": 1, "marker": str(marker),
                                   "run": [str(tmp_path / "storage"), "faulty"]})
    result = trainer.fit()
    assert marker.is_file()  # rank 1 really died at the start of epoch 2
    assert result.error is None
    with result.checkpoint.as_directory() as folder:
        state = ckpt.load_train_state(folder)
    assert state["epoch"] == 2
    assert state["resumed_at"] == [1]  # the restarted group continued from epoch 1's checkpoint
    assert [h["epoch"] for h in state["history"]] == [1.0, 2.0]


def test_a_failed_training_exits_1_naming_the_cause_and_how_to_resume(
        ray_session, dataset, tmp_path, capsys, monkeypatch):
    """Ray Train's WorkerGroupError (a TrainingFailedError) becomes one clear line and exit
    status 1, not a traceback; the --resume it names then finishes the training."""
    import yaml

    from ray_jobs import train

    study = yaml.safe_load((Path(__file__).parents[1] / "configs" / "test.yaml").read_text())
    study["train"]["max_failures"] = 0  # the first lost worker fails the run
    config = tmp_path / "no_restarts.yaml"
    config.write_text(yaml.safe_dump(study))
    output, marker = tmp_path / "out", tmp_path / "killed"
    build = train.build_trainer
    fault = {"epoch": 2, "rank": 1, "marker": str(marker),
             "run": [str(output / "ray_results"), "train"]}
    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: build(*a, **k, fault=fault))

    argv = _job_args(dataset, output, "--no-tracking", "--config", str(config))
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert marker.is_file()
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: training failed")]
    assert "train.max_failures" in line and "worker rank 1" in line
    assert str(output / "ray_results" / "train" / "checkpoint_epoch_000001") in line
    assert "--resume" in line
    assert not (output / "best").exists()

    # As the message says: the same command with --resume finishes from epoch 1's checkpoint.
    assert train.main(argv + ["--resume"]) == 0
    from ray_jobs.train_runs import latest_checkpoint

    last = latest_checkpoint(str(output / "ray_results"), "train")
    state = ckpt.load_train_state(last)
    assert last.name == "checkpoint_epoch_000002"
    assert state["resumed_at"] == [1] and state["epoch"] == 2
    assert (output / "best" / ckpt.MODEL_FILE).is_file()


@pytest.mark.e2e
def test_ray_job_submit_against_a_local_head(dataset, tmp_path, repo_root):
    """``ray start --head`` (token auth on) + ``ray job submit --working-dir .`` runs the job."""
    bin_dir = Path(sys.executable).parent
    with local_head() as (address, env):
        output = tmp_path / "out"
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                  "--", sys.executable, "-m", "ray_jobs.train",
                  *_job_args(dataset, output, "--epochs", "1")]
        done = subprocess.run(submit, cwd=repo_root, env=env, timeout=600, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()  # "Job '…' succeeded"
        assert (output / ckpt.BEST_DIR / ckpt.MODEL_FILE).is_file()
        record = json.loads((output / "mlflow_run.json").read_text())
        run = tracking.get_run(record["tracking_uri"], record["run_id"])
        assert run["status"] == "FINISHED" and "valid_loss" in run["metrics"]
