"""Checkpoint folders: round trip of weights, EMA, optimizer, config; safe loading; pointers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from igconda import checkpoint as ckpt
from igconda.train_loop import TrainingSession


@pytest.fixture()
def trained(test_config):
    """A session after two optimiser steps with EMA on (the first EMA update only copies the
    weights, the second makes the average differ from them)."""
    session = TrainingSession.create(test_config.replace("train", ema_decay=0.9))
    x0 = torch.rand(4, 1, 16, 16)
    labels = torch.tensor([1, 2, 1, 2])
    session.train_epoch([{"image": x0, "label": labels}] * 2, epoch=1)
    return session


def test_round_trip_weights_optimizer_config(trained, tmp_path):
    folder = trained.save(tmp_path / "epoch1", metadata={"valid_loss": 0.25, "is_best": True})
    names = {p.name for p in folder.iterdir()}
    assert names == {ckpt.CONFIG_FILE, ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.STATE_FILE, ckpt.METADATA_FILE}

    model, config = ckpt.load_model(folder, prefer_ema=False)
    assert config == trained.config
    for key, value in trained.module.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # The class embedding is part of the weights, its padding row (unconditional) still zero.
    assert "class_embedding.weight" in load_file(str(folder / ckpt.MODEL_FILE))
    assert torch.count_nonzero(model.class_embedding.weight[0]) == 0

    ema_model, _ = ckpt.load_model(folder)  # inference prefers EMA weights
    for key, value in trained.ema.module.state_dict().items():
        torch.testing.assert_close(ema_model.state_dict()[key], value)
    assert not all(torch.equal(ema_model.state_dict()[k], model.state_dict()[k]) for k in model.state_dict())

    state = ckpt.load_train_state(folder)  # torch.load(weights_only=True) inside
    assert state["epoch"] == 1
    saved_opt, live_opt = state["optimizer"], trained.optimizer.state_dict()
    assert saved_opt["param_groups"] == live_opt["param_groups"]
    for idx, entry in live_opt["state"].items():
        torch.testing.assert_close(saved_opt["state"][idx]["exp_avg"], entry["exp_avg"])
    assert int(state["ema_n_averaged"]) == 2
    meta = ckpt.load_metadata(folder)
    assert meta["valid_loss"] == 0.25 and meta["is_best"] is True and meta["epoch"] == 1


def test_train_state_holds_no_pickled_code(trained, tmp_path):
    folder = trained.save(tmp_path / "c")
    torch.load(folder / ckpt.STATE_FILE, weights_only=True)  # raises if anything needs unpickling code


def test_save_replaces_an_existing_folder_atomically(trained, tmp_path):
    target = tmp_path / "best"
    trained.save(target, metadata={"epoch_tag": 1})
    trained.save(target, metadata={"epoch_tag": 2})
    assert ckpt.load_metadata(target)["epoch_tag"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no temp folders left behind


def test_load_errors_name_the_problem(trained, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint folder"):
        ckpt.load_model(tmp_path)
    folder = trained.save(tmp_path / "c")
    (folder / ckpt.MODEL_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no model.safetensors"):
        ckpt.load_model(folder, prefer_ema=False)
    assert ckpt.load_train_state(tmp_path) is None


def test_weights_that_do_not_match_the_config_are_refused(trained, tmp_path):
    folder = trained.save(tmp_path / "c")
    text = (folder / ckpt.CONFIG_FILE).read_text().replace("attention: '01'", "attention: '11'")
    (folder / ckpt.CONFIG_FILE).write_text(text)
    with pytest.raises(ckpt.CheckpointError, match="do not match"):
        ckpt.load_model(folder, prefer_ema=False)


def test_best_pointer_round_trip(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="best_checkpoint.json"):
        ckpt.read_best_pointer(tmp_path)
    record = {"uri": "s3://bucket/run/checkpoint_epoch_000003", "epoch": 3, "valid_loss": 0.1}
    path = ckpt.write_best_pointer(tmp_path / "out", record)
    assert json.loads(path.read_text()) == record
    assert ckpt.read_best_pointer(tmp_path / "out") == record


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.EMA_FILE])
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_weights_are_a_checkpoint_error_naming_the_file(trained, tmp_path, name, damage):
    folder = trained.save(tmp_path / "c")
    path = folder / name
    if damage == "truncated":
        _truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(bytes(range(256)) * 8)
    pattern = rf"{name}: the checkpoint is damaged"
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        ckpt.load_model(folder, prefer_ema=name == ckpt.EMA_FILE)
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        ckpt.check_checkpoint(folder)  # headers only: what a job's driver checks up front


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_train_state_is_a_checkpoint_error_also_on_resume(trained, test_config, tmp_path, damage):
    folder = trained.save(tmp_path / "c")
    path = folder / ckpt.STATE_FILE
    if damage == "truncated":
        _truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x80\x04not a pickle at all" * 20)
    pattern = rf"{ckpt.STATE_FILE}: the checkpoint is damaged"
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        ckpt.load_train_state(folder)
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        ckpt.check_checkpoint(folder, resume=True)
    ckpt.check_checkpoint(folder)  # inference needs only the weights: still usable
    session = TrainingSession.create(test_config.replace("train", ema_decay=0.9))
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        session.restore(folder)


def test_restore_names_damaged_weights(trained, test_config, tmp_path):
    folder = trained.save(tmp_path / "c")
    _truncate(folder / ckpt.MODEL_FILE, keep=0.9)
    session = TrainingSession.create(test_config.replace("train", ema_decay=0.9))
    with pytest.raises(ckpt.CheckpointError, match=rf"{ckpt.MODEL_FILE}: the checkpoint is damaged"):
        session.restore(folder)


def test_a_sound_checkpoint_passes_the_check(trained, tmp_path):
    folder = trained.save(tmp_path / "c")
    ckpt.check_checkpoint(folder, resume=True)
    (folder / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="cannot resume"):
        ckpt.check_checkpoint(folder, resume=True)


def test_train_job_resume_refuses_a_damaged_latest_checkpoint_before_ray(trained, tmp_path, capsys):
    """``ray_jobs.train --resume`` checks the checkpoint Ray would restore, in the driver: on the
    workers it would fail every restart attempt, each with a remote traceback."""
    from ray_jobs import train as job

    run_dir = tmp_path / "out" / "ray_results" / "train"
    trained.save(run_dir / "checkpoint_epoch_000001")
    latest = trained.save(run_dir / "checkpoint_epoch_000002")
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": latest.name}}))
    _truncate(latest / ckpt.STATE_FILE)
    code = job.main(["--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                     "--config", "configs/test.yaml", "--resume", "--no-tracking"])
    assert code == 2
    assert f"{latest / ckpt.STATE_FILE}: the checkpoint is damaged" in capsys.readouterr().err


def test_train_jobs_run_record_is_written_atomically(tmp_path, monkeypatch):
    """``mlflow_run.json`` (read back by --resume) keeps its previous content when a write fails."""
    import argparse
    from pathlib import Path

    from igconda.config import load_config
    from ray_jobs import train_tracking as job

    class Logger:
        def __init__(self, *args):
            pass

        def log_params(self, params):
            pass

    monkeypatch.setattr(job.tracking, "create_run", lambda *a, **k: "run-2")
    monkeypatch.setattr(job.tracking, "RunLogger", Logger)
    record = tmp_path / job.RUN_RECORD
    record.write_text(json.dumps({"tracking_uri": "sqlite:///x.db", "run_id": "run-1"}))
    real_write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    args = argparse.Namespace(resume=False, experiment=None, data="d", parent_run_id=None,
                              run_name="train", cpus_per_worker=None, smoke_test=False)
    with pytest.raises(OSError, match="No space left"):
        job.open_mlflow_run(args, load_config(None), tmp_path, "sqlite:///x.db", "s", "hash")
    monkeypatch.undo()
    assert json.loads(record.read_text())["run_id"] == "run-1"
    assert [p.name for p in tmp_path.iterdir()] == [job.RUN_RECORD]
