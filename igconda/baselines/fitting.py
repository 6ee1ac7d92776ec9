"""Training pieces shared by the trained baselines: seeded initial weights, one epoch of
gradient steps, and a loss over held-out batches.

The supervised UNet (:mod:`igconda.baselines.supervised`) and the ResNet-18 classifier
(:mod:`igconda.baselines.resnet_classifier`) differ only in what they compute from a batch; the
loop around it (device transfer, optimiser step, the per-epoch sums a Ray Train job reduces
over workers) is this module's. Batches are dicts of tensors as
:func:`igconda.train_loop.decode_slice_batch` gives them: ``image`` (B, 1, H, W), ``label``
(B,) and, decoded with ``mask=True``, ``mask`` (B, 1, H, W).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import torch
from torch import nn

from igconda.train_loop import EpochStats

#: ``batch_loss(model, batch) -> scalar``: the mean loss of one batch already on the device.
BatchLoss = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)


def seeded(seed: int, build: Callable[[], ModelT]) -> ModelT:
    """``build()`` with torch's CPU generator seeded by ``seed``, so that the initial weights
    depend on the seed alone; the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _on(device: torch.device | str, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Iterable[Mapping[str, torch.Tensor]], batch_loss: BatchLoss, *,
                device: torch.device | str = "cpu") -> EpochStats:
    """One pass of optimiser steps over ``batches``, the model in training mode.

    Args:
        model: the network (possibly DDP-wrapped), already on ``device``.
        optimizer: over its parameters.
        batches: this worker's batches of the epoch, in the order to use them.
        batch_loss: the mean loss of one batch.
        device: where the batches are moved.

    Returns:
        :class:`~igconda.train_loop.EpochStats`: Σ (batch loss × batch size), rows, seconds.
    """
    stats = EpochStats()
    start = time.perf_counter()
    model.train()
    for batch in batches:
        batch = _on(device, batch)
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rows = len(batch["image"])
        stats.loss_sum += float(loss.detach()) * rows
        stats.samples += rows
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def loss_sums(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
              batch_loss: BatchLoss, *, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Σ (batch loss × batch size) and the row count over ``batches``, the model in eval mode
    (its mode is restored after). Divide the sums reduced over workers to get the mean."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = _on(device, batch)
        rows = len(batch["image"])
        total += float(batch_loss(model, batch)) * rows
        count += rows
    model.train(was_training)
    return total, count
