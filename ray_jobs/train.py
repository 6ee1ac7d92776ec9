"""Train the class-conditional diffusion model with Ray Train (DDP over Ray Data shards).

Run it locally (starts a local Ray)::

    python -m ray_jobs.train --data runs/demo/data --output runs/demo/train --config configs/demo.yaml

on two CPU workers, or GPUs (NCCL, mixed precision), ``--config`` being the study YAML the data
were preprocessed with::

    python -m ray_jobs.train --data DATA --output OUT --config CONFIG --num-workers 2
    python -m ray_jobs.train --data s3://bucket/data --output OUT --storage-path s3://bucket/ray \\
        --config CONFIG --num-workers 8 --use-gpu --tracking-uri http://mlflow.internal:5000

or submit it to a running cluster (the head's dashboard on port 8265; a head started with
``ray start --head`` has token authentication on, so the client needs ``RAY_AUTH_MODE=token`` and
the token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m ray_jobs.train --data DATA --output OUT --config configs/demo.yaml

Continue an interrupted run (same ``--output``/``--storage-path``/``--run-name``) from its latest
checkpoint, including optimizer, EMA and RNG state, and the same MLflow run::

    python -m ray_jobs.train --data DATA --output OUT --resume [--epochs 200]

``DATA`` must be the dataset version the checkpoint records (``data_version`` in its
``metadata.json``): a resume on other data is refused before Ray starts (exit status 2). So is
``--data`` whose ``dataset.json`` records other slice settings than the config's ``preprocess``
section, which every checkpoint stores as how its training data were made
(:mod:`igconda.data.compat`).

Quick check that everything is wired (one epoch on a few batches of data preprocessed with
``configs/test.yaml``)::

    python -m ray_jobs.train --data DATA --output /tmp/smoke --config configs/test.yaml --smoke-test

What it writes (``--output`` must be a local or NFS folder; ``--storage-path`` may be any
``pyarrow.fs`` URI and defaults to ``<output>/ray_results``, so that by default the checkpoints
are on the study's storage). On a cluster of more than one node, both (and ``--data``) must be
the same for every node: rank 0 writes the checkpoints and, with the default local MLflow store,
logs to ``<output>/mlflow.db``; the job refuses paths not every node sees before it starts
(:func:`ray_jobs.shared_storage.preflight`, exit status 2)::

    <storage-path>/<run-name>/checkpoint_epoch_NNNNNN/   Ray Train checkpoints (igconda.checkpoint
                                                         layout), the best few by valid_loss + latest
    <output>/best/                  local copy of the checkpoint with the lowest validation loss
    <output>/best_checkpoint.json   its URI in the storage, epoch, valid_loss, MLflow run id
    <output>/mlflow_run.json        the MLflow run this training logs to (reused by --resume)
    <output>/mlflow.db, mlartifacts/   the default local MLflow store (no server needed)

Exit status: 0 on success, 2 on a usage or config error, 1 if training failed (a worker's or
Ray Train's controller's error once ``train.max_failures`` restarts are used up: one line naming
the cause, the latest checkpoint and the ``--resume`` command, instead of Ray's traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igconda import checkpoint as ckpt
from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP, positive_float, positive_int
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.data.compat import PreprocessMismatch, check_dataset_settings
from igconda.data.io import DatasetError, check_training_classes, split_path
from igconda.train_loop import TRAIN_COLUMNS, VALID_COLUMNS, dataset_version
from ray_jobs.console import add_verbose_flag, init_ray
from ray_jobs.shared_storage import SharedStorageError, preflight
from ray_jobs.train_runs import (  # noqa: F401  (the helpers other modules import from here)
    UsageError,
    _latest_checkpoint,
    _storage_path,
    check_resume,
    default_cpus_per_worker,
    default_storage_path,
    export_best,
    has_run,
    label_counts,
    latest_checkpoint,
    oversample_unhealthy,
    read_splits,
    torch_trainer,
)
from ray_jobs.train_tracking import (  # noqa: F401  (RUN_RECORD: re-exported)
    RUN_RECORD,
    fit_and_finish,
    open_mlflow_run,
)
from ray_jobs.train_worker import train_func


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="preprocessed dataset folder or URI (has slices/)")
    parser.add_argument("--output", required=True, help="local/NFS folder for best/, MLflow store, records")
    parser.add_argument("--config", default=None, help="study YAML (default: the paper's settings)")
    parser.add_argument("--num-workers", type=positive_int, default=None, help="DDP workers (default: train.num_workers)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, mixed precision")
    parser.add_argument("--cpus-per-worker", type=positive_float, default=None,
                        help="CPUs Ray reserves per worker (default: 1, or less on a small machine "
                             "so that one CPU stays free for Ray Data's readers)")
    parser.add_argument("--torch-threads", type=positive_int, default=None,
                        help="intra-op threads per worker (default: max(1, cpus-per-worker))")
    parser.add_argument("--epochs", type=positive_int, default=None, help="override train.epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--storage-path", default=None, help="Ray Train storage (local, NFS or s3://…)")
    parser.add_argument("--run-name", default="train", help="Ray Train run name under the storage path")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=3,
                        help="best checkpoints to keep by valid_loss (the latest is always kept)")
    parser.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    parser.add_argument("--parent-run-id", default=None, help="nest the MLflow run under this run")
    parser.add_argument("--register-model", default=None, metavar="NAME",
                        help="also register the best checkpoint as a version of this MLflow model")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--address", default=None, help="Ray address (default: auto / start local Ray)")
    add_verbose_flag(parser)
    parser.add_argument("--smoke-test", action="store_true", help="1 epoch on a few batches")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class TrainRequest:
    """What one training runs with, every setting resolved (:func:`resolve_request`).

    ``config`` has the command line's overrides applied (``--epochs``, ``--smoke-test``,
    ``--num-workers``, ``--use-gpu``); ``config_file`` only names where it came from in
    messages. The other fields keep the command line's option names.
    """

    data: str
    output: str
    config: StudyConfig
    config_file: str | None = None
    resume: bool = False
    storage_path: str | None = None
    run_name: str = "train"
    cpus_per_worker: float | None = None
    torch_threads: int | None = None
    keep_checkpoints: int = 3
    smoke_test: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    register_model: str | None = None
    no_tracking: bool = False
    address: str | None = None
    verbose: bool | None = None


def resolve_request(data: str | Path, output: str | Path, config: StudyConfig, *,
                    epochs: int | None = None, smoke_test: bool = False,
                    num_workers: int | None = None, use_gpu: bool = False,
                    **job: Any) -> TrainRequest:
    """The one resolver of a training's settings: the loaded study ``config`` with the command
    line's overrides applied (validated); ``job``: the other :class:`TrainRequest` fields."""
    train: dict[str, Any] = {}
    if epochs is not None:
        train["epochs"] = epochs
    if smoke_test:
        train["epochs"] = 1
    if num_workers is not None:
        train["num_workers"] = num_workers
    if use_gpu:
        train["use_gpu"] = True
    config = config.replace("train", **train) if train else config
    return TrainRequest(str(data), str(output), config, smoke_test=smoke_test, **job)


