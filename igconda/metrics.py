"""The paper's evaluation metrics (Ahamed & Rahmim 2025, §3.4), batched over slices.

Every function takes a batch of 2D slices, ``(N, H, W)`` arrays, and returns one value per slice
(``(N,)`` arrays); the maths is vectorised over the batch with numpy/scipy so that a predictor can
score a whole inference batch in one call. Distances are in pixels.

Definitions (and the choices the paper leaves open):

``dsc_max`` (the paper's ⌈DSC⌉)
    The best Dice over thresholds τ ∈ {0.1, …, 0.9}; a pixel is foreground when
    ``map >= τ`` (inclusive, so a map value of exactly τ counts). τ* is chosen per slice; ties go to
    the lowest τ. A prediction that is empty at every τ has Dice 0 (τ* = 0.1).
``hd95``
    The 95th-percentile Hausdorff distance at τ* between the mask BOUNDARIES: the larger of the two
    directed 95th percentiles (paper Eq. 14). A boundary pixel is a foreground pixel with a
    4-neighbour outside the mask or the image (``binary_erosion ^ mask`` with a cross, pixels
    outside the image counting as background), and the percentile interpolates linearly: this is
    MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)`` with ``spacing=None``.
    The reference code measures between all foreground points instead; we follow the paper.
``auprc``
    The area under the precision–recall curve of the unthresholded map against the mask, as the
    step sum of paper Eq. 16, which is average precision (``sklearn.metrics.average_precision_score``
    on the flattened slice; tied map values form one operating point).
``n_lesions`` / ``n_detected``
    Ground-truth lesions are the 4-connected components of the mask; predicted lesions the
    4-connected components of ``map >= τ*``. Each predicted component is matched to the lesion with
    which it has the highest IoU; it is a true positive if that IoU ≥ 0.5, and each lesion counts
    as detected at most once. ``sensitivity = n_detected / n_lesions`` per slice.

Empty cases (the metrics are meant for unhealthy slices only):

* empty mask: ``dsc_max``, ``tau_star``, ``hd95``, ``auprc`` and ``sensitivity`` are NaN (Dice,
  the boundary distance, precision–recall and sensitivity are all undefined without a positive
  pixel; scoring a healthy slice is a caller error that NaN keeps out of every mean);
  ``n_lesions = n_detected = 0``;
* non-empty mask, prediction empty at τ*: ``dsc_max = 0`` and ``hd95 = NaN`` (a distance to an
  empty set is undefined; MONAI returns inf and warns). :func:`igconda.evaluation.summarize`
  reports how many slices had an undefined HD95 so that a method that predicts nothing is not
  silently flattered;
* constant map: one operating point, so ``auprc`` is the lesion fraction of the slice; Dice is
  that of the whole slice if the constant is ≥ 0.1, else 0;
* all-ones mask: its boundary is the image's outer ring of pixels.

Maps are thresholded as given: they are expected in [0, 1], and nothing here rescales them.
IgCONDA's maps are absolute or positive differences of [0, 1] images clipped to [0, 1]
(:func:`igconda.diffusion.counterfactual.anomaly_maps`), not rescaled per slice; the 41 % SUVmax map is
binary and the raw-intensity control is the min–max scaled PET.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: The paper's threshold grid for ⌈DSC⌉: 0.1, 0.2, …, 0.9.
THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))
#: Columns of :func:`score_batch`'s result.
METRIC_KEYS = ("dsc_max", "tau_star", "hd95", "auprc", "n_lesions", "n_detected", "sensitivity")

# In-plane 4-connectivity for a (N, H, W) stack: a 3×3×3 structure whose only non-zero plane is
# the middle one, so that scipy labels / erodes every slice independently in one call.
_CROSS_2D = np.zeros((3, 3, 3), dtype=bool)
_CROSS_2D[1] = ndimage.generate_binary_structure(2, 1)

# AUPRC sorts (N, H·W) index arrays; chunking bounds that memory on large batches.
_AUPRC_CHUNK = 512


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 3:
        raise ValueError(f"{names[0]} must be a (N, H, W) batch of slices, got shape {a.shape}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {a.shape} and {names[1]} {b.shape} must have the same shape")
    return a, b


def _as_binary(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype == bool:
        return x
    if x.size and not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be binary (values 0/1 or bool); got values {np.unique(x)[:5]}…")
    return x.astype(bool)


def _as_maps(maps: np.ndarray) -> np.ndarray:
    if not np.issubdtype(maps.dtype, np.number) and maps.dtype != bool:
        raise ValueError(f"maps must be numeric, got dtype {maps.dtype}")
    maps = maps.astype(np.float32, copy=False) if maps.dtype != np.float64 else maps
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf; normalise the anomaly maps before scoring")
    return maps


def threshold_grid(thresholds: Sequence[float]) -> np.ndarray:
    """A τ grid as :func:`dice_curve` evaluates it: (T,) float64, sorted, without duplicates."""
    taus = np.asarray(thresholds, dtype=np.float64).ravel()
    if taus.size == 0 or not np.isfinite(taus).all():
        raise ValueError(f"thresholds must be a non-empty sequence of finite numbers, got {thresholds}")
    # Sorted ascending so that argmax's first-maximum rule breaks ties towards the lowest τ.
    return np.unique(taus)


def dice_curve(
    maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Dice of ``map >= τ`` against the mask for every τ of a grid, per slice.

    Args:
        maps: (N, H, W) anomaly maps; foreground is ``map >= τ``.
        masks: (N, H, W) binary lesion masks.
        thresholds: the grid of τ; order does not matter.

    Returns:
        ``(taus, dice)``: the grid sorted ascending, (T,) float64, and (T, N) float64 Dice, NaN
        where the mask is empty (and 0 where the prediction and the mask do not overlap).
    """
    maps, masks = _check_pair(maps, masks, ("maps", "masks"))
    maps, gt = _as_maps(maps), _as_binary(masks, "masks")
    taus = threshold_grid(thresholds)
    n, h, w = maps.shape
    flat, gt = maps.reshape(n, h * w), gt.reshape(n, h * w)
    gt_sum = gt.sum(axis=1)
    dice = np.empty((taus.size, n), dtype=np.float64)
    # τ is compared in the map's own precision, so that a float32 map value written as 0.7 is
    # ≥ τ = 0.7 (in float64, float32(0.7) < 0.7).
    for k, tau in enumerate(taus.astype(flat.dtype)):
        pred = flat >= tau
        inter = np.count_nonzero(pred & gt, axis=1)
        denom = np.count_nonzero(pred, axis=1) + gt_sum
        with np.errstate(invalid="ignore", divide="ignore"):
            dice[k] = 2.0 * inter / denom
    dice[:, gt_sum == 0] = np.nan
    return taus, dice


