"""The steps a study's stages share, used by the pipeline (:mod:`ray_jobs.pipeline`) and the
method comparison (:mod:`ray_jobs.comparison_study`): where each stage writes
(:class:`igconda.data.io.StudyLayout`), running a stage in-process on its request (:func:`run_stage`: the
stage's typed request, built from the study's loaded config, no argv), a training that resumes
or starts afresh (:func:`run_training`, on a :func:`training_request`), and the study's model
folder (:func:`write_study_model`). The comparison study runs its baselines, scorings, tables
and data step (the pipeline itself) through :func:`run_stage` as well.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igconda.config import StudyConfig
from igconda.data.study_layout import StudyLayout

if TYPE_CHECKING:
    from ray_jobs.train import TrainRequest

#: A study's stages, in the order they run; each reads the output of the one before it.
STAGES = ("cohorts", "preprocess", "train", "tune", "model", "infer", "report")


def discard(folder: Path) -> None:
    """Remove a stage's folder; renamed aside first, so that a kill half-way through the delete
    never leaves a half-deleted folder that looks like an interrupted run to resume."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.discarded-{uuid.uuid4().hex[:8]}")
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def train_plan(paths: StudyLayout, forced: bool) -> str:
    """How the pipeline runs its train stage: ``"skip"`` (a finished ``train/best`` exists and
    the stage is not forced), ``"fresh"`` (forced, or nothing there yet) or ``"resume"`` (a
    Ray Train run with checkpoints but no finished best: an interrupted training)."""
    from ray_jobs.train import default_storage_path, has_run

    if forced:
        return "fresh"
    if paths.done_mark("train").is_file():
        return "skip"
    return "resume" if has_run(default_storage_path(paths.train)) else "fresh"


def local_torch_threads(num_workers: int, *, use_gpu: bool, local: bool) -> int | None:
    """Intra-op threads per training worker the study asks for (None: the job's default).

    On a local CPU machine each worker gets every core as intra-op threads: Ray would
    otherwise cap torch at the worker's CPU reservation (below one CPU on 2 cores).
    """
    if local and not use_gpu:
        return max(1, (os.cpu_count() or 1) // num_workers)
    return None


def training_request(data: Path, output: Path, config: StudyConfig, config_file: str | Path, *,
                     num_workers: int, use_gpu: bool, local: bool, **job: Any) -> TrainRequest:
    """The request of a study's training (:func:`ray_jobs.train.resolve_request`) on the study's
    loaded ``config`` (``config_file`` only names it); ``job``: tracking and Ray fields."""
    from ray_jobs.train import resolve_request

    return resolve_request(data, output, config, num_workers=num_workers, use_gpu=use_gpu,
                           config_file=str(config_file),
                           torch_threads=local_torch_threads(num_workers, use_gpu=use_gpu,
                                                             local=local), **job)


def run_training(paths: StudyLayout, request: TrainRequest, *, forced: bool = False) -> None:
    """Run ``ray_jobs.train`` on ``request`` (into ``paths.train``) as :func:`train_plan` says:
    nothing when a finished ``best`` is there, ``resume`` an interrupted run, else train from
    scratch (discarding what an earlier run left)."""
    from ray_jobs.train import default_storage_path, latest_checkpoint

    plan = train_plan(paths, forced=forced)
    if plan == "skip":
        print(f"    train: {paths.best_checkpoint} found, skipping", flush=True)
        return
    if plan == "resume":
        latest = latest_checkpoint(default_storage_path(paths.train))
        print(f"    train: resuming the interrupted training in {paths.train} from its "
              f"latest checkpoint ({latest.name if latest else 'as Ray Train recorded it'})",
              flush=True)
        run_stage("train", lambda: dataclasses.replace(request, resume=True))
        return
    if paths.train.exists():
        # Forced (or a folder without a run): the old checkpoints, best/ and MLflow
        # record must go, or the train job would refuse the existing run.
        print(f"    train: discarding the previous training in {paths.train} and "
              "training from scratch", flush=True)
        discard(paths.train)
    run_stage("train", lambda: request)


def write_study_model(paths: StudyLayout, config: StudyConfig, config_file: str, *,
                      tuned: bool = True) -> Path:
    """The study's model folder: ``train/best`` and the settings tuning chose for it
    (``tune/best.json``), or the config's untuned ``infer`` defaults (``tuned`` False or no
    tuning result); :mod:`igconda.tuned_model`."""
    from igconda.tuned_model import tuned_settings, write_model_folder
    from tuning.results import read_best

    best = read_best(paths.tuned) if tuned and paths.tuned.is_file() else None
    source = {"checkpoint": str(paths.best_checkpoint), "config": str(config_file),
              "tuning": str(paths.tuned) if best else "none: infer defaults of the config",
              "tune_mlflow_run_id": (best or {}).get("mlflow_run_id")}
    settings = tuned_settings(best, config.infer, source)
    write_model_folder(paths.best_checkpoint, settings, paths.model)
    state = "tuned" if best else "UNTUNED (tuning skipped)"
    print(f"    model: {paths.model} ({state}: D={settings['noise_level']} "
          f"w={settings['guidance_scale']:g} s={settings['stride']} "
          f"map={settings['map_kind']} τ={settings['threshold']:g})", flush=True)
    return paths.model


def run_stage(name: str, build: Callable[[], Any]) -> None:
    """Run job ``ray_jobs.<name>`` in this process (sharing its Ray runtime) on the request
    ``build`` returns (the stage's resolver on the study's loaded config: no argv, no file
    parsed again), its errors reported as its command line reports them
    (``ray_jobs.<name>.execute``).

    Raises:
        SystemExit: the stage failed (its exit status, as its command line would end).
    """
    job = importlib.import_module(f"ray_jobs.{name}")
    code = job.execute(build)
    if code:
        raise SystemExit(f"stage {name!r} failed with exit code {code}")

