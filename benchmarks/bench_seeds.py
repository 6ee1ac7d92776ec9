"""The study with several training seeds: each cohort's mean and spread, and the issue's targets.

Retraining alone moves cohort means by several points, so one run's margin is not a result. This
runs the whole pipeline (``ray_jobs.pipeline``: cohorts, preprocessing, training, tuning,
inference, report) once per seed, changing only ``train.seed``, each into its own folder
(finished stages are resumed, so an interrupted benchmark continues), then reads every run's
``infer/tables/methods.csv`` and prints, per cohort and method, the mean ± std over seeds of
⌈DSC⌉, Dice at the calibrated τ and AUPRC, for IgCONDA's chosen map, the paper's |x − x̂| map, the
w = 0 control of the chosen map's sign (``control``: |x − x̂_∅| for abs, max(x − x̂_∅, 0) for hot),
raw intensity and 41 % SUVmax thresholding, and checks three targets:

- guidance gain: the chosen map's ⌈DSC⌉ minus its w = 0 control's, pooled over internal cohorts;
- IgCONDA (chosen map) minus 41 % thresholding in ⌈DSC⌉, on every cohort in every seed;
- IgCONDA against raw intensity in ⌈DSC⌉ per cohort (seed means) and in pooled AUPRC.

    python benchmarks/bench_seeds.py --config configs/demo.yaml --seeds 0,1,2 --output runs/seeds

Writes ``<output>/summary.md`` and ``<output>/summary.csv``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from igconda.data.io import InferOutput
from igconda.map_kinds import matching_control
from igconda.tuned_model import read_tuning

METHODS = ("chosen", "control", "igconda_abs", "igconda_w0", "intensity", "threshold_41")
METRICS = ("dsc_max_mean", "dice_tau_mean", "auprc_mean")
INTERNAL = "internal (all)"


def run_seed(config: Path, seed: int, output: Path, extra: list[str]) -> float:
    """Run (or resume) the pipeline for one seed; return its wall time in seconds."""
    output.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(config.read_text()) or {}
    data.setdefault("train", {})["seed"] = seed
    seed_config = output / "seed_config.yaml"  # the study YAML this seed runs (not a checkpoint's)
    seed_config.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", "--config", str(seed_config),
                    "--output", str(output), *extra], check=True)
    return time.perf_counter() - started


def label_chosen(table: pd.DataFrame, map_kind: str) -> pd.DataFrame:
    """``table`` (a per-cohort summary with a ``method`` column) plus copies of the tuned map
    kind's rows labelled ``chosen`` and of its w = 0 control's
    (:func:`igconda.map_kinds.matching_control`) labelled ``control``."""
    chosen = table[table["method"] == f"igconda_{map_kind}"].assign(method="chosen")
    control = table[table["method"] == f"igconda_{matching_control(map_kind)}"].assign(method="control")
    return pd.concat([table, chosen, control], ignore_index=True)


def load_run(folder: Path, seed: int) -> pd.DataFrame:
    """One seed's per-cohort table (:func:`label_chosen`), with the settings its model folder
    carries (``model/tuning.json``: what the study's inference used)."""
    table = pd.read_csv(InferOutput(folder / "infer").methods_csv)
    best = read_tuning(folder / "model")
    if best is None:
        raise SystemExit(f"error: {folder / 'model'} carries no tuning.json")
    return label_chosen(table, best["map_kind"]).assign(
        seed=seed, map_kind=best["map_kind"], D=best.get("noise_level"), w=best.get("guidance_scale"))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each (method, cohort) metric."""
    kept = runs[runs["method"].isin(METHODS)]
    grouped = kept.groupby(["group", "method"])[list(METRICS)]
    stats = grouped.mean().add_suffix("_seeds_mean").join(grouped.std(ddof=0).add_suffix("_seeds_std"))
    return stats.reset_index()


def markdown(summary: pd.DataFrame) -> str:
    """One markdown table per metric: a row per cohort, a ``mean ± std`` column per method."""
    parts = []
    for metric in METRICS:
        lines = [f"#### {metric.removesuffix('_mean')} (mean ± std over seeds)", "",
                 "| cohort | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
        for group, rows in summary.groupby("group", sort=True):
            by_method = rows.set_index("method")
            cells = [f"{by_method.at[m, metric + '_seeds_mean']:.3f} ± {by_method.at[m, metric + '_seeds_std']:.3f}"
                     if m in by_method.index else "–" for m in METHODS]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def targets(runs: pd.DataFrame) -> list[str]:
    """The three targets, each as a line that says what was measured and whether it holds."""
    pivot = runs.pivot_table(index=["seed", "group"], columns="method", values="dsc_max_mean")
    auprc = runs.pivot_table(index=["seed", "group"], columns="method", values="auprc_mean")
    lines = []
    internal = pivot.xs(INTERNAL, level="group")
    gain = (internal["chosen"] - internal["control"]) * 100
    lines.append(f"guidance gain (chosen − its w = 0 control, internal pooled, ⌈DSC⌉ points) per seed: "
                 f"{', '.join(f'{g:+.1f}' for g in gain)} → target ≥ 10: "
                 f"{'met' if (gain >= 10).all() else 'NOT met'}")
    cohorts = pivot[~pivot.index.get_level_values("group").str.contains(r"\(all\)")]
    gap = (cohorts["chosen"] - cohorts["threshold_41"]) * 100
    lines.append(f"chosen − 41 % thresholding (⌈DSC⌉ points): min {gap.min():+.1f} over "
                 f"{len(gap)} cohort×seed pairs, {int((gap >= 15).sum())} of them ≥ 15 → target: "
                 f"{'met' if (gap >= 15).all() else 'NOT met'}")
    means = cohorts.groupby(level="group").mean()
    beats = int((means["chosen"] > means["intensity"]).sum())
    pooled = auprc.xs(INTERNAL, level="group")
    auprc_ok = bool(pooled["chosen"].mean() > pooled["intensity"].mean())
    lines.append(f"chosen beats raw intensity in ⌈DSC⌉ on {beats} of {len(means)} cohorts (seed means); "
                 f"pooled internal AUPRC {pooled['chosen'].mean():.3f} vs {pooled['intensity'].mean():.3f} "
                 f"→ target (≥ 5 cohorts and AUPRC): {'met' if beats >= 5 and auprc_ok else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--manifest", help="real cohorts instead of the phantoms")
    p.add_argument("--aggregate-only", action="store_true", help="only read finished runs")
    args = p.parse_args(argv)
    extra = ["--manifest", args.manifest] if args.manifest else []
    frames, times = [], {}
    for seed in (int(s) for s in args.seeds.split(",")):
        folder = args.output / f"seed{seed}"
        if not args.aggregate_only:
            times[seed] = run_seed(args.config, seed, folder, extra)
            print(f"seed {seed}: {times[seed] / 60:.1f} min", flush=True)
        if InferOutput(folder / "infer").methods_csv.is_file():
            frames.append(load_run(folder, seed))
    if not frames:
        raise SystemExit(f"error: no finished run under {args.output}")
    runs = pd.concat(frames, ignore_index=True)
    summary = summarize(runs)
    args.output.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.output / "summary.csv", index=False)
    chosen = runs[runs["method"] == "chosen"].drop_duplicates("seed")[["seed", "map_kind", "D", "w"]]
    lines = [f"seeds: {sorted(runs['seed'].unique().tolist())}; tuned per seed:",
             chosen.to_string(index=False), "", *targets(runs), "", markdown(summary)]
    text = "\n".join(lines)
    (args.output / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
