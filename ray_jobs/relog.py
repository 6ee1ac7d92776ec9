"""Re-log a study's on-disk results to MLflow, e.g. once a tracking server that was down is back.

Every stage writes its results to disk before it logs them, and a tracking outage is only a
warning (:func:`igconda.tracking.outage_tolerant`). This command logs them afterwards, from the
files alone, with the same params, metrics and artifacts the stages log themselves::

    python -m ray_jobs.relog --output runs/demo                    # a whole study (pipeline layout)
    python -m ray_jobs.relog --infer runs/x/infer --tracking-uri http://mlflow:5000   # one stage

It opens one parent run ``relog-<name>`` (tag ``igconda.relogged``) with a child run per stage
found: ``train`` (the config as params, the per-epoch history kept in the latest checkpoint, the
best checkpoint), ``tune`` (``best.json``, one child per (D, w) from ``grid.csv``), ``model``
(the model folder as an MLflow pyfunc model; ``--register-model NAME`` registers it) and
``infer`` (``summary.json``, the tables, figures and volumes), and records the data folder as the
parent's input. Runs go to ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the study's
``mlflow.db``.

Runs an outage interrupted. A stage's own run, named in its folder's ``mlflow_run.json``, that
the server lost mid-way stays RUNNING there until this command runs against the same store:

- the training's run is completed as the job would have left it (the epochs it missed, from the
  checkpoints' history, each step once; the best checkpoint, its pointer and tags) and ends
  FINISHED, so that ``best_checkpoint.json``'s ``mlflow_run_id`` names a complete run;
- the inference's run (and its score runs still RUNNING) ends FAILED, tagged
  ``igconda.relogged_as`` with the re-logged run that now holds its results (re-logging into it
  would duplicate the score runs the comparison reads back).

Exit status: 0 when everything found was logged, 1 if the tracking store failed, 2 when there
is nothing to re-log.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP
from igconda.data.io import InferOutput
from igconda.data.study_layout import StudyLayout, TuneOutput, done_mark

STAGE_FOLDERS = ("train", "tune", "model", "infer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.relog", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="study folder (data/, train/, tune/, model/, infer/)")
    for stage in STAGE_FOLDERS:
        p.add_argument(f"--{stage}", help=f"the {stage} folder (default: <output>/{stage})")
    p.add_argument("--data", help="the data folder (default: <output>/data)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--experiment", default="igconda", help="MLflow experiment name")
    p.add_argument("--register-model", default=None, metavar="NAME",
                   help="register the model folder as a version of this MLflow model")
    return p.parse_args(argv)


def stage_folders(args: argparse.Namespace) -> dict[str, Path]:
    """``{stage: folder}`` of the stages whose finished results exist."""
    root = Path(args.output) if args.output else None
    found = {}
    for stage in (*STAGE_FOLDERS, "data"):
        given = getattr(args, stage)
        folder = Path(given) if given else (getattr(StudyLayout(root), stage) if root else None)
        done = done_mark(stage, folder) if folder is not None else None
        if done is not None and done.exists():
            found[stage] = folder
        elif given:
            raise FileNotFoundError(f"--{stage} {folder}: no {done.name} there")
    return found


def _history(train: Path) -> list[dict[str, Any]]:
    """The per-epoch history: from the latest checkpoint of the default storage when there is
    one (it has every epoch), else from the best checkpoint (up to its epoch)."""
    from igconda import checkpoint as ckpt
    from ray_jobs.train import default_storage_path, latest_checkpoint

    for folder in (latest_checkpoint(default_storage_path(train)), train / ckpt.BEST_DIR):
        if folder is not None and (folder / ckpt.STATE_FILE).is_file():
            return list((ckpt.load_train_state(folder) or {}).get("history", []))
    return []


def _epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The finite metrics of one epoch's history record (``epoch`` is the step, not a metric)."""
    return {k: float(v) for k, v in record.items() if k != "epoch"
            and isinstance(v, (int, float)) and math.isfinite(float(v))}


def log_train(train: Path, uri: str) -> None:
    """The training's config, history and best checkpoint, in the active run."""
    from igconda import checkpoint as ckpt
    from igconda.checkpoint import load_checkpoint_config

    best = train / ckpt.BEST_DIR
    tracking.log_params(load_checkpoint_config(best).flat())
    history = _history(train)
    for record in history:
        tracking.log_metrics(_epoch_metrics(record), step=int(record.get("epoch", 0)))
    if (train / ckpt.BEST_POINTER).is_file():
        pointer = ckpt.read_best_pointer(train)
        tracking.log_artifact(train / ckpt.BEST_POINTER)
        if pointer.get("valid_loss") is not None:
            tracking.log_metrics({"best/valid_loss": float(pointer["valid_loss"])},
                                 step=int(pointer.get("epoch") or 0))
    tracking.log_artifact(best, "best_checkpoint")
    _complete_interrupted_train_run(train, uri, history)


