"""Ray Data batch inference against a plain PyTorch loop: same slices, same model, one run.

Both paths run the batch-inference job's own actor class, :class:`ray_jobs.infer_patients.PartWriter`
(:class:`igconda.inference.CounterfactualPredictor`, then each batch written as per-patient parts),
on the same Parquet slices with the same settings:

* **plain**: pyarrow reads the files, a Python loop feeds batches to one ``PartWriter`` in this
  process;
* **ray**: what ``ray_jobs.infer`` runs: ``ray.data.read_parquet`` → ``repartition`` into blocks
  of a batch → ``map_batches(PartWriter, concurrency=k)``, the records consumed with
  ``iter_batches``.

The ratio ray / plain at concurrency 1 measures Ray Data's overhead (goal: ≥ 0.9 at steady state,
i.e. after the first batch: start-up is reported apart). Both paths compute with ``--threads``
torch threads; the Ray actor reserves at most (CPUs − 1) / k of Ray's CPUs, because the Parquet
readers need one whole free CPU to be scheduled, and sets its threads as ``infer.torch_threads``
does. The model has random weights (its output layer made non-zero): speed does not depend on
training. Ray's own start-up is excluded; the actors' model loading is included.

Run::

    python benchmarks/bench_infer.py --config configs/demo.yaml --slices 1024 --patients 16 \\
        --noise-level 400 --stride 50 --batch-size 64 --threads 2 --concurrency 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from igconda.checkpoint import save_checkpoint
from igconda.config import load_config
from igconda.data.io import split_path
from igconda.data.schema import (
    SLICE_SCHEMA,
    encode_geometry,
    slice_shape_of,
    stack_images,
    volume_to_rows,
)
from igconda.ddim_grid import network_evaluations
from igconda.models import build_unet
from ray_jobs.infer import PREDICTOR_INPUT
from ray_jobs.infer_patients import PartWriter

REPO = Path(__file__).resolve().parents[1]


def make_inputs(root: Path, config_path: Path, slices: int, patients: int, seed: int = 0) -> tuple[Path, Path]:
    """A random-weight checkpoint and ``slices`` synthetic slices split over ``patients`` files."""
    config = load_config(config_path)
    torch.manual_seed(seed)
    model = build_unet(config.model)
    with torch.no_grad():  # MONAI zero-initialises the output layer: ε = 0 would be a no-op
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    checkpoint = save_checkpoint(root / "ckpt", model=model, config=config)
    h, w, _ = config.preprocess.output_size
    rng = np.random.default_rng(seed)
    folder = Path(split_path(root / "data", "test"))
    folder.mkdir(parents=True)
    per_patient = int(np.ceil(slices / patients))
    geometry = encode_geometry({"original_shape": [h, w, per_patient], "original_affine": np.eye(4),
                                "output_affine": np.eye(4), "output_shape": [h, w, per_patient]})
    for p in range(patients):
        depth = min(per_patient, slices - p * per_patient)
        if depth <= 0:
            break
        image = rng.random((h, w, depth), dtype=np.float32) * 0.3
        mask = np.zeros((h, w, depth), np.uint8)
        mask[h // 3: h // 2, w // 3: w // 2, :] = 1  # every slice unhealthy: metrics run too
        image[mask > 0] += 0.6
        table = volume_to_rows(image, mask, patient_id=f"P{p:03d}", cohort="bench", tracer="FDG",
                               role="internal", suv_max=10.0, scale_min=0.0,
                               scale_max=10.0, pet_path="-", geometry=json.loads(geometry))
        pq.write_table(table.cast(SLICE_SCHEMA), folder / f"P{p:03d}.parquet")
    return checkpoint, folder


def plain_loop(checkpoint: Path, folder: Path, kwargs: dict, batch_size: int, threads: int,
               parts: Path) -> dict[str, float]:
    """Slices, total seconds, and seconds until the first batch came back (model load + 1 batch)."""
    started = time.perf_counter()
    writer = PartWriter(str(parts), torch_threads=threads, checkpoint=str(checkpoint), **kwargs)
    n, first = 0, None
    for file in sorted(folder.glob("*.parquet")):
        table = pq.read_table(file, columns=list(PREDICTOR_INPUT))
        for batch in table.to_batches(max_chunksize=batch_size):
            n += int(writer(_numpy_batch(batch))["slices"].sum())
            first = first or (time.perf_counter() - started, n)
    return _timing(n, time.perf_counter() - started, first)


def _timing(n: int, seconds: float, first: tuple[float, int]) -> dict[str, float]:
    """Overall slices/s and steady-state slices/s (after the first batch: start-up excluded)."""
    steady = (n - first[1]) / (seconds - first[0]) if n > first[1] else float("nan")
    return {"slices": n, "seconds": seconds, "first_batch_s": first[0],
            "slices_per_s": n / seconds, "steady_slices_per_s": steady}


def _numpy_batch(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """A record batch as Ray Data's numpy format hands it to the predictor: list columns as
    (N, H·W) arrays of their own dtype, the others as 1D arrays."""
    h, w = slice_shape_of(batch.column("height"), batch.column("width"))
    return {name: (stack_images(column, h, w, column.type.value_type.to_pandas_dtype()).reshape(len(column), -1)
                   if pa.types.is_list(column.type) else column.to_numpy(zero_copy_only=False))
            for name, column in zip(batch.schema.names, batch.columns, strict=True)}


def ray_data(checkpoint: Path, folder: Path, kwargs: dict, batch_size: int, concurrency: int,
             threads: int, parts: Path) -> dict[str, float]:
    import ray

    # Actors that reserve every CPU leave none for the Parquet readers, which ask for one whole
    # CPU each, and the run never starts (two 1-CPU actors, and two 0.75-CPU actors, on this
    # 2-CPU VM both hung): keep one CPU free for them, as ray_jobs.infer warns.
    cpus = min(float(threads), (ray.cluster_resources()["CPU"] - 1.0) / concurrency)
    started = time.perf_counter()
    ds = ray.data.read_parquet(str(folder)).select_columns(list(PREDICTOR_INPUT))
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(PartWriter, fn_constructor_kwargs={"parts": str(parts), "torch_threads": threads,
                                                           "checkpoint": str(checkpoint), **kwargs},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus)
    n, first = 0, None
    for records in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += int(records["slices"].sum())
        first = first or (time.perf_counter() - started, n)
    return _timing(n, time.perf_counter() - started, first)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--slices", type=int, default=1024)
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--noise-level", type=int, default=400)
    p.add_argument("--stride", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per predictor")
    p.add_argument("--concurrency", default="1", help="Ray actor counts to measure")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(args.threads)
    # As ray_jobs.infer runs its actors: inputs kept beside the predictions, scoring left to the driver.
    kwargs = {"noise_level": args.noise_level, "guidance_scale": args.guidance_scale,
              "stride": args.stride, "device": "cpu", "keep_inputs": True, "score": False}
    results: dict[str, object] = {"config": str(args.config), "slices": args.slices,
                                  "noise_level": args.noise_level, "stride": args.stride,
                                  "evaluations_per_slice": network_evaluations(args.noise_level, args.stride, unguided_decode=True),
                                  "batch_size": args.batch_size, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        checkpoint, folder = make_inputs(Path(tmp), args.config, args.slices, args.patients)
        plain = plain_loop(checkpoint, folder, kwargs, args.batch_size, args.threads, Path(tmp) / "parts_plain")
        results["plain"] = plain
        print(f"plain loop: {plain['slices']} slices in {plain['seconds']:.1f} s = "
              f"{plain['slices_per_s']:.2f} slices/s (steady {plain['steady_slices_per_s']:.2f}; "
              f"first batch after {plain['first_batch_s']:.1f} s)", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            for k in (int(c) for c in args.concurrency.split(",")):
                timing = ray_data(checkpoint, folder, kwargs, args.batch_size, k, args.threads,
                                  Path(tmp) / f"parts_ray{k}")
                if timing["slices"] != plain["slices"]:
                    raise SystemExit(f"Ray Data produced {timing['slices']} slices, expected {plain['slices']}")
                timing["ratio"] = timing["slices_per_s"] / plain["slices_per_s"]
                timing["steady_ratio"] = timing["steady_slices_per_s"] / plain["steady_slices_per_s"]
                results[f"ray_concurrency_{k}"] = timing
                print(f"ray data, concurrency {k}: {timing['slices_per_s']:.2f} slices/s "
                      f"(ratio {timing['ratio']:.2f}); steady {timing['steady_slices_per_s']:.2f} "
                      f"slices/s (ratio {timing['steady_ratio']:.2f}); first batch after "
                      f"{timing['first_batch_s']:.1f} s", flush=True)
        finally:
            ray.shutdown()
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