def train_request(args: argparse.Namespace) -> TrainRequest:
    """The request of a ``ray_jobs.train`` command line; its ``--config`` is parsed here, once.

    Raises:
        ConfigError: an unreadable or invalid config (or override), naming the file.
    """
    return resolve_request(
        args.data, args.output, load_config(args.config), epochs=args.epochs,
        smoke_test=args.smoke_test, num_workers=args.num_workers, use_gpu=args.use_gpu,
        config_file=args.config, resume=args.resume, storage_path=args.storage_path,
        run_name=args.run_name, cpus_per_worker=args.cpus_per_worker,
        torch_threads=args.torch_threads, keep_checkpoints=args.keep_checkpoints,
        tracking_uri=args.tracking_uri, experiment=args.experiment,
        parent_run_id=args.parent_run_id, register_model=args.register_model,
        no_tracking=args.no_tracking, address=args.address, verbose=args.verbose)


def resolve_config(args: argparse.Namespace) -> StudyConfig:
    """The study config with the command line's overrides applied (validated)."""
    return train_request(args).config


def build_trainer(
    config: StudyConfig,
    *,
    data: str,
    storage_path: str,
    run_name: str,
    mlflow: dict[str, str] | None = None,
    cpus_per_worker: float = 1.0,
    torch_threads: int | None = None,
    keep_checkpoints: int = 3,
    smoke_test: bool = False,
    fault: dict[str, Any] | None = None,
    data_version: str | None = None,
    class_counts: dict[int, int] | None = None,
) -> Any:
    """A ``TorchTrainer`` for :func:`ray_jobs.train_worker.train_func` over ``<data>/slices``.

    Args:
        config: study config (``train.num_workers``, ``train.use_gpu``, ``train.max_failures``).
        data: dataset folder or URI with ``slices/train`` and ``slices/valid``.
        storage_path: where Ray Train writes checkpoints (local, NFS or any pyarrow URI).
        run_name: the run's folder under ``storage_path``; rerunning with the same name resumes.
        mlflow: ``{"tracking_uri", "run_id"}`` for rank 0 to log to, or None.
        cpus_per_worker: Ray CPU reservation per worker.
        torch_threads: intra-op threads per worker (default ``max(1, int(cpus_per_worker))``).
        keep_checkpoints: how many of the best checkpoints (by valid loss) to keep.
        smoke_test: limit both splits to a few batches.
        fault: test hook, see :func:`ray_jobs.train_worker._maybe_inject_fault`.
        data_version: recorded in each checkpoint's metadata.
        class_counts: the train split's slices per label, when the caller has read them
            (:func:`label_counts`); read here otherwise.
    """
    train_cfg = config.train
    splits = read_splits(data, {"train": TRAIN_COLUMNS, "valid": VALID_COLUMNS},
                         materialize_max_mb=train_cfg.materialize_max_mb,
                         limit_rows=2 * train_cfg.batch_size * train_cfg.num_workers if smoke_test else None)
    if train_cfg.balance_classes:
        splits["train"], repeats = oversample_unhealthy(
            splits["train"], class_counts or label_counts(split_path(data, "train")))
        print(f"class balance: each unhealthy train slice shown {repeats}x per epoch", flush=True)
    # A fresh block order each epoch; rows are further mixed by each worker's local shuffle buffer.
    splits["train"] = splits["train"].randomize_block_order()

    loop_config = {
        "study": config.to_dict(),
        "mlflow": mlflow,
        "torch_threads": torch_threads or max(1, int(cpus_per_worker)),
        "data_version": data_version,
        "fault": fault,
    }
    return torch_trainer(train_func, loop_config, splits, num_workers=train_cfg.num_workers,
                         use_gpu=train_cfg.use_gpu, cpus_per_worker=cpus_per_worker,
                         storage_path=storage_path, run_name=run_name,
                         max_failures=train_cfg.max_failures, keep_checkpoints=keep_checkpoints)


