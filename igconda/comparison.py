"""The comparison stage: every scored method read back from MLflow, and the paper's Tables 1–4.

The score jobs write one MLflow run per scored method (the contract, ``docs/CONTRACTS.md``):

- tags ``igconda.stage = score``, ``igconda.method`` (a method name of
  :mod:`igconda.evaluation`, e.g. ``igconda_abs``, ``hirescam``), ``igconda.variant`` (free text,
  e.g. the attention levels ``011`` of an IgCONDA network; ``""`` for none) and
  ``igconda.data_version``;
- the artifact ``scores/per_slice_scores.parquet``: rows of
  :data:`igconda.data.schema.SCORE_SCHEMA`, one per unhealthy slice, plus ``lesion_size_norm``
  (lesion pixels / body pixels of the slice) and ``lesion_suv_mean_norm`` (mean lesion intensity /
  the slice's maximum); and ``scores/summary.csv`` (not read here: every number is recomputed
  from the per-slice rows, so that all methods are summarised by the same code).

:func:`load_scored_runs` gathers them into one long DataFrame with a ``method_label`` per
(method, variant) and says which runs it skipped and why; :func:`metric_tables` makes one table
per metric (the paper's Tables 1–4 and Dice@τ beside ⌈DSC⌉) through
:func:`igconda.evaluation.summarize`, the one place means and stds are computed. The figures are
in :mod:`igconda.comparison_figures`, the markdown and HTML in :mod:`igconda.comparison_report`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from igconda import tracking
from igconda.data.schema import validate_scores
from igconda.evaluation import METHOD_TITLES, SUPERVISED, method_order, summarize

#: Tags of a score run (the contract with the score jobs).
STAGE_TAG, METHOD_TAG, VARIANT_TAG, VERSION_TAG = (
    "igconda.stage", "igconda.method", "igconda.variant", "igconda.data_version")
SCORE_STAGE, COMPARISON_STAGE = "score", "comparison"
#: The per-slice artifact of a score run.
SCORES_ARTIFACT = "scores/per_slice_scores.parquet"
#: Columns a score run adds to :data:`~igconda.data.schema.SCORE_SCHEMA` (normalised lesion size
#: and SUVmean, for Figs. 4 and 6).
LESION_COLUMNS = ("lesion_size_norm", "lesion_suv_mean_norm")
#: Run statuses whose artifacts are not trusted (the score job stopped before it was done).
FAILED_STATUSES = ("FAILED", "KILLED")

#: The metrics of the paper's Tables 1–4, in order, and Dice@τ, shown beside ⌈DSC⌉.
PAPER_METRICS = ("dsc_max", "auprc", "hd95", "sensitivity")
TABLE_METRICS = ("dsc_max", "dice_tau", "auprc", "hd95", "sensitivity")
TABLE_NUMBERS = {"dsc_max": "1", "dice_tau": "1b", "auprc": "2", "hd95": "3", "sensitivity": "4"}
TABLE_TITLES = {
    "dsc_max": "⌈DSC⌉ (best Dice over τ ∈ {0.1, …, 0.9}, chosen per slice)",
    "dice_tau": "Dice@τ (one τ per method, calibrated on the tune split)",
    "auprc": "AUPRC",
    "hd95": "HD95 (pixels, at τ*; n = slices where it is defined)",
    "sensitivity": "Detection sensitivity (per-slice mean; pooled = found / lesions)",
}
#: Metrics where the lowest mean is the best.
LOWER_IS_BETTER = frozenset({"hd95"})
#: Methods never marked best: the supervised upper bound sees pixel labels, the others do not.
NOT_COMPETING = (SUPERVISED,)


class MixedDataVersionsError(ValueError):
    """Score runs of different data versions were found and none was chosen."""


@dataclass(frozen=True)
class SkippedRun:
    """A score run left out of the comparison, and why."""

    run_id: str
    run_name: str
    reason: str


@dataclass
class ScoredRuns:
    """What :func:`load_scored_runs` found.

    Attributes:
        scores: one row per (run, unhealthy slice): the :data:`SCORE_SCHEMA` columns,
            :data:`LESION_COLUMNS`, ``variant``, ``method_label``, ``run_id``, ``data_version``.
        runs: one row per run used: ``run_id``, ``run_name``, ``method``, ``variant``,
            ``method_label``, ``data_version``, ``n_rows``; in table order.
        skipped: the runs left out.
    """

    scores: pd.DataFrame
    runs: pd.DataFrame
    skipped: list[SkippedRun] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Method labels in table order."""
        return self.runs["method_label"].tolist()

    @property
    def data_versions(self) -> list[str]:
        return sorted(self.runs["data_version"].unique().tolist())


