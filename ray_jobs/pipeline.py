"""The whole IgCONDA-PET study in one command: cohorts → Parquet → training → (D, w, map kind)
tuning → the model folder → batch inference with baselines → report, under one MLflow parent run
with a child run per stage.

The study's product is ``<output>/model/``: the best checkpoint plus ``tuning.json`` (the tuned
D, w, stride, map kind and threshold τ, and where they came from; :mod:`igconda.tuned_model`),
which ``igconda detect --checkpoint <output>/model`` uses as is.

Run the demo study on the built-in synthetic cohorts (local Ray, local MLflow store)::

    python -m ray_jobs.pipeline --config configs/demo.yaml --output runs/demo

on your own cohorts (a manifest of PET/mask NIfTI files, see docs/data.md)::

    python -m ray_jobs.pipeline --config configs/demo.yaml --manifest cohorts/manifest.csv \
        --output runs/mystudy

or on a Ray cluster (see docs/cluster.md)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ray_jobs.pipeline --config configs/demo.yaml --output runs/demo

Every stage writes into its own folder under ``--output`` and is skipped when its finished
output is already there, so an interrupted study resumes where it stopped: an interrupted
preprocessing keeps every patient it finished (:mod:`igconda.data.build_resume`), an interrupted
training (checkpoints under ``train/ray_results`` but no ``train/best``) continues from its latest
checkpoint in the same MLflow run, an interrupted tuning keeps the trials Tune recorded as
finished (:mod:`tuning.experiment`), and inference keeps every patient already predicted.
A stage whose output was made with other settings (the config sections it reads, the manifest,
or a stage before it changed) is re-run with every stage after it, saying what changed
(:mod:`ray_jobs.stage_records`, ``<output>/stages.json``): a re-run never reuses a stale output.
``--force STAGE`` re-runs one stage and everything after it from scratch (``--force train``
discards the previous training's checkpoints); ``--stop-after STAGE`` stops once STAGE is done.

The study config is read once, here (:func:`pipeline_request`; the comparison study hands its
own loaded config to :func:`run` in a :class:`PipelineRequest` instead). Each stage runs in this process, on this Ray runtime,
through its ``run(request)`` (:func:`ray_jobs.study_steps.run_stage`): its typed request
(:class:`ray_jobs.preprocess.PreprocessRequest`, :class:`ray_jobs.train.TrainRequest`,
:class:`ray_jobs.tune.TuneRequest`, :class:`ray_jobs.infer_config.InferRequest`) is built from
the loaded config by the same resolver the stage's command line uses (which reads the
checkpoint's config and the tuned file once each), never as an argv parsed again. A stage's
failure is reported as its command line reports it and ends the study with its exit status.
Inference takes the config's whole ``infer`` and ``tracking`` sections over the checkpoint's
(the sections the stage records digest), where ``ray_jobs.infer --config`` takes the keys the
file sets.

The console shows each stage once with its progress; ``--verbose`` adds Ray's own logs, which
are always in Ray's session logs, and every log record of the driver goes to
``<output>/pipeline.log`` (:mod:`ray_jobs.console`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP, positive_int
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.data.study_layout import StudyLayout
from igconda.io_utils import atomic_write
from ray_jobs import console, stage_records
from ray_jobs.study_steps import (
    STAGES,
    run_stage,
    run_training,
    training_request,
    write_study_model,
)

SELF_LOGGING_STAGES = ("train", "tune", "infer")
#: The study's log: every driver-side log record (igconda's, Ray's, Ray Data's) at INFO and above.
LOG_FILE = "pipeline.log"


def _banner(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.pipeline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/demo.yaml", help="study config YAML")
    parser.add_argument("--output", required=True, help="study folder (created)")
    parser.add_argument("--manifest", help="use these cohorts instead of generating phantoms")
    parser.add_argument("--address", help="Ray address (default: start a local Ray)")
    parser.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    parser.add_argument("--experiment", default=None, help="MLflow experiment name")
    parser.add_argument("--num-workers", type=positive_int, default=None, help="training workers")
    parser.add_argument("--use-gpu", action="store_true", help="train and infer on GPUs")
    parser.add_argument("--force", choices=STAGES,
                        help="re-run this stage and all later ones from scratch (--force train "
                             "discards the previous training run)")
    parser.add_argument("--stop-after", choices=STAGES, default=None,
                        help="stop once this stage is done (e.g. train only)")
    parser.add_argument("--register-model", default=None, metavar="NAME",
                        help="register the study's model folder as a version of this MLflow model")
    parser.add_argument("--skip-tune", action="store_true",
                        help="use the config's infer.noise_level/guidance_scale instead of tuning")
    console.add_verbose_flag(parser)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class PipelineRequest:
    """What one study runs with: the loaded study ``config`` (``config_file`` names it in
    records and messages) and the command line's other options by their names."""

    config: StudyConfig
    output: str
    config_file: str
    manifest: str | None = None
    address: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    num_workers: int | None = None
    use_gpu: bool = False
    force: str | None = None
    stop_after: str | None = None
    register_model: str | None = None
    skip_tune: bool = False
    verbose: bool | None = None


