"""Test helpers shared by the inference, inference-job, CLI and benchmark tests.

A tiny randomly initialised checkpoint and a tiny preprocessed dataset built from real NIfTIs.
Import them as ``from tests.helpers import make_checkpoint`` (the ``checkpoint`` fixture in
``tests/conftest.py`` wraps :func:`make_checkpoint`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import torch

from igconda.checkpoint import save_checkpoint
from igconda.config import StudyConfig
from igconda.data.preprocess import preprocess_volume
from igconda.data.schema import volume_to_rows
from igconda.models import build_unet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    # The benchmarks import each other as scripts do (``python benchmarks/x.py`` puts the folder first).
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkpoint(directory: Path, config: StudyConfig, seed: int = 0) -> Path:
    """A checkpoint of a randomly initialised tiny model (as training would save it).

    MONAI zero-initialises the UNet's output convolution, so an untrained model predicts ε = 0
    and every counterfactual would reconstruct its input exactly (all-zero maps); the zero
    tensors get small random values so that maps and metrics have something to show.
    """
    torch.manual_seed(seed)
    model = build_unet(config.model)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return save_checkpoint(directory, model=model, config=config,
                           metadata={"epoch": 0, "is_best": True})


def write_scan(directory: Path, pid: str, shape=(24, 22, 30), lesion=True, seed=0) -> tuple[Path, Path]:
    """A small PET NIfTI (LPS, anisotropic) with one hot ellipsoid, and its mask."""
    rng = np.random.default_rng(seed)
    spacing = (10.0, 11.0, 9.0)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (100.0, 90.0, -120.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) * np.asarray(spacing)
    centre = np.asarray(shape) * np.asarray(spacing) * (0.4 + 0.2 * rng.random(3))
    mask = ((((grid - centre) / np.array([40.0, 35.0, 45.0])) ** 2).sum(-1) <= 1) & lesion
    pet = (1.0 + 0.2 * rng.random(shape) + 5.0 * mask).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    pet_path, mask_path = directory / f"{pid}_pet.nii.gz", directory / f"{pid}_mask.nii.gz"
    nib.save(nib.Nifti1Image(pet, affine), pet_path)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
    return pet_path, mask_path


def make_dataset(root: Path, config: StudyConfig, patients: dict[str, tuple[str, str]],
                 split: str = "test") -> Path:
    """``root/slices/<split>/<pid>.parquet`` from real tiny NIfTIs (patients: pid → (cohort, role))."""
    out = root / "slices" / split
    out.mkdir(parents=True, exist_ok=True)
    for k, (pid, (cohort, role)) in enumerate(sorted(patients.items())):
        pet_path, mask_path = write_scan(root / "nifti", pid, seed=k)
        vol = preprocess_volume(pet_path, mask_path, config.preprocess)
        table = volume_to_rows(vol.image, vol.mask, patient_id=pid, cohort=cohort, tracer="FDG",
                               role=role, suv_max=vol.suv_max,
                               scale_min=vol.scale_min, scale_max=vol.scale_max,
                               pet_path=str(pet_path), geometry=vol.geometry)
        pq.write_table(table, out / f"{pid}.parquet")
    return root


def dataset_contents(root: Path) -> dict[str, object]:
    """Every file of a dataset folder, for comparing two builds: Parquet tables as rows,
    dataset.json without its creation time, any other file as bytes."""
    out: dict[str, object] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.suffix == ".parquet":
            out[name] = pq.read_table(path).to_pylist()
        elif path.name == "dataset.json":
            out[name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "created"}
        else:
            out[name] = path.read_bytes()
    return out
