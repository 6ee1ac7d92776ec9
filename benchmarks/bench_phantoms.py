"""Benchmark the synthetic cohorts: generation speed, and how hard they are for 41 % SUVmax.

Measures, for each grid (the default 96 × 96 × 160 at 4 mm and a demo-sized 64 × 64 × 96 at
6 mm):

* wall time per patient of ``generate_study`` (simulation + gzip NIfTI writes), with 1 and 2
  worker processes, and the implied time of a 60-patient study;
* per cohort, the volume-level Dice of 41 % SUVmax thresholding (SUVmax of the whole volume, as
  in the paper) against the lesion mask, and the share of thresholded voxels that are not
  lesion (physiological false positives);
* per cohort, the share of lesions still visible after 2 × 2 in-plane average pooling of the
  demo grid (≈ 12 mm pixels, what a 32 × 32 slice of a 384 mm field of view sees): peak SUV in
  the lesion at least 1.5× the median of a 2-pixel ring around it.

Run::

    python benchmarks/bench_phantoms.py                 # ~2 minutes on 2 shared cores
    python benchmarks/bench_phantoms.py --per-cohort 1  # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
from scipy import ndimage

from igconda.config import PhantomConfig
from igconda.data.phantoms import COHORTS, generate_study, make_patient

GRIDS = {
    "default 96x96x160 @ 4 mm": ((96, 96, 160), (4.0, 4.0, 4.0)),
    "demo 64x64x96 @ 6 mm": ((64, 64, 96), (6.0, 6.0, 6.0)),
}


def time_generation(config: PhantomConfig, workers: int) -> float:
    """Seconds per patient of generate_study (including writing the NIfTI files)."""
    n = sum(config.cohorts.values()) + config.negative_controls
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        generate_study(tmp, config, progress=False, num_workers=workers)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.nii.gz"))
    # CPU time of this process is meaningful only without workers; on a shared machine it is
    # the contention-free cost, while wall time depends on the other jobs.
    cpu_note = f", CPU {cpu / n:.2f} s/patient" if workers == 1 else ""
    print(f"    {workers} worker(s): {elapsed:.1f} s for {n} patients = {elapsed / n:.2f} s/patient"
          f" wall{cpu_note}, {size / n / 1e6:.1f} MB/patient")
    return elapsed / n


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else 1.0


def lesion_visibility(pet: np.ndarray, mask: np.ndarray) -> list[bool]:
    """Per lesion (3D component of the pooled mask): visible at 2×2 in-plane pooling?"""
    x, y = (s // 2 * 2 for s in pet.shape[:2])
    pool = lambda v: v[:x, :y].reshape(x // 2, 2, y // 2, 2, -1).mean(axis=(1, 3))  # noqa: E731
    small_pet = pool(pet.astype(np.float32))
    small_mask = pool(mask.astype(np.float32)) >= 0.25
    labels = cc3d.connected_components(small_mask, connectivity=26)
    visible = []
    for k in range(1, int(labels.max()) + 1):
        lesion = labels == k
        ring = ndimage.binary_dilation(lesion, iterations=2) & ~small_mask
        ring &= small_pet > 0
        if not ring.any():
            continue
        visible.append(bool(small_pet[lesion].max() >= 1.5 * np.median(small_pet[ring])))
    return visible


def quality(config: PhantomConfig) -> None:
    """Thresholding Dice / false-positive share / visibility per cohort (in memory)."""
    print("    cohort        n  41%-Dice mean±std  non-lesion share of thresholded  visible")
    for cohort, n in config.cohorts.items():
        dices, fp_share, vis = [], [], []
        for i in range(n):
            p = make_patient(config, cohort, i)
            pred = p.pet >= 0.41 * p.pet.max()
            truth = p.mask > 0
            dices.append(dice(pred, truth))
            fp_share.append(float((pred & ~truth).sum() / max(pred.sum(), 1)))
            vis.extend(lesion_visibility(p.pet, p.mask))
        print(f"    {cohort:<12} {n:>2}  {np.mean(dices):.3f} ± {np.std(dices):.3f}"
              f"        {np.mean(fp_share):.2f}                          "
              f"{np.mean(vis):.2f} of {len(vis)}")


def check_written(config: PhantomConfig) -> None:
    """Sanity: a written study loads back with nibabel."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_study(tmp, dataclasses.replace(config, cohorts={"lung": 1},
                                                           negative_controls=0), progress=False)
        pet = nib.load(Path(tmp) / "lung" / "lung_000_pet.nii.gz")
        assert pet.shape == tuple(config.shape), manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-cohort", type=int, default=2, help="patients per cohort")
    parser.add_argument("--quality-per-cohort", type=int, default=6,
                        help="patients per cohort for the Dice table (demo grid)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for name, (shape, spacing) in GRIDS.items():
        config = PhantomConfig(cohorts={c: args.per_cohort for c in COHORTS},
                               negative_controls=args.per_cohort, shape=shape,
                               spacing_mm=spacing, seed=0)
        check_written(config)
        print(f"{name}: generate_study, {len(COHORTS) + 1} cohorts x {args.per_cohort}")
        per_patient = {w: time_generation(config, w) for w in (1, 2)}
        best = min(per_patient.values())
        print(f"    -> 60-patient study ≈ {60 * best:.0f} s")
    for name, (shape, spacing) in GRIDS.items():
        n = args.quality_per_cohort if "demo" in name else max(1, args.quality_per_cohort // 3)
        config = PhantomConfig(cohorts={c: n for c in COHORTS}, negative_controls=0, shape=shape,
                               spacing_mm=spacing, seed=0)
        print(f"{name}: 41 % SUVmax thresholding (volume SUVmax) per cohort")
        quality(config)


if __name__ == "__main__":
    main()