def pipeline_request(args: argparse.Namespace) -> PipelineRequest:
    """The request of a ``ray_jobs.pipeline`` command line; its ``--config`` parsed once here.

    Raises:
        ConfigError: an unreadable or invalid config, naming the file.
    """
    options = {f.name: getattr(args, f.name) for f in fields(PipelineRequest)
               if f.name not in ("config", "config_file")}
    return PipelineRequest(config=load_config(args.config), config_file=args.config, **options)


def execute(build: Callable[[], PipelineRequest]) -> int:
    """:func:`run` on the request ``build`` resolves; the study's exit status (2: a config
    error; a stage's failure ends it as that stage's command line ends). The comparison study
    runs its data step through this."""
    try:
        request = build()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(request)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: pipeline_request(args))


def run(request: PipelineRequest) -> int:
    """The study as ``request`` says (the module docstring's stages); its exit status.

    Raises:
        SystemExit: a stage failed (:func:`ray_jobs.study_steps.run_stage`).
    """
    args, config = request, request.config  # the study's fields, named as the options
    paths = StudyLayout(Path(args.output).resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking.resolve_tracking_uri(
        args.tracking_uri or config.tracking.tracking_uri, paths.root
    )
    experiment = args.experiment or config.tracking.experiment
    settings = stage_records.stage_settings(config, manifest=args.manifest, skip_tune=args.skip_tune)
    keys = stage_records.stage_keys(settings)
    try:
        records = stage_records.read_records(paths.root)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The first stage re-run from scratch: --force, or lowered to the first stale stage.
    first_forced = [STAGES.index(args.force) if args.force else len(STAGES)]
    last = STAGES.index(args.stop_after) if args.stop_after else len(STAGES) - 1

    def should_skip(stage: str, done: bool) -> bool:
        """Whether ``stage`` keeps its output; marks a stale stage (and those after it) forced."""
        index, recorded = STAGES.index(stage), records.get(stage)
        if recorded is None and done and index < first_forced[0]:
            print(f"    {stage}: no record of the settings its output was made with (made by an "
                  f"older igconda?); keeping it (use --force {stage} to re-run)")
            recorded = records[stage] = stage_records.record(paths.root, stage, keys[stage],
                                                             settings[stage], finished=True)
        if recorded is not None and recorded.get("key") != keys[stage] and index < first_forced[0]:
            print(f"    {stage}: its output was made with other settings "
                  f"({stage_records.describe_change(stage, recorded, settings[stage])}); "
                  "re-running it and the stages after it")
            first_forced[0] = index
        finished = done and recorded is not None and recorded.get("finished", False)
        if finished and index < first_forced[0]:
            print(f"    {stage}: output found, skipping (use --force {stage} to re-run)")
            return True
        return False

    # Each stage once with its progress; Ray's own logs with --verbose, and always on disk
    # (Ray's session logs, and every log record in <study>/pipeline.log): ray_jobs.console.
    console.configure(args.verbose, log_file=paths.root / LOG_FILE)
    console.init_ray(args.address)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def track(what: str) -> contextlib.AbstractContextManager:
        """Pipeline-level logging: a tracking outage is a warning (each stage's results are on
        disk, and ``python -m ray_jobs.relog --output STUDY`` logs them later)."""
        return tracking.outage_tolerant(what, tracking_uri, on_disk=str(paths.root),
                                        relog=f"--output {paths.root}")

    with contextlib.ExitStack() as study_run:
        parent_id = None
        with track("opening the study's parent run; the stages go on"):
            parent = tracking.start_run(tracking_uri, experiment, f"study-{paths.root.name}",
                                        tags={"igconda.stage": "pipeline"})
            parent_id = parent.__enter__()

            def end_parent(exc_type, exc, tb) -> bool:
                # Ends the run FINISHED, or FAILED while a stage's error propagates; a failure
                # to reach the server here is a warning, never the study's result.
                try:
                    parent.__exit__(exc_type, exc, tb)
                except Exception as err:
                    if err is not exc:
                        tracking.warn_outage("ending the study's parent run", tracking_uri, err,
                                             str(paths.root), f"--output {paths.root}")
                return False

            study_run.push(end_parent)
            tracking.log_params(config.flat())
            tracking.log_params({"pipeline.config_file": args.config_file,
                                 "pipeline.manifest": args.manifest or "synthetic phantoms"})
        # What every self-logging stage's request shares: its MLflow run goes under the study's.
        child = {"tracking_uri": tracking_uri, "experiment": experiment,
                 "parent_run_id": parent_id, "address": args.address}

        def stage(name: str, done: bool, body: Callable[[], None],
                  log: Callable[[], None] | None = None) -> None:
            """Run one stage unless done; then log it (``log``) in its own child run, unless
            the stage's job logs itself (``SELF_LOGGING_STAGES``)."""
            if STAGES.index(name) > last:
                return
            _banner(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}")
            if should_skip(name, done):
                return
            stage_records.record(paths.root, name, keys[name], settings[name], finished=False)
            t0 = time.perf_counter()
            body()  # a self-logging job opens its own child run under --parent-run-id
            timings[name] = time.perf_counter() - t0
            stage_records.record(paths.root, name, keys[name], settings[name], finished=True)
            # What this stage made is new: every later stage runs again on it.
            first_forced[0] = min(first_forced[0], STAGES.index(name) + 1)
            with track(f"logging stage {name}"):
                if name not in SELF_LOGGING_STAGES:
                    with tracking.start_run(tracking_uri, experiment, name, parent_run_id=parent_id,
                                            tags={"igconda.stage": name}):
                        if log is not None:
                            log()
                if parent_id:
                    tracking.log_metrics({f"time_s/{name}": timings[name]})
            print(f"    {name}: done in {timings[name]:.0f} s", flush=True)

        # 1. Cohorts: the user's manifest, or synthetic phantoms.
        manifest = Path(args.manifest).resolve() if args.manifest else paths.cohorts / "manifest.csv"

        def make_cohorts() -> None:
            if args.manifest:
                print(f"    cohorts: the manifest {manifest}")
                return
            from igconda.data.phantoms import generate_study

            generate_study(paths.cohorts, config.phantoms)

        if args.manifest and "cohorts" not in records:
            # The user's cohorts: nothing of the study's own to keep or to make; recorded so
            # that a changed manifest (or its files) re-runs everything after it.
            records["cohorts"] = stage_records.record(paths.root, "cohorts", keys["cohorts"],
                                                      settings["cohorts"], finished=True)
        stage("cohorts", args.manifest is not None or manifest.is_file(), make_cohorts)

        # 2. Preprocess to Parquet slices.
        def log_dataset() -> None:
            from igconda.tracking.model import log_dataset

            log_dataset(paths.data, "study")

        def preprocess() -> None:
            from ray_jobs.preprocess import PreprocessRequest

            run_stage("preprocess", lambda: PreprocessRequest(
                str(manifest), str(paths.data), config, address=args.address))

        stage("preprocess", paths.done_mark("data").is_file(), preprocess, log_dataset)

        # 3. Train.
        def train() -> None:
            request = training_request(paths.data, paths.train, config, args.config_file,
                                       num_workers=args.num_workers or config.train.num_workers,
                                       use_gpu=args.use_gpu, local=not args.address, **child)
            run_training(paths, request, forced=STAGES.index("train") >= first_forced[0])

        stage("train", paths.done_mark("train").is_file(), train)

        # 4. Tune (D, w) on the tune split.
        def tune() -> None:
            if args.skip_tune:
                print("    tuning skipped: using infer.noise_level / guidance_scale from the config")
                return
            from ray_jobs.tune import resolve_request

            run_stage("tune", lambda: resolve_request(paths.best_checkpoint, paths.data,
                                                      paths.tune, config=config, **child))

        stage("tune", args.skip_tune or paths.tuned.is_file(), tune)

        # 5. The model folder: the best checkpoint and the settings tuning chose for it.
        def model() -> None:
            write_study_model(paths, config, args.config_file, tuned=not args.skip_tune)

        def log_model() -> None:
            from igconda.tracking.model import log_model_folder

            # An MLflow pyfunc model: mlflow.pyfunc.load_model(...).predict(slices) runs it.
            log_model_folder(paths.model, registered_model_name=args.register_model)
            tracking.log_artifact(paths.done_mark("model"), "model_settings")  # tuning.json

        stage("model", paths.done_mark("model").is_file(), model, log_model)

        # 6. Batch inference on every test cohort, with the baselines scored by the same code.
        def infer() -> None:
            from ray_jobs.infer_config import config_sections, resolve_request

            tuned = paths.tuned if paths.tuned.is_file() and not args.skip_tune else None
            run_stage("infer", lambda: resolve_request(
                paths.best_checkpoint, paths.data, paths.infer, sections=config_sections(config),
                tuned=tuned, **child))

        stage("infer", paths.done_mark("infer").is_file(), infer)

        # 7. Report.
        def report() -> None:
            from igconda.report import build_study_report

            build_study_report(paths.root, paths.report)

        stage("report", False, report, lambda: tracking.log_artifact(paths.report, "report"))
        total = time.perf_counter() - started
        if args.stop_after:
            _banner(f"stopped after stage '{args.stop_after}' (--stop-after) in {total / 60:.1f} min")
            return 0
        text = json.dumps({**timings, "total": total}, indent=2)
        atomic_write(paths.root / "timings.json", lambda tmp: tmp.write_text(text), suffix=".tmp")
        if parent_id:
            with track("logging the study's total time"):
                tracking.log_metrics({"time_s/total": total})

    _banner(f"study finished in {total / 60:.1f} min")
    print(f"    report:  {paths.report}")
    print(f"    model:   {paths.model}  (igconda detect SCAN.nii.gz --checkpoint {paths.model} -o OUT.nii.gz)")
    print(f"    MLflow:  mlflow ui --backend-store-uri {tracking_uri}")
    print(f"    log:     {paths.root / LOG_FILE}  (each worker's: Ray's session logs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
