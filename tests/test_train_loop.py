"""The per-worker training loop without Ray: batch decoding, the fixed validation draw, epochs,
exact resume, and DDP replicas staying identical with the worker's all-reduce helpers summing
over them (two gloo processes)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from igconda import checkpoint as ckpt
from igconda.config import StudyConfig
from igconda.data import schema
from igconda.train_loop import (
    TrainingSession,
    dataset_version,
    decode_slice_batch,
    row_keys,
    validation_draw,
    weights_checksum,
)
from ray_jobs.train_worker import _all_reduce_max, _all_reduce_sum

SIZE = 16


def _geometry(shape: tuple[int, int, int]) -> dict:
    return {"original_shape": list(shape), "original_affine": np.eye(4),
            "output_affine": np.eye(4), "output_shape": list(shape)}


def volume_table(patient_id: str, depth: int = 6, seed: int = 0) -> pa.Table:
    """Slices of one random (SIZE, SIZE, depth) volume with a cubic lesion in the middle."""
    rng = np.random.default_rng(seed)
    image = rng.random((SIZE, SIZE, depth)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[5:9, 5:9, depth // 3: depth // 3 + 2] = 1
    image[mask > 0] = 1.0
    return schema.volume_to_rows(image, mask, patient_id=patient_id, cohort="lymphoma", tracer="FDG",
                                 role="internal", suv_max=10.0, scale_min=0.0,
                                 scale_max=10.0, pet_path=f"{patient_id}.nii.gz",
                                 geometry=_geometry(image.shape))


def make_slice_dataset(root: Path, patients: dict[str, int] | None = None, depth: int = 6) -> Path:
    """``<root>/slices/<split>/<patient>.parquet`` as the preprocessing job writes them."""
    patients = patients or {"train": 4, "valid": 2}
    seed = 0
    for split, count in patients.items():
        folder = root / "slices" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pid = f"{split}-{i:03d}"
            pq.write_table(volume_table(pid, depth, seed), folder / f"{pid}.parquet")
            seed += 1
    return root


def batches_of(table: pa.Table, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [decode_slice_batch(table.slice(i, batch_size)) for i in range(0, table.num_rows, batch_size)]


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return {"train": pa.concat_tables([volume_table(f"t{i}", seed=i) for i in range(2)]),
            "valid": volume_table("v0", seed=9)}


# ---- decoding ------------------------------------------------------------------------------


def test_decode_slice_batch_shapes_and_keys(tables):
    table = tables["train"]
    batch = decode_slice_batch(table)
    assert batch["image"].shape == (table.num_rows, 1, SIZE, SIZE)
    assert batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    # The lesion slices (z = 2, 3 of each 6-slice volume) are unhealthy.
    assert batch["label"].tolist()[:6] == [1, 1, 2, 2, 1, 1]
    # Row-major flattening: slice z of the volume comes back as volume[:, :, z].
    images = schema.stack_images(table["image"], SIZE, SIZE)
    torch.testing.assert_close(batch["image"][3, 0], torch.from_numpy(images[3].copy()))
    assert batch["row_key"].shape == (table.num_rows,)
    assert len(set(batch["row_key"].tolist())) == table.num_rows


def test_decode_rejects_mixed_sizes_and_bad_labels(tables):
    table = tables["valid"]
    mixed = table.set_column(table.schema.get_field_index("height"), "height",
                             pa.array([SIZE] * (table.num_rows - 1) + [SIZE * 2], pa.int32()))
    with pytest.raises(ValueError, match="mixes slice sizes"):
        decode_slice_batch(mixed)
    bad = table.set_column(table.schema.get_field_index("label"), "label",
                           pa.array([0] * table.num_rows, pa.int8()))
    with pytest.raises(ValueError, match="labels must be 1"):
        decode_slice_batch(bad)


def test_validation_draw_depends_only_on_the_row():
    keys = row_keys(["a", "a", "b"], [0, 1, 0])
    t1, n1 = validation_draw(keys, (1, 4, 4), 10, seed=0)
    t2, n2 = validation_draw(keys.flip(0), (1, 4, 4), 10, seed=0)
    torch.testing.assert_close(t1, t2.flip(0))
    torch.testing.assert_close(n1, n2.flip(0))
    _, n3 = validation_draw(keys, (1, 4, 4), 10, seed=1)
    assert not torch.allclose(n1, n3)
    assert torch.equal(row_keys(["a"], [1]), keys[1:2])  # stable across calls (not Python's hash)


# ---- epochs, validation --------------------------------------------------------------------


def test_training_epochs_lower_the_fixed_validation_loss(test_config, tables):
    config = test_config.replace("train", lr=3e-3)
    session = TrainingSession.create(config)
    train, valid = batches_of(tables["train"], 8), batches_of(tables["valid"], 8)
    before, count = session.validation_sums(valid)
    again, _ = session.validation_sums(valid)
    assert before == again  # the fixed draw makes validation a function of the weights only
    assert count == tables["valid"].num_rows
    for epoch in range(1, 9):
        stats = session.train_epoch(train, epoch)
        assert stats.samples == tables["train"].num_rows and math.isfinite(stats.loss_sum)
    after, _ = session.validation_sums(valid)
    assert session.epoch == 8
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_split_over_ranks_covers_every_row_once(test_config, tables, world_size):
    session = TrainingSession.create(test_config)
    valid = batches_of(tables["valid"], 4)
    whole_sum, whole_count = session.validation_sums(valid)
    parts = [session.validation_sums(valid, rank, world_size) for rank in range(world_size)]
    assert sum(c for _, c in parts) == whole_count
    assert sum(s for s, _ in parts) == pytest.approx(whole_sum, rel=1e-5)


# ---- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_matches_an_uninterrupted_run(test_config, tables, tmp_path, ema_decay):
    config = test_config.replace("train", ema_decay=ema_decay)
    train = batches_of(tables["train"], 8)

    straight = TrainingSession.create(config)
    for epoch in (1, 2, 3):
        straight.train_epoch(train, epoch)

    first = TrainingSession.create(config)
    first.train_epoch(train, 1)
    first.best_valid_loss = 0.5
    first.save(tmp_path / "ckpt", metadata={"valid_loss": 0.5})
    resumed = TrainingSession.create(config.replace("train", seed=123))  # init must not matter
    resumed.config = config
    resumed.restore(tmp_path / "ckpt")
    assert resumed.epoch == 1 and resumed.best_valid_loss == 0.5 and resumed.resumed_at == [1]
    for epoch in (2, 3):
        resumed.train_epoch(train, epoch)

    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if ema_decay:
        for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert int(straight.ema.n_averaged) == int(resumed.ema.n_averaged)
    # Same next-step loss for the same seed.
    assert straight.train_epoch(train[:1], 4).loss_sum == pytest.approx(
        resumed.train_epoch(train[:1], 4).loss_sum, rel=1e-5)


def test_restore_refuses_a_different_model(test_config, tmp_path):
    session = TrainingSession.create(test_config)
    session.save(tmp_path / "ckpt")
    other = TrainingSession.create(test_config.replace("model", attention="11"))
    with pytest.raises(ckpt.CheckpointError, match="model config"):
        other.restore(tmp_path / "ckpt")


# ---- DDP ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, config_dict: dict, out: str) -> None:
    import torch.distributed as dist

    from igconda.config import from_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        session = TrainingSession.create(from_dict(config_dict), rank=rank)
        session.model = torch.nn.parallel.DistributedDataParallel(session.model)
        # Each rank trains on different data (its own volume), as with Ray Data shards.
        table = volume_table(f"rank{rank}", seed=rank)
        for epoch in (1, 2):
            session.train_epoch(batches_of(table, 3), epoch)
        torch.save({k: v.clone() for k, v in session.module.state_dict().items()},
                   Path(out) / f"rank{rank}.pt")
        # The reductions train_func applies to each worker's loss sums, counts and epoch times.
        reduced = {"sum": _all_reduce_sum([rank + 1.0, 10.0 * rank], torch.device("cpu")),
                   "max": _all_reduce_max(-float(rank), torch.device("cpu"))}
        torch.save(reduced, Path(out) / f"reduced{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_end_with_identical_weights(test_config, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), test_config.to_dict(), str(tmp_path)), nprocs=2)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    fresh = TrainingSession.create(test_config).module.state_dict()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0)
    assert any(not torch.equal(w0[k], fresh[k]) for k in w0)  # they did train
    replica = TrainingSession.create(test_config).module
    replica.load_state_dict(w1)
    module0 = TrainingSession.create(test_config).module
    module0.load_state_dict(w0)
    assert weights_checksum(module0) == weights_checksum(replica)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"reduced{rank}.pt") == {"sum": [3.0, 10.0], "max": 0.0}


def test_all_reduce_helpers_are_the_identity_without_a_process_group():
    assert _all_reduce_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert _all_reduce_max(-3.0, torch.device("cpu")) == -3.0


# ---- dataset version ------------------------------------------------------------------------


def test_dataset_version_tracks_content(tmp_path):
    data = make_slice_dataset(tmp_path / "d", {"train": 1, "valid": 1})
    v1 = dataset_version(str(data))
    assert v1.startswith("files:") and dataset_version(str(data)) == v1
    pq.write_table(volume_table("extra", depth=4), data / "slices" / "train" / "extra.parquet")
    assert dataset_version(str(data)) != v1
    (data / "dataset.json").write_text('{"counts": 1}')
    assert dataset_version(str(data)).startswith("dataset.json:")
    with pytest.raises(FileNotFoundError):
        dataset_version(str(tmp_path / "empty"))


def test_study_config_survives_the_checkpoint(test_config, tmp_path):
    session = TrainingSession.create(test_config)
    session.save(tmp_path / "c")
    assert ckpt.load_checkpoint_config(tmp_path / "c") == test_config
    assert isinstance(ckpt.load_checkpoint_config(tmp_path / "c"), StudyConfig)
