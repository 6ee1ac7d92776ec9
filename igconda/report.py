"""The study report: what the pipeline's stages wrote, gathered into one HTML page.

:func:`build_study_report` reads a study folder (config, training history, tuning grid, the
inference stage's per-slice metrics and figures, the data summary) and writes
``<study>/report.html``; a missing part becomes a visible note, never an error. The tables are
:mod:`igconda.report_tables`', the figures :mod:`igconda.figures`', the page
:mod:`igconda.report_html`'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: report generation runs on servers and Ray workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from igconda.figures import (  # noqa: E402
    heatmap_figure,
    lesion_size_figure,
    qualitative_figure,
    training_curves_figure,
)
from igconda.report_html import software_versions, write_html_report  # noqa: E402
from igconda.report_tables import (  # noqa: E402
    data_coverage_tables,
    methods_table,
    thresholds_table,
)

#: Per-slice columns the report reads (maps are read only for the few qualitative examples).
_PER_SLICE_COLUMNS = ("method", "patient_id", "cohort", "role", "slice_index", "label",
                      "lesion_pixels", "dsc_max", "tau_star", "hd95", "auprc", "n_lesions",
                      "n_detected", "sensitivity", "dice_tau", "tau")
_QUALITATIVE_COLUMNS = ("image", "mask", "counterfactual", "anomaly_map")


def _read_parquet_columns(path: Path, wanted: Sequence[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    names = pq.read_schema(path if path.is_file() else next(path.rglob("*.parquet"))).names
    return pq.read_table(path, columns=[c for c in wanted if c in names]).to_pandas()


def _find_per_slice(infer_dir: Path) -> Path | None:
    """The inference stage's per-slice Parquet: a file or a folder of files."""
    for candidate in ("per_slice.parquet", "per_slice", "slices.parquet", "slices"):
        path = infer_dir / candidate
        if path.is_file() or (path.is_dir() and any(path.rglob("*.parquet"))):
            return path
    files = sorted(infer_dir.glob("*.parquet"))
    return files[0] if files else None


def _qualitative_from_per_slice(path: Path, per_slice: pd.DataFrame, count: int = 6) -> Figure | None:
    """Fig. 2/3 from the stored maps of the best-scoring IgCONDA slices at spread-out sizes."""
    import pyarrow.parquet as pq

    from igconda.data.schema import stack_images

    schema_names = pq.read_schema(path if path.is_file() else next(path.rglob("*.parquet"))).names
    if not set(_QUALITATIVE_COLUMNS) | {"height", "width", "tau_star"} <= set(schema_names):
        return None
    table = pq.read_table(path, columns=[*_QUALITATIVE_COLUMNS, "height", "width", "tau_star",
                                         "dsc_max", "cohort", "patient_id", "slice_index",
                                         "lesion_pixels",
                                         *[c for c in ("method", "counterfactual_w0") if c in schema_names]])
    frame = table.to_pandas()
    keep = frame["lesion_pixels"] > 0
    if "method" in frame:
        keep &= frame["method"].astype(str).str.lower().isin(("igconda", "igconda-pet"))
    frame = frame[keep & frame["dsc_max"].notna()]
    if frame.empty:
        return None
    # Spread over lesion size so the figure shows small and large lesions alike.
    frame = frame.sort_values("lesion_pixels").reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(frame) - 1, min(count, len(frame))).round().astype(int))
    frame = frame.iloc[picks]
    h, w = int(frame["height"].iloc[0]), int(frame["width"].iloc[0])
    images = stack_images(frame["image"], h, w)
    maps = stack_images(frame["anomaly_map"], h, w)
    binarised = (maps >= frame["tau_star"].to_numpy()[:, None, None]).astype(np.uint8)
    titles = [f"{r.cohort} {r.patient_id} z{r.slice_index}\n⌈DSC⌉ {r.dsc_max:.2f}"
              for r in frame.itertuples()]
    unguided = (stack_images(frame["counterfactual_w0"], h, w)
                if "counterfactual_w0" in frame else None)
    return qualitative_figure(images, stack_images(frame["mask"], h, w, np.uint8),
                              stack_images(frame["counterfactual"], h, w), maps, binarised, titles,
                              unguided=unguided)


def _method_names() -> dict[str, str]:
    """Method names as the stages write them → names shown in the report."""
    from igconda.evaluation import METHOD_TITLES

    return {**METHOD_TITLES, "igconda": "IgCONDA", "raw_intensity": "raw intensity"}


def _chosen_method(study: Path) -> str | None:
    """The IgCONDA map kind the study chose (infer/summary.json, else tune/best.json)."""
    summary, best = study / "infer" / "summary.json", study / "tune" / "best.json"
    try:
        if summary.is_file():
            return json.loads(summary.read_text()).get("chosen_method")
        if best.is_file():
            return f"igconda_{json.loads(best.read_text()).get('map_kind', 'abs')}"
    except (OSError, ValueError):
        return None
    return None


