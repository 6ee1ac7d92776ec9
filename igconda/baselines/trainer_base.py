"""The interface every trained baseline's trainer implements (no Ray), and what they share.

:class:`BaselineTrainer` is what the Ray Train loop of ``python -m ray_jobs.train_baseline``
(:mod:`ray_jobs.train_baseline_worker`) drives: per-epoch *sums* (``{key: (total, rows)}``, so
that the job can add them over workers before dividing), validation sums, checkpoints and
resuming. :class:`NetworkTrainer` implements it for one network trained by a module with
``train_epoch`` / ``validation_sums`` and a ``save_*`` of
:func:`igconda.checkpoint.save_baseline_checkpoint`. The trainers of each method are
:mod:`igconda.baselines.trainer_methods`'; :mod:`igconda.baselines.trainers` builds them.

Batches are :func:`igconda.train_loop.decode_slice_batch` dicts (``image`` (B, 1, H, W),
``label`` (B,), ``row_key`` (B,) on validation batches, ``mask`` (B, 1, H, W) when
:attr:`BaselineTrainer.with_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from igconda import checkpoint as ckpt
from igconda.config import StudyConfig
from igconda.train_loop import TRAIN_COLUMNS, VALID_COLUMNS

#: Per-epoch sums of a trainer: ``{metric: (total, rows)}``.
Sums = dict[str, tuple[float, float]]


def rows_of_rank(batches: Iterable[Mapping[str, torch.Tensor]], rank: int,
                 world_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The rows of each batch with ``row_key % world_size == rank`` (empty batches skipped):
    every worker reads the whole valid split and each row is scored by exactly one worker."""
    for batch in batches:
        mine = batch["row_key"] % world_size == rank
        if bool(mine.any()):
            yield {k: v[mine.to(v.device)] for k, v in batch.items()}


class BaselineTrainer:
    """The networks, optimizers and progress of one worker for one baseline.

    Attributes:
        with_mask: batches must carry ``mask`` (decode with ``mask=True``).
        train_columns, valid_columns: the slice columns read from each split.
        min_batch_rows: smaller training batches are skipped (BatchNorm needs 2 rows).
        train_filter: a Ray Data expression the train split is filtered by before sharding, or
            None.
        oversample: with ``train.balance_classes``, each epoch repeats the unhealthy slices to
            balance the classes, as IgCONDA's training does (for a network whose loss has no
            class weight: the supervised UNet learns lesions only from unhealthy slices).
        ddp_modules: attribute names of the networks the job wraps in DDP.
        sync_optimizers: optimizers whose gradients the job averages over workers before each
            step (for networks DDP cannot wrap).
        epoch: completed epochs; best_valid_loss, history: as saved in every checkpoint.
    """

    with_mask = False
    train_columns: tuple[str, ...] = TRAIN_COLUMNS
    valid_columns: tuple[str, ...] = VALID_COLUMNS
    min_batch_rows = 1
    train_filter: str | None = None
    oversample = False
    ddp_modules: tuple[str, ...] = ("model",)
    needs_batchnorm_pass = False

    def __init__(self, study: StudyConfig, settings: Any, device: torch.device, rank: int) -> None:
        self.study, self.settings, self.device, self.rank = study, settings, device, rank
        self.epoch, self.best_valid_loss, self.history = 0, math.inf, []
        self.sync_optimizers: list[torch.optim.Optimizer] = []

    @property
    def total_epochs(self) -> int:
        return self.study.baselines.epochs

    def train_epoch(self, batches: Iterable[Mapping[str, torch.Tensor]], epoch: int) -> Sums:
        """One epoch over this worker's batches → ``{metric: (total, rows)}`` (``train_loss``
        always; the same keys on every worker)."""
        raise NotImplementedError

    def validation_sums(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, int] | None:
        """(Σ loss × rows, rows) over validation batches, or None when this epoch's model has no
        comparable validation loss (f-AnoGAN's WGAN-GP stage)."""
        raise NotImplementedError

    def recompute_batchnorm(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Refresh BatchNorm statistics from training batches (only if ``needs_batchnorm_pass``)."""

    def save(self, directory: Path, metadata: dict[str, Any]) -> Path:
        raise NotImplementedError

    def restore(self, directory: Path) -> None:
        raise NotImplementedError

    def progress(self) -> dict[str, Any]:
        """What every checkpoint records of the run (its ``metadata.json``)."""
        return {"epoch": self.epoch, "best_valid_loss": self.best_valid_loss,
                "history": list(self.history)}

    def _restore_progress(self, directory: Path) -> None:
        meta = ckpt.load_metadata(directory)
        self.epoch = int(meta.get("epoch", 0))
        self.best_valid_loss = float(meta.get("best_valid_loss", math.inf))
        self.history = list(meta.get("history", []))


class NetworkTrainer(BaselineTrainer):
    """One network trained by a module with ``train_epoch`` / ``validation_sums`` and a
    ``save_*`` / checkpoint folder of :func:`igconda.checkpoint.save_baseline_checkpoint`."""

    module: Any  # resnet_classifier or supervised
    save_fn: Any

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of the module's ``train_epoch`` / ``validation_sums``."""
        return {}

    def train_epoch(self, batches, epoch):
        batches = (b for b in batches if len(b["image"]) >= self.min_batch_rows)
        stats = self.module.train_epoch(self.model, self.optimizer, batches, device=self.device,
                                        **self.loss_options())
        self.epoch = epoch
        return {"train_loss": (stats.loss_sum, stats.samples)}

    def validation_sums(self, batches):
        return self.module.validation_sums(self.model, batches, device=self.device,
                                           **self.loss_options())

    def save(self, directory, metadata):
        return type(self).save_fn(directory, self.model, self.settings, optimizer=self.optimizer,
                                  epoch=self.epoch, metadata={**self.progress(), **metadata})

    def restore(self, directory):
        settings, weights = ckpt.load_baseline_checkpoint(
            directory, method=self.method, settings_type=type(self.settings), device=self.device)
        getattr(self.model, "module", self.model).load_state_dict(weights)
        self.settings = settings
        self.optimizer.load_state_dict(train_state(directory)["optimizer"])
        self._restore_progress(directory)


def train_state(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``train_state.pt`` (optimizer, epoch); CheckpointError when absent."""
    state = ckpt.load_train_state(directory)
    if state is None:
        raise ckpt.CheckpointError(f"{directory}: no {ckpt.STATE_FILE}; cannot resume training")
    return state
