"""The one evaluation path: method names, scoring, threshold calibration, per-cohort summaries.

The anomaly methods that make the maps (:class:`igconda.anomaly_methods.AnomalyMethod`: IgCONDA's
map kinds, the w = 0 control, 41 % SUVmax thresholding, the raw intensity control, the trained
baselines) turn a batch of slices into named (N, H, W) maps in [0, 1]. Then

- :func:`score_maps` scores one method's maps (the paper's metrics of
  :func:`igconda.metrics.score_batch`, plus ``dice_tau``, the Dice at a calibrated threshold);
- :func:`score_methods` does it for every named map of a batch, as long-format rows
  (:data:`igconda.data.schema.SCORE_SCHEMA`, one row per unhealthy slice and method);
- :func:`calibrate_threshold` picks the one τ a user can apply, on the tune split;
- :func:`summarize` turns per-slice rows into per-method, per-cohort mean ± std and counts,
  and :func:`format_table` into markdown.

Tuning (``tuning/``), batch inference (``ray_jobs.infer``), the comparison's scoring
(``ray_jobs.score_method``), ``igconda detect`` and the report all call these; nothing here
imports Ray (or torch).

Method names, as they appear in the ``method`` column: ``igconda_<kind>`` for each map kind of
:data:`igconda.map_kinds.MAP_KINDS` (``igconda_abs`` is the paper's), ``igconda_w0`` for the
w = 0 control |x − x̂_∅|, ``threshold_41`` and ``intensity``; the trained baselines add
``hirescam`` (:mod:`igconda.baselines.classifier_cam`), ``supervised``, the upper bound
trained on pixel masks (:mod:`igconda.baselines.supervised`), ``fanogan``
(:mod:`igconda.baselines.fanogan`) and ``dpm_cg`` (:mod:`igconda.baselines.dpm_classifier_guidance`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from igconda.map_kinds import CONTROL, CONTROL_HOT, CONTROLS, MAP_KINDS
from igconda.metrics import METRIC_KEYS, dice_curve, score_batch, threshold_grid
from igconda.slice_batch import batch_images

#: Method name of the 41 % SUVmax rule and of the raw-intensity control.
THRESHOLD_41, INTENSITY = "threshold_41", "intensity"
#: Method name of the DPM + classifier guidance baseline (:mod:`igconda.baselines.dpm_classifier_guidance`).
DPM_CG = "dpm_cg"
#: Method names of the trained baselines: ResNet-18 + HiResCAM, f-AnoGAN, the supervised UNet.
HIRESCAM, FANOGAN, SUPERVISED = "hirescam", "fanogan", "supervised"
#: Method name of the w = 0 control.
CONTROL_METHOD = f"igconda_{CONTROL}"
CONTROL_HOT_METHOD = f"igconda_{CONTROL_HOT}"

#: The τ grid of :func:`calibrate_threshold`: 0.02, 0.04, …, 0.90. Finer and lower than the
#: paper's ⌈DSC⌉ grid (0.1 … 0.9) because a calibrated τ is applied to new scans as is, and the
#: maps of what guidance changes, or of a good round trip, rarely exceed 0.1: on the paper's
#: grid such a map would be empty at every τ and score 0 whatever it shows.
CALIBRATION_GRID: tuple[float, ...] = tuple(round(0.02 * k, 2) for k in range(1, 46))

#: Per-slice metric columns of :func:`score_maps`.
SCORE_KEYS = (*METRIC_KEYS, "dice_tau")
#: Columns summarised per cohort by :func:`summarize`, in the paper's Table-1 order, with the
#: Dice at the calibrated τ beside ⌈DSC⌉.
SUMMARY_METRICS = ("dsc_max", "dice_tau", "hd95", "auprc", "sensitivity")
#: Identifier columns carried from the slice batch into the score rows, when present.
ID_COLUMNS = ("patient_id", "cohort", "role", "tracer", "slice_index", "label", "lesion_pixels")

#: Display names for tables and the report.
METHOD_TITLES = {
    "igconda_abs": "IgCONDA |x−x̂| (paper)",
    "igconda_hot": "IgCONDA max(x−x̂,0)",
    "igconda_guidance": "IgCONDA guidance max(x̂∅−x̂,0)",
    "igconda_guidance_abs": "IgCONDA guidance |x̂∅−x̂|",
    CONTROL_METHOD: "w = 0 control |x−x̂∅|",
    CONTROL_HOT_METHOD: "w = 0 control max(x−x̂∅, 0)",
    THRESHOLD_41: "41% SUVmax",
    INTENSITY: "raw intensity",
    FANOGAN: "f-AnoGAN |x−G(E(x))|",
    DPM_CG: "DPM + classifier guidance |x−x̂|",
    HIRESCAM: "ResNet-18 HiResCAM",
    SUPERVISED: "supervised (upper bound)",
}
#: Display titles of the metrics, the one place they are spelled: the tables of
#: :func:`format_table`, the study report (:mod:`igconda.report_tables`) and the comparison's
#: tables and figures. ``sensitivity_pooled`` is :func:`summarize`'s found / lesions of a group.
METRIC_TITLES = {
    "dsc_max": "⌈DSC⌉",
    "dice_tau": "Dice@τ",
    "hd95": "HD95 (px)",
    "auprc": "AUPRC",
    "sensitivity": "Sensitivity (per-slice)",
    "sensitivity_pooled": "Sensitivity (pooled)",
}


def pooled_sensitivity_cell(row: Mapping[str, Any], digits: int = 3) -> str:
    """A :func:`summarize` row's pooled lesion sensitivity as ``"0.500 (3/6)"`` (``–`` if none)."""
    value = row.get("sensitivity_pooled", np.nan)
    if pd.isna(value):
        return "–"
    return f"{value:.{digits}f} ({int(row['n_detected'])}/{int(row['n_lesions'])})"


