"""ResNet-18 + HiResCAM baseline on toy problems (tiny images, a few epochs on CPU).

The networks are ResNet-18 at an eighth of the standard width (``widen_factor=0.125``) so that
the tests train in seconds on a shared 2-core CPU; the architecture is otherwise the paper's.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from igconda import checkpoint as ckpt
from igconda.baselines.classifier_cam import HiResCamMethod, hirescam_maps
from igconda.baselines.resnet_classifier import (
    ClassifierConfig,
    build_classifier,
    create_training,
    load_classifier,
    recompute_batchnorm,
    save_classifier,
    train_classifier,
    train_epoch,
    validation_sums,
)
from igconda.data.schema import HEALTHY, UNHEALTHY, volume_to_rows
from igconda.evaluation import HIRESCAM, METHOD_TITLES, method_order
from igconda.train_loop import decode_slice_batch

WIDEN = 0.125
TINY = ClassifierConfig(widen_factor=WIDEN, lr=1e-3, seed=0)


def _toy(n: int = 48, size: int = 32, seed: int = 0):
    """Healthy: faint noise. Unhealthy: the same plus one bright (size/4)² square in a random quadrant."""
    rng = np.random.default_rng(seed)
    images = 0.1 * rng.random((n, size, size)).astype(np.float32)
    labels = np.full(n, HEALTHY)
    regions = np.zeros_like(images, dtype=bool)
    half, side = size // 2, size // 4
    for i in range(0, n, 2):
        r, c = rng.integers(0, 2, 2) * half + rng.integers(0, half - side + 1, 2)
        regions[i, r: r + side, c: c + side] = True
        images[i][regions[i]] = 1.0
        labels[i] = UNHEALTHY
    return images, labels, regions


@pytest.fixture(scope="module")
def trained():
    # One thread: on a shared 2-core machine torch's thread pool mostly waits on other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels, regions = _toy(n=32)
        model, config = train_classifier(images, labels, TINY, epochs=8, batch_size=8)
        yield model, config, images, labels, regions
    finally:
        torch.set_num_threads(threads)


def test_classifier_learns_separable_toy_set(trained):
    model, _, _, _, _ = trained
    images, labels, _ = _toy(n=16, seed=1)  # unseen slices
    with torch.no_grad():
        pred = model(torch.as_tensor(images)[:, None]).argmax(1).numpy() + 1
    assert (pred == labels).mean() >= 0.9


def _inside_minus_outside(maps, regions):
    return np.array([m[r].mean() - m[~r].mean() for m, r in zip(maps, regions, strict=True)])


def test_cam_highlights_the_deciding_region(trained):
    model, _, images, labels, regions = trained
    sick = labels == UNHEALTHY
    # layer3 is 4 × 4 at 32 px: fine enough to find the square's quadrant and more.
    gap = _inside_minus_outside(hirescam_maps(model, images[sick], target_layer="layer3"), regions[sick])
    assert (gap > 0).mean() >= 0.9 and gap.mean() > 0.15
    # layer4 (the default) is 2 × 2 here: coarser, but still brighter on the square on average.
    assert _inside_minus_outside(hirescam_maps(model, images[sick]), regions[sick]).mean() > 0.0


def test_cam_shapes_range_and_determinism(trained):
    model, _, images, _, _ = trained
    a = hirescam_maps(model, images[:5], batch_size=2)
    b = hirescam_maps(model, images[:5], batch_size=5)
    assert a.shape == (5, 32, 32) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    peak = a.reshape(5, -1).max(axis=1)
    assert np.all(np.isclose(peak, 1.0) | (peak == 0.0))  # min–max normalised per slice
    np.testing.assert_allclose(a, b, atol=1e-5)  # batching does not change a slice's map
    assert not model.training


def test_cam_bad_arguments(trained):
    model, _, images, _, _ = trained
    with pytest.raises(ValueError, match="class_index"):
        hirescam_maps(model, images[:2], class_index=2)
    with pytest.raises(ValueError, match="no module"):
        hirescam_maps(model, images[:2], target_layer="layer9")


def test_training_is_reproducible_for_a_seed():
    images, labels, _ = _toy(n=8, size=16)
    before = torch.get_rng_state()
    a, b, c = (train_classifier(images, labels, ClassifierConfig(widen_factor=WIDEN, seed=seed),
                                epochs=1, batch_size=4)[0] for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize(
    ("labels", "match"),
    [(np.array([0, 1, 0, 1]), "schema labels"), (np.array([1, 2]), "one value per image")],
)
def test_train_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        train_classifier(np.zeros((4, 16, 16)), labels, TINY, epochs=1, batch_size=2)


def test_local_weights_torchvision_style(tmp_path):
    # A torchvision-style checkpoint: RGB stem, 1000-class head, no downsample biases.
    reference = build_classifier()
    state = {k: v.clone() for k, v in reference.state_dict().items() if "downsample.0.bias" not in k}
    state["conv1.weight"] = reference.state_dict()["conv1.weight"].repeat(1, 3, 1, 1) / 3
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)
    model, _, config = create_training(ClassifierConfig(seed=5), weights=path)
    # The checkpoint's config records which weights it started from, without a machine path.
    assert config.pretrained and config.pretrained_file == "resnet18.pth"
    assert config.pretrained_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(model.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])
    torch.testing.assert_close(model.state_dict()["layer4.1.conv2.weight"],
                               reference.state_dict()["layer4.1.conv2.weight"])
    assert model.state_dict()["fc.weight"].shape == (2, 512)


def test_local_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_classifier(tmp_path / "missing.pth")
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="ResNet-18"):
        build_classifier(tmp_path / "other.pth")


def _slice_batch(images):
    """Numpy columns of the slice schema, as Ray Data hands them to an anomaly method."""
    n, h, w = images.shape
    return {"image": images.reshape(n, h * w), "height": np.full(n, h, np.int32),
            "width": np.full(n, w, np.int32)}


def test_hirescam_method_gives_the_unhealthy_cam(trained):
    model, config, images, labels, _ = trained
    assert not config.pretrained and config.pretrained_file == ""  # trained from scratch
    method = HiResCamMethod(model, batch_size=3)
    maps = method.maps(_slice_batch(images[:6]))
    assert method.names == (HIRESCAM,) and set(maps) == {HIRESCAM}
    assert maps[HIRESCAM].shape == (6, 32, 32) and maps[HIRESCAM].dtype == np.float32
    assert maps[HIRESCAM].min() >= 0.0 and maps[HIRESCAM].max() <= 1.0
    np.testing.assert_allclose(maps[HIRESCAM], hirescam_maps(model, images[:6]), atol=1e-6)
    assert HIRESCAM in METHOD_TITLES and method_order(["supervised", HIRESCAM, "intensity"]) == [
        "intensity", HIRESCAM, "supervised"]


def test_save_load_round_trip_gives_identical_maps(tmp_path, trained):
    model, config, images, _, _ = trained
    save_classifier(tmp_path / "cam", model, config, epoch=8)
    loaded, loaded_config = load_classifier(tmp_path / "cam")
    assert loaded_config == config and not loaded.training
    batch = _slice_batch(images[:8])
    np.testing.assert_array_equal(HiResCamMethod.from_checkpoint(tmp_path / "cam").maps(batch)[HIRESCAM],
                                  HiResCamMethod(model).maps(batch)[HIRESCAM])
    with pytest.raises(ckpt.CheckpointError, match="'supervised' baseline"):
        ckpt.load_baseline_checkpoint(tmp_path / "cam", method="supervised", settings_type=ClassifierConfig)


def test_epochs_on_decoded_slice_batches_lower_the_loss():
    images, labels, regions = _toy(n=24, size=16, seed=2)
    volume = np.moveaxis(images, 0, 2)  # (N, H, W) slices → (X, Y, Z) volume
    table = volume_to_rows(
        volume, np.moveaxis(regions, 0, 2), patient_id="p0", cohort="toy", tracer="FDG",
        role="internal", suv_max=1.0, scale_min=0.0, scale_max=1.0,
        pet_path="p0.nii.gz", geometry={"original_shape": [16, 16, 24], "original_affine": np.eye(4),
                                        "output_affine": np.eye(4), "output_shape": [16, 16, 24]})
    batches = [decode_slice_batch(table.slice(s, 6)) for s in range(0, 24, 6)]
    assert batches[0]["label"].tolist() == labels[:6].tolist()
    model, optimizer, _ = create_training(TINY)
    losses = [train_epoch(model, optimizer, batches) for _ in range(6)]
    assert losses[-1].loss_sum < 0.5 * losses[0].loss_sum and losses[-1].samples == 24
    recompute_batchnorm(model, batches)
    total, count = validation_sums(model, batches)
    assert count == 24 and total / count < losses[0].loss_sum / 24


def test_class_loss_weighs_unhealthy_slices():
    from igconda.baselines.resnet_classifier import class_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    batch = {"image": torch.randn(5, 1, 4, 4), "label": torch.tensor([1, 1, 1, 2, 1])}
    per_row = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"] - 1,
                                                reduction="none")
    assert torch.isclose(class_loss()(model, batch), per_row.mean())
    # Weight 4 on the one unhealthy row: a weighted mean, Σ w loss / Σ w.
    weights = torch.tensor([1.0, 1, 1, 4, 1])
    assert torch.isclose(class_loss(4.0)(model, batch), (weights * per_row).sum() / weights.sum())
    with pytest.raises(ValueError, match="unhealthy_weight"):
        ClassifierConfig(unhealthy_weight=0.0)


def test_weighting_the_minority_class_raises_its_probability():
    """On a set with one unhealthy slice in six, the weighted classifier gives unhealthy slices a
    higher probability of being unhealthy than the unweighted one (same seed, same single epoch:
    trained long enough, both separate this easy toy set)."""
    images, labels, _ = _toy(n=48, size=16, seed=3)
    keep = np.flatnonzero((labels == HEALTHY) | (np.arange(48) % 10 == 0))  # ~1 in 6 unhealthy
    images, labels = images[keep], labels[keep]
    ratio = (labels == HEALTHY).sum() / (labels == UNHEALTHY).sum()
    assert ratio > 3
    sick = torch.as_tensor(images[labels == UNHEALTHY])[:, None]
    p_unhealthy = {}
    for weight in (1.0, float(ratio)):
        config = ClassifierConfig(widen_factor=WIDEN, lr=1e-3, seed=0, unhealthy_weight=weight)
        model, saved = train_classifier(images, labels, config, epochs=1, batch_size=8)
        assert saved.unhealthy_weight == weight
        with torch.no_grad():
            p_unhealthy[weight] = torch.softmax(model(sick), 1)[:, 1].mean().item()
    assert p_unhealthy[float(ratio)] > p_unhealthy[1.0] + 0.1, p_unhealthy


def test_scoring_explains_the_configured_layer(tmp_path, trained):
    from igconda.baselines.scoring import load_method
    from igconda.baselines.settings import BaselinesConfig

    model, config, images, *_ = trained
    folder = save_classifier(tmp_path / "clf", model, config)
    for layer in ("layer4", "layer3"):
        method = load_method(HIRESCAM, folder, settings=BaselinesConfig(hirescam_target_layer=layer))
        assert method.target_layer == layer
        expected = hirescam_maps(model, images[:4], target_layer=layer)
        batch = {"image": images[:4].reshape(4, -1), "height": np.full(4, 32), "width": np.full(4, 32)}
        np.testing.assert_allclose(method.maps(batch)[HIRESCAM], expected, atol=1e-6)
