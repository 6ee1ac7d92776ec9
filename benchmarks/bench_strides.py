"""Counterfactual speed and quality against the DDIM stride s, at a fixed (D, w), one checkpoint.

For each s in ``--strides`` (those that divide D), the same unhealthy slices are run through
:class:`igconda.inference.CounterfactualPredictor` (3·D/s network evaluations per slice) and the
script reports slices/s and mean ⌈DSC⌉ (also AUPRC and the hot-only map's ⌈DSC⌉). The default
stride of a study is the largest whose ⌈DSC⌉ stays within 1 point (0.01) of s = 1; the script
prints that choice when s = 1 is among the strides.

With ``--control`` each stride is also run at w = 0 (no guidance: encode and decode with the
unconditional model), whose map is only the DDIM round trip's reconstruction error. At s = 1 the
round trip is nearly exact and this control scores ≈ 0; at large strides the coarse ODE solver
fails to reproduce small hot structures, so the control scores well above 0 and part of the
guided map's ⌈DSC⌉ is this error, not the counterfactual. ``guidance_gain`` = ⌈DSC⌉(w) −
⌈DSC⌉(w = 0) is what the guidance itself adds.

Run (the lead runs it on the demo checkpoint)::

    python benchmarks/bench_strides.py --checkpoint runs/demo/train/best --data runs/demo/data \\
        --noise-level 400 --guidance-scale 3 --split tune --max-slices 64 \\
        --output benchmarks/strides.csv

Everything runs in one process, plain PyTorch (no Ray), on ``--device`` (default: auto).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from igconda.checkpoint import load_checkpoint_config
from igconda.data.io import split_path
from igconda.data.schema import UNHEALTHY
from igconda.ddim_grid import check_grid, network_evaluations
from igconda.inference import CounterfactualPredictor

DEFAULT_STRIDES = (1, 2, 5, 10, 20, 40)
COLUMNS = ("patient_id", "slice_index", "label", "height", "width", "image", "mask")


def load_unhealthy(data: Path, split: str, max_slices: int) -> dict[str, np.ndarray]:
    """The split's unhealthy slices as one numpy batch (deterministic order, first N kept)."""
    folder = Path(split_path(data, split))
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no '{split}' split in {data}")
    table = pq.read_table(folder, columns=list(COLUMNS))
    frame = table.to_pandas()
    frame = frame[frame["label"] == UNHEALTHY].sort_values(["patient_id", "slice_index"])
    if max_slices:
        frame = frame.head(max_slices)
    if frame.empty:
        raise SystemExit(f"error: no unhealthy slice in {folder}")
    return {k: frame[k].to_numpy() for k in frame.columns}


def run(checkpoint: Path, batch: dict[str, np.ndarray], *, noise_level: int, guidance_scale: float,
        strides: list[int], batch_size: int, device: str | None, control: bool = False) -> pd.DataFrame:
    """One row per stride: evaluations per slice, slices/s, mean ⌈DSC⌉ / AUPRC / hot ⌈DSC⌉, and
    with ``control`` the w = 0 ⌈DSC⌉ and the guidance gain over it."""
    rows = []
    n = len(batch["image"])
    for stride in strides:
        try:
            check_grid(noise_level, stride)
        except ValueError as err:
            print(f"  s={stride}: skipped ({err})", file=sys.stderr)
            continue
        predictor = CounterfactualPredictor(checkpoint, noise_level=noise_level,
                                            guidance_scale=guidance_scale, stride=stride, device=device)
        outputs = []
        started = time.perf_counter()
        for start in range(0, n, batch_size):
            outputs.append(predictor({k: v[start:start + batch_size] for k, v in batch.items()}))
        seconds = time.perf_counter() - started
        dsc = np.concatenate([o["dsc_max"] for o in outputs])
        rows.append({
            "stride": stride, "evaluations_per_slice": network_evaluations(noise_level, stride, unguided_decode=True),
            "slices": n, "seconds": seconds, "slices_per_s": n / seconds,
            "dsc_max_mean": float(np.nanmean(dsc)), "dsc_max_std": float(np.nanstd(dsc)),
            "auprc_mean": float(np.nanmean(np.concatenate([o["auprc"] for o in outputs]))),
            "dsc_max_hot_mean": float(np.nanmean(np.concatenate([o["dsc_max_hot"] for o in outputs]))),
        })
        if control:
            unguided = CounterfactualPredictor(checkpoint, noise_level=noise_level, guidance_scale=0.0,
                                               stride=stride, device=device)
            dsc0 = np.concatenate([unguided({k: v[i:i + batch_size] for k, v in batch.items()})["dsc_max"]
                                   for i in range(0, n, batch_size)])
            rows[-1]["dsc_max_w0_mean"] = float(np.nanmean(dsc0))
            rows[-1]["guidance_gain"] = rows[-1]["dsc_max_mean"] - rows[-1]["dsc_max_w0_mean"]
        r = rows[-1]
        print(f"  s={stride:>3}: {r['evaluations_per_slice']:>5} evals/slice, "
              f"{r['slices_per_s']:8.2f} slices/s, ⌈DSC⌉ {r['dsc_max_mean']:.3f}", file=sys.stderr)
    return pd.DataFrame(rows)


def default_stride(results: pd.DataFrame, tolerance: float = 0.01) -> int | None:
    """The largest stride whose mean ⌈DSC⌉ is within ``tolerance`` of s = 1 (None without s = 1)."""
    reference = results.loc[results["stride"] == 1, "dsc_max_mean"]
    if reference.empty:
        return None
    ok = results[results["dsc_max_mean"] >= float(reference.iloc[0]) - tolerance]
    return int(ok["stride"].max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="preprocessed data folder")
    p.add_argument("--split", default="tune")
    p.add_argument("--noise-level", type=int, help="D (default: the checkpoint's)")
    p.add_argument("--guidance-scale", type=float, help="w (default: the checkpoint's)")
    p.add_argument("--strides", default=",".join(map(str, DEFAULT_STRIDES)),
                   help="comma-separated strides")
    p.add_argument("--max-slices", type=int, default=64, help="0 = every unhealthy slice")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--control", action="store_true",
                   help="also run each stride at w = 0 (the round trip's reconstruction error alone)")
    p.add_argument("--output", type=Path, help="write the table as CSV here")
    args = p.parse_args(argv)

    config = load_checkpoint_config(args.checkpoint)
    noise_level = args.noise_level or config.infer.noise_level
    guidance = args.guidance_scale if args.guidance_scale is not None else config.infer.guidance_scale
    strides = [int(s) for s in args.strides.split(",") if s.strip()]
    batch = load_unhealthy(args.data, args.split, args.max_slices)
    print(f"bench_strides: {len(batch['image'])} unhealthy '{args.split}' slices, D={noise_level}, "
          f"w={guidance:g}", file=sys.stderr)
    results = run(args.checkpoint, batch, noise_level=noise_level, guidance_scale=guidance,
                  strides=strides, batch_size=args.batch_size, device=args.device,
                  control=args.control)
    print(results.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else results.to_string(index=False))
    chosen = default_stride(results)
    if chosen is not None:
        print(f"largest stride within 0.01 ⌈DSC⌉ of s = 1: s = {chosen}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        results.to_csv(args.output, index=False)
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