def igconda_method(kind: str) -> str:
    """The method name of an IgCONDA map kind (or of the control, ``"w0"``)."""
    if kind not in (*MAP_KINDS, *CONTROLS):
        raise ValueError(f"unknown anomaly map kind {kind!r}; known: {[*MAP_KINDS, *CONTROLS]}")
    return f"igconda_{kind}"


def method_order(methods: Sequence[str], chosen: str | None = None) -> list[str]:
    """Methods in the order tables show them: the chosen map, the paper's, the other IgCONDA
    maps, the w = 0 controls, thresholding, raw intensity, the trained baselines (HiResCAM,
    f-AnoGAN, DPM + classifier guidance), the supervised upper bound, then anything else
    alphabetically."""
    known = [igconda_method(k) for k in MAP_KINDS] + [
        CONTROL_METHOD, CONTROL_HOT_METHOD, THRESHOLD_41, INTENSITY, HIRESCAM, FANOGAN, DPM_CG, SUPERVISED]
    first = [m for m in (chosen, "igconda_abs") if m]
    order = list(dict.fromkeys([*first, *known]))
    present = [m for m in order if m in methods]
    return present + sorted(m for m in set(methods) if m not in order)


# --------------------------------------------------------------------------------------------
# Scoring and calibration
# --------------------------------------------------------------------------------------------


def dice_at(maps: np.ndarray, masks: np.ndarray, tau: float) -> np.ndarray:
    """(N,) Dice of ``maps >= tau`` against the masks; NaN where the mask is empty."""
    return dice_curve(maps, masks, [float(tau)])[1][0]


def calibrate_threshold(maps: np.ndarray, masks: np.ndarray,
                        grid: Sequence[float] = CALIBRATION_GRID) -> tuple[float, float]:
    """The one τ that maximises the mean per-slice Dice of ``maps >= τ`` (tune split only).

    ⌈DSC⌉ picks each slice's τ from its own ground truth, which no user can do; a τ calibrated
    here is applied unchanged to every new slice. Ties go to the lowest τ.

    Args:
        maps: (N, H, W) maps of unhealthy slices; masks: (N, H, W) their lesion masks.
        grid: candidate τ values (default :data:`CALIBRATION_GRID`).

    Returns:
        ``(tau, mean_dice)``.

    Raises:
        ValueError: no slice has a lesion pixel to calibrate on.
    """
    return best_threshold(dice_curve(maps, masks, grid)[1], grid)


def best_threshold(dice: np.ndarray, grid: Sequence[float] = CALIBRATION_GRID) -> tuple[float, float]:
    """The τ of :func:`calibrate_threshold` from the slices' Dice at every τ of the grid, for a
    caller that has the Dice values and not the maps (``ray_jobs.score_method``'s one pass).

    Args:
        dice: (T, N) Dice of N slices at each τ of ``threshold_grid(grid)``, the second output
            of :func:`igconda.metrics.dice_curve`; NaN columns (no lesion pixel) are skipped.
        grid: the candidate τ values the Dice was computed at.

    Returns:
        ``(tau, mean_dice)``: the τ with the highest mean Dice (ties: the lowest τ) and that mean.

    Raises:
        ValueError: ``dice`` does not fit the grid, or no slice has a lesion pixel.
    """
    taus = threshold_grid(grid)
    dice = np.asarray(dice, dtype=np.float64)
    if dice.ndim != 2 or len(dice) != len(taus):
        raise ValueError(f"dice must be (T = {len(taus)}, N), one row per τ; got {dice.shape}")
    valid = ~np.isnan(dice[0])
    if not valid.any():
        raise ValueError("cannot calibrate a threshold: no slice with a lesion pixel")
    mean = dice[:, valid].mean(axis=1)
    best = int(np.argmax(mean))
    return float(taus[best]), float(mean[best])


