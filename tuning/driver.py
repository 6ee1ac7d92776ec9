"""Ray Tune over the noise level D and guidance scale w, objective mean ⌈DSC⌉ (paper Fig. 5).

The search runs on the tune split's unhealthy slices (the 10-patient tuning set): every trial
turns the same slices into healthy counterfactuals at its (D, w), scores the anomaly maps with
:func:`igconda.metrics.score_batch` and reports mean ⌈DSC⌉ (maximised), AUPRC, HD95 and
detection sensitivity.

Efficiency, because a sweep is 36 counterfactual passes over the tuning set:

- the slices are read once by the driver and put in the object store once (``ray.put``); each
  trial gets the reference, so nothing is re-read or re-serialised per trial;
- each trial loads the model once;
- by default a trial takes one D and every w (see :mod:`tuning.space`): the DDIM encoding to
  level D is unconditional, so it is computed once and decoded per w. The result is still the
  full D × w grid (``grid.csv``), each pair reported as its own Tune result and MLflow run.

Trials request ``{"cpu": cpus_per_trial, "gpu": gpus_per_trial}``; fractional GPUs let several
trials share one GPU on a cluster.

Outputs in ``<output>/``: ``best.json`` (read by ``ray_jobs.infer --tuned``), ``grid.csv`` and
``heatmap.png``, all written atomically and logged to MLflow, plus Tune's own trial folders under
``ray_results/``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from igconda.config import ConfigError, StudyConfig, TuneConfig
from igconda.data.schema import UNHEALTHY, stack_images
from igconda.io_utils import atomic_write
from tuning.space import build_param_space, grid_size, trial_pairs, validate_space

#: The objective Tune maximises.
METRIC = "mean_dsc"

#: Columns of grid.csv, in order (one row per (D, w)).
GRID_COLUMNS = (
    "noise_level", "guidance_scale", "stride", "mean_dsc", "std_dsc", "mean_auprc", "mean_hd95",
    "detection_sensitivity", "num_slices", "evaluations_per_slice", "seconds",
)

BEST_FILE = "best.json"
GRID_FILE = "grid.csv"
HEATMAP_FILE = "heatmap.png"


class TuningError(RuntimeError):
    """The search could not run or produced no usable result; the message says why."""


# --------------------------------------------------------------------------------------------
# Data: the tune split's unhealthy slices, selected deterministically.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSlices:
    """The slices every trial scores (shared through the object store).

    Attributes:
        images: (N, H, W) float32 PET in [0, 1].
        masks: (N, H, W) uint8 lesion masks (every slice has at least one lesion pixel).
        patient_id: (N,) patient of each slice.
        cohort: (N,) cohort of each slice.
        slice_index: (N,) z index of each slice in its volume.
    """

    images: np.ndarray
    masks: np.ndarray
    patient_id: np.ndarray
    cohort: np.ndarray
    slice_index: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_tune_slices(data_dir: str | Path, max_slices: int = 0, split: str = "tune") -> TuneSlices:
    """Read the unhealthy slices of one split, in a fixed order, capped at ``max_slices``.

    Rows are ordered by (patient_id, slice_index), so the selection does not depend on file
    listing order or on how many files the split was written as. With a cap, the slices are taken
    evenly spaced through that order rather than the first ``max_slices``, so every tuning patient
    (and lesions of every size along the body) stays represented.

    Args:
        data_dir: the preprocessed data folder (``<data>/slices/<split>/*.parquet``); a local
            path or any URI pyarrow can read.
        max_slices: at most this many slices; 0 keeps them all.
        split: which split's folder to read.

    Raises:
        TuningError: the split is missing or has no unhealthy slice.
    """
    if max_slices < 0:
        raise ConfigError(f"tune.max_slices must be >= 0, got {max_slices}")
    folder = f"{str(data_dir).rstrip('/')}/slices/{split}"
    columns = ["patient_id", "cohort", "slice_index", "label", "height", "width", "image", "mask"]
    try:
        table = pq.read_table(folder, columns=columns)
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as err:
        raise TuningError(f"cannot read the {split} split at {folder}: {err}") from None
    table = table.filter(pc.equal(table["label"], UNHEALTHY))
    if table.num_rows == 0:
        raise TuningError(f"{folder}: no unhealthy slice (label {UNHEALTHY}) to tune on")
    table = table.sort_by([("patient_id", "ascending"), ("slice_index", "ascending")])
    if max_slices and table.num_rows > max_slices:
        keep = np.unique(np.linspace(0, table.num_rows - 1, max_slices).round().astype(np.int64))
        table = table.take(pa.array(keep))
    heights = set(table["height"].to_pylist())
    widths = set(table["width"].to_pylist())
    if len(heights) != 1 or len(widths) != 1:
        raise TuningError(f"{folder}: slices of different shapes ({heights} × {widths})")
    h, w = heights.pop(), widths.pop()
    return TuneSlices(
        images=stack_images(table["image"], h, w, np.float32),
        masks=stack_images(table["mask"], h, w, np.uint8),
        patient_id=np.asarray(table["patient_id"].to_pylist(), dtype=object),
        cohort=np.asarray(table["cohort"].to_pylist(), dtype=object),
        slice_index=table["slice_index"].to_numpy(),
    )


# --------------------------------------------------------------------------------------------
# One trial's work, without Ray (testable as a plain function).
# --------------------------------------------------------------------------------------------


def summarize_scores(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-slice metrics of one (D, w) → the grid row's summary values.

    HD95 is averaged over the slices where it is finite (it is undefined when nothing is
    predicted at τ*); detection sensitivity pools lesions over all slices (detected / total).
    """
    dsc = np.asarray(scores["dsc_max"], dtype=np.float64)
    hd95 = np.asarray(scores["hd95"], dtype=np.float64)
    finite = np.isfinite(hd95)
    lesions = float(np.sum(scores["n_lesions"]))
    return {
        "mean_dsc": float(np.mean(dsc)),
        "std_dsc": float(np.std(dsc)),
        "mean_auprc": float(np.mean(np.asarray(scores["auprc"], dtype=np.float64))),
        "mean_hd95": float(np.mean(hd95[finite])) if finite.any() else float("nan"),
        "detection_sensitivity": float(np.sum(scores["n_detected"]) / lesions) if lesions else float("nan"),
        "num_slices": int(dsc.shape[0]),
    }


def _default_ops() -> tuple[Any, Callable[..., dict[str, np.ndarray]]]:
    from igconda import metrics
    from igconda.diffusion import ddim

    return ddim, metrics.score_batch


def evaluate_noise_level(
    model: torch.nn.Module,
    schedule: Any,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    noise_level: int,
    guidance_scales: Sequence[float],
    stride: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    share_encoding: bool = True,
    amp: bool = False,
    ddim: Any = None,
    score_batch: Callable[..., dict[str, np.ndarray]] | None = None,
) -> list[dict[str, float]]:
    """Score every w at one noise level D on the given slices.

    With ``share_encoding``, each batch is
    DDIM-encoded to level D once (D / s evaluations per slice) and decoded once per w
    (2 D / s each); otherwise ``ddim.counterfactual`` runs the whole round trip per w.

    Args:
        model: the conditional UNet, in eval mode on ``device``.
        schedule: the checkpoint's ``NoiseSchedule``.
        images: (N, H, W) float32 slices in [0, 1].
        masks: (N, H, W) ground-truth masks.
        noise_level: D, a multiple of ``stride``.
        guidance_scales: the w values to decode.
        stride: DDIM stride s.
        batch_size: slices per forward batch.
        device: where the model runs.
        share_encoding: encode once per batch and decode per w (same results, fewer evaluations).
        amp: CUDA autocast for the network (ignored on the CPU).
        ddim: module with ``ddim_encode``, ``ddim_decode``, ``counterfactual`` and
            ``anomaly_map``; default :mod:`igconda.diffusion.ddim`. Injected in tests.
        score_batch: per-slice metrics; default :func:`igconda.metrics.score_batch`.

    Returns:
        One dict per w, in the order given: ``noise_level``, ``guidance_scale``, ``stride``,
        the :func:`summarize_scores` values, ``evaluations_per_slice`` (network evaluations the
        pair costs on its own, 3 D / s) and ``seconds`` (wall time; a shared encoding is split
        evenly across the w values).
    """
    if ddim is None or score_batch is None:
        default_ddim, default_score = _default_ops()
        ddim = ddim or default_ddim
        score_batch = score_batch or default_score
    n, h, w = images.shape
    scales = [float(g) for g in guidance_scales]
    maps = {g: np.empty((n, h, w), dtype=np.float32) for g in scales}
    seconds = dict.fromkeys(scales, 0.0)
    shared = share_encoding
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            # np.array copies: object-store arrays are read-only, torch wants writable memory.
            x0 = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))
            x0 = x0.unsqueeze(1).to(device)
            if shared:
                t0 = time.perf_counter()
                latent = ddim.ddim_encode(model, x0, schedule, noise_level=noise_level,
                                          stride=stride, amp=amp)
                share = (time.perf_counter() - t0) / len(scales)
            for g in scales:
                t0 = time.perf_counter()
                if shared:
                    x_hat = ddim.ddim_decode(model, latent, schedule, noise_level=noise_level,
                                             stride=stride, guidance_scale=g, target_label=1,
                                             amp=amp)
                    seconds[g] += share
                else:
                    x_hat = ddim.counterfactual(model, x0, schedule, noise_level=noise_level,
                                                stride=stride, guidance_scale=g, target_label=1,
                                                amp=amp)
                amap = ddim.anomaly_map(x0, x_hat, kind="abs")
                maps[g][start:start + x0.shape[0]] = amap.reshape(-1, h, w).float().cpu().numpy()
                seconds[g] += time.perf_counter() - t0
    rows = []
    for g in scales:
        row = {"noise_level": int(noise_level), "guidance_scale": g, "stride": int(stride)}
        row.update(summarize_scores(score_batch(maps[g], masks)))
        row["evaluations_per_slice"] = 3 * noise_level // stride
        row["seconds"] = seconds[g]
        rows.append(row)
    return rows


def tune_trial(
    config: dict[str, Any],
    *,
    slices_ref: Any,
    checkpoint: str,
    stride: int,
    batch_size: int,
    use_gpu: bool,
    share_encoding: bool = True,
    amp: bool = False,
    num_threads: int = 1,
) -> None:
    """The Tune function trainable: one D and one or more w; reports one result per w.

    Runs in a Tune worker. The slices come from the object store by reference; the model is
    loaded once per trial.
    """
    import ray
    from ray import tune

    from igconda.checkpoint import load_model
    from igconda.diffusion.schedule import NoiseSchedule

    # One intra-op thread per reserved CPU: more threads than reserved cores oversubscribe the
    # node when trials run side by side (measured 20× slower on a loaded 2-core machine).
    torch.set_num_threads(max(1, num_threads))
    noise_level, scales = trial_pairs(config)
    slices: TuneSlices = ray.get(slices_ref)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model, study = load_model(checkpoint, device)
    schedule = NoiseSchedule.from_config(study.train)
    rows = evaluate_noise_level(
        model, schedule, slices.images, slices.masks, noise_level=noise_level,
        guidance_scales=scales, stride=stride, batch_size=batch_size, device=device,
        share_encoding=share_encoding, amp=amp,
    )
    for row in rows:
        tune.report(row)


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644 whatever the umask: results are read by other users and jobs.
    atomic_write(path, lambda tmp: tmp.write_text(text), mode=0o644)


def _atomic_save_figure(figure: Any, path: Path) -> None:
    # The temp name keeps the suffix (matplotlib picks the format from it); 0644 as above.
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120), mode=0o644)


def collect_grid(reports: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Tune reports (one per evaluated (D, w)) → the grid table, one row per distinct pair.

    Random search may sample a pair twice; the objective is deterministic, so the first report
    of a pair is kept. Rows are sorted by D then w.
    """
    if not reports:
        raise TuningError("no trial reported a result")
    frame = pd.DataFrame([{k: r.get(k) for k in GRID_COLUMNS} for r in reports])
    frame = frame.drop_duplicates(subset=["noise_level", "guidance_scale"], keep="first")
    frame = frame.sort_values(["noise_level", "guidance_scale"], kind="stable")
    frame["noise_level"] = frame["noise_level"].astype(int)
    frame["guidance_scale"] = frame["guidance_scale"].astype(float)
    return frame.reset_index(drop=True)


def select_best(grid: pd.DataFrame) -> dict[str, Any]:
    """The grid row with the highest mean ⌈DSC⌉ as a plain dict.

    Ties go to the first row in (D, w) order, i.e. the smaller D (cheaper) then the smaller w.
    Raises TuningError when no row has a finite objective.
    """
    finite = grid[np.isfinite(grid[METRIC].astype(float))]
    if finite.empty:
        raise TuningError("no (D, w) pair has a finite mean ⌈DSC⌉")
    row = finite.loc[finite[METRIC].astype(float).idxmax()]
    best = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    best["noise_level"] = int(best["noise_level"])
    best["guidance_scale"] = float(best["guidance_scale"])
    # A row Series upcasts ints to float; restore the integer columns.
    for key in ("stride", "num_slices", "evaluations_per_slice"):
        if key in best and best[key] is not None and not pd.isna(best[key]):
            best[key] = int(best[key])
    return best


def read_best(path: str | Path) -> dict[str, Any]:
    """Read a ``best.json`` written by :func:`run_tuning` (for ``ray_jobs.infer --tuned``).

    Returns a dict with at least ``noise_level`` (int), ``guidance_scale`` (float), ``stride``
    (int) and ``mean_dsc``. Raises TuningError naming the file when it is unusable.
    """
    path = Path(path)
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TuningError(f"{path}: cannot read tuned parameters: {err}") from None
    missing = {"noise_level", "guidance_scale", "stride"} - set(best)
    if missing:
        raise TuningError(f"{path}: missing keys {sorted(missing)}")
    return best


@dataclass(frozen=True)
class TuningResult:
    """What :func:`run_tuning` produced."""

    best: dict[str, Any]
    grid: pd.DataFrame
    output_dir: Path
    run_id: str | None


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_tuning(
    checkpoint: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    study: StudyConfig | None = None,
    tracking_uri: str = "",
    experiment: str | None = None,
    parent_run_id: str | None = None,
    share_encoding: bool = True,
    batch_size: int | None = None,
    verbose: int = 1,
) -> TuningResult:
    """Run the (D, w) search and write ``best.json``, ``grid.csv`` and ``heatmap.png``.

    Ray must already be initialised (the job entry point does it, or the pipeline shares its
    runtime). MLflow: a ``tune`` run (nested under ``parent_run_id`` when given) with the grid,
    the best pair and the heatmap, and one child run per (D, w) with its params and metrics,
    logged from the driver once the trials are done (trials then need no MLflow access).

    Args:
        checkpoint: checkpoint folder (readable from every Ray node: local, NFS or S3-mounted).
        data_dir: preprocessed data folder with ``slices/tune``.
        output_dir: where the results go (created).
        study: config whose ``tune`` (and ``tracking``, ``infer.batch_size``) sections apply;
            default the checkpoint's own config.
        tracking_uri: MLflow URI; empty = ``<output_dir>/mlruns``.
        experiment: MLflow experiment; default ``study.tracking.experiment``.
        parent_run_id: make the tune run a child of this run (the pipeline's).
        share_encoding: one trial per D decoding every w (grid search only).
        batch_size: slices per forward batch; default ``study.infer.batch_size``.
        verbose: Tune's console verbosity (0 silent, 1 status table).

    Raises:
        ConfigError: an invalid search space for this checkpoint.
        TuningError: no data, or a trial failed.
    """
    from ray import tune

    from igconda import tracking
    from igconda.checkpoint import load_checkpoint_config
    from igconda.report import heatmap_figure

    checkpoint = Path(checkpoint).resolve()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_config = load_checkpoint_config(checkpoint)
    study = study or ckpt_config
    tcfg: TuneConfig = study.tune
    num_train_timesteps = ckpt_config.train.num_train_timesteps
    validate_space(tcfg.noise_levels, tcfg.guidance_scales, tcfg.stride, num_train_timesteps)
    group = share_encoding and tcfg.search == "grid"
    param_space, num_samples = build_param_space(tcfg, num_train_timesteps, group_by_noise_level=group)
    n_trials, n_pairs = grid_size(tcfg, group_by_noise_level=group)

    slices = load_tune_slices(data_dir, tcfg.max_slices)
    print(f"tune: {len(slices)} unhealthy slices from {len(set(slices.patient_id))} patients; "
          f"{n_pairs} (D, w) pairs in {n_trials} trials (stride {tcfg.stride})", flush=True)

    import ray

    # Once into the object store; every trial receives the reference, not a copy.
    slices_ref = ray.put(slices)
    trainable = functools.partial(
        tune_trial, slices_ref=slices_ref, checkpoint=str(checkpoint), stride=tcfg.stride,
        batch_size=batch_size or study.infer.batch_size, use_gpu=tcfg.gpus_per_trial > 0,
        share_encoding=share_encoding, amp=study.infer.use_amp,
        num_threads=int(tcfg.cpus_per_trial),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=num_samples),
        run_config=tune.RunConfig(name="tune", storage_path=str(output_dir / "ray_results"),
                                  verbose=verbose),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if r.error is not None]
    if failed:
        raise TuningError(f"{len(failed)} of {len(results)} trials failed; first error: {failed[0].error}")

    reports: list[dict[str, Any]] = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            raise TuningError(f"trial {result.path} reported nothing")
        reports.extend(history.to_dict("records"))
    grid = collect_grid(reports)
    best = select_best(grid)
    best.update({
        "objective": METRIC,
        "num_train_timesteps": num_train_timesteps,
        "checkpoint": str(checkpoint),
        "data": str(data_dir),
        "search": tcfg.search,
        "num_pairs": len(grid),
        "tuning_seconds": elapsed,
    })

    grid_path, best_path, heatmap_path = (output_dir / GRID_FILE, output_dir / BEST_FILE,
                                          output_dir / HEATMAP_FILE)
    _atomic_write_text(grid_path, grid.to_csv(index=False))
    figure = heatmap_figure(grid)
    _atomic_save_figure(figure, heatmap_path)
    import matplotlib.pyplot as plt

    plt.close(figure)

    uri = tracking.resolve_tracking_uri(tracking_uri or study.tracking.tracking_uri, output_dir)
    with tracking.start_run(uri, experiment or study.tracking.experiment, "tune",
                            tags={"igconda.stage": "tune"}, parent_run_id=parent_run_id) as run_id:
        tracking.log_params({f"tune.{k}": v for k, v in study.to_dict()["tune"].items()})
        tracking.log_params({"checkpoint": str(checkpoint), "data": str(data_dir),
                             "num_slices": len(slices), "share_encoding": share_encoding,
                             "num_train_timesteps": num_train_timesteps})
        tracking.log_metrics({"best_mean_dsc": best["mean_dsc"],
                              "best_noise_level": best["noise_level"],
                              "best_guidance_scale": best["guidance_scale"],
                              "tuning_seconds": elapsed})
        for row in grid.to_dict("records"):
            d, g = int(row["noise_level"]), float(row["guidance_scale"])
            with tracking.start_run(uri, experiment or study.tracking.experiment, f"D={d} w={g:g}",
                                    tags={"igconda.stage": "tune-trial"}, parent_run_id=run_id):
                tracking.log_params({"noise_level": d, "guidance_scale": g, "stride": row["stride"],
                                     "num_slices": row["num_slices"]})
                tracking.log_metrics({k: row[k] for k in GRID_COLUMNS[3:]
                                      if k not in ("num_slices",) and row[k] is not None
                                      and math.isfinite(float(row[k]))})
        best["mlflow_run_id"] = run_id
        _atomic_write_text(best_path, json.dumps({k: _json_value(v) for k, v in best.items()},
                                                 indent=2) + "\n")
        for path in (grid_path, best_path, heatmap_path):
            tracking.log_artifact(path, "tune")
    print(f"tune: best D={best['noise_level']} w={best['guidance_scale']:g} "
          f"mean ⌈DSC⌉={best['mean_dsc']:.3f} ({elapsed:.0f} s); wrote {best_path}", flush=True)
    return TuningResult(best=best, grid=grid, output_dir=output_dir, run_id=run_id)
