"""The bad-input corpus as data: one :class:`~tests.bad_input_harness.Case` per known bad input.

Each names what is wrong, the entry point it goes through (a library check a job's task or
driver runs, a config load, a command line's argument parsing, ...), the error type expected,
and builds its input small (a few-KB NIfTI written with nibabel, a YAML, a damaged checkpoint);
its :class:`~tests.bad_input_harness.Attempt` holds the words the refusal must contain: the file
or setting, and the fix. ``batch`` cases are also patients of the mixed manifest that the
preprocessing job must get through without losing a good patient (tests/bad_input_harness.py).

Report (tried / refused clearly / good patients lost; starts a local Ray of its own)::

    python -m tests.bad_inputs
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.compute as pc

from igconda.checkpoint import MODEL_FILE, STATE_FILE, CheckpointError, check_checkpoint
from igconda.config import ConfigError, load_config
from igconda.data.build import PreprocessingError, build_dataset
from igconda.data.compat import PreprocessMismatch, check_data_for_checkpoint, settings_record
from igconda.data.manifest import ManifestError, read_manifest
from igconda.data.preprocess import preprocess_volume
from igconda.data.schema import HEALTHY
from igconda.data.volumes import VolumeError
from tests.bad_input_harness import CONFIG, Attempt, Case, CommandError, run_command
from tests.data.nifti_fixtures import LPS, ct_like, pet_and_mask, write_manifest_csv, write_nifti

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "test.yaml"

PREPROCESS = "preprocessing task (igconda.data.preprocess.preprocess_volume)"
MANIFEST = "manifest (igconda.data.manifest.read_manifest)"
CONFIG_LOAD = "config load (igconda.config.load_config)"
CASES: list[Case] = []


def case(name: str, wrong: str, entry: str, expected: type[BaseException], batch: bool = False):
    """Register the decorated ``make(folder) -> Attempt`` as a case."""
    def register(make):
        CASES.append(Case(name, wrong, entry, expected, make, batch))
        return make
    return register


# ---- volumes: what one preprocessing task refuses (and the job lists in rejects.csv) ----------

def _volume(folder: Path, pid: str, pet: np.ndarray | None, mask: np.ndarray | None = None,
            *words: str, named: str = "pet", pet_affine=LPS, mask_affine=LPS) -> Attempt:
    """``images/<pid>.nii.gz`` (and ``labels/<pid>.nii.gz``) from arrays (None: not written)."""
    pet_file = folder / "images" / f"{pid}.nii.gz"
    mask_file = folder / "labels" / f"{pid}.nii.gz" if mask is not None else None
    if pet is not None:
        write_nifti(pet_file, pet, pet_affine)
    if mask_file is not None:
        write_nifti(mask_file, mask, mask_affine)
    row = (pid, "lung", "FDG", f"images/{pid}.nii.gz", f"labels/{pid}.nii.gz" if mask_file else "", "internal")
    return Attempt(lambda: preprocess_volume(pet_file, mask_file, CONFIG),
                   str(pet_file if named == "pet" else mask_file), words, [row])


def _pet(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return pet_and_mask(seed=seed)


@case("ct_as_pet", "a CT in Hounsfield units (negative values) given as the PET", PREPROCESS, VolumeError, True)
def _ct(d):
    return _volume(d, "ct_as_pet", ct_like(), None, "Hounsfield", "give the PET image (in SUV) as pet_path")


@case("activity_as_pet", "a PET in Bq/mL, not SUV", PREPROCESS, VolumeError, True)
def _bq(d):
    return _volume(d, "activity_as_pet", _pet()[0] * 5000, None, "no SUV", "convert it to SUV first")


@case("nan_pet", "a PET with a NaN voxel", PREPROCESS, VolumeError, True)
def _nan(d):
    pet = _pet()[0]
    pet[1, 2, 3] = np.nan
    return _volume(d, "nan_pet", pet, None, "NaN/Inf", "export the scan again")


@case("inf_pet", "a PET with an infinite voxel", PREPROCESS, VolumeError, True)
def _inf(d):
    pet = _pet()[0]
    pet[4, 4, 4] = np.inf
    return _volume(d, "inf_pet", pet, None, "NaN/Inf", "export the scan again")


@case("all_zero_pet", "an all-zero PET (empty scan)", PREPROCESS, VolumeError, True)
def _zero(d):
    return _volume(d, "all_zero_pet", np.zeros((24, 24, 20), np.float32), None, "all zero",
                   "check that pet_path names the PET series")


@case("constant_pet", "a constant PET (nothing to scale)", PREPROCESS, VolumeError, True)
def _constant(d):
    return _volume(d, "constant_pet", np.full((24, 24, 20), 2.0, np.float32), None, "constant",
                   "check that pet_path names the PET series")


@case("missing_pet", "a PET file that does not exist", PREPROCESS, VolumeError, True)
def _missing(d):
    return _volume(d, "missing_pet", None, None, "file not found", "check the path")


@case("truncated_pet", "a truncated .nii.gz", PREPROCESS, VolumeError, True)
def _truncated(d):
    attempt = _volume(d, "truncated_pet", _pet()[0], None, "unreadable or corrupt", "copy or export it again")
    path = Path(attempt.named)
    path.write_bytes(path.read_bytes()[:300])
    return attempt


@case("image_2d", "a 2-D image given as the PET", PREPROCESS, VolumeError, True)
def _2d(d):
    return _volume(d, "image_2d", _pet()[0][:, :, 0], None, "expected a 3D image", "give one 3D volume")


@case("image_4d", "a dynamic 4-D series given as the PET", PREPROCESS, VolumeError, True)
def _4d(d):
    return _volume(d, "image_4d", np.stack([_pet()[0]] * 2, axis=-1), None, "got 4D", "give one 3D volume")


@case("mask_shape", "a mask of another shape than its PET", PREPROCESS, VolumeError, True)
def _mask_shape(d):
    pet, mask = _pet()
    return _volume(d, "mask_shape", pet, mask[:-1], "does not match PET shape", "resample the mask",
                   named="mask")


@case("mask_affine", "a mask on another grid (affine) than its PET", PREPROCESS, VolumeError, True)
def _mask_affine(d):
    pet, mask = _pet()
    shifted = LPS.copy()
    shifted[0, 3] += 2.0
    return _volume(d, "mask_affine", pet, mask, "affine differs", "resample the mask", named="mask",
                   mask_affine=shifted)


@case("mask_not_binary", "a multi-label mask without preprocess.binarize_mask", PREPROCESS, VolumeError, True)
def _mask_values(d):
    pet, mask = _pet()
    return _volume(d, "mask_not_binary", pet, mask * 3, "not binary", "preprocess.binarize_mask",
                   named="mask")


@case("too_large", "a volume larger than any Ray node's memory", "preprocessing job's memory plan "
      "(ray_jobs.preprocess.plan_memory)", VolumeError, True)
def _too_large(d):
    from ray_jobs.preprocess import plan_memory

    # Only the header: the job reads headers alone to size and refuse, so it never reads voxels.
    path = d / "images" / "too_large.nii"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.float32)
    header.set_qform(LPS, code=1)
    header.set_sform(LPS, code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4)
    item = {"patient_id": "too_large", "pet_path": str(path), "mask_path": ""}

    def call():
        _, refused, _ = plan_memory([item], CONFIG, capacity=64 * 2 ** 30)  # a 64 GiB node
        if refused:
            raise VolumeError(refused[0]["file"], refused[0]["problem"])
    row = ("too_large", "lung", "FDG", "images/too_large.nii", "", "internal")
    return Attempt(call, str(path), ("GiB", "crop or downsample the scan"), [row])


# ---- manifest rows ------------------------------------------------------------------------------

def _rows(folder: Path, name: str, rows: list[tuple[str, ...]], *words: str) -> Attempt:
    """Bad manifest rows (their PET files written under the case's name); the single attempt
    reads a manifest of those rows alone."""
    pet = write_nifti(folder / "images" / f"{name}.nii.gz", _pet(seed=7)[0], LPS)
    rows = [tuple(str(pet.relative_to(folder)) if v == "PET" else v for v in r) for r in rows]
    manifest = write_manifest_csv(folder / f"{name}.csv", rows)
    return Attempt(lambda: read_manifest(manifest), str(manifest), words, rows)


@case("same_pet_two_ids", "one PET file under two patient ids (a train/test leak)", MANIFEST, ManifestError, True)
def _alias(d):
    return _rows(d, "alias", [("alias_a", "lung", "FDG", "PET", "", "internal"),
                              ("alias_b", "lymphoma", "FDG", "PET", "", "internal")],
                 "is listed under patient ids", "keep one row for it")


@case("duplicate_id", "a patient id on two rows", MANIFEST, ManifestError, True)
def _dup(d):
    return _rows(d, "dup", [("dup", "lung", "FDG", "PET", "", "internal")] * 2,
                 "duplicate patient_id", "give each study its own patient_id")


@case("unknown_role", "an unknown manifest role", MANIFEST, ManifestError, True)
def _role(d):
    return _rows(d, "role", [("role_x", "lung", "FDG", "PET", "", "holdout")], "unknown role", "expected one of")


@case("unsafe_id", "a patient id that is no file name", MANIFEST, ManifestError, True)
def _unsafe(d):
    return _rows(d, "unsafe", [("../evil", "lung", "FDG", "PET", "", "internal")], "'../evil'",
                 "must start with a letter or digit")


@case("empty_field", "a row with an empty cohort", MANIFEST, ManifestError, True)
def _empty(d):
    return _rows(d, "empty", [("empty_c", "", "FDG", "PET", "", "internal")], "empty value for cohort", "fill it in")


@case("manifest_column", "a manifest without the role column", MANIFEST, ManifestError)
def _column(d):
    path = d / "m.csv"
    path.write_text("patient_id,cohort,tracer,pet_path,mask_path\nP1,a,FDG,p.nii.gz,\n")
    return Attempt(lambda: read_manifest(path), str(path), ("missing required column(s) role", "header has"))


@case("manifest_missing", "a manifest file that does not exist", MANIFEST, ManifestError)
def _no_manifest(d):
    return Attempt(lambda: read_manifest(d / "nope.csv"), str(d / "nope.csv"), ("manifest file not found",))


@case("output_not_dataset", "--output a non-empty folder that is no dataset", "preprocessing job "
      "(igconda.data.build.build_dataset)", PreprocessingError)
def _output(d):
    (d / "home").mkdir()
    (d / "home" / "notes.txt").write_text("mine")
    return Attempt(lambda: build_dataset(d / "m.csv", d / "home", CONFIG), str(d / "home"),
                   ("not an igconda dataset", "choose another --output"))


# ---- study configs ------------------------------------------------------------------------------

def _config(key: str, value, *words: str):
    section, name = key.split(".")

    def make(d: Path) -> Attempt:
        path = d / "study.yaml"
        path.write_text(TEST_CONFIG.read_text())
        return Attempt(lambda: load_config(path, {section: {name: value}}), str(path), (key, *words))
    return make


for _key, _value, _words in [
        ("preprocess.valid_fraction", 0, ("leaves no validation patients", "set it > 0")),
        ("tune.stride", 0, ("must be >= 1",)),
        ("infer.stride", -2, ("must be >= 1",)),
        ("tune.gpus_per_trial", -1, ("must be >= 0",)),
        ("infer.num_cpus_per_actor", -1, ("must be >= 0",)),
        ("preprocess.num_cpus_per_volume", -1, ("must be >= 0",)),
        ("train.seed", -3, ("must be >= 0",)),
        ("tune.num_samples", -1, ("must be >= 1",)),
        ("tune.num_samples", 0, ("must be >= 1",)),
        ("train.num_workers", 0, ("must be >= 1",)),
        ("train.max_failures", -5, ("must be >= 0", "-1"))]:
    CASES.append(Case(f"{_key}={_value}", f"{_key}: {_value}", CONFIG_LOAD, ConfigError,
                      _config(_key, _value, *_words)))


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
    CASES.append(Case(f"{_module} {_option} {_argv_list[-1]}", f"{_option} {_argv_list[-1]}",
                      f"command line ({_module}, argparse)", CommandError, _argv(_module, _argv_list, _option)))


@case("detect_overwrites_scan", "igconda detect -o naming the input scan", "command line (igconda detect)",
      CommandError)
def _overwrite(d):
    from igconda.cli import main

    scan = write_nifti(d / "scan.nii.gz", _pet()[0], LPS)
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


def main() -> int:
    from tests.bad_input_harness import main as run

    return run(CASES)


if __name__ == "__main__":
    raise SystemExit(main())
