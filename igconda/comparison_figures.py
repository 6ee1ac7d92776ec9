"""The comparison's figures: the paper's Fig. 4 (metrics against lesion size) and Fig. 6 (mean
metric over lesion size × lesion SUVmean), one line or row of panels per method label.

Both read the long table of :func:`igconda.comparison.load_scored_runs`, whose normalised lesion
columns the score jobs write (the contract):

- ``lesion_size_norm``: the slice's lesion pixels / its body pixels, in (0, 1];
- ``lesion_suv_mean_norm``: the mean intensity over the slice's lesion pixels / the slice's
  maximum intensity, in (0, 1] (1 when the lesion holds only the hottest pixels).

The binning (:func:`size_bins`, :func:`heatmap_cells`) is separate from the drawing, so the
numbers behind each figure are testable and written beside it as CSV.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the comparison job runs on servers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from igconda.evaluation import METRIC_TITLES  # noqa: E402

#: The four metrics of Figs. 4 and 6, one panel each.
FIGURE_METRICS = ("dsc_max", "auprc", "hd95", "sensitivity")
SIZE, SUV = "lesion_size_norm", "lesion_suv_mean_norm"
#: Fig. 4: sizes below 0.5 in 6 equal bins (larger lesions are rare and would dominate nothing).
SIZE_LIMIT, SIZE_BINS = 0.5, 6
#: Fig. 6: 25 × 25 cells; size over [0, 0.5) as in Fig. 4, SUVmean over [0, 1].
HEATMAP_BINS = 25
HEATMAP_SIZE_RANGE, HEATMAP_SUV_RANGE = (0.0, SIZE_LIMIT), (0.0, 1.0)


def _bin_index(values: np.ndarray, lo: float, hi: float, bins: int, *,
               closed_right: bool) -> np.ndarray:
    """(N,) bin of each value among ``bins`` equal bins of [lo, hi) (or [lo, hi] when
    ``closed_right``); -1 outside. Computed on the edges, not by division, so a value on an
    edge falls in the bin it opens whatever the floating-point rounding."""
    edges = np.linspace(lo, hi, bins + 1)
    which = np.searchsorted(edges, values, side="right") - 1
    if closed_right:
        which[values == hi] = bins - 1
    which[(which < 0) | (which >= bins) | ~np.isfinite(values)] = -1
    return which


def size_bins(scores: pd.DataFrame, metrics: Sequence[str] = FIGURE_METRICS, *,
              limit: float = SIZE_LIMIT, bins: int = SIZE_BINS) -> pd.DataFrame:
    """Fig. 4's numbers: per method label, metric and size bin, the mean ± SEM of the metric.

    Slices with ``lesion_size_norm >= limit`` are left out; [0, limit) is cut into ``bins``
    equal bins. A metric's NaN values (HD95 where the map is empty at τ*) are left out of its
    bin. SEM = sample std (ddof = 1) / √n, NaN for a bin of one slice.

    Args:
        scores: long per-slice rows with ``method_label``, ``lesion_size_norm`` and ``metrics``.

    Returns:
        One row per (method_label, metric, bin) with a value: ``bin``, ``lo``, ``hi``,
        ``centre``, ``n``, ``mean``, ``sem``; labels in first-appearance order.
    """
    edges = np.linspace(0.0, limit, bins + 1)
    which = _bin_index(scores[SIZE].to_numpy(float), 0.0, limit, bins, closed_right=False)
    rows = []
    for label in dict.fromkeys(scores["method_label"]):
        mine = (scores["method_label"] == label).to_numpy()
        for metric in metrics:
            values = scores[metric].to_numpy(float)
            for b in range(bins):
                v = values[mine & (which == b)]
                v = v[np.isfinite(v)]
                if not v.size:
                    continue
                sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
                rows.append({"method_label": label, "metric": metric, "bin": b, "lo": edges[b],
                             "hi": edges[b + 1], "centre": 0.5 * (edges[b] + edges[b + 1]),
                             "n": int(v.size), "mean": float(v.mean()), "sem": sem})
    return pd.DataFrame(rows, columns=["method_label", "metric", "bin", "lo", "hi", "centre", "n",
                                       "mean", "sem"])


def size_figure(binned: pd.DataFrame, *, limit: float = SIZE_LIMIT) -> Figure:
    """Fig. 4 from :func:`size_bins`: 2 × 2 panels (⌈DSC⌉, AUPRC, HD95, sensitivity), the mean ±
    SEM per size bin, one line per method label."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    labels = list(dict.fromkeys(binned["method_label"]))
    # tab10 repeats after 10 methods (a comparison has 12+): the line style tells the next ten apart.
    styles = {label: (plt.get_cmap("tab10")(i % 10), ("-", "--", ":")[(i // 10) % 3])
              for i, label in enumerate(labels)}
    for ax, metric in zip(axes.ravel(), FIGURE_METRICS, strict=True):
        for label in labels:
            rows = binned[(binned["method_label"] == label) & (binned["metric"] == metric)]
            if not rows.empty:
                colour, style = styles[label]
                ax.errorbar(rows["centre"], rows["mean"], yerr=rows["sem"].fillna(0.0), fmt="o",
                            ls=style, ms=3, capsize=2, color=colour, label=label)
        ax.set_xlim(0.0, limit)
        ax.set_xlabel("normalised lesion size (lesion / body pixels)")
        ax.set_ylabel(METRIC_TITLES.get(metric, metric))
        ax.grid(alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Metrics against normalised lesion size (< {limit:g}; mean ± SEM per bin)")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 2) // 3), 1, 0.97))
    return fig


def heatmap_cells(scores: pd.DataFrame, metric: str, *, bins: int = HEATMAP_BINS,
                  size_range: tuple[float, float] = HEATMAP_SIZE_RANGE,
                  suv_range: tuple[float, float] = HEATMAP_SUV_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 6's numbers for one method label's rows: the mean metric per (SUVmean, size) cell.

    Size bins cover [lo, hi) (Fig. 4's restriction), SUVmean bins [lo, hi] (a lesion of only
    the hottest pixels has SUVmean 1). Slices outside either range or with a NaN metric are
    left out.

    Returns:
        ``(means, counts)``, both (bins, bins): row = SUVmean bin (low to high), column = size
        bin; ``means`` is NaN where a cell has no slice.
    """
    col = _bin_index(scores[SIZE].to_numpy(float), *size_range, bins, closed_right=False)
    row = _bin_index(scores[SUV].to_numpy(float), *suv_range, bins, closed_right=True)
    values = scores[metric].to_numpy(float)
    ok = (col >= 0) & (row >= 0) & np.isfinite(values)
    flat = row[ok] * bins + col[ok]
    counts = np.bincount(flat, minlength=bins * bins).reshape(bins, bins)
    sums = np.bincount(flat, weights=values[ok], minlength=bins * bins).reshape(bins, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, counts


def heatmap_figure(scores: pd.DataFrame, labels: Sequence[str] | None = None, *,
                   metrics: Sequence[str] = FIGURE_METRICS, bins: int = HEATMAP_BINS,
                   size_range: tuple[float, float] = HEATMAP_SIZE_RANGE,
                   suv_range: tuple[float, float] = HEATMAP_SUV_RANGE) -> Figure:
    """Fig. 6: one row of panels per method label, one column per metric, each the mean metric
    over (normalised size, normalised SUVmean) cells of :func:`heatmap_cells`; empty cells blank.

    A column shares one colour scale across rows, so methods compare at a glance; HD95's scale
    is reversed (dark = far), so bright is good in every panel.

    Args:
        scores: long per-slice rows (``method_label``, the lesion columns, ``metrics``).
        labels: the method labels to draw (default: all, in first-appearance order).
    """
    labels = list(dict.fromkeys(scores["method_label"])) if labels is None else list(labels)
    unknown = [lb for lb in labels if lb not in set(scores["method_label"])]
    if unknown or not labels:
        raise ValueError(f"no scores for method labels {unknown or labels}")
    cells = {(lb, m): heatmap_cells(scores[scores["method_label"] == lb], m, bins=bins,
                                    size_range=size_range, suv_range=suv_range)[0]
             for lb in labels for m in metrics}
    fig, axes = plt.subplots(len(labels), len(metrics), squeeze=False, layout="constrained",
                             figsize=(3.3 * len(metrics) + 0.6, 3.0 * len(labels) + 1.2))
    extent = (*size_range, *suv_range)
    for c, metric in enumerate(metrics):
        stack = np.stack([cells[(lb, metric)] for lb in labels])
        finite = stack[np.isfinite(stack)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        cmap = plt.get_cmap("viridis_r" if metric == "hd95" else "viridis").with_extremes(bad="white")
        for r, label in enumerate(labels):
            ax = axes[r, c]
            image = ax.imshow(np.ma.masked_invalid(cells[(label, metric)]), origin="lower",
                              extent=extent, aspect="auto", cmap=cmap, vmin=lo,
                              vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
            if r == 0:
                ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{label}\nlesion SUVmean / slice max", fontsize=8)
            if r == len(labels) - 1:
                ax.set_xlabel("lesion / body pixels", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=axes[:, c].tolist(), location="bottom", shrink=0.9,
                     aspect=25, label=METRIC_TITLES.get(metric, metric))
    fig.suptitle(f"Mean metric per (normalised lesion size, SUVmean) cell, {bins} × {bins} bins; "
                 "blank: no slice", fontsize=10)
    return fig
