"""Throughput of igconda.metrics.score_batch against a naive per-slice loop (sklearn, MONAI, cc3d).

The naive loop is what one would write slice by slice with the reference libraries: Dice at each
τ with numpy, ``sklearn.metrics.average_precision_score``, MONAI's
``compute_hausdorff_distance(percentile=95)`` and cc3d components with an IoU matrix. Both paths
score the same synthetic slices (blurred noisy maps over 1–3 rectangular lesions) and must agree;
the script checks that before it reports slices/s.

Run:
    python benchmarks/bench_metrics.py                 # 64×64 and 32×32, a few seconds each
    python benchmarks/bench_metrics.py --smoke-test    # tiny, for CI
"""

from __future__ import annotations

import argparse
import time
import warnings

import cc3d
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage
from sklearn.metrics import average_precision_score

from igconda.metrics import THRESHOLDS, score_batch


def make_batch(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(0, size, 2)
            r = rng.integers(1, max(2, size // 8))
            masks[i, max(0, x - r): x + r, max(0, y - r): y + r] = 1
    maps = ndimage.gaussian_filter(0.4 * masks + 0.6 * rng.random(masks.shape), (0, 1, 1))
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    return maps.astype(np.float32), masks


def naive_scores(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {k: [] for k in ("dsc_max", "tau_star", "hd95", "auprc", "n_lesions", "n_detected")}
    for m, g in zip(maps, masks, strict=True):
        g = g.astype(bool)
        dice = [2 * np.sum((m >= t) & g) / (np.sum(m >= t) + g.sum()) for t in THRESHOLDS]
        k = int(np.argmax(dice))
        pred = m >= THRESHOLDS[k]
        out["dsc_max"].append(dice[k])
        out["tau_star"].append(THRESHOLDS[k])
        out["auprc"].append(average_precision_score(g.ravel(), m.ravel()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(
                torch.as_tensor(pred[None, None], dtype=torch.float32),
                torch.as_tensor(g[None, None], dtype=torch.float32),
                include_background=True, percentile=95, directed=False,
            )
        out["hd95"].append(float(hd))
        lp = cc3d.connected_components(pred.astype(np.uint8), connectivity=4)
        lg = cc3d.connected_components(g.astype(np.uint8), connectivity=4)
        matched = set()
        for a in range(1, int(lp.max()) + 1):
            pa = lp == a
            ious = [np.sum(pa & (lg == b)) / np.sum(pa | (lg == b)) for b in range(1, int(lg.max()) + 1)]
            if ious and max(ious) >= 0.5:
                matched.add(int(np.argmax(ious)))
        out["n_lesions"].append(int(lg.max()))
        out["n_detected"].append(len(matched))
    return {k: np.asarray(v) for k, v in out.items()}


def timed(fn, *args, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--batch", type=int, default=256, help="slices per score_batch call")
    parser.add_argument("--naive-slices", type=int, default=64, help="slices timed in the naive loop")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args()
    if args.smoke_test:
        args.sizes, args.batch, args.naive_slices, args.repeats = [32], 16, 8, 1
    torch.set_num_threads(1)
    print("| H×W | batch | score_batch slices/s | naive loop slices/s | speed-up |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        maps, masks = make_batch(args.batch, size)
        fast = score_batch(maps, masks)
        ref = naive_scores(maps[: args.naive_slices], masks[: args.naive_slices])
        for key, values in ref.items():
            np.testing.assert_allclose(fast[key][: args.naive_slices], values, rtol=1e-5, atol=1e-4,
                                       err_msg=f"{key} differs from the naive loop at {size}px")
        t_fast = timed(score_batch, maps, masks, repeats=args.repeats) / args.batch
        t_naive = timed(naive_scores, maps[: args.naive_slices], masks[: args.naive_slices],
                        repeats=args.repeats) / args.naive_slices
        print(f"| {size}×{size} | {args.batch} | {1 / t_fast:,.0f} | {1 / t_naive:,.0f} | "
              f"{t_naive / t_fast:.1f}× |")


if __name__ == "__main__":
    main()
