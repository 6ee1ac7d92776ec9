"""The bad-input corpus, part two: command lines, jobs refusing data before Ray, checkpoints.

Part one (volumes, manifest rows, configs) and the whole corpus (:data:`tests.bad_inputs.CASES`)
are in ``tests/bad_inputs.py``; how a case is tried is in ``tests/bad_input_harness.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc

from igconda.checkpoint import MODEL_FILE, STATE_FILE, CheckpointError, check_checkpoint
from igconda.config import load_config
from igconda.data.compat import PreprocessMismatch, check_data_for_checkpoint, settings_record
from igconda.data.schema import HEALTHY
from tests.bad_input_harness import Attempt, Case, CommandError, registrar, run_command
from tests.data.nifti_fixtures import LPS, pet_and_mask, write_nifti

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "test.yaml"

JOB_CASES: list[Case] = []
case = registrar(JOB_CASES)


# ---- command lines ------------------------------------------------------------------------------

def _argv(module: str, argv: list[str], option: str):
    def make(d: Path) -> Attempt:
        import importlib

        main = importlib.import_module(module).main
        return Attempt(lambda: run_command(main, argv), option, ("must be",))
    return make


for _module, _argv_list, _option in [
        ("igconda.cli", ["detect", "s.nii.gz", "--checkpoint", "c", "-o", "o.nii.gz", "--batch-size", "0"], "--batch-size"),
        ("ray_jobs.train", ["--data", "d", "--output", "o", "--num-workers", "-1"], "--num-workers"),
        ("ray_jobs.infer", ["--checkpoint", "c", "--data", "d", "--output", "o", "--num-gpus", "-1"], "--num-gpus"),
        ("ray_jobs.preprocess", ["--manifest", "m", "--output", "o", "--num-cpus-per-volume", "-1"],
         "--num-cpus-per-volume")]:
    JOB_CASES.append(Case(f"{_module} {_option} {_argv_list[-1]}", f"{_option} {_argv_list[-1]}",
                      f"command line ({_module}, argparse)", CommandError, _argv(_module, _argv_list, _option)))


@case("detect_overwrites_scan", "igconda detect -o naming the input scan", "command line (igconda detect)",
      CommandError)
def _overwrite(d):
    from igconda.cli import main

    scan = write_nifti(d / "scan.nii.gz", pet_and_mask()[0], LPS)
    return Attempt(lambda: run_command(main, ["detect", str(scan), "--checkpoint", str(d / "c"), "-o", str(scan)]),
                   str(scan), ("refusing to overwrite", "write the output to another file"))


def _healthy_only_data(d: Path) -> None:
    """train and valid splits whose lesion slices were dropped (one patient each)."""
    import pyarrow.parquet as pq

    from tests.test_train_loop import volume_table

    for split in ("train", "valid"):
        (d / "slices" / split).mkdir(parents=True)
        table = volume_table(f"{split}-0")
        table = table.filter(pc.equal(table["label"], HEALTHY))  # the lesion's slices dropped
        pq.write_table(table, d / "slices" / split / f"{split}-0.parquet")


def _refused_before_ray(d: Path, main, argv: list[str], named: str | None = None,
                        words: tuple[str, ...] = ("no unhealthy (lesion) slice",
                                                  "Add patients with lesions")) -> Attempt:
    """The job on healthy-only data; were it accepted, it would start Ray: fail instead."""
    _healthy_only_data(d)

    def call():
        import ray

        real = ray.init
        ray.init = _no_ray
        try:
            run_command(main, argv)
        finally:
            ray.init = real
    return Attempt(call, named or f"{d}/slices/train", words)


@case("train_without_unhealthy", "a train split with no unhealthy slice", "training driver "
      "(ray_jobs.train, before Ray)", CommandError)
def _healthy_only(d):
    from ray_jobs import train

    return _refused_before_ray(d, train.main, ["--data", str(d), "--output", str(d / "out"),
                                               "--config", str(TEST_CONFIG), "--no-tracking"])


@case("baseline_without_unhealthy", "a train split with no unhealthy slice, for a baseline",
      "baseline training driver (ray_jobs.train_baseline, before Ray)", CommandError)
def _healthy_only_baseline(d):
    from ray_jobs import train_baseline

    return _refused_before_ray(d, train_baseline.main, [
        "--method", "hirescam", "--data", str(d), "--output", str(d / "out"), "--config",
        str(TEST_CONFIG), "--no-tracking"])


@case("infer_without_unhealthy", "inference on a split with no unhealthy slice", "inference "
      "driver (ray_jobs.infer, before Ray)", CommandError)
def _healthy_only_infer(d):
    from ray_jobs import infer

    folder = _checkpoint(d)
    return _refused_before_ray(d, infer.main, [
        "--checkpoint", str(folder), "--data", str(d), "--output", str(d / "out"), "--split",
        "train", "--tracking-uri", str(d / "mlruns.db")], named=str(d / "slices" / "train"),
        words=("no unhealthy (lesion) slice to score", "run on a split with lesions"))


def _no_ray(*_, **__):
    raise RuntimeError("the job went on to start Ray")


# ---- checkpoints and the data they were made with -----------------------------------------------

def _checkpoint(d: Path) -> Path:
    from tests.helpers import make_checkpoint

    return make_checkpoint(d / "ckpt", load_config(TEST_CONFIG))


@case("truncated_weights", "a truncated model.safetensors", "checkpoint check (igconda.checkpoint."
      "check_checkpoint, every job's driver)", CheckpointError)
def _weights(d):
    folder = _checkpoint(d)
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Attempt(lambda: check_checkpoint(folder), str(path), ("the checkpoint is damaged",
                                                                 "copy the checkpoint folder again"))


@case("corrupt_train_state", "a corrupt train_state.pt on resume", "checkpoint check on --resume "
      "(igconda.checkpoint.check_checkpoint)", CheckpointError)
def _state(d):
    folder = _checkpoint(d)
    (folder / STATE_FILE).write_bytes(b"\x80\x04not a pickle at all" * 20)
    return Attempt(lambda: check_checkpoint(folder, resume=True), str(folder / STATE_FILE),
                   ("the checkpoint is damaged", "copy the checkpoint folder again"))


@case("resume_other_data", "--resume with other data than the checkpoint's", "training driver "
      "(ray_jobs.train_runs.check_resume_data)", ValueError)
def _resume(d):
    from igconda.train_loop import DATA_VERSION_KEY, dataset_version
    from ray_jobs.train_runs import check_resume_data
    from tests.test_train_loop import make_slice_dataset

    v1 = make_slice_dataset(d / "v1", {"train": 1, "valid": 1})
    v2 = make_slice_dataset(d / "v2", {"train": 2, "valid": 1})
    folder = _checkpoint(d)
    (folder / "metadata.json").write_text(json.dumps({DATA_VERSION_KEY: dataset_version(str(v1))}))
    return Attempt(lambda: check_resume_data(folder, str(v2)), str(folder),
                   (f"--data {v2}", "resume with the data the run was trained on"))


@case("data_other_settings", "inference data preprocessed with other settings than the checkpoint's",
      "inference/tuning driver (igconda.data.compat.check_data_for_checkpoint)", PreprocessMismatch)
def _settings(d):
    folder = _checkpoint(d)
    recorded = {**settings_record(load_config(TEST_CONFIG).preprocess), "spacing_mm": [2.0, 2.0, 3.0]}
    (d / "data").mkdir()
    (d / "data" / "dataset.json").write_text(json.dumps({"config": recorded}))
    return Attempt(lambda: check_data_for_checkpoint(d / "data", folder), f"{d / 'data'}/dataset.json",
                   ("preprocess.spacing_mm", "Preprocess the scans again with the checkpoint's settings"))