def check_data_settings(data: str, config: StudyConfig, config_file: str | None) -> None:
    """Refuse ``--data`` made with other slice settings than the config's ``preprocess`` section.

    Every checkpoint stores that section as how its training data were made: inference and
    tuning hold their data to it and ``igconda detect`` preprocesses scans with it
    (:mod:`igconda.data.compat`). Data without ``dataset.json`` are trained on with a warning.

    Raises:
        PreprocessMismatch: naming ``dataset.json``, the config and each differing setting.
    """
    source = f"--config {config_file}" if config_file else "the default config (no --config)"
    problem = check_dataset_settings(
        data, config.preprocess, expected_from=f"the preprocess section of {source}",
        fix=("The checkpoints would record that section as how their training data were made "
             "(inference, tuning and igconda detect rely on it): train with the config the data "
             "were preprocessed with, or preprocess them again with this one."))
    if problem:
        print(f"warning: {problem}", file=sys.stderr, flush=True)


def run(request: TrainRequest) -> Path:
    """Train as ``request`` says; returns the local copy of the best checkpoint."""
    config = request.config
    output = Path(request.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    storage_path = _storage_path(request.storage_path, output)
    # The driver's own reads first, so that a refused run never starts Ray.
    check_resume(storage_path, request.run_name, request.resume,
                 lambda latest: ckpt.check_checkpoint(latest, resume=True), data=request.data)
    check_data_settings(request.data, config, request.config_file)
    train_split = split_path(request.data, "train")
    class_counts = label_counts(train_split)
    check_training_classes(class_counts, train_split)

    import ray

    init_ray(request.address, verbose=request.verbose)  # quiet unless --verbose: ray_jobs.console
    # Before anything is opened or started: rank 0 writes the checkpoints into the storage path
    # and (default store) logs to <output>/mlflow.db; every worker reads --data.
    own_storage = "://" not in storage_path and not Path(storage_path).is_relative_to(output)
    preflight(outputs={"the training's --output (rank 0 logs to its MLflow store)": output,
                       "--storage-path (rank 0 writes the checkpoints there)":
                           storage_path if own_storage else None},  # else checked with --output
              data=request.data)

    data_hash = dataset_version(request.data)
    mlflow_cfg = None
    tracking_uri = ""
    outage = {"on_disk": str(output), "relog": f"--train {output}"}
    if not request.no_tracking:
        tracking_uri = tracking.resolve_tracking_uri(request.tracking_uri or config.tracking.tracking_uri, output)
        # A tracking server that is down must not stop a training: it runs without MLflow and
        # its history (in every checkpoint) is re-logged later.
        with tracking.outage_tolerant("opening the training run; training goes on without MLflow",
                                      tracking_uri, **outage):
            mlflow_cfg = open_mlflow_run(request, config, output, tracking_uri, storage_path, data_hash)

    cpus = request.cpus_per_worker or default_cpus_per_worker(
        config.train.num_workers, ray.cluster_resources().get("CPU", 1.0))
    print(f"{config.train.num_workers} worker(s), {cpus:g} CPU each", flush=True)
    trainer = build_trainer(config, data=request.data, storage_path=storage_path, run_name=request.run_name,
                            mlflow=mlflow_cfg, cpus_per_worker=cpus,
                            torch_threads=request.torch_threads, keep_checkpoints=request.keep_checkpoints,
                            smoke_test=request.smoke_test, data_version=data_hash,
                            class_counts=class_counts)
    return fit_and_finish(trainer, output, {}, tracking_uri=tracking_uri, mlflow_cfg=mlflow_cfg,
                          outage=outage, register_model=request.register_model)


def training_failed_message(err: BaseException, args: TrainRequest) -> str:
    """What a failed training prints instead of Ray Train's traceback: the cause (the first
    worker's error, or the controller's), where the checkpoints are and how to resume."""
    cause = getattr(err, "controller_failure", None)
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, first = min(failures.items())
        cause = f"worker rank {rank}: {type(first).__name__}: {first}"
    elif cause is not None:
        cause = f"the Ray Train controller: {type(cause).__name__}: {cause}"
    else:
        cause = f"{type(err).__name__}: {err}"
    cause = cause.strip().splitlines()[0] if cause.strip() else type(err).__name__
    output = Path(args.output).resolve()
    storage_path = _storage_path(args.storage_path, output)
    if has_run(storage_path, args.run_name):
        where = latest_checkpoint(storage_path, args.run_name) or f"{storage_path}/{args.run_name}"
        resume = (f"its latest checkpoint is {where}; fix the cause and resume it with the same "
                  f"command plus --resume (same --output, --storage-path and --run-name)")
    else:
        resume = "no checkpoint was written: fix the cause and run the same command again"
    return (f"error: training failed once Ray Train's restarts (train.max_failures in the "
            f"config) were used up; cause: {cause}. {resume}")


def execute(build: Callable[[], TrainRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, its errors reported as the command line
    reports them; the job's exit status (the pipeline runs its train stage through this)."""
    # Ray Train's failure of a run (v2: WorkerGroupError, ControllerError; v1 too).
    from ray.train import TrainingFailedError

    try:
        request = build()
        best = run(request)
    except (ConfigError, UsageError, ckpt.CheckpointError, FileNotFoundError, SharedStorageError,
            PreprocessMismatch, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingFailedError as err:
        print(training_failed_message(err, request), file=sys.stderr, flush=True)
        return 1
    print(f"best checkpoint: {best}")
    print(f"best checkpoint record: {best.parent / ckpt.BEST_POINTER}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: train_request(args))


if __name__ == "__main__":
    sys.exit(main())
