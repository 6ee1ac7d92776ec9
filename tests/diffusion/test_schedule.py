"""NoiseSchedule: equal to MONAI's linear_beta DDPMScheduler, and the forward process."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from igconda.config import TrainConfig
from igconda.diffusion.schedule import NoiseSchedule


@pytest.mark.parametrize("T, beta_start, beta_end", [(1000, 1e-4, 2e-2), (10, 1e-4, 2e-2), (50, 5e-4, 1e-2)])
def test_schedule_equals_monai(T, beta_start, beta_end):
    ours = NoiseSchedule.from_config(
        TrainConfig(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end)
    )
    monai = DDPMScheduler(
        num_train_timesteps=T, schedule="linear_beta", beta_start=beta_start, beta_end=beta_end
    )
    assert ours.num_train_timesteps == T
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert ours.betas.shape == ours.alphas_cumprod.shape == (T,)
    # Same β_t bit for bit (MONAI's float32 linspace), ᾱ_t to float32 precision (ours is float64).
    assert torch.equal(ours.betas.float(), monai.betas)
    torch.testing.assert_close(ours.alphas_cumprod.float(), monai.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_paper_schedule_endpoints():
    s = NoiseSchedule.from_config(TrainConfig())
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(2e-2, rel=1e-6)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert bool((s.alphas_cumprod.diff() < 0).all())
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_add_noise_equals_monai():
    T = 50
    ours = NoiseSchedule.linear(T, 1e-4, 2e-2)
    monai = DDPMScheduler(num_train_timesteps=T, schedule="linear_beta")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 7, 30, 49])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), monai.add_noise(x0, noise, t))
    # Per-sample levels: t = 0 keeps almost all of the signal, t = T - 1 almost none.
    xt = ours.add_noise(x0, noise, t)
    assert torch.allclose(xt[0], x0[0], atol=0.05)
    assert not torch.allclose(xt[3], x0[3], atol=0.3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train_timesteps=1, beta_start=1e-4, beta_end=2e-2), "num_train_timesteps"),
        (dict(num_train_timesteps=10, beta_start=2e-2, beta_end=1e-4), "beta_start"),
        (dict(num_train_timesteps=10, beta_start=1e-4, beta_end=1.5), "beta_end"),
    ],
)
def test_invalid_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear(**kwargs)


def test_invalid_add_noise():
    s = NoiseSchedule.linear(10, 1e-4, 2e-2)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="noise shape"):
        s.add_noise(x0, torch.zeros(2, 1, 4, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t must have shape"):
        s.add_noise(x0, torch.zeros_like(x0), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        s.add_noise(x0, torch.zeros_like(x0), torch.tensor([0.0, 1.0]))


def test_schedule_is_frozen():
    s = NoiseSchedule.linear(10, 1e-4, 2e-2)
    with pytest.raises(AttributeError):
        s.num_train_timesteps = 5  # type: ignore[misc]
