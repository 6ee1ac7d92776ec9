"""The Ray Train worker function of ``ray_jobs.train_baseline``: one per DDP worker, any baseline.

:func:`train_baseline_func` builds the method's :class:`igconda.baselines.trainer_base.BaselineTrainer`,
restores the checkpoint Ray hands it (``--resume`` or a restart after a lost worker), makes the
workers train as one (DDP for single networks; averaged gradients for f-AnoGAN, see
:class:`~igconda.baselines.trainer_methods.FAnoGANBaseline`), and loops over epochs of its Ray Data
shard: train, (HiResCAM: refresh BatchNorm), validate on the rows of the valid split hashed to
its rank, reduce the sums over workers, report metrics and a checkpoint every epoch. What an
epoch does is the library's and runs without Ray; this is the Ray glue, sharing its helpers
with :mod:`ray_jobs.train_worker`.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from igconda.baselines.trainer_base import rows_of_rank
from igconda.baselines.trainers import create_trainer
from igconda.config import from_dict
from igconda.train_loop import DATA_VERSION_KEY, SCORE_METRIC
from ray_jobs.train_progress import TOTAL_KEY
from ray_jobs.train_worker import (
    _all_reduce_max,
    _all_reduce_sum,
    _batches,
    _log,
    _make_logger,
    console_line,
    epoch_line,
)


def _average_gradients_before_step(optimizer: torch.optim.Optimizer, world_size: int) -> None:
    """Average each parameter's gradient over the workers right before ``optimizer.step()``:
    synchronous data-parallel training, as DDP computes it, for networks DDP cannot wrap."""
    import torch.distributed as dist

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    optimizer.register_step_pre_hook(hook)


def _average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average floating-point buffers (BatchNorm statistics) over the workers."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= world_size


def _reduce_sums(sums: dict[str, tuple[float, float]], device: torch.device) -> dict[str, float]:
    """``{key: (total, rows)}`` of every worker → ``{key: Σ total / Σ rows}`` (keys in the same
    order on every worker), and ``samples`` = Σ rows of ``train_loss``."""
    keys = list(sums)
    flat = _all_reduce_sum([float(v) for k in keys for v in sums[k]], device)
    out = {k: flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(keys) if flat[2 * i + 1] > 0}
    out["samples"] = flat[2 * keys.index("train_loss") + 1]
    return out


def train_baseline_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop (``TorchTrainer(train_loop_per_worker=train_baseline_func)``).

    Args:
        config: ``method`` (a ``--method``), ``study`` (``StudyConfig.to_dict()``),
            ``slice_size`` (H, W), ``class_counts`` (slices per label of the train split, for
            the classes' loss weights), ``mlflow`` (``tracking_uri`` and ``run_id`` for rank 0, or
            None), ``torch_threads`` (0 = torch's default), ``data_version``.

    Reports to Ray Train every epoch: ``epoch``, ``train_loss`` (and the method's other training
    means), ``samples_per_s``, ``epoch_seconds``, ``valid_loss`` (+inf where the method has none
    yet: f-AnoGAN's WGAN-GP epochs, never chosen as best) and a checkpoint written by rank 0.
    """
    import ray.train
    import ray.train.torch

    study = from_dict(config["study"], "train_loop_config")
    if int(config.get("torch_threads") or 0) > 0:
        torch.set_num_threads(int(config["torch_threads"]))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    trainer = create_trainer(config["method"], study, tuple(config["slice_size"]), device, rank,
                             class_counts=config.get("class_counts"))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            trainer.restore(Path(directory))
        console_line(f"[rank {rank}] resumed from {restored.path} after epoch {trainer.epoch}")
    for name in trainer.ddp_modules:
        # prepare_model broadcasts rank 0's weights and wraps in DDP (gloo on CPU, NCCL on GPU).
        setattr(trainer, name, ray.train.torch.prepare_model(getattr(trainer, name)))
    if world_size > 1:
        for optimizer in trainer.sync_optimizers:
            _average_gradients_before_step(optimizer, world_size)

    train_shard = ray.train.get_dataset_shard("train")
    valid_data = ray.train.get_dataset_shard("valid")
    batch_size, seed = study.baselines.batch_size, study.baselines.seed
    logger = _make_logger(config.get("mlflow"), rank)
    meta_extra = {"mlflow_run_id": (config.get("mlflow") or {}).get("run_id"),
                  DATA_VERSION_KEY: config.get("data_version"), "world_size": world_size,
                  "method": config["method"]}

    def batches(shard: Any, shuffle_seed: int | None, columns: tuple[str, ...]) -> Any:
        return _batches(shard, batch_size, device, shuffle_seed=shuffle_seed, columns=columns,
                        mask=trainer.with_mask)

    total = trainer.total_epochs
    for epoch in range(trainer.epoch + 1, total + 1):
        start = time.perf_counter()
        sums = trainer.train_epoch(
            batches(train_shard, seed * 100_003 + epoch * 101 + rank, trainer.train_columns), epoch)
        seconds = _all_reduce_max(time.perf_counter() - start, device)
        metrics: dict[str, Any] = {"epoch": epoch, **_reduce_sums(sums, device),
                                   "epoch_seconds": seconds}
        metrics["samples_per_s"] = metrics["samples"] / max(seconds, 1e-9)
        if trainer.needs_batchnorm_pass:
            trainer.recompute_batchnorm(batches(train_shard, None, trainer.train_columns))
            _average_buffers(getattr(trainer.model, "module", trainer.model), world_size)
        part = trainer.validation_sums(
            rows_of_rank(batches(valid_data, None, trainer.valid_columns), rank, world_size))
        if part is None:
            metrics[SCORE_METRIC] = math.inf
        else:
            loss_sum, count = _all_reduce_sum([part[0], float(part[1])], device)
            if count == 0:
                raise ValueError(f"the valid split has no slice to validate {config['method']} on")
            metrics[SCORE_METRIC], metrics["valid_samples"] = loss_sum / count, int(count)
        is_best = metrics[SCORE_METRIC] < trainer.best_valid_loss
        if is_best:
            trainer.best_valid_loss = metrics[SCORE_METRIC]
        metrics["best_valid_loss"] = trainer.best_valid_loss
        trainer.history.append({k: float(v) for k, v in metrics.items()})
        # MLflow refuses non-finite values; +inf only marks "no validation loss yet".
        _log(logger, {k: v for k, v in metrics.items() if k != "epoch" and math.isfinite(v)}, epoch)
        if rank == 0:
            console_line(epoch_line(f"{config['method']} epoch {epoch}/{total}", metrics))
        metrics[TOTAL_KEY] = total  # reported only: the driver's epoch bar (ray_jobs.train_progress)
        name = f"checkpoint_epoch_{epoch:06d}"
        if rank != 0:  # only rank 0 writes; every rank reports (Ray syncs the folder name)
            ray.train.report(metrics, checkpoint_dir_name=name)
            continue
        with tempfile.TemporaryDirectory(prefix="igconda-baseline-ckpt-") as tmp:
            folder = trainer.save(Path(tmp) / "checkpoint", {
                **meta_extra, "valid_loss": metrics[SCORE_METRIC],
                "train_loss": metrics["train_loss"], "is_best": bool(is_best)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=name)
