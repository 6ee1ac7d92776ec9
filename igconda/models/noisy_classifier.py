"""The noisy slice classifier p_φ(y | x_t, t) of the DPM + classifier guidance baseline (paper §3.3).

After Wolleb et al. 2022 ("Diffusion models for medical anomaly detection"): the encoder half of
a diffusion UNet, timestep-embedded like it, followed by a small fully connected head, classifies
a NOISED slice x_t at its timestep t as healthy or unhealthy. Its gradient
∇_{x_t} log p_φ(healthy | x_t, t) steers the unconditional DPM's decoding
(:mod:`igconda.diffusion.classifier_guidance`).

The network is MONAI's ``DiffusionModelEncoder``, with the baseline's settings as :class:`NoisyClassifierConfig`'s defaults: 3 levels of 32, 64, 64
channels, attention at levels (0, 1, 1), one residual block per level. MONAI 1.6 defines it in
``monai.networks.nets.diffusion_model_unet`` but does not export it from ``monai.networks.nets``
(that module's ``__all__`` names only the UNet), hence the longer import.

Logit index = schema label − 1 (as :mod:`igconda.baselines.resnet_classifier`): index 0 is healthy
(label 1), index 1 unhealthy (label 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from torch import nn

from igconda.data.schema import HEALTHY, UNHEALTHY

#: Logit index of each class.
HEALTHY_INDEX, UNHEALTHY_INDEX = HEALTHY - 1, UNHEALTHY - 1


@dataclass(frozen=True)
class NoisyClassifierConfig:
    """Architecture of the noisy classifier; the defaults are the baseline's.

    Attributes:
        image_size: (H, W) of the slices; the fully connected head is sized for it.
        channels: channels per level (each level halves H and W).
        attention: one digit per level, 1 = self-attention at that level.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups. 16, not MONAI's 32: with 32 groups the 32-channel level
            has one channel per group, and that norm subtracts the timestep embedding (added as a
            per-channel bias right before it) exactly, so the level would never see t (the same
            trap :func:`igconda.config_rules.validate` refuses for the UNet).
    """

    image_size: tuple[int, int]
    channels: tuple[int, ...] = (32, 64, 64)
    attention: str = "011"
    num_res_blocks: int = 1
    num_head_channels: int = 64
    norm_num_groups: int = 16

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W) > 0, got {self.image_size}")
        if len(self.attention) != len(self.channels) or set(self.attention) - {"0", "1"}:
            raise ValueError(f"attention {self.attention!r} needs one 0/1 digit per level of "
                             f"channels {self.channels}")
        if any(c % self.norm_num_groups or c // self.norm_num_groups < 2 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of norm_num_groups "
                             f"{self.norm_num_groups} with >= 2 channels per group")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists); :meth:`from_dict` reads them back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoisyClassifierConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class NoisyClassifier(nn.Module):
    """``classifier(x_t, t) -> logits``: healthy/unhealthy logits of noised slices.

    Args:
        config: the architecture.
    """

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__()
        self.config = config
        self.encoder = DiffusionModelEncoder(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            input_shape=tuple(config.image_size),
            channels=tuple(config.channels),
            attention_levels=tuple(c == "1" for c in config.attention),
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_num_groups,
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Classify noised slices.

        Args:
            x: (B, 1, H, W) noised slices x_t, (H, W) = ``config.image_size``.
            timesteps: (B,) integer timesteps t in [0, T).

        Returns:
            (B, 2) logits: index 0 healthy, 1 unhealthy.
        """
        if tuple(x.shape[2:]) != tuple(self.config.image_size):
            # The head is sized for image_size: another size fails deep inside with a matmul error.
            raise ValueError(f"the classifier is built for {tuple(self.config.image_size)} slices, "
                             f"got {tuple(x.shape[2:])}")
        return self.encoder(x, timesteps)


def class_indices(labels: torch.Tensor) -> torch.Tensor:
    """(B,) schema labels (1 healthy, 2 unhealthy) → (B,) long logit indices (0, 1)."""
    labels = labels.long()
    if not bool(((labels == HEALTHY) | (labels == UNHEALTHY)).all()):
        raise ValueError(f"labels must be {HEALTHY} (healthy) or {UNHEALTHY} (unhealthy), got "
                         f"{torch.unique(labels).tolist()}")
    return labels - HEALTHY
