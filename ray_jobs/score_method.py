"""Score one method on a split, for the method comparison (Ray Data batch inference).

::

    python -m ray_jobs.score_method --method hirescam --checkpoint <study>/baselines/hirescam/best \\
        --data <study>/data --output <study>/scores/hirescam [--split test] [--tune-split tune] \\
        [--config configs/demo.yaml] [--variant TEXT] [--tracking-uri U] [--experiment E]
    python -m ray_jobs.score_method --method dpm_cg --checkpoint <classifier>/best \\
        --checkpoint2 <dpm>/best --data ... --output ...
    python -m ray_jobs.score_method --method igconda --checkpoint <study>/model --variant 011 ...
    python -m ray_jobs.score_method --method threshold_41 --data ... --output ...

``igconda`` scores the map kind a study's model folder was tuned to (``igconda_control``: its
w = 0 control); ``threshold_41`` and ``intensity`` take no checkpoint
(:func:`igconda.baselines.scoring.load_method`).

1. one Ray Data pass: it reads the unhealthy slices of ``--tune-split`` and ``--split`` as one
   dataset (with a ``split`` column), and ``map_batches`` runs one pool of actors holding the
   method (loaded once per actor, as ``ray_jobs.infer`` does) that computes each slice's map
   once and returns, per slice, its Dice at every τ of the calibration grid and, for the
   ``--split`` slices, the paper's metrics and the lesion statistics of
   :mod:`igconda.lesion_stats` (:func:`igconda.baselines.scoring.score_slices_all_taus`);
2. τ: the ``--tune-split`` rows alone give the one threshold a user would apply (the τ of
   :func:`igconda.evaluation.calibrate_threshold`), and each ``--split`` slice's Dice at τ is
   read off its row (:func:`igconda.baselines.scoring.apply_calibration`): the same τ and
   scores as two passes (maps of the tune split, then scoring at τ) without a second actor
   pool and model load (~20 s of Ray start-up per pass; benchmarks/RESULTS.md);
3. writes, under ``--output``: ``per_slice_scores.parquet``
   (:data:`igconda.baselines.scoring.COMPARISON_SCORE_SCHEMA`: ``SCORE_SCHEMA`` plus
   ``lesion_size_norm`` and ``lesion_suv_mean_norm``) and ``summary.csv``
   (:func:`igconda.evaluation.summarize` per cohort, with the internal/external rows);
4. logs one MLflow run (the contract of docs/CONTRACTS.md, "Method runs"): tags
   ``igconda.stage=score``, ``igconda.method``, ``igconda.variant``, ``igconda.data_version``;
   params; metrics ``dsc_max_mean``, ``dice_tau_mean``, ``auprc_mean``, ``hd95_mean``,
   ``sensitivity_mean`` of the ``internal (all)`` row and ``tau``; artifacts
   ``scores/per_slice_scores.parquet`` and ``scores/summary.csv``; then ``score_run.json``
   (the run id, method and variant) marks the folder finished (:func:`finished_run`).

Settings (``score_batch_size``; for ``dpm_cg`` D, s and the gradient scale) come from the
``baselines`` section of ``--config``, else, for ``dpm_cg``, of the study stored in the
classifier's checkpoint, else the defaults. The command line is resolved into a
:class:`ray_jobs.score_config.ScoreRequest` (``--config`` parsed once) by the resolver the
comparison study also builds its scorings with; :func:`run` takes the request. Exit status 0,
2 on a usage, config or checkpoint error; a tracking outage only warns (the files are on disk).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP, non_negative_float, positive_int
from igconda.baselines.scoring import (
    IGCONDA,
    IGCONDA_CONTROL,
    SCORE_INPUT_COLUMNS,
    SCORED_METHODS,
    SCORES_FILE,
    SPLIT_COLUMN,
    SUMMARY_FILE,
    apply_calibration,
    load_method,
    run_metrics,
    score_slices_all_taus,
    write_method_scores,
)
from igconda.checkpoint import CheckpointError
from igconda.config import ConfigError
from igconda.data.compat import PreprocessMismatch, check_data_for_checkpoint
from igconda.data.io import path_exists, split_path
from igconda.data.schema import SPLITS, UNHEALTHY
from igconda.evaluation import DPM_CG
from igconda.io_utils import atomic_write, file_digest, folder_digest
from igconda.train_loop import dataset_version
from ray_jobs.console import add_verbose_flag, init_ray
from ray_jobs.score_config import ScoreRequest, score_request
from ray_jobs.shared_storage import SharedStorageError, preflight
from ray_jobs.train_runs import UsageError

#: Written last into ``--output``: the folder's scores are finished and logged.
RUN_RECORD = "score_run.json"


class MethodActor:
    """A Ray Data ``map_batches`` actor holding one loaded method.

    Args:
        method, checkpoint, checkpoint2, baselines (``BaselinesConfig`` as a dict), device: what
            :func:`igconda.baselines.scoring.load_method` takes.
        scored_split: the split whose slices are scored; the others' rows only calibrate τ
            (:func:`~igconda.baselines.scoring.score_slices_all_taus`).
    """

    def __init__(self, method: str, checkpoint: str | None, checkpoint2: str | None,
                 baselines: dict[str, Any], device: str, scored_split: str) -> None:
        from igconda.baselines.settings import BaselinesConfig
        from igconda.config import from_dict

        settings = from_dict({"baselines": baselines}).baselines if baselines else BaselinesConfig()
        self.method = load_method(method, checkpoint, checkpoint2, settings=settings, device=device)
        self.scored_split = scored_split

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        return score_slices_all_taus(self.method, batch, self.scored_split)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.score_method",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of {', '.join(SCORED_METHODS)}")
    p.add_argument("--checkpoint", default=None,
                   help="the method's checkpoint (dpm_cg: the classifier's; igconda: the study's "
                        "model folder; none for threshold_41 and intensity)")
    p.add_argument("--checkpoint2", default=None, help="dpm_cg only: the unconditional DPM's checkpoint")
    p.add_argument("--tuned", default=None,
                   help="dpm_cg: best.json of `ray_jobs.tune --method dpm_cg` (its D and scale "
                        "replace the config's baselines.dpm_cg_noise_level / dpm_cg_scale)")
    p.add_argument("--data", required=True, help="preprocessed dataset folder (slices/<split>/)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split to score")
    p.add_argument("--tune-split", default="tune", choices=SPLITS, help="split τ is calibrated on")
    p.add_argument("--output", required=True, help="folder for per_slice_scores.parquet, summary.csv")
    p.add_argument("--config", default=None, help="study YAML (its baselines and tracking sections)")
    p.add_argument("--concurrency", type=positive_int, default=1, help="scoring actors")
    p.add_argument("--num-cpus", type=non_negative_float, default=1.0, help="CPUs per actor")
    p.add_argument("--num-gpus", type=non_negative_float, default=0.0, help="GPUs per actor")
    p.add_argument("--device", default=None, help="torch device in the actors (default: cuda if a GPU)")
    p.add_argument("--variant", default="", help="free text tagged igconda.variant (default: empty)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--parent-run-id", default=None, help="nest the MLflow run under this run")
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def score_inputs(request: ScoreRequest) -> dict[str, str]:
    """What a scoring's result depends on: the method, the splits, the variant, and the paths
    *and contents* of the checkpoints, the tuning file, the config file and the data, keyed by
    the data's version (a checkpoint retrained, or data re-preprocessed, into the same folder
    is another input). What :func:`finished_run` compares a finished folder's record with."""

    def resolved(path: str | None) -> str:
        return str(Path(path).resolve()) if path else ""

    def content(path: str | None) -> str:
        if not path or not Path(path).exists():
            return ""
        return folder_digest(path) if Path(path).is_dir() else file_digest(path)

    try:
        data_version = dataset_version(str(request.data))
    except FileNotFoundError:
        data_version = ""  # no data (yet): the job itself names what is missing
    return {"method": request.method, "checkpoint": resolved(request.checkpoint),
            "checkpoint_sha256": content(request.checkpoint),
            "checkpoint2": resolved(request.checkpoint2), "checkpoint2_sha256": content(request.checkpoint2),
            "tuned": resolved(request.tuned), "tuned_sha256": content(request.tuned),
            "data": str(request.data), "data_version": data_version,
            "split": request.split, "tune_split": request.tune_split,
            "variant": request.variant, "config_sha256": content(request.config_file)}


