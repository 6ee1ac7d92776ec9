"""Ray Train run plumbing shared by the training jobs (``ray_jobs.train``, ``ray_jobs.train_baseline``).

Where a run's checkpoints live and whether one exists to ``--resume``, how the Parquet splits are
read into Ray Datasets, the ``TorchTrainer`` both jobs build, and copying the checkpoint of the
lowest validation loss to ``<output>/best`` with its pointer file. Ray is imported inside the
functions that need it, so that importing a job for its plain helpers stays cheap.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from igconda import checkpoint as ckpt
from igconda.data.io import filesystem, join_path, path_exists, split_path, tree_bytes
from igconda.data.schema import HEALTHY, UNHEALTHY, healthy_per_unhealthy
from igconda.io_utils import replace_dir
from igconda.train_loop import DATA_VERSION_KEY, SCORE_METRIC, dataset_version

# Ray Train's record of reported checkpoints; its presence means a run exists to resume.


_SNAPSHOT = "checkpoint_manager_snapshot.json"


class UsageError(ValueError):
    """Bad command-line arguments or inputs; reported without a traceback."""


def default_cpus_per_worker(num_workers: int, cluster_cpus: float) -> float:
    """One CPU per worker, unless that would leave no CPU for Ray Data's read tasks.

    Training workers hold their CPUs for the whole run; if they took every CPU, the Parquet read
    tasks feeding them could never be scheduled and the run would wait forever.
    """
    if num_workers + 1 <= cluster_cpus:
        return 1.0
    return max(0.1, round((cluster_cpus - 1.0) / num_workers, 2)) if cluster_cpus > 1 else 0.5 / num_workers


def label_counts(uri: str) -> dict[int, int]:
    """Slices per schema label in a Parquet split, from the ``label`` column alone (cheap at any
    size): what class balancing (IgCONDA's oversampling, the classifiers' loss weights) needs."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = filesystem(uri)
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
        counts: slices per label (:func:`label_counts`).

    Returns:
        The oversampled dataset and k (1 = unchanged: no unhealthy slice or already balanced).
    """
    ratio = healthy_per_unhealthy(counts)
    repeats = max(1, round(ratio)) if ratio else 1
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


def _storage_path(storage_path: str | None, output: Path) -> str:
    """Where a training's checkpoints go: its ``--storage-path`` (a local one resolved), else
    :func:`default_storage_path` of its ``output``."""
    if storage_path:
        return storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    return default_storage_path(output)


def default_storage_path(output: str | Path) -> str:
    """Where Ray Train's checkpoints go without ``--storage-path``: ``<output>/ray_results``."""
    return str(Path(output).resolve() / "ray_results")


def has_run(storage_path: str, run_name: str = "train") -> bool:
    """True if ``<storage_path>/<run_name>`` holds a Ray Train run (one to ``--resume``)."""
    return path_exists(join_path(storage_path, run_name, _SNAPSHOT))


def latest_checkpoint(storage_path: str, run_name: str = "train") -> Path | None:
    """The local checkpoint folder a ``--resume`` continues from (see :func:`_latest_checkpoint`)."""
    return _latest_checkpoint(storage_path, run_name)


def check_resume(storage_path: str, run_name: str, resume: bool,
                 check_latest: Callable[[Path], None], data: str | None = None) -> None:
    """Refuse to start over an existing run without ``--resume``, to resume none, or to resume
    one on other data than it was trained on.

    Args:
        check_latest: called with the local folder of the checkpoint a resume continues from
            (when known); raises for a damaged one, which on the workers would fail every
            restart attempt in turn.
        data: the ``--data`` of this run: a resume must continue on the dataset version
            (:func:`igconda.train_loop.dataset_version`) the checkpoint records in its
            ``metadata.json`` (unchecked when it records none, or the checkpoint is not local).

    Raises:
        UsageError: a run exists and ``resume`` is False, none exists and it is True, or the
            checkpoint was trained on another dataset version than ``data``'s.
    """
    exists = has_run(storage_path, run_name)
    if exists and not resume:
        raise UsageError(f"{join_path(storage_path, run_name)} already holds a training run; "
                         "pass --resume to continue it, or choose another --output/--run-name")
    if resume and not exists:
        raise UsageError(f"--resume: no checkpoints found under {join_path(storage_path, run_name)}")
    latest = _latest_checkpoint(storage_path, run_name) if resume else None
    if latest is None:
        return
    check_latest(latest)
    if data is not None:
        check_resume_data(latest, data)


