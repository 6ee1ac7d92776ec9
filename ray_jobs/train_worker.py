"""The Ray Train worker function of ``ray_jobs.train``: one per DDP worker.

:func:`train_func` is the ``train_loop_per_worker`` of the job's ``TorchTrainer``: each worker
builds an :class:`igconda.train_loop.TrainingSession`, restores the latest checkpoint if Ray hands
it one (``--resume`` or a restart after a lost worker), wraps the model in DDP and loops over
epochs of its Ray Data shard, reducing losses, counts and times over the workers and reporting
metrics and checkpoints to Ray Train. What an epoch does (draws, loss, validation, checkpoint
contents) is the session's and runs without Ray (``tests/test_train_loop.py``); this module is
the Ray glue around it.

Ray is imported inside the functions that run on a worker, as in ``ray_jobs/train.py``, so that
importing the job's module for its plain helpers does not start Ray's import.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from igconda.config import from_dict
from igconda.train_loop import (
    DATA_VERSION_KEY,
    SCORE_METRIC,
    TRAIN_COLUMNS,
    VALID_COLUMNS,
    TrainingSession,
    decode_slice_batch,
    weights_checksum,
)
from ray_jobs.train_progress import TOTAL_KEY


def make_collate_fn(mask: bool = False) -> Any:
    """A Ray Data ``ArrowBatchCollateFn`` that applies
    :func:`igconda.train_loop.decode_slice_batch` (with ``mask``) to each Arrow batch of a shard."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _SliceCollate(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
            return decode_slice_batch(batch, mask=mask)

    return _SliceCollate()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum float values over all workers (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _all_reduce_max(value: float, device: torch.device) -> float:
    """Maximum of a float over all workers (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _maybe_inject_fault(fault: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, at the start of ``fault["epoch"]`` on
    ``fault["rank"]``; the marker file makes the restarted worker carry on. With
    ``fault["hold"]`` the worker writes the marker and waits instead (up to 10 minutes; until
    the file ``hold`` names exists, when it is a path), so that a test can kill the driver,
    take a node away or stop a server mid-training at a known point.

    With ``fault["run"]`` (``[storage_path, run_name]``) it first waits (up to 5 minutes) until
    Ray Train has registered the previous epoch's checkpoint in that run's snapshot, so the
    restart continues from it on any machine; a fixed pause was a guess (a crash right after a
    report may otherwise win the race, and the run restarts from the checkpoint before it,
    which is correct but not what a test asks)."""
    if not fault or epoch != int(fault["epoch"]) or rank != int(fault.get("rank", 0)):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    if fault.get("run"):
        from ray_jobs.train_runs import latest_checkpoint

        wanted, deadline = f"checkpoint_epoch_{epoch - 1:06d}", time.monotonic() + 300
        while time.monotonic() < deadline:
            latest = latest_checkpoint(*fault["run"])
            if latest is not None and latest.name == wanted:
                break
            time.sleep(0.1)
    if fault.get("hold"):
        marker.write_text(f"worker rank {rank} held at the start of epoch {epoch}\n")
        release = None if fault["hold"] is True else Path(fault["hold"])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (release and release.exists()):
            time.sleep(0.1)
        return
    marker.write_text(f"worker rank {rank} killed at the start of epoch {epoch}\n")
    os._exit(1)


def console_line(text: str) -> None:
    """Write one line to the worker's stdout: its Ray log file, and the driver's console once
    with ``--verbose`` (by default the driver shows an epoch bar instead: ray_jobs.console).

    Not ``print``: Ray Train patches ``print`` in its workers to log the message *and*, where
    Ray has replaced ``sys.stdout``, to print it as well, so every line reached the driver twice.
    """
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def epoch_line(prefix: str, metrics: dict[str, Any]) -> str:
    """``"<prefix> key=value ..."`` of an epoch's metrics (without ``epoch``)."""
    return prefix + " " + " ".join(f"{k}={v:.5g}" for k, v in metrics.items() if k != "epoch")


def _make_logger(mlflow_cfg: dict[str, Any] | None, rank: int) -> Any:
    if rank != 0 or not mlflow_cfg or not mlflow_cfg.get("run_id"):
        return None
    from igconda.tracking import RunLogger

    return RunLogger(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"])


def _log(logger: Any, metrics: dict[str, float], step: int) -> None:
    if logger is None:
        return
    try:
        logger.log_metrics(metrics, step=step)
    except Exception as err:  # a tracking hiccup must not kill a days-long training run
        # RunLogger now skips the next epochs' metrics for a while (bounded cost per outage);
        # the history is kept in every checkpoint and re-logged by ray_jobs.relog.
        from igconda.tracking import RELOG_COMMAND

        warnings.warn(f"MLflow logging to {logger.tracking_uri} failed at epoch {step} "
                      f"({type(err).__name__}: {err}); training goes on, metrics are skipped for "
                      f"{logger.pause_after_failure_s:.0f} s and stay in the checkpoints' history "
                      f"(re-log them with {RELOG_COMMAND} --train OUTPUT)", stacklevel=2)


def _batches(shard: Any, batch_size: int, device: torch.device, *, shuffle_seed: int | None,
             columns: tuple[str, ...], mask: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    del columns  # the driver selects columns before sharding; kept for readability at call sites
    kwargs: dict[str, Any] = {}
    if shuffle_seed is not None:
        # A local shuffle buffer mixes slices of different patients inside a batch (each Parquet
        # file holds one patient, so unshuffled batches would be single-patient).
        kwargs = {"local_shuffle_buffer_size": max(8 * batch_size, 256), "local_shuffle_seed": shuffle_seed}
    return iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=make_collate_fn(mask),
                                         device="cpu", **kwargs))


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop (``TorchTrainer(train_loop_per_worker=train_func)``).

    Args:
        config: ``study`` (``StudyConfig.to_dict()``), ``mlflow`` (``tracking_uri`` and
            ``run_id`` of the run to log to, or None), ``torch_threads`` (intra-op threads per
            worker; 0 = leave torch's default), ``data_version`` (recorded in checkpoints) and,
            for tests only, ``fault`` (see :func:`_maybe_inject_fault`).

    Reports to Ray Train, every epoch: ``epoch``, ``train_loss``, ``samples_per_s``, and on
    validation epochs ``valid_loss``; a checkpoint (from rank 0) every ``checkpoint_every``
    epochs and at the last epoch, always with a fresh ``valid_loss`` so that Ray can rank it.
    """
    import ray.train
    import ray.train.torch

    study = from_dict(config["study"], "train_loop_config")
    train_cfg = study.train
    threads = int(config.get("torch_threads") or 0)
    default_threads = torch.get_num_threads()
    if threads > 0:
        # Ray sets OMP_NUM_THREADS to the worker's CPU reservation (1 by default), which caps
        # torch's intra-op pool; make the thread count an explicit choice instead.
        torch.set_num_threads(threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    session = TrainingSession.create(study, device=device, rank=rank)

    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            session.restore(directory)
        console_line(f"[rank {rank}] resumed from {restored.path} after epoch {session.epoch}")
    # prepare_model broadcasts rank 0's weights and wraps in DDP (gloo on CPU, NCCL on GPU).
    session.model = ray.train.torch.prepare_model(session.model)

    train_shard = ray.train.get_dataset_shard("train")
    valid_data = ray.train.get_dataset_shard("valid")
    logger = _make_logger(config.get("mlflow"), rank)
    meta_extra = {"mlflow_run_id": (config.get("mlflow") or {}).get("run_id"),
                  DATA_VERSION_KEY: config.get("data_version"), "world_size": world_size}

    for epoch in range(session.epoch + 1, train_cfg.epochs + 1):
        _maybe_inject_fault(config.get("fault"), epoch, rank)
        stats = session.train_epoch(
            _batches(train_shard, train_cfg.batch_size, device,
                     shuffle_seed=train_cfg.seed * 100_003 + epoch * 101 + rank, columns=TRAIN_COLUMNS),
            epoch)
        loss_sum, samples = _all_reduce_sum([stats.loss_sum, float(stats.samples)], device)
        seconds = _all_reduce_max(stats.seconds, device)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(samples, 1.0),
                                   "samples_per_s": samples / max(seconds, 1e-9),
                                   "epoch_seconds": seconds, "torch_threads": torch.get_num_threads(),
                                   "torch_default_threads": default_threads}
        last = epoch == train_cfg.epochs
        do_checkpoint = epoch % train_cfg.checkpoint_every == 0 or last
        if epoch % train_cfg.valid_every == 0 or do_checkpoint:
            part_sum, part_count = session.validation_sums(
                _batches(valid_data, train_cfg.batch_size, device, shuffle_seed=None,
                         columns=VALID_COLUMNS), rank, world_size)
            total, count = _all_reduce_sum([part_sum, float(part_count)], device)
            if count == 0:
                raise ValueError("the valid split is empty: cannot select a checkpoint")
            metrics[SCORE_METRIC] = total / count
            metrics["valid_samples"] = int(count)
        session.history.append({k: float(v) for k, v in metrics.items()})
        is_best = SCORE_METRIC in metrics and metrics[SCORE_METRIC] < session.best_valid_loss
        if is_best:
            session.best_valid_loss = metrics[SCORE_METRIC]
        metrics["best_valid_loss"] = session.best_valid_loss
        if do_checkpoint:
            # DDP keeps replicas identical; check before writing rank 0's copy as everyone's.
            checksum = weights_checksum(session.module)
            spread = _all_reduce_max(checksum, device) + _all_reduce_max(-checksum, device)
            if abs(spread) > 1e-6 * max(1.0, abs(checksum)):
                raise RuntimeError(f"DDP replicas diverged at epoch {epoch} (checksum spread {spread:g})")
            metrics["replica_checksum_spread"] = spread
        _log(logger, {k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        if rank == 0:  # on the console with --verbose only; always in the worker's log file
            console_line(epoch_line(f"epoch {epoch}/{train_cfg.epochs}", metrics))
        # The driver's epoch bar (ray_jobs.train_progress) takes its total from the report.
        reported = {**metrics, TOTAL_KEY: train_cfg.epochs}

        if not do_checkpoint:
            ray.train.report(reported)
            continue
        name = f"checkpoint_epoch_{epoch:06d}"
        if rank != 0:  # only rank 0 writes; every rank reports (Ray syncs the folder name)
            ray.train.report(reported, checkpoint_dir_name=name)
            continue
        with tempfile.TemporaryDirectory(prefix="igconda-ckpt-") as tmp:
            folder = session.save(Path(tmp) / "checkpoint", metadata={
                **meta_extra, "valid_loss": metrics[SCORE_METRIC], "train_loss": metrics["train_loss"],
                "is_best": bool(is_best)})
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=name)
