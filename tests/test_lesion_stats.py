"""The per-slice lesion statistics of the method comparison (igconda.lesion_stats)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from igconda.lesion_stats import BODY_FRACTION, lesion_stats, with_lesion_stats


def _slices() -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((3, 8, 8), np.float32)
    masks = np.zeros((3, 8, 8), np.uint8)
    images[0, 2:6, 2:6] = 0.5          # a 16-pixel body ...
    images[0, 3, 3:5] = 1.0            # ... with a 2-pixel lesion at the slice maximum
    masks[0, 3, 3:5] = 1
    images[0, 0, 0] = 0.9 * BODY_FRACTION  # below the body cut: not body
    images[1, 1:5, 1:5] = 0.8          # healthy slice: 16 body pixels, no lesion
    masks[2, 0, 0] = 1                 # an all-zero slice with a mask pixel
    return images, masks


def test_size_is_lesion_over_body_pixels_and_brightness_is_relative_to_the_slice_max():
    stats = lesion_stats(*_slices())
    assert stats["lesion_size_norm"][0] == pytest.approx(2 / 16)
    assert stats["lesion_suv_mean_norm"][0] == pytest.approx(1.0)
    assert stats["lesion_size_norm"][1] == 0.0 and np.isnan(stats["lesion_suv_mean_norm"][1])
    assert np.isnan(stats["lesion_size_norm"][2]) and np.isnan(stats["lesion_suv_mean_norm"][2])


def test_brightness_is_the_mean_over_lesion_pixels():
    images, masks = _slices()
    images[0, 3, 4] = 0.6  # lesion pixels 1.0 and 0.6; the slice max stays 1.0
    assert lesion_stats(images, masks)["lesion_suv_mean_norm"][0] == pytest.approx(0.8)
    # Ratios within a slice: scaling a slice changes nothing.
    assert lesion_stats(images * 3, masks)["lesion_suv_mean_norm"][0] == pytest.approx(0.8)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        lesion_stats(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_with_lesion_stats_attaches_the_columns_per_slice_for_every_method():
    images, masks = _slices()
    batch = {"image": images.reshape(3, -1), "mask": masks.reshape(3, -1),
             "height": np.full(3, 8), "width": np.full(3, 8),
             "patient_id": np.array(["p", "p", "q"]), "slice_index": np.array([4, 5, 0], np.int32)}
    scores = pd.DataFrame({"patient_id": ["q", "p", "p"], "slice_index": np.array([0, 4, 4], np.int32),
                           "method": ["a", "a", "b"]}, index=[7, 8, 9])
    out = with_lesion_stats(scores, batch)
    assert list(out.index) == [7, 8, 9] and out["slice_index"].dtype == np.int32
    assert out["lesion_size_norm"].tolist()[1:] == pytest.approx([2 / 16, 2 / 16])
    assert np.isnan(out["lesion_size_norm"].iloc[0])
    assert "lesion_size_norm" not in scores
