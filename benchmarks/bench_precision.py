"""fp32 against bf16 autocast for the study's UNet on this machine: forward and training step.

``igconda.precision`` turns bf16 autocast on by default only where the hardware has bf16 matrix
units (GPUs; CPUs with AMX or AVX-512 BF16). This measures, in one process and interleaved (so
machine noise hits both paths alike), what autocast does here, and prints whether the default
rule chose right: bf16 should be faster where the units exist and is expected to be much slower
where oneDNN has to emulate it.

    python benchmarks/bench_precision.py --config configs/demo.yaml --batch-size 64 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from igconda.config import load_config
from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import train_step
from igconda.models import build_unet
from igconda.precision import autocast, autocast_dtype, cpu_has_bf16_units


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    config = load_config(args.config)
    device = torch.device(args.device)
    size = config.preprocess.output_size[0]
    model = build_unet(config.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    schedule = NoiseSchedule.from_config(config.train)
    x = torch.rand(args.batch_size, 1, size, size, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    labels = torch.randint(0, 3, (args.batch_size,), device=device)
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16

    def forward(dtype):
        def run():
            with torch.inference_mode(), autocast(device, dtype):
                model(x, t, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    def step(dtype):
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return lambda: train_step(model, optimizer, schedule, x, labels.clamp(min=1), cond_drop_prob=0.15,
                                  amp_dtype=dtype, scaler=scaler)

    print(f"device {device}, batch {args.batch_size} x {size}x{size}, channels {config.model.channels}; "
          f"CPU bf16 units: {cpu_has_bf16_units()}; default autocast dtype: {autocast_dtype(device)}")
    for name, make in (("forward", forward), ("train step", step)):
        fp32 = _timed(make(None), args.repeats)
        low = _timed(make(half), args.repeats)
        print(f"{name:10s} fp32 {fp32 * 1e3:8.1f} ms   {str(half).split('.')[-1]} {low * 1e3:8.1f} ms   "
              f"speed-up {fp32 / low:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
