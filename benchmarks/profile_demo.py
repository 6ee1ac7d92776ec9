"""Where the demo's time goes: ``torch.profiler`` over training steps and one DDIM counterfactual batch.

Issue 12 asks for a profile before more optimisation: which operators cost the CPU time of a
training step and of the counterfactual loop. This runs, in one process and in the precision the
config gives this machine (:mod:`igconda.precision`; ``--fp32`` turns autocast off):

- ``--steps`` training steps of the config's model through
  :meth:`igconda.train_loop.TrainingSession.train_epoch` (random weights, random [0, 1] batches
  of ``train.batch_size``: the operators and their costs do not depend on the values), after
  ``--warmup`` steps that let oneDNN pick its kernels;
- one counterfactual batch of ``infer.batch_size`` slices through
  :class:`igconda.inference.CounterfactualPredictor` at the config's (D, s, w): the encoding and
  the guided + unguided decode (3·D/s network evaluations per slice), after one warm-up batch.

and prints, per phase, the operators by self CPU time with their share of the phase's total.
``--output`` writes the same tables as markdown.

    python benchmarks/profile_demo.py --config configs/demo.yaml --steps 20 --output runs/profile.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from igconda.config import load_config
from igconda.data.schema import HEALTHY, UNHEALTHY
from igconda.ddim_grid import network_evaluations
from igconda.inference import CounterfactualPredictor
from igconda.train_loop import TrainingSession


def top_ops(prof: profile, limit: int) -> tuple[list[dict[str, object]], float]:
    """The ``limit`` operators of largest self CPU time: (rows, total self CPU ms of all operators).

    Each row: ``op``, ``calls``, ``self_ms`` (summed over calls), ``share`` (of the total).
    """
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / 1e3 / total} for e in events[:limit]]
    return rows, total


def markdown(title: str, rows: list[dict[str, object]], total_ms: float, wall_s: float) -> str:
    """One phase's operator table as markdown."""
    lines = [f"**{title}**: {wall_s:.2f} s wall, {total_ms / 1e3:.2f} s self CPU over all operators", "",
             "| operator | calls | self CPU ms | % of total |", "|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['calls']} | {r['self_ms']:.0f} | {100 * r['share']:.1f} |" for r in rows]
    return "\n".join(lines)


def random_batches(n: int, batch_size: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches shaped like :func:`igconda.train_loop.decode_slice_batch`'s output."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch_size, 1, size, size, generator=g),
             "label": torch.randint(HEALTHY, UNHEALTHY + 1, (batch_size,), generator=g)} for _ in range(n)]


def profile_training(session: TrainingSession, steps: int, warmup: int, size: int) -> tuple[profile, float]:
    """Profile ``steps`` training steps after ``warmup`` unprofiled ones: (profile, wall seconds)."""
    batch_size = session.config.train.batch_size
    session.train_epoch(random_batches(warmup, batch_size, size, seed=1), epoch=1)
    batches = random_batches(steps, batch_size, size, seed=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        session.train_epoch(batches, epoch=2)
        wall = time.perf_counter() - started
    return prof, wall


def profile_counterfactuals(checkpoint: Path, config, batch_size: int, amp: bool) -> tuple[profile, float]:
    """Profile one counterfactual batch at the config's (D, s, w), after one warm-up batch."""
    infer = config.infer
    predictor = CounterfactualPredictor(checkpoint, noise_level=infer.noise_level, stride=infer.stride,
                                        guidance_scale=infer.guidance_scale, device="cpu", amp=amp)
    size = config.preprocess.output_size[0]
    images = np.random.default_rng(0).random((batch_size, size, size), dtype=np.float32)
    predictor.counterfactuals(images)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        predictor.counterfactuals(images)
        wall = time.perf_counter() - started
    return prof, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=20, help="profiled training steps")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled training steps first")
    p.add_argument("--batch-size", type=int, help="counterfactual batch (default: infer.batch_size)")
    p.add_argument("--fp32", action="store_true", help="autocast off (train.amp and infer.use_amp false)")
    p.add_argument("--top", type=int, default=12, help="operators listed per phase")
    p.add_argument("--output", type=Path, help="write the tables as markdown here")
    args = p.parse_args(argv)
    config = load_config(args.config)
    if args.fp32:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, amp=False))
    size = config.preprocess.output_size[0]
    session = TrainingSession.create(config)
    batch_size = args.batch_size or config.infer.batch_size
    header = (f"{args.config}: {size} × {size} slices, channels {list(config.model.channels)}, "
              f"autocast {session.amp_dtype}, {torch.get_num_threads()} torch threads")
    prof, wall = profile_training(session, args.steps, args.warmup, size)
    rows, total = top_ops(prof, args.top)
    sections = [markdown(f"{args.steps} training steps, batch {config.train.batch_size} "
                         f"({args.steps / wall:.2f} steps/s)", rows, total, wall)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = session.save(Path(tmp) / "model")
        prof, wall = profile_counterfactuals(checkpoint, config, batch_size, amp=not args.fp32)
    infer = config.infer
    rows, total = top_ops(prof, args.top)
    sections.append(markdown(f"one counterfactual batch of {batch_size} slices, D = {infer.noise_level}, "
                             f"s = {infer.stride}, w = {infer.guidance_scale:g} "
                             f"({network_evaluations(infer.noise_level, infer.stride, unguided_decode=True)} network evaluations per slice)",
                             rows, total, wall))
    text = "\n\n".join([header, *sections]) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
