"""The supervised upper bound on a toy problem: a tiny MONAI UNet learns a bright square's mask.

The networks have three levels of 4–16 channels and no residual units, so that a few dozen
steps on 16 × 16 slices take about a second on a shared 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igconda import checkpoint as ckpt
from igconda.baselines.supervised import (
    SupervisedConfig,
    SupervisedMethod,
    create_training,
    load_supervised,
    save_supervised,
    train_epoch,
    validation_sums,
)
from igconda.data.schema import volume_to_rows
from igconda.evaluation import METHOD_TITLES, SUPERVISED, format_table, score_methods, summarize
from igconda.train_loop import decode_slice_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = SupervisedConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0, lr=1e-2, seed=0)
EPOCHS = 30


def _toy(n: int = 32, size: int = 16, seed: int = 0):
    """(N, H, W) faint noise; every other slice has a bright 4 × 4 square, which is its mask."""
    rng = np.random.default_rng(seed)
    images = 0.1 * rng.random((n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=np.float32)
    for i in range(0, n, 2):
        r, c = rng.integers(0, size - 4, 2)
        masks[i, r: r + 4, c: c + 4] = 1.0
    images[masks > 0] = 1.0
    return images, masks


def _batches(images, masks, batch_size: int = 8):
    return [{"image": torch.from_numpy(images[s: s + batch_size])[:, None],
             "mask": torch.from_numpy(masks[s: s + batch_size])[:, None]}
            for s in range(0, len(images), batch_size)]


def _slice_batch(images, masks):
    """Numpy columns of the slice schema, as Ray Data hands them to an anomaly method."""
    n, h, w = images.shape
    return {"image": images.reshape(n, h * w), "mask": masks.astype(np.uint8).reshape(n, h * w),
            "height": np.full(n, h, np.int32), "width": np.full(n, w, np.int32),
            "label": np.where(masks.reshape(n, -1).any(1), 2, 1).astype(np.int8),
            "cohort": np.full(n, "toy"), "patient_id": np.full(n, "p0"),
            "slice_index": np.arange(n, dtype=np.int32)}


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


@pytest.fixture(scope="module")
def trained():
    images, masks = _toy()
    model, optimizer = create_training(TINY)
    batches = _batches(images, masks)
    losses = [train_epoch(model, optimizer, batches) for _ in range(EPOCHS)]
    return model, optimizer, [s.loss_sum / s.samples for s in losses]


def test_training_lowers_the_loss_and_learns_the_mask(trained):
    model, _, losses = trained
    assert losses[-1] < 0.2 * losses[0]
    images, masks = _toy(16, seed=1)  # unseen slices
    probability = SupervisedMethod(model).probabilities(images)
    assert _dice(probability > 0.5, masks > 0) > 0.85
    assert probability[1::2].max() < 0.5  # nothing on the slices without a square


def test_maps_shape_range_and_scoring(trained):
    model, _, _ = trained
    images, masks = _toy(6, seed=2)
    method = SupervisedMethod(model, batch_size=4)  # two forward passes
    maps = method.maps(_slice_batch(images, masks))
    assert method.names == (SUPERVISED,) and set(maps) == {SUPERVISED}
    assert maps[SUPERVISED].shape == (6, 16, 16) and maps[SUPERVISED].dtype == np.float32
    assert maps[SUPERVISED].min() >= 0.0 and maps[SUPERVISED].max() <= 1.0
    rows = score_methods(_slice_batch(images, masks), maps, taus={SUPERVISED: 0.5})
    assert len(rows) == 3 and rows["dice_tau"].mean() > 0.8  # scored on the unhealthy slices
    assert METHOD_TITLES[SUPERVISED] in format_table(summarize(rows))
    assert model.training  # the mode the caller left it in (train_epoch's) is restored


def test_any_slice_size_is_padded_and_cropped(trained):
    model, _, _ = trained
    images = np.random.default_rng(3).random((2, 18, 13)).astype(np.float32)
    probability = SupervisedMethod(model).probabilities(images)
    assert probability.shape == (2, 18, 13)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        SupervisedMethod(model).probabilities(images[0])


def test_same_seed_same_weights_and_the_global_rng_is_untouched():
    images, masks = _toy(16)
    before = torch.get_rng_state()
    runs = []
    for seed in (0, 0, 1):
        model, optimizer = create_training(SupervisedConfig(**{**TINY.__dict__, "seed": seed}))
        train_epoch(model, optimizer, _batches(images, masks))
        runs.append(model.state_dict())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_save_load_round_trip_and_resume(tmp_path, trained):
    model, _, _ = trained
    images, masks = _toy(8, seed=4)
    batch = _slice_batch(images, masks)
    save_supervised(tmp_path / "sup", model, TINY, epoch=EPOCHS, metadata={"data_version": "x"})
    loaded = SupervisedMethod.from_checkpoint(tmp_path / "sup")
    np.testing.assert_array_equal(loaded.maps(batch)[SUPERVISED],
                                  SupervisedMethod(model).maps(batch)[SUPERVISED])
    assert load_supervised(tmp_path / "sup")[1] == TINY
    assert ckpt.load_metadata(tmp_path / "sup")["data_version"] == "x"

    # Two epochs straight equal one epoch, save, load (weights + Adam state), one more epoch.
    batches = _batches(*_toy(16))
    straight, optimizer = create_training(TINY)
    for _ in range(2):
        train_epoch(straight, optimizer, batches)
    first, optimizer = create_training(TINY)
    train_epoch(first, optimizer, batches)
    save_supervised(tmp_path / "e1", first, TINY, optimizer=optimizer, epoch=1)
    resumed, _ = load_supervised(tmp_path / "e1")
    optimizer = torch.optim.Adam(resumed.parameters(), lr=TINY.lr)
    state = ckpt.load_train_state(tmp_path / "e1")
    optimizer.load_state_dict(state["optimizer"])
    train_epoch(resumed, optimizer, batches)
    assert state["epoch"] == 1
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_checkpoint_kinds_are_not_confused(tmp_path, trained):
    model, _, _ = trained
    save_supervised(tmp_path / "sup", model, TINY)
    with pytest.raises(ckpt.CheckpointError, match="'supervised' baseline"):
        ckpt.load_checkpoint_config(tmp_path / "sup")  # not an IgCONDA model
    with pytest.raises(ckpt.CheckpointError, match="expected a checkpoint of the 'hirescam'"):
        ckpt.load_baseline_checkpoint(tmp_path / "sup", method="hirescam", settings_type=SupervisedConfig)
    bigger = SupervisedConfig(channels=(4, 8, 32), strides=(2, 2), num_res_units=0)
    save_supervised(tmp_path / "bad", model, bigger)  # weights that do not fit their config
    with pytest.raises(ckpt.CheckpointError, match="do not match"):
        load_supervised(tmp_path / "bad")


def test_decoded_slice_batches_carry_the_mask_for_training():
    images, masks = _toy(6)
    volume = lambda a: np.moveaxis(a, 0, 2)  # noqa: E731  (N, H, W) slices → (X, Y, Z) volume
    table = volume_to_rows(
        volume(images), volume(masks), patient_id="p0", cohort="toy", tracer="FDG",
        role="internal", suv_max=1.0, scale_min=0.0, scale_max=1.0, pet_path="p0.nii.gz",
        geometry={"original_shape": [16, 16, 6], "original_affine": np.eye(4),
                  "output_affine": np.eye(4), "output_shape": [16, 16, 6]})
    batch = decode_slice_batch(table, mask=True)
    assert batch["mask"].shape == (6, 1, 16, 16) and batch["mask"].dtype == torch.float32
    torch.testing.assert_close(batch["mask"][:, 0], torch.from_numpy(masks))
    assert "mask" not in decode_slice_batch(table)
    with pytest.raises(ValueError, match="no 'mask' column"):
        decode_slice_batch(table.drop_columns(["mask"]), mask=True)

    model, optimizer = create_training(TINY)
    with pytest.raises(ValueError, match="mask=True"):
        train_epoch(model, optimizer, [decode_slice_batch(table)])
    stats = train_epoch(model, optimizer, [batch])
    total, count = validation_sums(model, [batch])
    assert stats.samples == count == 6 and np.isfinite(total) and model.training


@pytest.mark.parametrize("kwargs", [dict(channels=(4,), strides=()), dict(strides=(2,)),
                                    dict(lr=0.0), dict(channels=(4, 0, 8))])
def test_config_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SupervisedConfig(**kwargs)