def check_resume_data(checkpoint: Path, data: str) -> None:
    """Refuse to continue training the checkpoint on another dataset version than its own.

    A resumed run would mix two datasets in one model (epochs, early stopping and the best
    checkpoint's validation loss over different slices) while its records name one. Reads only
    the checkpoint's ``metadata.json`` and ``data``'s ``dataset.json`` (or its file listing).

    Raises:
        UsageError: naming the checkpoint, both versions and the fix.
    """
    try:
        recorded = ckpt.load_metadata(checkpoint).get(DATA_VERSION_KEY)
    except (OSError, ValueError, AttributeError):
        return  # unreadable or not a mapping: nothing recorded to hold the data to
    if not recorded:
        return  # checkpoints written before versions were recorded
    current = dataset_version(data)
    if current != recorded:
        raise UsageError(
            f"--resume: checkpoint {checkpoint} was trained on data version {recorded} "
            f"({checkpoint / ckpt.METADATA_FILE}), but --data {data} is version {current}; "
            f"resume with the data the run was trained on, or train from scratch on the new "
            f"data in a new --output (or --run-name)")


def read_splits(data: str, columns: dict[str, tuple[str, ...]], *, materialize_max_mb: int,
                limit_rows: int | None = None, filters: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray Datasets of ``<data>/slices/<split>`` with only ``columns[split]`` read.

    Args:
        data: dataset folder or URI.
        columns: the columns to read, per split.
        materialize_max_mb: splits whose Parquet totals at most this many MiB are read once into
            the object store (0 = always stream).
        limit_rows: keep only this many rows of each split (smoke tests).
        filters: optional Ray Data expressions per split (applied before materializing).

    Raises:
        UsageError: a split folder is missing.
    """
    import ray.data

    # A dataset copies the DataContext when it is created: keep the rows' order (ordered_ingest).
    options = ray.data.DataContext.get_current().execution_options
    ordered, options.preserve_order = options.preserve_order, True
    try:
        return _read_splits(data, columns, materialize_max_mb=materialize_max_mb,
                            limit_rows=limit_rows, filters=filters)
    finally:
        options.preserve_order = ordered


def _read_splits(data: str, columns: dict[str, tuple[str, ...]], *, materialize_max_mb: int,
                 limit_rows: int | None, filters: dict[str, Any] | None) -> dict[str, Any]:
    import ray.data

    splits, parquet_bytes = {}, 0
    for split, names in columns.items():
        path = split_path(data, split)
        if not path_exists(path, want_dir=True):
            raise UsageError(f"{path}: no {split} split; run ray_jobs.preprocess first")
        splits[split] = ray.data.read_parquet(path).select_columns(list(names))
        if filters and split in filters:
            splits[split] = splits[split].filter(expr=filters[split])
        parquet_bytes += tree_bytes(path)
    if limit_rows is not None:
        splits = {k: v.limit(limit_rows) for k, v in splits.items()}
    if parquet_bytes <= materialize_max_mb * 2**20:
        # Small splits: read them once into the object store. Streaming them re-runs the Parquet
        # read every epoch, and on a small machine those read tasks compete with the training
        # threads for the same cores (measured on 2 cores: Ray Train at 0.64x a plain loop when
        # streaming; see benchmarks/RESULTS.md). Large splits keep streaming.
        print(f"reading the {'/'.join(columns)} splits ({parquet_bytes / 2**20:.1f} MiB of Parquet) "
              "into the object store once", flush=True)
        splits = {k: v.materialize() for k, v in splits.items()}
    return splits


def ordered_ingest() -> Any:
    """Ray Data options for the training shards: Ray Train's defaults with the rows' order kept.

    Ray Data hands blocks on as their read tasks finish, so without ``preserve_order`` the order
    of the rows, and with it the seeded shuffle's batches, changes from run to run: the same seed
    gave a different model, and a training resumed after a crash did not end where the
    uninterrupted one does. With one worker the order is now a function of the data and the
    seed; with several, Ray still deals the blocks to the workers as they ask for them.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def torch_trainer(func: Any, loop_config: dict[str, Any], datasets: dict[str, Any], *,
                  num_workers: int, use_gpu: bool, cpus_per_worker: float, storage_path: str,
                  run_name: str, max_failures: int, keep_checkpoints: int) -> Any:
    """The ``TorchTrainer`` every training job uses: ``func`` on ``num_workers`` DDP workers,
    checkpoints ranked by :data:`~igconda.train_loop.SCORE_METRIC` (lowest best; the latest is
    always kept too), only ``train`` sharded."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints,
                                               checkpoint_score_attribute=SCORE_METRIC,
                                               checkpoint_score_order="min"),
        ),
        datasets=datasets,
        # Shard only train; every worker sees all of valid and scores the rows hashed to its rank
        # (streaming_split(equal=True) would drop rows to even the shards out).
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ordered_ingest()),
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
