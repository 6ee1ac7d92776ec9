"""Counterfactual throughput: strided DDIM (igconda.diffusion.ddim) against a plain MONAI loop.

For the demo model (configs/demo.yaml: channels (32, 32, 32), attention 011, 32 × 32) and the
paper model (configs/paper.yaml: (64, 64, 64), 64 × 64), both untrained (speed does not depend on
the weights), with and without ``use_flash_attention``, it measures network evaluations/s and
counterfactual slices/s at D = 400 for strides 1, 5 and 20, and the same counterfactual written
as the reference does it with MONAI's ``DDIMScheduler`` (``reversed_step`` / ``step``, s = 1,
guided pair batched) as a ratio.

A DDIM step costs the same at every t and stride, so each (model, flash) pair is timed over
``--steps`` steps each way and the slices/s at each stride follow from D / s (see :func:`run`).
Throughput is given per wall-clock second and per CPU second of this process: on a shared
machine the second is the one that does not depend on the other jobs.

Run (about 1–2 minutes on a 2-core CPU):
    python benchmarks/bench_ddim.py
    python benchmarks/bench_ddim.py --models demo --batch 8 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch
from monai.networks.schedulers import DDIMScheduler

from igconda.config import load_config
from igconda.ddim_grid import network_evaluations
from igconda.diffusion.ddim import ddim_decode, ddim_encode
from igconda.diffusion.schedule import NoiseSchedule
from igconda.models import build_unet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": REPO / "configs" / "demo.yaml", "paper": REPO / "configs" / "paper.yaml"}


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clocks()
    return wall - start[0], cpu - start[1]


def _time_ours(model, x0, schedule, steps: int, w: float) -> tuple[float, float]:
    """(wall, CPU) seconds for ``steps`` DDIM steps each way at s = 1."""
    start = _clocks()
    x_t = ddim_encode(model, x0, schedule, noise_level=steps, stride=1)
    ddim_decode(model, x_t, schedule, noise_level=steps, stride=1, guidance_scale=w)
    return _since(start)


@torch.inference_mode()
def _time_monai(model, x0, scheduler: DDIMScheduler, steps: int, w: float) -> tuple[float, float]:
    """The reference's loop at s = 1: reversed_step up, guided (batched pair) step down."""
    batch = x0.shape[0]
    start = _clocks()
    x = x0
    uncond = torch.zeros(batch, dtype=torch.long)
    for t in range(steps):
        eps = model(x, torch.full((batch,), t), uncond)
        x, _ = scheduler.reversed_step(eps, t, x)
    pair = torch.cat([uncond, torch.ones(batch, dtype=torch.long)])
    for t in range(steps, 0, -1):
        eps_u, eps_c = model(torch.cat([x, x]), torch.full((2 * batch,), t), pair).chunk(2)
        x, _ = scheduler.step(eps_u + w * (eps_c - eps_u), t, x)
    return _since(start)


def run(args: argparse.Namespace) -> list[dict]:
    """One timing per (model, flash); the rows per stride follow from it.

    A DDIM step costs the same at every t and every stride (one batch-B pass up, one batch-2B pass
    down), so the time of ``--steps`` steps each way gives the per-step cost, and a counterfactual
    at (D, s) costs D / s of them.
    """
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        cfg = load_config(CONFIGS[name])
        size = cfg.preprocess.output_size[0]
        schedule = NoiseSchedule.from_config(cfg.train)
        scheduler = DDIMScheduler(
            num_train_timesteps=cfg.train.num_train_timesteps, schedule="linear_beta",
            beta_start=cfg.train.beta_start, beta_end=cfg.train.beta_end, clip_sample=False,
        )
        scheduler.set_timesteps(cfg.train.num_train_timesteps)
        batch = args.batch if args.batch else (4 if size <= 32 else 2)
        x0 = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
        for flash in (False, True):
            torch.manual_seed(0)
            model = build_unet(dataclasses.replace(cfg.model, use_flash_attention=flash)).eval()
            # Warm up both batch sizes (B up, 2B down) so neither loop pays first-call costs.
            _time_ours(model, x0, schedule, 1, 3.0)
            ours, monai = [], []
            for _ in range(args.repeats):  # interleaved, best of each: load spikes hit both alike
                ours.append(_time_ours(model, x0, schedule, args.steps, 3.0))
                monai.append(_time_monai(model, x0, scheduler, args.steps, 3.0))
            ours_wall, ours_cpu = min(w for w, _ in ours), min(c for _, c in ours)
            monai_wall, monai_cpu = min(w for w, _ in monai), min(c for _, c in monai)
            evals = network_evaluations(args.steps, 1) * batch
            for stride in args.strides:
                per_slice = network_evaluations(args.noise_level, stride)
                row = dict(
                    model=name, size=size, flash=flash, batch=batch, D=args.noise_level, s=stride,
                    evals_per_s=evals / ours_wall, evals_per_cpu_s=evals / ours_cpu,
                    slices_per_s=evals / ours_wall / per_slice,
                    slices_per_cpu_s=evals / ours_cpu / per_slice,
                    # Same evaluations for both loops: the ratio of times is the throughput ratio.
                    monai_ratio_wall=monai_wall / ours_wall, monai_ratio_cpu=monai_cpu / ours_cpu,
                )
                rows.append(row)
                print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    return (f"| {row['model']} {row['size']}px | {'on' if row['flash'] else 'off'} | {row['batch']} "
            f"| {row['D']} | {row['s']} | {row['evals_per_s']:.1f} / {row['evals_per_cpu_s']:.1f} "
            f"| {row['slices_per_s']:.3g} / {row['slices_per_cpu_s']:.3g} "
            f"| {row['monai_ratio_wall']:.2f} / {row['monai_ratio_cpu']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "paper"], choices=sorted(CONFIGS))
    parser.add_argument("--strides", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--noise-level", type=int, default=400)
    parser.add_argument("--batch", type=int, default=0, help="slices per batch (0: 4 demo, 2 paper)")
    parser.add_argument("--steps", type=int, default=5,
                        help="DDIM steps timed each way (the per-step cost does not depend on t or s)")
    parser.add_argument("--repeats", type=int, default=1, help="timings per loop (best kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: more only spin on a shared 2-core machine)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {torch.get_num_interop_threads()} interop")
    print(f"load average {os.getloadavg()[0]:.1f}; values are wall-clock / CPU-time based")
    print("| model | flash | batch | D | s | network evals/s | slices/s | ours / MONAI loop |")
    print("|---|---|---|---|---|---|---|---|")
    run(args)


if __name__ == "__main__":
    main()
