"""Training the noisy slice classifier of the DPM + classifier guidance baseline, pure PyTorch.

The classifier p_φ(y | x_t, t) (:class:`igconda.models.noisy_classifier.NoisyClassifier`) must
classify slices at every noise level the guided decoder visits, so it is trained on noised
slices, as in Wolleb et al. 2022 / Dhariwal & Nichol 2021:

- t ~ U{0, …, T − 1}, ε ~ N(0, I), x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (the DPM's own schedule,
  :meth:`igconda.diffusion.schedule.NoiseSchedule.add_noise`);
- loss = cross-entropy(p_φ(· | x_t, t), y) with y the slice label (1 healthy, 2 unhealthy of
  :mod:`igconda.data.schema`, logit index y − 1).

:func:`train_classifier_epoch` runs one worker's epoch over decoded batches (the dicts of
:func:`igconda.train_loop.decode_slice_batch`), as :meth:`igconda.train_loop.TrainingSession.
train_epoch` does for the DPM, so a Ray Train job can drive it the same way (wrap the classifier
in DDP, feed its shard, all-reduce the returned sums). For a validation score comparable across
epochs, pass fixed ``timesteps`` and ``noise`` to :func:`evaluate_classifier` (e.g. from
:func:`igconda.train_loop.validation_draw`). Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from igconda.diffusion.schedule import NoiseSchedule
from igconda.models.noisy_classifier import class_indices


@dataclass
class ClassifierStats:
    """Sums over the slices one worker saw (reduce over workers by summing each field)."""

    loss_sum: float = 0.0  # Σ per-slice cross-entropy
    correct: int = 0  # slices whose arg-max logit is their class
    samples: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else float("nan")

    def add(self, losses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += float(losses.detach().sum())
        self.correct += int((logits.detach().argmax(dim=1) == targets).sum())
        self.samples += int(targets.numel())


def noised_logits(
    classifier: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The classifier's logits of noised slices x_t ~ q(x_t | x_0) at their timesteps.

    Random draws, in this order and from ``generator`` when given: timesteps (unless given), then
    noise (unless given). A generator draws on its own device; the draws then move to ``x0``'s.

    Args:
        classifier: ``classifier(x_t (B,1,H,W), t (B,)) -> (B, 2)`` logits (or its DDP wrapper).
        schedule: the DPM's noise schedule.
        x0: (B, 1, H, W) clean slices.
        generator: optional RNG for the draws.
        timesteps: optional (B,) integer timesteps in [0, T).
        noise: optional (B, 1, H, W) ε.

    Returns:
        (B, 2) logits.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, 1, H, W), got shape {tuple(x0.shape)}")
    batch, device = x0.shape[0], x0.device
    draw_on = generator.device if generator is not None else device
    if timesteps is None:
        timesteps = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator,
                                  device=draw_on)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=torch.float32)
    timesteps = timesteps.to(device).long()
    x_t = schedule.add_noise(x0, noise.to(device=device, dtype=x0.dtype), timesteps)
    return classifier(x_t, timesteps)


def train_classifier_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    stats: ClassifierStats | None = None,
) -> float:
    """One optimisation step on one batch of noised slices: forward, cross-entropy, backward, step.

    Args:
        classifier: the (possibly DDP-wrapped) classifier, put in train mode here.
        optimizer: e.g. ``torch.optim.Adam(classifier.parameters(), lr)``.
        schedule: the DPM's noise schedule.
        x0: (B, 1, H, W) clean slices on the classifier's device.
        labels: (B,) schema labels, 1 healthy / 2 unhealthy.
        generator: optional RNG for t and ε.
        stats: optional running sums, updated with this batch.

    Returns:
        The batch's mean loss as a Python float.
    """
    targets = class_indices(labels).to(x0.device)
    classifier.train()
    optimizer.zero_grad(set_to_none=True)
    logits = noised_logits(classifier, schedule, x0, generator=generator)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = losses.mean()
    loss.backward()
    optimizer.step()
    if stats is not None:
        stats.add(losses, logits, targets)
    return float(loss.detach())


def train_classifier_epoch(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> ClassifierStats:
    """One worker's pass over ``batches``: a :func:`train_classifier_step` per batch.

    Args:
        classifier: the (possibly DDP-wrapped) classifier on ``device``.
        optimizer: its optimizer.
        schedule: the DPM's noise schedule.
        batches: dicts with ``image`` (B, 1, H, W) and ``label`` (B,), e.g. from
            :func:`igconda.train_loop.decode_slice_batch`.
        generator: the epoch's RNG (e.g. :func:`igconda.train_loop.epoch_generator`), so a
            resumed run draws what the uninterrupted one would have.
        device: where the classifier lives.

    Returns:
        This worker's loss and accuracy sums over the epoch's training draws.
    """
    stats = ClassifierStats()
    for batch in batches:
        train_classifier_step(classifier, optimizer, schedule,
                              batch["image"].to(device, non_blocking=True),
                              batch["label"].to(device, non_blocking=True),
                              generator=generator, stats=stats)
    return stats


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    stats: ClassifierStats | None = None,
) -> ClassifierStats:
    """Cross-entropy and accuracy of one batch at fixed draws (eval mode: no dropout).

    Args:
        classifier: the classifier.
        schedule: the DPM's noise schedule.
        x0: (B, 1, H, W) clean slices; labels: (B,) schema labels.
        timesteps: (B,) the fixed t of each slice; noise: (B, 1, H, W) its fixed ε.
        stats: running sums to add to (a new one when None).

    Returns:
        ``stats`` with this batch added.
    """
    stats = stats if stats is not None else ClassifierStats()
    targets = class_indices(labels).to(x0.device)
    was_training = classifier.training
    classifier.eval()
    try:
        logits = noised_logits(classifier, schedule, x0, timesteps=timesteps, noise=noise)
        stats.add(F.cross_entropy(logits.float(), targets, reduction="none"), logits, targets)
    finally:
        classifier.train(was_training)
    return stats
