"""The reference's counterfactual procedure against igconda's default path, side by side (issue 12).

On one checkpoint and the same unhealthy slices, in one run:

* **reference**: the loop of the IgCONDA-PET reference's ``inference.py`` on MONAI's
  ``DDIMScheduler`` (``set_timesteps(T)``, ``clip_sample=False``): ``reversed_step`` at every
  t = 0 … D − 1 with the unconditional model, then ``step`` at t = D … 1 with the guided pair
  (batched 2B) at w; stride 1, D = 400, w = 3, fp32; map |x − x̂| (3·D evaluations per slice).
* **igconda**: :class:`igconda.inference.CounterfactualPredictor` with the checkpoint config's D,
  s, w and map kind, precision as :mod:`igconda.precision` decides (``infer.use_amp``), model
  loading included (4·D/s evaluations per slice: encode + guided/unguided pair).

For both: slices/s (and seconds, start-up apart), evaluations per slice and per second, ⌈DSC⌉,
AUPRC, and Dice at a calibrated τ: two-fold cross-fitting over patients (each half is scored at
the τ calibrated on the other half, :func:`igconda.evaluation.calibrate_threshold`), so no slice
is scored at a τ chosen on itself. Then the ratios igconda / reference, the FLOPs per evaluation
(``torch.utils.flop_counter``), and the achieved GFLOP/s against this CPU's measured matmul rate
(one large ``torch.matmul``) in the precision each path ran in (fp32, or bf16 under autocast).

    python benchmarks/bench_reference.py --checkpoint runs/demo/train/best --data runs/demo/data \\
        --split test --slices 24 --output runs/bench_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from igconda.accel import flops_per_evaluation  # noqa: E402
from igconda.checkpoint import load_model  # noqa: E402
from igconda.data.io import read_split  # noqa: E402
from igconda.data.schema import UNHEALTHY, slice_shape_of, stack_images  # noqa: E402
from igconda.ddim_grid import network_evaluations  # noqa: E402
from igconda.evaluation import calibrate_threshold, dice_at, score_maps  # noqa: E402
from igconda.inference import CounterfactualPredictor  # noqa: E402
from igconda.precision import autocast_dtype  # noqa: E402

COLUMNS = ["patient_id", "slice_index", "label", "height", "width", "image", "mask"]


def load_slices(data: Path, split: str, limit: int) -> dict[str, np.ndarray]:
    """The first ``limit`` unhealthy slices of a split (file then slice order): ``image`` (N, H, W)
    float32, ``mask`` (N, H, W) uint8, ``patient_id`` (N,)."""
    table = read_split(data, split, COLUMNS)
    keep = np.flatnonzero(table["label"].to_numpy() == UNHEALTHY)[:limit]
    if len(keep) == 0:
        raise SystemExit(f"{data}: no unhealthy slices in split {split!r}")
    table = table.take(keep)
    h, w = slice_shape_of(table["height"], table["width"])
    return {"image": np.array(stack_images(table["image"], h, w), dtype=np.float32),
            "mask": np.array(stack_images(table["mask"], h, w), dtype=np.uint8),
            "patient_id": np.asarray(table["patient_id"].to_pylist())}


@torch.inference_mode()
def reference_maps(model, config, images: np.ndarray, noise_level: int, w: float, batch: int) -> np.ndarray:
    """|x − x̂| by the reference's loop on MONAI's scheduler (stride 1, fp32). (N, H, W) → (N, H, W)."""
    from monai.networks.schedulers import DDIMScheduler

    t = config.train
    scheduler = DDIMScheduler(num_train_timesteps=t.num_train_timesteps, schedule="linear_beta",
                              beta_start=t.beta_start, beta_end=t.beta_end, clip_sample=False)
    scheduler.set_timesteps(t.num_train_timesteps)
    maps = []
    for start in range(0, len(images), batch):
        x0 = torch.from_numpy(images[start:start + batch]).unsqueeze(1)
        b = x0.shape[0]
        uncond = torch.zeros(b, dtype=torch.long)
        x = x0
        for step in range(noise_level):
            x, _ = scheduler.reversed_step(model(x, torch.full((b,), step), uncond), step, x)
        pair = torch.cat([uncond, torch.ones(b, dtype=torch.long)])
        for step in range(noise_level, 0, -1):
            eps_u, eps_c = model(torch.cat([x, x]), torch.full((2 * b,), step), pair).chunk(2)
            x, _ = scheduler.step(eps_u + w * (eps_c - eps_u), step, x)
        maps.append((x0 - x).abs().clamp(0, 1).squeeze(1).numpy())
    return np.concatenate(maps)


def igconda_maps(checkpoint: Path, images: np.ndarray, batch: int, *, amp: bool | None = None,
                 **overrides) -> tuple[np.ndarray, float, dict]:
    """The predictor's chosen map, the start-up seconds, and the settings it ran with
    (``amp``: the checkpoint's ``infer.use_amp`` unless given)."""
    from igconda.checkpoint import load_checkpoint_config

    infer = load_checkpoint_config(checkpoint).infer
    amp = infer.use_amp if amp is None else amp
    settings = {"noise_level": infer.noise_level, "stride": infer.stride,
                "guidance_scale": infer.guidance_scale, "map_kind": infer.map_kind}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    predictor = CounterfactualPredictor(checkpoint, device="cpu", amp=amp, score=False, **settings)
    startup = time.perf_counter() - start
    settings["autocast"] = str(autocast_dtype("cpu", amp))
    maps = [predictor({"image": images[i:i + batch]})["anomaly_map"] for i in range(0, len(images), batch)]
    return np.concatenate(maps).reshape(images.shape), startup, settings


def cross_fitted_dice(maps: np.ndarray, masks: np.ndarray, patients: np.ndarray) -> tuple[float, list[float], str]:
    """Mean Dice at a τ calibrated on the other half: halves by patient (alternating sorted ids),
    by alternating slices when there is one patient."""
    ids = sorted(set(patients))
    if len(ids) >= 2:
        first = np.isin(patients, ids[::2])
        how = "patients"
    else:
        first = np.arange(len(patients)) % 2 == 0
        how = "slices (one patient)"
    dice, taus = np.full(len(maps), np.nan), []
    for scored, calibrated in ((first, ~first), (~first, first)):
        tau, _ = calibrate_threshold(maps[calibrated], masks[calibrated])
        dice[scored] = dice_at(maps[scored], masks[scored], tau)
        taus.append(tau)
    return float(np.nanmean(dice)), taus, how


def matmul_gflops(n: int, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """This CPU's measured matmul rate in ``dtype`` (2 n³ FLOPs per n × n product), best of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    slices = load_slices(Path(args.data), args.split, args.slices)
    images, masks, n = slices["image"], slices["mask"], len(slices["image"])
    model, config = load_model(args.checkpoint, "cpu")
    flops = flops_per_evaluation(model, images.shape[-1], batch=2)
    peak = matmul_gflops(args.matmul_size)
    peak_bf16 = matmul_gflops(args.matmul_size, dtype=torch.bfloat16)

    start = time.perf_counter()
    ours, startup, settings = igconda_maps(Path(args.checkpoint), images, args.batch, noise_level=args.noise_level,
                                           stride=args.stride, guidance_scale=args.guidance, map_kind=args.map_kind)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref_model, _ = load_model(args.checkpoint, "cpu")  # the reference loads its model too
    ref = reference_maps(ref_model, config, images, args.ref_noise_level, args.ref_guidance, args.batch)
    ref_s = time.perf_counter() - start

    paths = {
        "reference": {"noise_level": args.ref_noise_level, "stride": 1, "guidance_scale": args.ref_guidance,
                      "map_kind": "abs", "autocast": "None", "evals_per_slice": network_evaluations(args.ref_noise_level, 1),
                      "seconds": ref_s, "startup_s": 0.0, "maps": ref},
        "igconda": {**settings, "seconds": ours_s, "startup_s": startup, "maps": ours,
                    "evals_per_slice": network_evaluations(settings["noise_level"], settings["stride"],
                                                          unguided_decode=True)
                    // (2 if settings["guidance_scale"] == 0 else 1)},
    }
    for row in paths.values():
        maps = row.pop("maps")
        scores = score_maps(maps, masks)
        row["dice_tau"], row["taus"], row["calibration"] = cross_fitted_dice(maps, masks, slices["patient_id"])
        row.update(dsc_max=float(np.nanmean(scores["dsc_max"])), auprc=float(np.nanmean(scores["auprc"])),
                   slices_per_s=n / row["seconds"], evals_per_s=n * row["evals_per_slice"] / row["seconds"])
        row["steady_slices_per_s"] = n / (row["seconds"] - row["startup_s"])
        row["gflops"] = row["evals_per_s"] * flops / 1e9
        # Against the rate of the precision the path ran in: what its network evaluations could reach.
        row["matmul_peak_gflops"] = peak_bf16 if row["autocast"] == str(torch.bfloat16) else peak
        row["fraction_of_matmul_peak"] = row["gflops"] / row["matmul_peak_gflops"]
    ref, ours = paths["reference"], paths["igconda"]
    ratios = {key: ours[key] / ref[key] for key in ("slices_per_s", "evals_per_s", "evals_per_slice")}
    ratios.update({f"{key}_difference": ours[key] - ref[key] for key in ("dsc_max", "auprc", "dice_tau")})
    return {"slices": n, "threads": args.threads, "flops_per_evaluation": flops,
            "fp32_matmul_gflops": peak, "bf16_matmul_gflops": peak_bf16, "matmul_size": args.matmul_size, **paths, "igconda_over_reference": ratios}


def _table(result: dict) -> str:
    rows = ["| path | D | s | w | map | autocast | evals/slice | slices/s | evals/s | GFLOP/s (of peak) "
            "| ⌈DSC⌉ | Dice@τ (τ) | AUPRC |", "|" + "---|" * 13]
    for name in ("reference", "igconda"):
        r = result[name]
        rows.append(f"| {name} | {r['noise_level']} | {r['stride']} | {r['guidance_scale']:g} | {r['map_kind']} "
                    f"| {r['autocast']} | {r['evals_per_slice']} | {r['slices_per_s']:.4g} | {r['evals_per_s']:.1f} "
                    f"| {r['gflops']:.2f} ({100 * r['fraction_of_matmul_peak']:.0f} %) | {r['dsc_max']:.3f} "
                    f"| {r['dice_tau']:.3f} ({'/'.join(f'{t:g}' for t in r['taus'])}) | {r['auprc']:.3f} |")
    q = result["igconda_over_reference"]
    rows.append(f"\nigconda / reference: slices/s {q['slices_per_s']:.1f}x, evaluations/s "
                f"{q['evals_per_s']:.2f}x, evaluations per slice {q['evals_per_slice']:.3g}x; AUPRC "
                f"{q['auprc_difference']:+.3f}, Dice@τ {q['dice_tau_difference']:+.3f}, ⌈DSC⌉ "
                f"{q['dsc_max_difference']:+.3f}. {result['flops_per_evaluation'] / 1e9:.3f} GFLOP per "
                f"evaluation; matmul peak fp32 {result['fp32_matmul_gflops']:.1f}, bf16 "
                f"{result['bf16_matmul_gflops']:.1f} GFLOP/s "
                f"({result['threads']} threads); {result['slices']} slices; igconda start-up "
                f"{result['igconda']['startup_s']:.2f} s of {result['igconda']['seconds']:.1f} s")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a preprocessed dataset folder")
    p.add_argument("--split", default="test")
    p.add_argument("--slices", type=int, default=24, help="first N unhealthy slices of the split")
    p.add_argument("--batch", type=int, default=8, help="slices per batch, both paths")
    p.add_argument("--ref-noise-level", type=int, default=400, help="the reference's D")
    p.add_argument("--ref-guidance", type=float, default=3.0, help="the reference's w")
    p.add_argument("--noise-level", type=int, help="igconda's D (default: the checkpoint config's)")
    p.add_argument("--stride", type=int, help="igconda's s (default: the config's)")
    p.add_argument("--guidance", type=float, help="igconda's w (default: the config's)")
    p.add_argument("--map-kind", help="igconda's map kind (default: the config's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--output", help="write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    print(_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
