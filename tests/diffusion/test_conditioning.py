"""Training-design options: the class-conditioning path and the trained timestep range."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from igconda.config import ConfigError, StudyConfig, load_config
from igconda.config_rules import CONDITIONINGS
from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import diffusion_loss
from igconda.models import build_unet
from tests.diffusion import TINY_MODEL


def _model(conditioning: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_unet(dataclasses.replace(TINY_MODEL, conditioning=conditioning)).eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv: make the output depend on c
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_conditioning_path_makes_the_class_matter(conditioning):
    model = _model(conditioning)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 3])
    with torch.no_grad():
        outputs = [model(x, t, torch.full((2,), c)) for c in (0, 1, 2)]
    assert outputs[0].shape == (2, 1, 16, 16)
    assert not torch.allclose(outputs[1], outputs[2])  # healthy != unhealthy
    assert not torch.allclose(outputs[0], outputs[1])  # conditional != unconditional


def test_class_embedding_has_no_cross_attention_token():
    model = _model("class_embedding")
    assert model.class_embedding is None
    assert model.unet.class_embedding.num_embeddings == 3
    both = _model("both")
    assert both.class_embedding is not None and both.unet.class_embedding is not None


def test_unknown_conditioning_is_refused():
    with pytest.raises(ConfigError, match="model.conditioning"):
        load_config(None, {"model": {"conditioning": "film"}})


def test_timesteps_drawn_below_max_timestep():
    schedule = NoiseSchedule.linear(1000, 1e-4, 2e-2)
    seen = []

    def spy(x, t, c):
        seen.append(t.clone())
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        diffusion_loss(spy, schedule, torch.rand(16, 1, 8, 8), torch.ones(16, dtype=torch.long),
                       cond_drop_prob=0.0, generator=g, max_timestep=50)
    drawn = torch.cat(seen)
    assert int(drawn.max()) < 50 and int(drawn.min()) >= 0
    assert len(torch.unique(drawn)) > 40  # the whole range is used
    with pytest.raises(ValueError, match="max_timestep"):
        diffusion_loss(spy, schedule, torch.rand(2, 1, 8, 8), torch.ones(2, dtype=torch.long),
                       cond_drop_prob=0.0, max_timestep=2000)


def test_noise_levels_must_lie_in_the_trained_range():
    with pytest.raises(ConfigError, match="infer.noise_level"):
        load_config(None, {"train": {"max_timestep": 300}, "infer": {"noise_level": 400}})
    with pytest.raises(ConfigError, match="tune.noise_levels"):
        load_config(None, {"train": {"max_timestep": 450},
                           "infer": {"noise_level": 400}, "tune": {"noise_levels": [400, 500]}})
    with pytest.raises(ConfigError, match="train.max_timestep"):
        load_config(None, {"train": {"max_timestep": 1}})
    ok = load_config(None, {"train": {"max_timestep": 601}})
    assert isinstance(ok, StudyConfig) and ok.train.max_timestep == 601


def test_one_channel_groups_are_refused():
    """GroupNorm with one channel per group subtracts MONAI's per-channel timestep bias exactly."""
    with pytest.raises(ConfigError, match="norm_num_groups 16 leaves one channel"):
        load_config(None, {"model": {"channels": [16, 16], "attention": "01", "norm_num_groups": 16,
                                     "num_head_channels": 8}})


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_timestep_reaches_the_output(conditioning):
    """Why the check above exists: with >= 2 channels per group, t changes the prediction."""
    model = _model(conditioning)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        early = model(x, torch.tensor([1, 1]), torch.tensor([1, 1]))
        late = model(x, torch.tensor([8, 8]), torch.tensor([1, 1]))
    assert float((early - late).abs().mean() / early.abs().mean()) > 1e-3
