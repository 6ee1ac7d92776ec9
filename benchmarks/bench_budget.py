"""What more training buys: ⌈DSC⌉ of IgCONDA's chosen map, its w = 0 control and raw intensity
against optimiser steps, for the design a study config keeps.

One model is trained (class-balanced batches, as the study's balanced epochs draw them;
:func:`bench_condition.train_milestones`) and saved at each budget. At each budget the study's
own tuning job (``ray_jobs.tune``: Ray Tune over the config's (D, w, map kind) grid on the tune
split, τ calibrated there) chooses the settings, and the unhealthy test slices are scored with
them through the one evaluation path (:mod:`igconda.evaluation`): IgCONDA's chosen map, the
paper's |x − x̂| map, the chosen map's w = 0 control, raw intensity and 41 % SUVmax thresholding,
in ⌈DSC⌉, Dice at the calibrated τ and AUPRC. Test is only scored, never chosen on.

    python benchmarks/bench_budget.py --config configs/demo.yaml --data runs/seeds/seed0/data \\
        --steps 750,1500,3000 --strides 50,10 --output runs/budget

(the demo trains ~750 steps). Budgets already saved under ``--output`` are not retrained; tuning
results already there are re-used. Writes ``<output>/curve.csv`` (every cohort),
``<output>/curve.md`` (pooled internal cohorts) and ``<output>/curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from bench_condition import train_milestones
from bench_seeds import INTERNAL, METRICS, label_chosen

from igconda import evaluation as E
from igconda.anomaly_methods import IgCondaMethod, baseline_methods
from igconda.checkpoint import MODEL_FILE, load_model
from igconda.data.io import split_path
from igconda.data.schema import UNHEALTHY
from igconda.data.study_layout import TuneOutput
from igconda.diffusion.schedule import NoiseSchedule

SHOWN = ("chosen", "igconda_abs", "control", "intensity", "threshold_41")


def test_slices(data: Path) -> dict[str, np.ndarray]:
    """The unhealthy test slices as a batch of numpy columns (:mod:`igconda.evaluation`)."""
    folder = Path(split_path(data, "test"))
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} does not exist (is {data} a preprocessed data folder?)")
    frame = pq.read_table(folder).to_pandas()
    frame = frame[frame["label"] == UNHEALTHY].sort_values(["patient_id", "slice_index"])
    if frame.empty:
        raise SystemExit(f"error: {folder} has no unhealthy slice to score")
    return {c: frame[c].to_numpy() for c in frame.columns}


def with_stride(config: Path, stride: int, folder: Path) -> Path:
    """``config`` with its tune and infer stride set to ``stride``, written into ``folder``."""
    data = yaml.safe_load(config.read_text()) or {}
    for section in ("tune", "infer"):
        data.setdefault(section, {})["stride"] = int(stride)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{config.stem}_s{stride}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def tune(checkpoint: Path, data: Path, config: Path, output: Path) -> dict:
    """The study's tuning job on ``checkpoint``; its ``best.json`` (re-used when present)."""
    best = TuneOutput(output).best
    if not best.is_file():
        from ray_jobs import tune as tune_job

        code = tune_job.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output",
                              str(output), "--config", str(config), "--tracking-uri",
                              f"sqlite:///{output.parent.parent.resolve()}/mlflow.db",
                              "--experiment", "bench-budget"])
        if code:
            raise SystemExit(f"error: tuning {checkpoint} failed (exit {code})")
    return json.loads(best.read_text())


