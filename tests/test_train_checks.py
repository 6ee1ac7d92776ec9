"""What the training jobs refuse on the driver, before Ray starts: a ``--resume`` on another
dataset version than the checkpoint's, and ``--data`` preprocessed otherwise than the config says.

No training runs here: the run folder is faked as Ray Train leaves it (a checkpoint folder and
``checkpoint_manager_snapshot.json`` naming it), as in tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from igconda.data.compat import settings_record
from igconda.train_loop import DATA_VERSION_KEY, TrainingSession, dataset_version
from ray_jobs.train_runs import UsageError, check_resume, check_resume_data
from tests.test_train_loop import make_slice_dataset


def fake_run(run_dir: Path, config, data_version: str | None) -> Path:
    """``run_dir`` holding one checkpoint (recording ``data_version``) as Ray Train's latest."""
    metadata = {DATA_VERSION_KEY: data_version} if data_version is not None else {}
    latest = TrainingSession.create(config).save(run_dir / "checkpoint_epoch_000002", metadata=metadata)
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": latest.name}}))
    return latest


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two dataset versions: the same slices, one patient more in the second."""
    root = tmp_path_factory.mktemp("data")
    return (make_slice_dataset(root / "v1", {"train": 2, "valid": 1}),
            make_slice_dataset(root / "v2", {"train": 3, "valid": 1}))


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if a job goes on to start Ray."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the job went on to start Ray"))


def test_resume_continues_only_on_the_checkpoints_data_version(tmp_path, test_config, datasets):
    v1, v2 = datasets
    latest = fake_run(tmp_path / "train", test_config, dataset_version(str(v1)))
    check_resume(str(tmp_path), "train", True, lambda _: None, data=str(v1))  # same data: fine
    with pytest.raises(UsageError) as err:
        check_resume(str(tmp_path), "train", True, lambda _: None, data=str(v2))
    message = str(err.value)
    assert f"checkpoint {latest} was trained on data version {dataset_version(str(v1))}" in message
    assert f"--data {v2} is version {dataset_version(str(v2))}" in message
    assert "resume with the data the run was trained on" in message and "new --output" in message


def test_checkpoints_that_record_no_version_resume_on_any_data(tmp_path, test_config, datasets):
    latest = fake_run(tmp_path / "train", test_config, None)
    check_resume_data(latest, str(datasets[1]))
    (latest / "metadata.json").write_text("[]")  # not a mapping: nothing to hold the data to
    check_resume_data(latest, str(datasets[1]))


def test_train_job_refuses_to_resume_on_other_data_before_ray(tmp_path, test_config, datasets,
                                                              repo_root, no_ray, capsys):
    from ray_jobs import train as job

    v1, v2 = datasets
    latest = fake_run(tmp_path / "out" / "ray_results" / "train", test_config,
                      dataset_version(str(v1)))
    code = job.main(["--data", str(v2), "--output", str(tmp_path / "out"), "--config",
                     str(repo_root / "configs" / "test.yaml"), "--resume", "--no-tracking"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"checkpoint {latest} was trained on data version" in err and "Traceback" not in err


def test_train_baseline_job_refuses_to_resume_on_other_data_before_ray(tmp_path, test_config,
                                                                       datasets, repo_root,
                                                                       no_ray, capsys):
    from ray_jobs import train_baseline as job

    v1, v2 = datasets
    latest = fake_run(tmp_path / "out" / "ray_results" / "supervised", test_config,
                      dataset_version(str(v1)))
    code = job.main(["--method", "supervised", "--data", str(v2), "--output", str(tmp_path / "out"),
                     "--config", str(repo_root / "configs" / "test.yaml"), "--resume",
                     "--no-tracking"])
    assert code == 2
    assert f"checkpoint {latest} was trained on data version" in capsys.readouterr().err


def test_train_job_refuses_data_preprocessed_otherwise_than_its_config(tmp_path, test_config,
                                                                      repo_root, no_ray, capsys):
    """Every checkpoint stores the config's preprocess section as how its data were made."""
    data = make_slice_dataset(tmp_path / "data", {"train": 1, "valid": 1})
    recorded = {**settings_record(test_config.preprocess), "spacing_mm": [2.0, 2.0, 3.0]}
    (data / "dataset.json").write_text(json.dumps({"config": recorded}))
    config = repo_root / "configs" / "test.yaml"
    from ray_jobs import train as job

    code = job.main(
        ["--data", str(data), "--output", str(tmp_path / "out"), "--config", str(config),
         "--no-tracking"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}/dataset.json" in err and f"--config {config}" in err
    assert "preprocess.spacing_mm: data [2.0, 2.0, 3.0], expected [12.0, 12.0, 12.0]" in err
