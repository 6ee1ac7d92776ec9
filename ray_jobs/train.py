"""Train the class-conditional diffusion model with Ray Train (DDP over Ray Data shards).

Run it locally (starts a local Ray)::

    python -m ray_jobs.train --data runs/demo/data --output runs/demo/train --config configs/demo.yaml

on two CPU workers, or GPUs (NCCL, mixed precision)::

    python -m ray_jobs.train --data DATA --output OUT --num-workers 2
    python -m ray_jobs.train --data s3://bucket/data --output OUT --storage-path s3://bucket/ray \\
        --num-workers 8 --use-gpu --tracking-uri http://mlflow.internal:5000

or submit it to a running cluster (the head's dashboard on port 8265; a head started with
``ray start --head`` has token authentication on, so the client needs ``RAY_AUTH_MODE=token`` and
the token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m ray_jobs.train --data DATA --output OUT --config configs/demo.yaml

Continue an interrupted run (same ``--output``/``--storage-path``/``--run-name``) from its latest
checkpoint, including optimizer, EMA and RNG state, and the same MLflow run::

    python -m ray_jobs.train --data DATA --output OUT --resume [--epochs 200]

Quick check that everything is wired (one epoch on a few batches)::

    python -m ray_jobs.train --data DATA --output /tmp/smoke --config configs/test.yaml --smoke-test

What it writes (``--output`` must be a local or NFS folder; ``--storage-path`` may be any
``pyarrow.fs`` URI and defaults to ``<output>/ray_results``)::

    <storage-path>/<run-name>/checkpoint_epoch_NNNNNN/   Ray Train checkpoints (igconda.checkpoint
                                                         layout), the best few by valid_loss + latest
    <output>/best/                  local copy of the checkpoint with the lowest validation loss
    <output>/best_checkpoint.json   its URI in the storage, epoch, valid_loss, MLflow run id
    <output>/mlflow_run.json        the MLflow run this training logs to (reused by --resume)
    <output>/mlflow.db, mlartifacts/   the default local MLflow store (no server needed)

Exit status: 0 on success, 2 on a usage or config error, 1 if training failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from igconda import checkpoint as ckpt
from igconda import tracking
from igconda.argtypes import TRACKING_URI_HELP, positive_float, positive_int
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.data.schema import HEALTHY, UNHEALTHY
from igconda.io_utils import replace_dir
from igconda.train_loop import SCORE_METRIC, TRAIN_COLUMNS, VALID_COLUMNS, dataset_version
from ray_jobs.train_tracking import (  # noqa: F401  (RUN_RECORD: re-exported)
    RUN_RECORD,
    finish_mlflow_run,
    open_mlflow_run,
)
from ray_jobs.train_worker import train_func

# Ray Train's record of reported checkpoints; its presence means a run exists to resume.
_SNAPSHOT = "checkpoint_manager_snapshot.json"


class UsageError(ValueError):
    """Bad command-line arguments or inputs; reported without a traceback."""


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
    parser.add_argument("--smoke-test", action="store_true", help="1 epoch on a few batches")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> StudyConfig:
    """The study config with the command line's overrides applied (validated)."""
    train: dict[str, Any] = {}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.smoke_test:
        train["epochs"] = 1
    if args.num_workers is not None:
        train["num_workers"] = args.num_workers
    if args.use_gpu:
        train["use_gpu"] = True
    return load_config(args.config, overrides={"train": train} if train else None)


def default_cpus_per_worker(num_workers: int, cluster_cpus: float) -> float:
    """One CPU per worker, unless that would leave no CPU for Ray Data's read tasks.

    Training workers hold their CPUs for the whole run; if they took every CPU, the Parquet read
    tasks feeding them could never be scheduled and the run would wait forever.
    """
    if num_workers + 1 <= cluster_cpus:
        return 1.0
    return max(0.1, round((cluster_cpus - 1.0) / num_workers, 2)) if cluster_cpus > 1 else 0.5 / num_workers


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for a local path or a pyarrow-filesystem URI (e.g. s3://)."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _fs_exists(uri: str, want_dir: bool = False) -> bool:
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    return info.type == (pafs.FileType.Directory if want_dir else pafs.FileType.File)


def _tree_bytes(uri: str) -> int:
    """Total size of the files under a local folder or a pyarrow-filesystem URI (e.g. s3://)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(info.size or 0 for info in infos if info.type == pafs.FileType.File)


def _label_counts(uri: str) -> dict[int, int]:
    """Slices per label in a Parquet split, from the ``label`` column alone (cheap at any size)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = _filesystem(uri)
    labels = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["label"])["label"]
    return {int(row["values"]): int(row["counts"]) for row in pc.value_counts(labels).to_pylist()}


