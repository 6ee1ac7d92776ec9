"""Volume preprocessing (paper §3.1) with MONAI transforms, one volume at a time.

The chain, applied to a PET volume and its lesion mask together:

1. ``Orientationd`` to canonical RAS+ (the reference code ignores orientation, so LPS and RAS
   scans would be fed to the network mirrored);
2. ``Spacingd`` to ``spacing_mm`` (bilinear PET, nearest mask);
3. the field of view (:mod:`igconda.data.fov`), cut with ``BorderPad`` + ``SpatialCrop``:
   in-plane ``crop_size[:2]`` voxels centred on the body (``fov_centre: body``) or on the array
   (``array``, the paper); axially every slice, padded to whole output slices
   (``axial_extent: whole``, the default: the number of slices then varies per patient), or the
   paper's fixed ``crop_size[2]`` centre crop (``crop``). Padding is 0, SUV background; the
   reference only crops, so a smaller volume would be stretched by the resize;
4. per-volume min–max scaling of PET to [0, 1] over the kept volume;
5. ``Resize`` to ``output_size[:2]`` in-plane and, along z, to the number of output slices
   (``output_size[2]`` for ``crop``; for ``whole`` enough slices of ``crop_size[2] *
   spacing_mm[2] / output_size[2]`` mm to cover the scan). PET: ``area`` (average pooling; at the
   paper's factor of 3 it averages each 3×3×3 block instead of sampling one voxel in 27, so
   noise is not aliased and a lesion keeps its mean uptake), or ``trilinear`` if some axis is
   upsampled. The mask goes through the SAME resize as a float (the lesion fraction of each
   output voxel's block) and is thresholded at 0.5, see :func:`_resize_mask`.

The output affine is read from the MetaTensor after all transforms, so it describes exactly the
array that is returned: ``output_affine @ [i, j, k, 1]`` is the RAS world position (mm) of
output voxel (i, j, k), the same world frame as the input NIfTI's affine, whatever the depth
and wherever the FOV was placed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, Compose, Orientationd, Resize, Spacingd, SpatialCrop

from igconda.config import PreprocessConfig
from igconda.data.fov import fov_box, lesion_coverage, output_depth
from igconda.data.schema import GEOMETRY_KEYS
from igconda.data.volumes import VolumeError, load_mask, load_pet

__all__ = ["PreprocessedVolume", "preprocess_volume", "preprocess_arrays"]

#: An output mask voxel is lesion when at least half of its block is lesion: the same
#: partial-volume rule as the phantoms' masks, and it neither shifts nor dilates a lesion.
MASK_FRACTION = 0.5


@dataclass
class PreprocessedVolume:
    """One volume after :func:`preprocess_volume`.

    Attributes:
        image: (X, Y, Z) float32 PET in [0, 1], RAS+ voxel order; X, Y = ``output_size[:2]``,
            Z = ``output_size[2]`` (``axial_extent: crop``) or enough slices to cover the scan
            (``whole``: varies per patient).
        mask: (X, Y, Z) uint8 lesion mask in {0, 1} (all zero when no mask was given).
        suv_max: maximum SUV of the ORIGINAL volume (before any resampling), for the 41 % rule.
        scale_min: SUV mapped to 0 (min of the resampled volume inside the field of view).
        scale_max: SUV mapped to 1 (max of the resampled volume inside the field of view).
        geometry: dict with keys :data:`igconda.data.schema.GEOMETRY_KEYS`:
            ``original_shape`` (3,), ``original_affine`` (4, 4) of the source NIfTI,
            ``output_affine`` (4, 4) voxel→world RAS affine of ``image``, ``output_shape`` (3,).
        coverage: lesion voxels of the ORIGINAL mask and how many fall outside the field of
            view (``lesion_voxels``, ``lesion_voxels_outside``, ``fraction_outside``).
        notes: non-fatal remarks (squeezed 4D input, lesions rescued or cut by the FOV).
    """

    image: np.ndarray
    mask: np.ndarray
    suv_max: float
    scale_min: float
    scale_max: float
    geometry: dict[str, Any]
    coverage: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _crop_or_pad(volume: MetaTensor, start: np.ndarray, size: np.ndarray) -> MetaTensor:
    """The box ``[start, start + size)`` of a (1, X, Y, Z) MetaTensor, zero-padded where it
    leaves the array; MONAI updates the affine of both steps."""
    shape = np.asarray(volume.shape[1:], dtype=np.int64)
    before = np.maximum(0, -start)
    after = np.maximum(0, start + size - shape)
    if before.any() or after.any():
        border = [int(v) for pair in zip(before, after, strict=True) for v in pair]
        volume = BorderPad(spatial_border=border, mode="constant", value=0)(volume)
    roi_start = start + before
    return SpatialCrop(roi_start=roi_start.tolist(), roi_end=(roi_start + size).tolist())(volume)


def _resize_mask(mask: MetaTensor, output_size: tuple[int, int, int], mode: str,
                 notes: list[str]) -> np.ndarray:
    """Resize a (1, X, Y, Z) binary mask exactly as the PET: same transform, same blocks.

    MONAI's ``nearest`` reads voxel ``3k`` of each block of three while the PET's ``area``
    resize averages the block centred on ``3k + 1``: the mask would be shifted by one input
    voxel per axis and slice labels would see one input plane in three. Resizing the mask as a
    float with the PET's own mode gives each output voxel the lesion fraction of the very block
    its PET value comes from; thresholding at :data:`MASK_FRACTION` keeps the lesion centred
    and undilated (thresholding at > 0, "any", would grow every lesion by up to a block).

    A lesion smaller than half a block would vanish, and its slices would be labelled healthy,
    so every 3D connected component (cc3d, 26-connectivity) left without an output voxel gets
    the one output voxel that contains its centroid (the *lesion rescue*).

    Returns:
        (X', Y', Z') uint8 mask in {0, 1}.
    """
    binary = mask[0].numpy() > 0
    fraction = Resize(spatial_size=output_size, mode=mode)(
        MetaTensor(torch.from_numpy(binary.astype(np.float32))[None], meta=mask.meta))
    out = (fraction[0].numpy() >= MASK_FRACTION).astype(np.uint8)
    labels, n = cc3d.connected_components(binary, connectivity=26, return_N=True)
    if not n:
        return out
    scale = np.asarray(output_size, dtype=np.float64) / np.asarray(binary.shape, dtype=np.float64)
    upper = np.asarray(output_size) - 1
    ijk = np.argwhere(labels > 0)
    # Output voxel i pools input block [i / scale, (i + 1) / scale): voxel j lies in floor(j * scale).
    cell = np.minimum(np.floor(ijk * scale).astype(np.int64), upper)
    hit = out[tuple(cell.T)] > 0
    kept = np.unique(labels[tuple(ijk[hit].T)])
    lost = np.setdiff1d(np.arange(1, n + 1), kept)
    if len(lost):
        centroids = np.asarray(cc3d.statistics(labels)["centroids"], dtype=np.float64)
        for c in lost:
            # The output voxel containing the centroid: floor((x + 0.5) * scale).
            idx = np.clip(np.floor((centroids[c] + 0.5) * scale), 0, upper).astype(int)
            out[tuple(idx)] = 1
        notes.append(f"kept {len(lost)} lesion(s) smaller than half an output voxel that the "
                     f"resize would have dropped")
    return out


def preprocess_arrays(pet: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                      config: PreprocessConfig, *, source: str = "<array>") -> PreprocessedVolume:
    """Preprocess an in-memory volume (see the module docstring for the steps).

    Args:
        pet: (X, Y, Z) PET in SUV, in the file's voxel order.
        affine: (4, 4) voxel → world RAS+ affine (nibabel's convention).
        mask: (X, Y, Z) binary lesion mask on the same grid, or None (treated as all zero).
        config: spacing, field of view (``crop_size``, ``axial_extent``, ``fov_centre``) and
            output sizes.
        source: name used in errors.

    Returns:
        PreprocessedVolume with ``image``/``mask`` of shape (``output_size[0]``,
        ``output_size[1]``, Z), Z as described there.

    Raises:
        VolumeError: if the volume is constant inside the field of view (nothing to scale).
    """
    pet = np.asarray(pet, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    original_mask = mask
    if mask is None:
        mask = np.zeros(pet.shape, dtype=np.uint8)
    notes: list[str] = []
    meta_affine = torch.as_tensor(affine, dtype=torch.float64)
    data = {
        "pet": MetaTensor(torch.from_numpy(pet.copy())[None], affine=meta_affine),
        "mask": MetaTensor(torch.from_numpy(np.asarray(mask, dtype=np.float32))[None], affine=meta_affine.clone()),
    }
    data = Compose([
        Orientationd(keys=("pet", "mask"), axcodes="RAS", labels=None),
        Spacingd(keys=("pet", "mask"), pixdim=tuple(config.spacing_mm), mode=("bilinear", "nearest"),
                 padding_mode="zeros", dtype=torch.float32),
    ])(data)
    start, size = fov_box(data["pet"][0].numpy(), tuple(config.crop_size), int(config.output_size[2]),
                          axial_extent=config.axial_extent, fov_centre=config.fov_centre)
    pet_t = _crop_or_pad(data["pet"], start, size)
    mask_t = _crop_or_pad(data["mask"], start, size)
    lo, hi = float(pet_t.min()), float(pet_t.max())
    if not hi > lo:
        raise VolumeError(source, f"PET is constant ({lo:g}) inside the {tuple(int(s) for s in size)} "
                                  f"field of view after resampling; nothing to scale: check that "
                                  f"pet_path names the PET series and export it again")
    # Min–max on the tensor keeps the MetaTensor (and its affine) intact.
    pet_t = (pet_t - lo) / (hi - lo)

    kept = tuple(int(s) for s in pet_t.shape[1:])
    depth = int(config.output_size[2])
    if config.axial_extent == "whole":
        depth = output_depth(kept[2], int(config.crop_size[2]), depth)[0]
    out_size = (int(config.output_size[0]), int(config.output_size[1]), depth)
    # area = block averaging; only meaningful when shrinking every axis.
    pet_mode = "area" if all(o <= c for o, c in zip(out_size, kept, strict=True)) else "trilinear"
    pet_out = Resize(spatial_size=out_size, mode=pet_mode)(pet_t)
    mask_out = _resize_mask(mask_t, out_size, pet_mode, notes)

    image = np.clip(pet_out[0].numpy().astype(np.float32), 0.0, 1.0)
    output_affine = np.asarray(pet_out.affine, dtype=np.float64)
    geometry = {
        "original_shape": np.asarray(pet.shape, dtype=np.int64),
        "original_affine": affine,
        "output_affine": output_affine,
        "output_shape": np.asarray(image.shape, dtype=np.int64),
    }
    assert set(geometry) == set(GEOMETRY_KEYS)  # internal invariant, not a user error
    coverage = lesion_coverage(original_mask, affine, output_affine, image.shape)
    if coverage["lesion_voxels_outside"]:
        notes.append(f"{coverage['lesion_voxels_outside']} of {coverage['lesion_voxels']} lesion "
                     f"voxels ({100 * coverage['fraction_outside']:.1f} %) lie outside the field of view")
    return PreprocessedVolume(
        image=image,
        mask=mask_out,
        suv_max=float(pet.max()),
        scale_min=lo,
        scale_max=hi,
        geometry=geometry,
        coverage=coverage,
        notes=notes,
    )


def preprocess_volume(pet_path: str | Path, mask_path: str | Path | None,
                      config: PreprocessConfig) -> PreprocessedVolume:
    """Load, validate and preprocess one PET volume and its lesion mask.

    Args:
        pet_path: NIfTI PET in SUV.
        mask_path: NIfTI binary lesion mask on the PET's grid, or None (negative control, or a
            scan to run inference on): the output mask is then all zero.
        config: ``spacing_mm``, ``crop_size``, ``axial_extent``, ``fov_centre``,
            ``output_size`` and ``binarize_mask`` are used.

    Returns:
        PreprocessedVolume: ``image`` (X, Y, Z) float32 in [0, 1] and ``mask`` (X, Y, Z) uint8,
        in RAS+ voxel order (Z per :func:`preprocess_arrays`), with SUV scale, geometry and
        lesion coverage.

    Raises:
        VolumeError: naming the file and the problem (see :mod:`igconda.data.volumes`).
    """
    pet = load_pet(pet_path)
    mask = load_mask(mask_path, pet, binarize=config.binarize_mask) if mask_path is not None else None
    result = preprocess_arrays(pet.data, pet.affine, None if mask is None else mask.data, config,
                               source=str(pet_path))
    result.notes = pet.notes + ([] if mask is None else mask.notes) + result.notes
    return result
