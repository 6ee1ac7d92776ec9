"""The study report: what the pipeline's stages wrote, gathered into one HTML page.

:func:`build_study_report` reads a study folder (config, training history, tuning grid, the
inference stage's per-slice metrics and figures, the data summary) and writes
``<study>/report.html``; a missing part becomes a visible note, never an error. The tables are
:mod:`igconda.report_tables`', the figures :mod:`igconda.figures`', the page
:mod:`igconda.report_html`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: report generation runs on servers and Ray workers

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from igconda.checkpoint import CONFIG_FILE  # noqa: E402
from igconda.data.io import InferOutput  # noqa: E402
from igconda.data.study_layout import StudyLayout, TuneOutput  # noqa: E402
from igconda.figures import (  # noqa: E402
    heatmap_figure,
    lesion_size_figure,
    training_curves_figure,
)
from igconda.report_html import software_versions, write_html_report  # noqa: E402
from igconda.report_tables import (  # noqa: E402
    data_coverage_tables,
    methods_table,
    thresholds_table,
)


def _method_names() -> dict[str, str]:
    """Method names as the stages write them → names shown in the report."""
    from igconda.evaluation import METHOD_TITLES

    return {**METHOD_TITLES, "igconda": "IgCONDA", "raw_intensity": "raw intensity"}


def _chosen_method(study: Path) -> str | None:
    """The IgCONDA map kind the study chose (infer/summary.json, else tune/best.json)."""
    layout = StudyLayout(study)
    summary, best = InferOutput(layout.infer).summary, layout.tuned
    try:
        if summary.is_file():
            return json.loads(summary.read_text()).get("chosen_method")
        if best.is_file():
            return f"igconda_{json.loads(best.read_text()).get('map_kind', 'abs')}"
    except (OSError, ValueError):
        return None
    return None


def _training_history(best: Path) -> tuple[pd.DataFrame | None, str | None]:
    """The per-epoch history stored in the best checkpoint's train state (``train/best``)."""
    from igconda.checkpoint import load_train_state

    try:
        state = load_train_state(best) if best.is_dir() else None
    except (OSError, RuntimeError, ValueError) as err:
        return None, f"Training history not readable from train/best/train_state.pt: {err}"
    history = (state or {}).get("history")
    if not history:
        return None, "No training history (train/best/train_state.pt)."
    return (pd.DataFrame(history),
            "Training curves come from the best checkpoint's state: epochs after it are not shown.")