def _complete_interrupted_train_run(train: Path, uri: str, history: list[dict[str, Any]]) -> None:
    """The training's own run, if an outage left it RUNNING in this store: the epochs it missed
    (each step once), the best checkpoint as the job logs it, then FINISHED."""
    from igconda import checkpoint as ckpt
    from ray_jobs.train_tracking import finish_mlflow_run

    saved = tracking.read_run_record(train)
    if saved is None or saved.get("tracking_uri") != uri:
        return
    run_id = saved["run_id"]
    run = tracking.get_run(uri, run_id)
    if run["status"] != "RUNNING":
        return
    logger = tracking.RunLogger(uri, run_id)
    logged: dict[str, set[int]] = {}
    for record in history:
        step = int(record.get("epoch", 0))
        missing = {}
        for key, value in _epoch_metrics(record).items():
            if key not in logged:
                logged[key] = {s for s, _ in tracking.get_metric_history(uri, run_id, key)}
            if step not in logged[key]:
                missing[key] = value
        if missing:
            logger.log_metrics(missing, step=step)
    if "best_checkpoint.uri" not in run["tags"] and (train / ckpt.BEST_POINTER).is_file():
        finish_mlflow_run(uri, run_id, train, train / ckpt.BEST_DIR)
    tracking.end_run(uri, run_id, "FINISHED")
    print(f"relog: completed the training run {run_id} an outage left RUNNING", flush=True)


def _end_interrupted_infer_run(saved: dict[str, Any] | None, uri: str, relogged_as: str) -> None:
    """The inference's own run (``saved``: its record), if an outage left it RUNNING in this
    store: FAILED, pointing at the run that holds its results now."""
    if saved is None or saved.get("tracking_uri") != uri:
        return
    if tracking.end_interrupted_run(uri, saved["run_id"], "FAILED",
                                    {"igconda.relogged_as": relogged_as}):
        print(f"relog: ended the inference run {saved['run_id']} an outage left RUNNING as "
              f"FAILED (re-logged as {relogged_as})", flush=True)


def run(args: argparse.Namespace) -> dict[str, str]:
    """Re-log what :func:`stage_folders` finds; returns ``{stage: run id}``."""
    import pandas as pd

    from igconda.tracking.model import log_dataset, log_model_folder
    from ray_jobs.infer_outputs import log_infer_run
    from tuning.driver import log_tuning_run
    from tuning.results import read_best

    folders = stage_folders(args)
    stages = [s for s in STAGE_FOLDERS if s in folders]
    if not stages:
        raise FileNotFoundError("nothing to re-log: no finished train/, tune/, model/ or infer/ "
                                "folder (give --output STUDY or a stage folder)")
    root = Path(args.output) if args.output else folders[stages[0]].parent
    uri = tracking.resolve_tracking_uri(args.tracking_uri, root)
    runs: dict[str, str] = {}
    with tracking.start_run(uri, args.experiment, f"relog-{root.resolve().name}",
                            tags={"igconda.stage": "pipeline", "igconda.relogged": "true"}) as parent:
        runs["parent"] = parent
        if "data" in folders:
            log_dataset(folders["data"], "study")
        for stage in stages:
            folder = folders[stage]
            with tracking.start_run(uri, args.experiment, stage, parent_run_id=parent,
                                    tags={"igconda.stage": stage, "igconda.relogged": "true",
                                          "igconda.source": str(folder.resolve())}) as run_id:
                runs[stage] = run_id
                if stage == "train":
                    log_train(folder, uri)
                elif stage == "tune":
                    tuned = TuneOutput(folder)
                    log_tuning_run(folder, read_best(tuned.best), pd.read_csv(tuned.grid), uri,
                                   args.experiment)
                elif stage == "model":
                    log_model_folder(folder, registered_model_name=args.register_model)
                else:
                    summary = json.loads(InferOutput(folder).summary.read_text())
                    # Before log_infer_run, which records this run in the folder instead.
                    _end_interrupted_infer_run(tracking.read_run_record(folder), uri, run_id)
                    log_infer_run(folder, summary, volumes=InferOutput(folder).volumes.is_dir())
            print(f"relog: {stage} from {folder} -> MLflow run {run_id}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = run(args)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the store (or a file) failed: nothing to fall back on
        print(f"error: re-logging failed ({type(err).__name__}: {err}); the files are unchanged; "
              "if the tracking server is down, run the command again once it answers",
              file=sys.stderr)
        return 1
    print(f"relog: done; parent run {runs['parent']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
