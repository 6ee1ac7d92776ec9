"""Does the class condition carry lesion-specific information? Training designs A/B'd by it.

Each arm is a set of config overrides (conditioning path, trained timestep range, learning rate,
width...). Every arm trains the same number of optimiser steps with the same class-balanced
batches (plain PyTorch, no Ray: the question is the model, not the system), then scores the same
unhealthy slices of non-test splits (valid + tune by default; never test) with maps from ONE
encoding per D:

- ``abs``      |x − x̂_w|            the paper's map
- ``hot``      max(x − x̂_w, 0)
- ``guidance`` max(x̂_∅ − x̂_w, 0)    what the healthy condition changes (x̂_∅: the w = 0 decode
                                      of the same latent)
- ``control``  |x − x̂_∅|            the w = 0 round trip: DDIM discretisation error only
- ``raw``      x                     the scaled PET itself

and prints mean ⌈DSC⌉ and mean AUPRC per map. The *guidance gain* is ⌈DSC⌉(best IgCONDA map) −
⌈DSC⌉(control): what guidance adds beyond the round trip's error. Equal steps is equal wall time
for arms whose step costs the same (conditioning and timestep range change no FLOPs); the
per-arm training throughput is printed so a reader can check.

    python benchmarks/bench_condition.py --data runs/demo/data --config configs/demo.yaml \\
        --steps 600 --output /tmp/bench_condition \\
        --arm paper= --arm class_embedding=model.conditioning=class_embedding \\
        --arm class_embedding_t500=model.conditioning=class_embedding,train.max_timestep=500

Checkpoints already in ``--output/<arm>`` are scored, not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from igconda.checkpoint import CONFIG_FILE, load_model
from igconda.config import load_config
from igconda.data.io import split_path
from igconda.data.schema import UNHEALTHY, class_balanced_weights, stack_images
from igconda.diffusion.ddim import ddim_decode, ddim_encode
from igconda.diffusion.schedule import NoiseSchedule
from igconda.metrics import auprc, optimal_dice
from igconda.train_loop import TRAIN_COLUMNS, TrainingSession, decode_slice_batch

MAPS = ("abs", "hot", "guidance", "control", "raw")


def parse_arm(text: str) -> tuple[str, dict[str, dict[str, object]]]:
    """``name=section.key=value,section.key=value`` → (name, nested overrides)."""
    name, _, spec = text.partition("=")
    overrides: dict[str, dict[str, object]] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        overrides.setdefault(section, {})[field] = yaml.safe_load(value)
    return name, overrides


def train(config_path: Path, overrides: dict, data: Path, steps: int, output: Path, seed: int) -> float:
    """Train ``steps`` balanced batches; save the checkpoint to ``output``; return samples/s."""
    return train_milestones(config_path, overrides, data, {steps: output}, seed)


def train_milestones(config_path: Path, overrides: dict, data: Path, milestones: dict[int, Path],
                     seed: int) -> float:
    """Train one model in class-balanced batches (each class drawn with probability 1/2, as the
    study's balanced epochs show it), saving a checkpoint at each milestone.

    Args:
        milestones: ``{optimiser steps: checkpoint folder}``; training runs to the largest.
        overrides: config overrides (``{section: {key: value}}``); ``train.seed`` = ``seed``.

    Returns:
        Training throughput in samples/s (saving excluded).
    """
    config = load_config(config_path, {**overrides, "train": {**overrides.get("train", {}), "seed": seed}})
    table = pq.read_table(split_path(data, "train"), columns=list(TRAIN_COLUMNS))
    labels = table.column("label").to_numpy()
    weights = class_balanced_weights(labels)  # each class drawn with probability 1/2
    rng = np.random.default_rng(seed)
    session = TrainingSession.create(config)
    batch = config.train.batch_size
    per_epoch = 50
    steps, done, seconds = max(milestones), 0, 0.0
    epoch = 0
    while done < steps:
        epoch += 1
        # An "epoch" here is a logging unit of at most 50 steps that never crosses a milestone.
        n = min(per_epoch, min(m for m in milestones if m > done) - done)
        draws = [rng.choice(len(labels), batch, p=weights) for _ in range(n)]
        started = time.perf_counter()
        stats = session.train_epoch((decode_slice_batch(table.take(pa.array(i))) for i in draws), epoch)
        seconds += time.perf_counter() - started
        done += n
        print(f"  step {done}/{steps}: loss {stats.loss_sum / stats.samples:.4f} ({seconds:.0f} s)",
              file=sys.stderr, flush=True)
        if done in milestones:
            session.save(milestones[done], {"steps": done})
    return steps * batch / seconds


def load_slices(data: Path, splits: list[str], max_slices: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Unhealthy slices of ``splits`` (deterministic order): x0 (N, 1, H, W) and masks (N, H, W)."""
    frames = [pq.read_table(split_path(data, s), columns=["patient_id", "slice_index", "label", "image", "mask"]
                            ).to_pandas() for s in splits if Path(split_path(data, s)).is_dir()]
    if not frames:
        raise SystemExit(f"error: none of the splits {splits} exists in {data}")
    frame = pd.concat(frames)
    frame = frame[frame["label"] == UNHEALTHY].sort_values(["patient_id", "slice_index"])
    if max_slices:
        frame = frame.head(max_slices)
    x0 = torch.from_numpy(stack_images(frame["image"].to_numpy(), size, size)).unsqueeze(1)
    return x0, stack_images(frame["mask"].to_numpy(), size, size, np.uint8)


def score(checkpoint: Path, x0: torch.Tensor, masks: np.ndarray, noise_levels: list[int], stride: int,
          scales: list[float]) -> list[dict[str, float]]:
    """One row per (D, w): mean ⌈DSC⌉ and AUPRC of every map in :data:`MAPS`."""
    model, config = load_model(checkpoint, "cpu")
    schedule = NoiseSchedule.from_config(config.train)
    image = x0.squeeze(1).numpy()
    rows = []
    for noise_level in noise_levels:
        x_t = ddim_encode(model, x0, schedule, noise_level=noise_level, stride=stride)
        x_null = ddim_decode(model, x_t, schedule, noise_level=noise_level, stride=stride,
                             guidance_scale=0.0).squeeze(1).numpy()
        for w in scales:
            x_w = ddim_decode(model, x_t, schedule, noise_level=noise_level, stride=stride,
                              guidance_scale=w).squeeze(1).numpy()
            maps = {"abs": np.abs(image - x_w), "hot": image - x_w, "guidance": x_null - x_w,
                    "control": np.abs(image - x_null), "raw": image}
            row: dict[str, float] = {"D": noise_level, "w": w}
            for name, m in maps.items():
                m = np.clip(m, 0.0, 1.0)
                row[f"dsc_{name}"] = float(np.nanmean(optimal_dice(m, masks)[0]))
                row[f"auprc_{name}"] = float(np.nanmean(auprc(m, masks)))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="preprocessed data folder")
    p.add_argument("--config", required=True, type=Path, help="base study config")
    p.add_argument("--output", required=True, type=Path, help="folder for one checkpoint per arm")
    p.add_argument("--arm", action="append", required=True, help="name=section.key=value,...")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="valid,tune", help="scored splits (never test)")
    p.add_argument("--max-slices", type=int, default=64)
    p.add_argument("--noise-levels", default="200,400")
    p.add_argument("--stride", type=int, default=40)
    p.add_argument("--guidance-scales", default="3,6,10")
    args = p.parse_args(argv)
    if "test" in args.splits.split(","):
        raise SystemExit("error: --splits must not include test (choices are made on these scores)")
    size = load_config(args.config).preprocess.output_size[0]
    x0, masks = load_slices(args.data, args.splits.split(","), args.max_slices, size)
    print(f"scoring {len(x0)} unhealthy slices of {args.splits}", flush=True)
    results = []
    for name, overrides in map(parse_arm, args.arm):
        folder = args.output / f"{name}_seed{args.seed}"
        rate = None
        if not (folder / CONFIG_FILE).is_file():
            rate = train(args.config, overrides, args.data, args.steps, folder, args.seed)
        for row in score(folder, x0, masks, [int(v) for v in args.noise_levels.split(",")], args.stride,
                         [float(v) for v in args.guidance_scales.split(",")]):
            row.update(arm=name, seed=args.seed, steps=args.steps, samples_per_s=rate)
            best = max(row[f"dsc_{m}"] for m in ("abs", "hot", "guidance"))
            row["guidance_gain"] = best - row["dsc_control"]
            results.append(row)
            print(f"{name:24s} D={row['D']:<4} w={row['w']:<5g} " + "  ".join(
                f"{m} {row[f'dsc_{m}']:.3f}/{row[f'auprc_{m}']:.3f}" for m in MAPS)
                + f"  gain {row['guidance_gain']:+.3f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"results_seed{args.seed}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
