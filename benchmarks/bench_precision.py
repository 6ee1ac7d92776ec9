"""fp32 against bf16 autocast for the study's UNet on this machine: forward and training step.

``igconda.precision`` turns bf16 autocast on by default only where the hardware has bf16 matrix
units (GPUs; CPUs with AMX or AVX-512 BF16), and ``igconda.models.attention_precision`` keeps the
attention blocks in float32 while a CPU trains (their bf16 backward kernel is slow there). This
measures, in one process and interleaved round by round (so machine noise hits every path alike):

- forward (inference mode): fp32 against bf16 autocast;
- training step: fp32, bf16 as igconda runs it (float32 attention on a CPU), and bf16 with MONAI's
  own attention blocks (bf16 attention too: what the swap replaced).

    python benchmarks/bench_precision.py --config configs/demo.yaml --batch-size 32 --rounds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from igconda.config import load_config
from igconda.diffusion.schedule import NoiseSchedule
from igconda.diffusion.training import train_step
from igconda.models import build_unet
from igconda.models.attention_precision import (
    restore_monai_attention,
    use_float32_attention_in_cpu_training,
)
from igconda.precision import autocast, autocast_dtype, cpu_has_bf16_units


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds; each path's time is the "
                   "median over rounds of the best of --repeats calls")
    p.add_argument("--repeats", type=int, default=3)
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
    low = str(half).split(".")[-1]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward(dtype):
        def run():
            model.eval()
            with torch.inference_mode(), autocast(device, dtype):
                model(x, t, labels)
            sync()
        return run

    def step(dtype, monai_attention=False):
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

        def run():
            model.train()
            if monai_attention:
                restore_monai_attention(model)
            try:
                train_step(model, optimizer, schedule, x, labels.clamp(min=1), cond_drop_prob=0.15,
                           amp_dtype=dtype, scaler=scaler)
                sync()
            finally:
                use_float32_attention_in_cpu_training(model)
        return run

    paths = {
        "forward fp32": forward(None),
        f"forward {low}": forward(half),
        "train step fp32": step(None),
        f"train step {low} (igconda)": step(half),
        f"train step {low}, MONAI attention": step(half, monai_attention=True),
    }
    print(f"device {device}, batch {args.batch_size} x {size}x{size}, channels {config.model.channels}; "
          f"CPU bf16 units: {cpu_has_bf16_units()}; default autocast dtype: {autocast_dtype(device)}; "
          f"{torch.get_num_threads()} torch threads")
    for fn in paths.values():  # warm-up: oneDNN picks and caches its kernels on the first calls
        fn()
        fn()
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            times[name].append(min(_once(fn) for _ in range(args.repeats)))
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, median in medians.items():
        fp32 = medians["forward fp32" if name.startswith("forward") else "train step fp32"]
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        print(f"{name:36s} {median * 1e3:8.1f} ms (rounds {spread} ms)   fp32 / this {fp32 / median:.2f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
