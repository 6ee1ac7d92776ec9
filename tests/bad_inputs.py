"""The bad-input corpus as data: one :class:`~tests.bad_input_harness.Case` per known bad input.

Each names what is wrong, the entry point it goes through (a library check a job's task or
driver runs, a config load, a command line's argument parsing, ...), the error type expected,
and builds its input small (a few-KB NIfTI written with nibabel, a YAML, a damaged checkpoint);
its :class:`~tests.bad_input_harness.Attempt` holds the words the refusal must contain: the file
or setting, and the fix. ``batch`` cases are also patients of the mixed manifest that the
preprocessing job must get through without losing a good patient (tests/bad_input_harness.py).

The cases that go through a job's command line or a checkpoint are in ``tests/bad_inputs_jobs.py``.

Report (tried / refused clearly / good patients lost; starts a local Ray of its own)::

    python -m tests.bad_inputs
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from igconda.config import ConfigError, load_config
from igconda.data.build import PreprocessingError, build_dataset
from igconda.data.manifest import ManifestError, read_manifest
from igconda.data.preprocess import preprocess_volume
from igconda.data.volumes import VolumeError
from tests.bad_input_harness import CONFIG, Attempt, Case, registrar
from tests.bad_inputs_jobs import JOB_CASES
from tests.data.nifti_fixtures import LPS, ct_like, pet_and_mask, write_manifest_csv, write_nifti

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "test.yaml"

PREPROCESS = "preprocessing task (igconda.data.preprocess.preprocess_volume)"
MANIFEST = "manifest (igconda.data.manifest.read_manifest)"
CONFIG_LOAD = "config load (igconda.config.load_config)"
#: The cases of this module (volumes, manifest rows, configs); :data:`CASES` adds the jobs'.
DATA_CASES: list[Case] = []
case = registrar(DATA_CASES)


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
    DATA_CASES.append(Case(f"{_key}={_value}", f"{_key}: {_value}", CONFIG_LOAD, ConfigError,
                      _config(_key, _value, *_words)))


#: The whole corpus, in report order.
CASES: list[Case] = DATA_CASES + JOB_CASES


def main() -> int:
    from tests.bad_input_harness import main as run

    return run(CASES)


if __name__ == "__main__":
    raise SystemExit(main())
