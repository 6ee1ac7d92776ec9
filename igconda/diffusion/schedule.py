"""The forward (noising) process of the DDPM: a fixed variance schedule (paper §2.1).

Notation (<variable name> -> <symbol in Ho et al. 2020 / the IgCONDA-PET paper>):

- ``num_train_timesteps`` -> T, the number of training timesteps (1000 in the paper)
- ``t`` -> t ∈ {0, …, T − 1}, a training timestep (the network's time input)
- ``betas[t]`` -> β_t, the variance added at step t (linear from β_1 = 1e-4 to β_T = 0.02)
- ``alphas_cumprod[t]`` -> ᾱ_t = ∏_{i ≤ t} (1 − β_i), the signal level at timestep t
- ``x0`` -> x_0, a clean image; ``noise`` -> ε ~ N(0, I)
- ``add_noise(x0, noise, t)`` -> x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε (Ho et al. Eq. 4)

Indexing follows MONAI (and diffusers): index 0 is the first noising step, so ``alphas_cumprod[0]``
= 1 − β_0 < 1, not 1. The DDIM code in :mod:`igconda.diffusion.ddim` uses the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import NoiseSchedules

from igconda.config import TrainConfig


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A DDPM variance schedule: β_t and ᾱ_t for t = 0 … T − 1, in float64.

    Float64 keeps ᾱ_t accurate near t = T − 1 (where it is ≈ 4e-5) and makes the DDIM coefficients
    √ᾱ_t and √(1 − ᾱ_t) exact to float32 precision; they are cast to the image dtype when used.

    Attributes:
        num_train_timesteps: T.
        betas: (T,) float64 β_t.
        alphas_cumprod: (T,) float64 ᾱ_t.
    """

    num_train_timesteps: int
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        t = self.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, int) or t < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {t!r}")
        for name in ("betas", "alphas_cumprod"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != (t,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a ({t},) tensor, got {shape}")
            if value.dtype != torch.float64:
                raise ValueError(f"{name} must be float64, got {value.dtype}")
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")

    @classmethod
    def linear(cls, num_train_timesteps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
        """Linear β_t from ``beta_start`` to ``beta_end``, exactly as MONAI's ``linear_beta``.

        The betas come from MONAI's own schedule function (a float32 ``linspace``), so a model
        trained with MONAI's ``DDPMScheduler`` (as the reference code's was) sees the same β_t; the
        cumulative product is then taken in float64.

        Args:
            num_train_timesteps: T (>= 2).
            beta_start: β at t = 0, in (0, beta_end).
            beta_end: β at t = T − 1, in (beta_start, 1).
        """
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        betas = NoiseSchedules["linear_beta"](
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end
        ).to(torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(num_train_timesteps, betas, alphas_cumprod)

    @classmethod
    def from_config(cls, config: TrainConfig) -> NoiseSchedule:
        """The schedule of a study's training section (T, beta_start, beta_end)."""
        return cls.linear(config.num_train_timesteps, config.beta_start, config.beta_end)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.

        Args:
            x0: (B, ...) clean images.
            noise: ε, same shape as ``x0``.
            t: (B,) integer timesteps in [0, T).

        Returns:
            x_t, same shape and dtype as ``x0``.
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor, got {t.dtype}")
        abar = self.alphas_cumprod.to(x0.device)[t.to(x0.device).long()]
        shape = (-1,) + (1,) * (x0.ndim - 1)
        signal = abar.sqrt().to(x0.dtype).reshape(shape)
        sigma = (1.0 - abar).sqrt().to(x0.dtype).reshape(shape)
        return signal * x0 + sigma * noise.to(x0.dtype)
