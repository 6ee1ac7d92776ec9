"""Tests of igconda.diffusion; shared tiny-model helper below."""

from __future__ import annotations

import torch

from igconda.config import ModelConfig
from igconda.models import ConditionalUNet, build_unet

TINY_MODEL = ModelConfig(
    channels=(16, 16), attention="01", num_head_channels=8, embedding_dim=16, norm_num_groups=8
)


def tiny_model(seed: int = 0, config: ModelConfig = TINY_MODEL) -> ConditionalUNet:
    """A deterministic, untrained 16-channel UNet for 16 × 16 images (eval mode)."""
    torch.manual_seed(seed)
    model = build_unet(config)
    # MONAI zero-initialises the output conv, the second conv of each residual block and the
    # attention projections, so an untrained model predicts ε = 0 whatever the label. Randomise
    # every all-zero weight so tests see a non-trivial, label-dependent ε (the class embedding's
    # row 0 is part of a non-zero matrix and stays the fixed zero vector).
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return model.eval()
