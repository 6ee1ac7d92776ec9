"""f-AnoGAN baseline: networks, WGAN-GP and izi_f training steps, the saved folder, the maps.

Tiny networks (16 × 16 slices, 4 channels, z of 8) so that the file runs in seconds on a shared
CPU; the architecture is otherwise the full one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from igconda.baselines.fanogan import (
    FANOGAN,
    FAnoGANConfig,
    FAnoGANMethod,
    build_networks,
    load_fanogan,
)
from igconda.baselines.fanogan_training import (
    FAnoGANTrainer,
    encoder_loss,
    gradient_penalty,
    healthy_images,
)
from igconda.checkpoint import CheckpointError
from igconda.data.schema import HEALTHY, UNHEALTHY
from igconda.evaluation import METHOD_TITLES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16
CONFIG = FAnoGANConfig(image_size=SIZE, latent_dim=8, channels=4, max_channels=16, n_critic=2,
                       encoder_lr=1e-2, seed=0)


def _batches(n_batches: int, batch_size: int = 4, seed: int = 0,
             labels: int | list[int] = HEALTHY) -> list[dict[str, torch.Tensor]]:
    """Decoded slice batches (``decode_slice_batch``'s keys): a faint blob on noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    blob = torch.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / 20.0)
    out = []
    for _ in range(n_batches):
        images = (0.5 * blob + 0.1 * torch.rand(batch_size, 1, SIZE, SIZE, generator=g)).clamp(0, 1)
        label = torch.as_tensor(labels if isinstance(labels, list) else [labels] * batch_size)
        out.append({"image": images, "label": label.to(torch.int64)})
    return out


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _slice_batch(n: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    """Numpy columns of the slice schema as Ray Data hands them over (flattened images)."""
    images = torch.cat([b["image"] for b in _batches(1, n, seed)]).squeeze(1).numpy()
    return {"image": images.reshape(n, -1), "height": np.full(n, SIZE, np.int32),
            "width": np.full(n, SIZE, np.int32), "label": np.full(n, HEALTHY, np.int8)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after two GAN epochs and one encoder epoch, and its saved folder."""
    trainer = FAnoGANTrainer.create(CONFIG)
    for epoch in (1, 2):
        trainer.train_gan_epoch(_batches(4, seed=epoch), epoch)
    trainer.train_encoder_epoch(_batches(3, seed=9), 1)
    folder = trainer.save(tmp_path_factory.mktemp("fanogan") / "model")
    return trainer, folder


# ---- config and networks ---------------------------------------------------------------------


def test_config_checks_sizes_and_round_trips_through_json_types():
    with pytest.raises(ValueError, match="power of two"):
        FAnoGANConfig(image_size=48)
    with pytest.raises(ValueError, match="unknown"):
        FAnoGANConfig.from_dict({**CONFIG.to_dict(), "lr": 1.0})
    as_json = {**CONFIG.to_dict(), "gan_betas": [0.0, 0.9]}  # what json.loads gives back
    assert FAnoGANConfig.from_dict(as_json) == CONFIG


@pytest.mark.parametrize("size", [8, 16, 32, 128])
def test_network_shapes_and_ranges(size):
    config = FAnoGANConfig(image_size=size, latent_dim=8, channels=2, max_channels=8)
    generator, critic, encoder = build_networks(config)
    z = torch.randn(3, 8)
    images = generator(z)
    assert images.shape == (3, 1, size, size)
    assert images.min() >= 0.0 and images.max() <= 1.0
    scores, features = critic(images)
    assert scores.shape == (3,) and features.shape == (3, 16 * config.level_channels(0))
    assert encoder(images).shape == (3, 8)


def test_critic_and_encoder_treat_each_slice_alone():
    """No batch norm in D or E (WGAN-GP's penalty is per slice): a slice's score and code do not
    depend on the other slices of its batch, in training mode too."""
    _, critic, encoder = build_networks(CONFIG)
    critic.train(), encoder.train()
    x = _batches(1, 5)[0]["image"]
    for net, out in ((critic, lambda m, v: m(v)[0]), (encoder, lambda m, v: m(v))):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        together = out(net, x)
        alone = torch.cat([out(net, x[i: i + 1]) for i in range(5)])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_build_networks_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = build_networks(CONFIG)
    assert torch.equal(torch.rand(1), expected)
    second = build_networks(CONFIG)
    different = build_networks(dataclasses.replace(CONFIG, seed=1))
    assert all(_same(_state(a), _state(b)) for a, b in zip(first, second, strict=True))
    assert not _same(_state(first[0]), _state(different[0]))


# ---- the gradient penalty --------------------------------------------------------------------


class _LinearCritic(nn.Module):
    """D(x) = ⟨w, x⟩: its gradient is w everywhere, so ‖∇D‖ = ‖w‖."""

    def __init__(self, w: torch.Tensor, relu: bool = False) -> None:
        super().__init__()
        self.w, self.relu = nn.Parameter(w.flatten()), relu

    def forward(self, x):
        flat = torch.relu(x.flatten(1)) if self.relu else x.flatten(1)
        return flat @ self.w, flat


def test_gradient_penalty_is_zero_for_a_one_lipschitz_linear_critic():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SIZE * SIZE, generator=g)
    real, fake = torch.rand(6, 1, SIZE, SIZE, generator=g), torch.rand(6, 1, SIZE, SIZE, generator=g)
    assert gradient_penalty(_LinearCritic(w / w.norm()), real, fake, g).item() == pytest.approx(0, abs=1e-10)
    # ‖w‖ = 2: every slope is 2, so the penalty is (2 − 1)² = 1.
    assert gradient_penalty(_LinearCritic(2 * w / w.norm()), real, fake, g).item() == pytest.approx(1, rel=1e-5)
    # ReLU of the input with signed inputs: the slope drops on the negative pixels, so it is < 1.
    signed_real, signed_fake = real - 0.5, fake - 0.5
    penalty = gradient_penalty(_LinearCritic(w / w.norm(), relu=True), signed_real, signed_fake, g)
    assert penalty.item() > 1e-3


def test_gradient_penalty_has_a_graph_to_the_critic():
    critic = _LinearCritic(2 * torch.ones(SIZE * SIZE) / SIZE)
    penalty = gradient_penalty(critic, torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE))
    penalty.backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


# ---- training --------------------------------------------------------------------------------


def test_gan_epoch_updates_critic_every_batch_and_generator_every_n_critic():
    trainer = FAnoGANTrainer.create(CONFIG)
    before = [_state(m) for m in (trainer.generator, trainer.critic, trainer.encoder)]
    stats = trainer.train_gan_epoch(_batches(5), epoch=1)
    assert (trainer.critic_steps, trainer.generator_steps, trainer.encoder_steps) == (5, 2, 0)
    after = [_state(m) for m in (trainer.generator, trainer.critic, trainer.encoder)]
    assert not _same(before[0], after[0]) and not _same(before[1], after[1])
    assert _same(before[2], after[2])  # the encoder waits for its own stage
    means = stats.means()
    assert {"critic_loss", "wasserstein", "gradient_penalty", "generator_loss"} <= means.keys()
    assert stats.rows["critic_loss"] == 20 and stats.rows["generator_loss"] == 8
    assert all(np.isfinite(v) for v in means.values())
    # The generator-step count carries over epochs: one more batch is the 6th critic update.
    trainer.train_gan_epoch(_batches(1, seed=3), epoch=2)
    assert (trainer.critic_steps, trainer.generator_steps) == (6, 3)


def test_encoder_training_changes_only_the_encoder_and_lowers_its_loss():
    trainer = FAnoGANTrainer.create(CONFIG)
    trainer.train_gan_epoch(_batches(2), epoch=1)
    frozen = _state(trainer.generator), _state(trainer.critic)  # batch-norm buffers included
    trainer.generator.zero_grad(set_to_none=True)
    trainer.critic.zero_grad(set_to_none=True)
    encoder_before = _state(trainer.encoder)
    batch = _batches(1, 8, seed=5)
    with torch.no_grad():
        trainer.generator.eval()
        start, _ = encoder_loss(trainer.generator, trainer.critic, trainer.encoder,
                                batch[0]["image"], CONFIG.kappa)
        trainer.generator.train()
    stats = trainer.train_encoder_epoch(batch * 15, epoch=1)
    assert _same(frozen[0], _state(trainer.generator)) and _same(frozen[1], _state(trainer.critic))
    assert not _same(encoder_before, _state(trainer.encoder))
    assert trainer.encoder_steps == 15
    # G and D collect no gradient and get their trainability and mode back.
    for module in (trainer.generator, trainer.critic):
        assert all(p.grad is None and p.requires_grad for p in module.parameters())
    assert trainer.generator.training
    with torch.no_grad():
        trainer.generator.eval()
        end, _ = encoder_loss(trainer.generator, trainer.critic, trainer.encoder,
                              batch[0]["image"], CONFIG.kappa)
    assert end.item() < 0.98 * start.item()  # G barely varies after 1 update: a small floor
    assert {"encoder_loss", "image_loss", "feature_loss"} <= stats.means().keys()


def test_training_drops_unhealthy_slices_and_refuses_unlabelled_batches():
    mixed = _batches(3, 4, labels=[HEALTHY, UNHEALTHY, HEALTHY, UNHEALTHY])
    healthy_only = [{"image": b["image"][[0, 2]], "label": b["label"][[0, 2]]} for b in mixed]
    a, b = FAnoGANTrainer.create(CONFIG), FAnoGANTrainer.create(CONFIG)
    stats = a.train_gan_epoch(mixed, epoch=1)
    b.train_gan_epoch(healthy_only, epoch=1)
    assert (stats.healthy_rows, stats.unhealthy_skipped) == (6, 6)
    assert _same(_state(a.generator), _state(b.generator)) and _same(_state(a.critic), _state(b.critic))
    # A batch with no healthy slice is no update at all, in either stage.
    sick = _batches(2, 4, labels=UNHEALTHY)
    before = [_state(m) for m in (a.generator, a.critic, a.encoder)]
    assert a.train_gan_epoch(sick, epoch=2).unhealthy_skipped == 8
    assert a.train_encoder_epoch(sick, epoch=1).healthy_rows == 0
    assert all(_same(s, _state(m)) for s, m in zip(before, (a.generator, a.critic, a.encoder), strict=True))
    assert (a.critic_steps, a.encoder_steps) == (3, 0)
    with pytest.raises(ValueError, match="label"):
        healthy_images({"image": mixed[0]["image"]})
    with pytest.raises(ValueError, match="16, 16"):
        a.train_gan_epoch([{"image": torch.rand(2, 1, 8, 8), "label": torch.ones(2)}], epoch=3)


# ---- the anomaly method ----------------------------------------------------------------------


def test_maps_are_the_clipped_residual_in_the_slice_shape(trained):
    trainer, _ = trained
    method = FAnoGANMethod(trainer.generator, trainer.encoder)
    assert method.names == (FANOGAN,) and FANOGAN in METHOD_TITLES
    batch = _slice_batch(3)
    maps = method.maps(batch)
    assert set(maps) == {FANOGAN}
    m = maps[FANOGAN]
    assert m.shape == (3, SIZE, SIZE) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() > 0.0
    images = batch["image"].reshape(3, SIZE, SIZE)
    np.testing.assert_allclose(m, np.abs(images - method.reconstruct(images)), atol=1e-6)
    # Batching does not change a slice's map (eval mode, no batch statistics).
    small = FAnoGANMethod(trainer.generator, trainer.encoder, batch_size=1).maps(batch)
    np.testing.assert_allclose(small[FANOGAN], m, atol=1e-6)
    with pytest.raises(ValueError, match="16, 16"):
        method.reconstruct(np.zeros((1, 8, 8), np.float32))


def test_maps_are_deterministic_for_a_fixed_seed():
    def maps_after_training(seed: int) -> np.ndarray:
        trainer = FAnoGANTrainer.create(dataclasses.replace(CONFIG, seed=seed))
        trainer.train_gan_epoch(_batches(2), epoch=1)
        trainer.train_encoder_epoch(_batches(2), epoch=1)
        return FAnoGANMethod(trainer.generator, trainer.encoder).maps(_slice_batch())[FANOGAN]

    first = maps_after_training(0)
    np.testing.assert_array_equal(first, maps_after_training(0))
    assert not np.array_equal(first, maps_after_training(1))


# ---- the saved folder ------------------------------------------------------------------------


def test_saved_folder_gives_identical_maps(trained):
    trainer, folder = trained
    in_memory = FAnoGANMethod(trainer.generator, trainer.encoder).maps(_slice_batch())
    loaded = FAnoGANMethod.from_folder(folder).maps(_slice_batch())
    np.testing.assert_array_equal(in_memory[FANOGAN], loaded[FANOGAN])
    models = load_fanogan(folder)
    assert models.config == CONFIG and models.encoder_trained
    assert not models.generator.training and _same(_state(models.critic), _state(trainer.critic))


def test_restored_trainer_continues_like_the_uninterrupted_run(tmp_path):
    run = FAnoGANTrainer.create(CONFIG)
    run.train_gan_epoch(_batches(3, seed=1), epoch=1)  # 3 critic updates: mid-cycle of n_critic = 2
    folder = run.save(tmp_path / "epoch_1")
    resumed = FAnoGANTrainer.from_folder(folder)
    assert resumed.counters() == run.counters()
    for trainer in (run, resumed):
        trainer.train_gan_epoch(_batches(3, seed=2), epoch=2)
    assert resumed.generator_steps == run.generator_steps == 3
    assert _same(_state(run.generator), _state(resumed.generator))
    assert _same(_state(run.critic), _state(resumed.critic))
    with pytest.raises(CheckpointError, match="differs"):
        FAnoGANTrainer.create(dataclasses.replace(CONFIG, kappa=2.0)).restore(folder)


def test_folder_without_a_trained_encoder_is_refused_for_maps(tmp_path):
    trainer = FAnoGANTrainer.create(CONFIG)
    trainer.train_gan_epoch(_batches(1), epoch=1)
    folder = trainer.save(tmp_path / "gan_only")
    with pytest.raises(CheckpointError, match="encoder was never trained"):
        FAnoGANMethod.from_folder(folder)
    with pytest.raises(CheckpointError, match="not an f-AnoGAN folder"):
        load_fanogan(tmp_path)
