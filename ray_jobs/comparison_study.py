"""The paper's whole comparison in one command: every method trained on one study's Parquet
splits through Ray Train, scored by the same batch scoring, then Tables 1–4 and Figs. 4 and 6
built from the runs in MLflow.

Run it on the built-in phantoms (CPU-sized: ``configs/comparison.yaml``) or on your cohorts::

    python -m ray_jobs.comparison_study --config configs/comparison.yaml --output runs/comparison
    python -m ray_jobs.comparison_study --config configs/comparison.yaml \\
        --manifest cohorts/manifest.csv --output runs/mycomparison

What it runs, in order, each step skipped when its finished output is there and was made with
this run's settings (so a rerun resumes; an interrupted training continues from its latest
checkpoint; a training, tuning or model made with other settings or data is discarded and made
again, with what changed printed: ``ray_jobs.stage_records``, ``<output>/stages.json``)::

    1. data        the study pipeline's cohorts + preprocess stages       <output>/cohorts, data
    2. IgCONDA     per --variants V (model.attention = V, nothing else    <output>/igconda_V/
                   changed): train, tune (D, w, map kind), model folder    train, tune, model
    3. baselines   ray_jobs.train_baseline per method; DPM + CG: the       <output>/baselines/<m>
                   unconditional DPM (ray_jobs.train, model.conditioning
                   none), its noisy classifier (dpm_classifier) and its
                   (D, scale) tuned on the tune split (ray_jobs.tune
                   --method dpm_cg; baselines.dpm_cg_noise_levels/_scales)
    4. scores      ray_jobs.score_method per method (τ calibrated on the   <output>/scores/<m>
                   tune split, every unhealthy test slice scored, one
                   MLflow run each): each variant's tuned map and its
                   w = 0 control, 41 % SUVmax, raw intensity, baselines
    5. comparison  ray_jobs.compare: the score runs read back from MLflow  <output>/comparison

The study's config is read once, here; every job runs in this process on a typed request built
from it by that job's own resolver (:func:`ray_jobs.study_steps.run_stage`; the requests:
:mod:`ray_jobs.comparison_steps`), never on an argv. Every run goes to one MLflow experiment (``tracking`` section; store ``<output>/mlflow.db`` by
default) with the method-run tags of docs/CONTRACTS.md. A step that fails is reported and the
others go on; the comparison then covers the methods that were scored, and the exit status is 1.
Exit status 0 when every step succeeded, 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from igconda.argtypes import TRACKING_URI_HELP, positive_int
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.config_rules import UNCONDITIONED
from igconda.data.study_layout import StudyLayout, TuneOutput
from igconda.io_utils import atomic_write
from ray_jobs import stage_records
from ray_jobs.comparison_steps import Study
from ray_jobs.console import add_verbose_flag, init_ray
from ray_jobs.study_steps import (
    discard,
    run_stage,
    run_training,
    write_study_model,
)

#: The trained baselines, in the order they run (``dpm_cg`` trains the DPM and the classifier).
BASELINES = ("hirescam", "fanogan", "dpm_cg", "supervised")
#: The paper's attention variants of IgCONDA (one digit per UNet level, 1 = attention).
VARIANTS = ("000", "001", "011")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.comparison_study",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/comparison.yaml", help="study config YAML")
    p.add_argument("--output", required=True, help="comparison folder (created; reruns resume)")
    p.add_argument("--manifest", help="use these cohorts instead of generating phantoms")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="IgCONDA attention variants, comma-separated (default %(default)s)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"trained baselines, comma-separated, of {', '.join(BASELINES)} "
                        "(default all; '' for none)")
    p.add_argument("--num-workers", type=positive_int, default=None, help="training workers")
    p.add_argument("--use-gpu", action="store_true", help="train and score on GPUs")
    p.add_argument("--address", help="Ray address (default: start a local Ray)")
    add_verbose_flag(p)
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    return p.parse_args(argv)


def parse_choices(text: str, known: tuple[str, ...] | None, what: str) -> list[str]:
    """A comma-separated option as a list; unknown entries (``known``) are a usage error."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if known is not None and t not in known]
    if bad:
        raise ConfigError(f"unknown {what} {bad}; known: {', '.join(known or ())}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{what} listed twice in {text!r}")
    return items


