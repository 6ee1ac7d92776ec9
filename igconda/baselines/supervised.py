"""The supervised upper bound: a 2D MONAI UNet trained on the train split's lesion masks.

Every other method learns from slice labels only (healthy / unhealthy); this one is given the
pixel masks the others never see, so it marks how far a segmentation network gets on the same
slices when it has the answer to learn from. Its map is the sigmoid probability of "lesion".

* :class:`SupervisedConfig`: the network and optimiser settings, stored in its checkpoint;
* :class:`SliceSegmenter`: MONAI's ``UNet`` (instance norm, PReLU: MONAI's defaults) that takes
  slices of any size, zero-padded to a multiple of its total stride and cropped back;
* :func:`create_training` → model and Adam; :func:`train_epoch` / :func:`validation_sums`: one
  worker's epoch over decoded batches (``decode_slice_batch(table, mask=True)`` of
  :data:`TRAIN_COLUMNS`) with :func:`segmentation_loss`, MONAI's ``DiceCELoss`` (sigmoid Dice +
  BCE); the Dice is taken over the whole batch, as most slices have no lesion and a per-slice
  Dice of an empty mask only rewards an exactly empty prediction;
* :func:`save_supervised` / :func:`load_supervised`: the checkpoint folder
  (:func:`igconda.checkpoint.save_baseline_checkpoint`);
* :class:`SupervisedMethod`: the :class:`igconda.anomaly_methods.AnomalyMethod` named ``supervised``.

``python -m ray_jobs.train_baseline --method supervised`` trains it with DDP over Ray Data shards
(:class:`igconda.baselines.trainer_methods.SupervisedTrainer`) and ``python -m ray_jobs.score_method
--method supervised`` scores it on the test split with a τ calibrated on tune; what remains
(issue 10) is the comparison stage that reads every method's scores back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from igconda import checkpoint as ckpt
from igconda.baselines.fitting import loss_sums, seeded
from igconda.baselines.fitting import train_epoch as fit_epoch
from igconda.evaluation import SUPERVISED
from igconda.slice_batch import batch_images
from igconda.train_loop import TRAIN_COLUMNS as DIFFUSION_COLUMNS
from igconda.train_loop import EpochStats

#: The slice columns the training job reads (decode them with ``decode_slice_batch(mask=True)``).
TRAIN_COLUMNS = (*DIFFUSION_COLUMNS, "mask")


@dataclass(frozen=True)
class SupervisedConfig:
    """Settings of the supervised UNet (stored in its checkpoint's ``config.yaml``).

    Attributes:
        channels: feature channels per UNet level (at least two levels).
        strides: downsampling per level transition, one fewer than ``channels``.
        num_res_units: residual units per level (MONAI's ``UNet``).
        lr: Adam learning rate.
        seed: seeds the initial weights.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"need ≥ 2 channel levels and one stride fewer; got channels "
                             f"{self.channels}, strides {self.strides}")
        if min(self.channels) < 1 or min(self.strides) < 1 or self.num_res_units < 0:
            raise ValueError("channels and strides must be positive, num_res_units ≥ 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


class SliceSegmenter(nn.Module):
    """MONAI ``UNet`` for (B, 1, H, W) slices of any size → (B, 1, H, W) lesion logits.

    The input is zero-padded (bottom, right) to a multiple of the product of the strides, which
    the UNet's skip connections need, and the logits are cropped back to (H, W).
    """

    def __init__(self, config: SupervisedConfig) -> None:
        super().__init__()
        self.unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=config.channels,
                         strides=config.strides, num_res_units=config.num_res_units)
        self.multiple = math.prod(config.strides)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.unet(images)[..., :height, :width]


def segmentation_loss() -> nn.Module:
    """Dice + BCE on logits of (B, 1, H, W) against (B, 1, H, W) masks in {0, 1}; the Dice is
    pooled over the batch (``batch=True``)."""
    return DiceCELoss(sigmoid=True, batch=True)


def _batch_loss(loss: nn.Module):
    def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "mask" not in batch:
            raise ValueError("the supervised baseline trains on masks: decode the batches with "
                             "igconda.train_loop.decode_slice_batch(table, mask=True)")
        return loss(model(batch["image"]), batch["mask"])
    return batch_loss


def build_segmenter(config: SupervisedConfig) -> SliceSegmenter:
    """A fresh :class:`SliceSegmenter` whose initial weights depend only on ``config.seed``
    (the global RNG is left as it was)."""
    return seeded(config.seed, lambda: SliceSegmenter(config))


def create_training(config: SupervisedConfig, device: torch.device | str = "cpu",
                    ) -> tuple[SliceSegmenter, torch.optim.Optimizer]:
    """The seeded network on ``device`` and its Adam optimiser."""
    model = build_segmenter(config).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=config.lr)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Iterable[Mapping[str, torch.Tensor]], *,
                device: torch.device | str = "cpu") -> EpochStats:
    """One epoch of Dice + BCE steps over batches with ``image`` and ``mask`` (B, 1, H, W).

    Nothing random happens inside (no dropout): the batches' order is the caller's.
    """
    return fit_epoch(model, optimizer, batches, _batch_loss(segmentation_loss()), device=device)


def validation_sums(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                    device: torch.device | str = "cpu") -> tuple[float, int]:
    """Σ (batch loss × batch size) and row count in eval mode; as the Dice is pooled per
    batch, compare values computed with the same batches (a fixed order and batch size)."""
    return loss_sums(model, batches, _batch_loss(segmentation_loss()), device=device)


def save_supervised(directory: str | Path, model: nn.Module, config: SupervisedConfig, *,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder: weights, ``config``, and ``{epoch, optimizer}`` to resume."""
    return ckpt.save_baseline_checkpoint(directory, method=SUPERVISED, settings=config, model=model,
                                         optimizer=optimizer, epoch=epoch, metadata=metadata)


def load_supervised(directory: str | Path, device: torch.device | str = "cpu",
                    ) -> tuple[SliceSegmenter, SupervisedConfig]:
    """The network of a :func:`save_supervised` folder, in eval mode on ``device``, and its
    config. The optimiser state to resume is :func:`igconda.checkpoint.load_train_state`'s."""
    config, weights = ckpt.load_baseline_checkpoint(directory, method=SUPERVISED,
                                                    settings_type=SupervisedConfig)
    model = SliceSegmenter(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{directory}: weights do not match the stored config: {err}"
                                   ) from None
    return model.to(device).eval(), config


class SupervisedMethod:
    """The supervised UNet as an anomaly method: the map is the sigmoid lesion probability.

    Args:
        model: a trained :class:`SliceSegmenter` on ``device``.
        device: where it runs.
        batch_size: slices per forward pass.
    """

    names = (SUPERVISED,)

    def __init__(self, model: nn.Module, *, device: torch.device | str = "cpu",
                 batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.model, self.device, self.batch_size = model, torch.device(device), int(batch_size)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, device: torch.device | str = "cpu",
                        batch_size: int = 64) -> SupervisedMethod:
        return cls(load_supervised(directory, device)[0], device=device, batch_size=batch_size)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) slices in [0, 1] → (N, H, W) float32 lesion probabilities in [0, 1]."""
        if images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
        out = np.empty(images.shape, dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = np.require(images[start: start + self.batch_size], np.float32, ["C", "W"])
                x = torch.from_numpy(chunk).unsqueeze(1).to(self.device)
                out[start: start + len(chunk)] = torch.sigmoid(self.model(x))[:, 0].float().cpu().numpy()
        self.model.train(was_training)
        return out

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {SUPERVISED: self.probabilities(batch_images(batch))}
