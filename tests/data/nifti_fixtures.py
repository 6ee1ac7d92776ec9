"""Small NIfTI volumes written with nibabel for the data tests (no phantom generator needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

LPS = np.diag([-4.0, -4.0, 4.0, 1.0])  # voxel axes pointing Left, Posterior, Superior


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def pet_and_mask(shape=(24, 24, 20), lesion_at=(12, 12, 10), radius=2, seed=0):
    """A positive noisy PET with one hot spherical lesion and its mask, (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    pet = (1.0 + 0.2 * rng.random(shape)).astype(np.float32)
    grid = np.indices(shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, lesion_at, strict=True))
    mask = (dist2 <= radius ** 2).astype(np.uint8)
    pet[mask > 0] += 8.0
    return pet, mask


def write_patient(folder: Path, pid: str, affine: np.ndarray = LPS, *, lesion: bool = True, seed: int = 0,
                  shape=(24, 24, 20)) -> tuple[Path, Path]:
    """Write ``images/<pid>.nii.gz`` and ``labels/<pid>.nii.gz``; returns (pet, mask)."""
    pet, mask = pet_and_mask(shape=shape, seed=seed)
    if not lesion:
        mask[:] = 0
        pet = np.minimum(pet, 1.2)
    return (write_nifti(folder / "images" / f"{pid}.nii.gz", pet, affine),
            write_nifti(folder / "labels" / f"{pid}.nii.gz", mask, affine))


def write_manifest_csv(path: Path, rows: list[tuple[str, str, str, str, str, str]]) -> Path:
    lines = ["patient_id,cohort,tracer,pet_path,mask_path,role"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def ct_like(shape=(24, 24, 20), seed=0) -> np.ndarray:
    """A CT in Hounsfield units: air (-1000) around a soft-tissue body (~40) with a fat rim
    (-100) and lungs (-800); what a manifest pointing at the wrong file of a PET/CT gives."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = [(n - 1) / 2 for n in shape[:2]]
    r2 = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) / (min(shape[:2]) / 2) ** 2
    ct = np.full(shape, -1000.0, np.float32)
    ct[r2 < 0.8] = -100.0
    ct[r2 < 0.6] = 40.0
    ct[(r2 < 0.2) & (grid[2] > shape[2] / 2)] = -800.0
    return ct + rng.normal(0, 10, shape).astype(np.float32)
