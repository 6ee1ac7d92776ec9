"""Batch inference on every test cohort: counterfactuals, anomaly maps, metrics, tables, 3D maps.

Ray Data reads the split's Parquet slices and runs
:class:`igconda.inference.CounterfactualPredictor` with ``map_batches`` (one actor per GPU or CPU
slot; the model is loaded once per actor). Each patient's file is written atomically as soon as
all its slices are in (:func:`predict_patients`), so a crashed or interrupted run
loses at most the patients in flight: re-running the same command skips every patient whose
output is complete *and* was made with the same checkpoint, D, w, s, map kind and τ from the same
input slice file (its digest), and computes only the rest; outputs of patients no longer in the
split are removed. Every slice is then in exactly one output row.

Each slice's guided (x̂_w) and unguided (x̂_∅) decodes of the same encoding are stored, so every
map kind, the w = 0 control and the baselines are scored afterwards, on the driver, through
:mod:`igconda.evaluation` (:mod:`ray_jobs.infer_outputs`), with Dice at each method's threshold τ
calibrated on the tune split (``--tuned best.json``) beside ⌈DSC⌉.

Stale results are recognised by the settings stamped into each file (including a digest of the
checkpoint's weights and one of the patient's input slices; :mod:`ray_jobs.infer_patients`), so
changing D or retraining into the same folder recomputes everything, and re-preprocessed data
recomputes the patients whose slices changed.

Run (local Ray, local MLflow store ``OUT/mlflow.db`` with artifacts in ``OUT/mlartifacts``)::

    python -m ray_jobs.infer --checkpoint runs/train/best --data runs/data --output runs/infer \\
        --tuned runs/tune/best.json

or on a cluster::

    ray job submit --working-dir . -- python -m ray_jobs.infer --checkpoint s3://… --data … \\
        --output … --config configs/paper.yaml

Settings, highest precedence first (:mod:`ray_jobs.infer_config`): command-line flags,
``--tuned best.json`` (D, w, map kind and the τ's from ``ray_jobs.tune``), ``--config`` (its
``infer`` and ``tracking`` sections), the checkpoint's own config. The console shows one bar over
the slices to predict (ETA, patients written; :mod:`ray_jobs.console`, ``--verbose`` for Ray's
own logs). Outputs under ``--output``::

    slices/<patient_id>.parquet         per-slice predictions (igconda.data.schema.PREDICTION_SCHEMA)
    tables/per_cohort.{csv,md}          the chosen IgCONDA map, paper Table-1 format + Dice@τ
    tables/baselines_per_cohort.{csv,md}  the paper's map, the other map kinds, the w = 0 control,
                                        41 % SUVmax thresholding and raw intensity, same slices
    tables/methods.{csv,md}             all methods, one ``method`` column
    tables/per_slice_metrics.csv        every unhealthy slice's metrics, every method (SCORE_SCHEMA)
    figures/qualitative_<cohort>.png    PET, mask, counterfactual, map, binarised map (Fig. 2/3)
    figures/lesion_size.png             ⌈DSC⌉ against lesion size (Fig. 4/6)
    volumes/<patient_id>_anomaly.nii.gz anomaly map on the original scan's grid and affine
    summary.json                        settings, counts, timings
    mlflow_run.json                     the MLflow run it logged to (for ray_jobs.relog)

Data preprocessed with other slice settings than the checkpoint's training data (its
``dataset.json`` against the checkpoint's ``config.yaml``, :mod:`igconda.data.compat`) are
refused before any work (exit status 2); data without ``dataset.json`` are run with a warning.

The predictions never reach the driver (:func:`predict_patients`: the actors write per-patient
parts, Ray tasks merge them), so its memory does not grow with the cohort; it writes the rest.
Every node must therefore see ``--output``, ``--data`` and ``--checkpoint``; on a multi-node
cluster the job checks all three before predicting (:mod:`ray_jobs.shared_storage`, exit 2).

Everything is also logged to MLflow (params D, w, s, map kind, τ's; metrics
``<method>/<cohort>/<metric>_mean``, ``dice_tau`` included; tables, figures and volumes as
artifacts), after every output is on disk: if the tracking server is down the job warns, exits
0, and ``python -m ray_jobs.relog --infer OUTPUT`` logs the run later.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP, non_negative_float, positive_int
from igconda.config import StudyConfig
from igconda.data.compat import PreprocessMismatch, check_data_for_checkpoint
from igconda.data.io import InferOutput
from igconda.data.schema import SPLITS
from igconda.map_kinds import MAP_KINDS
from igconda.progress import progress
from igconda.train_loop import dataset_version
from ray_jobs.console import add_verbose_flag, configure, init_ray
from ray_jobs.infer_config import (  # noqa: F401  (re-exported, as below)
    InferRequest,
    actor_cpu_warning,
    infer_request,
    resolve_config,
    resolve_request,
)
from ray_jobs.infer_outputs import (  # noqa: F401  (re-exported for callers of the job module)
    export_volumes,
    log_infer_run,
    make_figures,
    write_tables,
    write_text,
)
from ray_jobs.infer_patients import (  # noqa: F401  (re-exported for callers of the job module)
    SETTINGS_KEY,
    InferError,
    InferSettings,
    PartWriter,
    check_has_unhealthy,
    input_digest,
    list_patients,
    merge_parts,
    output_is_complete,
    prune_outputs,
    weights_digest,
    write_patient,
)
from ray_jobs.infer_scores import score_patients
from ray_jobs.shared_storage import SharedStorageError, preflight

logger = logging.getLogger("ray_jobs.infer")

#: Input columns the predictor needs (``pet_path``/``geometry`` stay on the driver).
PREDICTOR_INPUT = ("patient_id", "cohort", "tracer", "role", "slice_index", "num_slices", "label",
                   "height", "width", "image", "mask", "lesion_pixels")


@dataclass
class InferResult:
    """What a run did (returned by :func:`run` for callers and tests)."""

    output: Path
    settings: InferSettings
    computed: list[str] = field(default_factory=list)  # patients predicted in this run
    skipped: list[str] = field(default_factory=list)   # complete outputs found and kept
    figure_errors: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)   # outputs of patients no longer in the split
    rescored: list[str] = field(default_factory=list)  # patients scored (not reused) in this run
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
    p.add_argument("--tuned", help="best.json from ray_jobs.tune (D, w, map kind, thresholds)")
    p.add_argument("--noise-level", type=positive_int, help="D, training-timestep units")
    p.add_argument("--guidance-scale", type=float, help="w (eps_u + w (eps_c - eps_u))")
    p.add_argument("--stride", type=positive_int, help="s, a divisor of D")
    p.add_argument("--map", dest="map_kind", choices=MAP_KINDS, default=None,
                   help="anomaly map kind (default: tuned, else infer.map_kind); every kind and "
                        "the w = 0 control are scored either way")
    p.add_argument("--threshold", type=float, default=None,
                   help="τ of the chosen map's lesion mask (default: tuned, else infer.threshold)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split to run on")
    p.add_argument("--batch-size", type=positive_int, help="slices per predictor call")
    p.add_argument("--concurrency", type=positive_int, help="predictor actors")
    p.add_argument("--num-gpus", type=non_negative_float, help="GPUs per actor (fractions share a GPU)")
    p.add_argument("--device", default=None, help="torch device inside actors (default: auto)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--parent-run-id", default=None, help="nest the MLflow run under this run")
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    p.add_argument("--no-volumes", action="store_true", help="skip the 3D NIfTI export")
    p.add_argument("--log-slices", action="store_true",
                   help="also upload the per-slice Parquet files to MLflow (large on real data)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def predict_patients(files: dict[str, Path], expected: dict[str, int], config: StudyConfig,
                     settings: InferSettings, out_dir: InferOutput, device: str | None,
                     digests: dict[str, str]) -> list[str]:
    """Run the predictor over the given patients with Ray Data; write each patient when complete,
    stamped with ``settings`` and its input's digest (``digests``, :func:`input_digest`).

    The predictions stay in the workers: each predictor actor writes its batch's rows as one part
    file per patient under ``out_dir/.parts`` (:class:`~ray_jobs.infer_patients.PartWriter`)
    and returns only a small record per part (patient id, slice count, path). The driver counts
    each patient's slices from those records and, once all are in, has a Ray task merge the
    parts into the patient's file (:func:`finish_patient`). So the driver's memory does not grow
    with the cohort, and a killed run loses at most the patients in flight (their parts are
    removed by the next run).

    Returns:
        Patient ids written, in completion order.
    """
    import ray

    i = config.infer
    problem = actor_cpu_warning(i.concurrency, i.num_cpus_per_actor,
                                float(ray.cluster_resources().get("CPU", 0.0)))
    if problem:
        logger.warning(problem)
    # Absolute: the actors and merge tasks resolve paths in their own working directory (with
    # `ray job submit --working-dir`, a copy of the code, not the driver's).
    out_dir = InferOutput(out_dir.root.absolute())
    parts = out_dir.parts
    shutil.rmtree(parts, ignore_errors=True)  # a killed run's parts of unfinished patients
    ds = ray.data.read_parquet([str(f) for f in files.values()]).select_columns(list(PREDICTOR_INPUT))
    # Ray Data's Parquet reader puts many small patient files into one block (the whole demo
    # cohort in one): cut it into blocks of a batch, so that each actor task is one batch and
    # its records, hence finished patients, reach the driver as they are made, not at the end.
    ds = ds.repartition(target_num_rows_per_block=i.batch_size)
    ds = ds.map_batches(
        PartWriter,
        fn_constructor_kwargs={"parts": str(parts), "torch_threads": i.torch_threads,
                               "checkpoint": settings.checkpoint, "noise_level": settings.noise_level,
                               "guidance_scale": settings.guidance_scale, "stride": settings.stride,
                               "map_kind": settings.map_kind, "threshold": settings.threshold,
                               "device": device, "amp": i.use_amp, "keep_inputs": True,
                               # GPU paths (igconda.accel): compiled network, CUDA graphs, and a
                               # per-actor batch cut to infer.memory_fraction of free GPU memory.
                               "compile": i.compile, "cuda_graphs": i.cuda_graphs,
                               "memory_fraction": i.memory_fraction, "batch_size": i.batch_size,
                               # Scored on the driver, every method through one path.
                               "score": False},
        batch_size=i.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=i.concurrency),
        num_gpus=i.num_gpus_per_actor, num_cpus=i.num_cpus_per_actor,
    )
    pending: dict[str, list[str]] = defaultdict(list)  # patient -> its parts so far
    counts: dict[str, int] = defaultdict(int)
    written: list[str] = []
    bar = progress(sum(expected[p] for p in files), "infer", "slice")
    with bar:
        for records in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for pid, n, part in zip(records["patient_id"], records["slices"], records["part"],
                                    strict=True):
                pid = str(pid)
                pending[pid].append(str(part))
                counts[pid] += int(n)
                if counts[pid] > expected[pid]:
                    raise InferError(f"patient {pid}: got {counts[pid]} slices, "
                                     f"expected {expected[pid]}")
                if counts[pid] == expected[pid]:
                    finish_patient(pending.pop(pid), out_dir.prediction(pid), expected[pid],
                                   settings, digests[pid])
                    written.append(pid)
                    bar.set_postfix_str(f"{len(written)}/{len(files)} patients written",
                                        refresh=False)
                bar.update(int(n))
    if pending:
        raise InferError(f"incomplete results for patients {sorted(pending)}")
    shutil.rmtree(parts, ignore_errors=True)
    return written


def finish_patient(parts: list[str], path: Path, expected_rows: int, settings: InferSettings,
                   data_digest: str) -> None:
    """Merge a complete patient's parts into its prediction file in a Ray task
    (:func:`~ray_jobs.infer_patients.merge_parts`), and wait for it: the patient is written when
    this returns. Zero CPUs: the task only reads and writes files, and must not wait behind the
    predictor actors and Parquet readers that hold every CPU."""
    import ray

    ray.get(_merge_task().remote(parts, path, expected_rows, settings, data_digest))


@functools.cache
def _merge_task() -> Any:
    import ray

    return ray.remote(merge_parts).options(num_cpus=0)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def run(request: InferRequest) -> InferResult:
    """The whole job (see the module docstring) as ``request`` says (its settings resolved once,
    :func:`ray_jobs.infer_config.resolve_request`); Ray is started here if it is not running."""
    config, settings = request.config, request.settings
    data, output = Path(request.data), Path(request.output)
    # Slices made otherwise than the checkpoint's training data are refused before any work
    # (the request's config carries the checkpoint's preprocess section: not read again).
    try:
        problem = check_data_for_checkpoint(data, request.checkpoint, config=config)
    except PreprocessMismatch as err:
        raise InferError(str(err)) from None
    if problem:
        logger.warning(problem)  # on the console and in the log file (ray_jobs.console)
    inputs = list_patients(data, request.split)
    check_has_unhealthy(inputs, request.split)
    layout = InferOutput(output)
    expected = {pid: pq.read_metadata(f).num_rows for pid, f in inputs.items()}
    digests = {pid: input_digest(f) for pid, f in inputs.items()}
    todo = {pid: f for pid, f in inputs.items()
            if not output_is_complete(layout.prediction(pid), expected[pid], settings,
                                      digests[pid])}
    result = InferResult(output, settings, skipped=sorted(set(inputs) - set(todo)))
    # Outputs of patients no longer in the split (data re-preprocessed into the same folder)
    # would otherwise stay beside the new ones and be read by the report as results.
    result.removed = prune_outputs(output, set(inputs))
    if result.removed:
        print(f"infer: removed {len(result.removed)} output(s) of patients no longer in split "
              f"'{request.split}': {', '.join(result.removed)}", flush=True)
    print(f"infer: {len(inputs)} patients in split '{request.split}' ({sum(expected.values())} slices); "
          f"D={settings.noise_level} w={settings.guidance_scale:g} s={settings.stride} "
          f"map={settings.map_kind} τ={settings.threshold:g}; {len(result.skipped)} already "
          f"complete, {len(todo)} to run",
          flush=True)
    timings = {}
    started = time.perf_counter()
    if todo:
        init_ray(request.address)
        # The actors write their parts under --output (the driver's merge tasks read them
        # anywhere), load the checkpoint, and Ray Data's readers read --data, each on its own
        # node: those are what every node must see.
        preflight(outputs={"the inference's --output (the actors write slices/ there)": output},
                  data=data,
                  checkpoints={"--checkpoint": settings.checkpoint})
        result.computed = predict_patients(todo, expected, config, settings, layout,
                                           request.device, digests)
    timings["predict_s"] = time.perf_counter() - started
    slice_files = {pid: layout.prediction(pid) for pid in inputs}

    # Each patient is scored once per prediction, τ's and scoring code (ray_jobs.infer_scores);
    # the tables are rebuilt from every patient's scores.
    t0 = time.perf_counter()
    scored, result.rescored = score_patients(slice_files, inputs, settings.thresholds, layout)
    if not scored:
        raise InferError(f"split '{request.split}' has no unhealthy slice to score")
    per_slice = pd.concat(scored, ignore_index=True)
    write_tables(per_slice, layout, settings.method)
    timings["score_s"] = time.perf_counter() - t0
    print((layout.tables / "methods.md").read_text(), flush=True)

    t0 = time.perf_counter()
    result.figure_errors = make_figures(slice_files, per_slice, layout.figures,
                                        settings.method)
    for name, problem in result.figure_errors.items():
        print(f"    warning: figure {name} not made: {problem}", flush=True)
    timings["figures_s"] = time.perf_counter() - t0
    n_volumes = 0
    if not request.no_volumes:
        t0 = time.perf_counter()
        n_volumes = export_volumes(slice_files, inputs, layout)
        timings["volumes_s"] = time.perf_counter() - t0
        print(f"    wrote {n_volumes} anomaly volume(s) to {layout.volumes}", flush=True)

    data_version = dataset_version(str(data))
    summary = {"settings": settings.as_dict(), "thresholds": settings.thresholds,
               "chosen_method": settings.method, "split": request.split, "data": str(data.resolve()),
               "data_version": data_version, "removed": result.removed,
               "batch_size": config.infer.batch_size, "concurrency": config.infer.concurrency,
               "patients": len(inputs), "computed": result.computed, "skipped": result.skipped,
               "rescored": result.rescored,
               "slices": int(sum(expected.values())), "figure_errors": result.figure_errors,
               "timings": timings}
    write_text(layout.summary, json.dumps(summary, indent=2))

    uri = tracking.resolve_tracking_uri(request.tracking_uri or config.tracking.tracking_uri, output)
    # Everything is on disk by now: a tracking outage costs the MLflow run, never the results.
    with tracking.outage_tolerant("logging the inference run", uri, on_disk=str(output),
                                  relog=f"--infer {output}") as logged:
        with tracking.start_run(uri, request.experiment or config.tracking.experiment, "infer",
                                tags={"igconda.stage": "infer"},
                                parent_run_id=request.parent_run_id) as run_id:
            result.run_id = run_id
            log_infer_run(output, summary, volumes=not request.no_volumes, slices=request.log_slices)
    # A run the server lost mid-way is named by the warning and in mlflow_run.json, not here.
    print(f"infer: done; outputs in {output} "
          f"(MLflow run {result.run_id if logged['ok'] else 'not logged'})",
          flush=True)
    return result


def execute(build: Callable[[], InferRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, its errors reported as the command line
    reports them; the job's exit status (the pipeline runs its infer stage through this)."""
    try:
        run(build())
    except (InferError, SharedStorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure(verbose=args.verbose)
    return execute(lambda: infer_request(args))


if __name__ == "__main__":
    sys.exit(main())