def variant_config(config: StudyConfig, attention: str) -> StudyConfig:
    """The study with IgCONDA's attention levels set to ``attention``; ``StudyConfig.replace``
    validates, so a variant that does not fit the channels fails before anything trains."""
    return config.replace("model", attention=attention)


def igconda_variant(study: Study, attention: str) -> tuple[str, Path]:
    """Train, tune and write the model folder of one attention variant; the step's name and
    the model folder."""
    config = variant_config(study.config, attention)
    config_file = study.config_file(f"igconda_{attention}", config)
    paths = StudyLayout(study.root / f"igconda_{attention}")
    name = f"igconda_{attention}"

    def body() -> None:
        trained = study.fresh(f"train {name}", stage_records.section_settings(
            config, ("model", "train")), study.data_version, paths.train, paths.tune, paths.model)
        study.fresh(f"tune {name}", stage_records.section_settings(config, ("tune", "infer")),
                    trained, paths.tune, paths.model)
        run_training(paths, study.train_request(paths.train, config, config_file))
        if not paths.tuned.is_file():
            run_stage("tune", lambda: study.tune_request(paths.best_checkpoint, paths.tune, config))
        if not paths.done_mark("model").is_file():
            write_study_model(paths, config, str(config_file))

    study.step(name, body)
    return name, paths.model


def train_baseline(study: Study, method: str, keys: dict[str, str] | None = None
                   ) -> tuple[str, Path]:
    """Train one ``ray_jobs.train_baseline`` method into :meth:`Study.baseline_dir`; the step's
    name and the best checkpoint it leaves (``keys[method]``: the training's key, when given)."""
    from igconda import checkpoint as ckpt
    from ray_jobs.train_runs import default_storage_path, has_run

    output = study.baseline_dir(method)
    keys = {} if keys is None else keys
    name = f"train {method}"

    def body() -> None:
        keys[method] = study.fresh(name, stage_records.section_settings(
            study.config, ("train", "baselines")), study.data_version, output)
        if (output / ckpt.BEST_POINTER).is_file():
            print(f"    {output / ckpt.BEST_POINTER} found, skipping", flush=True)
            return
        resume = has_run(default_storage_path(output), method)
        if resume:
            print(f"    resuming the interrupted training in {output}", flush=True)
        elif output.exists():
            discard(output)
        run_stage("train_baseline", lambda: study.baseline_request(method, output, resume=resume))

    study.step(name, body)
    return name, output / ckpt.BEST_DIR


def score(study: Study, method: str, *, checkpoint: Path | None = None,
          checkpoint2: Path | None = None, variant: str = "", tuned: Path | None = None,
          needs: tuple[str, ...] = ()) -> None:
    """Score one method into ``scores/<method>[-<variant>]`` unless finished there (the study
    config's ``baselines`` section sets the scoring batch and the DPM + CG decoding)."""
    from ray_jobs.score_method import finished_run, score_inputs

    folder = study.scores_dir(f"{method}-{variant}" if variant else method)

    def body() -> None:
        request = study.score_request(method, folder, checkpoint=checkpoint,
                                      checkpoint2=checkpoint2, variant=variant, tuned=tuned)
        done = finished_run(folder, score_inputs(request))
        if done and done.get("tracking_uri") == study.tracking_uri:
            print(f"    scored already (MLflow run {done['run_id']}), skipping", flush=True)
            return
        run_stage("score_method", lambda: request)

    study.step(f"score {folder.name}", body, needs)


