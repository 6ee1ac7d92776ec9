"""The 41 % SUVmax baseline and the raw-intensity control, scored by the common metric code."""

from __future__ import annotations

import numpy as np
import pytest

from igconda.baselines.thresholding import intensity_maps, slice_suv, threshold_maps
from igconda.metrics import optimal_dice, score_batch


def _slice_with_lesion(peak_suv: float, volume_suv_max: float, scale_min: float = 0.0):
    """One 8×8 slice: background SUV 1, a 2×2 lesion of ``peak_suv``; scaled to the volume."""
    suv = np.ones((1, 8, 8))
    suv[0, 3:5, 3:5] = peak_suv
    scale_max = volume_suv_max
    image = (suv - scale_min) / (scale_max - scale_min)
    mask = (suv > 1).astype(np.uint8)
    return image.astype(np.float32), mask, np.array([volume_suv_max]), np.array([scale_min]), np.array([scale_max])


def test_slice_suv_inverts_the_scaling():
    images = np.array([[[0.0, 0.5, 1.0]], [[0.0, 0.5, 1.0]]])
    suv = slice_suv(images, np.array([0.0, 2.0]), np.array([10.0, 4.0]))
    np.testing.assert_allclose(suv, [[[0, 5, 10]], [[2, 3, 4]]])


def test_volume_suvmax_is_the_default_reference():
    # Lesion SUV 6 in a volume whose SUVmax is 20 (a hot bladder elsewhere): 41 % of 20 = 8.2,
    # so the volume rule finds nothing here, while the slice rule (41 % of 6 = 2.46) finds it.
    image, mask, suv_max, lo, hi = _slice_with_lesion(6.0, 20.0)
    volume = threshold_maps(image, suv_max, lo, hi)
    per_slice = threshold_maps(image, suv_max, lo, hi, slice_max=True)
    assert volume.sum() == 0
    np.testing.assert_array_equal(per_slice, mask)


def test_threshold_uses_suv_not_scaled_values():
    # scale_min = 0.5: the scaled lesion value differs from its SUV; 41 % of SUVmax 10 = 4.1 SUV.
    image, mask, suv_max, lo, hi = _slice_with_lesion(5.0, 10.0, scale_min=0.5)
    out = threshold_maps(image, suv_max, lo, hi)
    np.testing.assert_array_equal(out, mask)
    # The same lesion at SUV 4.0 < 4.1 is missed.
    image, _, suv_max, lo, hi = _slice_with_lesion(4.0, 10.0, scale_min=0.5)
    assert threshold_maps(image, suv_max, lo, hi).sum() == 0


@pytest.mark.parametrize("fraction", [0.2, 0.41, 0.7])
def test_fraction_and_output_format(fraction):
    rng = np.random.default_rng(0)
    images = rng.random((3, 6, 6)).astype(np.float32)
    suv_max, lo, hi = np.array([10.0, 12.0, 8.0]), np.zeros(3), np.array([10.0, 12.0, 8.0])
    out = threshold_maps(images, suv_max, lo, hi, fraction=fraction)
    assert out.shape == images.shape and out.dtype == np.float32
    assert set(np.unique(out)) <= {0.0, 1.0}
    # With scale_min = 0 and scale_max == suv_max the rule reduces to image >= fraction.
    assert np.all(out[images > fraction + 1e-6] == 1) and np.all(out[images < fraction - 1e-6] == 0)


def test_binary_map_scores_the_same_at_every_tau():
    image, mask, suv_max, lo, hi = _slice_with_lesion(9.0, 10.0)
    image[0, 0, 0] = 0.9  # a hot false-positive pixel
    maps = threshold_maps(image, suv_max, lo, hi)
    dsc, tau = optimal_dice(maps, mask)
    assert dsc[0] == pytest.approx(2 * 4 / (5 + 4)) and tau[0] == pytest.approx(0.1)
    out = score_batch(maps, mask)
    assert out["n_detected"][0] == 1 and out["n_lesions"][0] == 1


def test_intensity_control_is_the_image_itself():
    image, mask, *_ = _slice_with_lesion(9.0, 10.0)
    maps = intensity_maps(image)
    np.testing.assert_array_equal(maps, image)
    assert maps.dtype == np.float32
    # Lesion 0.9, background 0.1: thresholds 0.2 … 0.9 separate them perfectly.
    dsc, tau = optimal_dice(maps, mask)
    assert dsc[0] == 1.0 and tau[0] == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": np.zeros((4, 4))}, "N, H, W"),
        ({"suv_max": np.array([1.0, 2.0])}, "one value per slice"),
        ({"scale_max": np.array([0.0])}, "exceed scale_min"),
        ({"suv_max": np.array([0.0])}, "positive"),
        ({"fraction": 1.5}, "fraction"),
        ({"images": np.full((1, 4, 4), np.nan)}, "NaN"),
    ],
)
def test_threshold_maps_rejects_bad_input(kwargs, match):
    args = {
        "images": np.zeros((1, 4, 4)),
        "suv_max": np.array([5.0]),
        "scale_min": np.array([0.0]),
        "scale_max": np.array([5.0]),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        threshold_maps(**args)


def test_intensity_maps_rejects_bad_shape():
    with pytest.raises(ValueError, match="N, H, W"):
        intensity_maps(np.zeros((2, 2, 2, 2)))