def score_maps(maps: np.ndarray, masks: np.ndarray, tau: float | None = None) -> dict[str, np.ndarray]:
    """The per-slice metrics of one method's maps: :func:`igconda.metrics.score_batch` and
    ``dice_tau``, the Dice at the calibrated ``tau`` (NaN when no τ is given).

    Only slices with a lesion pixel are scored (the paper's means run over unhealthy slices); the
    others get NaN and zero lesion counts.

    Args:
        maps: (N, H, W) maps in [0, 1]; masks: (N, H, W) binary lesion masks.
        tau: the threshold a user applies, or None.

    Returns:
        ``{key: (N,) array}`` for :data:`SCORE_KEYS`.
    """
    masks = np.asarray(masks)
    n = len(masks)
    unhealthy = masks.reshape(n, -1).any(axis=1)
    out: dict[str, np.ndarray] = {k: np.full(n, np.nan) for k in SCORE_KEYS}
    out["n_lesions"] = np.zeros(n, np.int64)
    out["n_detected"] = np.zeros(n, np.int64)
    if unhealthy.any():
        scores = score_batch(np.asarray(maps)[unhealthy], masks[unhealthy])
        for key in METRIC_KEYS:
            out[key][unhealthy] = scores[key]
        if tau is not None:
            out["dice_tau"][unhealthy] = dice_at(np.asarray(maps)[unhealthy], masks[unhealthy], tau)
    return out


