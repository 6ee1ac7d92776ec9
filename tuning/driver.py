"""Ray Tune over the noise level D, the guidance scale w and the map kind (paper Fig. 5).

The search runs on the tune split's unhealthy slices (the tuning set, never test): every trial
turns the same slices into guided and unguided counterfactuals at its D and each of its w
(:mod:`tuning.trial`), scores every map kind and the w = 0 control through
:mod:`igconda.evaluation` and reports mean ⌈DSC⌉ (maximised), the calibrated τ with its mean
Dice, AUPRC, HD95 and detection sensitivity. :mod:`tuning.results` picks the best
(D, w, map kind), never the control, and records the paper's map and the control beside it.

Efficiency, because a sweep is many counterfactual passes over the tuning set:

- the slices are read once by the driver and put in the object store once (``ray.put``); each
  trial gets the reference, so nothing is re-read or re-serialised per trial;
- each trial loads the model once;
- by default a trial takes one D and every w (see :mod:`tuning.space`): the DDIM encoding to
  level D and the unguided decode do not depend on w, so they are computed once and only the
  guided decode runs per w. The result is still the full D × w × kind grid (``grid.csv``).

Trials request ``{"cpu": cpus_per_trial, "gpu": gpus_per_trial}``; fractional GPUs let several
trials share one GPU on a cluster.

Outputs in ``<output>/``: ``best.json`` (read by ``ray_jobs.infer --tuned`` and written into the
study's model folder), ``grid.csv`` and ``heatmap.png`` (the chosen map kind), all written
atomically before anything is logged to MLflow (a tracking outage is a warning and
``python -m ray_jobs.relog --tune OUTPUT`` logs them later), plus Tune's own trial folders under
``ray_results/tune-<key>/``. A tuning whose driver was killed is resumed by running it again:
the trials it finished are kept, only the others run (:mod:`tuning.experiment`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from igconda.config import StudyConfig, TuneConfig
from igconda.data.io import is_local_dataset
from igconda.data.study_layout import TuneOutput
from igconda.io_utils import atomic_write
from igconda.map_kinds import CONTROLS
from tuning.experiment import KEY_FIELD, make_tuner, tuning_key
from tuning.results import (  # noqa: F401  (re-exported: the driver's public names)
    GRID_COLUMNS,
    METRIC,
    baseline_thresholds,
    collect_grid,
    read_best,
    select_best,
)
from tuning.space import build_param_space, grid_size
from tuning.trial import (  # noqa: F401  (re-exported)
    TuneSlices,
    TuningError,
    evaluate_noise_level,
    load_tune_slices,
    score_row,
    tune_trial,
)


def write_result_text(path: Path, text: str) -> None:
    """Write a tuning result file whole or not at all (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644 whatever the umask: results are read by other users and jobs.
    atomic_write(path, lambda tmp: tmp.write_text(text), mode=0o644)


def save_result_figure(figure: Any, path: Path) -> None:
    """Save a matplotlib figure whole or not at all."""
    # The temp name keeps the suffix (matplotlib picks the format from it); 0644 as above.
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120), mode=0o644)


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


def write_best(path: Path, best: dict[str, Any]) -> None:
    """Write the chosen settings as ``best.json`` (non-finite floats as null)."""
    write_result_text(path, json.dumps({k: _json_value(v) for k, v in best.items()}, indent=2) + "\n")


