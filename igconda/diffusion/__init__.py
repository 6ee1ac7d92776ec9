"""Diffusion maths: the noise schedule, the DDPM training step, strided DDIM counterfactuals.

Pure PyTorch: nothing here imports Ray or MLflow.
"""

from igconda.diffusion.ddim import (
    CONTROL,
    MAP_KINDS,
    anomaly_map,
    anomaly_maps,
    counterfactual,
    counterfactual_pair,
    ddim_decode,
    ddim_decode_pair,
    ddim_encode,
    network_evaluations,
    timestep_grid,
)
from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import (
    amp_settings,
    diffusion_loss,
    fixed_validation_draw,
    make_ema,
    train_step,
)

__all__ = [
    "CONTROL",
    "MAP_KINDS",
    "NoiseSchedule",
    "amp_settings",
    "anomaly_map",
    "anomaly_maps",
    "counterfactual",
    "counterfactual_pair",
    "ddim_decode",
    "ddim_decode_pair",
    "ddim_encode",
    "diffusion_loss",
    "fixed_validation_draw",
    "make_ema",
    "network_evaluations",
    "timestep_grid",
    "train_step",
]
