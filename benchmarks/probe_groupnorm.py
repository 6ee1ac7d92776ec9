"""Does the timestep (and the class) reach the UNet's output? Per GroupNorm setting, untrained.

MONAI's ``DiffusionModelUNet`` adds the timestep embedding (and, with ``num_class_embeds``, the
class embedding) to each residual block as a per-channel bias right before a GroupNorm. With one
channel per group that norm subtracts the bias exactly. This prints, for the study config's UNet
at several group counts and both conditioning paths, the mean relative change of the predicted
ε between t = 50 and t = 400, and between class 1 and class 2 (whole slice and interior, which
leaves out the zero-padded border through which a constant can still leak).

    python benchmarks/probe_groupnorm.py --config configs/demo.yaml --groups 32,16,8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from igconda.config import load_config
from igconda.models import build_unet


def relative_change(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> float:
    if border:
        a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return float((a - b).abs().mean() / a.abs().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--groups", default="32,16,8")
    args = p.parse_args(argv)
    study = load_config(args.config)
    size = study.preprocess.output_size[0]
    for groups in (int(g) for g in args.groups.split(",")):
        for conditioning in ("cross_attention", "class_embedding"):
            # dataclasses.replace skips StudyConfig's validation, which refuses one-channel groups.
            model_config = dataclasses.replace(study.model, norm_num_groups=groups, conditioning=conditioning)
            torch.manual_seed(0)
            model = build_unet(model_config).eval()
            with torch.no_grad():
                for param in model.parameters():  # MONAI zero-initialises several convs
                    if param.ndim > 1 and not param.any():
                        param.normal_(0.0, 0.05)
                x = torch.randn(4, 1, size, size)
                early, late, other = (model(x, torch.full((4,), t), torch.full((4,), c))
                                      for t, c in ((50, 1), (400, 1), (50, 2)))
            print(f"groups {groups:>3} ({model_config.channels[0] // groups} ch/group) {conditioning:16s} "
                  f"t 50→400: {relative_change(early, late):.1e} (interior {relative_change(early, late, 4):.1e})  "
                  f"class 1→2: {relative_change(early, other):.1e} (interior {relative_change(early, other, 4):.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