def method_label(method: str, variant: str = "") -> str:
    """The display name of a (method, variant): its :data:`METHOD_TITLES` title, then the variant
    in parentheses when there is one (``"IgCONDA |x−x̂| (paper) (011)"``)."""
    title = METHOD_TITLES.get(method, method)
    return f"{title} ({variant})" if variant else title


def _read_scores(tracking_uri: str, run_id: str, folder: Path) -> pd.DataFrame | str:
    """The run's per-slice scores, or the reason they cannot be used."""
    if SCORES_ARTIFACT not in tracking.list_artifacts(tracking_uri, run_id, "scores"):
        return f"no {SCORES_ARTIFACT} artifact"
    local = tracking.download_artifact(tracking_uri, run_id, SCORES_ARTIFACT, folder)
    try:
        frame = pq.read_table(local).to_pandas()
        validate_scores(frame)  # ValueError names the missing or non-numeric column
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        return f"{SCORES_ARTIFACT} breaks the contract: {err}"
    missing = [c for c in LESION_COLUMNS
               if c not in frame.columns or not pd.api.types.is_numeric_dtype(frame[c])]
    if missing:
        return f"{SCORES_ARTIFACT} lacks the numeric lesion columns {missing}"
    if frame.empty:
        return f"{SCORES_ARTIFACT} has no rows"
    return frame


def load_scored_runs(tracking_uri: str, experiment: str, *, data_version: str | None = None,
                     allow_mixed: bool = False) -> ScoredRuns:
    """Every score run of ``experiment`` as one long table of per-slice scores.

    A run is skipped (and listed in ``skipped`` with the reason) when it failed or was killed,
    lacks the method or data-version tag, has no usable :data:`SCORES_ARTIFACT`, holds rows of
    another method than its tag names, is of another data version than ``data_version``, or
    is superseded by a newer run of the same (method, variant).

    Args:
        tracking_uri: the MLflow store.
        experiment: the study's experiment name.
        data_version: keep only runs of this data version.
        allow_mixed: accept runs of several data versions (otherwise refused).

    Raises:
        MixedDataVersionsError: runs of more than one data version remain, neither
            ``data_version`` nor ``allow_mixed`` was given; the message names every run.
        ValueError: the experiment has no usable score run.
    """
    runs = tracking.find_runs(tracking_uri, experiment, f"tags.\"{STAGE_TAG}\" = '{SCORE_STAGE}'")
    skipped: list[SkippedRun] = []
    kept: dict[tuple[str, str], tuple[dict, pd.DataFrame]] = {}
    with tempfile.TemporaryDirectory(prefix="igconda-compare-") as tmp:
        for run in runs:  # newest first: the first run of a (method, variant) wins
            tags, run_id = run["tags"], run["run_id"]
            name = tags.get("mlflow.runName", "")
            method, variant = tags.get(METHOD_TAG, ""), tags.get(VARIANT_TAG, "")
            version = tags.get(VERSION_TAG, "")

            def skip(reason: str, run_id: str = run_id, name: str = name) -> None:
                skipped.append(SkippedRun(run_id, name, reason))

            if run["status"] in FAILED_STATUSES:
                skip(f"run status {run['status']}")
            elif not method or not version:
                skip(f"no {METHOD_TAG if not method else VERSION_TAG} tag")
            elif data_version is not None and version != data_version:
                skip(f"data version {version}, not {data_version}")
            elif (method, variant) in kept:
                skip(f"superseded by the newer run {kept[(method, variant)][0]['run_id']} "
                     f"of {method_label(method, variant)}")
            else:
                folder = Path(tmp) / run_id
                folder.mkdir()
                frame = _read_scores(tracking_uri, run_id, folder)
                other = [] if isinstance(frame, str) else sorted(set(frame["method"]) - {method})
                if isinstance(frame, str):
                    skip(frame)
                elif other:
                    skip(f"rows of methods {other}, but the run is tagged {method}")
                else:
                    kept[(method, variant)] = (run, frame)
    if not kept:
        raise ValueError(f"no usable score runs in experiment {experiment!r} at {tracking_uri}"
                         + "".join(f"\n  skipped {s.run_id}: {s.reason}" for s in skipped))
    versions: dict[str, list[str]] = {}
    for run, _ in kept.values():
        versions.setdefault(run["tags"][VERSION_TAG], []).append(run["run_id"])
    if len(versions) > 1 and not allow_mixed:
        listing = "; ".join(f"{v}: runs {', '.join(ids)}" for v, ids in sorted(versions.items()))
        raise MixedDataVersionsError(
            f"score runs of {len(versions)} data versions in experiment {experiment!r} ({listing}); "
            "choose one with data_version (--data-version) or allow mixing (--allow-mixed-data-versions)")
    return _assemble(kept, skipped)