def oversample_unhealthy(train: Any, counts: dict[int, int]) -> tuple[Any, int]:
    """Repeat the unhealthy slices of a training split so the classes are about balanced.

    Unhealthy slices are a minority of a whole-body scan (about 10 % in the demo cohorts). The
    guidance direction ε(x, healthy) − ε(x, ∅) is only as good as what the network learned of
    unhealthy slices, so each epoch shows every healthy slice once and every unhealthy slice
    k = round(n_healthy / n_unhealthy) times.

    Args:
        train: the train split (a Ray Dataset with a ``label`` column).
        counts: slices per label (:func:`_label_counts`).

    Returns:
        The oversampled dataset and k (1 = unchanged: no unhealthy slice or already balanced).
    """
    healthy, unhealthy = counts.get(HEALTHY, 0), counts.get(UNHEALTHY, 0)
    repeats = max(1, round(healthy / unhealthy)) if unhealthy else 1
    if repeats == 1:
        return train, 1
    minority = train.filter(expr=f"label == {UNHEALTHY}")
    return train.filter(expr=f"label == {HEALTHY}").union(*([minority] * repeats)), repeats


def _latest_checkpoint(storage_path: str, run_name: str) -> Path | None:
    """The local folder of the checkpoint Ray Train resumes a run from, or None if unknown.

    Read from Ray's ``checkpoint_manager_snapshot.json`` (``latest_checkpoint_result``); None for
    remote storage (s3://…, not read here) or a snapshot in a layout this code does not know,
    in which case the workers' own restore still names a damaged file.
    """
    if "://" in storage_path:
        return None
    try:
        snapshot = json.loads(Path(storage_path, run_name, _SNAPSHOT).read_text())
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(storage_path, run_name, name) if isinstance(name, str) and name else None


def _storage_path(args: argparse.Namespace, output: Path) -> str:
    if args.storage_path:
        return args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    return default_storage_path(output)


def default_storage_path(output: str | Path) -> str:
    """Where Ray Train's checkpoints go without ``--storage-path``: ``<output>/ray_results``."""
    return str(Path(output).resolve() / "ray_results")


def has_run(storage_path: str, run_name: str = "train") -> bool:
    """True if ``<storage_path>/<run_name>`` holds a Ray Train run (one to ``--resume``)."""
    return _fs_exists(_join(storage_path, run_name, _SNAPSHOT))


def latest_checkpoint(storage_path: str, run_name: str = "train") -> Path | None:
    """The local checkpoint folder a ``--resume`` continues from (see :func:`_latest_checkpoint`)."""
    return _latest_checkpoint(storage_path, run_name)


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
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_cfg = config.train
    splits = {}
    parquet_bytes = 0
    for split, columns in (("train", TRAIN_COLUMNS), ("valid", VALID_COLUMNS)):
        path = _join(data, "slices", split)
        if not _fs_exists(path, want_dir=True):
            raise UsageError(f"{path}: no {split} split; run ray_jobs.preprocess first")
        splits[split] = ray.data.read_parquet(path).select_columns(list(columns))
        parquet_bytes += _tree_bytes(path)
    if smoke_test:
        rows = 2 * train_cfg.batch_size * train_cfg.num_workers
        splits = {k: v.limit(rows) for k, v in splits.items()}
    if parquet_bytes <= train_cfg.materialize_max_mb * 2**20:
        # Small splits: read them once into the object store. Streaming them re-runs the Parquet
        # read every epoch, and on a small machine those read tasks compete with the training
        # threads for the same cores (measured on 2 cores: Ray Train at 0.64x a plain loop when
        # streaming; see benchmarks/RESULTS.md). Large splits keep streaming.
        print(f"reading the train/valid splits ({parquet_bytes / 2**20:.1f} MiB of Parquet) into "
              "the object store once", flush=True)
        splits = {k: v.materialize() for k, v in splits.items()}
    if train_cfg.balance_classes:
        splits["train"], repeats = oversample_unhealthy(
            splits["train"], _label_counts(_join(data, "slices", "train")))
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
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints,
                                               checkpoint_score_attribute=SCORE_METRIC,
                                               checkpoint_score_order="min"),
        ),
        datasets=splits,
        # Shard only train; every worker sees all of valid and scores the rows hashed to its rank
        # (streaming_split(equal=True) would drop rows to even the shards out).
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def export_best(result: Any, output: Path, extra: dict[str, Any] | None = None) -> Path:
    """Copy the lowest-valid-loss checkpoint to ``<output>/best`` and write its pointer file.

    Returns:
        ``<output>/best``.
    """
    best = result.get_best_checkpoint(SCORE_METRIC, "min")
    if best is None:
        raise RuntimeError("training reported no checkpoint with a validation loss")
    metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), {})
    target = output / ckpt.BEST_DIR
    staging = output / f".{ckpt.BEST_DIR}.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    best.to_directory(str(staging))
    replace_dir(staging, target)  # the previous best stays until the new one is in place
    meta = ckpt.load_metadata(target)
    ckpt.write_best_pointer(output, {
        "uri": best.path if "://" in best.path else str(Path(best.path).resolve()),
        "filesystem": type(best.filesystem).__name__,
        "local_copy": str(target.resolve()),
        "epoch": meta.get("epoch", metrics.get("epoch")),
        "valid_loss": meta.get("valid_loss", metrics.get(SCORE_METRIC)),
        **(extra or {}),
    })
    return target


