"""Training throughput: Ray Train + Ray Data (1 worker) against a plain PyTorch loop.

Both sides train the same model with the same batch size and the same number of torch threads
on the same Parquet slices (written by this script); the plain loop reads them with pyarrow and
decodes batches with the same :func:`igconda.train_loop.decode_slice_batch`, so the ratio
isolates what Ray Train and Ray Data add (worker start-up excluded: the first epoch of each side
is warm-up and is not timed). Then the plain loop's samples/s for the demo-size model
(channels (32, 32, 32), attention "011", 32 × 32, batch 32) and the paper's model
((64, 64, 64) at 64 × 64, batch 64).

    python benchmarks/bench_train.py                # about 2-3 minutes on 2 CPU cores
    python benchmarks/bench_train.py --slices 512 --epochs 3 --threads 2

Prints a JSON summary; record it in benchmarks/RESULTS.md (training section).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from igconda.config import StudyConfig, load_config
from igconda.data import schema
from igconda.data.io import split_path
from igconda.train_loop import TRAIN_COLUMNS, TrainingSession, decode_slice_batch


def study(size: int, channels: tuple[int, ...], batch: int, epochs: int, flash: bool) -> StudyConfig:
    return load_config(None, overrides={
        "preprocess": {"output_size": [size, size, 48]},
        "model": {"channels": list(channels), "attention": "011", "num_head_channels": 16,
                  "embedding_dim": 64, "norm_num_groups": 8, "use_flash_attention": flash},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 2e-4, "num_workers": 1,
                  "valid_every": epochs, "checkpoint_every": epochs, "amp": False},
    })


def write_slices(root: Path, size: int, slices: int, depth: int = 32) -> Path:
    """``slices`` random slices in ``<root>/slices/{train,valid}`` (valid: one small volume)."""
    rng = np.random.default_rng(0)
    geometry = {"original_shape": [size, size, depth], "original_affine": np.eye(4),
                "output_affine": np.eye(4), "output_shape": [size, size, depth]}
    for split, count in (("train", slices), ("valid", 8)):
        folder = Path(split_path(root, split))
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(max(1, count // depth)):
            d = min(depth, count)
            image = rng.random((size, size, d), dtype=np.float32)
            mask = np.zeros(image.shape, np.uint8)
            mask[size // 4: size // 2, size // 4: size // 2, : d // 2] = 1
            table = schema.volume_to_rows(image, mask, patient_id=f"{split}{v}", cohort="bench",
                                          tracer="FDG", role="internal", suv_max=1.0,
                                          scale_min=0.0, scale_max=1.0, pet_path="bench",
                                          geometry={**geometry, "output_shape": [size, size, d]})
            pq.write_table(table, folder / f"{split}{v}.parquet")
    return root


def plain_loop(config: StudyConfig, data: Path, epochs: int, max_batches: int | None = None) -> float:
    """samples/s of a plain loop over the Parquet train split, in its last epoch."""
    table = pq.read_table(split_path(data, "train"), columns=list(TRAIN_COLUMNS))
    session = TrainingSession.create(config)
    b = config.train.batch_size
    rates = []
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng(epoch).permutation(table.num_rows)
        shuffled = table.take(pa.array(order))
        batches = (decode_slice_batch(shuffled.slice(i, b)) for i in range(0, table.num_rows, b))
        if max_batches:
            batches = (x for i, x in enumerate(batches) if i < max_batches)
        start = time.perf_counter()
        stats = session.train_epoch(batches, epoch)  # decoding happens inside the timed loop
        elapsed = time.perf_counter() - start
        if epoch > 1 or epochs == 1:
            rates.append(stats.samples / elapsed)
    return float(rates[-1])  # the last epoch, as on the Ray side


def ray_loop(config: StudyConfig, data: Path, threads: int, storage: Path) -> dict[str, float]:
    """samples/s of Ray Train (1 worker, ``threads`` torch threads) in its last epoch."""
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ray_jobs.train import build_trainer

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    trainer = build_trainer(config, data=str(data), storage_path=str(storage), run_name="bench",
                            cpus_per_worker=1.0, torch_threads=threads)
    result = trainer.fit()
    # Ray Train V2 keeps the metrics of the last report (and of checkpointed ones): the last
    # epoch, which is warm (worker start-up and the first dataset execution are in epoch 1).
    last = result.metrics
    return {"samples_per_s": float(last["samples_per_s"]),
            "worker_torch_threads": float(last["torch_threads"]),
            "worker_default_threads": float(last["torch_default_threads"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=192, help="train slices for the Ray comparison")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--model-batches", type=int, default=3, help="timed batches per model size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, object] = {"cpu_count": os.cpu_count(), "threads": args.threads,
                              "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        demo = study(32, (32, 32, 32), 32, args.epochs, flash=True)
        data32 = write_slices(root / "d32", 32, args.slices)
        t0 = time.perf_counter()
        out["plain_samples_per_s"] = plain_loop(demo, data32, args.epochs)
        print(json.dumps(out), flush=True)  # partial results survive a timeout
        # Ray Train twice: the splits read once into the object store (the default for small
        # data, train.materialize_max_mb) and streamed from Parquet every epoch (large data).
        for name, max_mb in (("ray", demo.train.materialize_max_mb), ("ray_stream", 0)):
            config = demo.replace("train", materialize_max_mb=max_mb)
            ray_stats = ray_loop(config, data32, args.threads, root / name)
            out[f"{name}_samples_per_s"] = ray_stats["samples_per_s"]
            out[f"{name}_over_plain"] = out[f"{name}_samples_per_s"] / out["plain_samples_per_s"]
            out["ray_worker_torch_threads"] = ray_stats["worker_torch_threads"]
            out["ray_worker_default_threads"] = ray_stats["worker_default_threads"]
            print(json.dumps(out), flush=True)
        out["comparison_s"] = time.perf_counter() - t0
        print(json.dumps(out), flush=True)

        # Model sizes (plain loop; 2 epochs of a few batches, the first is warm-up).
        out["demo_model_samples_per_s"] = plain_loop(demo.replace("train", epochs=2), data32, 2,
                                                     args.model_batches)
        paper = study(64, (64, 64, 64), 64, 2, flash=True)
        data64 = write_slices(root / "d64", 64, 64 * args.model_batches)
        out["paper_model_samples_per_s"] = plain_loop(paper, data64, 2, args.model_batches)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
