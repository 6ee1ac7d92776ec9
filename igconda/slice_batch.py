"""Reading a batch of slices: the numpy columns of :data:`igconda.data.schema.SLICE_SCHEMA` (as
Ray Data or a plain caller hands them over) as (N, H, W) images, masks and labels.

Every anomaly method (:mod:`igconda.anomaly_methods`, :mod:`igconda.baselines`), scoring
(:func:`igconda.evaluation.score_methods`) and the lesion statistics read batches with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from igconda.data.schema import HEALTHY, UNHEALTHY


def stack_column(column: Any, height: int, width: int, dtype: Any = np.float32) -> np.ndarray:
    """An image/mask column as it arrives in a numpy batch → (N, H, W).

    Ray Data hands a ``list<...>`` column over either as an object array of 1D arrays or, when
    the lists have a fixed size, as a 2D (N, H·W) array; a plain caller may pass (N, H, W).
    """
    array = np.asarray(column) if not isinstance(column, np.ndarray) else column
    if array.dtype == object:
        if len(array) == 0:
            return np.zeros((0, height, width), dtype=dtype)
        array = np.stack([np.asarray(v, dtype=dtype).reshape(-1) for v in array])
    array = np.asarray(array, dtype=dtype)
    if array.ndim == 2 and array.shape[1] == height * width:
        return array.reshape(-1, height, width)
    if array.ndim == 3 and array.shape[1:] == (height, width):
        return array
    raise ValueError(f"cannot read an image column of shape {array.shape} as slices of {height}×{width}")


def slice_shape(batch: Mapping[str, Any], default: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) from the batch's ``height``/``width`` columns, else ``default``."""
    if "height" in batch and "width" in batch and len(batch["height"]):
        heights, widths = np.unique(np.asarray(batch["height"])), np.unique(np.asarray(batch["width"]))
        if len(heights) != 1 or len(widths) != 1:
            raise ValueError(f"a batch mixes slice sizes {heights.tolist()}×{widths.tolist()}")
        return int(heights[0]), int(widths[0])
    if default is None:
        raise ValueError("the batch has no height/width columns and no default slice size is known")
    return default


def batch_images(batch: Mapping[str, Any], column: str = "image",
                 default_shape: tuple[int, int] | None = None, dtype: Any = np.float32) -> np.ndarray:
    """One image-like column of a slice batch as (N, H, W)."""
    if column not in batch:
        raise ValueError(f"the batch has no {column!r} column (it has {sorted(batch)})")
    return stack_column(batch[column], *slice_shape(batch, default_shape), dtype)


def batch_labels(batch: Mapping[str, Any], masks: np.ndarray | None) -> np.ndarray | None:
    """(N,) labels: the ``label`` column, else derived from the masks (any pixel → unhealthy)."""
    if "label" in batch:
        return np.asarray(batch["label"])
    if masks is None:
        return None
    return np.where(masks.reshape(len(masks), -1).any(axis=1), UNHEALTHY, HEALTHY).astype(np.int8)
