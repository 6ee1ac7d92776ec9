"""DPM + classifier guidance baseline: the unconditional DPM, the noisy classifier and its
training, the direction of the guidance gradient, the dpm_cg maps and the checkpoint round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from igconda import checkpoint as ckpt
from igconda.baselines.dpm_classifier_guidance import (
    DPMClassifierGuidanceMethod,
    load_noisy_classifier,
    save_noisy_classifier,
)
from igconda.config import ConfigError
from igconda.data.schema import HEALTHY, UNHEALTHY
from igconda.diffusion.classifier_guidance import (
    classifier_guided_counterfactual,
    classifier_guided_decode,
    guidance_gradient,
)
from igconda.diffusion.classifier_training import (
    evaluate_classifier,
    train_classifier_epoch,
)
from igconda.diffusion.counterfactual import counterfactual
from igconda.diffusion.ddim import ddim_decode, ddim_encode, ddim_step
from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import train_step
from igconda.evaluation import DPM_CG, METHOD_TITLES
from igconda.models.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from tests.diffusion import TINY_MODEL, tiny_model

T, D, STRIDE, SIZE = 10, 8, 2, 16  # configs/test.yaml's T and slice size
UNCONDITIONAL_MODEL = dataclasses.replace(TINY_MODEL, conditioning="none")


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(T, 1e-4, 2e-2)


@pytest.fixture(scope="module")
def dpm() -> nn.Module:
    """The unconditional DPM: IgCONDA's tiny UNet without class input, non-zero output."""
    return tiny_model(seed=0, config=UNCONDITIONAL_MODEL)


def _classifier(seed: int = 0) -> NoisyClassifier:
    torch.manual_seed(seed)
    return NoisyClassifier(NoisyClassifierConfig(image_size=(SIZE, SIZE)))


class MeanIntensityClassifier(nn.Module):
    """A hand-built p(y | x_t, t): log p(healthy) decreases with the slice's mean intensity."""

    def __init__(self, slope: float = 4.0):
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([-self.slope * mean, self.slope * mean], dim=1)


