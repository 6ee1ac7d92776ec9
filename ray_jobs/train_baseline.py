"""Train a baseline of the paper's comparison with Ray Train (DDP over Ray Data shards).

One job for every trained baseline (``--method``): the ResNet-18 of ``hirescam``, the supervised
UNet (``supervised``), ``fanogan`` (WGAN-GP epochs, then encoder epochs) and the noisy
classifier of DPM + classifier guidance (``dpm_classifier``)::

    python -m ray_jobs.train_baseline --method hirescam --data runs/demo/data \\
        --output runs/demo/baselines/hirescam --config configs/demo.yaml [--epochs 20] \\
        [--num-workers 2] [--use-gpu] [--tracking-uri U] [--experiment E] [--parent-run-id P]

Continue an interrupted run (same ``--output``) from its latest checkpoint::

    python -m ray_jobs.train_baseline --method hirescam ... --resume [--epochs 30]

on the same ``--data``: a checkpoint trained on another dataset version (``data_version`` in its
``metadata.json``) is refused before Ray starts (exit status 2).

The settings (epochs, batch size, learning rates, widths) are the study config's ``baselines``
section (:mod:`igconda.baselines.settings`; ``--epochs`` overrides ``baselines.epochs``, for
f-AnoGAN the WGAN-GP stage's). Workers and GPUs are the ``train`` section's, as for IgCONDA.

**The unconditional DPM of ``dpm_cg``** is no baseline job of its own: it is the IgCONDA
training job on a config whose model has no class input. Write a copy of the study YAML with
``model: {conditioning: none}`` (everything else, the noise schedule above all, unchanged) and::

    python -m ray_jobs.train --data DATA --output <study>/baselines/dpm --config dpm.yaml

then score ``dpm_cg`` with ``--checkpoint <classifier>/best --checkpoint2 <study>/baselines/dpm/best``
(``python -m ray_jobs.score_method``).

What it writes under ``--output`` (as ``ray_jobs.train``)::

    ray_results/<method>/checkpoint_epoch_NNNNNN/   every epoch's checkpoint (the best few by
                                                    valid_loss and the latest are kept)
    best/                    the lowest validation loss (the method's checkpoint folder)
    best_checkpoint.json     its URI, epoch, valid_loss, MLflow run id
    mlflow_run.json          the MLflow run (reused by --resume); mlflow.db, mlartifacts/ by default

On a Ray cluster of more than one node, ``--output`` and ``--data`` must be the same for every
node (rank 0 writes the checkpoints there, every worker reads the data); the job refuses them
before it starts otherwise (:func:`ray_jobs.shared_storage.preflight`, exit status 2).

MLflow: one run in the study's experiment, tags ``igconda.stage`` = ``train_baseline``,
``igconda.method`` (the method it is scored as: ``dpm_cg`` for ``dpm_classifier``),
``igconda.train_method`` (``--method``), ``igconda.variant``, ``igconda.data_version``; params
``baselines.*`` and ``settings.*`` (the method's network settings); per-epoch metrics; the best
checkpoint as artifact ``best_checkpoint/``.

The command line is resolved into a :class:`BaselineRequest` (``--config`` parsed once) by
:func:`resolve_request`, the resolver the comparison study also builds its baselines with; it
runs them through :func:`execute` on that request, without an argv.

Exit status: 0 on success, 2 on a usage or config error, 1 if training failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igconda import checkpoint as ckpt
from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP, positive_float, positive_int
from igconda.baselines.trainers import (
    TRAINED_METHODS,
    check_resumable,
    method_settings,
    trainer_class,
)
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.data.io import (
    DatasetError,
    check_training_classes,
    filesystem,
    path_exists,
    split_path,
)
from igconda.data.schema import slice_shape_of
from igconda.evaluation import DPM_CG
from igconda.train_loop import dataset_version
from ray_jobs.console import add_verbose_flag, init_ray
from ray_jobs.shared_storage import SharedStorageError, preflight
from ray_jobs.train_baseline_worker import train_baseline_func
from ray_jobs.train_runs import (
    UsageError,
    check_resume,
    default_cpus_per_worker,
    default_storage_path,
    label_counts,
    oversample_unhealthy,
    read_splits,
    torch_trainer,
)
from ray_jobs.train_tracking import RUN_RECORD, create_or_reopen_run, fit_and_finish

#: The method each ``--method`` is scored as (``igconda.evaluation`` names).
SCORED_AS = {"hirescam": "hirescam", "supervised": "supervised", "fanogan": "fanogan",
             "dpm_classifier": DPM_CG}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train_baseline",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of {', '.join(TRAINED_METHODS)}")
    p.add_argument("--data", required=True, help="preprocessed dataset folder or URI (has slices/)")
    p.add_argument("--output", required=True, help="local/NFS folder for best/, records, MLflow store")
    p.add_argument("--config", default=None, help="study YAML (its baselines, train, tracking sections)")
    p.add_argument("--epochs", type=positive_int, default=None, help="override baselines.epochs")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--num-workers", type=positive_int, default=None,
                   help="DDP workers (default: train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=positive_float, default=None,
                   help="CPUs Ray reserves per worker (default: 1, less on a small machine)")
    p.add_argument("--torch-threads", type=positive_int, default=None,
                   help="intra-op threads per worker (default: max(1, cpus-per-worker))")
    p.add_argument("--keep-checkpoints", type=positive_int, default=3,
                   help="best checkpoints to keep by valid_loss (the latest is always kept)")
    p.add_argument("--variant", default="", help="free text tagged igconda.variant (default: empty)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--parent-run-id", default=None, help="nest the MLflow run under this run")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--address", default=None, help="Ray address (default: auto / start local Ray)")
    add_verbose_flag(p)
    return p.parse_args(argv)


@dataclass(frozen=True)
class BaselineRequest:
    """What one baseline training runs with, every setting resolved (:func:`resolve_request`).

    ``config`` has the command line's overrides applied (``--epochs``, ``--num-workers``,
    ``--use-gpu``); ``config_file`` only names where it came from. The other fields keep the
    command line's option names.
    """

    method: str
    data: str
    output: str
    config: StudyConfig
    config_file: str | None = None
    resume: bool = False
    cpus_per_worker: float | None = None
    torch_threads: int | None = None
    keep_checkpoints: int = 3
    variant: str = ""
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    no_tracking: bool = False
    address: str | None = None
    verbose: bool | None = None


def resolve_request(method: str, data: str | Path, output: str | Path, config: StudyConfig, *,
                    epochs: int | None = None, num_workers: int | None = None,
                    use_gpu: bool = False, **job: Any) -> BaselineRequest:
    """The one resolver of a baseline training's settings (the command line's and the
    comparison study's): the loaded study ``config`` with the overrides applied (validated);
    ``job``: the other :class:`BaselineRequest` fields.

    Raises:
        ConfigError: an unknown ``method`` or an invalid override.
    """
    trainer_class(method)  # an unknown --method fails first, naming the known ones
    if epochs is not None:
        config = config.replace("baselines", epochs=epochs)
    train: dict[str, Any] = {}
    if num_workers is not None:
        train["num_workers"] = num_workers
    if use_gpu:
        train["use_gpu"] = True
    config = config.replace("train", **train) if train else config
    return BaselineRequest(method, str(data), str(output), config, **job)


def baseline_request(args: argparse.Namespace) -> BaselineRequest:
    """The request of a ``ray_jobs.train_baseline`` command line; its ``--config`` parsed once.

    Raises:
        ConfigError: an unknown ``--method``, or an unreadable or invalid config (naming it).
    """
    trainer_class(args.method)  # before the config is read, as the job always refused it
    return resolve_request(
        args.method, args.data, args.output, load_config(args.config), epochs=args.epochs,
        num_workers=args.num_workers, use_gpu=args.use_gpu, config_file=args.config,
        resume=args.resume, cpus_per_worker=args.cpus_per_worker,
        torch_threads=args.torch_threads, keep_checkpoints=args.keep_checkpoints,
        variant=args.variant, tracking_uri=args.tracking_uri, experiment=args.experiment,
        parent_run_id=args.parent_run_id, no_tracking=args.no_tracking, address=args.address,
        verbose=args.verbose)


def initial_weights(config: StudyConfig, method: str) -> str:
    """Where the network's initial weights come from, for the run's ``igconda.init`` tag:
    ``pretrained:<file name>`` (``baselines.hirescam_weights``, a local ImageNet ResNet-18; its
    SHA-256 is stored with the checkpoint) or ``scratch``."""
    weights = config.baselines.hirescam_weights if method == "hirescam" else ""
    return f"pretrained:{Path(weights).name}" if weights else "scratch"


def slice_size(data: str) -> tuple[int, int]:
    """(H, W) of the train split's slices, from the first row's ``height``/``width``."""
    import pyarrow.dataset as pads

    fs, path = filesystem(split_path(data, "train"))
    head = pads.dataset(path, filesystem=fs, format="parquet").head(1, columns=["height", "width"])
    if head.num_rows == 0:
        raise UsageError(f"{split_path(data, 'train')}: the train split has no slices")
    return slice_shape_of(head["height"], head["width"])


def run(request: BaselineRequest) -> Path:
    """Train as ``request`` says; returns ``<output>/best``.

    Raises:
        ConfigError, UsageError, CheckpointError, DatasetError, FileNotFoundError,
        SharedStorageError: refused before training (the command line's exit status 2).
    """
    trainer_cls = trainer_class(request.method)
    config = request.config
    for split in ("train", "valid"):
        if not path_exists(split_path(request.data, split), want_dir=True):
            raise UsageError(f"{split_path(request.data, split)}: no {split} split; "
                             "run ray_jobs.preprocess first")
    size = slice_size(request.data)
    class_counts = label_counts(split_path(request.data, "train"))
    check_training_classes(class_counts, split_path(request.data, "train"))
    # A bad setting fails before Ray starts.
    settings = method_settings(config, request.method, size, class_counts)
    output = Path(request.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    storage_path, run_name = default_storage_path(output), request.method
    # The driver's own reads first, so that a refused run never starts Ray.
    check_resume(storage_path, run_name, request.resume, check_resumable, data=request.data)

    import ray

    init_ray(request.address, verbose=request.verbose)  # quiet unless --verbose: ray_jobs.console
    # Before anything is opened or started: rank 0 writes the checkpoints under --output
    # (ray_results/) and (default store) logs to <output>/mlflow.db; every worker reads --data.
    preflight(outputs={"the baseline's --output (rank 0 writes its checkpoints and MLflow "
                       "store there)": output}, data=request.data)

    data_hash = dataset_version(request.data)
    mlflow_cfg, tracking_uri = None, ""
    outage = {"on_disk": str(output)}
    if not request.no_tracking:
        tracking_uri = tracking.resolve_tracking_uri(request.tracking_uri or config.tracking.tracking_uri, output)
        params = {**{k: v for k, v in config.flat().items() if k.startswith(("baselines.", "train."))},
                  **{f"settings.{k}": v for k, v in dataclasses.asdict(settings).items()},
                  "job.method": request.method, "job.data": request.data, "job.slice_size": list(size)}
        tags = {**tracking.method_run_tags("train_baseline", SCORED_AS[request.method], request.variant, data_hash),
                "igconda.train_method": request.method, "igconda.init": initial_weights(config, request.method)}
        with tracking.outage_tolerant("opening the training run; training goes on without MLflow",
                                      tracking_uri, **outage):
            mlflow_cfg = create_or_reopen_run(
                output / RUN_RECORD, resume=request.resume, tracking_uri=tracking_uri,
                experiment=request.experiment or config.tracking.experiment,
                run_name=f"train_baseline-{request.method}", tags=tags, params=params,
                parent_run_id=request.parent_run_id)

    workers = config.train.num_workers
    cpus = request.cpus_per_worker or default_cpus_per_worker(workers, ray.cluster_resources().get("CPU", 1.0))
    print(f"{request.method}: {workers} worker(s), {cpus:g} CPU each, slices {size[0]}x{size[1]}", flush=True)
    splits = read_splits(request.data, {"train": trainer_cls.train_columns, "valid": trainer_cls.valid_columns},
                         materialize_max_mb=config.train.materialize_max_mb,
                         filters={"train": trainer_cls.train_filter} if trainer_cls.train_filter else None)
    if trainer_cls.oversample and config.train.balance_classes:
        splits["train"], repeats = oversample_unhealthy(splits["train"], class_counts)
        print(f"class balance: each unhealthy train slice shown {repeats}x per epoch", flush=True)
    splits["train"] = splits["train"].randomize_block_order()
    loop_config = {"method": request.method, "study": config.to_dict(), "slice_size": list(size),
                   "class_counts": class_counts,
                   "mlflow": mlflow_cfg, "data_version": data_hash,
                   "torch_threads": request.torch_threads or max(1, int(cpus))}
    trainer = torch_trainer(train_baseline_func, loop_config, splits, num_workers=workers,
                            use_gpu=config.train.use_gpu, cpus_per_worker=cpus,
                            storage_path=storage_path, run_name=run_name,
                            max_failures=config.train.max_failures,
                            keep_checkpoints=request.keep_checkpoints)
    return fit_and_finish(trainer, output, {"method": request.method}, tracking_uri=tracking_uri,
                          mlflow_cfg=mlflow_cfg, outage=outage)


def execute(build: Callable[[], BaselineRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, its errors reported as the command line
    reports them; the job's exit status (the comparison study runs its baselines through this)."""
    try:
        best = run(build())
    except (ConfigError, UsageError, ckpt.CheckpointError, DatasetError, FileNotFoundError,
            SharedStorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"best checkpoint: {best}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: baseline_request(args))


if __name__ == "__main__":
    sys.exit(main())