def run(args: argparse.Namespace) -> Path:
    """Train as the arguments say; returns the local copy of the best checkpoint."""
    config = resolve_config(args)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    storage_path = _storage_path(args, output)
    exists = has_run(storage_path, args.run_name)
    if exists and not args.resume:
        raise UsageError(f"{_join(storage_path, args.run_name)} already holds a training run; "
                         "pass --resume to continue it, or choose another --output/--run-name")
    if args.resume and not exists:
        raise UsageError(f"--resume: no checkpoints found under {_join(storage_path, args.run_name)}")
    if args.resume:
        latest = _latest_checkpoint(storage_path, args.run_name)
        if latest is not None:
            # On the workers a damaged checkpoint would fail every restart attempt in turn.
            ckpt.check_checkpoint(latest, resume=True)

    data_hash = dataset_version(args.data)
    mlflow_cfg = None
    tracking_uri = ""
    outage = {"on_disk": str(output), "relog": f"--train {output}"}
    if not args.no_tracking:
        tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri or config.tracking.tracking_uri, output)
        # A tracking server that is down must not stop a training: it runs without MLflow and
        # its history (in every checkpoint) is re-logged later.
        with tracking.outage_tolerant("opening the training run; training goes on without MLflow",
                                      tracking_uri, **outage):
            mlflow_cfg = open_mlflow_run(args, config, output, tracking_uri, storage_path, data_hash)

    import ray

    if not ray.is_initialized():
        ray.init(address=args.address)
    cpus = args.cpus_per_worker or default_cpus_per_worker(
        config.train.num_workers, ray.cluster_resources().get("CPU", 1.0))
    print(f"{config.train.num_workers} worker(s), {cpus:g} CPU each", flush=True)
    trainer = build_trainer(config, data=args.data, storage_path=storage_path, run_name=args.run_name,
                            mlflow=mlflow_cfg, cpus_per_worker=cpus,
                            torch_threads=args.torch_threads, keep_checkpoints=args.keep_checkpoints,
                            smoke_test=args.smoke_test, data_version=data_hash)
    status = "FAILED"
    try:
        result = trainer.fit()
        best = export_best(result, output, {"mlflow_run_id": mlflow_cfg and mlflow_cfg["run_id"],
                                            "tracking_uri": tracking_uri or None})
        status = "FINISHED"
    finally:
        # The run always ends, FINISHED once the best checkpoint is saved, else FAILED; and
        # an outage while logging the result costs the MLflow run, not the saved model.
        if mlflow_cfg:
            if status == "FINISHED":
                with tracking.outage_tolerant("logging the best checkpoint", tracking_uri, **outage):
                    finish_mlflow_run(args, tracking_uri, mlflow_cfg["run_id"], output, best)
            tracking.end_run_quietly(tracking_uri, mlflow_cfg["run_id"], status, **outage)
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        best = run(args)
    except (ConfigError, UsageError, ckpt.CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"best checkpoint: {best}")
    print(f"best checkpoint record: {best.parent / ckpt.BEST_POINTER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
