"""Diffusion maths: the noise schedule, the DDPM training step, strided DDIM counterfactuals.

Pure PyTorch: nothing here imports Ray or MLflow.
"""

from igconda.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule"]
