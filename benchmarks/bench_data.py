"""Data pipeline throughput: preprocessing (volumes/s) and Parquet -> torch batches (slices/s).

Measures, in one run:

1. ``preprocess_volume`` on the sts-crops patients in this process (one core, no Ray): the
   per-volume cost at the paper's sizes (2 x 2 x 3 mm, crop 192 x 192 x 288, 64 x 64 x 96) and at a
   small size (4 mm, 64 x 64 x 96 crop, 32 x 32 x 48);
2. the Ray Data job (``ray_jobs.preprocess.run_preprocessing``: one task per volume, Parquet
   writing included) at both sizes, on a local Ray with ``--num-cpus`` CPUs;
3. reading the paper-size train+valid+tune+test Parquet into (B, 1, H, W) float32 torch batches
   of 64: Ray Data ``read_parquet(...).iter_torch_batches`` vs plain ``pyarrow.parquet`` +
   ``torch.from_numpy``, same files, same batch size; reported as a ratio; plus Ray Data over a
   dataset materialized once in the object store (start-up paid once, not per epoch).

Run (about 2 minutes on 2 cores)::

    python benchmarks/bench_data.py                       # sts-crops beside the checkout
    python benchmarks/bench_data.py --manifest M.csv --volumes 10 --epochs 3
    python benchmarks/bench_data.py --data DIR      # reading only, on an existing paper-size dataset
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from igconda.config import PreprocessConfig
from igconda.data.io import split_path
from igconda.data.manifest import read_manifest
from igconda.data.preprocess import preprocess_volume
from igconda.data.schema import SPLITS, slice_shape_of, stack_images
from ray_jobs.preprocess import run_preprocessing

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = Path(os.environ.get("IGCONDA_STS_CROPS", REPO.parent / "shared" / "data" / "sts-crops")) / "manifest.csv"

SIZES = {
    "paper": PreprocessConfig(),
    "small": PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), crop_size=(64, 64, 96), output_size=(32, 32, 48)),
}


def bench_serial(manifest: Path, config: PreprocessConfig, volumes: int) -> float:
    entries = read_manifest(manifest)[:volumes]
    preprocess_volume(entries[0].pet_path, entries[0].mask_path, config)  # warm imports and caches
    start = time.perf_counter()
    for e in entries:
        preprocess_volume(e.pet_path, e.mask_path, config)
    return len(entries) / (time.perf_counter() - start)


def bench_job(manifest: Path, config: PreprocessConfig, output: Path) -> tuple[float, int]:
    start = time.perf_counter()
    summary = run_preprocessing(manifest, output, config, progress=False)
    n = sum(summary.patients.values())
    return n / (time.perf_counter() - start), n


def split_dirs(data: Path) -> list[str]:
    return [split_path(data, s) for s in SPLITS if any(Path(split_path(data, s)).glob("*.parquet"))]


def read_plain(data: Path, batch_size: int) -> int:
    """pyarrow -> numpy -> torch, one split folder after another."""
    n = 0
    for folder in split_dirs(data):
        table = pq.read_table(folder, columns=["image", "label", "height", "width"])
        h, w = slice_shape_of(table.column("height"), table.column("width"))
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            x = torch.from_numpy(stack_images(chunk.column("image"), h, w)).unsqueeze(1)
            y = torch.from_numpy(chunk.column("label").to_numpy())
            n += x.shape[0] + 0 * int(y.shape[0])
    return n


def read_ray(data: Path, batch_size: int, h: int, w: int) -> int:
    import ray

    def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # the list<float32> column arrives as an object array of (H*W,) arrays
        image = np.stack(batch["image"]).astype(np.float32, copy=False).reshape(-1, 1, h, w)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(np.asarray(batch["label"]))}

    ds = ray.data.read_parquet(split_dirs(data), columns=["image", "label"])
    n = 0
    for batch in ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
        n += batch["image"].shape[0]
    return n


def read_ray_materialized(ds, batch_size: int, h: int, w: int) -> int:
    """Iterate an already materialized Ray Dataset (blocks in the object store)."""
    def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        image = np.stack(batch["image"]).astype(np.float32, copy=False).reshape(-1, 1, h, w)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(np.asarray(batch["label"]))}

    return sum(b["image"].shape[0] for b in ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--volumes", type=int, default=5, help="volumes for the serial measurement")
    parser.add_argument("--epochs", type=int, default=2, help="timed repeats of each reading pass (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None,
                        help="existing paper-size dataset: skip preprocessing, measure reading only")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, float | int | str] = {"manifest": str(args.manifest), "num_cpus": args.num_cpus}
    # Start Ray's worker processes before timing anything: worker start-up is a one-off cost
    # per cluster, not per volume or per epoch.
    ray.data.range(4, override_num_blocks=4).map(lambda r: r).take_all()
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in ({} if args.data else SIZES).items():
            results[f"serial_{name}_volumes_per_s"] = round(bench_serial(args.manifest, config, args.volumes), 3)
            rate, n = bench_job(args.manifest, config, Path(tmp) / name)
            results[f"ray_job_{name}_volumes_per_s"] = round(rate, 3)
            results["volumes"] = n
            print(json.dumps(results), flush=True)

        data = args.data or Path(tmp) / "paper"
        h, w = SIZES["paper"].output_size[:2]
        read_plain(data, args.batch_size)  # warm the page cache and both code paths once
        read_ray(data, args.batch_size, h, w)
        plain, via_ray = [], []
        for _ in range(args.epochs):
            start = time.perf_counter()
            n = read_plain(data, args.batch_size)
            plain.append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            m = read_ray(data, args.batch_size, h, w)
            via_ray.append(m / (time.perf_counter() - start))
            assert n == m, (n, m)
        # Ray Data pays a fixed start-up per execution (planning, read tasks); a dataset read
        # once and kept in the object store (ds.materialize()) pays it only once.
        start = time.perf_counter()
        cached = ray.data.read_parquet(split_dirs(data), columns=["image", "label"]).materialize()
        results["ray_materialize_s"] = round(time.perf_counter() - start, 2)
        cached_rates = []
        for _ in range(args.epochs):
            start = time.perf_counter()
            k = read_ray_materialized(cached, args.batch_size, h, w)
            cached_rates.append(k / (time.perf_counter() - start))
        results["slices"] = n
        results["plain_pyarrow_slices_per_s"] = round(statistics.median(plain), 1)
        results["ray_data_slices_per_s"] = round(statistics.median(via_ray), 1)
        results["ray_over_plain_ratio"] = round(statistics.median(via_ray) / statistics.median(plain), 3)
        results["ray_materialized_slices_per_s"] = round(statistics.median(cached_rates), 1)
        results["ray_materialized_over_plain_ratio"] = round(statistics.median(cached_rates) / statistics.median(plain), 3)
    ray.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