def score_methods(batch: Mapping[str, Any], maps: Mapping[str, np.ndarray],
                  taus: Mapping[str, float] | None = None,
                  scored: np.ndarray | None = None) -> pd.DataFrame:
    """Score every named map of one batch: one row per unhealthy slice and method.

    Args:
        batch: the slice columns (``mask`` required; :data:`ID_COLUMNS` are copied).
        maps: ``{method: (N, H, W) map}``, e.g. merged
            :meth:`igconda.anomaly_methods.AnomalyMethod.maps` results.
        taus: ``{method: calibrated τ}``; a method without one gets ``dice_tau`` NaN.
        scored: (N,) bool, the slices to score (default: all); the other unhealthy slices keep
            their rows, with NaN metrics and zero lesion counts (:func:`score_maps`' rule for a
            slice it does not score), for a caller that needs one row per unhealthy slice.

    Returns:
        Rows of :data:`igconda.data.schema.SCORE_SCHEMA` (``tau`` is the τ applied, or NaN).
    """
    taus = taus or {}
    first = next(iter(maps.values()), None)
    shape = first.shape[1:] if first is not None else None
    masks = batch_images(batch, "mask", shape, np.uint8)
    unhealthy = masks.reshape(len(masks), -1).any(axis=1)
    ids = {c: np.asarray(batch[c])[unhealthy] for c in ID_COLUMNS if c in batch}
    if scored is not None:  # an unscored slice is given score_maps as one without a lesion
        masks = np.where(np.asarray(scored, bool)[:, None, None], masks, 0).astype(np.uint8)
    frames = []
    for method, method_maps in maps.items():
        tau = taus.get(method)
        scores = score_maps(np.asarray(method_maps)[unhealthy], masks[unhealthy], tau)
        frame = pd.DataFrame(ids)
        frame["method"] = method
        for key in SCORE_KEYS:
            frame[key] = scores[key]
        frame["tau"] = np.nan if tau is None else float(tau)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*ids, "method", *SCORE_KEYS, "tau"])
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _group_stats(frame: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    row: dict[str, float] = {"n_slices": len(frame)}
    for name in metrics:
        values = frame[name].to_numpy(dtype=np.float64)
        ok = ~np.isnan(values)
        row[f"{name}_mean"] = float(values[ok].mean()) if ok.any() else np.nan
        # Population std (ddof = 0), as numpy computes it by default.
        row[f"{name}_std"] = float(values[ok].std()) if ok.any() else np.nan
        row[f"{name}_n"] = int(ok.sum())
    if {"n_lesions", "n_detected"} <= set(frame.columns):
        lesions, found = int(frame["n_lesions"].sum()), int(frame["n_detected"].sum())
        row["n_lesions"], row["n_detected"] = lesions, found
        row["sensitivity_pooled"] = found / lesions if lesions else np.nan
    if "tau" in frame.columns and frame["tau"].notna().any():
        row["tau"] = float(frame["tau"].dropna().iloc[0])
    return row


def summarize(
    per_slice: pd.DataFrame,
    by: Sequence[str] = ("cohort",),
    metrics: Sequence[str] = SUMMARY_METRICS,
) -> pd.DataFrame:
    """Per-method, per-group mean ± std of the per-slice metrics (the paper's Table 1 shape).

    Only unhealthy slices are summarised: rows with ``n_lesions == 0`` (or, without that column,
    NaN ``dsc_max``) are dropped, so ``n_slices`` is the number of unhealthy slices. Means and
    (population, ddof = 0) standard deviations skip NaN; ``<metric>_n`` says how many slices each
    averages (an HD95 over fewer than ``n_slices`` means some predictions were empty at τ*).
    Detection sensitivity is given per slice (``sensitivity_mean``) and pooled over the group's
    lesions (``sensitivity_pooled = Σ n_detected / Σ n_lesions``). ``tau`` is the calibrated
    threshold behind ``dice_tau``, when the rows carry one.

    If a ``role`` column is present, rows ``"internal (all)"`` and ``"external (all)"`` pool every
    slice of that role (the paper's internal aggregate and external test set); otherwise one
    ``"all"`` row pools everything. Metrics absent from ``per_slice`` are left out, except
    ``dsc_max``, which is required.

    Args:
        per_slice: one row per slice (and method, if there is a ``method`` column) with the
            columns of :func:`score_maps` and ``by``.
        by: grouping columns (one row per distinct combination, labelled ``"a / b"``).
        metrics: per-slice metric columns to summarise.

    Returns:
        A DataFrame with columns ``method`` (``"all"`` without a method column), ``group``,
        ``n_slices``, ``<metric>_mean``/``_std``/``_n`` and, when present, ``n_lesions``,
        ``n_detected``, ``sensitivity_pooled``, ``tau``; methods in :func:`method_order`.
    """
    by = [by] if isinstance(by, str) else list(by)
    frame = per_slice.copy()
    if "sensitivity" not in frame and {"n_lesions", "n_detected"} <= set(frame):
        frame["sensitivity"] = np.where(
            frame["n_lesions"] > 0, frame["n_detected"] / frame["n_lesions"].clip(lower=1), np.nan)
    missing = [c for c in [*by, "dsc_max"] if c not in frame.columns]
    if missing:
        raise ValueError(f"per_slice lacks columns {missing}; it has {list(frame.columns)}")
    metrics = [m for m in metrics if m in frame.columns]
    if "n_lesions" in frame:
        frame = frame[frame["n_lesions"] > 0]
    else:
        frame = frame[frame["dsc_max"].notna()]
    if "method" not in frame.columns:
        frame = frame.assign(method="all")
    rows: list[dict[str, Any]] = []
    for method in method_order(frame["method"].astype(str).unique().tolist()):
        sub = frame[frame["method"].astype(str) == method]
        groups: list[tuple[str, pd.DataFrame]] = []
        if by:
            for key, group in sub.groupby(by, sort=True):
                key = key if isinstance(key, tuple) else (key,)
                groups.append((" / ".join(str(k) for k in key), group))
        if "role" in sub.columns:
            groups += [(f"{role} (all)", sub[sub["role"] == role]) for role in ("internal", "external")
                       if (sub["role"] == role).any()]
        elif len(sub):
            groups.append(("all", sub))
        rows += [{"method": method, "group": label, **_group_stats(group, metrics)}
                 for label, group in groups]
    return pd.DataFrame(rows)


def format_table(summary: pd.DataFrame, digits: int = 3) -> str:
    """A :func:`summarize` result as markdown: one table per method, ``mean ± std`` cells.

    Each table has the group, its number of unhealthy slices, every summarised metric (``–`` when
    undefined) and, if present, the pooled lesion sensitivity ``found/lesions``; the method's
    heading names its calibrated τ.
    """
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    pooled = "sensitivity_pooled" in summary.columns
    header = ["Group", "Unhealthy slices", *(METRIC_TITLES.get(m, m) for m in metrics)]
    if pooled:
        header.append(METRIC_TITLES["sensitivity_pooled"])
    parts = []
    for method, table in summary.groupby("method", sort=False):
        title = METHOD_TITLES.get(str(method), str(method))
        if "tau" in table.columns and table["tau"].notna().any():
            title += f" (τ = {table['tau'].dropna().iloc[0]:g})"
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, row in table.iterrows():
            cells = [str(row["group"]), str(int(row["n_slices"]))]
            for m in metrics:
                mean, std = row[f"{m}_mean"], row[f"{m}_std"]
                cells.append("–" if pd.isna(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
            if pooled:
                cells.append(pooled_sensitivity_cell(row, digits))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