def build_study_report(study_dir: str | Path, output_html: str | Path) -> Path:
    """Gather a study folder's stage outputs into the HTML report.

    Reads, when present (a missing part becomes a visible note, never an error):

    - the best checkpoint's ``train/best/config.yaml``;
    - the history stored in ``train/best/train_state.pt`` → training curves;
    - ``tune/grid.csv`` and ``tune/best.json`` → the D × w heatmap and tables;
    - ``infer/tables/per_slice_metrics.csv`` (every method's per-slice metrics) → the per-cohort
      table of every method side by side and the lesion-size figure;
      ``infer/tables/methods.csv`` is shown only when that file is missing;
    - PNG figures the inference stage saved under ``infer/figures/`` (the qualitative figures);

    Only these declared outputs of the stages are read (``ray_jobs.infer``'s module docstring
    lists the inference stage's); nothing they wrote is recomputed.
    - ``data/dataset.json`` → unhealthy slices per split and cohort, the lesion voxels that fell
      outside the field of view, and preprocessing's warnings (:func:`data_coverage_tables`).

    Args:
        study_dir: the pipeline's ``--output`` folder.
        output_html: where to write the page.

    Returns:
        The path of the written HTML file.
    """
    study = Path(study_dir)
    layout = StudyLayout(study)
    infer = InferOutput(layout.infer)
    notes: list[str] = []
    tables: dict[str, pd.DataFrame] = {}
    figures: dict[str, Any] = {}
    owned: list[Figure] = []

    config: dict[str, Any] = {}
    config_file = layout.best_checkpoint / CONFIG_FILE
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
    else:
        notes.append(f"No configuration found (train/best/{CONFIG_FILE}).")

    per_slice = None
    metrics_csv = infer.per_slice_metrics_csv
    if metrics_csv.is_file():
        per_slice = pd.read_csv(metrics_csv)
    if per_slice is not None:
        from igconda.evaluation import method_order

        chosen = _chosen_method(study)
        names = _method_names()
        if chosen in names:
            names[chosen] = f"{names[chosen]} — chosen"
        raw = [str(m) for m in per_slice["method"].unique()]
        order = [names.get(m, m) for m in method_order(raw, chosen)]
        per_slice["method"] = per_slice["method"].astype(str).replace(names)
        try:
            tables["Per-cohort results, every method (mean ± std over unhealthy slices; Dice@τ "
                   "at the τ calibrated on the tune split; the w = 0 control is the DDIM round "
                   "trip's error alone)"] = methods_table(per_slice, order=order)
            if "tau" in per_slice.columns:
                tables["Calibrated thresholds τ (tune split)"] = thresholds_table(per_slice)
        except ValueError as err:
            notes.append(f"Per-cohort table not built: {err}")
    methods_csv = infer.methods_csv
    if per_slice is None and methods_csv.is_file():
        tables["Inference summary (infer/tables/methods.csv)"] = pd.read_csv(methods_csv)
    elif per_slice is None:
        notes.append("No inference results (infer/tables/per_slice_metrics.csv or methods.csv): "
                     "the per-cohort tables and lesion-size analysis are missing.")

    grid_csv, best_json = TuneOutput(layout.tune).grid, layout.tuned
    if grid_csv.is_file():
        grid = pd.read_csv(grid_csv)
        kind = None
        if "map_kind" in grid.columns:
            chosen_kind = _chosen_method(study)
            kind = chosen_kind.removeprefix("igconda_") if chosen_kind else "abs"
        fig = heatmap_figure(grid if kind is None else grid[grid["map_kind"] == kind])
        owned.append(fig)
        figures["Tuning: mean ⌈DSC⌉ over noise level D × guidance scale w (paper Fig. 5)"
                + (f", map kind {kind}" if kind else "")] = fig
        tables["Tuning grid (tune/grid.csv)"] = grid
    else:
        notes.append("No tuning grid (tune/grid.csv): tuning was skipped or has not run; "
                     "inference used the config's D and w.")
    if best_json.is_file():
        best = json.loads(best_json.read_text())
        # One value per key: shown as a key/value column, which stays narrow.
        chosen_settings = pd.DataFrame(
            {"value": [f"{v:.4g}" if isinstance(v, float) else
                       json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                       for v in best.values()]},
            index=pd.Index(list(best), name="key"))
        tables["Chosen (D, w, map kind, τ) (tune/best.json)"] = chosen_settings

    dataset_json = layout.done_mark("data")  # dataset.json
    if dataset_json.is_file():
        summary = json.loads(dataset_json.read_text())
        tables.update(data_coverage_tables(summary))
        notes.extend(f"Preprocessing warning: {w}" for w in summary.get("warnings", []))
    else:
        notes.append("No data/dataset.json: slice counts and field-of-view coverage unknown.")

    history, history_note = _training_history(layout.best_checkpoint)
    if history_note:
        notes.append(history_note)
    if history is not None:
        try:
            fig = training_curves_figure(history)
            owned.append(fig)
            figures["Training curves"] = fig
        except ValueError as err:
            notes.append(f"Training curves not drawn: {err}")

    if per_slice is not None and {"lesion_pixels", "dsc_max", "cohort"} <= set(per_slice.columns):
        fig = lesion_size_figure(per_slice)
        owned.append(fig)
        figures["⌈DSC⌉ against lesion size (paper Fig. 4/6)"] = fig
    figure_dir = infer.figures
    if figure_dir.is_dir():
        for png in sorted(figure_dir.glob("*.png")):
            if png.stem == "lesion_size" and any("lesion size" in k for k in figures):
                continue  # drawn above from the same per-slice data, with display names
            title = png.stem.replace("_", " ")
            if png.stem.startswith("qualitative_"):
                title = f"Qualitative examples, {png.stem[len('qualitative_'):]} (paper Fig. 2/3)"
            figures[title] = png
    if not any("Qualitative" in k for k in figures):
        notes.append("No qualitative figure (infer/figures/qualitative_*.png).")

    try:
        return write_html_report(
            output_html, title=f"IgCONDA-PET study report — {study.resolve().name}",
            tables=tables, figures=figures, config=config, versions=software_versions(),
            notes=notes,
        )
    finally:
        for fig in owned:
            plt.close(fig)