def log_tuning_run(output_dir: Path, best: dict[str, Any], grid: pd.DataFrame, tracking_uri: str,
                   experiment: str) -> None:
    """Log a tuning result to the active MLflow run, from what is on disk: the chosen settings
    and τ's (``best.json``), one child run per (D, w) with every map kind's metrics
    (``grid.csv``), and the three files as artifacts. The tune job calls it after writing them,
    ``python -m ray_jobs.relog`` after a tracking outage."""
    from igconda import tracking

    run_id = tracking.active_run_id()
    tracking.log_params({"checkpoint": best.get("checkpoint"), "data": best.get("data"),
                         "num_train_timesteps": best.get("num_train_timesteps"),
                         "best_map_kind": best["map_kind"]})
    metrics = {"best_mean_dsc": best.get("mean_dsc"), "best_mean_dice_tau": best.get("mean_dice_tau"),
               "best_noise_level": best["noise_level"], "best_guidance_scale": best["guidance_scale"],
               **{f"tau/{m}": t for m, t in (best.get("thresholds") or {}).items()},
               "tuning_seconds": best.get("tuning_seconds")}
    tracking.log_metrics({k: float(v) for k, v in metrics.items()
                          if v is not None and math.isfinite(float(v))})
    for (d, g), rows in grid.groupby(["noise_level", "guidance_scale"], sort=True):
        with tracking.start_run(tracking_uri, experiment, f"D={int(d)} w={float(g):g}",
                                tags={"igconda.stage": "tune-trial"}, parent_run_id=run_id):
            first = rows.iloc[0]
            tracking.log_params({"noise_level": int(d), "guidance_scale": float(g),
                                 "stride": int(first["stride"]),
                                 "num_slices": int(first["num_slices"])})
            tracking.log_metrics({f"{row['map_kind']}/{k}": float(row[k])
                                  for row in rows.to_dict("records") for k in GRID_COLUMNS[4:]
                                  if k != "num_slices" and row.get(k) is not None
                                  and math.isfinite(float(row[k]))})
    for path in TuneOutput(output_dir).files:
        if path.is_file():
            tracking.log_artifact(path, "tune")
    if best.get("data") and is_local_dataset(best["data"]):
        from igconda.tracking.model import log_dataset

        log_dataset(best["data"], "tune")


