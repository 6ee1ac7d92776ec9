"""Batch inference on every test cohort: counterfactuals, anomaly maps, metrics, tables, 3D maps.

Ray Data reads the split's Parquet slices and runs
:class:`igconda.inference.CounterfactualPredictor` with ``map_batches`` (one actor per GPU or CPU
slot; the model is loaded once per actor). The driver collects the results per patient and writes
each patient's file atomically as soon as all its slices are in, so a crashed or interrupted run
loses at most the patients in flight: re-running the same command skips every patient whose
output is complete *and* was made with the same checkpoint, D, w, s and map kind, and computes
only the rest. Every slice is then in exactly one output row.

Stale results are recognised by the settings stamped into each file (including a digest of the
checkpoint's weights), so changing D or retraining into the same folder recomputes everything.

Run (local Ray, local MLflow store under ``OUT/mlruns``)::

    python -m ray_jobs.infer --checkpoint runs/train/best --data runs/data --output runs/infer \\
        --tuned runs/tune/best.json

or on a cluster::

    ray job submit --working-dir . -- python -m ray_jobs.infer --checkpoint s3://… --data … \\
        --output … --config configs/paper.yaml

Settings, highest precedence first: command-line flags, ``--tuned best.json`` (D and w from
``ray_jobs.tune``), ``--config`` (its ``infer`` and ``tracking`` sections), the checkpoint's
own config. Outputs under ``--output``::

    slices/<patient_id>.parquet         per-slice anomaly_map, counterfactual, metrics, τ*
    tables/per_cohort.{csv,md}          IgCONDA, paper Table-1 format (cohorts, internal, external)
    tables/baselines_per_cohort.{csv,md}  41 % SUVmax thresholding and raw intensity, same slices
    tables/methods.{csv,md}             all methods, one ``method`` column
    tables/per_slice_metrics.csv        every unhealthy slice's metrics, every method
    figures/qualitative_<cohort>.png    PET, mask, counterfactual, map, binarised map (Fig. 2/3)
    figures/lesion_size.png             ⌈DSC⌉ against lesion size (Fig. 4/6)
    volumes/<patient_id>_anomaly.nii.gz anomaly map on the original scan's grid and affine
    summary.json                        settings, counts, timings

Everything is also logged to MLflow (params D, w, s; metrics ``<method>/<cohort>/<metric>_mean``;
tables, figures and volumes as artifacts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from igconda import tracking
from igconda.checkpoint import CheckpointError, load_checkpoint_config
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.data.schema import SPLITS, UNHEALTHY, stack_images
from igconda.inference import METRIC_COLUMNS, check_counterfactual_params
from igconda.io_utils import atomic_write

logger = logging.getLogger("ray_jobs.infer")

#: Input columns the predictor needs (``pet_path``/``geometry`` stay on the driver).
PREDICTOR_INPUT = ("patient_id", "cohort", "tracer", "role", "slice_index", "num_slices", "label",
                   "height", "width", "image", "mask", "lesion_pixels")
#: Key of the per-patient Parquet schema metadata that records how its rows were made.
SETTINGS_KEY = b"igconda.infer"
METHOD = "igconda"
BASELINES = ("threshold_41", "intensity")


class InferError(RuntimeError):
    """The job cannot run as asked; the message says why."""


@dataclass(frozen=True)
class InferSettings:
    """The values that decide a patient's output; stored in each file to detect stale results."""

    checkpoint: str
    noise_level: int
    guidance_scale: float
    stride: int
    map_kind: str
    weights: str = ""  # digest of the weight files: a checkpoint overwritten in place is stale

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "noise_level": self.noise_level,
                "guidance_scale": self.guidance_scale, "stride": self.stride,
                "map_kind": self.map_kind, "weights": self.weights}


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 (first 16 hex digits) of the checkpoint's weight files."""
    from igconda.checkpoint import EMA_FILE, MODEL_FILE

    digest = hashlib.sha256()
    for name in (MODEL_FILE, EMA_FILE):
        path = checkpoint / name
        if path.is_file():
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class InferResult:
    """What a run did (returned by :func:`run` for callers and tests)."""

    output: Path
    settings: InferSettings
    computed: list[str] = field(default_factory=list)  # patients predicted in this run
    skipped: list[str] = field(default_factory=list)   # complete outputs found and kept
    figure_errors: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (igconda.checkpoint layout)")
    p.add_argument("--data", required=True, help="preprocessed data folder (slices/<split>/*.parquet)")
    p.add_argument("--output", required=True, help="output folder (created; re-runs resume)")
    p.add_argument("--config", help="study YAML; its infer/tracking sections override the checkpoint's")
    p.add_argument("--tuned", help="best.json from ray_jobs.tune (noise_level, guidance_scale)")
    p.add_argument("--noise-level", type=int, help="D, training-timestep units")
    p.add_argument("--guidance-scale", type=float, help="w (eps_u + w (eps_c - eps_u))")
    p.add_argument("--stride", type=int, help="s, a divisor of D")
    p.add_argument("--map", dest="map_kind", choices=("abs", "hot"), default="abs",
                   help="anomaly map: |x - x_hat| (paper) or max(x - x_hat, 0)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split to run on")
    p.add_argument("--batch-size", type=int, help="slices per predictor call")
    p.add_argument("--concurrency", type=int, help="predictor actors")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (fractions share a GPU)")
    p.add_argument("--device", default=None, help="torch device inside actors (default: auto)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: <output>/mlruns)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--parent-run-id", default=None, help="nest the MLflow run under this run")
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    p.add_argument("--no-volumes", action="store_true", help="skip the 3D NIfTI export")
    p.add_argument("--log-slices", action="store_true",
                   help="also upload the per-slice Parquet files to MLflow (large on real data)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[StudyConfig, InferSettings]:
    """Apply the precedence CLI > tuned file > --config > checkpoint's config.

    Raises:
        InferError: unreadable checkpoint, config or tuned file, or invalid D/s/w.
    """
    checkpoint = Path(args.checkpoint)
    try:
        base = load_checkpoint_config(checkpoint)
    except (CheckpointError, ConfigError) as err:
        raise InferError(f"checkpoint {checkpoint}: {err}") from None
    infer: dict[str, Any] = {}
    track: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            load_config(path)  # full validation, with the file named in errors
            raw = yaml.safe_load(path.read_text()) or {}
        except (ConfigError, OSError, yaml.YAMLError) as err:
            raise InferError(f"config {path}: {err}") from None
        # Only the sections that do not define the model: the network must match its weights.
        infer.update(raw.get("infer") or {})
        track.update(raw.get("tracking") or {})
    stride_from_cli = args.stride is not None
    if args.tuned:
        path = Path(args.tuned)
        try:
            tuned = json.loads(path.read_text())
            infer["noise_level"] = int(tuned["noise_level"])
            infer["guidance_scale"] = float(tuned["guidance_scale"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InferError(f"tuned parameters {path}: cannot read noise_level/guidance_scale "
                             f"({type(err).__name__}: {err})") from None
        # The stride is a speed setting of inference, but it must divide the tuned D; fall back
        # to the stride the tuning itself used when it does not.
        stride = int(infer.get("stride", base.infer.stride))
        if not stride_from_cli and infer["noise_level"] % stride and "stride" in tuned:
            logger.warning("stride %d does not divide tuned D=%d; using the tuning stride %s",
                           stride, infer["noise_level"], tuned["stride"])
            infer["stride"] = int(tuned["stride"])
    for key, value in (("noise_level", args.noise_level), ("guidance_scale", args.guidance_scale),
                       ("stride", args.stride), ("batch_size", args.batch_size),
                       ("concurrency", args.concurrency), ("num_gpus_per_actor", args.num_gpus)):
        if value is not None:
            infer[key] = value
    try:
        config = load_config(checkpoint / "config.yaml", overrides={"infer": infer, "tracking": track})
    except ConfigError as err:
        raise InferError(str(err)) from None
    i = config.infer
    try:
        check_counterfactual_params(i.noise_level, i.stride, i.guidance_scale,
                                    config.train.num_train_timesteps)
    except ValueError as err:
        raise InferError(str(err)) from None
    settings = InferSettings(str(checkpoint.resolve()), i.noise_level, float(i.guidance_scale),
                             i.stride, args.map_kind, weights_digest(checkpoint))
    return config, settings


# ---------------------------------------------------------------------------------------------
# Per-patient bookkeeping
# ---------------------------------------------------------------------------------------------

def list_patients(data: Path, split: str) -> dict[str, Path]:
    """``{patient_id: input Parquet file}`` of one split (one file per patient, CONTRACTS.md)."""
    folder = data / "slices" / split
    if not folder.is_dir():
        raise InferError(f"{folder}: no '{split}' split in the data folder {data}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise InferError(f"{folder}: no Parquet files")
    return {f.stem: f for f in files}


def output_is_complete(path: Path, expected_rows: int, settings: InferSettings) -> bool:
    """True if ``path`` holds ``expected_rows`` rows made with exactly ``settings``."""
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
        stored = json.loads((meta.metadata or {}).get(SETTINGS_KEY, b"{}"))
    except Exception:  # a truncated or foreign file is simply recomputed
        return False
    return meta.num_rows == expected_rows and stored == settings.as_dict()


def write_patient(columns: dict[str, np.ndarray], path: Path, settings: InferSettings) -> None:
    """Write one patient's predicted rows (sorted by slice) atomically (temp file + rename)."""
    order = np.argsort(columns["slice_index"], kind="stable")
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values)[order] if not isinstance(values, list) else [values[i] for i in order]
        if name in ("anomaly_map", "counterfactual", "image", "mask"):
            dtype = np.uint8 if name == "mask" else np.float32
            flat = np.ascontiguousarray(np.stack([np.asarray(v, dtype).ravel() for v in values]))
            arrays[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.ravel()), flat.shape[1]).cast(pa.list_(pa.from_numpy_dtype(dtype)))
        else:
            arrays[name] = pa.array(values)
    table = pa.table(arrays).replace_schema_metadata({SETTINGS_KEY: json.dumps(settings.as_dict())})
    path.parent.mkdir(parents=True, exist_ok=True)
    # A ".tmp" suffix keeps a half-written file out of "*.parquet" globs (resume, the report).
    atomic_write(path, lambda tmp: pq.write_table(table, tmp), suffix=".tmp")


def _slice_rows(batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, Any]:
    return {k: (v[index] if isinstance(v, np.ndarray) else [v[i] for i in index]) for k, v in batch.items()}


def _concat(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if all(isinstance(v, np.ndarray) and v.dtype != object for v in values):
            out[key] = np.concatenate(values)
        else:
            out[key] = [x for v in values for x in v]
    return out


def actor_cpu_warning(concurrency: int, cpus_per_actor: float, cluster_cpus: float) -> str | None:
    """Why the predictor actors may starve the Parquet readers of CPUs, or None if they cannot.

    Ray Data starts the actor pool first; if the actors reserve every CPU, the read tasks that
    feed them are never scheduled and the job waits forever (seen on a 2-CPU machine with two
    1-CPU actors). Only a warning: an autoscaling cluster may add the CPUs once asked.
    """
    reserved = concurrency * cpus_per_actor
    if cluster_cpus - reserved >= 1.0:  # a Ray Data read task asks for one whole CPU
        return None
    return (f"{concurrency} predictor actor(s) x {cpus_per_actor:g} CPU reserve {reserved:g} of the "
            f"cluster's {cluster_cpus:g} CPUs, leaving none for Ray Data's Parquet readers: unless "
            f"the cluster adds CPUs the job will wait forever. Lower infer.concurrency or "
            f"infer.num_cpus_per_actor (fractions such as 0.5 are fine) so one CPU stays free")


def predict_patients(files: dict[str, Path], expected: dict[str, int], config: StudyConfig,
                     settings: InferSettings, out_dir: Path, device: str | None) -> list[str]:
    """Run the predictor over the given patients with Ray Data; write each patient when complete.

    Returns:
        Patient ids written, in completion order.
    """
    import ray

    from igconda.inference import CounterfactualPredictor

    i = config.infer
    problem = actor_cpu_warning(i.concurrency, i.num_cpus_per_actor,
                                float(ray.cluster_resources().get("CPU", 0.0)))
    if problem:
        logger.warning(problem)
        print(f"    warning: {problem}", flush=True)
    ds = ray.data.read_parquet([str(f) for f in files.values()]).select_columns(list(PREDICTOR_INPUT))
    ds = ds.map_batches(
        CounterfactualPredictor,
        fn_constructor_kwargs={"checkpoint": settings.checkpoint, "noise_level": settings.noise_level,
                               "guidance_scale": settings.guidance_scale, "stride": settings.stride,
                               "map_kind": settings.map_kind, "device": device, "amp": i.use_amp,
                               "keep_inputs": True},
        batch_size=i.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=i.concurrency),
        num_gpus=i.num_gpus_per_actor, num_cpus=i.num_cpus_per_actor,
    )
    pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    written: list[str] = []
    total = sum(expected[p] for p in files)
    done_slices, started = 0, time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids = np.asarray(batch["patient_id"]).astype(str)
        for pid in np.unique(ids):
            rows = np.flatnonzero(ids == pid)
            pending[pid].append(_slice_rows(batch, rows))
            counts[pid] += len(rows)
            done_slices += len(rows)
            if counts[pid] > expected[pid]:
                raise InferError(f"patient {pid}: got {counts[pid]} slices, expected {expected[pid]}")
            if counts[pid] == expected[pid]:
                write_patient(_concat(pending.pop(pid)), out_dir / f"{pid}.parquet", settings)
                written.append(pid)
                rate = done_slices / max(time.perf_counter() - started, 1e-9)
                print(f"    [{len(written)}/{len(files)}] {pid}: {expected[pid]} slices "
                      f"({done_slices}/{total} done, {rate:.1f} slices/s)", flush=True)
    if pending:
        raise InferError(f"incomplete results for patients {sorted(pending)}")
    return written


# ---------------------------------------------------------------------------------------------
# Scoring, tables, figures, volumes
# ---------------------------------------------------------------------------------------------

def _per_slice_frame(table: pa.Table) -> pd.DataFrame:
    keep = [c for c in table.column_names if c not in ("anomaly_map", "counterfactual", "image", "mask")]
    return table.select(keep).to_pandas()


def score_baselines(input_file: Path) -> pd.DataFrame:
    """41 % SUVmax thresholding and raw intensity on one patient's unhealthy slices."""
    from igconda.baselines.thresholding import intensity_maps, threshold_maps
    from igconda.metrics import score_batch

    table = pq.read_table(input_file, columns=["patient_id", "cohort", "role", "tracer", "slice_index",
                                               "label", "lesion_pixels", "height", "width", "image",
                                               "mask", "suv_max", "scale_min", "scale_max"])
    label = table.column("label").to_numpy()
    unhealthy = label == UNHEALTHY
    if not unhealthy.any():
        return pd.DataFrame()
    table = table.filter(pa.array(unhealthy))
    h, w = int(table.column("height")[0].as_py()), int(table.column("width")[0].as_py())
    images = stack_images(table.column("image"), h, w)
    masks = stack_images(table.column("mask"), h, w, np.uint8)
    suv_max = float(table.column("suv_max")[0].as_py())
    scale_min = float(table.column("scale_min")[0].as_py())
    scale_max = float(table.column("scale_max")[0].as_py())
    base = table.select(["patient_id", "cohort", "role", "tracer", "slice_index", "label",
                         "lesion_pixels"]).to_pandas()
    frames = []
    for method, maps in (("threshold_41", threshold_maps(images, suv_max, scale_min, scale_max)),
                         ("intensity", intensity_maps(images))):
        scores = score_batch(np.asarray(maps, dtype=np.float32), masks)
        frame = base.copy()
        frame["method"] = method
        for key in METRIC_COLUMNS:
            frame[key] = np.asarray(scores[key])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _metric_name(*parts: str) -> str:
    """An MLflow-safe metric key (letters, digits, _ - . / only)."""
    return "/".join(re.sub(r"[^\w\-.]+", "_", p).strip("_") for p in parts)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), suffix=".tmp")


