"""Tuning cost: one trial per D decoding every w (shared DDIM encoding) against one trial per
(D, w) pair, on the demo model, the same slices and the same grid.

    python -m benchmarks.bench_tune --config configs/demo.yaml --slices 8 --threads 1

Uses random weights (the cost of a counterfactual does not depend on what the model learned) and
synthetic slices, so it needs no trained checkpoint. Prints one JSON line per layout and the
speed-up; checks that both layouts give the same grid.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from igconda.config import load_config
from igconda.diffusion.schedule import NoiseSchedule
from igconda.models import build_unet
from tuning.driver import evaluate_noise_level


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--noise-levels", type=int, nargs="+", default=None)
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    study = load_config(args.config)
    levels = args.noise_levels or list(study.tune.noise_levels)
    scales = args.guidance_scales or list(study.tune.guidance_scales)
    stride = study.tune.stride
    size = study.preprocess.output_size[0]
    torch.manual_seed(0)
    model = build_unet(study.model).eval()
    with torch.no_grad():  # non-zero output layer, so w changes the decode
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    schedule = NoiseSchedule.from_config(study.train)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.slices, size, size)).astype(np.float32)
    masks = np.zeros_like(images, dtype=np.uint8)
    masks[:, size // 4: size // 2, size // 4: size // 2] = 1

    results = {}
    for shared in (True, False):
        t0 = time.perf_counter()
        rows = []
        for d in levels:
            rows += evaluate_noise_level(model, schedule, images, masks, noise_level=d,
                                         guidance_scales=scales, stride=stride,
                                         batch_size=study.infer.batch_size, share_encoding=shared)
        seconds = time.perf_counter() - t0
        evaluations = sum((1 if shared else len(scales)) * d // stride + len(scales) * 2 * d // stride
                          for d in levels) * args.slices
        results[shared] = (seconds, rows)
        print(json.dumps({"layout": "one trial per D (shared encoding)" if shared else "one trial per (D, w)",
                          "pairs": len(rows), "slices": args.slices, "seconds": round(seconds, 2),
                          "network_evaluations": evaluations,
                          "slice_pairs_per_s": round(len(rows) * args.slices / seconds, 2)}))
    same = all(abs(a["mean_dsc"] - b["mean_dsc"]) < 1e-6
               for a, b in zip(results[True][1], results[False][1], strict=True))
    print(json.dumps({"speedup": round(results[False][0] / results[True][0], 3),
                      "expected_from_evaluations": round(3 * len(scales) / (2 * len(scales) + 1), 3),
                      "same_grid": same}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