def run_tuning(
    checkpoint: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    study: StudyConfig | None = None,
    checkpoint_config: StudyConfig | None = None,
    tracking_uri: str = "",
    experiment: str | None = None,
    parent_run_id: str | None = None,
    share_encoding: bool = True,
    batch_size: int | None = None,
    verbose: int = 1,
    callbacks: Sequence[Any] = (),
) -> TuningResult:
    """Run the (D, w, map kind) search and write ``best.json``, ``grid.csv`` and ``heatmap.png``.

    Ray must already be initialised (the job entry point does it, or the pipeline shares its
    runtime). MLflow: a ``tune`` run (nested under ``parent_run_id`` when given) with the grid,
    the chosen settings, every τ and the heatmap, and one child run per (D, w) with each map
    kind's metrics as ``<kind>/<metric>``, logged from the driver once the trials are done
    (trials then need no MLflow access).

    Args:
        checkpoint: checkpoint folder (readable from every Ray node: local, NFS or S3-mounted).
        data_dir: preprocessed data folder with ``slices/tune``.
        output_dir: where the results go (created).
        study: config whose ``tune`` (and ``tracking``, ``infer.batch_size``) sections apply;
            default the checkpoint's own config.
        checkpoint_config: the checkpoint's own config when the caller has read it (the job's
            request), so that its ``config.yaml`` is not parsed again; read here when None.
        tracking_uri: MLflow URI; empty = ``study.tracking.tracking_uri``, else
            ``$MLFLOW_TRACKING_URI``, else ``<output_dir>/mlflow.db`` (:func:`igconda.tracking.resolve_tracking_uri`).
        experiment: MLflow experiment; default ``study.tracking.experiment``.
        parent_run_id: make the tune run a child of this run (the pipeline's).
        share_encoding: one trial per D decoding every w (grid search only).
        batch_size: slices per forward batch; default ``study.infer.batch_size``.
        verbose: Tune's console verbosity (0 silent, 1 status table).
        callbacks: ``ray.tune.Callback`` s for the run (the job's trial bar).

    Raises:
        ConfigError: an invalid search space for this checkpoint.
        TuningError: no data, or a trial failed.
    """
    from ray import tune

    from igconda import tracking
    from igconda.checkpoint import load_checkpoint_config
    from igconda.figures import heatmap_figure

    checkpoint = Path(checkpoint).resolve()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_config = checkpoint_config or load_checkpoint_config(checkpoint)
    study = study or ckpt_config
    tcfg: TuneConfig = study.tune
    num_train_timesteps = ckpt_config.train.num_train_timesteps
    # build_param_space checks the space against the checkpoint's T (tuning.space.validate_space).
    group = share_encoding and tcfg.search == "grid"
    param_space, num_samples = build_param_space(tcfg, num_train_timesteps, group_by_noise_level=group)
    n_trials, n_pairs = grid_size(tcfg, group_by_noise_level=group)

    slices = load_tune_slices(data_dir, tcfg.max_slices)
    print(f"tune: {len(slices)} unhealthy slices from {len(set(slices.patient_id))} patients; "
          f"{n_pairs} (D, w) pairs × {len(tcfg.map_kinds)} map kinds in {n_trials} trials "
          f"(stride {tcfg.stride})", flush=True)

    import ray

    # Once into the object store; every trial receives the reference, not a copy.
    slices_ref = ray.put(slices)
    trainable = functools.partial(
        tune_trial, slices_ref=slices_ref, checkpoint=str(checkpoint), stride=tcfg.stride,
        batch_size=batch_size or study.infer.batch_size, use_gpu=tcfg.gpus_per_trial > 0,
        map_kinds=tcfg.map_kinds, share_encoding=share_encoding, amp=study.infer.use_amp,
        num_threads=int(tcfg.cpus_per_trial),
    )
    # What the trials compute; a killed run's experiment with the same key is resumed.
    key = tuning_key([checkpoint], slices, {
        "tune": study.to_dict()["tune"], "share_encoding": share_encoding,
        "batch_size": batch_size or study.infer.batch_size, "amp": study.infer.use_amp})
    tuner, how = make_tuner(
        tune.with_resources(trainable, {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial}),
        param_space, tune.TuneConfig(metric=METRIC, mode="max", num_samples=num_samples),
        {"verbose": verbose, "callbacks": list(callbacks)}, storage=TuneOutput(output_dir).ray_results,
        key=key, best_path=TuneOutput(output_dir).best)
    print(f"tune: {how}", flush=True)
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
    # Baselines get their τ from the same tune slices, so every reported method has one.
    best["thresholds"].update(baseline_thresholds(slices))
    best.update({
        "objective": METRIC,
        "num_train_timesteps": num_train_timesteps,
        "checkpoint": str(checkpoint),
        "data": str(data_dir),
        "search": tcfg.search,
        "num_pairs": int((~grid["map_kind"].isin(CONTROLS)).sum()),
        "tuning_seconds": elapsed,
        KEY_FIELD: key,
    })

    grid_path, best_path, heatmap_path = TuneOutput(output_dir).files
    write_result_text(grid_path, grid.to_csv(index=False))
    figure = heatmap_figure(grid[grid["map_kind"] == best["map_kind"]])
    save_result_figure(figure, heatmap_path)
    import matplotlib.pyplot as plt

    plt.close(figure)

    # The result lands on disk before MLflow is asked for anything: a tracking server that is
    # down must not cost the tuning. best.json is rewritten with the run id once it is logged.
    write_best(best_path, best)
    uri = tracking.resolve_tracking_uri(tracking_uri or study.tracking.tracking_uri, output_dir)
    run_id = None
    with tracking.outage_tolerant("logging the tuning run", uri, on_disk=str(output_dir),
                                  relog=f"--tune {output_dir}"):
        with tracking.start_run(uri, experiment or study.tracking.experiment, "tune",
                                tags={"igconda.stage": "tune"}, parent_run_id=parent_run_id) as run_id:
            tracking.log_params({f"tune.{k}": v for k, v in study.to_dict()["tune"].items()})
            tracking.log_params({"num_slices": len(slices), "share_encoding": share_encoding})
            best["mlflow_run_id"] = run_id
            write_best(best_path, best)
            log_tuning_run(output_dir, best, grid, uri, experiment or study.tracking.experiment)
    control = best.get("control", {}).get("mean_dsc", float("nan"))
    print(f"tune: best D={best['noise_level']} w={best['guidance_scale']:g} "
          f"map={best['map_kind']} mean ⌈DSC⌉={best['mean_dsc']:.3f} (w = 0 control "
          f"{control:.3f}), τ={best['threshold']:g} with mean Dice {best['mean_dice_tau']:.3f} "
          f"({elapsed:.0f} s); wrote {best_path}", flush=True)
    return TuningResult(best=best, grid=grid, output_dir=output_dir, run_id=run_id)
