"""Class-balanced against natural sampling: same model, same optimizer steps, guided ⌈DSC⌉.

Unhealthy slices are ~10 % of a whole-body study's slices. This trains the demo model twice on a
preprocessed train split with a plain PyTorch loop (no Ray: the question is the sampling, not
the system), once drawing batches uniformly and once drawing each class with probability 1/2
(what ``train.balance_classes`` approximates by repeating unhealthy slices), for the same number
of steps. Then each checkpoint scores the first unhealthy slices of a split at one D and stride
for several w, including w = 0 (no guidance: the DDIM round trip's error alone), and prints the
mean |x − x̂| inside and outside lesions and mean ⌈DSC⌉ of the |x − x̂| and hot maps.

    python benchmarks/bench_balance.py --data runs/demo/data --config configs/demo.yaml \\
        --steps 840 --noise-level 400 --strides 10,40 --output /tmp/bench_balance

Each run trains two models (≈ 8 minutes each on the 2-core VM at ≈ 55 samples/s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from igconda.checkpoint import CONFIG_FILE, load_model
from igconda.config import load_config
from igconda.data.io import split_path
from igconda.data.schema import UNHEALTHY, class_balanced_weights, stack_images
from igconda.diffusion.ddim import ddim_decode, ddim_encode
from igconda.diffusion.schedule import NoiseSchedule
from igconda.metrics import optimal_dice
from igconda.train_loop import TRAIN_COLUMNS, TrainingSession, decode_slice_batch


def train(config_path: Path, data: Path, *, balance: bool, steps: int, output: Path, seed: int = 0) -> Path:
    """Train with i.i.d. batches (uniform, or each class with probability 1/2); save to ``output``."""
    config = load_config(config_path)
    table = pq.read_table(split_path(data, "train"), columns=list(TRAIN_COLUMNS))
    labels = table.column("label").to_numpy()
    weights = class_balanced_weights(labels) if balance else np.full(len(labels), 1.0 / len(labels))
    rng = np.random.default_rng(seed)
    session = TrainingSession.create(config)
    batch = config.train.batch_size
    per_epoch = max(1, len(labels) // batch)
    started = time.perf_counter()
    for epoch in range(1, steps // per_epoch + 1):
        draws = [rng.choice(len(labels), batch, p=weights) for _ in range(per_epoch)]
        stats = session.train_epoch((decode_slice_batch(table.take(pa.array(i))) for i in draws), epoch)
        print(f"  {'balanced' if balance else 'natural'} epoch {epoch}: loss "
              f"{stats.loss_sum / stats.samples:.4f} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
    return session.save(output)


def score(checkpoint: Path, data: Path, split: str, max_slices: int, noise_level: int,
          strides: list[int], guidance_scales: list[float]) -> list[dict[str, float]]:
    """One row per (stride, w): mean |x − x̂| in / out of lesions, ⌈DSC⌉ of |x − x̂| and hot map."""
    model, config = load_model(checkpoint, "cpu")
    schedule = NoiseSchedule.from_config(config.train)
    frame = pq.read_table(split_path(data, split), columns=["patient_id", "slice_index", "label", "image", "mask"]
                          ).to_pandas()
    frame = frame[frame["label"] == UNHEALTHY].sort_values(["patient_id", "slice_index"]).head(max_slices)
    height, width = config.preprocess.output_size[:2]
    x0 = torch.from_numpy(stack_images(frame["image"].to_numpy(), height, width)).unsqueeze(1)
    masks = stack_images(frame["mask"].to_numpy(), height, width, np.uint8)
    lesion = masks.astype(bool)
    rows = []
    for stride in strides:
        x_t = ddim_encode(model, x0, schedule, noise_level=noise_level, stride=stride)
        for w in guidance_scales:
            x_hat = ddim_decode(model, x_t, schedule, noise_level=noise_level, stride=stride, guidance_scale=w)
            diff = (x0 - x_hat).squeeze(1).numpy()
            absolute, hot = np.clip(np.abs(diff), 0, 1), np.clip(diff, 0, 1)
            rows.append({"stride": stride, "w": w, "in_lesion": float(absolute[lesion].mean()),
                         "outside": float(absolute[~lesion].mean()),
                         "dsc_max": float(np.nanmean(optimal_dice(absolute, masks)[0])),
                         "dsc_max_hot": float(np.nanmean(optimal_dice(hot, masks)[0]))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="preprocessed data folder")
    p.add_argument("--config", required=True, type=Path, help="study config (model, lr, EMA, batch)")
    p.add_argument("--output", required=True, type=Path, help="folder for the two checkpoints")
    p.add_argument("--steps", type=int, default=840, help="optimizer steps per model")
    p.add_argument("--split", default="test")
    p.add_argument("--max-slices", type=int, default=32)
    p.add_argument("--noise-level", type=int, default=400)
    p.add_argument("--strides", default="10,40")
    p.add_argument("--guidance-scales", default="0,3,5,8")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    strides = [int(v) for v in args.strides.split(",")]
    scales = [float(v) for v in args.guidance_scales.split(",")]
    for name, balance in (("natural", False), ("balanced", True)):
        folder = args.output / name
        if not (folder / CONFIG_FILE).is_file():
            train(args.config, args.data, balance=balance, steps=args.steps, output=folder)
        for row in score(folder, args.data, args.split, args.max_slices, args.noise_level, strides, scales):
            print(f"{name:8s} s={row['stride']:>3} w={row['w']:<4g} |x-x̂| in lesion {row['in_lesion']:.3f} "
                  f"outside {row['outside']:.4f}  ⌈DSC⌉ {row['dsc_max']:.3f}  hot {row['dsc_max_hot']:.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
