"""The study's figures, drawn with matplotlib (Agg backend, no display needed).

Figures follow the paper: :func:`qualitative_figure` (Fig. 2/3: PET, ground truth, healthy
counterfactual, anomaly map, binarised map), :func:`lesion_size_figure` (Fig. 4/6: ⌈DSC⌉ against
lesion size), :func:`heatmap_figure` (Fig. 5: mean ⌈DSC⌉ over D × w) and
:func:`training_curves_figure`. Every function returns the ``Figure`` and leaves closing it to the
caller; :mod:`igconda.report` embeds them in the study's HTML page.

Slices are drawn in the radiological convention: a preprocessed slice is (H = X, W = Y) in RAS+
(see :mod:`igconda.data.schema`), shown with the patient's anterior at the top and the patient's
right on the viewer's left.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are drawn on servers and Ray workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

#: Display order of methods given by their report titles or raw names (others follow, sorted).
METHOD_ORDER = ("IgCONDA", "igconda", "41% SUVmax", "threshold_41", "raw intensity", "raw_intensity")


def ordered_methods(methods: Any) -> list[str]:
    """``methods`` in :data:`METHOD_ORDER`, then the rest alphabetically."""
    methods = [str(m) for m in methods]
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in known)


_ROW_TITLES = ("PET", "Ground truth", "Counterfactual", "Anomaly map", "Binarised map")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def display_slice(image: np.ndarray) -> np.ndarray:
    """(H = X, W = Y) RAS slice → array for ``imshow`` in the radiological convention.

    Row 0 is the most anterior (largest Y), column 0 the patient's right (largest X).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {image.shape}")
    return image[::-1, ::-1].T