def _assemble(kept: dict[tuple[str, str], tuple[dict, pd.DataFrame]],
              skipped: list[SkippedRun]) -> ScoredRuns:
    """The long table and the run list, in table order: methods by
    :func:`~igconda.evaluation.method_order`, variants sorted within a method."""
    order = method_order(sorted({m for m, _ in kept}))
    keys = sorted(kept, key=lambda k: (order.index(k[0]), k[1]))
    frames, rows = [], []
    for method, variant in keys:
        run, frame = kept[(method, variant)]
        label = method_label(method, variant)
        version = run["tags"][VERSION_TAG]
        frames.append(frame.assign(variant=variant, method_label=label, run_id=run["run_id"],
                                   data_version=version))
        rows.append({"run_id": run["run_id"], "run_name": run["tags"].get("mlflow.runName", ""),
                     "method": method, "variant": variant, "method_label": label,
                     "data_version": version, "n_rows": len(frame)})
    return ScoredRuns(pd.concat(frames, ignore_index=True), pd.DataFrame(rows), skipped)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricTable:
    """One metric's table: method labels × groups (cohorts, ``internal (all)``, ``external (all)``).

    Attributes:
        metric: the per-slice column (``dsc_max``, ``dice_tau``, ``auprc``, ``hd95``, ``sensitivity``).
        number, title: the table's number (``"1"``… ``"4"``, ``"1b"``) and heading.
        numbers: long form, one row per (label, group): ``method``, ``variant``,
            ``method_label``, ``group``, ``n_slices``, ``mean``, ``std`` (population, as
            :func:`~igconda.evaluation.summarize`), ``n`` (slices where the metric is defined),
            ``best``, and ``pooled``/``n_detected``/``n_lesions`` (sensitivity) or ``tau`` (Dice@τ).
        cells: labels × groups, formatted text without markup (``–`` where no value).
        best: labels × groups, True where the cell is the column's best.
        not_marked: the labels never marked best (the supervised upper bound).
    """

    metric: str
    number: str
    title: str
    numbers: pd.DataFrame
    cells: pd.DataFrame
    best: pd.DataFrame
    not_marked: tuple[str, ...] = ()


def _summaries(scored: ScoredRuns) -> pd.DataFrame:
    """:func:`summarize` of each run (by cohort, with the pooled role rows), labelled."""
    parts = []
    for run in scored.runs.itertuples():
        rows = scored.scores[scored.scores["run_id"] == run.run_id]
        summary = summarize(rows, by=("cohort",), metrics=TABLE_METRICS)
        parts.append(summary.assign(variant=run.variant, method_label=run.method_label))
    return pd.concat(parts, ignore_index=True)


def _groups(summary: pd.DataFrame) -> list[str]:
    """Cohorts sorted, then the pooled ``(all)`` rows, as :func:`summarize` orders them."""
    groups = list(dict.fromkeys(summary["group"]))
    pooled = [g for g in ("internal (all)", "external (all)") if g in groups]
    return sorted(g for g in groups if g not in pooled) + pooled


