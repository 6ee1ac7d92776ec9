"""A trained baseline's maps on the TUNE split's unhealthy slices: how the comparison's baseline
settings are chosen without looking at test (benchmarks/RESULTS.md, "Making the baselines fair").

    python benchmarks/bench_baseline_tune.py --method hirescam --checkpoint <study>/baselines/hirescam/best \\
        --data <study>/data [--layers layer2,layer3,layer4]
    python benchmarks/bench_baseline_tune.py --method supervised --checkpoint <...>/best --data <study>/data

Prints mean ⌈DSC⌉ and AUPRC (``igconda.metrics``) over the split's unhealthy slices; for HiResCAM
once per explained stage, with the classifier's mean p(unhealthy) and the share of empty CAMs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from igconda.baselines.scoring import load_method
from igconda.baselines.settings import HIRESCAM_LAYERS, BaselinesConfig
from igconda.data.io import read_split
from igconda.data.schema import UNHEALTHY
from igconda.metrics import auprc, optimal_dice
from igconda.slice_batch import batch_images

#: The trained baselines scored from one checkpoint folder (dpm_cg needs two).
ONE_CHECKPOINT_BASELINES = ("hirescam", "supervised", "fanogan")


def unhealthy_batch(data: str, split: str) -> dict[str, np.ndarray]:
    """The split's unhealthy slices as a numpy batch (the columns the methods read)."""
    table = read_split(data, split, columns=["image", "mask", "label", "height", "width"])
    keep = np.flatnonzero(table.column("label").to_numpy() == UNHEALTHY)
    table = table.take(keep)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", required=True, choices=ONE_CHECKPOINT_BASELINES)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="tune")
    parser.add_argument("--layers", default=",".join(HIRESCAM_LAYERS[1:]),
                        help="HiResCAM stages to explain (comma-separated)")
    args = parser.parse_args(argv)
    batch = unhealthy_batch(args.data, args.split)
    masks = batch_images(batch, "mask") > 0
    hirescam = args.method == "hirescam"
    classifier_note = ""
    if hirescam:  # the classifier's output does not depend on the explained stage
        model = load_method(args.method, args.checkpoint).model
        with torch.no_grad():
            logits = model(torch.as_tensor(batch_images(batch))[:, None])
        classifier_note = f", mean p(unhealthy) {torch.softmax(logits, 1)[:, 1].mean():.3f}"
    for layer in args.layers.split(",") if hirescam else ["layer4"]:
        method = load_method(args.method, args.checkpoint,
                             settings=BaselinesConfig(hirescam_target_layer=layer))
        maps = method.maps(batch)[args.method]
        line = (f"{args.method}{' ' + layer if hirescam else ''}: "
                f"{len(masks)} unhealthy {args.split} slices, "
                f"mean ⌈DSC⌉ {np.nanmean(optimal_dice(maps, masks)[0]):.3f}, "
                f"mean AUPRC {np.nanmean(auprc(maps, masks)):.3f}")
        if hirescam:
            line += f"{classifier_note}, empty maps {(maps.max(axis=(1, 2)) == 0).mean():.0%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
