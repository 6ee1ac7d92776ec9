"""The study report's tables: every method side by side per cohort, the calibrated thresholds,
and what the data can show (:mod:`igconda.report` puts them on the page).

Each function takes what a stage wrote (per-slice metrics, ``dataset.json``) and returns
DataFrames of formatted cells; nothing here reads files or draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from igconda.evaluation import METRIC_TITLES, pooled_sensitivity_cell, summarize
from igconda.figures import ordered_methods


def methods_table(per_slice: pd.DataFrame, digits: int = 3,
                  order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-cohort ``mean ± std`` of every metric, every method side by side.

    One call of :func:`igconda.evaluation.summarize` (unhealthy slices only; rows ``internal
    (all)`` / ``external (all)`` when a ``role`` column exists). ⌈DSC⌉ picks each slice's best
    threshold from its ground truth; Dice@τ is at the one threshold calibrated on the tune split
    (``–`` where a method has none), the number a user can expect. Sensitivity is the pooled
    lesion-level value (detected / lesions). Column titles: :data:`igconda.evaluation.METRIC_TITLES`.

    Args:
        per_slice: one row per slice and method with ``method``, ``cohort`` and the metric
            columns of :func:`igconda.evaluation.score_maps`.
        digits: decimals shown.
        order: methods in the order to show them (others follow, see :data:`igconda.figures.METHOD_ORDER`).

    Returns:
        A DataFrame indexed by cohort with an ``unhealthy slices`` column and (metric, method)
        column pairs of formatted strings.
    """
    if "method" not in per_slice.columns:
        raise ValueError("per_slice needs a 'method' column")
    metrics = [m for m in ("dsc_max", "dice_tau", "hd95", "auprc") if m in per_slice.columns]
    summary = summarize(per_slice, by=("cohort",), metrics=metrics)
    present = [str(m) for m in summary["method"].unique()]
    methods = [m for m in (order or ()) if m in present]
    methods += [m for m in ordered_methods(present) if m not in methods]
    groups = list(dict.fromkeys(summary["group"]))
    indexed = {m: summary[summary["method"] == m].set_index("group") for m in methods}
    columns: dict[tuple[str, str], list[str]] = {}
    for metric in [*metrics, "sensitivity_pooled"]:
        for method in methods:
            table = indexed[method]
            cells = []
            for group in groups:
                if group not in table.index:
                    cells.append("–")
                    continue
                row = table.loc[group]
                if metric == "sensitivity_pooled":
                    cells.append(pooled_sensitivity_cell(row, digits))
                else:
                    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
                    cells.append("–" if pd.isna(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
            columns[(METRIC_TITLES.get(metric, metric), method)] = cells
    table = pd.DataFrame(columns, index=pd.Index(groups, name="cohort"))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["metric", "method"])
    counts = summary.groupby("group", sort=False)["n_slices"].max()
    table.insert(0, ("unhealthy slices", ""), [int(counts.get(g, 0)) for g in groups])
    return table


def thresholds_table(per_slice: pd.DataFrame) -> pd.DataFrame:
    """The threshold τ each method's Dice@τ used (calibrated on the tune split), one row each."""
    if "tau" not in per_slice.columns:
        return pd.DataFrame(columns=["τ"])
    taus = per_slice.groupby("method", sort=False)["tau"].first()
    return pd.DataFrame({"τ": [("–" if pd.isna(t) else f"{t:g}") for t in taus]},
                        index=pd.Index([str(m) for m in taus.index], name="method"))


def data_coverage_tables(summary: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Tables of a preprocessing summary (``dataset.json``): what each split can show.

    Returns (when the summary has them) the unhealthy slices per cohort (rows) and split
    (columns), and per cohort the lesion voxels preprocessing kept and lost outside the field
    of view — a cohort whose lesions fall outside cannot be detected, whatever the method.
    """
    tables: dict[str, pd.DataFrame] = {}
    if summary.get("unhealthy_slices"):
        counts = pd.DataFrame(summary["unhealthy_slices"]).fillna(0).astype(int)
        counts.index.name = "cohort"
        tables["Unhealthy slices per cohort and split (data/dataset.json)"] = counts
    cohorts = (summary.get("coverage") or {}).get("cohorts")
    if cohorts:
        coverage = pd.DataFrame(cohorts).T
        coverage.index.name = "cohort"
        tables["Lesion voxels outside the field of view, per cohort (data/dataset.json)"] = coverage
    return tables
