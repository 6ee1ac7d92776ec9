"""The training session of one worker and the pure pieces it is built from, without Ray.

:class:`TrainingSession` holds the model, optimizer, EMA and noise schedule of one worker, runs
an epoch over decoded batches, scores its part of the valid split, and saves and restores
checkpoints. The Ray Train worker function that drives it (``train_func``: DDP, Ray Data shards,
reporting and checkpointing to Ray Train) lives with the job, in ``ray_jobs/train_worker.py``;
the maths lives in :mod:`igconda.diffusion.training`. Everything here runs in a plain process
(see ``tests/test_train_loop.py``).

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
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from igconda import checkpoint as ckpt
from igconda.accel import compile_in_place
from igconda.config import StudyConfig
from igconda.data import schema
from igconda.data.io import DATASET_INFO, filesystem, join_path, slices_root
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
#: The key of a checkpoint's ``metadata.json`` holding :func:`dataset_version` of its training
#: data (held to it by ``--resume``: ``ray_jobs.train_runs.check_resume_data``).
DATA_VERSION_KEY = "data_version"


# --------------------------------------------------------------------------------------------
# Data: Arrow batches of the slice schema -> tensors
# --------------------------------------------------------------------------------------------


def decode_slice_batch(table: pa.Table, *, mask: bool = False) -> dict[str, torch.Tensor]:
    """Decode a batch of slice rows into tensors.

    Args:
        table: rows of :data:`igconda.data.schema.SLICE_SCHEMA` (at least ``image``, ``label``,
            ``height``, ``width``; ``patient_id`` and ``slice_index`` are used when present).
        mask: also decode the ``mask`` column (only the supervised baseline trains on it).

    Returns:
        ``image`` (B, 1, H, W) float32, ``label`` (B,) int64, with ``mask`` the lesion masks
        ``mask`` (B, 1, H, W) float32 in {0, 1}, and, when the table has ``patient_id`` and
        ``slice_index``, ``row_key`` (B,) int64: a stable 31-bit hash of the pair that fixes the
        row's validation draw and its validation worker.

    Raises:
        ValueError: if the batch mixes slice sizes, labels are outside {1, 2}, or ``mask`` is
            asked for and the table has no ``mask`` column.
    """
    if table.num_rows == 0:
        raise ValueError("empty batch")
    h, w = schema.slice_shape_of(table["height"], table["width"])
    images = schema.stack_images(table["image"], h, w)
    labels = table["label"].to_numpy().astype(np.int64)
    if not np.isin(labels, (schema.HEALTHY, schema.UNHEALTHY)).all():
        raise ValueError(f"labels must be 1 (healthy) or 2 (unhealthy), got {np.unique(labels).tolist()}")
    # stack_images is a zero-copy view of Arrow's read-only buffer; copy once into torch memory.
    out = {"image": torch.from_numpy(np.array(images, dtype=np.float32, copy=True)).unsqueeze(1),
           "label": torch.from_numpy(labels)}
    if mask:
        if "mask" not in table.column_names:
            raise ValueError(f"the batch has no 'mask' column (it has {table.column_names})")
        masks = schema.stack_images(table["mask"], h, w)
        out["mask"] = torch.from_numpy((masks > 0).astype(np.float32)).unsqueeze(1)
    if "patient_id" in table.column_names and "slice_index" in table.column_names:
        out["row_key"] = row_keys(table["patient_id"].to_pylist(), table["slice_index"].to_pylist())
    return out


def row_keys(patient_ids: Iterable[str], slice_indices: Iterable[int]) -> torch.Tensor:
    """Stable (B,) int64 keys of ``(patient_id, slice_index)`` pairs (CRC-32, same on every
    machine and Python process, unlike ``hash``)."""
    keys = [zlib.crc32(f"{p}\x00{int(s)}".encode()) for p, s in zip(patient_ids, slice_indices, strict=True)]
    return torch.tensor(keys, dtype=torch.int64)


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

    fs, root = filesystem(data_dir)
    digest = hashlib.sha256()
    summary = join_path(root, DATASET_INFO)
    if fs.get_file_info(summary).type == pafs.FileType.File:
        with fs.open_input_stream(summary) as f:
            digest.update(f.read())
        return "dataset.json:" + digest.hexdigest()[:16]
    infos = fs.get_file_info(pafs.FileSelector(slices_root(root), recursive=True))
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
    def create(cls, config: StudyConfig, device: torch.device | str = "cpu", rank: int = 0,
               compile: bool | None = None) -> TrainingSession:
        """A fresh session: weights initialised from ``train.seed`` (identical on every rank).

        ``compile`` (default ``train.compile``) compiles the network's forward in place
        (:func:`igconda.accel.compile_in_place`): checkpoints keep their keys, DDP can still wrap
        it, and the EMA copy (made first) stays eager, as it only runs validation.
        """
        device = torch.device(device)
        torch.manual_seed(config.train.seed)
        model = build_unet(config.model).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
        amp_dtype, scaler = amp_settings(device, enabled=config.train.amp)
        ema = make_ema(model, config.train.ema_decay)
        if config.train.compile if compile is None else compile:
            compile_in_place(model)
        return cls(config=config, model=model, optimizer=optimizer,
                   schedule=NoiseSchedule.from_config(config.train), device=device,
                   ema=ema, scaler=scaler, amp_dtype=amp_dtype, rank=rank)

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


def weights_checksum(module: nn.Module) -> float:
    """A float64 fingerprint of the parameters; DDP replicas in sync give the same number."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum().item() for i, p in enumerate(module.parameters())))
