"""Intensity baselines: 41 % SUVmax thresholding (paper §3.3) and the raw-intensity control.

Both produce (N, H, W) "anomaly maps" that :func:`igconda.metrics.score_batch` scores exactly
like IgCONDA's maps:

* :func:`threshold_maps` is the clinical fixed-threshold rule: a pixel is lesion if its SUV is at
  least 41 % of SUVmax. The paper's SUVmax is that of the WHOLE VOLUME (the slice rows carry it
  as ``suv_max``), which is also what this function uses by default; ``slice_max=True`` uses
  each slice's own maximum instead (a probe here scored ⌈DSC⌉ 0.40 with the volume's SUVmax and
  0.48 with the slice's: hot organs elsewhere in the body raise the volume's threshold). The map
  is binary, so ⌈DSC⌉'s search over τ ∈ {0.1, …, 0.9} gives the same Dice at every τ.
* :func:`intensity_maps` is a control reported beside the paper's baselines: the
  min–max scaled PET itself used as the anomaly map. ⌈DSC⌉ then picks the best of nine global
  thresholds per slice, which is the same per-slice optimisation every method gets; it shows how
  much of a method's score that optimisation alone buys.

Slices hold the min–max scaled PET; ``image * (scale_max - scale_min) + scale_min`` recovers SUV
(see :mod:`igconda.data.schema`).
"""

from __future__ import annotations

import numpy as np

#: The paper's fixed fraction of SUVmax.
SUVMAX_FRACTION = 0.41


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be a (N, H, W) batch of slices, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.number):
        raise ValueError(f"images must be numeric, got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return images


def _per_slice(values: np.ndarray, n: int, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(n, float(values))
    if values.shape != (n,):
        raise ValueError(f"{name} must have one value per slice, shape ({n},); got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf")
    return values


def slice_suv(images: np.ndarray, scale_min: np.ndarray, scale_max: np.ndarray) -> np.ndarray:
    """Undo the per-volume min–max scaling: (N, H, W) scaled images → (N, H, W) SUV (float64).

    Args:
        images: (N, H, W) scaled PET in [0, 1].
        scale_min: (N,) SUV that maps to 0 for each slice's volume (or a scalar).
        scale_max: (N,) SUV that maps to 1 (or a scalar); must exceed ``scale_min``.
    """
    images = _check_images(images)
    n = images.shape[0]
    lo = _per_slice(scale_min, n, "scale_min")
    hi = _per_slice(scale_max, n, "scale_max")
    if np.any(hi <= lo):
        bad = np.flatnonzero(hi <= lo)[:5].tolist()
        raise ValueError(f"scale_max must exceed scale_min (slices {bad}): a constant volume has no SUV scale")
    return images * (hi - lo)[:, None, None] + lo[:, None, None]


def threshold_maps(
    images: np.ndarray,
    suv_max: np.ndarray,
    scale_min: np.ndarray,
    scale_max: np.ndarray,
    fraction: float = SUVMAX_FRACTION,
    *,
    slice_max: bool = False,
) -> np.ndarray:
    """Fixed-fraction SUVmax thresholding: lesion where ``SUV >= fraction · SUVmax``.

    Args:
        images: (N, H, W) min–max scaled PET slices.
        suv_max: (N,) SUVmax of each slice's WHOLE VOLUME (the ``suv_max`` column; the paper's
            reference). Ignored when ``slice_max`` is true.
        scale_min: (N,) the ``scale_min`` column (SUV at image value 0).
        scale_max: (N,) the ``scale_max`` column (SUV at image value 1).
        fraction: the fraction of SUVmax, in (0, 1]; the paper's 41 % by default.
        slice_max: use each slice's own maximum SUV as SUVmax instead of the volume's (not the
            paper's rule; offered to show how much the choice matters).

    Returns:
        (N, H, W) float32 map with values in {0, 1}.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    suv = slice_suv(images, scale_min, scale_max)
    n = suv.shape[0]
    if slice_max:
        reference = suv.reshape(n, -1).max(axis=1) if suv.size else np.zeros(n)
    else:
        reference = _per_slice(suv_max, n, "suv_max")
        if np.any(reference <= 0):
            raise ValueError("suv_max must be positive: a PET volume without uptake cannot be thresholded")
    return (suv >= float(fraction) * reference[:, None, None]).astype(np.float32)


def intensity_maps(images: np.ndarray) -> np.ndarray:
    """The raw-intensity control: the scaled PET itself as the anomaly map.

    Args:
        images: (N, H, W) min–max scaled PET slices in [0, 1].

    Returns:
        (N, H, W) float32, the same values.
    """
    return _check_images(images).astype(np.float32, copy=False)