def optimal_dice(
    maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """⌈DSC⌉: the best Dice over a threshold grid, per slice.

    Args:
        maps: (N, H, W) anomaly maps (expected in [0, 1]); foreground is ``map >= τ``.
        masks: (N, H, W) binary lesion masks.
        thresholds: the grid of τ (default 0.1, …, 0.9); order does not matter.

    Returns:
        ``(dsc_max, tau_star)``, both (N,) float64: the best Dice and the lowest τ reaching it.
        NaN for both where the mask is empty; ``(0.0, min τ)`` where no τ overlaps the mask.
    """
    taus, dice = dice_curve(maps, masks, thresholds)
    n = dice.shape[1]
    empty = np.isnan(dice[0]) if taus.size else np.zeros(n, bool)
    best = np.argmax(np.nan_to_num(dice, nan=-1.0), axis=0)  # first maximum = lowest τ
    dsc_max = dice[best, np.arange(n)]
    tau_star = taus[best]
    dsc_max[empty] = np.nan
    tau_star[empty] = np.nan
    return dsc_max, tau_star


def _boundaries(x: np.ndarray) -> np.ndarray:
    """(N, H, W) bool → its 4-connected inner boundary, pixels outside the image as background."""
    return x & ~ndimage.binary_erosion(x, structure=_CROSS_2D, border_value=0)


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Per-slice Euclidean distance (pixels) from every pixel to the nearest ``edges`` pixel.

    Args:
        edges: (N, H, W) bool.

    Returns:
        (N, H, W) float64; inf on slices without any edge pixel (the caller masks them).
    """
    out = np.full(edges.shape, np.inf)
    # A 2D EDT per slice: measured 5× faster than one 3D EDT over the stack with a large slice
    # spacing (the 3D transform still does full passes along the batch axis).
    has_edges = edges.any(axis=(1, 2))
    for i in np.flatnonzero(has_edges):
        out[i] = ndimage.distance_transform_edt(~edges[i])
    return out


def _row_percentile(values: np.ndarray, valid: np.ndarray, q: float) -> np.ndarray:
    """Per-row q-th percentile (numpy's 'linear' method) of ``values[valid]``; NaN for empty rows.

    Args:
        values: (N, P) float; valid: (N, P) bool.
    """
    v = np.where(valid, values, np.inf)
    v.sort(axis=1)
    count = valid.sum(axis=1)
    pos = np.maximum(count - 1, 0) * (q / 100.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
    rows = np.arange(v.shape[0])
    v_lo, v_hi = v[rows, lo], v[rows, hi]
    with np.errstate(invalid="ignore"):
        out = v_lo + (v_hi - v_lo) * (pos - lo)
    out = np.where(hi == lo, v_lo, out)
    out[count == 0] = np.nan
    return out


def hd95(pred: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance between mask boundaries, per slice.

    ``max(P95{d(p, ∂G) : p ∈ ∂P}, P95{d(g, ∂P) : g ∈ ∂G})`` in pixels (paper Eq. 14), equal to
    MONAI's ``compute_hausdorff_distance(..., percentile=95, directed=False)``.

    Args:
        pred: (N, H, W) binary predictions (e.g. ``map >= τ*``).
        masks: (N, H, W) binary lesion masks.

    Returns:
        (N,) float64; NaN where the mask or the prediction is empty.
    """
    pred, masks = _check_pair(pred, masks, ("pred", "masks"))
    pred, gt = _as_binary(pred, "pred"), _as_binary(masks, "masks")
    n, h, w = pred.shape
    edge_p, edge_g = _boundaries(pred), _boundaries(gt)
    to_g = _distance_to(edge_g).reshape(n, h * w)
    to_p = _distance_to(edge_p).reshape(n, h * w)
    d_pg = _row_percentile(to_g, edge_p.reshape(n, h * w), 95.0)
    d_gp = _row_percentile(to_p, edge_g.reshape(n, h * w), 95.0)
    out = np.maximum(d_pg, d_gp)  # NaN if either direction is undefined
    return out


def auprc(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Average precision of the unthresholded map against the mask, per slice (paper Eq. 16).

    ``AP = Σ_n (R_n − R_{n−1}) P_n`` over the distinct map values in decreasing order, the same
    number as ``sklearn.metrics.average_precision_score(mask.ravel(), map.ravel())``.

    Args:
        maps: (N, H, W) anomaly maps, any real range.
        masks: (N, H, W) binary lesion masks.

    Returns:
        (N,) float64 in [0, 1]; NaN where the mask is empty.
    """
    maps, masks = _check_pair(maps, masks, ("maps", "masks"))
    maps, gt = _as_maps(maps), _as_binary(masks, "masks")
    n, h, w = maps.shape
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _AUPRC_CHUNK):
        stop = min(start + _AUPRC_CHUNK, n)
        out[start:stop] = _auprc_rows(maps[start:stop].reshape(stop - start, h * w),
                                      gt[start:stop].reshape(stop - start, h * w))
    return out


def _auprc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, P) scores and bool labels → (N,) average precision."""
    m, p = scores.shape
    if p == 0:
        return np.full(m, np.nan)
    # The order inside a run of tied scores does not matter (ties form one operating point).
    order = np.argsort(-scores, axis=1)
    s = np.take_along_axis(scores, order, axis=1)
    tp = np.cumsum(np.take_along_axis(labels, order, axis=1), axis=1, dtype=np.float64)
    # Only the last pixel of a run of equal scores is an operating point (ties enter together).
    is_end = np.ones((m, p), dtype=bool)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    precision = tp / np.arange(1, p + 1)
    # TP count at the previous operating point: tp is non-decreasing, so a running max of tp at
    # operating points (0 elsewhere), shifted by one pixel, gives it.
    tp_at_end = np.where(is_end, tp, 0.0)
    prev = np.zeros_like(tp)
    prev[:, 1:] = np.maximum.accumulate(tp_at_end, axis=1)[:, :-1]
    gain = np.where(is_end, (tp - prev) * precision, 0.0).sum(axis=1)
    n_pos = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = gain / n_pos
    ap[n_pos == 0] = np.nan
    return ap


def detection(pred: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lesion-level detection: 4-connected components matched by IoU ≥ 0.5, per slice.

    Each predicted component is matched to the ground-truth lesion (4-connected component of the
    mask) with the highest IoU (ties: the lowest label); it is a true positive if that IoU ≥ 0.5.
    A lesion counts as detected at most once even if several components claim it.

    Args:
        pred: (N, H, W) binary predictions (``map >= τ*``).
        masks: (N, H, W) binary lesion masks.

    Returns:
        ``(n_detected, n_lesions)``, both (N,) int64.
    """
    pred, masks = _check_pair(pred, masks, ("pred", "masks"))
    pred, gt = _as_binary(pred, "pred"), _as_binary(masks, "masks")
    n = pred.shape[0]
    n_lesions = np.zeros(n, dtype=np.int64)
    n_detected = np.zeros(n, dtype=np.int64)
    if n == 0:
        return n_detected, n_lesions
    # One labelling call for the whole stack; the in-plane structure keeps slices apart, so
    # labels are unique across the batch and every component lives in one slice.
    lab_g, num_g = ndimage.label(gt, structure=_CROSS_2D)
    if num_g == 0:
        return n_detected, n_lesions
    lab_p, num_p = ndimage.label(pred, structure=_CROSS_2D)
    flat_g, flat_p = lab_g.ravel(), lab_p.ravel()
    pixels_per_slice = flat_g.size // n
    # Slice of each lesion, indexed by label: where its first pixel lies. (Label 0, the
    # background, may be absent: an all-ones mask.)
    labels, first = np.unique(flat_g, return_index=True)
    keep = labels > 0
    lesion_slice = np.zeros(num_g + 1, dtype=np.int64)
    lesion_slice[labels[keep]] = first[keep] // pixels_per_slice
    n_lesions[:] = np.bincount(lesion_slice[1:], minlength=n)
    if num_p == 0:
        return n_detected, n_lesions
    area_g = np.bincount(flat_g, minlength=num_g + 1)
    area_p = np.bincount(flat_p, minlength=num_p + 1)
    both = (flat_g > 0) & (flat_p > 0)
    pairs, inter = np.unique(
        flat_p[both].astype(np.int64) * (num_g + 1) + flat_g[both], return_counts=True
    )
    if pairs.size == 0:
        return n_detected, n_lesions
    p_lab, g_lab = pairs // (num_g + 1), pairs % (num_g + 1)
    iou = inter / (area_p[p_lab] + area_g[g_lab] - inter)
    # Best lesion per predicted component: sort by component, then IoU descending, then label.
    order = np.lexsort((g_lab, -iou, p_lab))
    p_sorted = p_lab[order]
    first_of_p = np.ones(order.size, dtype=bool)
    first_of_p[1:] = p_sorted[1:] != p_sorted[:-1]
    best = order[first_of_p]
    hits = best[iou[best] >= 0.5]
    detected = np.unique(g_lab[hits])  # each lesion at most once
    n_detected[:] = np.bincount(lesion_slice[detected], minlength=n)
    return n_detected, n_lesions


def score_batch(
    maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, np.ndarray]:
    """Every per-slice metric of the paper for one batch.

    Args:
        maps: (N, H, W) anomaly maps, expected in [0, 1].
        masks: (N, H, W) binary lesion masks (score unhealthy slices; empty masks give NaN).
        thresholds: the τ grid for ⌈DSC⌉.

    Returns:
        A dict of (N,) arrays keyed by :data:`METRIC_KEYS`: ``dsc_max``, ``tau_star``, ``hd95``,
        ``auprc``, ``sensitivity`` (float64) and ``n_lesions``, ``n_detected`` (int64). HD95 and
        detection are evaluated on ``maps >= tau_star``.
    """
    maps, masks = _check_pair(maps, masks, ("maps", "masks"))
    maps, gt = _as_maps(maps), _as_binary(masks, "masks")
    dsc_max, tau_star = optimal_dice(maps, gt, thresholds)
    # NaN τ* (empty mask) compares False: an empty prediction, whose metrics are NaN anyway.
    with np.errstate(invalid="ignore"):
        pred = maps >= tau_star.astype(maps.dtype)[:, None, None]  # same precision as optimal_dice
    n_detected, n_lesions = detection(pred, gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_lesions > 0, n_detected / np.maximum(n_lesions, 1), np.nan)
    return {
        "dsc_max": dsc_max,
        "tau_star": tau_star,
        "hd95": hd95(pred, gt),
        "auprc": auprc(maps, gt),
        "n_lesions": n_lesions,
        "n_detected": n_detected,
        "sensitivity": sensitivity,
    }