def write_tables(per_slice: pd.DataFrame, tables: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-cohort tables for every method; returns the combined table and MLflow metrics."""
    from igconda.metrics import SUMMARY_METRICS, format_table, summarize

    tables.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for method, frame in per_slice.groupby("method", sort=False):
        metrics = list(SUMMARY_METRICS)
        if method == METHOD and frame["dsc_max_hot"].notna().any():
            metrics.append("dsc_max_hot")
        summaries[method] = summarize(frame, by=("cohort",), metrics=metrics)
    combined = pd.concat([s.reset_index().assign(method=m) for m, s in summaries.items()],
                         ignore_index=True)
    combined = combined[["method", *[c for c in combined.columns if c != "method"]]]
    _write_text(tables / "methods.csv", combined.to_csv(index=False))
    _write_text(tables / "methods.md", "".join(f"### {m}\n\n{format_table(s)}\n"
                                              for m, s in summaries.items()))
    if METHOD in summaries:
        _write_text(tables / "per_cohort.csv", summaries[METHOD].to_csv())
        _write_text(tables / "per_cohort.md", format_table(summaries[METHOD]))
    base = combined[combined["method"] != METHOD]
    if len(base):
        _write_text(tables / "baselines_per_cohort.csv", base.to_csv(index=False))
        _write_text(tables / "baselines_per_cohort.md",
                    "".join(f"### {m}\n\n{format_table(s)}\n" for m, s in summaries.items() if m != METHOD))
    _write_text(tables / "per_slice_metrics.csv", per_slice.to_csv(index=False))
    metrics: dict[str, float] = {}
    for _, row in combined.iterrows():
        for column, value in row.items():
            if column.endswith(("_mean", "_std")) or column in ("n_slices", "sensitivity_pooled"):
                if isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
                    metrics[_metric_name(row["method"], str(row["group"]), column)] = float(value)
    return combined, metrics


def make_figures(slice_files: dict[str, Path], input_files: dict[str, Path],
                 per_slice: pd.DataFrame, figures: Path, per_figure: int = 4) -> dict[str, str]:
    """Qualitative figures per cohort and the lesion-size figure; returns {name: error}.

    A figure that fails (e.g. the report module is missing, or a cohort has no unhealthy slice)
    is reported and skipped: figures never cost the run its tables and volumes.
    """
    errors: dict[str, str] = {}
    figures.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from igconda import report
    except Exception as err:  # report module absent or broken: say so, keep going
        return {"all": f"figures skipped: cannot import igconda.report ({type(err).__name__}: {err})"}
    ours = per_slice[(per_slice["method"] == METHOD) & per_slice["dsc_max"].notna()]
    for cohort, frame in ours.groupby("cohort", sort=True):
        try:
            chosen = frame.sort_values(["lesion_pixels", "patient_id", "slice_index"],
                                       ascending=[False, True, True]).head(per_figure)
            images, masks, cfs, maps, binar, titles = [], [], [], [], [], []
            for _, row in chosen.iterrows():
                pid, z = row["patient_id"], int(row["slice_index"])
                src = pq.read_table(input_files[pid], columns=["slice_index", "image", "mask",
                                                                "height", "width"],
                                    filters=[("slice_index", "=", z)])
                out = pq.read_table(slice_files[pid], columns=["slice_index", "anomaly_map",
                                                                "counterfactual"],
                                    filters=[("slice_index", "=", z)])
                h, w = int(src.column("height")[0].as_py()), int(src.column("width")[0].as_py())
                images.append(stack_images(src.column("image"), h, w)[0])
                masks.append(stack_images(src.column("mask"), h, w, np.uint8)[0])
                cfs.append(stack_images(out.column("counterfactual"), h, w)[0])
                amap = stack_images(out.column("anomaly_map"), h, w)[0]
                maps.append(amap)
                binar.append((amap >= row["tau_star"]).astype(np.uint8))
                titles.append(f"{pid} z={z} ⌈DSC⌉={row['dsc_max']:.2f}")
            fig = report.qualitative_figure(np.stack(images), np.stack(masks), np.stack(cfs),
                                            np.stack(maps), np.stack(binar), titles)
            fig.savefig(figures / f"qualitative_{cohort}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
        except Exception as err:
            errors[f"qualitative_{cohort}"] = f"{type(err).__name__}: {err}"
    try:
        fig = report.lesion_size_figure(per_slice[per_slice["dsc_max"].notna()])
        fig.savefig(figures / "lesion_size.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    except Exception as err:
        errors["lesion_size"] = f"{type(err).__name__}: {err}"
    return errors


def export_volumes(slice_files: dict[str, Path], input_files: dict[str, Path],
                   volumes: Path) -> int:
    """Write each patient's anomaly map on its original grid; skips up-to-date volumes."""
    from igconda.export import export_volume

    written = 0
    for pid, path in slice_files.items():
        target = volumes / f"{pid}_anomaly.nii.gz"
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            continue
        geometry = pq.read_table(input_files[pid], columns=["geometry"]).column("geometry")[0].as_py()
        table = pq.read_table(path, columns=["slice_index", "height", "width", "anomaly_map"])
        h, w = int(table.column("height")[0].as_py()), int(table.column("width")[0].as_py())
        maps = stack_images(table.column("anomaly_map"), h, w)
        export_volume(maps, geometry, target, slice_index=table.column("slice_index").to_numpy(), order=1)
        written += 1
    return written


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> InferResult:
    """The whole job (see the module docstring); Ray is started here if it is not running."""
    import ray

    config, settings = resolve_config(args)
    data, output = Path(args.data), Path(args.output)
    inputs = list_patients(data, args.split)
    slices_dir = output / "slices"
    expected = {pid: pq.read_metadata(f).num_rows for pid, f in inputs.items()}
    todo = {pid: f for pid, f in inputs.items()
            if not output_is_complete(slices_dir / f"{pid}.parquet", expected[pid], settings)}
    result = InferResult(output, settings, skipped=sorted(set(inputs) - set(todo)))
    print(f"infer: {len(inputs)} patients in split '{args.split}' ({sum(expected.values())} slices); "
          f"D={settings.noise_level} w={settings.guidance_scale:g} s={settings.stride} "
          f"map={settings.map_kind}; {len(result.skipped)} already complete, {len(todo)} to run",
          flush=True)
    timings = {}
    started = time.perf_counter()
    if todo:
        if not ray.is_initialized():
            ray.init(address=args.address)
        result.computed = predict_patients(todo, expected, config, settings, slices_dir, args.device)
    timings["predict_s"] = time.perf_counter() - started
    slice_files = {pid: slices_dir / f"{pid}.parquet" for pid in inputs}

    # Scoring is cheap next to diffusion, so tables are always rebuilt from all patients' files.
    t0 = time.perf_counter()
    ours = [_per_slice_frame(pq.read_table(f)) for f in slice_files.values()]
    per_slice = pd.concat(ours, ignore_index=True).assign(method=METHOD)
    per_slice = per_slice[per_slice["label"] == UNHEALTHY]
    baseline_frames = [score_baselines(f) for f in inputs.values()]
    per_slice = pd.concat([per_slice, *[b for b in baseline_frames if len(b)]], ignore_index=True)
    if per_slice.empty:
        raise InferError(f"split '{args.split}' has no unhealthy slice to score")
    combined, metrics = write_tables(per_slice, output / "tables")
    timings["score_s"] = time.perf_counter() - t0
    print((output / "tables" / "per_cohort.md").read_text(), flush=True)

    t0 = time.perf_counter()
    result.figure_errors = make_figures(slice_files, inputs, per_slice, output / "figures")
    for name, problem in result.figure_errors.items():
        print(f"    warning: figure {name} not made: {problem}", flush=True)
    timings["figures_s"] = time.perf_counter() - t0
    n_volumes = 0
    if not args.no_volumes:
        t0 = time.perf_counter()
        n_volumes = export_volumes(slice_files, inputs, output / "volumes")
        timings["volumes_s"] = time.perf_counter() - t0
        print(f"    wrote {n_volumes} anomaly volume(s) to {output / 'volumes'}", flush=True)

    summary = {"settings": settings.as_dict(), "split": args.split, "data": str(data.resolve()),
               "patients": len(inputs), "computed": result.computed, "skipped": result.skipped,
               "slices": int(sum(expected.values())), "figure_errors": result.figure_errors,
               "timings": timings}
    _write_text(output / "summary.json", json.dumps(summary, indent=2))

    uri = tracking.resolve_tracking_uri(args.tracking_uri or config.tracking.tracking_uri, output)
    with tracking.start_run(uri, args.experiment or config.tracking.experiment, "infer",
                            tags={"igconda.stage": "infer"}, parent_run_id=args.parent_run_id) as run_id:
        result.run_id = run_id
        tracking.log_params({"D": settings.noise_level, "w": settings.guidance_scale,
                             "s": settings.stride, "map_kind": settings.map_kind,
                             "checkpoint": settings.checkpoint, "split": args.split,
                             "data": str(data.resolve()), "batch_size": config.infer.batch_size,
                             "concurrency": config.infer.concurrency,
                             "evaluations_per_slice": 3 * settings.noise_level // settings.stride})
        tracking.log_metrics({**metrics, **{f"time/{k}": v for k, v in timings.items()}})
        tracking.log_table(combined, "tables/methods.json")
        tracking.log_artifact(output / "tables", "tables")
        tracking.log_artifact(output / "summary.json")
        if any((output / "figures").glob("*.png")):
            tracking.log_artifact(output / "figures", "figures")
        if not args.no_volumes and (output / "volumes").is_dir():
            tracking.log_artifact(output / "volumes", "volumes")
        if args.log_slices:
            tracking.log_artifact(slices_dir, "slices")
    print(f"infer: done; outputs in {output} (MLflow run {run_id})", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except InferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
