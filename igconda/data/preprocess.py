"""Volume preprocessing (paper §3.1) with MONAI transforms, one volume at a time.

The chain, applied to a PET volume and its lesion mask together:

1. ``Orientationd`` to canonical RAS+ (the reference code ignores orientation, so LPS and RAS
   scans would be fed to the network mirrored);
2. ``Spacingd`` to ``spacing_mm`` (bilinear PET, nearest mask);
3. ``ResizeWithPadOrCropd`` centre crop / zero pad to ``crop_size``. The reference only crops,
   so a volume smaller than the crop is stretched by the resize; padding keeps the physical
   scale identical for every patient. Zero is the right pad value because SUV background is 0.
4. per-volume min–max scaling of PET to [0, 1] over the cropped/padded volume;
5. ``Resized`` to ``output_size``: PET with ``area`` (average pooling; at the paper's exact
   factor of 3 it averages each 3×3×3 block instead of sampling one voxel out of 27, so noise is
   not aliased, and it keeps a lesion's mean uptake) or ``trilinear`` along any axis that is
   upsampled; the mask with ``nearest`` plus a *lesion rescue*: nearest keeps one input voxel
   out of 27, so a lesion smaller than a block can vanish and its slices would be labelled
   healthy. Every 3D connected lesion component (cc3d, 26-connectivity) that nearest drops gets
   the one output voxel containing its centroid, so every lesion stays visible to the slice
   labels and metrics while big lesions are not dilated (what thresholding an area-resized mask
   at > 0 would do).

The output affine is read from the MetaTensor after all transforms, so it describes exactly the
array that is returned: ``output_affine @ [i, j, k, 1]`` is the RAS world position (mm) of
output voxel (i, j, k), the same world frame as the input NIfTI's affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientationd, Resize, ResizeWithPadOrCropd, Spacingd

from igconda.config import PreprocessConfig
from igconda.data.schema import GEOMETRY_KEYS
from igconda.data.volumes import VolumeError, load_mask, load_pet

__all__ = ["PreprocessedVolume", "preprocess_volume", "preprocess_arrays"]


@dataclass
class PreprocessedVolume:
    """One volume after :func:`preprocess_volume`.

    Attributes:
        image: (X, Y, Z) float32 PET in [0, 1], RAS+ voxel order (``output_size``).
        mask: (X, Y, Z) uint8 lesion mask in {0, 1} (all zero when no mask was given).
        suv_max: maximum SUV of the ORIGINAL volume (before any resampling), for the 41 % rule.
        scale_min: SUV mapped to 0 (min of the resampled, cropped/padded volume).
        scale_max: SUV mapped to 1 (max of the resampled, cropped/padded volume).
        geometry: dict with keys :data:`igconda.data.schema.GEOMETRY_KEYS`:
            ``original_shape`` (3,), ``original_affine`` (4, 4) of the source NIfTI,
            ``output_affine`` (4, 4) voxel→world RAS affine of ``image``, ``output_shape`` (3,).
        notes: non-fatal remarks (squeezed 4D input, lesions rescued by the mask resize).
    """

    image: np.ndarray
    mask: np.ndarray
    suv_max: float
    scale_min: float
    scale_max: float
    geometry: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _spatial_transforms(config: PreprocessConfig) -> Compose:
    return Compose([
        Orientationd(keys=("pet", "mask"), axcodes="RAS", labels=None),
        Spacingd(keys=("pet", "mask"), pixdim=tuple(config.spacing_mm), mode=("bilinear", "nearest"),
                 padding_mode="zeros", dtype=torch.float32),
        ResizeWithPadOrCropd(keys=("pet", "mask"), spatial_size=tuple(config.crop_size),
                             mode="constant", value=0),
    ])


def _resize_mask_keeping_lesions(mask: MetaTensor, output_size: tuple[int, int, int],
                                 notes: list[str]) -> MetaTensor:
    """Nearest-neighbour resize of a (1, X, Y, Z) mask that keeps every 3D lesion component."""
    binary = mask[0].numpy() > 0
    labels, n = cc3d.connected_components(binary, connectivity=26, return_N=True)
    labelled = MetaTensor(torch.from_numpy(labels.astype(np.float32))[None], meta=mask.meta)
    resized = Resize(spatial_size=output_size, mode="nearest")(labelled)
    out_labels = resized[0].numpy().astype(np.int64)
    out = (out_labels > 0).astype(np.uint8)
    if n:
        kept = set(np.unique(out_labels).tolist())
        lost = [c for c in range(1, n + 1) if c not in kept]
        if lost:
            in_shape = np.array(binary.shape, dtype=np.float64)
            scale = np.array(output_size, dtype=np.float64) / in_shape
            stats = cc3d.statistics(labels)
            for c in lost:
                centroid = np.asarray(stats["centroids"][c], dtype=np.float64)
                # output voxel i covers input [i / scale, (i + 1) / scale): floor((x + 0.5) * scale)
                idx = np.clip(np.floor((centroid + 0.5) * scale), 0, np.array(output_size) - 1).astype(int)
                out[tuple(idx)] = 1
            notes.append(f"kept {len(lost)} lesion(s) smaller than an output voxel that nearest "
                         f"resizing would have dropped")
    return MetaTensor(torch.from_numpy(out)[None], meta=resized.meta)


def preprocess_arrays(pet: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                      config: PreprocessConfig, *, source: str = "<array>") -> PreprocessedVolume:
    """Preprocess an in-memory volume (see the module docstring for the steps).

    Args:
        pet: (X, Y, Z) PET in SUV, in the file's voxel order.
        affine: (4, 4) voxel → world RAS+ affine (nibabel's convention).
        mask: (X, Y, Z) binary lesion mask on the same grid, or None (treated as all zero).
        config: target spacing, crop and output sizes.
        source: name used in errors.

    Returns:
        PreprocessedVolume with ``image``/``mask`` of shape ``config.output_size``.

    Raises:
        VolumeError: if the volume is constant after cropping (min == max, nothing to scale).
    """
    pet = np.asarray(pet, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if mask is None:
        mask = np.zeros(pet.shape, dtype=np.uint8)
    notes: list[str] = []
    meta_affine = torch.as_tensor(affine, dtype=torch.float64)
    data = {
        "pet": MetaTensor(torch.from_numpy(pet.copy())[None], affine=meta_affine),
        "mask": MetaTensor(torch.from_numpy(np.asarray(mask, dtype=np.float32))[None], affine=meta_affine.clone()),
    }
    data = _spatial_transforms(config)(data)
    pet_t: MetaTensor = data["pet"]
    lo, hi = float(pet_t.min()), float(pet_t.max())
    if not hi > lo:
        raise VolumeError(source, f"PET is constant ({lo:g}) inside the {tuple(config.crop_size)} "
                                  f"crop after resampling; nothing to scale")
    # Min–max on the tensor keeps the MetaTensor (and its affine) intact.
    pet_t = (pet_t - lo) / (hi - lo)

    crop = tuple(int(s) for s in pet_t.shape[1:])
    out_size = tuple(int(s) for s in config.output_size)
    # area = block averaging; only meaningful when shrinking every axis.
    pet_mode = "area" if all(o <= c for o, c in zip(out_size, crop, strict=True)) else "trilinear"
    pet_out = Resize(spatial_size=out_size, mode=pet_mode)(pet_t)
    mask_out = _resize_mask_keeping_lesions(data["mask"], out_size, notes)

    image = np.clip(pet_out[0].numpy().astype(np.float32), 0.0, 1.0)
    output_affine = np.asarray(pet_out.affine, dtype=np.float64)
    geometry = {
        "original_shape": np.asarray(pet.shape, dtype=np.int64),
        "original_affine": affine,
        "output_affine": output_affine,
        "output_shape": np.asarray(image.shape, dtype=np.int64),
    }
    assert set(geometry) == set(GEOMETRY_KEYS)  # internal invariant, not a user error
    return PreprocessedVolume(
        image=image,
        mask=mask_out[0].numpy().astype(np.uint8),
        suv_max=float(pet.max()),
        scale_min=lo,
        scale_max=hi,
        geometry=geometry,
        notes=notes,
    )


def preprocess_volume(pet_path: str | Path, mask_path: str | Path | None,
                      config: PreprocessConfig) -> PreprocessedVolume:
    """Load, validate and preprocess one PET volume and its lesion mask.

    Args:
        pet_path: NIfTI PET in SUV.
        mask_path: NIfTI binary lesion mask on the PET's grid, or None (negative control, or a
            scan to run inference on): the output mask is then all zero.
        config: ``spacing_mm``, ``crop_size``, ``output_size`` and ``binarize_mask`` are used.

    Returns:
        PreprocessedVolume: ``image`` (X, Y, Z) float32 in [0, 1] and ``mask`` (X, Y, Z) uint8,
        both ``config.output_size``, in RAS+ voxel order, with SUV scale and geometry.

    Raises:
        VolumeError: naming the file and the problem (see :mod:`igconda.data.volumes`).
    """
    pet = load_pet(pet_path)
    mask = load_mask(mask_path, pet, binarize=config.binarize_mask) if mask_path is not None else None
    result = preprocess_arrays(pet.data, pet.affine, None if mask is None else mask.data, config,
                               source=str(pet_path))
    result.notes = pet.notes + ([] if mask is None else mask.notes) + result.notes
    return result