def _slices(n: int, bright: bool, seed: int = 0) -> torch.Tensor:
    """(n, 1, 16, 16) slices: a dim body, with a hot 6 × 6 lesion when ``bright``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.05 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    if bright:
        x[:, :, 5:11, 5:11] = 0.9
    return x


# --- the unconditional DPM ------------------------------------------------------------------


def test_unconditioned_unet_ignores_labels_and_trains_with_the_ddpm_loss(dpm, schedule, test_config):
    config = test_config.replace("model", conditioning="none")
    assert config.model.conditioning == "none"
    with pytest.raises(ConfigError, match="model.conditioning"):
        test_config.replace("model", conditioning="nothing")
    x, t = torch.randn(2, 1, SIZE, SIZE), torch.tensor([3, 7])
    with torch.no_grad():
        outputs = [dpm(x, t, torch.full((2,), c)) for c in (0, 1, 2)]
        other_t = dpm(x, torch.tensor([0, 9]), torch.zeros(2, dtype=torch.long))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0], other_t)  # the timestep still reaches the output
    model = tiny_model(seed=1, config=UNCONDITIONAL_MODEL)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, torch.optim.Adam(model.parameters(), 1e-3), schedule,
                      _slices(4, True), torch.full((4,), UNHEALTHY), cond_drop_prob=0.15,
                      generator=torch.Generator().manual_seed(0))
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --- the noisy classifier --------------------------------------------------------------------


def test_classifier_returns_two_logits_and_refuses_other_sizes():
    classifier = _classifier().eval()
    logits = classifier(torch.rand(5, 1, SIZE, SIZE), torch.randint(0, T, (5,)))
    assert logits.shape == (5, 2) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="built for"):
        classifier(torch.rand(1, 1, 32, 32), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="norm_num_groups"):
        NoisyClassifierConfig(image_size=(SIZE, SIZE), norm_num_groups=32)  # 1 channel per group


def test_training_steps_change_weights_and_lower_the_loss(schedule):
    images = torch.cat([_slices(16, False, seed=1), _slices(16, True, seed=2)])
    labels = torch.tensor([HEALTHY] * 16 + [UNHEALTHY] * 16)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    batches = [{"image": images[order[i:i + 8]], "label": labels[order[i:i + 8]]}
               for i in range(0, 32, 8)]
    draw = torch.Generator().manual_seed(1)
    timesteps, noise = torch.randint(0, T, (32,), generator=draw), torch.randn(32, 1, SIZE, SIZE, generator=draw)
    classifier = _classifier(seed=3)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    before_weights = [p.detach().clone() for p in classifier.parameters()]
    before = evaluate_classifier(classifier, schedule, images, labels, timesteps=timesteps, noise=noise)
    generator = torch.Generator().manual_seed(2)
    epochs = [train_classifier_epoch(classifier, optimizer, schedule, batches, generator=generator)
              for _ in range(3)]
    after = evaluate_classifier(classifier, schedule, images, labels, timesteps=timesteps, noise=noise)
    assert all(e.samples == 32 for e in epochs)
    assert any(not torch.equal(a, b) for a, b in zip(before_weights, classifier.parameters(), strict=True))
    assert after.loss < 0.5 * before.loss, (before.loss, after.loss)
    assert after.accuracy == 1.0
    with pytest.raises(ValueError, match="labels must be"):
        train_classifier_epoch(classifier, optimizer, schedule,
                               [{"image": images[:2], "label": torch.tensor([0, 1])}])


# --- guidance --------------------------------------------------------------------------------


def test_guidance_gradient_points_towards_the_target_class():
    x = _slices(2, True)
    towards_healthy = guidance_gradient(MeanIntensityClassifier(), x, 4, HEALTHY)
    towards_unhealthy = guidance_gradient(MeanIntensityClassifier(), x, 4, UNHEALTHY)
    assert towards_healthy.shape == x.shape
    assert (towards_healthy < 0).all() and (towards_unhealthy > 0).all()


def test_guided_decode_darkens_a_bright_slice_and_scale_0_is_the_unguided_decode(dpm, schedule):
    x0 = _slices(2, True)
    x_t = ddim_encode(dpm, x0, schedule, noise_level=D, stride=STRIDE)
    classifier = MeanIntensityClassifier().eval()
    grid = {"noise_level": D, "stride": STRIDE}
    unguided = ddim_decode(dpm, x_t, schedule, guidance_scale=0.0, **grid)
    decoded = {scale: classifier_guided_decode(dpm, classifier, x_t, schedule, scale=scale, **grid)
               for scale in (0.0, 6.0, 30.0)}
    assert torch.equal(decoded[0.0], unguided)
    with torch.inference_mode():  # as inference code may wrap it: the gradient still flows
        assert torch.equal(classifier_guided_decode(dpm, classifier, x_t, schedule, scale=6.0, **grid),
                           decoded[6.0])
    means = [float(decoded[s].mean()) for s in (0.0, 6.0, 30.0)]
    assert means[0] - means[1] > 1e-3 and means[1] - means[2] > 1e-3, means  # darker with scale
    # The whole counterfactual at scale 0 is IgCONDA's unguided round trip.
    assert torch.equal(
        classifier_guided_counterfactual(dpm, classifier, x0, schedule, scale=0.0, **grid),
        counterfactual(dpm, x0, schedule, guidance_scale=0.0, **grid))
    with pytest.raises(ValueError, match="eval mode"):
        classifier_guided_decode(dpm, classifier.train(), x_t, schedule, scale=1.0, **grid)
    with pytest.raises(ValueError, match="scale"):
        classifier_guided_counterfactual(dpm, classifier.eval(), x0, schedule, scale=-1.0, **grid)


def test_one_guided_step_is_ddim_with_the_shifted_noise(dpm, schedule):
    """D = s: one step from level s to 0 with ε − scale · √(1 − ᾱ_s) · ∇ log p(healthy)."""
    x_t = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    classifier = MeanIntensityClassifier().eval()
    abar = schedule.alphas_cumprod.tolist()
    with torch.no_grad():
        eps = dpm(x_t, torch.full((2,), STRIDE), torch.zeros(2, dtype=torch.long))
    shifted = eps - 6.0 * np.sqrt(1.0 - abar[STRIDE]) * guidance_gradient(classifier, x_t, STRIDE)
    expected = ddim_step(x_t, shifted, abar[STRIDE], abar[0])
    got = classifier_guided_decode(dpm, classifier, x_t, schedule, noise_level=STRIDE,
                                   stride=STRIDE, scale=6.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --- the anomaly method ----------------------------------------------------------------------


def _batch(images: torch.Tensor) -> dict[str, np.ndarray]:
    n = images.shape[0]
    return {"image": images.reshape(n, SIZE * SIZE).numpy(), "height": np.full(n, SIZE),
            "width": np.full(n, SIZE)}


def test_maps_shape_range_and_determinism(dpm, schedule):
    batch = _batch(torch.cat([_slices(2, True), _slices(1, False)]))
    settings = {"noise_level": D, "stride": STRIDE}
    method = DPMClassifierGuidanceMethod(dpm, _classifier(seed=5), schedule, scale=6.0, **settings)
    assert method.names == (DPM_CG,) and DPM_CG in METHOD_TITLES
    maps = method.maps(batch)
    assert set(maps) == {DPM_CG}
    dpm_cg = maps[DPM_CG]
    assert dpm_cg.shape == (3, SIZE, SIZE) and dpm_cg.dtype == np.float32
    assert 0.0 <= dpm_cg.min() and dpm_cg.max() <= 1.0 and dpm_cg.max() > 0
    again = DPMClassifierGuidanceMethod(dpm, _classifier(seed=5), schedule, scale=6.0, **settings)
    np.testing.assert_array_equal(again.maps(batch)[DPM_CG], dpm_cg)
    # A guide strong enough to push x̂ far below 0: |x − x̂| > 1 is clipped to exactly 1.
    strong = DPMClassifierGuidanceMethod(dpm, MeanIntensityClassifier(slope=1e4), schedule,
                                         scale=100.0, **settings).maps(batch)[DPM_CG]
    assert strong.max() == 1.0 and strong.min() >= 0.0
    assert method.counterfactuals(np.zeros((0, SIZE, SIZE), np.float32)).shape == (0, SIZE, SIZE)


# --- checkpoints -----------------------------------------------------------------------------


def test_classifier_save_load_round_trip_and_the_method_from_checkpoints(tmp_path, dpm, test_config):
    classifier = _classifier(seed=7).eval()
    folder = save_noisy_classifier(tmp_path / "classifier", classifier, test_config,
                                   metadata={"epoch": 3})
    loaded, config = load_noisy_classifier(folder)
    assert config == test_config and not loaded.training
    assert loaded.config == classifier.config
    assert ckpt.load_metadata(folder)["epoch"] == 3
    x, t = torch.rand(2, 1, SIZE, SIZE), torch.tensor([1, 8])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), classifier(x, t))
    with pytest.raises(ckpt.CheckpointError):  # a classifier folder is no DPM checkpoint
        ckpt.load_model(folder)

    dpm_config = test_config.replace("model", conditioning="none")
    dpm_dir = ckpt.save_checkpoint(tmp_path / "dpm", model=dpm, config=dpm_config)
    with pytest.raises(ckpt.CheckpointError, match="not a noisy-classifier"):
        load_noisy_classifier(dpm_dir)
    settings = {"noise_level": D, "stride": STRIDE, "scale": 6.0}
    from_disk = DPMClassifierGuidanceMethod.from_checkpoints(dpm_dir, folder, **settings)
    in_memory = DPMClassifierGuidanceMethod(dpm, classifier, NoiseSchedule.from_config(dpm_config.train),
                                            **settings)
    batch = _batch(_slices(2, True))
    np.testing.assert_array_equal(from_disk.maps(batch)[DPM_CG], in_memory.maps(batch)[DPM_CG])
    other = save_noisy_classifier(tmp_path / "other", classifier,
                                  test_config.replace("train", beta_end=0.03))
    with pytest.raises(ckpt.CheckpointError, match="schedule"):
        DPMClassifierGuidanceMethod.from_checkpoints(dpm_dir, other, **settings)