def _as_stack(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 4 and array.shape[1] == 1:  # (N, 1, H, W) tensors
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {array.shape}")
    return array


def qualitative_figure(
    images: Any,
    masks: Any,
    counterfactuals: Any,
    maps: Any,
    binarised: Any,
    titles: Sequence[str] | None = None,
    *,
    unguided: Any | None = None,
    map_label: str = "|x − x̂|",
) -> Figure:
    """The paper's Fig. 2/3: one column per example slice, one row per stage of the method.

    Rows: PET, ground-truth mask, healthy counterfactual, (the unguided w = 0 decode of the same
    latent, when given), anomaly map, binarised map (at the slice's τ*). PET and the decodes share
    one grey scale per column, so what guidance removes shows as a difference between the two
    decodes, and what the round trip alone changes as one between PET and the unguided decode;
    anomaly maps share one ``inferno`` scale over [0, max].

    Args:
        images: (N, H, W) PET slices in [0, 1].
        masks: (N, H, W) ground-truth masks.
        counterfactuals: (N, H, W) healthy counterfactuals x̂.
        maps: (N, H, W) anomaly maps.
        binarised: (N, H, W) thresholded maps.
        titles: N column titles (e.g. ``"lymphoma p012 z40 ⌈DSC⌉ 0.71"``), wrapped to the column.
        unguided: optional (N, H, W) w = 0 decodes x̂_∅, drawn between counterfactual and map.
        map_label: the colour bar's label (the map kind's formula).

    Returns:
        The figure.
    """
    names = ["images", "masks", "counterfactuals", "maps", "binarised"]
    stacks = [_as_stack(n, v) for n, v in zip(
        names, (images, masks, counterfactuals, maps, binarised), strict=True)]
    row_titles = list(_ROW_TITLES)
    if unguided is not None:
        stacks.insert(3, _as_stack("unguided", unguided))
        names.insert(3, "unguided")
        row_titles.insert(3, "Unguided (w = 0)")
    map_row = len(stacks) - 2
    n = stacks[0].shape[0]
    if n == 0:
        raise ValueError("qualitative_figure needs at least one slice")
    for name, stack in zip(names[1:], stacks[1:], strict=True):
        if stack.shape != stacks[0].shape:
            raise ValueError(f"{name} has shape {stack.shape}, images {stacks[0].shape}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} slices")
    map_max = max(float(np.nanmax(stacks[map_row])), 1e-6)
    rows = len(stacks)
    fig, axes = plt.subplots(rows, n, figsize=(1.7 * n + 1.0, 1.7 * rows + 0.8), squeeze=False,
                             layout="constrained")
    decodes = [2] + ([3] if unguided is not None else [])
    for col in range(n):
        vmax = max([float(stacks[0][col].max())] + [float(stacks[r][col].max()) for r in decodes] + [1e-6])
        panels = [(stacks[0][col], "gray_r", 0.0, vmax), (stacks[1][col], "gray", 0.0, 1.0)]
        panels += [(stacks[r][col], "gray_r", 0.0, vmax) for r in decodes]
        panels += [(stacks[map_row][col], "inferno", 0.0, map_max), (stacks[-1][col], "gray", 0.0, 1.0)]
        for row, (data, cmap, lo, hi) in enumerate(panels):
            ax = axes[row, col]
            image = ax.imshow(display_slice(data), cmap=cmap, vmin=lo, vmax=hi,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(row_titles[row], fontsize=9)
            if row == 0 and titles is not None:
                ax.set_title(textwrap.fill(titles[col], 20), fontsize=7)
            if row == map_row and col == n - 1:
                fig.colorbar(image, ax=axes[map_row, :].tolist(), fraction=0.04, pad=0.02,
                             label=map_label)
    fig.suptitle("Healthy counterfactuals and anomaly maps", fontsize=11)
    return fig


def lesion_size_figure(
    per_slice: pd.DataFrame,
    *,
    pixel_area_mm2: float | None = None,
    num_bins: int = 6,
) -> Figure:
    """The paper's Fig. 4/6: ⌈DSC⌉ of each unhealthy slice against its lesion size.

    One panel per cohort, one colour per method; points are slices, lines the mean ⌈DSC⌉ in
    log-spaced size bins (shared across panels), so the small-lesion weakness of a method shows.

    Args:
        per_slice: columns ``method``, ``cohort``, ``lesion_pixels``, ``dsc_max``; rows without
            lesion pixels or without a ⌈DSC⌉ are left out.
        pixel_area_mm2: area of one slice pixel; when given the x axis is in mm², else pixels.
        num_bins: size bins for the mean lines.

    Returns:
        The figure (a single "no data" panel when nothing is left to plot).
    """
    required = {"method", "cohort", "lesion_pixels", "dsc_max"}
    missing = required - set(per_slice.columns)
    if missing:
        raise ValueError(f"per_slice lacks columns {sorted(missing)}")
    frame = per_slice[(per_slice["lesion_pixels"] > 0) & per_slice["dsc_max"].notna()].copy()
    scale = float(pixel_area_mm2) if pixel_area_mm2 else 1.0
    frame["size"] = frame["lesion_pixels"].astype(float) * scale
    unit = "mm²" if pixel_area_mm2 else "pixels"
    cohorts = sorted(frame["cohort"].astype(str).unique())
    if not cohorts:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no unhealthy slices to plot", ha="center", va="center")
        ax.set_axis_off()
        return fig
    methods = ordered_methods(frame["method"].astype(str).unique())
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    lo, hi = frame["size"].min(), frame["size"].max()
    edges = np.geomspace(lo, hi * 1.0001, num_bins + 1) if hi > lo else np.array([lo, lo + 1.0])
    ncols = min(3, len(cohorts))
    nrows = int(np.ceil(len(cohorts) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False,
                             sharey=True)
    for ax, cohort in zip(axes.ravel(), cohorts, strict=False):
        sub = frame[frame["cohort"].astype(str) == cohort]
        for method in methods:
            rows = sub[sub["method"].astype(str) == method]
            if rows.empty:
                continue
            ax.scatter(rows["size"], rows["dsc_max"], s=10, alpha=0.35, color=colours[method],
                       edgecolors="none")
            which = np.clip(np.digitize(rows["size"], edges) - 1, 0, len(edges) - 2)
            centres, means = [], []
            for b in range(len(edges) - 1):
                in_bin = rows["dsc_max"].to_numpy()[which == b]
                if in_bin.size:
                    centres.append(np.sqrt(edges[b] * edges[b + 1]))
                    means.append(float(in_bin.mean()))
            ax.plot(centres, means, "-o", ms=3, color=colours[method], label=method)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(cohort, fontsize=10)
        ax.set_xlabel(f"lesion size per slice ({unit})")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("⌈DSC⌉")
    for ax in axes.ravel()[len(cohorts):]:
        ax.set_axis_off()
    axes.ravel()[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("⌈DSC⌉ against lesion size (points: slices; lines: binned means)", fontsize=11)
    fig.tight_layout()
    return fig


def heatmap_figure(grid: pd.DataFrame, metric: str = "mean_dsc") -> Figure:
    """The paper's Fig. 5: mean ⌈DSC⌉ on the tuning set over noise level D × guidance scale w.

    Args:
        grid: one row per evaluated pair with columns ``noise_level``, ``guidance_scale`` and
            ``metric``; pairs not evaluated (random search) are left blank.
        metric: the column to show.

    Returns:
        The figure; each cell is annotated and the best cell is outlined.
    """
    missing = {"noise_level", "guidance_scale", metric} - set(grid.columns)
    if missing:
        raise ValueError(f"grid lacks columns {sorted(missing)}")
    if grid.empty:
        raise ValueError("grid is empty")
    table = grid.pivot_table(index="noise_level", columns="guidance_scale", values=metric,
                             aggfunc="first").sort_index().sort_index(axis=1)
    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 * values.shape[1] + 2.6, 0.7 * values.shape[0] + 1.8))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(values.shape[1]), [f"{w:g}" for w in table.columns])
    ax.set_yticks(range(values.shape[0]), [str(d) for d in table.index])
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("noise level D")
    finite = np.isfinite(values)
    if finite.any():
        mid = np.nanmin(values) + 0.5 * (np.nanmax(values) - np.nanmin(values))
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="black" if v > mid else "white")
        r, c = np.unravel_index(np.nanargmax(np.where(finite, values, -np.inf)), values.shape)
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_title(f"mean ⌈DSC⌉ (best D={table.index[r]}, w={table.columns[c]:g}: "
                     f"{values[r, c]:.3f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="mean ⌈DSC⌉" if metric == "mean_dsc" else metric)
    fig.tight_layout()
    return fig


def training_curves_figure(history: pd.DataFrame) -> Figure:
    """Training and validation loss per epoch (log scale).

    Args:
        history: columns ``epoch``, ``train_loss`` and optionally ``valid_loss`` (NaN on epochs
            without validation). The epoch of lowest validation loss is marked.

    Returns:
        The figure.
    """
    if "epoch" not in history.columns or "train_loss" not in history.columns:
        raise ValueError(f"history needs epoch and train_loss columns, has {list(history.columns)}")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(history["epoch"], history["train_loss"], "-", label="train loss")
    if "valid_loss" in history.columns and history["valid_loss"].notna().any():
        valid = history[history["valid_loss"].notna()]
        ax.plot(valid["epoch"], valid["valid_loss"], "-o", ms=3, label="validation loss")
        best = valid.loc[valid["valid_loss"].idxmin()]
        ax.axvline(best["epoch"], color="grey", ls="--", lw=1)
        ax.annotate(f"best epoch {int(best['epoch'])}", (best["epoch"], best["valid_loss"]),
                    textcoords="offset points", xytext=(5, 10), fontsize=8)
    positive = history["train_loss"].dropna()
    if len(positive) and (positive > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ε-MSE")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Training curves")
    fig.tight_layout()
    return fig
