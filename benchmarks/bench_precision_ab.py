"""bf16 autocast against fp32 training at equal steps: the trained model's quality, the step's speed.

Issue 12 asks whether a model trained under bf16 autocast is as good as one trained in fp32 at
the same number of optimizer steps. Per seed, this trains the config's model twice with
igconda's own :class:`igconda.train_loop.TrainingSession` (plain PyTorch, no Ray), once with
``train.amp = false`` (fp32) and once with ``train.amp = true`` (bf16 where
:mod:`igconda.precision` allows it). The two sessions share everything but the precision: the
same initial weights (``train.seed``), the same class-balanced batches (each class drawn with
probability 1/2, as the study's balanced epochs show them), the same (t, ε, dropped-condition)
draws (``TrainingSession.train_epoch`` seeds them from (seed, epoch)). The arms alternate in
chunks of ``--chunk`` steps, the order flipping each chunk, so machine noise hits both; each
arm's steps/s counts the optimizer steps only.

Every checkpoint (its EMA weights) is then evaluated the same way, in fp32, on the tune split
(never test):

- ``valid_loss``: the held-out diffusion loss over every tune slice, each with a fixed (t, ε)
  draw (``TrainingSession.validation_sums`` with ``train.seed = --eval-seed``, the same for all
  checkpoints);
- at one fixed (D, s, w) and map kind, through :class:`igconda.inference.CounterfactualPredictor`
  on the first ``--max-slices`` unhealthy tune slices: mean ⌈DSC⌉ (``dsc``), ``auprc``, the
  w = 0 control of the same sign (``dsc_control``) and ``gain`` = ``dsc`` − ``dsc_control``.

Prints per-run rows, then mean ± std over seeds per arm and of the paired bf16 − fp32
differences; writes ``runs.csv`` and ``summary.md`` to ``--output``. Checkpoints and timings of a
seed already in ``--output`` are re-evaluated, not retrained.

    nice -n 5 python benchmarks/bench_precision_ab.py --data runs/demo/data \\
        --config configs/demo.yaml --steps 500 --seeds 0,1 --output runs/precision_ab

On a CPU without bf16 units autocast stays off and both arms would be fp32: the script refuses
unless ``IGCONDA_CPU_BF16=1`` forces (emulated, slow) bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from bench_strides import load_unhealthy

from igconda.checkpoint import load_checkpoint_config
from igconda.config import load_config
from igconda.data.io import split_path
from igconda.data.schema import class_balanced_weights
from igconda.inference import CounterfactualPredictor
from igconda.map_kinds import MAP_KINDS, matching_control
from igconda.train_loop import TRAIN_COLUMNS, VALID_COLUMNS, TrainingSession, decode_slice_batch

#: (arm name, train.amp); fp32 first.
ARMS = (("fp32", False), ("bf16", True))
#: Evaluation columns, in table order (training columns come first).
METRICS = ("valid_loss", "dsc", "auprc", "dsc_control", "gain")
TRAINING = ("steps_per_s", "train_loss")


def train_pair(config_path: Path, data: Path, *, steps: int, seed: int, output: Path,
               chunk: int = 25) -> dict[str, dict[str, object]]:
    """Train the fp32 and the bf16 arm of one seed, interleaved, and save both checkpoints.

    Args:
        config_path: study config (model and train sections; ``train.seed``/``amp`` are set here).
        data: preprocessed data folder (its ``slices/train`` split is trained on).
        steps: optimizer steps per arm (batches of ``train.batch_size``).
        seed: ``train.seed`` of both arms, and the seed of the batch draws.
        output: checkpoints go to ``output/<arm>_seed<seed>``.
        chunk: steps per alternation (one ``train_epoch`` call per arm per chunk).

    Returns:
        ``{arm: {"checkpoint", "dtype", "steps", "seconds", "steps_per_s", "train_loss"}}``;
        ``train_loss`` is the mean loss of the last chunk.

    Raises:
        SystemExit: the bf16 arm would run in fp32 (no bf16 units, ``IGCONDA_CPU_BF16`` unset).
    """
    sessions = {name: TrainingSession.create(load_config(config_path, {"train": {"seed": seed, "amp": amp}}))
                for name, amp in ARMS}
    if sessions["bf16"].amp_dtype is None:
        raise SystemExit("error: train.amp gives no autocast dtype on this machine (no bf16 units, "
                         "igconda.precision), so both arms would be fp32; set IGCONDA_CPU_BF16=1 to "
                         "force emulated bf16")
    table = pq.read_table(split_path(data, "train"), columns=list(TRAIN_COLUMNS))
    weights = class_balanced_weights(table.column("label").to_numpy())
    rng = np.random.default_rng(seed)
    batch = sessions["fp32"].config.train.batch_size
    seconds = dict.fromkeys(sessions, 0.0)
    last_loss: dict[str, float] = {}
    done, epoch = 0, 0
    while done < steps:
        epoch += 1
        n = min(chunk, steps - done)
        # Decoded once and shown to both arms: the batches are identical, and decoding stays
        # out of the timed steps.
        batches = [decode_slice_batch(table.take(pa.array(rng.choice(len(weights), batch, p=weights))))
                   for _ in range(n)]
        for name, _ in (ARMS if epoch % 2 else ARMS[::-1]):
            stats = sessions[name].train_epoch(batches, epoch)
            seconds[name] += stats.seconds
            last_loss[name] = stats.loss_sum / stats.samples
        done += n
        print(f"  seed {seed} step {done}/{steps}: " + "  ".join(
            f"{k} loss {last_loss[k]:.4f} ({seconds[k]:.0f} s)" for k in sessions), file=sys.stderr, flush=True)
    result = {}
    for name, session in sessions.items():
        folder = session.save(output / f"{name}_seed{seed}", {"steps": steps})
        result[name] = {"checkpoint": str(folder), "dtype": str(session.amp_dtype), "steps": steps,
                        "seconds": seconds[name], "steps_per_s": steps / seconds[name],
                        "train_loss": last_loss[name]}
    return result


def held_out_loss(checkpoint: Path, data: Path, split: str, eval_seed: int) -> float:
    """Mean fp32 diffusion loss of the checkpoint's EMA weights over every row of ``split``.

    The study's validation loss (``TrainingSession.validation_sums``: one fixed (t, ε) per row,
    no condition dropout) with ``train.seed = eval_seed``, so every checkpoint sees the same draws.
    """
    stored = load_checkpoint_config(checkpoint)
    config = dataclasses.replace(stored, train=dataclasses.replace(stored.train, seed=eval_seed, amp=False))
    session = TrainingSession.create(config)
    session.restore(checkpoint)
    table = pq.read_table(split_path(data, split), columns=list(VALID_COLUMNS))
    batches = (decode_slice_batch(table.slice(i, 256)) for i in range(0, table.num_rows, 256))
    total, count = session.validation_sums(batches)
    return total / count


def counterfactual_quality(checkpoint: Path, batch: dict[str, np.ndarray], *, noise_level: int, stride: int,
                           guidance_scale: float, map_kind: str) -> dict[str, float]:
    """Mean ⌈DSC⌉ and AUPRC of ``map_kind``, its w = 0 control's ⌈DSC⌉ and the gain over it (fp32)."""
    predictor = CounterfactualPredictor(checkpoint, noise_level=noise_level, guidance_scale=guidance_scale,
                                        stride=stride, map_kind=map_kind, device="cpu", amp=False, batch_size=64)
    out = predictor(batch)
    dsc = float(np.nanmean(out["dsc_max"]))
    control = float(np.nanmean(out[f"dsc_max_{matching_control(map_kind)}"]))
    return {"dsc": dsc, "auprc": float(np.nanmean(out["auprc"])), "dsc_control": control, "gain": dsc - control}


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each arm's columns, and of the paired bf16 − fp32 differences.

    Args:
        runs: one row per (seed, arm) with :data:`TRAINING` and :data:`METRICS` columns.

    Returns:
        Rows ``fp32``, ``bf16``, ``bf16 − fp32`` and ``bf16 / fp32 (steps/s)``; columns
        ``<metric>_mean`` and ``<metric>_std`` (std with ddof = 1; NaN for one seed).
    """
    columns = [*TRAINING, *METRICS]
    wide = runs.pivot(index="seed", columns="arm", values=columns)
    parts = {name: wide.xs(name, axis=1, level="arm") for name, _ in ARMS}
    parts["bf16 − fp32"] = parts["bf16"] - parts["fp32"]
    rows = []
    for name, frame in parts.items():
        row: dict[str, object] = {"arm": name, "seeds": len(frame)}
        for c in columns:
            row[f"{c}_mean"], row[f"{c}_std"] = frame[c].mean(), frame[c].std()
        rows.append(row)
    ratio = parts["bf16"]["steps_per_s"] / parts["fp32"]["steps_per_s"]
    rows.append({"arm": "bf16 / fp32 (steps/s)", "seeds": len(ratio),
                 "steps_per_s_mean": ratio.mean(), "steps_per_s_std": ratio.std()})
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table of ``mean ± std`` cells."""
    columns = [*TRAINING, *METRICS]
    lines = ["| arm | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in summary.to_dict("records"):
        cells = []
        for c in columns:
            mean, std = row.get(f"{c}_mean"), row.get(f"{c}_std")
            digits = 2 if c == "steps_per_s" else 4
            cells.append("" if mean is None or pd.isna(mean) else
                         f"{mean:+.{digits}f}" if row["arm"] == "bf16 − fp32" else f"{mean:.{digits}f}")
            if cells[-1] and std is not None and not pd.isna(std):
                cells[-1] += f" ± {std:.{digits}f}"
        lines.append(f"| {row['arm']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config: Path, data: Path, *, seeds: list[int], steps: int, output: Path, chunk: int = 25,
        noise_level: int | None = None, stride: int | None = None, guidance_scale: float | None = None,
        map_kind: str = "hot", max_slices: int = 40, split: str = "tune", eval_seed: int = 0
        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (or reuse) both arms for every seed, evaluate every checkpoint; (runs, summary).

    ``noise_level``, ``stride`` and ``guidance_scale`` default to the config's ``infer`` section.
    """
    if split == "test":
        raise SystemExit("error: --split must not be test (the test split is scored once, by the study)")
    if map_kind not in MAP_KINDS:
        raise SystemExit(f"error: --map-kind must be one of {MAP_KINDS}, got {map_kind!r}")
    infer = load_config(config).infer
    grid = {"noise_level": noise_level or infer.noise_level, "stride": stride or infer.stride,
            "guidance_scale": infer.guidance_scale if guidance_scale is None else guidance_scale}
    batch = load_unhealthy(data, split, max_slices)
    print(f"bench_precision_ab: {len(batch['image'])} unhealthy '{split}' slices, D={grid['noise_level']}, "
          f"s={grid['stride']}, w={grid['guidance_scale']:g}, map {map_kind}", file=sys.stderr)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        record = output / f"training_seed{seed}.json"
        if record.is_file():
            trained = json.loads(record.read_text())
        else:
            trained = train_pair(config, data, steps=steps, seed=seed, output=output, chunk=chunk)
            record.write_text(json.dumps(trained, indent=1))
        for arm, info in trained.items():
            checkpoint = Path(info["checkpoint"])
            row = {"seed": seed, "arm": arm, **{k: info[k] for k in ("dtype", "steps", *TRAINING)},
                   "valid_loss": held_out_loss(checkpoint, data, split, eval_seed),
                   **counterfactual_quality(checkpoint, batch, map_kind=map_kind, **grid)}
            rows.append(row)
            print("  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr, flush=True)
    runs = pd.DataFrame(rows).assign(map_kind=map_kind, slices=len(batch["image"]), **grid)
    summary = summarize(runs)
    runs.to_csv(output / "runs.csv", index=False)
    summary.to_csv(output / "summary.csv", index=False)
    header = (f"{len(seeds)} seeds × {steps} steps per arm; tune split, {len(batch['image'])} unhealthy slices, "
              f"D = {grid['noise_level']}, s = {grid['stride']}, w = {grid['guidance_scale']:g}, map {map_kind}; "
              "evaluation in fp32")
    (output / "summary.md").write_text(f"{header}\n\n{markdown(summary)}\n")
    return runs, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="preprocessed data folder")
    p.add_argument("--config", required=True, type=Path, help="study config (model, train, infer)")
    p.add_argument("--output", required=True, type=Path, help="folder for checkpoints and tables")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per arm")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--chunk", type=int, default=25, help="steps per alternation of the arms")
    p.add_argument("--noise-level", type=int, help="D (default: the config's infer.noise_level)")
    p.add_argument("--stride", type=int, help="s (default: infer.stride)")
    p.add_argument("--guidance-scale", type=float, help="w (default: infer.guidance_scale)")
    p.add_argument("--map-kind", default="hot", help="the scored map (the demo's tuning chose hot)")
    p.add_argument("--max-slices", type=int, default=40, help="unhealthy tune slices scored (0 = all)")
    p.add_argument("--split", default="tune")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out loss's (t, ε) draws")
    args = p.parse_args(argv)
    runs, summary = run(args.config, args.data, seeds=[int(s) for s in args.seeds.split(",")],
                        steps=args.steps, output=args.output, chunk=args.chunk, noise_level=args.noise_level,
                        stride=args.stride, guidance_scale=args.guidance_scale, map_kind=args.map_kind,
                        max_slices=args.max_slices, split=args.split, eval_seed=args.eval_seed)
    print(runs.drop(columns=["map_kind", "noise_level", "stride", "guidance_scale"]).to_string(index=False))
    print()
    print((args.output / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