def mark_best(means: pd.DataFrame, *, lower_is_better: bool, digits: int,
              exclude: Sequence[str] = ()) -> pd.DataFrame:
    """True where a cell holds its column's best mean, as shown (rounded to ``digits``; ties all
    marked); rows in ``exclude`` are never marked. ``means``: labels × groups, NaN = no value."""
    shown = means.round(digits)
    competing = shown.drop(index=[e for e in exclude if e in shown.index])
    target = competing.min() if lower_is_better else competing.max()
    best = shown.eq(target, axis=1) & shown.notna()
    best.loc[best.index.isin(list(exclude))] = False
    return best


def metric_table(scored: ScoredRuns, metric: str, *, digits: int = 3,
                 summary: pd.DataFrame | None = None,
                 not_competing: Sequence[str] = NOT_COMPETING) -> MetricTable:
    """One metric's table (see :class:`MetricTable`).

    Args:
        scored: from :func:`load_scored_runs`.
        metric: one of :data:`TABLE_METRICS`.
        digits: decimals shown (and compared when marking the best).
        summary: the labelled summaries, when already computed (see :func:`metric_tables`).
        not_competing: methods (names, not labels) never marked best.
    """
    if metric not in TABLE_METRICS:
        raise ValueError(f"unknown table metric {metric!r}; known: {TABLE_METRICS}")
    summary = _summaries(scored) if summary is None else summary
    groups, labels = _groups(summary), scored.labels
    numbers = pd.DataFrame({
        "method": summary["method"], "variant": summary["variant"],
        "method_label": summary["method_label"], "group": summary["group"],
        "n_slices": summary["n_slices"], "mean": summary[f"{metric}_mean"],
        "std": summary[f"{metric}_std"], "n": summary[f"{metric}_n"]})
    if metric == "sensitivity":
        for column, source in (("pooled", "sensitivity_pooled"), ("n_detected", "n_detected"),
                               ("n_lesions", "n_lesions")):
            numbers[column] = summary.get(source, np.nan)
    if metric == "dice_tau":
        numbers["tau"] = summary.get("tau", np.nan)
    means = numbers.pivot(index="method_label", columns="group", values="mean").reindex(
        index=labels, columns=groups)
    excluded = [method_label(r.method, r.variant) for r in scored.runs.itertuples()
                if r.method in not_competing]
    best = mark_best(means, lower_is_better=metric in LOWER_IS_BETTER, digits=digits,
                     exclude=excluded)
    lookup = numbers.set_index(["method_label", "group"])
    numbers["best"] = [bool(best.at[r.method_label, r.group]) for r in numbers.itertuples()]
    cells = pd.DataFrame("–", index=pd.Index(labels, name="method"), columns=groups)
    for (label, group), row in lookup.iterrows():
        cells.at[label, group] = _cell(metric, row, digits)
    best.index.name = "method"
    return MetricTable(metric, TABLE_NUMBERS[metric], TABLE_TITLES[metric], numbers, cells, best,
                       tuple(excluded))


def _cell(metric: str, row: pd.Series, digits: int) -> str:
    """``mean ± std``; HD95 adds ``(n = defined/slices)``, sensitivity the pooled figure."""
    if pd.isna(row["mean"]):
        return "–"
    text = f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}"
    if metric == "hd95":
        text += f" (n = {int(row['n'])}/{int(row['n_slices'])})"
    if metric == "sensitivity" and not pd.isna(row.get("pooled", np.nan)):
        text += (f"; pooled {row['pooled']:.{digits}f} "
                 f"({int(row['n_detected'])}/{int(row['n_lesions'])})")
    return text


def metric_tables(scored: ScoredRuns, *, digits: int = 3,
                  not_competing: Sequence[str] = NOT_COMPETING) -> list[MetricTable]:
    """The paper's Tables 1–4 with Dice@τ (1b) after ⌈DSC⌉, in :data:`TABLE_METRICS` order."""
    summary = _summaries(scored)
    return [metric_table(scored, m, digits=digits, summary=summary, not_competing=not_competing)
            for m in TABLE_METRICS]
