"""FLOPs per network evaluation, measured, and the projected GPU time and cost of the paper's
workloads (docs/scaling.md). Every projection is an ESTIMATE built from the stated assumptions.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (igconda.accel.
flops_per_evaluation: matmuls, convolutions and attention, 2 per multiply-add) on the CPU; the
count does not depend on the device or the weights.

    python benchmarks/scale_plan.py --configs paper,demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from igconda.accel import flops_per_evaluation  # noqa: E402
from igconda.config import load_config  # noqa: E402
from igconda.ddim_grid import network_evaluations  # noqa: E402
from igconda.models import build_unet  # noqa: E402

#: Public dense peak rates (no sparsity) of the precision each GPU trains and infers in, and an
#: ASSUMED on-demand cloud price per GPU-hour (2024-25 list prices vary about 2x by provider).
GPUS = {
    "V100 SXM2 (fp16 tensor cores)": (125e12, 3.06),
    "H100 SXM (bf16)": (989e12, 4.0),
    "H200 SXM (bf16)": (989e12, 5.0),
}
FRACTIONS = (0.5, 0.3, 0.1)  # achieved / peak: well-fed large models (50-30 %), a narrow UNet (10 %)

#: The paper's cohorts (configs/paper.yaml): 2210 train / 149 valid / 293 test cases, 96 slices
#: each; tuning on 10 patients (every slice an upper bound for its unhealthy ones); AutoPET's
#: 1611 scans at 96 slices as a whole-cohort inference run.
SLICES_PER_SCAN = 96
TRAIN_SLICES = 2210 * SLICES_PER_SCAN
TEST_SLICES = 293 * SLICES_PER_SCAN
TUNE_SLICES = 10 * SLICES_PER_SCAN
AUTOPET_SLICES = 1611 * SLICES_PER_SCAN
EPOCHS = 1000
GRID_D, GRID_W = (100, 200, 300, 400, 500, 600), 6


def workloads(forward: float, train: float) -> list[tuple[str, float]]:
    """(name, total FLOPs) of the paper's jobs for one model."""
    tune_shared = sum(d * (2 + 2 * GRID_W) for d in GRID_D)  # encode + unguided once per D, guided per w
    reference = network_evaluations(400, 1)  # the reference's procedure: D = 400, s = 1
    igconda = network_evaluations(400, 10, unguided_decode=True)  # the pair at s = 10
    return [
        (f"training, {EPOCHS} epochs x {TRAIN_SLICES:,} slices", EPOCHS * TRAIN_SLICES * train),
        (f"tuning grid 6 D x 6 w, s = 1, {TUNE_SLICES} slices (shared encodings, {tune_shared:,} evals/slice)",
         TUNE_SLICES * tune_shared * forward),
        (f"test set {TEST_SLICES:,} slices, reference 3·D = {reference} evals/slice", TEST_SLICES * reference * forward),
        (f"test set, igconda pair 4·D/s at s = 10 ({igconda} evals/slice)", TEST_SLICES * igconda * forward),
        (f"AutoPET {AUTOPET_SLICES:,} slices, 4·D/s at s = 10", AUTOPET_SLICES * igconda * forward),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="paper,demo")
    p.add_argument("--gpus", default="1,8", help="GPU counts to project")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.gpus.split(",")]
    measured = {}
    print("| model | H x W | channels | forward GFLOP / evaluation | training GFLOP / sample (fwd+bwd) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        config = load_config(REPO / "configs" / f"{name}.yaml")
        size = config.preprocess.output_size[0]
        model = build_unet(config.model)
        fwd = flops_per_evaluation(model.eval(), size, batch=2)
        train = flops_per_evaluation(model.train(), size, batch=2, backward=True)
        measured[name] = (fwd, train)
        print(f"| {name} | {size} x {size} | {tuple(config.model.channels)} | {fwd / 1e9:.3f} | "
              f"{train / 1e9:.3f} | {train / fwd:.2f} |")
    fwd, train = measured[args.configs.split(",")[0]]
    print(f"\nESTIMATES for the {args.configs.split(',')[0]} model: GPU-hours at "
          f"{' / '.join(f'{f:.0%}' for f in FRACTIONS)} of peak, wall hours on "
          f"{' / '.join(map(str, counts))} GPUs at 10 %, cost at each fraction")
    for job, flops in workloads(fwd, train):
        print(f"\n{job}: {flops:.3g} FLOPs")
        fractions = " / ".join(f"{f:.0%}" for f in FRACTIONS)
        print(f"| GPU | GPU-h at {fractions} | wall h on " + " / ".join(map(str, counts))
              + f" GPUs (10 %) | cost at {fractions} |")
        print("|---|---|---|---|")
        for gpu, (peak, price) in GPUS.items():
            hours = [flops / (peak * f) / 3600 for f in FRACTIONS]
            wall = [hours[-1] / n for n in counts]
            print(f"| {gpu} | " + " / ".join(f"{h:.3g}" for h in hours) + " | "
                  + " / ".join(f"{h:.3g}" for h in wall) + " | "
                  + " / ".join(f"${h * price:,.2f}" for h in hours) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
