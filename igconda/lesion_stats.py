"""Per-slice lesion statistics that the method comparison bins its scores by.

Two numbers per slice, both computed from the min–max scaled slice (``image`` of
:data:`igconda.data.schema.SLICE_SCHEMA`, in [0, 1] over the patient's volume) and its mask:

- ``lesion_size_norm`` = lesion pixels / body pixels of the slice, where the body is every pixel
  with ``image > BODY_FRACTION × max(image)`` of that slice (the same relative cut for every slice,
  so a slice through the legs and one through the chest are both measured against their own
  cross-section). Lesion pixels are every mask pixel, in the body or not, so the value can
  exceed 1 only for a mask drawn outside the visible body. NaN when the slice has no body pixel
  (an all-zero slice).
- ``lesion_suv_mean_norm`` = mean image value over the lesion pixels / max(image) of the slice:
  how bright the lesion is relative to the slice's hottest pixel (1 = the lesion holds it). The
  scaled image is an affine map of SUV per volume, so this is not an SUV ratio unless the
  volume's minimum is 0; it is what the maps see. NaN for a slice without lesion pixels or with
  max(image) = 0.

:func:`with_lesion_stats` attaches both to per-slice score rows; the baseline scoring job uses
it, and so should any job that writes per-slice scores for the comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from igconda.slice_batch import batch_images

#: The body of a slice: pixels above this fraction of the slice's maximum.
BODY_FRACTION = 0.05
#: The columns :func:`lesion_stats` computes.
LESION_STAT_COLUMNS = ("lesion_size_norm", "lesion_suv_mean_norm")


def lesion_stats(images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Lesion size and brightness of each slice, relative to the slice (see the module docstring).

    Args:
        images: (N, H, W) scaled slices (any float; the statistics are ratios within a slice).
        masks: (N, H, W) lesion masks (non-zero = lesion).

    Returns:
        ``{"lesion_size_norm": (N,) float64, "lesion_suv_mean_norm": (N,) float64}``.
    """
    images = np.asarray(images, dtype=np.float64)
    masks = np.asarray(masks) > 0
    if images.shape != masks.shape or images.ndim != 3:
        raise ValueError(f"images and masks must both be (N, H, W); got {images.shape} and "
                         f"{masks.shape}")
    n = len(images)
    flat, lesion = images.reshape(n, -1), masks.reshape(n, -1)
    peak = flat.max(axis=1) if flat.size else np.zeros(n)
    body = (flat > BODY_FRACTION * peak[:, None]).sum(axis=1)
    lesion_pixels = lesion.sum(axis=1)
    lesion_sum = np.where(lesion, flat, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.where(body > 0, lesion_pixels / np.maximum(body, 1), np.nan)
        brightness = np.where((lesion_pixels > 0) & (peak > 0),
                              lesion_sum / np.maximum(lesion_pixels, 1) / np.where(peak > 0, peak, 1.0),
                              np.nan)
    return {"lesion_size_norm": size.astype(np.float64),
            "lesion_suv_mean_norm": brightness.astype(np.float64)}


def with_lesion_stats(scores: pd.DataFrame, batch: Mapping[str, Any]) -> pd.DataFrame:
    """``scores`` with the :data:`LESION_STAT_COLUMNS` of its slices added.

    Args:
        scores: per-slice rows (e.g. :func:`igconda.evaluation.score_methods` of ``batch``), with
            ``patient_id`` and ``slice_index``; one slice may have a row per method.
        batch: the slice columns the rows were scored from (``image``, ``mask``, ``patient_id``,
            ``slice_index``; ``height``/``width`` to read the images).

    Returns:
        A copy of ``scores``, rows in the same order, with the two columns.
    """
    images = batch_images(batch)
    stats = lesion_stats(images, batch_images(batch, "mask", images.shape[1:], np.uint8))
    keys = pd.DataFrame({"patient_id": np.asarray(batch["patient_id"]).astype(str),
                         "slice_index": np.asarray(batch["slice_index"]).astype(np.int64), **stats})
    keys = keys.drop_duplicates(["patient_id", "slice_index"]).set_index(["patient_id", "slice_index"])
    index = pd.MultiIndex.from_arrays([scores["patient_id"].astype(str).to_numpy(),
                                       scores["slice_index"].astype(np.int64).to_numpy()],
                                      names=["patient_id", "slice_index"])
    found = keys.reindex(index)
    out = scores.copy()
    for column in LESION_STAT_COLUMNS:
        out[column] = found[column].to_numpy(np.float64)
    return out
