"""The per-worker training loop of ``ray_jobs.train`` and the pure pieces it is built from.

:func:`train_func` is the ``train_loop_per_worker`` of a Ray Train ``TorchTrainer``: each worker
builds the model, restores the latest checkpoint if Ray hands it one (``--resume`` or a restart
after a lost worker), wraps the model in DDP and loops over epochs of its Ray Data shard. The
maths lives in :mod:`igconda.diffusion.training`; everything below :func:`train_func` runs in a
plain process without Ray (see ``tests/test_train_loop.py``).

Validation is comparable across epochs and independent of how rows are sharded: every
validation row gets its own fixed (t, ε) draw, seeded by a hash of its ``(patient_id,
slice_index)``, conditioning is never dropped, and each worker scores the rows whose hash falls
to its rank, so the summed losses and counts reduced over all workers cover the whole valid split
exactly once, whatever the number of workers.

Determinism: the random draws of epoch ``e`` on rank ``r`` come from a generator seeded with
``(train.seed, e, r)``, so a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from igconda import checkpoint as ckpt
from igconda.config import StudyConfig, from_dict
from igconda.data import schema
from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import (
    amp_settings,
    diffusion_loss,
    fixed_validation_draw,
    make_ema,
    train_step,
)
from igconda.models import build_unet

#: Columns each stage of the loop reads (the rest of the slice schema is never decoded).
TRAIN_COLUMNS = ("image", "label", "height", "width")
VALID_COLUMNS = TRAIN_COLUMNS + ("patient_id", "slice_index")
#: Name of the Ray Train metric that ranks checkpoints (lower is better).
SCORE_METRIC = "valid_loss"


# --------------------------------------------------------------------------------------------
# Data: Arrow batches of the slice schema -> tensors
# --------------------------------------------------------------------------------------------


def decode_slice_batch(table: pa.Table) -> dict[str, torch.Tensor]:
    """Decode a batch of slice rows into tensors.

    Args:
        table: rows of :data:`igconda.data.schema.SLICE_SCHEMA` (at least ``image``, ``label``,
            ``height``, ``width``; ``patient_id`` and ``slice_index`` are used when present).

    Returns:
        ``image`` (B, 1, H, W) float32, ``label`` (B,) int64 and, when the table has
        ``patient_id`` and ``slice_index``, ``row_key`` (B,) int64: a stable 31-bit hash of the
        pair that fixes the row's validation draw and its validation worker.

    Raises:
        ValueError: if the batch mixes slice sizes or labels are outside {1, 2}.
    """
    if table.num_rows == 0:
        raise ValueError("empty batch")
    heights = np.unique(table["height"].to_numpy())
    widths = np.unique(table["width"].to_numpy())
    if len(heights) != 1 or len(widths) != 1:
        raise ValueError(f"a batch mixes slice sizes: heights {heights.tolist()}, widths {widths.tolist()}; "
                         "preprocess every volume to the same output_size")
    h, w = int(heights[0]), int(widths[0])
    images = schema.stack_images(table["image"], h, w)
    labels = table["label"].to_numpy().astype(np.int64)
    if not np.isin(labels, (schema.HEALTHY, schema.UNHEALTHY)).all():
        raise ValueError(f"labels must be 1 (healthy) or 2 (unhealthy), got {np.unique(labels).tolist()}")
    # stack_images is a zero-copy view of Arrow's read-only buffer; copy once into torch memory.
    out = {"image": torch.from_numpy(np.array(images, dtype=np.float32, copy=True)).unsqueeze(1),
           "label": torch.from_numpy(labels)}
    if "patient_id" in table.column_names and "slice_index" in table.column_names:
        out["row_key"] = row_keys(table["patient_id"].to_pylist(), table["slice_index"].to_pylist())
    return out


def row_keys(patient_ids: Iterable[str], slice_indices: Iterable[int]) -> torch.Tensor:
    """Stable (B,) int64 keys of ``(patient_id, slice_index)`` pairs (CRC-32, same on every
    machine and Python process, unlike ``hash``)."""
    keys = [zlib.crc32(f"{p}\x00{int(s)}".encode()) for p, s in zip(patient_ids, slice_indices, strict=True)]
    return torch.tensor(keys, dtype=torch.int64)


def make_collate_fn() -> Any:
    """A Ray Data ``ArrowBatchCollateFn`` that applies :func:`decode_slice_batch` (Ray imported
    lazily so that this module imports without Ray)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _SliceCollate(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
            return decode_slice_batch(batch)

    return _SliceCollate()


def validation_draw(keys: torch.Tensor, shape: tuple[int, ...], num_train_timesteps: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (timesteps (B,), noise (B, *shape)) of each validation row, from its key.

    Uses :func:`igconda.diffusion.training.fixed_validation_draw` with one seed per row
    (``seed`` and the row key combined), so a row's draw depends on nothing but itself.
    """
    # torch's CPU generator keeps only 32 bits of a seed: mix (seed, key) into 32 bits first.
    seeds = [int(np.random.SeedSequence([seed, int(k)]).generate_state(1)[0]) for k in keys]
    draws = [fixed_validation_draw(1, shape, num_train_timesteps, s) for s in seeds]
    if not draws:
        return torch.zeros(0, dtype=torch.int64), torch.zeros((0, *shape))
    return torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one worker for one epoch, a function of (seed, epoch, rank) only."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def dataset_version(data_dir: str) -> str:
    """A short hash identifying a preprocessed dataset (local path or URI).

    The SHA-256 of ``dataset.json`` when present (it records counts, config and versions), else
    of the sorted list of split files with their sizes.
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(data_dir) if "://" in data_dir else (
        pafs.LocalFileSystem(), str(Path(data_dir).resolve()))
    digest = hashlib.sha256()
    summary = f"{root.rstrip('/')}/dataset.json"
    if fs.get_file_info(summary).type == pafs.FileType.File:
        with fs.open_input_stream(summary) as f:
            digest.update(f.read())
        return "dataset.json:" + digest.hexdigest()[:16]
    infos = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/slices", recursive=True))
    files = sorted((i.path[len(root):], i.size) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"{data_dir}: no dataset.json and no files under slices/")
    for name, size in files:
        digest.update(f"{name}\t{size}\n".encode())
    return "files:" + digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The training state of one worker
# --------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """What one worker saw in one epoch (summed across workers by the caller)."""

    loss_sum: float = 0.0  # Σ over batches of (batch mean loss × batch size)
    samples: int = 0
    seconds: float = 0.0


@dataclass
class TrainingSession:
    """Model, optimizer, EMA and schedule of one worker, with save/restore.

    Build it with :meth:`create` on the unwrapped model, :meth:`restore` a checkpoint if any,
    then optionally wrap ``model`` in DDP (``session.model = prepare_model(session.model)``).

    Attributes:
        config: the study config (saved in every checkpoint).
        model: the network, possibly DDP-wrapped.
        optimizer: Adam over the model's parameters.
        schedule: the noise schedule of ``config.train``.
        device: where the model lives.
        ema: the EMA average (``AveragedModel``) or None.
        scaler, amp_dtype: mixed-precision settings (None on CPU).
        rank: this worker's rank (seeds its draws).
        epoch: the number of completed epochs.
        best_valid_loss: the lowest validation loss seen so far (inf before any).
        history: per-epoch metrics so far (restored with the checkpoint).
        resumed_at: the completed-epoch count at each restore (``--resume`` or a restart after
            a lost worker), so a run's checkpoints show where it was interrupted.
    """

    config: StudyConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: NoiseSchedule
    device: torch.device
    ema: Any = None
    scaler: Any = None
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    epoch: int = 0
    best_valid_loss: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, config: StudyConfig, device: torch.device | str = "cpu", rank: int = 0) -> TrainingSession:
        """A fresh session: weights initialised from ``train.seed`` (identical on every rank)."""
        device = torch.device(device)
        torch.manual_seed(config.train.seed)
        model = build_unet(config.model).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
        amp_dtype, scaler = amp_settings(device, enabled=config.train.amp)
        return cls(config=config, model=model, optimizer=optimizer,
                   schedule=NoiseSchedule.from_config(config.train), device=device,
                   ema=make_ema(model, config.train.ema_decay), scaler=scaler,
                   amp_dtype=amp_dtype, rank=rank)

    @property
    def module(self) -> nn.Module:
        """The unwrapped network (without DDP)."""
        return getattr(self.model, "module", self.model)

    @property
    def eval_module(self) -> nn.Module:
        """The weights inference will use: the EMA average when enabled, else the model."""
        return self.ema.module if self.ema is not None else self.module

    def train_epoch(self, batches: Iterable[dict[str, torch.Tensor]], epoch: int) -> EpochStats:
        """One pass over ``batches`` (dicts from :func:`decode_slice_batch`).

        Args:
            batches: this worker's batches of the epoch.
            epoch: the 1-based epoch number (seeds the draws).

        Returns:
            This worker's :class:`EpochStats`.
        """
        generator = epoch_generator(self.config.train.seed, epoch, self.rank, self.device)
        stats = EpochStats()
        start = time.perf_counter()
        for batch in batches:
            x0 = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            loss = train_step(self.model, self.optimizer, self.schedule, x0, labels,
                              cond_drop_prob=self.config.train.cond_drop_prob, scaler=self.scaler,
                              amp_dtype=self.amp_dtype, generator=generator, ema=self.ema,
                              max_timestep=self.config.train.max_timestep or None)
            stats.loss_sum += loss * x0.shape[0]
            stats.samples += x0.shape[0]
        stats.seconds = time.perf_counter() - start
        self.epoch = epoch
        return stats

    @torch.no_grad()
    def validation_sums(self, batches: Iterable[dict[str, torch.Tensor]], rank: int = 0,
                        world_size: int = 1) -> tuple[float, int]:
        """Sum of per-row losses and row count over this worker's part of the valid split.

        Every worker is given the whole split and keeps the rows with ``row_key % world_size ==
        rank``; each row is scored with its fixed draw (:func:`validation_draw`) and its true
        label, with :attr:`eval_module` in eval mode.

        Returns:
            (loss_sum, count): divide the sums reduced over all workers to get the mean.
        """
        module = self.eval_module
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        # Validate on the timesteps the model is trained on (train.max_timestep when set).
        t_count = self.config.train.max_timestep or self.config.train.num_train_timesteps
        for batch in batches:
            keys = batch["row_key"].cpu()
            mine = keys % world_size == rank
            if not bool(mine.any()):
                continue
            x0 = batch["image"][mine.to(batch["image"].device)].to(self.device)
            labels = batch["label"][mine.to(batch["label"].device)].to(self.device)
            timesteps, noise = validation_draw(keys[mine], tuple(x0.shape[1:]), t_count,
                                               self.config.train.seed)
            loss = diffusion_loss(module, self.schedule, x0, labels, cond_drop_prob=0.0,
                                  timesteps=timesteps.to(self.device), noise=noise.to(self.device))
            total += float(loss) * x0.shape[0]
            count += x0.shape[0]
        module.train(was_training)
        return total, count

    # ---- checkpoints -------------------------------------------------------------------------

    def train_state(self) -> dict[str, Any]:
        """Everything but the weights needed to continue exactly (tensors and plain values only,
        so that ``torch.load(weights_only=True)`` reads it)."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "best_valid_loss": self.best_valid_loss,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": list(self.history),
            "resumed_at": list(self.resumed_at),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema_n_averaged"] = self.ema.n_averaged.detach().cpu()
        return state

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint folder (layout of :mod:`igconda.checkpoint`)."""
        meta = {"epoch": self.epoch, "best_valid_loss": self.best_valid_loss,
                "torch_version": torch.__version__, **(metadata or {})}
        return ckpt.save_checkpoint(directory, model=self.module, config=self.config,
                                    ema_model=self.ema.module if self.ema is not None else None,
                                    train_state=self.train_state(), metadata=meta)

    def restore(self, directory: str | Path) -> None:
        """Load weights, EMA, optimizer, epoch and RNG state from a checkpoint folder.

        Call before wrapping in DDP. Raises CheckpointError if the stored model config differs.
        """
        directory = Path(directory)
        stored = ckpt.load_checkpoint_config(directory)
        if stored.model != self.config.model:
            raise ckpt.CheckpointError(
                f"{directory}: checkpoint model config {stored.model} differs from the run's "
                f"{self.config.model}; resume with the config the checkpoint was trained with")
        self.module.load_state_dict(ckpt.load_weights(directory / ckpt.MODEL_FILE, self.device))
        state = ckpt.load_train_state(directory)
        if state is None:
            raise ckpt.CheckpointError(f"{directory}: no {ckpt.STATE_FILE}; cannot resume training")
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best_valid_loss = float(state["best_valid_loss"])
        self.history = list(state.get("history", []))
        self.resumed_at = [*state.get("resumed_at", []), self.epoch]
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            ema_file = directory / ckpt.EMA_FILE
            if ema_file.is_file():
                self.ema.module.load_state_dict(ckpt.load_weights(ema_file, self.device))
                self.ema.n_averaged.fill_(int(state.get("ema_n_averaged", torch.tensor(0))))
            else:  # EMA switched on mid-training: start the average from the current weights
                self.ema.module.load_state_dict(self.module.state_dict())


# --------------------------------------------------------------------------------------------
# Ray Train worker
# --------------------------------------------------------------------------------------------


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum float values over all workers (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _all_reduce_max(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def weights_checksum(module: nn.Module) -> float:
    """A float64 fingerprint of the parameters; DDP replicas in sync give the same number."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum().item() for i, p in enumerate(module.parameters())))


def _maybe_inject_fault(fault: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, at the start of ``fault["epoch"]`` on
    ``fault["rank"]``; the marker file makes the restarted worker carry on.

    ``fault["delay_s"]`` waits first, so that Ray's controller has registered the previous
    epoch's checkpoint (a crash right after a report may otherwise win the race, and the run
    restarts from the checkpoint before it, which is correct but not what a test wants)."""
    if not fault or epoch != int(fault["epoch"]) or rank != int(fault.get("rank", 0)):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    time.sleep(float(fault.get("delay_s", 0.0)))
    marker.write_text(f"worker rank {rank} killed at the start of epoch {epoch}\n")
    os._exit(1)


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
        warnings.warn(f"MLflow logging failed at epoch {step}: {err}", stacklevel=2)


def _batches(shard: Any, batch_size: int, device: torch.device, *, shuffle_seed: int | None,
             columns: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    del columns  # the driver selects columns before sharding; kept for readability at call sites
    kwargs: dict[str, Any] = {}
    if shuffle_seed is not None:
        # A local shuffle buffer mixes slices of different patients inside a batch (each Parquet
        # file holds one patient, so unshuffled batches would be single-patient).
        kwargs = {"local_shuffle_buffer_size": max(8 * batch_size, 256), "local_shuffle_seed": shuffle_seed}
    return iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=make_collate_fn(),
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
        print(f"[rank {rank}] resumed from {restored.path} after epoch {session.epoch}", flush=True)
    # prepare_model broadcasts rank 0's weights and wraps in DDP (gloo on CPU, NCCL on GPU).
    session.model = ray.train.torch.prepare_model(session.model)

    train_shard = ray.train.get_dataset_shard("train")
    valid_data = ray.train.get_dataset_shard("valid")
    logger = _make_logger(config.get("mlflow"), rank)
    meta_extra = {"mlflow_run_id": (config.get("mlflow") or {}).get("run_id"),
                  "data_version": config.get("data_version"), "world_size": world_size}

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
        if rank == 0:
            print(f"epoch {epoch}/{train_cfg.epochs} " + " ".join(
                f"{k}={v:.5g}" for k, v in metrics.items() if k != "epoch"), flush=True)

        if not do_checkpoint:
            ray.train.report(metrics)
            continue
        name = f"checkpoint_epoch_{epoch:06d}"
        if rank != 0:  # only rank 0 writes; every rank reports (Ray syncs the folder name)
            ray.train.report(metrics, checkpoint_dir_name=name)
            continue
        with tempfile.TemporaryDirectory(prefix="igconda-ckpt-") as tmp:
            folder = session.save(Path(tmp) / "checkpoint", metadata={
                **meta_extra, "valid_loss": metrics[SCORE_METRIC], "train_loss": metrics["train_loss"],
                "is_best": bool(is_best)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=name)