def finished_run(output: str | Path, inputs: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The MLflow run a finished scoring left in ``output`` (its ``score_run.json``), or None
    when the folder was never scored, is half-written, its run was not logged, or (with
    ``inputs``, :func:`score_inputs`) it was scored from other inputs: a stale result."""
    path = Path(output) / RUN_RECORD
    if not (path.is_file() and (Path(output) / SCORES_FILE).is_file()):
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("run_id")):
        return None
    return record if inputs is None or record.get("inputs") == inputs else None


def _unhealthy_slices(args: ScoreRequest, split: str) -> Any:
    """The Ray Dataset of a split's unhealthy slices, with its name in :data:`SPLIT_COLUMN`
    (the folder is the only record of the split: slice files carry no such column)."""
    import pyarrow as pa
    import ray

    path = split_path(args.data, split)
    if not path_exists(path, want_dir=True):
        raise UsageError(f"{path}: no {split} split; run ray_jobs.preprocess first")
    ds = ray.data.read_parquet(path).select_columns(list(SCORE_INPUT_COLUMNS))
    # Only unhealthy slices are scored (and calibrate τ); healthy ones need no network pass.
    return ds.filter(expr=f"label == {UNHEALTHY}").add_column(
        SPLIT_COLUMN, lambda table: pa.array([split] * len(table), pa.string()),
        batch_format="pyarrow")


def _run_actors(args: ScoreRequest) -> Any:
    """The Ray Dataset of :class:`MethodActor` rows over the unhealthy slices of ``--tune-split``
    and ``--split``: one dataset, one actor pool, each map computed once."""
    import ray

    splits = list(dict.fromkeys((args.tune_split, args.split)))
    ds = _unhealthy_slices(args, splits[0])
    if len(splits) > 1:
        ds = ds.union(_unhealthy_slices(args, splits[1]))
    device = args.device or ("cuda" if args.num_gpus > 0 else "cpu")
    return ds.map_batches(
        MethodActor,
        fn_constructor_kwargs={"method": args.method, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                               "checkpoint2": str(args.checkpoint2) if args.checkpoint2 else None,
                               "baselines": args.config.to_dict()["baselines"], "device": device,
                               "scored_split": args.split},
        batch_size=args.config.baselines.score_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=args.concurrency),
        num_cpus=args.num_cpus, num_gpus=args.num_gpus)


def score_and_calibrate(args: ScoreRequest) -> tuple[float, float, pd.DataFrame]:
    """The one pass: ``(τ, mean tune Dice at τ, the --split slices' score rows)``."""
    frames, counts = [], dict.fromkeys((args.tune_split, args.split), 0)
    for frame in _run_actors(args).iter_batches(batch_size=None, batch_format="pandas"):
        frames.append(frame)
        for split, n in frame[SPLIT_COLUMN].value_counts().items():
            counts[split] += int(n)
        print("    mapped " + ", ".join(f"{n} unhealthy {s}" for s, n in counts.items())
              + " slice(s)", flush=True)
    for split, n in counts.items():
        if not n:
            what = "calibrate τ on" if split == args.tune_split else "score"
            raise UsageError(f"split {split!r} of {args.data} has no unhealthy slice to {what}")
    tau, dice, per_slice = apply_calibration(pd.concat(frames, ignore_index=True), args.split,
                                             args.tune_split)
    print(f"{args.method}: τ = {tau:g} on {counts[args.tune_split]} unhealthy "
          f"{args.tune_split} slices (mean Dice {dice:.3f})", flush=True)
    return tau, dice, per_slice


def run(request: ScoreRequest) -> dict[str, Any]:
    """The whole job; returns ``{"tau", "summary", "run_id", "output"}``.

    Raises:
        UsageError, ConfigError, CheckpointError, FileNotFoundError, PreprocessMismatch,
        SharedStorageError: refused (the command line's exit status 2).
    """
    args, config = request, request.config  # the job's fields, named as the options
    for split in (args.tune_split, args.split):
        if not path_exists(split_path(args.data, split), want_dir=True):
            raise UsageError(f"{split_path(args.data, split)}: no {split} split")
    # Load once here: a wrong or damaged folder fails with its name, not inside every actor.
    (name,) = load_method(args.method, args.checkpoint, args.checkpoint2,
                          settings=config.baselines).names
    if args.method in (DPM_CG, IGCONDA, IGCONDA_CONTROL):
        # Diffusion models know only slices made as their training data were (the baselines'
        # checkpoints record no preprocessing to compare with).
        problem = check_data_for_checkpoint(
            args.data, args.checkpoint2 if args.method == DPM_CG else args.checkpoint)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    output = Path(args.output)
    (output / RUN_RECORD).unlink(missing_ok=True)  # re-scoring: not finished until logged again
    output.mkdir(parents=True, exist_ok=True)
    init_ray(args.address, verbose=args.verbose)  # quiet unless --verbose: ray_jobs.console
    # On a multi-node cluster every node's actors must see the data and checkpoints as here.
    preflight(data=args.data, checkpoints={"--checkpoint": args.checkpoint,
                                           "--checkpoint2": args.checkpoint2})

    # What is scored, taken before scoring: the record names these contents, not what a
    # retraining might have left in the same folders by the time the run is logged.
    inputs = score_inputs(args)
    started = time.perf_counter()
    tau, tune_dice, per_slice = score_and_calibrate(args)
    summary = write_method_scores(per_slice, output)
    print(f"{args.method}: {len(per_slice)} slices scored in {time.perf_counter() - started:.1f} s; "
          f"wrote {output / SCORES_FILE} and {output / SUMMARY_FILE}", flush=True)

    metrics = run_metrics(summary)
    params = {"method": name, "score_method": args.method,
              "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else "",
              "checkpoint2": str(Path(args.checkpoint2).resolve()) if args.checkpoint2 else "",
              "tuned": str(args.tuned or ""),
              "split": args.split, "tune_split": args.tune_split, "tau": tau,
              "tune_dice_at_tau": tune_dice, "data": str(args.data),
              **{k: v for k, v in config.flat().items() if k.startswith("baselines.")}}
    uri = tracking.resolve_tracking_uri(args.tracking_uri or config.tracking.tracking_uri, output)
    run_id = None
    data_version = inputs["data_version"]
    with tracking.outage_tolerant("logging the scoring run", uri, on_disk=str(output)):
        with tracking.start_run(uri, args.experiment or config.tracking.experiment,
                                f"score-{name}" + (f"-{args.variant}" if args.variant else ""),
                                tags=tracking.method_run_tags("score", name, args.variant,
                                                              data_version),
                                parent_run_id=args.parent_run_id) as run_id:
            tracking.log_params(params)
            tracking.log_metrics({**metrics, "tau": tau, "n_slices": float(len(per_slice))})
            tracking.log_artifact(output / SCORES_FILE, "scores")
            tracking.log_artifact(output / SUMMARY_FILE, "scores")
    print(f"{name}: MLflow run {run_id or 'not logged'}", flush=True)
    if run_id:
        record = {"run_id": run_id, "method": name, "variant": args.variant,
                  "data_version": data_version, "tracking_uri": uri, "inputs": inputs}
        atomic_write(output / RUN_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2)),
                     suffix=".tmp")
    return {"tau": tau, "summary": summary, "run_id": run_id, "output": output}


def execute(build: Callable[[], ScoreRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, its errors reported as the command line
    reports them; the job's exit status (the comparison study scores through this)."""
    try:
        run(build())
    except (ConfigError, UsageError, CheckpointError, FileNotFoundError, PreprocessMismatch,
            SharedStorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: score_request(args))


if __name__ == "__main__":
    sys.exit(main())