def _training_history(train_dir: Path) -> tuple[pd.DataFrame | None, str | None]:
    """``train/history.csv``, else the history stored in the best checkpoint's train state."""
    history_csv = train_dir / "history.csv"
    if history_csv.is_file():
        return pd.read_csv(history_csv), None
    from igconda.checkpoint import load_train_state

    try:
        state = load_train_state(train_dir / "best") if (train_dir / "best").is_dir() else None
    except (OSError, RuntimeError, ValueError) as err:
        return None, f"Training history not readable from train/best/train_state.pt: {err}"
    history = (state or {}).get("history")
    if not history:
        return None, "No training history (train/history.csv or train/best/train_state.pt)."
    return (pd.DataFrame(history),
            "Training curves come from the best checkpoint's state: epochs after it are not shown.")


def build_study_report(study_dir: str | Path, output_html: str | Path) -> Path:
    """Gather a study folder's stage outputs into the HTML report.

    Reads, when present (a missing part becomes a visible note, never an error):

    - ``config.yaml`` (or the best checkpoint's ``train/best/config.yaml``);
    - ``train/history.csv`` (epoch, train_loss, valid_loss), else the history stored in
      ``train/best/train_state.pt`` → training curves;
    - ``tune/grid.csv`` and ``tune/best.json`` → the D × w heatmap and tables;
    - ``infer/tables/per_slice_metrics.csv`` (every method's per-slice metrics; else the
      per-slice Parquet under ``infer/``) → the per-cohort table of every method side by side and
      the lesion-size figure; ``infer/tables/methods.csv`` is shown only when no per-slice data
      exists;
    - PNG figures the inference stage saved under ``infer/figures/`` (the qualitative figures);
    - ``data/dataset.json`` → unhealthy slices per split and cohort, the lesion voxels that fell
      outside the field of view, and preprocessing's warnings (:func:`data_coverage_tables`).

    Args:
        study_dir: the pipeline's ``--output`` folder.
        output_html: where to write the page.

    Returns:
        The path of the written HTML file.
    """
    study = Path(study_dir)
    infer = study / "infer"
    notes: list[str] = []
    tables: dict[str, pd.DataFrame] = {}
    figures: dict[str, Any] = {}
    owned: list[Figure] = []

    config: dict[str, Any] = {}
    for candidate in (study / "config.yaml", study / "train" / "best" / "config.yaml"):
        if candidate.is_file():
            config = yaml.safe_load(candidate.read_text()) or {}
            break
    else:
        notes.append("No configuration found (config.yaml or train/best/config.yaml).")

    per_slice = None
    per_slice_path = None
    metrics_csv = infer / "tables" / "per_slice_metrics.csv"
    if metrics_csv.is_file():
        per_slice = pd.read_csv(metrics_csv)
    elif infer.is_dir() and (per_slice_path := _find_per_slice(infer)) is not None:
        per_slice = _read_parquet_columns(per_slice_path, _PER_SLICE_COLUMNS)
        baselines = infer / "baselines"
        for extra in sorted(baselines.glob("*.parquet")) if baselines.is_dir() else []:
            per_slice = pd.concat([per_slice, _read_parquet_columns(extra, _PER_SLICE_COLUMNS)],
                                  ignore_index=True)
    if per_slice is not None:
        if "method" not in per_slice.columns:
            per_slice["method"] = "igconda"
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
    methods_csv = infer / "tables" / "methods.csv"
    if per_slice is None and methods_csv.is_file():
        tables["Inference summary (infer/tables/methods.csv)"] = pd.read_csv(methods_csv)
    elif per_slice is None:
        notes.append("No inference results (infer/tables/per_slice_metrics.csv, per-slice Parquet "
                     "or methods.csv): the per-cohort tables and lesion-size analysis are missing.")

    grid_csv, best_json = study / "tune" / "grid.csv", study / "tune" / "best.json"
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

    dataset_json = study / "data" / "dataset.json"
    if dataset_json.is_file():
        summary = json.loads(dataset_json.read_text())
        tables.update(data_coverage_tables(summary))
        notes.extend(f"Preprocessing warning: {w}" for w in summary.get("warnings", []))
    else:
        notes.append("No data/dataset.json: slice counts and field-of-view coverage unknown.")

    history, history_note = _training_history(study / "train")
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
    if per_slice_path is not None:
        try:
            qualitative = _qualitative_from_per_slice(per_slice_path, per_slice)
        except (ValueError, KeyError, OSError) as err:
            qualitative = None
            notes.append(f"Qualitative figure not built from the per-slice maps: {err}")
        if qualitative is not None:
            owned.append(qualitative)
            figures["Qualitative examples (paper Fig. 2/3)"] = qualitative
    figure_dir = infer / "figures"
    if figure_dir.is_dir():
        for png in sorted(figure_dir.glob("*.png")):
            if png.stem == "lesion_size" and any("lesion size" in k for k in figures):
                continue  # drawn above from the same per-slice data, with display names
            title = png.stem.replace("_", " ")
            if png.stem.startswith("qualitative_"):
                title = f"Qualitative examples, {png.stem[len('qualitative_'):]} (paper Fig. 2/3)"
            figures[title] = png
    if not any("Qualitative" in k for k in figures):
        notes.append("No qualitative figure (needs infer/figures/qualitative_*.png or maps and "
                     "images in the per-slice Parquet).")

    try:
        return write_html_report(
            output_html, title=f"IgCONDA-PET study report — {study.resolve().name}",
            tables=tables, figures=figures, config=config, versions=software_versions(),
            notes=notes,
        )
    finally:
        for fig in owned:
            plt.close(fig)
