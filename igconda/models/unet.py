"""The class-conditional diffusion UNet of IgCONDA-PET (paper §2.2).

MONAI's ``DiffusionModelUNet`` (2D) conditioned by cross-attention on one class token from
``nn.Embedding(3, D, padding_idx=0)``: 0 = unconditional (its row is the fixed zero vector, as
``padding_idx`` keeps it at zero and out of the gradient), 1 = healthy, 2 = unhealthy. MONAI's mid
block always carries cross-attention, so the (000) variant is still conditioned.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from igconda.config import ModelConfig

UNCONDITIONAL, HEALTHY, UNHEALTHY = 0, 1, 2


class ConditionalUNet(nn.Module):
    """UNet + class-token embedding in one module, so one state dict holds both.

    Args:
        config: the model section of the study config.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=tuple(config.channels),
            attention_levels=tuple(c == "1" for c in config.attention),
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_num_groups,
            with_conditioning=True,
            cross_attention_dim=config.embedding_dim,
            use_flash_attention=config.use_flash_attention,
        )
        self.class_embedding = nn.Embedding(3, config.embedding_dim, padding_idx=UNCONDITIONAL)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: (B, 1, H, W) noisy images.
            timesteps: (B,) integer training timesteps in [0, T).
            labels: (B,) long class tokens in {0, 1, 2}.

        Returns:
            (B, 1, H, W) predicted noise ε.
        """
        context = self.class_embedding(labels.long()).unsqueeze(1)  # (B, 1, D)
        return self.unet(x, timesteps=timesteps, context=context)


def build_unet(config: ModelConfig) -> ConditionalUNet:
    """Factory used by training, inference and tests."""
    return ConditionalUNet(config)