def dpm_classifier_guidance(study: Study) -> None:
    """DPM + classifier guidance: the unconditional DPM (IgCONDA's network and noise schedule
    without any class input, ``ray_jobs.train``), its noisy classifier, the (D, scale) search
    on the tune split (``ray_jobs.tune --method dpm_cg``, when the config has a grid), then the
    scoring at the chosen pair."""
    dpm = StudyLayout(study.baseline_dir("dpm"))
    dpm_settings = study.config.replace("model", conditioning=UNCONDITIONED)
    dpm_config = study.config_file("dpm", dpm_settings)
    keys: dict[str, str] = {}

    def train_dpm() -> None:
        keys["dpm"] = study.fresh("train dpm", stage_records.section_settings(
            dpm_settings, ("model", "train")), study.data_version, dpm.root)
        run_training(dpm, study.train_request(dpm.train, dpm_settings, dpm_config))

    study.step("train dpm", train_dpm)
    classifier, classifier_best = train_baseline(study, "dpm_classifier", keys)
    needs = ("train dpm", classifier)
    tuned = None
    if study.config.baselines.dpm_cg_noise_levels:
        tuned = TuneOutput(study.baseline_dir("tune_dpm_cg")).best

        def tune() -> None:
            study.fresh("tune dpm_cg", stage_records.section_settings(
                study.config, ("baselines", "infer")),
                f"{keys.get('dpm')}+{keys.get('dpm_classifier')}", tuned.parent)
            if tuned.is_file():
                print(f"    {tuned} found, skipping", flush=True)
                return
            run_stage("tune", lambda: study.tune_request(
                classifier_best, tuned.parent, study.config, method="dpm_cg",
                checkpoint2=dpm.best_checkpoint))

        study.step("tune dpm_cg", tune, needs)
        needs = (*needs, "tune dpm_cg")
    score(study, "dpm_cg", checkpoint=classifier_best, checkpoint2=dpm.best_checkpoint,
          tuned=tuned, needs=needs)


def run(study: Study, variants: list[str], baselines: list[str]) -> None:
    """Steps 1–5 of the module docstring."""
    from igconda.train_loop import dataset_version

    args = study.args
    base_config = study.config_file("study", study.config)  # = study.config_path

    def data() -> None:
        from ray_jobs.pipeline import PipelineRequest

        run_stage("pipeline", lambda: PipelineRequest(
            study.config, str(study.root), str(base_config), stop_after="preprocess",
            manifest=str(Path(args.manifest).resolve()) if args.manifest else None,
            **study.common))

    if not study.step("data", data):
        return
    study.data_version = dataset_version(str(study.data))
    for attention in variants:
        step, model = igconda_variant(study, attention)
        score(study, "igconda", checkpoint=model, variant=attention, needs=(step,))
        score(study, "igconda_control", checkpoint=model, variant=attention, needs=(step,))
    score(study, "threshold_41")
    score(study, "intensity")

    for method in baselines:
        if method == "dpm_cg":
            dpm_classifier_guidance(study)
            continue
        step, best = train_baseline(study, method)
        score(study, method, checkpoint=best, needs=(step,))

    def compare() -> None:
        from ray_jobs.compare import resolve_request

        run_stage("compare", lambda: resolve_request(
            study.comparison_dir, study.experiment, tracking_uri=study.tracking_uri,
            data_version=study.data_version))

    study.step("comparison", compare)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        variants = parse_choices(args.variants, None, "variants")
        baselines = parse_choices(args.baselines, BASELINES, "baselines")
        for attention in variants:
            variant_config(config, attention)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    study = Study(args, config)
    study.root.mkdir(parents=True, exist_ok=True)

    import ray

    started_here = not ray.is_initialized()
    init_ray(args.address, verbose=args.verbose)  # quiet unless --verbose: ray_jobs.console
    started = time.perf_counter()
    try:
        run(study, variants, baselines)
    finally:
        if started_here:
            ray.shutdown()
    total = time.perf_counter() - started
    record = {"timings_s": {**study.timings, "total": total}, "failed": study.failed,
              "variants": variants, "baselines": baselines, "config": str(args.config)}
    atomic_write(study.record_file,
                 lambda tmp: tmp.write_text(json.dumps(record, indent=2)), suffix=".tmp")
    print(f"\n==> comparison study finished in {total / 60:.1f} min", flush=True)
    print(f"    tables and figures: {study.root / 'comparison' / 'comparison.html'}")
    print(f"    MLflow:  mlflow ui --backend-store-uri {study.tracking_uri}")
    if study.failed:
        print("    FAILED steps:\n" + "\n".join(f"      {k}: {v}" for k, v in study.failed.items()),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
