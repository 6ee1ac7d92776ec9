"""Throughput of the network's paths on one device: precision × (eager, compile, CUDA graphs).

Run by ``benchmarks/gpu_check.sh`` on a GPU lent for a few minutes; ``--dry-run`` runs the same
steps on the CPU with the tiny test model in seconds (a test checks its files). Writes to
``--out``:

- ``env.json``: torch, CUDA, device name, bf16 support, threads;
- ``flops.json``: FLOPs per network evaluation (forward) and per training sample (forward +
  backward), from ``torch.utils.flop_counter.FlopCounterMode`` (igconda.accel);
- ``matmul.json``: the device's measured dense matmul rate (fp32 and bf16/fp16), the ceiling;
- ``inference.csv``: per (model, precision, mode): the first call's seconds (compile / capture
  included), evaluations/s, slices/s at the config's D and s with igconda's 4·D/s evaluations,
  achieved TFLOP/s;
- ``training.csv``: per (model, precision, mode eager / compile): samples/s and achieved TFLOP/s;
- ``summary.md``: both tables, for benchmarks/RESULTS.md.

A variant that fails is recorded with its error and the rest go on; once ``--budget-s`` has
passed the remaining variants are recorded as skipped, so the script always finishes in time.

    python benchmarks/bench_gpu.py --out runs/gpu_check            # on a GPU: paper + demo models
    python benchmarks/bench_gpu.py --out /tmp/dry --dry-run        # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from igconda.accel import accelerate_for_inference, compile_in_place, flops_per_evaluation  # noqa: E402
from igconda.config import load_config  # noqa: E402
from igconda.ddim_grid import network_evaluations  # noqa: E402
from igconda.diffusion.counterfactual import counterfactual_pair  # noqa: E402
from igconda.diffusion.schedule import NoiseSchedule  # noqa: E402
from igconda.diffusion.training import train_step  # noqa: E402
from igconda.models import build_unet  # noqa: E402

#: (precision, mode) pairs timed for inference; "graphs" applies on CUDA only (eager elsewhere).
#: In order of importance: the time budget skips from the end.
INFER_VARIANTS = (("fp32", "eager"), ("fp32", "graphs"), ("low", "eager"), ("low", "graphs"),
                  ("low", "compile"), ("low", "compile+graphs"))
TRAIN_VARIANTS = (("fp32", "eager"), ("low", "eager"), ("low", "compile"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _low_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured dense matmul TFLOP/s of an n × n product (2 n³ FLOPs), best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def _model(config, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(config.model).to(device)


def time_inference(config, device, precision: str, mode: str, batch: int, steps: int,
                   repeats: int, flops: float, backend: str) -> dict:
    """Evaluations/s of the DDIM counterfactual pair (encode B, decode 3B) at stride 1."""
    model = _model(config, device).eval()
    low = precision == "low"
    network = accelerate_for_inference(model, device, compile="compile" in mode,
                                       cuda_graphs="graphs" in mode, backend=backend)
    schedule = NoiseSchedule.from_config(config.train)
    size = config.preprocess.output_size[0]
    x = torch.rand(batch, 1, size, size, device=device)
    # amp=True autocasts only where igconda.precision allows (CUDA; CPUs with bf16 units):
    # force the low-precision dtype here instead, so the CPU dry run exercises the same path.
    ctx = torch.autocast(device.type, dtype=_low_dtype(device)) if low else torch.autocast(device.type, enabled=False)

    def run() -> None:
        with ctx:
            counterfactual_pair(network, x, schedule, noise_level=steps, stride=1, guidance_scale=3.0)
        _sync(device)

    start = time.perf_counter()
    run()  # compile, capture, autotune
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    seconds = (time.perf_counter() - start) / repeats
    evals = 4 * batch * steps  # D/s encode at B + D/s decode-pair passes at 3B
    per_slice = network_evaluations(config.infer.noise_level, config.infer.stride, unguided_decode=True)
    rate = evals / seconds
    return {"first_call_s": first, "evals_per_s": rate, "slices_per_s": rate / per_slice,
            "evals_per_slice": per_slice, "tflops": rate * flops / 1e12,
            "applies": mode == "eager" or "compile" in mode or device.type == "cuda"}


def time_training(config, device, precision: str, mode: str, batch: int, steps: int,
                  flops: float, backend: str) -> dict:
    """Samples/s of ``train_step`` (forward, backward, Adam) on random batches."""
    model = _model(config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    if mode == "compile":
        compile_in_place(model, backend=backend)
    # The low-precision arm forces the dtype (the CPU dry run exercises it where it does not pay);
    # fp16 needs train_step's gradient scaler, as on V100s.
    amp_dtype = None if precision == "fp32" else _low_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    schedule = NoiseSchedule.from_config(config.train)
    size = config.preprocess.output_size[0]
    x = torch.rand(batch, 1, size, size, device=device)
    labels = torch.randint(1, 3, (batch,), device=device)

    def step() -> None:
        train_step(model, optimizer, schedule, x, labels,
                   cond_drop_prob=0.15, scaler=scaler, amp_dtype=amp_dtype)

    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    rate = batch * steps / (time.perf_counter() - start)
    return {"first_call_s": first, "samples_per_s": rate, "tflops": rate * flops / 1e12}


def _variants(text: str) -> tuple[tuple[str, str], ...]:
    pairs = tuple(tuple(item.split(":", 1)) for item in text.split(","))
    if any(len(pair) != 2 or pair[0] not in ("fp32", "low") for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected precision:mode pairs, got {text!r}")
    return pairs


def _guarded(deadline: float, fixed: dict, fn, *args) -> dict:
    """``fixed`` + ``fn(*args)`` + a status: ok, the error, or skipped after the deadline."""
    if time.perf_counter() > deadline:
        return {**fixed, "status": "skipped: time budget spent"}
    try:
        return {**fixed, **fn(*args), "status": "ok"}
    except Exception as err:  # record and go on: one broken variant must not cost the others
        traceback.print_exc()
        return {**fixed, "status": f"error: {type(err).__name__}: {str(err)[:200]}"}


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for every result file")
    p.add_argument("--dry-run", action="store_true", help="CPU, the tiny test model, seconds")
    p.add_argument("--models", default="paper,demo", help="configs/<name>.yaml, comma-separated")
    p.add_argument("--batch", type=int, default=64, help="slices per DDIM batch (the pair runs 3x)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps each way per timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=330.0, help="skip what is left after this")
    p.add_argument("--device", help="default: cuda when available (cpu with --dry-run)")
    p.add_argument("--compile-backend", default="",
                   help="torch.compile backend (default inductor; eager with --dry-run: dynamo's tracing only, "
                        "inductor's CPU code generation takes minutes on a small VM)")
    p.add_argument("--matmul-size", type=int, default=0, help="n of the n x n matmul rate (0: by device)")
    p.add_argument("--infer-variants", type=_variants, default=INFER_VARIANTS,
                   help="precision:mode pairs, e.g. fp32:eager,fp32:compile (precision fp32 or low)")
    p.add_argument("--train-variants", type=_variants, default=TRAIN_VARIANTS,
                   help="precision:mode pairs, mode eager or compile")
    args = p.parse_args(argv)
    if args.dry_run:
        args.models, args.batch, args.steps, args.repeats, args.train_steps = "test", 2, 2, 1, 2
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    deadline = time.perf_counter() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    low = _low_dtype(device)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "low_precision": str(low).split(".")[-1], "threads": torch.get_num_threads(),
           "dry_run": args.dry_run, "tf32": torch.backends.cuda.matmul.allow_tf32,
           "compile_backend": args.compile_backend}
    (out / "env.json").write_text(json.dumps(env, indent=2))
    n = args.matmul_size or (512 if args.dry_run else 8192 if device.type == "cuda" else 2048)
    (out / "matmul.json").write_text(json.dumps(
        {"n": n, "fp32_tflops": matmul_rate(device, torch.float32, n, 3),
         f"{env['low_precision']}_tflops": matmul_rate(device, low, n, 3)}, indent=2))

    flops, infer_rows, train_rows = {}, [], []
    for name in args.models.split(","):
        config = load_config(REPO / "configs" / f"{name}.yaml")
        size = config.preprocess.output_size[0]
        model = _model(config, device)
        flops[name] = {"size": size, "channels": list(config.model.channels),
                       "forward_flops": flops_per_evaluation(model.eval(), size, device=device),
                       "train_flops_per_sample": flops_per_evaluation(model.train(), size, device=device,
                                                                      backward=True)}
        del model
        (out / "flops.json").write_text(json.dumps(flops, indent=2))
        for precision, mode in args.infer_variants:
            fixed = {"model": name, "precision": "fp32" if precision == "fp32" else env["low_precision"],
                     "mode": mode, "batch": args.batch}
            row = _guarded(deadline, fixed, time_inference, config, device, precision, mode, args.batch,
                           args.steps, args.repeats, flops[name]["forward_flops"], args.compile_backend)
            infer_rows.append(row)
            _write_csv(out / "inference.csv", infer_rows)  # after every row: a hard timeout keeps them
            print(row, flush=True)
        train_batch = 2 if args.dry_run else config.train.batch_size
        for precision, mode in args.train_variants:
            fixed = {"model": name, "precision": "fp32" if precision == "fp32" else env["low_precision"],
                     "mode": mode, "batch": train_batch}
            row = _guarded(deadline, fixed, time_training, config, device, precision, mode, train_batch,
                           args.train_steps, flops[name]["train_flops_per_sample"], args.compile_backend)
            train_rows.append(row)
            _write_csv(out / "training.csv", train_rows)
            print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "flops.json").write_text(json.dumps(flops, indent=2))
    _write_csv(out / "inference.csv", infer_rows)
    _write_csv(out / "training.csv", train_rows)
    summary = [f"# bench_gpu on {env['name']} ({device}), torch {env['torch']}", "",
               "## Inference (DDIM counterfactual pair, stride 1 timing)", "",
               _markdown(infer_rows, ["model", "precision", "mode", "batch", "first_call_s", "evals_per_s",
                                      "slices_per_s", "tflops", "applies", "status"]), "",
               "## Training (train_step)", "",
               _markdown(train_rows, ["model", "precision", "mode", "batch", "first_call_s",
                                      "samples_per_s", "tflops", "status"]), ""]
    (out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    failed = [r for r in infer_rows + train_rows if r["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