def score(checkpoint: Path, best: dict, batch: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per-cohort summary (:func:`igconda.evaluation.summarize`) of every method on ``batch`` at
    the tuned settings, with the chosen map and its control labelled (:func:`label_chosen`)."""
    model, config = load_model(checkpoint, "cpu")
    kinds = tuple(dict.fromkeys((best["map_kind"], "abs")))
    igconda = IgCondaMethod(model.eval(), NoiseSchedule.from_config(config.train),
                              noise_level=best["noise_level"], stride=best["stride"],
                              guidance_scale=best["guidance_scale"], kinds=kinds, amp=True)
    maps: dict[str, np.ndarray] = {}
    for method in (igconda, *baseline_methods()):
        maps.update(method.maps(batch))
    per_slice = E.score_methods(batch, maps, best.get("thresholds", {}))
    return label_chosen(E.summarize(per_slice), best["map_kind"])


def markdown(curve: pd.DataFrame) -> str:
    """One table per metric: a row per budget, a column per method (pooled internal cohorts)."""
    pooled = curve[curve["group"] == INTERNAL]
    parts = []
    for metric in METRICS:
        table = pooled.pivot_table(index=["steps", "stride", "map_kind", "D", "w"], columns="method",
                                   values=metric)
        shown = [m for m in SHOWN if m in table.columns]
        lines = [f"#### {metric.removesuffix('_mean')} ({INTERNAL})", "",
                 "| steps | s | map kind | D | w | " + " | ".join(shown) + " |",
                 "|---" * (5 + len(shown)) + "|"]
        for (steps, stride, kind, noise, w), row in table[shown].iterrows():
            lines.append(f"| {steps} | {stride} | {kind} | {noise} | {w:g} | "
                         + " | ".join(f"{row[m]:.3f}" for m in shown) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(curve: pd.DataFrame, path: Path) -> None:
    """⌈DSC⌉ of each shown method against steps (pooled internal cohorts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = curve[curve["group"] == INTERNAL]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for (stride, method), rows in pooled.groupby(["stride", "method"]):
        # IgCONDA's maps per stride; the baselines do not depend on it: drawn once.
        if method in ("chosen", "control"):
            label = f"{method} (s = {stride})"
        elif method in ("intensity", "threshold_41") and stride == pooled["stride"].min():
            label = method
        else:
            continue
        rows = rows.sort_values("steps")
        axis.plot(rows["steps"], rows["dsc_max_mean"], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("optimiser steps (batch 32)")
    axis.set_ylabel("mean ⌈DSC⌉, internal test")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="the study config whose design is kept")
    p.add_argument("--data", required=True, type=Path, help="preprocessed data folder")
    p.add_argument("--steps", default="375,750,1500,3000", help="training budgets, optimiser steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strides", default=None,
                   help="DDIM strides to tune and score each budget at (comma-separated; "
                        "default: the config's tune.stride)")
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args(argv)
    budgets = sorted({int(s) for s in args.steps.split(",")})
    if not budgets or budgets[0] < 1:
        raise SystemExit("error: --steps must list positive step counts")
    strides = ([int(s) for s in args.strides.split(",")] if args.strides
               else [int(yaml.safe_load(args.config.read_text())["tune"]["stride"])])
    folders = {n: args.output / f"steps{n}" for n in budgets}
    if not all((f / "checkpoint" / MODEL_FILE).is_file() for f in folders.values()):
        rate = train_milestones(args.config, {}, args.data, {n: f / "checkpoint" for n, f in folders.items()},
                                args.seed)
        print(f"trained {budgets[-1]} steps at {rate:.1f} samples/s", flush=True)
    batch = test_slices(args.data)
    print(f"scoring {len(batch['image'])} unhealthy test slices", flush=True)
    frames = []
    for n, folder in folders.items():
        for stride in strides:
            # One tuning folder per stride (re-used when present).
            config = with_stride(args.config, stride, args.output)
            best = tune(folder / "checkpoint", args.data, config, folder / f"tune_s{stride}")
            summary = score(folder / "checkpoint", best, batch)
            frames.append(summary.assign(steps=n, seed=args.seed, map_kind=best["map_kind"],
                                         D=best["noise_level"], w=best["guidance_scale"],
                                         stride=best["stride"]))
            pooled = summary[summary["group"] == INTERNAL].set_index("method")["dsc_max_mean"]
            print(f"{n} steps, s={best['stride']} ({best['map_kind']}, D={best['noise_level']}, "
                  f"w={best['guidance_scale']:g}): "
                  + "  ".join(f"{m} {pooled[m]:.3f}" for m in SHOWN if m in pooled.index), flush=True)
    curve = pd.concat(frames, ignore_index=True)
    curve.to_csv(args.output / "curve.csv", index=False)
    text = f"seed {args.seed}, config {args.config}\n\n" + markdown(curve)
    (args.output / "curve.md").write_text(text + "\n")
    plot(curve, args.output / "curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
