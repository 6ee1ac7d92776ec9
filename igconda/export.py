"""Slices back to 3D: anomaly maps as NIfTI volumes on the ORIGINAL scan's grid.

Preprocessing (:mod:`igconda.data.preprocess`) reorients to RAS+, resamples, crops/pads and
resizes a scan to a small (X, Y, Z) volume, and records in the slice rows' ``geometry`` both
the preprocessed volume's voxel→world affine (``output_affine``) and the source file's grid
(``original_affine``, ``original_shape``). Because both affines map voxels to the same world
frame (mm, RAS), the inverse of all of preprocessing is one resampling: for each original voxel
i, look up the preprocessed volume at ``inv(output_affine) @ original_affine @ i``. The result
has the source file's shape and affine, so it overlays the input PET in ITK-SNAP or 3D Slicer
(voxels outside the preprocessed field of view, i.e. cropped away, are 0).

Maps are interpolated linearly, masks with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from igconda.data.schema import GEOMETRY_KEYS, decode_geometry
from igconda.io_utils import atomic_write


def assemble_volume(slices: np.ndarray | Sequence[np.ndarray], slice_index: Sequence[int] | None = None,
                    *, height: int | None = None, width: int | None = None,
                    num_slices: int | None = None) -> np.ndarray:
    """Stack a patient's axial slices into the preprocessed (X, Y, Z) volume.

    Slice z of the volume is ``volume[:, :, z]`` of shape (H=X, W=Y), as in
    :mod:`igconda.data.schema`.

    Args:
        slices: (Z, H, W) array, or a sequence of Z arrays each (H, W) or flat (H·W,).
        slice_index: z index of each slice (any order); ``None`` = 0, 1, …, Z − 1 in order.
        height, width: H and W, needed when slices are flat.
        num_slices: the volume's depth; ``None`` = the number of slices given.

    Returns:
        (H, W, num_slices) float32 volume.

    Raises:
        ValueError: missing or duplicated slice indices, or slices of the wrong size.
    """
    arrays = [np.asarray(s, dtype=np.float32) for s in slices]
    if not arrays:
        raise ValueError("no slices to assemble")
    if height is None or width is None:
        if arrays[0].ndim != 2:
            raise ValueError("flat slices need height and width")
        height, width = arrays[0].shape
    try:
        stack = np.stack([a.reshape(height, width) for a in arrays])
    except ValueError as err:
        raise ValueError(f"slices do not all have {height}×{width} values: {err}") from None
    index = np.arange(len(stack)) if slice_index is None else np.asarray(slice_index, dtype=np.int64)
    depth = len(stack) if num_slices is None else int(num_slices)
    if len(index) != len(stack):
        raise ValueError(f"{len(index)} slice indices for {len(stack)} slices")
    if len(np.unique(index)) != len(index):
        raise ValueError("duplicated slice indices")
    if index.min() < 0 or index.max() >= depth:
        raise ValueError(f"slice indices must lie in [0, {depth})")
    if len(index) != depth:
        missing = sorted(set(range(depth)) - set(index.tolist()))
        raise ValueError(f"{len(missing)} of {depth} slices missing (e.g. z={missing[:5]})")
    volume = np.zeros((height, width, depth), dtype=np.float32)
    volume[:, :, index] = np.moveaxis(stack, 0, 2)
    return volume


def _geometry(geometry: Mapping[str, Any] | str) -> dict[str, np.ndarray]:
    if isinstance(geometry, str):
        geometry = decode_geometry(geometry)
    missing = set(GEOMETRY_KEYS) - set(geometry)
    if missing:
        raise ValueError(f"geometry is missing keys {sorted(missing)}")
    return {k: np.asarray(v) for k, v in geometry.items()}


def to_original_grid(volume: np.ndarray, geometry: Mapping[str, Any] | str, *,
                     order: int = 1) -> nib.Nifti1Image:
    """Resample a preprocessed (X, Y, Z) volume onto the source scan's grid.

    Args:
        volume: (X, Y, Z) array on the preprocessed grid (``geometry["output_shape"]``).
        geometry: the slice rows' geometry (dict or its JSON string, keys
            :data:`~igconda.data.schema.GEOMETRY_KEYS`).
        order: spline order; 1 (linear) for maps, 0 (nearest) for masks.

    Returns:
        A float32 NIfTI image with ``original_shape`` and ``original_affine`` (outside the
        preprocessed field of view: 0).

    Raises:
        ValueError: the volume's shape differs from ``output_shape``.
    """
    geo = _geometry(geometry)
    output_shape = tuple(int(v) for v in geo["output_shape"])
    if tuple(volume.shape) != output_shape:
        raise ValueError(f"volume shape {tuple(volume.shape)} differs from the preprocessed shape "
                         f"{output_shape} recorded in its geometry")
    source = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(geo["output_affine"], float))
    target = (tuple(int(v) for v in geo["original_shape"]), np.asarray(geo["original_affine"], float))
    # nibabel computes inv(output_affine) @ original_affine and hands it to
    # scipy.ndimage.affine_transform; cval 0 = nothing outside the preprocessed field of view.
    resampled = resample_from_to(source, target, order=order, mode="constant", cval=0.0)
    data = np.asarray(resampled.dataobj, dtype=np.float32)
    if order == 0:
        data = np.rint(data)
    image = nib.Nifti1Image(data, target[1])
    image.set_qform(target[1], code=1)  # scanner coordinates, as the source PET's
    image.set_sform(target[1], code=1)
    return image


def write_nifti_atomic(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image so that ``path`` is either absent or complete (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel picks compression from the extension; atomic_write's temp name keeps ".nii.gz".
    # The umask's mode, like any file the user writes: the map is meant to be opened by others.
    return atomic_write(path, lambda tmp: nib.save(image, tmp))


def export_volume(slices: np.ndarray | Sequence[np.ndarray], geometry: Mapping[str, Any] | str,
                  path: str | Path, *, slice_index: Sequence[int] | None = None,
                  order: int = 1) -> Path:
    """Assemble a patient's slices, resample to the original grid and write ``path`` atomically.

    Args:
        slices: the patient's Z slices, (Z, H, W) or flat (H·W,) each.
        geometry: the patient's geometry (dict or JSON string).
        path: output ``.nii.gz``/``.nii`` file.
        slice_index: z of each slice; ``None`` = in order.
        order: 1 for maps (linear), 0 for masks (nearest).

    Returns:
        ``path``.
    """
    geo = _geometry(geometry)
    x, y, z = (int(v) for v in geo["output_shape"])
    volume = assemble_volume(slices, slice_index, height=x, width=y, num_slices=z)
    return write_nifti_atomic(to_original_grid(volume, geo, order=order), path)
