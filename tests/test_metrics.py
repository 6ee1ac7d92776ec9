"""igconda.metrics against hand-counted cases and independent implementations (sklearn, MONAI)."""

from __future__ import annotations

import warnings

import cc3d
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage
from sklearn.metrics import average_precision_score

from igconda import metrics as M


def _one(a) -> np.ndarray:
    """A single 2D slice → a (1, H, W) batch."""
    return np.asarray(a)[None]


def _random_batch(seed: int, n: int = 12, size: int = 24, ties: bool = False):
    """Masks with 0–3 rectangles (some touching the border) and noisy, blurred maps in [0, 1]."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(0, size, 2)
            r = rng.integers(1, 6)
            masks[i, max(0, x - r): x + r, max(0, y - r): y + r] = 1
    maps = ndimage.gaussian_filter(0.4 * masks + 0.6 * rng.random(masks.shape), (0, 1, 1))
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    if ties:  # coarse values create many tied scores and maps exactly on the τ grid
        maps = np.round(maps, 1)
    return maps.astype(np.float32), masks


def _monai_hd95(pred: np.ndarray, masks: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty predictions
        out = compute_hausdorff_distance(
            torch.as_tensor(pred[:, None], dtype=torch.float32),
            torch.as_tensor(masks[:, None], dtype=torch.float32),
            include_background=True,
            percentile=95,
            directed=False,
        )
    return out.numpy().ravel().astype(np.float64)


# ---------------------------------------------------------------- ⌈DSC⌉


def test_dice_hand_counted_and_ties_go_to_lowest_tau():
    maps = _one([[0.95, 0.55, 0.15, 0.0]])
    masks = _one([[1, 1, 0, 0]])
    dsc, tau = M.optimal_dice(maps, masks)
    # τ = 0.1: {0, 1, 2} → 2·2/(3+2) = 0.8; τ = 0.2 … 0.5: {0, 1} → 1.0; lowest of those is 0.2.
    assert dsc[0] == pytest.approx(1.0)
    assert tau[0] == pytest.approx(0.2)
    dsc, tau = M.optimal_dice(maps, masks, thresholds=[0.1])
    assert dsc[0] == pytest.approx(0.8)


def test_dice_threshold_is_inclusive():
    # A map value exactly equal to τ counts as foreground (map >= τ).
    dsc, tau = M.optimal_dice(_one([[0.5, 0.0]]), _one([[1, 0]]), thresholds=[0.5])
    assert dsc[0] == 1.0 and tau[0] == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_is_inclusive_in_the_maps_precision(dtype):
    # float32(0.7) < 0.7 in float64: the comparison must happen in the map's dtype.
    maps = np.array([[[0.7, 0.69]]], dtype=dtype)
    masks = _one([[1, 0]])
    dsc, tau = M.optimal_dice(maps, masks)
    assert dsc[0] == 1.0 and tau[0] == pytest.approx(0.7)
    out = M.score_batch(maps, masks)  # HD95 and detection use the same foreground
    assert out["hd95"][0] == 0.0 and out["n_detected"][0] == 1


def test_dice_threshold_order_does_not_matter():
    maps, masks = _random_batch(3)
    a = M.optimal_dice(maps, masks, thresholds=M.THRESHOLDS)
    b = M.optimal_dice(maps, masks, thresholds=M.THRESHOLDS[::-1])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_brute_force(seed):
    maps, masks = _random_batch(seed, ties=True)
    dsc, tau = M.optimal_dice(maps, masks)
    for i in range(len(maps)):
        scores = []
        for t in M.THRESHOLDS:
            p = maps[i] >= t
            scores.append(2 * (p & (masks[i] > 0)).sum() / (p.sum() + masks[i].sum()))
        assert dsc[i] == pytest.approx(max(scores))
        assert tau[i] == pytest.approx(M.THRESHOLDS[int(np.argmax(scores))])


# ---------------------------------------------------------------- HD95


def test_hd95_hand_counted_outlier_and_interpolation():
    gt = np.zeros((5, 10), dtype=np.uint8)
    gt[1:4, 1:4] = 1  # boundary: the 8 ring pixels
    pred = gt.copy()
    pred[1, 8] = 1  # an isolated pixel 5 px from the nearest gt boundary pixel (1, 3)
    # pred→gt: 8 zeros and one 5 → P95 = 0 + 0.6·(5 − 0) = 3 (linear, position 7.6 of 0..8);
    # gt→pred: all 0. The larger is 3, in both argument orders.
    assert M.hd95(_one(pred), _one(gt))[0] == pytest.approx(3.0)
    assert M.hd95(_one(gt), _one(pred))[0] == pytest.approx(3.0)


def test_hd95_single_pixels():
    a, b = np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8)
    a[0, 0], b[3, 4] = 1, 1
    assert M.hd95(_one(a), _one(b))[0] == pytest.approx(5.0)


def test_hd95_is_between_boundaries_not_all_points():
    # A filled 7×7 square against its own outline: the boundaries coincide (HD95 = 0), whereas
    # between all foreground points the square's centre would lie 3 px from the outline.
    gt = np.zeros((9, 9), np.uint8)
    gt[1:8, 1:8] = 1
    outline = gt.copy()
    outline[2:7, 2:7] = 0
    assert M.hd95(_one(outline), _one(gt))[0] == 0.0
    # Against its 5×5 core: 1 px along the sides, √2 at the 4 corners (the top 5 % of 24 px).
    core = np.zeros_like(gt)
    core[2:7, 2:7] = 1
    assert M.hd95(_one(core), _one(gt))[0] == pytest.approx(np.sqrt(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_hd95_matches_monai(seed, ties):
    maps, masks = _random_batch(seed, ties=ties)
    _, tau = M.optimal_dice(maps, masks)
    pred = maps >= tau[:, None, None]
    ours = M.hd95(pred, masks)
    ref = _monai_hd95(pred, masks)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "pred_fill",
    ["all", "left_half", "corner"],
)
def test_hd95_all_ones_mask_matches_monai(pred_fill):
    masks = np.ones((1, 12, 12), np.uint8)
    pred = np.zeros_like(masks)
    if pred_fill == "all":
        pred[:] = 1
    elif pred_fill == "left_half":
        pred[:, :, :6] = 1
    else:
        pred[:, :3, :3] = 1
    np.testing.assert_allclose(M.hd95(pred, masks), _monai_hd95(pred, masks), rtol=1e-5)
    if pred_fill == "all":
        assert M.hd95(pred, masks)[0] == 0.0


def test_hd95_empty_cases_are_nan():
    gt = np.zeros((2, 6, 6), np.uint8)
    gt[0, 2:4, 2:4] = 1
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = 1  # slice 0: empty prediction; slice 1: empty mask
    assert np.isnan(M.hd95(pred, gt)).all()


def test_hd95_slices_do_not_interact():
    # The one-EDT-for-the-stack trick must not let a slice see another slice's boundary.
    gt = np.zeros((3, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0, 0], pred[0, 0, 7] = 1, 1  # 7 px apart in slice 0
    gt[1, 0, 7], pred[1, 0, 7] = 1, 1  # coincide in slice 1 (directly "below" slice 0's pred)
    pred[2, 4, 4] = 1  # no mask in slice 2
    out = M.hd95(pred, gt)
    assert out[0] == pytest.approx(7.0) and out[1] == 0.0 and np.isnan(out[2])


# ---------------------------------------------------------------- AUPRC


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_auprc_matches_sklearn(seed, ties):
    maps, masks = _random_batch(seed, ties=ties)
    ours = M.auprc(maps, masks)
    ref = [average_precision_score(masks[i].ravel(), maps[i].ravel()) for i in range(len(maps))]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_auprc_hand_counted():
    # Scores 0.9 (lesion), 0.8 (background), 0.7 (lesion), 0.1 (background):
    # AP = 0.5·(1/1) + 0.5·(2/3) = 5/6.
    assert M.auprc(_one([[0.9, 0.8, 0.7, 0.1]]), _one([[1, 0, 1, 0]]))[0] == pytest.approx(5 / 6)


def test_auprc_ties_enter_together():
    # All four pixels tied: one operating point, precision = prevalence.
    assert M.auprc(_one([[0.3, 0.3, 0.3, 0.3]]), _one([[1, 0, 0, 0]]))[0] == pytest.approx(0.25)


def test_auprc_chunking(monkeypatch):
    maps, masks = _random_batch(4, n=7)
    full = M.auprc(maps, masks)
    monkeypatch.setattr(M, "_AUPRC_CHUNK", 3)
    np.testing.assert_array_equal(M.auprc(maps, masks), full)


# ---------------------------------------------------------------- detection


def test_detection_hand_counted():
    gt = np.zeros((8, 12), np.uint8)
    gt[1:3, 1:3] = 1  # lesion A (4 px): predicted exactly → detected
    gt[5:7, 5:9] = 1  # lesion B (8 px): 3 px predicted, IoU 3/8 → missed
    pred = np.zeros_like(gt)
    pred[1:3, 1:3] = 1
    pred[5, 5:8] = 1
    pred[0, 11] = 1  # a false positive changes nothing in sensitivity
    det, les = M.detection(_one(pred), _one(gt))
    assert (det[0], les[0]) == (1, 2)


def test_detection_iou_exactly_half_is_a_hit():
    gt = _one([[1, 1, 0, 0]])
    pred = _one([[1, 0, 0, 0]])
    assert M.detection(pred, gt)[0][0] == 1


def test_detection_is_four_connected():
    # Diagonal neighbours are two lesions; a prediction of only one of them finds one of two.
    gt = _one([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    pred = _one([[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    det, les = M.detection(pred, gt)
    assert (det[0], les[0]) == (1, 2)


def test_detection_merged_prediction_detects_neither():
    gt = np.zeros((4, 9), np.uint8)
    gt[1:3, 1:3] = 1
    gt[1:3, 4:6] = 1
    pred = gt.copy()
    pred[1, 3] = 1  # a bridge: one 9-px component, IoU 4/9 with each lesion
    det, les = M.detection(_one(pred), _one(gt))
    assert (det[0], les[0]) == (0, 2)


def _detection_loop(pred: np.ndarray, masks: np.ndarray):
    """Independent per-slice reference with cc3d (connectivity=4) and explicit IoU matrices."""
    found, total = [], []
    for p, g in zip(pred, masks, strict=True):
        lp = cc3d.connected_components(p.astype(np.uint8), connectivity=4)
        lg = cc3d.connected_components(g.astype(np.uint8), connectivity=4)
        n_p, n_g = int(lp.max()), int(lg.max())
        matched = set()
        for a in range(1, n_p + 1):
            ious = [((lp == a) & (lg == b)).sum() / ((lp == a) | (lg == b)).sum() for b in range(1, n_g + 1)]
            if ious and max(ious) >= 0.5:
                matched.add(int(np.argmax(ious)))
        found.append(len(matched))
        total.append(n_g)
    return np.array(found), np.array(total)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_matches_loop_reference(seed):
    maps, masks = _random_batch(seed, n=10)
    _, tau = M.optimal_dice(maps, masks)
    pred = maps >= tau[:, None, None]
    det, les = M.detection(pred, masks)
    ref_det, ref_les = _detection_loop(pred, masks)
    np.testing.assert_array_equal(les, ref_les)
    np.testing.assert_array_equal(det, ref_det)
    assert (det <= les).all()


def test_detection_slices_do_not_connect():
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[:, 1:3, 1:3] = 1  # the same square in two adjacent slices: one lesion each
    det, les = M.detection(gt, gt)
    np.testing.assert_array_equal(les, [1, 1])
    np.testing.assert_array_equal(det, [1, 1])


# ---------------------------------------------------------------- empty and degenerate cases


def test_score_batch_empty_mask_is_nan():
    maps = np.random.default_rng(0).random((1, 6, 6))
    out = M.score_batch(maps, np.zeros((1, 6, 6), np.uint8))
    for key in ("dsc_max", "tau_star", "hd95", "auprc", "sensitivity"):
        assert np.isnan(out[key][0]), key
    assert out["n_lesions"][0] == 0 and out["n_detected"][0] == 0


def test_score_batch_empty_prediction_at_every_tau():
    mask = np.zeros((1, 6, 6), np.uint8)
    mask[0, 2:4, 2:4] = 1
    out = M.score_batch(np.full((1, 6, 6), 0.05), mask)
    assert out["dsc_max"][0] == 0.0 and out["tau_star"][0] == pytest.approx(0.1)
    assert np.isnan(out["hd95"][0])
    assert out["auprc"][0] == pytest.approx(4 / 36)  # constant map: AP = prevalence
    assert (out["n_detected"][0], out["n_lesions"][0], out["sensitivity"][0]) == (0, 1, 0.0)


def test_score_batch_constant_map():
    mask = np.zeros((1, 6, 6), np.uint8)
    mask[0, :3, :2] = 1  # 6 px
    out = M.score_batch(np.full((1, 6, 6), 0.7), mask)
    assert out["dsc_max"][0] == pytest.approx(2 * 6 / (36 + 6))
    assert out["tau_star"][0] == pytest.approx(0.1)
    assert out["auprc"][0] == pytest.approx(6 / 36)
    assert out["n_detected"][0] == 0  # the whole image vs a 6-px lesion: IoU 1/6


def test_score_batch_all_ones_mask():
    mask = np.ones((1, 5, 5), np.uint8)
    out = M.score_batch(np.ones((1, 5, 5)), mask)
    assert out["dsc_max"][0] == 1.0 and out["hd95"][0] == 0.0 and out["auprc"][0] == 1.0
    assert out["sensitivity"][0] == 1.0


def test_score_batch_binary_map_same_dice_at_every_tau():
    maps, masks = _random_batch(5)
    binary = (maps > 0.5).astype(np.float32)
    dsc, tau = M.optimal_dice(binary, masks)
    dsc_01, _ = M.optimal_dice(binary, masks, thresholds=[0.1])
    np.testing.assert_array_equal(dsc, dsc_01)
    assert np.all(tau[~np.isnan(tau)] == 0.1)


def test_score_batch_keys_dtypes_and_empty_batch():
    maps, masks = _random_batch(0, n=3)
    out = M.score_batch(maps, masks)
    assert set(out) == set(M.METRIC_KEYS)
    assert all(v.shape == (3,) for v in out.values())
    assert out["n_lesions"].dtype == np.int64 and out["dsc_max"].dtype == np.float64
    empty = M.score_batch(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)))
    assert all(v.shape == (0,) for v in empty.values())


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        (np.zeros((4, 4)), np.zeros((4, 4)), "N, H, W"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), "same shape"),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), 2), "binary"),
        (np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)), "NaN"),
    ],
)
def test_score_batch_rejects_bad_input(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        M.score_batch(maps, masks)


def test_bad_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        M.optimal_dice(np.zeros((1, 2, 2)), np.ones((1, 2, 2)), thresholds=[])


# ---------------------------------------------------------------- summary tables


def test_dice_curve_is_dice_at_each_tau_and_optimal_dice_its_maximum():
    maps, masks = _random_batch(3, n=5)
    taus, dice = M.dice_curve(maps, masks, [0.5, 0.2, 0.8])
    assert taus.tolist() == [0.2, 0.5, 0.8] and dice.shape == (3, 5)
    for k, tau in enumerate(taus):
        pred, gt = maps >= np.float32(tau), masks > 0
        expected = 2 * (pred & gt).sum((1, 2)) / (pred.sum((1, 2)) + gt.sum((1, 2)))
        np.testing.assert_allclose(dice[k], expected)
    best, tau_star = M.optimal_dice(maps, masks, taus)
    np.testing.assert_allclose(best, dice.max(axis=0))
    np.testing.assert_allclose(tau_star, taus[dice.argmax(axis=0)])
