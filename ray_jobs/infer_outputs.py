"""The infer job's outputs from its per-patient prediction files: scores, tables, figures, volumes.

No Ray here: the driver of :mod:`ray_jobs.infer` calls these once the predictions are written.
Every method is scored through :mod:`igconda.evaluation` on the same unhealthy slices: IgCONDA's
map kinds and the w = 0 control are recomputed from the stored decodes (no network), the
baselines from the input slices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from igconda import evaluation as E
from igconda.anomaly_methods import StoredCounterfactualMethod, baseline_methods
from igconda.baselines.scoring import SCORES_FILE, SUMMARY_FILE, run_metrics, write_method_scores
from igconda.data.io import InferOutput, is_local_dataset, read_predictions
from igconda.data.schema import (
    UNHEALTHY,
    slice_shape_of,
    stack_images,
    validate_scores,
)
from igconda.ddim_grid import network_evaluations
from igconda.io_utils import atomic_write
from igconda.lesion_stats import with_lesion_stats
from igconda.map_kinds import FORMULAS

#: Slice-schema columns the baselines need beside the stored predictions.
_SUV_COLUMNS = ("slice_index", "suv_max", "scale_min", "scale_max")


def score_patient(slice_file: Path, input_file: Path, taus: Mapping[str, float]) -> pd.DataFrame:
    """Every method's per-slice scores on one patient's unhealthy slices.

    Args:
        slice_file: the patient's prediction file (:data:`~igconda.data.schema.PREDICTION_SCHEMA`).
        input_file: the patient's slice file (for the SUV columns of 41 % SUVmax thresholding).
        taus: ``{method: calibrated τ}`` for ``dice_tau``.

    Returns:
        Rows of :data:`~igconda.data.schema.SCORE_SCHEMA`; empty when the patient has no
        unhealthy slice.
    """
    table = read_predictions(slice_file)
    table = table.filter(pc.equal(table["label"], UNHEALTHY))
    if table.num_rows == 0:
        return pd.DataFrame()
    suv = pq.read_table(input_file, columns=list(_SUV_COLUMNS)).to_pandas().set_index("slice_index")
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names
             if name not in ("image", "mask", "counterfactual", "counterfactual_w0", "anomaly_map")}
    h, w = slice_shape_of(batch["height"], batch["width"])
    for name, dtype in (("image", np.float32), ("mask", np.uint8), ("counterfactual", np.float32),
                        ("counterfactual_w0", np.float32)):
        batch[name] = stack_images(table[name], h, w, dtype)
    for name in _SUV_COLUMNS[1:]:
        batch[name] = suv.loc[batch["slice_index"], name].to_numpy(np.float32)
    maps: dict[str, np.ndarray] = {}
    for method in [StoredCounterfactualMethod(), *baseline_methods()]:
        maps.update(method.maps(batch))
    # The lesion size and brightness per slice: the comparison's Figs. 4 and 6 need them.
    return with_lesion_stats(E.score_methods(batch, maps, taus), batch)


def metric_name(*parts: str) -> str:
    """An MLflow-safe metric key (letters, digits, _ - . / only)."""
    return "/".join(re.sub(r"[^\w\-.]+", "_", p).strip("_") for p in parts)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), suffix=".tmp")


def save_png(figure: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically: a failing or killed save keeps the old file.

    The temp file ends in ``.tmp``, not ``.png``, so that one orphaned by a killed process is
    never picked up by the report's ``figures/*.png`` glob; the format is therefore explicit.
    """
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"),
                 suffix=".tmp")


