"""The seeds' trained models re-tuned and re-scored under other inference settings, e.g. a finer
DDIM stride, without retraining: the 3-seed targets of ``bench_seeds`` at those settings.

For each seed folder of a ``bench_seeds`` run (``<runs>/seed<k>/model`` and ``data``), the study's
tuning job runs with ``--config`` (its ``tune`` section: stride, D, w and map-kind grid) on the
tune split, and the unhealthy test slices are scored at the chosen settings through the one
evaluation path (:func:`bench_budget.score`). Only unhealthy slices carry metrics, so the
per-cohort numbers equal what the study's inference job would report at those settings; the
healthy slices (needed only for 3D maps) are skipped, which is what makes this affordable.

    python benchmarks/bench_rescore.py --runs runs/seeds --seeds 0,1,2 \\
        --config configs/demo.yaml --stride 10 --output runs/seeds_s10

Writes ``<output>/seed<k>/tune`` (re-used when present), ``<output>/summary.md`` and
``<output>/summary.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from bench_budget import score, test_slices, tune, with_stride
from bench_seeds import markdown, summarize, targets

from igconda.checkpoint import MODEL_FILE


def rescore_seed(runs: Path, seed: int, config: Path, output: Path) -> pd.DataFrame:
    """One seed's per-cohort table at the settings tuned under ``config``."""
    folder = runs / f"seed{seed}"
    model, data = folder / "model", folder / "data"
    if not (model / MODEL_FILE).is_file():
        raise SystemExit(f"error: {model} holds no trained model (run bench_seeds first)")
    best = tune(model, data, config, output / f"seed{seed}" / "tune")
    summary = score(model, best, test_slices(data))
    return summary.assign(seed=seed, map_kind=best["map_kind"], D=best["noise_level"],
                          w=best["guidance_scale"], stride=best["stride"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, type=Path, help="a bench_seeds output folder")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--config", required=True, type=Path, help="study config whose tune section applies")
    p.add_argument("--stride", type=int, default=None, help="override its tune and infer stride")
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args(argv)
    config = with_stride(args.config, args.stride, args.output) if args.stride else args.config
    runs = pd.concat([rescore_seed(args.runs, int(s), config, args.output)
                      for s in args.seeds.split(",")], ignore_index=True)
    summary = summarize(runs)
    summary.to_csv(args.output / "summary.csv", index=False)
    chosen = runs[runs["method"] == "chosen"].drop_duplicates("seed")[["seed", "map_kind", "D", "w", "stride"]]
    text = "\n".join([f"config {config}; tuned per seed:", chosen.to_string(index=False), "",
                      *targets(runs), "", markdown(summary)])
    (args.output / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
