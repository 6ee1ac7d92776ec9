"""The class-conditional diffusion UNet of IgCONDA-PET (paper §2.2).

MONAI's ``DiffusionModelUNet`` (2D) with class tokens 0 = unconditional, 1 = healthy,
2 = unhealthy, reaching the network in one of two ways (``model.conditioning``):

- ``cross_attention`` (the paper's): one token from ``nn.Embedding(3, D, padding_idx=0)`` that
  the attention levels and the mid block attend to; token 0 is the fixed zero vector
  (``padding_idx`` keeps it at zero and out of the gradient). MONAI's mid block always carries
  cross-attention, so the (000) variant is still conditioned.
- ``class_embedding``: MONAI's ``num_class_embeds``, a learned vector per class added to the
  timestep embedding, so every residual block is modulated by the class (as in Ho & Salimans'
  classifier-free guidance); token 0 is a learned null vector.
- ``both``.

``none`` builds the same UNet with no class input at all: the attention levels and the mid block
use self-attention, and ``forward`` ignores the labels, so the DDIM code (which passes token 0)
and the training loss run unchanged. That is the unconditional DPM of the DPM + classifier
guidance baseline (paper §3.3, :mod:`igconda.diffusion.classifier_guidance`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from igconda.config import ModelConfig
from igconda.models.attention_precision import use_float32_attention_in_cpu_training

UNCONDITIONAL, HEALTHY, UNHEALTHY = 0, 1, 2


class ConditionalUNet(nn.Module):
    """UNet + class-token embedding in one module, so one state dict holds both.

    Args:
        config: the model section of the study config.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cross_attention = config.conditioning in ("cross_attention", "both")
        self.class_embeds = config.conditioning in ("class_embedding", "both")
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=tuple(config.channels),
            attention_levels=tuple(c == "1" for c in config.attention),
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_num_groups,
            with_conditioning=self.cross_attention,
            cross_attention_dim=config.embedding_dim if self.cross_attention else None,
            num_class_embeds=3 if self.class_embeds else None,
            use_flash_attention=config.use_flash_attention,
        )
        # bf16 attention's backward is slow on CPUs; see igconda.models.attention_precision.
        use_float32_attention_in_cpu_training(self.unet)
        # The cross-attention token; the class-embedding path's table lives inside the UNet.
        self.class_embedding = (nn.Embedding(3, config.embedding_dim, padding_idx=UNCONDITIONAL)
                                if self.cross_attention else None)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: (B, 1, H, W) noisy images.
            timesteps: (B,) integer training timesteps in [0, T).
            labels: (B,) long class tokens in {0, 1, 2}.

        Returns:
            (B, 1, H, W) predicted noise ε.
        """
        labels = labels.long()
        context = self.class_embedding(labels).unsqueeze(1) if self.cross_attention else None  # (B, 1, D)
        class_labels = labels if self.class_embeds else None
        return self.unet(x, timesteps=timesteps, context=context, class_labels=class_labels)


def build_unet(config: ModelConfig) -> ConditionalUNet:
    """Factory used by training, inference and tests."""
    return ConditionalUNet(config)
