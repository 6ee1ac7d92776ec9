"""How much memory preprocessing one volume needs, estimated from its NIfTI headers alone.

The preprocessing job asks Ray for this much memory per task (``ray_jobs/preprocess.py``), so
that Ray does not start more large volumes on a node than its memory holds, and refuses up front
a volume that no node could hold (Ray would otherwise wait for such a task for ever).

The estimate (:func:`preprocess_memory_bytes`) is ``source voxels × (the file's bytes per voxel
+ SOURCE_BYTES_PER_VOXEL) + resampled voxels × RESAMPLED_BYTES_PER_VOXEL``: on the source grid
:func:`igconda.data.preprocess.preprocess_volume` holds the decoded file, its float32 copy, the
copy the MONAI MetaTensor takes and the mask as uint8 and float32; on the ``spacing_mm`` grid
(before the field of view is cut) the resampled PET and mask in float32, with the transforms'
intermediate copies. Measured peak resident memory above the imports (one process, one thread,
float32 files, the default :class:`~igconda.config.PreprocessConfig`): 187 MiB for 200×200×150
voxels of 2 mm (estimate 242 MiB), 623 MiB for 300×300×200 of 2 mm (estimate 729 MiB), 1036
MiB for 200×200×150 of 4 mm, upsampled 8-fold to 2×2×3 mm (estimate 1097 MiB). The constants
are rounded up from those measurements, so the estimate errs on the large side (by up to 30 %).
It does not count the worker process itself (Python, torch and MONAI imported: a fixed cost
per Ray worker, not per volume).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from igconda.config import PreprocessConfig

#: Working bytes per voxel of the source grid beyond the file's own dtype (see the module docstring).
SOURCE_BYTES_PER_VOXEL = 16
#: Working bytes per voxel of the volume resampled to ``spacing_mm``: PET and mask, float32, with
#: about four copies each alive at the peak.
RESAMPLED_BYTES_PER_VOXEL = 32


def _header(path: str | Path) -> tuple[tuple[int, ...], int, np.ndarray] | None:
    """(shape, bytes per voxel, affine) from a NIfTI header; None when it cannot be read (the
    preprocessing task then reports the file's problem itself)."""
    try:
        img = nib.load(str(path))  # reads the header only; the voxels stay on disk
        return tuple(int(n) for n in img.shape), int(img.get_data_dtype().itemsize), np.asarray(img.affine)
    except Exception:  # missing, unreadable or corrupt: the task's VolumeError says which
        return None


def resampled_voxels(shape: tuple[int, ...], affine: np.ndarray, spacing_mm: tuple[float, float, float]) -> int:
    """Voxels of a (X, Y, Z) volume once resampled to ``spacing_mm`` along the RAS axes.

    Args:
        shape: the source's shape (extra trailing dimensions are ignored).
        affine: (4, 4) voxel → world affine of the source.
        spacing_mm: target voxel size along R, A, S (mm).
    """
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))  # mm per voxel axis
    # io_orientation: which RAS axis each voxel axis ends on after Orientation to RAS.
    axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    total = 1
    for n, zoom, axis in zip(shape[:3], zooms, axes, strict=False):
        total *= max(1, int(np.ceil(n * zoom / spacing_mm[axis])))
    return total


def preprocess_memory_bytes(pet_path: str | Path, mask_path: str | Path | None,
                            config: PreprocessConfig) -> int:
    """Bytes one preprocessing task needs for this patient (0 when a header cannot be read).

    Args:
        pet_path: NIfTI PET; mask_path: its mask, or None.
        config: its ``spacing_mm`` sets the resampled grid.
    """
    pet = _header(pet_path)
    if pet is None:
        return 0
    shape, itemsize, affine = pet
    source = int(np.prod(shape))
    total = source * (itemsize + SOURCE_BYTES_PER_VOXEL)
    total += resampled_voxels(shape, affine, tuple(config.spacing_mm)) * RESAMPLED_BYTES_PER_VOXEL
    mask = _header(mask_path) if mask_path else None
    if mask is not None:
        total += int(np.prod(mask[0])) * mask[1]  # the mask file as decoded
    return int(total)


def too_large(path: str | Path, needed: int, capacity: float) -> str | None:
    """The problem text when ``needed`` bytes exceed ``capacity`` (the largest node's Ray memory),
    else None."""
    if capacity <= 0 or needed <= capacity:
        return None
    gib = 2 ** 30
    return (f"preprocessing this volume needs about {needed / gib:.1f} GiB (estimated from its NIfTI "
            f"header, igconda.data.memory), more than the {capacity / gib:.1f} GiB of memory Ray "
            f"offers on its largest node; crop or downsample the scan first, or add a node with "
            f"more memory to the cluster")
