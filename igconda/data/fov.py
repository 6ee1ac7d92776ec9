"""Where the preprocessed field of view (FOV) goes, and how much lesion it leaves out.

The FOV is a box of voxels on the grid that ``Spacingd`` produced (RAS+, ``spacing_mm``):

* **in-plane** it is ``crop_size[:2]`` voxels, centred on the body (``fov_centre: body``) or on
  the array (``fov_centre: array``, the paper's centre crop). A scan's array centre is the
  scanner's axis, not the patient's: patients lie off-centre on the bed, arms beside the trunk
  widen the body, and a crop centred on the array cuts one side first;
* **axially** it keeps every slice (``axial_extent: whole``: a 2D slice model has no reason to
  discard slices), padded to a whole number of output slices, or it is the paper's fixed
  ``crop_size[2]`` centre crop (``axial_extent: crop``).

A box may reach outside the array (the volume is smaller than the FOV): that part is padded
with 0 (SUV background). :func:`lesion_coverage` counts the lesion voxels of the ORIGINAL mask
that fall outside the output volume, so every crop is reported, not silently applied.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["body_centre", "fov_box", "output_depth", "lesion_coverage"]

#: A projection pixel belongs to the body when its mean uptake along z is above this fraction of
#: the projection's 95th percentile: well above the air's reconstruction noise (~1 % of tissue)
#: and below the fat and soft tissue that outline a body (~20–50 % of the 95th percentile).
BODY_THRESHOLD = 0.1
#: Body parts whose projection is at least this fraction of the largest one's area are kept
#: (two legs in a legs-only scan); smaller islands (bed, noise, a stray hot pixel) are ignored.
MIN_PART_FRACTION = 0.1


def body_centre(pet: np.ndarray) -> np.ndarray:
    """In-plane centre (voxel coordinates, float) of the body in a (X, Y, Z) PET volume.

    The centre of the bounding box of the above-background pixels of the axial mean projection
    (the largest connected part and any part at least :data:`MIN_PART_FRACTION` of its size).
    A bounding box, not a centre of mass: a hot bladder or brain would pull a centre of mass
    towards it, while the aim is to lose as little body as possible on either side.

    Returns:
        (2,) float array (x, y); the array centre if nothing is above background.
    """
    projection = np.asarray(pet, dtype=np.float64).mean(axis=2)
    centre = (np.asarray(projection.shape, dtype=np.float64) - 1) / 2
    top = float(np.percentile(projection, 95))
    if not top > 0:
        return centre
    labels, n = ndimage.label(projection > BODY_THRESHOLD * top)
    if n == 0:
        return centre
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_PART_FRACTION * sizes.max()) + 1
    xy = np.argwhere(np.isin(labels, keep))
    return (xy.min(axis=0) + xy.max(axis=0)) / 2.0


def output_depth(num_slices: int, crop_z: int, output_z: int) -> tuple[int, int]:
    """Output slices needed to cover ``num_slices`` input slices, and the padded input depth.

    One output slice spans ``r = crop_z / output_z`` input slices (the output slice spacing is
    ``crop_z * spacing_z / output_z`` mm). The input is padded to ``round(out * r)`` slices so that
    the resize reduces whole blocks of ``r`` slices (exact when ``r`` is an integer).

    Returns:
        (output slices, padded input slices).
    """
    ratio = crop_z / output_z
    out = max(1, math.ceil(num_slices / ratio - 1e-6))
    return out, max(num_slices, int(round(out * ratio)))


def fov_box(pet: np.ndarray, crop_size: tuple[int, int, int], output_z: int, *, axial_extent: str,
            fov_centre: str) -> tuple[np.ndarray, np.ndarray]:
    """The FOV as a box of the (X, Y, Z) array: start (may be negative: padding) and size.

    Args:
        pet: (X, Y, Z) PET on the resampled grid.
        crop_size: ``preprocess.crop_size`` (voxels).
        output_z: ``preprocess.output_size[2]``.
        axial_extent: ``whole`` or ``crop``.
        fov_centre: ``body`` or ``array``.

    Returns:
        (start, size): two (3,) int arrays; the box is ``[start, start + size)`` per axis.
    """
    shape = np.asarray(pet.shape, dtype=np.int64)
    size = np.asarray(crop_size, dtype=np.int64).copy()
    if axial_extent == "whole":
        size[2] = output_depth(int(shape[2]), int(crop_size[2]), int(output_z))[1]
    # Array-centred placement: the same voxels as MONAI's ResizeWithPadOrCrop (crop start
    # (n - size) // 2, or (size - n) // 2 padding before).
    start = np.where(shape >= size, (shape - size) // 2, -((size - shape) // 2))
    if fov_centre == "body":
        centre = body_centre(pet)
        start[:2] = np.floor(centre - (size[:2] - 1) / 2.0 + 0.5).astype(np.int64)
    return start, size


def lesion_coverage(mask: np.ndarray | None, original_affine: np.ndarray, output_affine: np.ndarray,
                    output_shape: tuple[int, ...]) -> dict[str, float | int]:
    """How many voxels of the original lesion mask lie outside the preprocessed volume.

    Each mask voxel centre is mapped to world (mm) with the source affine, then into the output
    grid with the inverse output affine; it is outside when any coordinate falls outside
    ``[-0.5, n - 0.5]``. Counting on the original grid keeps the number independent of the
    resampling (and checks the recorded geometry at the same time).

    Args:
        mask: (X, Y, Z) lesion mask on the source grid, or None.
        original_affine: (4, 4) source voxel → world.
        output_affine: (4, 4) output voxel → world.
        output_shape: (X', Y', Z') of the output volume.

    Returns:
        ``lesion_voxels`` (int), ``lesion_voxels_outside`` (int) and ``fraction_outside``
        (float in [0, 1]; 0 when there is no lesion).
    """
    if mask is None:
        return {"lesion_voxels": 0, "lesion_voxels_outside": 0, "fraction_outside": 0.0}
    ijk = np.argwhere(np.asarray(mask) > 0)
    if len(ijk) == 0:
        return {"lesion_voxels": 0, "lesion_voxels_outside": 0, "fraction_outside": 0.0}
    to_output = np.linalg.inv(np.asarray(output_affine, dtype=np.float64)) @ np.asarray(
        original_affine, dtype=np.float64)
    pos = ijk @ to_output[:3, :3].T + to_output[:3, 3]
    upper = np.asarray(output_shape, dtype=np.float64) - 0.5
    inside = np.all((pos >= -0.5) & (pos <= upper), axis=1)
    outside = int(len(ijk) - inside.sum())
    return {"lesion_voxels": int(len(ijk)), "lesion_voxels_outside": outside,
            "fraction_outside": outside / len(ijk)}
