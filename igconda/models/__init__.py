"""Networks: the class-conditional diffusion UNet and the baselines' networks."""

from igconda.models.unet import ConditionalUNet, build_unet

__all__ = ["ConditionalUNet", "build_unet"]
