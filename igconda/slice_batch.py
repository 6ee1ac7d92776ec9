"""Reading a batch of slices: the numpy columns of :data:`igconda.data.schema.SLICE_SCHEMA` (as
Ray Data or a plain caller hands them over) as (N, H, W) images, masks and labels.

Every anomaly method (:mod:`igconda.anomaly_methods`, :mod:`igconda.baselines`), scoring
(:func:`igconda.evaluation.score_methods`) and the lesion statistics read batches with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from igconda.data.schema import HEALTHY, UNHEALTHY, slice_shape_of, stack_images


def slice_shape(batch: Mapping[str, Any], default: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) from the batch's ``height``/``width`` columns, else ``default``."""
    if "height" in batch and "width" in batch and len(batch["height"]):
        return slice_shape_of(batch["height"], batch["width"])
    if default is None:
        raise ValueError("the batch has no height/width columns and no default slice size is known")
    return default


def batch_images(batch: Mapping[str, Any], column: str = "image",
                 default_shape: tuple[int, int] | None = None, dtype: Any = np.float32) -> np.ndarray:
    """One image-like column of a slice batch as (N, H, W) (:func:`~igconda.data.schema.stack_images`)."""
    if column not in batch:
        raise ValueError(f"the batch has no {column!r} column (it has {sorted(batch)})")
    return stack_images(batch[column], *slice_shape(batch, default_shape), dtype)


def batch_labels(batch: Mapping[str, Any], masks: np.ndarray | None) -> np.ndarray | None:
    """(N,) labels: the ``label`` column, else derived from the masks (any pixel → unhealthy)."""
    if "label" in batch:
        return np.asarray(batch["label"])
    if masks is None:
        return None
    return np.where(masks.reshape(len(masks), -1).any(axis=1), UNHEALTHY, HEALTHY).astype(np.int8)
