"""ResNet-18 + HiResCAM baseline on toy problems (tiny images, a few epochs on CPU).

The networks are ResNet-18 at an eighth of the standard width (``widen_factor=0.125``) so that
the tests train in seconds on a shared 2-core CPU; the architecture is otherwise the paper's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igconda.baselines.classifier_cam import build_classifier, hirescam_maps, train_classifier
from igconda.data.schema import HEALTHY, UNHEALTHY

WIDEN = 0.125


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
        model = train_classifier(images, labels, epochs=8, batch_size=8, lr=1e-3, seed=0,
                                 widen_factor=WIDEN)
        yield model, images, labels, regions
    finally:
        torch.set_num_threads(threads)


def test_classifier_learns_separable_toy_set(trained):
    model, _, _, _ = trained
    images, labels, _ = _toy(n=16, seed=1)  # unseen slices
    with torch.no_grad():
        pred = model(torch.as_tensor(images)[:, None]).argmax(1).numpy() + 1
    assert (pred == labels).mean() >= 0.9


def _inside_minus_outside(maps, regions):
    return np.array([m[r].mean() - m[~r].mean() for m, r in zip(maps, regions, strict=True)])


def test_cam_highlights_the_deciding_region(trained):
    model, images, labels, regions = trained
    sick = labels == UNHEALTHY
    # layer3 is 4 × 4 at 32 px: fine enough to find the square's quadrant and more.
    gap = _inside_minus_outside(hirescam_maps(model, images[sick], target_layer="layer3"), regions[sick])
    assert (gap > 0).mean() >= 0.9 and gap.mean() > 0.15
    # layer4 (the default) is 2 × 2 here: coarser, but still brighter on the square on average.
    assert _inside_minus_outside(hirescam_maps(model, images[sick]), regions[sick]).mean() > 0.0


def test_cam_shapes_range_and_determinism(trained):
    model, images, _, _ = trained
    a = hirescam_maps(model, images[:5], batch_size=2)
    b = hirescam_maps(model, images[:5], batch_size=5)
    assert a.shape == (5, 32, 32) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    peak = a.reshape(5, -1).max(axis=1)
    assert np.all(np.isclose(peak, 1.0) | (peak == 0.0))  # min–max normalised per slice
    np.testing.assert_allclose(a, b, atol=1e-5)  # batching does not change a slice's map
    assert not model.training


def test_cam_bad_arguments(trained):
    model, images, _, _ = trained
    with pytest.raises(ValueError, match="class_index"):
        hirescam_maps(model, images[:2], class_index=2)
    with pytest.raises(ValueError, match="no module"):
        hirescam_maps(model, images[:2], target_layer="layer9")


def test_training_is_reproducible():
    images, labels, _ = _toy(n=8, size=16)
    kwargs = dict(epochs=1, batch_size=4, lr=1e-3, seed=3, widen_factor=WIDEN)
    a, b = train_classifier(images, labels, **kwargs), train_classifier(images, labels, **kwargs)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize(
    ("labels", "match"),
    [(np.array([0, 1, 0, 1]), "schema labels"), (np.array([1, 2]), "one value per image")],
)
def test_train_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        train_classifier(np.zeros((4, 16, 16)), labels, epochs=1, batch_size=2, lr=1e-3, seed=0,
                         widen_factor=WIDEN)


def test_local_weights_torchvision_style(tmp_path):
    # A torchvision-style checkpoint: RGB stem, 1000-class head, no downsample biases.
    reference = build_classifier()
    state = {k: v.clone() for k, v in reference.state_dict().items() if "downsample.0.bias" not in k}
    state["conv1.weight"] = reference.state_dict()["conv1.weight"].repeat(1, 3, 1, 1) / 3
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)
    model = build_classifier(path)
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