def write_tables(per_slice: pd.DataFrame, output: InferOutput,
                 chosen: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-cohort tables of every method; returns the summary and its MLflow metrics.

    Writes under ``output.tables``: ``methods.{csv,md}`` (every method, :func:`igconda.evaluation.summarize` /
    :func:`~igconda.evaluation.format_table`), ``per_cohort.{csv,md}`` (the chosen IgCONDA map),
    ``baselines_per_cohort.{csv,md}`` (every other method, the w = 0 control and the paper's map
    among them), ``per_slice_metrics.csv`` (validated against the score schema); and under
    ``output.scores`` (beside ``tables/``, not inside it: the infer run uploads ``tables/``, each
    method run its own files), one method run's files per method.
    """
    validate_scores(per_slice)
    tables = output.tables
    tables.mkdir(parents=True, exist_ok=True)
    summary = E.summarize(per_slice, by=("cohort",))
    write_text(output.methods_csv, summary.to_csv(index=False))
    write_text(tables / "methods.md", E.format_table(summary))
    ours = summary[summary["method"] == chosen]
    if len(ours):
        write_text(tables / "per_cohort.csv", ours.drop(columns="method").set_index("group").to_csv())
        write_text(tables / "per_cohort.md", E.format_table(ours))
    others = summary[summary["method"] != chosen]
    if len(others):
        write_text(tables / "baselines_per_cohort.csv", others.to_csv(index=False))
        write_text(tables / "baselines_per_cohort.md", E.format_table(others))
    write_text(output.per_slice_metrics_csv, per_slice.to_csv(index=False))
    # One method run's files per method (docs/CONTRACTS.md, "Method runs"): what the comparison
    # stage reads back from MLflow, as it does for the trained baselines' scoring runs.
    for method, rows in per_slice.groupby("method", sort=True):
        write_method_scores(rows, output.scores / str(method))
    return summary, summary_metrics(summary)


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """MLflow metrics ``<method>/<group>/<column>`` of a ``methods.csv`` summary (finite only)."""
    metrics: dict[str, float] = {}
    for _, row in summary.iterrows():
        for column, value in row.items():
            if column.endswith(("_mean", "_std")) or column in ("n_slices", "sensitivity_pooled", "tau"):
                if isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
                    metrics[metric_name(row["method"], str(row["group"]), column)] = float(value)
    return metrics


def log_infer_run(output: Path, summary: Mapping[str, Any], *, volumes: bool = True,
                  slices: bool = False) -> None:
    """Log a finished inference output folder to the active MLflow run, from its files alone.

    The infer job calls it once its outputs are written, and ``python -m ray_jobs.relog`` calls
    it on the same folder after a tracking outage, so both log the same params, metrics
    (``<method>/<cohort>/<metric>``, ``time/*``) and artifacts. The run is recorded first in
    ``<output>/mlflow_run.json`` (:func:`igconda.tracking.record_active_run`), so that a run the
    server loses mid-way can be found and ended by the re-log.

    Args:
        output: the infer job's ``--output`` (:class:`~igconda.data.io.InferOutput`).
        summary: the content of its ``summary.json``.
        volumes: upload ``volumes/``; slices: upload the per-slice Parquet files (large).
    """
    from igconda import tracking

    tracking.record_active_run(output)
    layout = InferOutput(output)
    settings = summary["settings"]
    tracking.log_params({"D": settings["noise_level"], "w": settings["guidance_scale"],
                         "s": settings["stride"], "map_kind": settings["map_kind"],
                         "threshold": settings["threshold"],
                         **{f"tau.{m}": t for m, t in summary.get("thresholds", {}).items()},
                         "checkpoint": settings["checkpoint"], "split": summary["split"],
                         "data": summary["data"], "data_version": summary.get("data_version"),
                         "batch_size": summary.get("batch_size"),
                         "concurrency": summary.get("concurrency"),
                         "evaluations_per_slice": network_evaluations(settings["noise_level"], settings["stride"],
                                                                       unguided_decode=True)})
    combined = pd.read_csv(layout.methods_csv)
    tracking.log_metrics({**summary_metrics(combined),
                          **{f"time/{k}": v for k, v in summary.get("timings", {}).items()}})
    tracking.log_table(combined, "tables/methods.json")
    tracking.log_artifact(layout.tables, "tables")
    tracking.log_artifact(layout.summary)
    if any(layout.figures.glob("*.png")):
        tracking.log_artifact(layout.figures, "figures")
    if volumes and layout.volumes.is_dir():
        tracking.log_artifact(layout.volumes, "volumes")
    if slices:
        tracking.log_artifact(layout.slices, "slices")
    if is_local_dataset(summary["data"]):
        from igconda.tracking.model import log_dataset

        log_dataset(summary["data"], summary["split"])
    log_method_runs(layout.scores, summary.get("data_version") or "")


def log_method_runs(folder: Path, data_version: str) -> list[str]:
    """One child run per scored method (``folder/<method>/``, :func:`write_tables`) under the
    active run, tagged and filled as the method-run contract says; returns their ids."""
    from igconda import tracking

    ids = []
    for method_folder in sorted(p for p in folder.glob("*") if (p / SCORES_FILE).is_file()):
        method = method_folder.name
        with tracking.child_run(f"score-{method}",
                                tracking.method_run_tags("score", method, "", data_version)) as run_id:
            summary = pd.read_csv(method_folder / SUMMARY_FILE)
            tracking.log_metrics(run_metrics(summary))
            tracking.log_artifact(method_folder / SCORES_FILE, "scores")
            tracking.log_artifact(method_folder / SUMMARY_FILE, "scores")
            ids.append(run_id)
    return ids


def make_figures(slice_files: dict[str, Path], per_slice: pd.DataFrame, figures: Path,
                 chosen: str, per_figure: int = 4) -> dict[str, str]:
    """Qualitative figures per cohort and the lesion-size figure; returns {name: error}.

    Everything a figure shows comes from the prediction files (``slice_files``, which keep the
    input slice and its mask beside the decodes): the inputs are not read a second time.

    A figure that fails (e.g. the figures module is missing, or a cohort has no unhealthy slice)
    is reported and skipped: figures never cost the run its tables and volumes.
    """
    errors: dict[str, str] = {}
    figures.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from igconda.figures import lesion_size_figure, qualitative_figure
    except Exception as err:  # figures module absent or broken: say so, keep going
        return {"all": f"figures skipped: cannot import igconda.figures ({type(err).__name__}: {err})"}
    ours = per_slice[(per_slice["method"] == chosen) & per_slice["dsc_max"].notna()]
    map_label = FORMULAS.get(chosen.removeprefix("igconda_"), chosen)
    for cohort, frame in ours.groupby("cohort", sort=True):
        try:
            examples = frame.sort_values(["lesion_pixels", "patient_id", "slice_index"],
                                         ascending=[False, True, True]).head(per_figure)
            images, masks, cfs, unguided, maps, binar, titles = [], [], [], [], [], [], []
            for _, row in examples.iterrows():
                pid, z = row["patient_id"], int(row["slice_index"])
                out = read_predictions(slice_files[pid], columns=[
                    "slice_index", "height", "width", "image", "mask", "anomaly_map",
                    "counterfactual", "counterfactual_w0"], filters=[("slice_index", "=", z)])
                h, w = slice_shape_of(out.column("height"), out.column("width"))
                images.append(stack_images(out.column("image"), h, w)[0])
                masks.append(stack_images(out.column("mask"), h, w, np.uint8)[0])
                cfs.append(stack_images(out.column("counterfactual"), h, w)[0])
                unguided.append(stack_images(out.column("counterfactual_w0"), h, w)[0])
                amap = stack_images(out.column("anomaly_map"), h, w)[0]
                maps.append(amap)
                # The mask a user gets: at the calibrated τ (τ* needs the ground truth).
                tau = row["tau"] if np.isfinite(row["tau"]) else row["tau_star"]
                binar.append((amap >= tau).astype(np.uint8))
                titles.append(f"{pid} z={z} ⌈DSC⌉={row['dsc_max']:.2f} Dice@τ={row['dice_tau']:.2f}")
            # The unguided decode beside the guided one shows what guidance removed, apart
            # from what the coarse round trip alone changes.
            fig = qualitative_figure(np.stack(images), np.stack(masks), np.stack(cfs),
                                     np.stack(maps), np.stack(binar), titles,
                                     unguided=np.stack(unguided), map_label=map_label)
            save_png(fig, figures / f"qualitative_{cohort}.png")
            plt.close(fig)
        except Exception as err:
            errors[f"qualitative_{cohort}"] = f"{type(err).__name__}: {err}"
    try:
        fig = lesion_size_figure(per_slice[per_slice["dsc_max"].notna()])
        save_png(fig, figures / "lesion_size.png")
        plt.close(fig)
    except Exception as err:
        errors["lesion_size"] = f"{type(err).__name__}: {err}"
    # A figure not remade this run (its cohort left the split, or it failed now) shows old
    # results: remove it rather than let the report show it beside the new tables.
    made = {f"qualitative_{c}.png" for c in ours["cohort"].unique()} | {"lesion_size.png"}
    made -= {f"{name}.png" for name in errors}
    for path in figures.glob("*.png"):
        if path.name not in made:
            path.unlink(missing_ok=True)
    return errors


def export_volumes(slice_files: dict[str, Path], input_files: dict[str, Path],
                   output: InferOutput) -> int:
    """Write each patient's anomaly map on its original grid (:meth:`InferOutput.volume`);
    skips up-to-date volumes."""
    from igconda.export import export_volume

    written = 0
    for pid, path in slice_files.items():
        target = output.volume(pid)
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            continue
        geometry = pq.read_table(input_files[pid], columns=["geometry"]).column("geometry")[0].as_py()
        table = read_predictions(path, columns=["slice_index", "height", "width", "anomaly_map"])
        h, w = slice_shape_of(table.column("height"), table.column("width"))
        maps = stack_images(table.column("anomaly_map"), h, w)
        export_volume(maps, geometry, target, slice_index=table.column("slice_index").to_numpy(), order=1)
        written += 1
    return written


