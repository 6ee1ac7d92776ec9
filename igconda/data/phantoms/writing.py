"""Writing a study: NIfTI volumes, ``lesions.csv`` and ``manifest.csv`` (last), and the CLI."""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from igconda.config import PhantomConfig, load_config
from igconda.data.phantoms.imaging import _check_cohort, make_patient
from igconda.data.phantoms.lesions import NEGATIVE_CONTROL
from igconda.io_utils import atomic_write
from igconda.progress import progress as progress_bar

MANIFEST_COLUMNS = ("patient_id", "cohort", "tracer", "pet_path", "mask_path", "role")
LESION_COLUMNS = (
    "patient_id", "lesion", "site", "diameter_mm", "x_mm", "y_mm", "z_mm", "suv",
    "background_suv", "faint", "necrotic", "mask_voxels",
)


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=True, suffix=".tmp")


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode()[:79]
    # mtime=0: the same arrays give byte-identical files.
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _plan(config: PhantomConfig) -> list[tuple[str, int]]:
    for name in config.cohorts:
        _check_cohort(name)
    plan = [(name, i) for name, n in config.cohorts.items() for i in range(int(n))]
    plan += [(NEGATIVE_CONTROL, i) for i in range(int(config.negative_controls))]
    return plan


def _write_patient(job: tuple[PhantomConfig, str, int, str]) -> tuple[dict, list[dict]]:
    config, cohort, index, out = job
    out_dir = Path(out)
    patient = make_patient(config, cohort, index)
    pet_rel = Path(cohort) / f"{patient.patient_id}_pet.nii.gz"
    mask_rel = Path(cohort) / f"{patient.patient_id}_mask.nii.gz"
    (out_dir / cohort).mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / pet_rel, _nifti_bytes(patient.pet, patient.affine, "PET SUV (bw)"))
    _atomic_write(out_dir / mask_rel, _nifti_bytes(patient.mask, patient.affine, "lesion mask"))
    row = {"patient_id": patient.patient_id, "cohort": cohort, "tracer": patient.tracer,
           "pet_path": pet_rel.as_posix(), "mask_path": mask_rel.as_posix(), "role": patient.role}
    lesions = [
        {"patient_id": patient.patient_id, "lesion": k, "site": les.site,
         "diameter_mm": f"{les.diameter_mm:.1f}", "x_mm": f"{les.center_mm[0]:.1f}",
         "y_mm": f"{les.center_mm[1]:.1f}", "z_mm": f"{les.center_mm[2]:.1f}",
         "suv": f"{les.suv:.2f}", "background_suv": f"{les.background_suv:.2f}",
         "faint": int(les.faint), "necrotic": int(les.necrotic), "mask_voxels": les.mask_voxels}
        for k, les in enumerate(patient.lesions)
    ]
    return row, lesions


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write, suffix=".tmp")


def generate_study(output_dir: str | Path, config: PhantomConfig, *, progress: bool = True,
                   num_workers: int = 1) -> Path:
    """Write a synthetic study: one PET and one mask NIfTI per patient, then ``manifest.csv``.

    Layout::

        <output_dir>/<cohort>/<patient_id>_pet.nii.gz    float32 SUV, RAS affine
        <output_dir>/<cohort>/<patient_id>_mask.nii.gz   uint8 {0, 1}, same grid
        <output_dir>/lesions.csv                         one row per lesion (site, size, SUV, …)
        <output_dir>/manifest.csv                        written last

    Every file is written to a ``.tmp`` sibling and renamed, so an interrupted run never leaves
    a half-written NIfTI; an existing ``manifest.csv`` is removed before the first volume is
    written and the new one is written last, so a manifest exists only once every volume it
    lists does. Volumes of an earlier, larger study in the same folder are left in place but
    are not listed.

    Args:
        output_dir: created if missing.
        config: cohorts (name → count), negative_controls, shape, spacing_mm, seed.
        progress: show a progress bar (:func:`igconda.progress.progress`).
        num_workers: processes to use (1 = in this process). Patients are independent and
            individually seeded, so the output does not depend on it.

    Returns:
        Path of ``manifest.csv``.

    Raises:
        ValueError: an unknown cohort name (the message lists the known ones).
    """
    plan = _plan(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    # A manifest marks a complete study: drop an old one first, so that a re-run that fails
    # half-way cannot leave an old manifest over a mix of old and new volumes.
    manifest.unlink(missing_ok=True)
    jobs = [(config, cohort, i, str(out)) for cohort, i in plan]
    rows: list[dict] = []
    lesion_rows: list[dict] = []
    bar = progress_bar(len(jobs), "phantoms", "patient", disable=not progress)
    try:
        if num_workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for row, les in pool.map(_write_patient, jobs):
                    rows.append(row)
                    lesion_rows.extend(les)
                    bar.update()
        else:
            for job in jobs:
                row, les = _write_patient(job)
                rows.append(row)
                lesion_rows.extend(les)
                bar.update()
    finally:
        bar.close()
    _write_csv(out / "lesions.csv", LESION_COLUMNS, lesion_rows)
    _write_csv(manifest, MANIFEST_COLUMNS, rows)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m igconda.data.phantoms --config YAML --output DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m igconda.data.phantoms",
        description="Generate synthetic whole-body PET cohorts (NIfTI + manifest.csv).",
    )
    parser.add_argument("--config", help="study YAML (its phantoms section); default: defaults")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--seed", type=int, help="override phantoms.seed")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = {"phantoms": {"seed": args.seed}} if args.seed is not None else None
    start = time.perf_counter()
    try:  # ConfigError is a ValueError: a bad config or cohort name gets one line, not a trace
        config = load_config(args.config, overrides).phantoms
        manifest = generate_study(args.output, config, progress=not args.no_progress,
                                  num_workers=args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(manifest.parent / "lesions.csv", newline="") as fh:
        n_lesions = sum(1 for _ in csv.DictReader(fh))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["cohort"]] = counts.get(row["cohort"], 0) + 1
    print(f"wrote {len(rows)} patients ({n_lesions} lesions) in {elapsed:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"grid {tuple(config.shape)} at {tuple(config.spacing_mm)} mm, seed {config.seed}")
    print(f"manifest: {manifest}")
    return 0
