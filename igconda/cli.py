"""The ``igconda`` command line: anomaly maps for single scans.

``igconda detect SCAN.nii.gz --checkpoint MODEL -o OUT.nii.gz`` preprocesses a PET scan exactly as
the checkpoint's training data were (its stored ``preprocess`` config), computes each axial
slice's healthy counterfactual and anomaly map in batches (with a progress bar), and writes the
map resampled onto the scan's own grid and affine, so it opens over the PET in ITK-SNAP or
3D Slicer, and beside it the binary lesion mask at the threshold τ (``--mask-output``).

``MODEL`` is a study's model folder (``<study>/model``: the checkpoint plus ``tuning.json``, see
:mod:`igconda.tuned_model`), whose tuned D, w, stride, map kind and τ are used; a plain
checkpoint runs the untuned defaults of its config, and says so. With ``--mask`` it also scores
the maps against a lesion mask (the paper's per-slice metrics and Dice at τ, averaged over the
slices that contain lesion, through :mod:`igconda.evaluation`).

Exit codes: 0 success, 2 a missing or invalid input (the message names the file), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from igconda.argtypes import positive_int
from igconda.map_kinds import MAP_KINDS

#: Metrics printed by ``detect --mask`` (mean over unhealthy slices).
_PRINTED = (("dsc_max", "⌈DSC⌉"), ("dice_tau", "Dice@τ"), ("auprc", "AUPRC"),
            ("hd95", "HD95 (px)"), ("sensitivity", "detection sensitivity"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("igconda")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igconda", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"igconda {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    detect = commands.add_parser(
        "detect", help="anomaly map of one PET scan (NIfTI, SUV) on the scan's own grid",
        description="Healthy counterfactual and anomaly map of one PET scan (NIfTI in SUV), "
                    "written on the scan's own grid and affine.")
    detect.add_argument("scan", help="PET NIfTI file in SUV (.nii or .nii.gz)")
    detect.add_argument("--checkpoint", required=True,
                        help="a study's model folder (<study>/model, with tuning.json) or a "
                             "plain checkpoint folder (untuned defaults)")
    detect.add_argument("-o", "--output", required=True, help="output anomaly map (.nii.gz)")
    detect.add_argument("--mask-output",
                        help="output binary lesion mask at τ (default: OUT with _mask before .nii.gz)")
    detect.add_argument("--noise-level", type=positive_int, help="D (default: tuned, else the checkpoint's)")
    detect.add_argument("--guidance-scale", type=float, help="w (default: tuned, else the checkpoint's)")
    detect.add_argument("--stride", type=positive_int, help="s, a divisor of D (default: tuned, else the checkpoint's)")
    detect.add_argument("--map", dest="map_kind", choices=MAP_KINDS, default=None,
                        help="anomaly map kind (default: tuned, else the checkpoint's infer.map_kind)")
    detect.add_argument("--threshold", type=float,
                        help="τ of the lesion mask (default: tuned, else the checkpoint's infer.threshold)")
    detect.add_argument("--mask", help="lesion mask NIfTI on the scan's grid: also print metrics")
    detect.add_argument("--batch-size", type=positive_int, help="slices per batch (default: the checkpoint's)")
    detect.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: auto)")
    detect.add_argument("--no-amp", action="store_true", help="full float32 precision (by default the network autocasts to bf16/fp16 on GPUs and on CPUs with bf16 units)")
    detect.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


class _UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def detect(args: argparse.Namespace) -> dict[str, float]:
    """Run ``igconda detect``; returns the printed metrics (empty without ``--mask``)."""
    from igconda.checkpoint import CheckpointError, load_checkpoint_config
    from igconda.config import ConfigError
    from igconda.data.preprocess import preprocess_volume
    from igconda.data.volumes import VolumeError
    from igconda.export import export_volume
    from igconda.inference import CounterfactualPredictor
    from igconda.progress import progress as progress_bar
    from igconda.tuned_model import TuningFileError, model_settings

    scan, checkpoint, output = Path(args.scan), Path(args.checkpoint), Path(args.output)
    if not scan.is_file():
        raise _UsageError(f"{scan}: scan file not found")
    if args.mask and not Path(args.mask).is_file():
        raise _UsageError(f"{args.mask}: mask file not found")
    mask_output = Path(args.mask_output) if args.mask_output else default_mask_output(output)
    for name, path in (("-o/--output", output), ("--mask-output", mask_output)):
        if not path.name.endswith((".nii", ".nii.gz")):
            raise _UsageError(f"{path}: {name} must be a .nii or .nii.gz file")
        if path.resolve() == scan.resolve() or (args.mask and path.resolve() == Path(args.mask).resolve()):
            raise _UsageError(f"{path}: {name} is an input file; refusing to overwrite it: write "
                              f"the output to another file")
    if mask_output.resolve() == output.resolve():
        raise _UsageError(f"{mask_output}: --mask-output must differ from -o/--output")
    try:
        config = load_checkpoint_config(checkpoint)
        defaults, origin = model_settings(checkpoint, config)
    except (CheckpointError, ConfigError, TuningFileError) as err:
        raise _UsageError(f"checkpoint {checkpoint}: {err}") from None
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else defaults[key]
              for key in ("noise_level", "guidance_scale", "stride", "map_kind", "threshold")}
    overridden = sorted(k for k in chosen if getattr(args, k) is not None)
    print(f"igconda detect: using {origin}" + (f"; overridden: {', '.join(overridden)}" if overridden else ""),
          file=sys.stderr)
    # argparse (positive_int) refuses --batch-size 0, so None is the only "unset".
    batch_size = args.batch_size if args.batch_size is not None else config.infer.batch_size

    started = time.perf_counter()
    try:
        volume = preprocess_volume(scan, args.mask, config.preprocess)
    except VolumeError as err:
        raise _UsageError(str(err)) from None
    try:
        predictor = CounterfactualPredictor(
            checkpoint, noise_level=chosen["noise_level"], guidance_scale=chosen["guidance_scale"],
            stride=chosen["stride"], map_kind=chosen["map_kind"], threshold=chosen["threshold"],
            device=args.device, amp=not args.no_amp, score=bool(args.mask))
    except CheckpointError as err:
        raise _UsageError(f"checkpoint {checkpoint}: {err}") from None
    except ValueError as err:
        raise _UsageError(str(err)) from None
    except (RuntimeError, AssertionError) as err:  # unknown device, or CUDA absent from this torch
        raise _UsageError(f"--device {args.device}: {err}") from None

    x, y, z = volume.image.shape
    images = np.moveaxis(volume.image, 2, 0).reshape(z, x * y)  # slice k = volume[:, :, k]
    masks = np.moveaxis(volume.mask, 2, 0).reshape(z, x * y)
    labels = np.where(masks.any(axis=1), 2, 1).astype(np.int8)
    maps = np.zeros((z, x * y), dtype=np.float32)
    scores: dict[str, list[np.ndarray]] = {key: [] for key, _ in _PRINTED}
    print(f"igconda detect: {scan.name} → {z} slices of {x}×{y}; D={predictor.noise_level} "
          f"w={predictor.guidance_scale:g} s={predictor.stride} map={predictor.map_kind} "
          f"τ={predictor.threshold:g} on {predictor.device}", file=sys.stderr)
    with progress_bar(z, "detect", "slice", disable=args.quiet) as progress:
        for start in range(0, z, batch_size):
            stop = min(start + batch_size, z)
            batch = {"image": images[start:stop], "height": np.full(stop - start, x),
                     "width": np.full(stop - start, y), "slice_index": np.arange(start, stop)}
            if args.mask:
                batch.update(mask=masks[start:stop], label=labels[start:stop])
            out = predictor(batch)
            maps[start:stop] = out["anomaly_map"]
            if args.mask:
                for key in scores:
                    scores[key].append(out[key])
            progress.update(stop - start)
    export_volume(maps.reshape(z, x, y), volume.geometry, output, order=1)
    # The lesion mask at τ, thresholded on the grid τ was calibrated on, then resampled nearest.
    lesion = (maps >= np.float32(predictor.threshold)).astype(np.uint8)
    export_volume(lesion.reshape(z, x, y), volume.geometry, mask_output, order=0)
    elapsed = time.perf_counter() - started
    print(f"wrote {output} and {mask_output} ({elapsed:.1f} s)", file=sys.stderr)

    results: dict[str, float] = {}
    if args.mask:
        unhealthy = int((labels == 2).sum())
        print(f"lesion slices: {unhealthy} of {z}")
        for key, title in _PRINTED:
            values = np.concatenate(scores[key])
            values = values[np.isfinite(values)]
            if len(values):
                results[key] = float(values.mean())
                print(f"{title}: {values.mean():.3f} ± {values.std():.3f} (n={len(values)})")
            else:
                print(f"{title}: – (no lesion slice)")
    return results


def default_mask_output(output: Path) -> Path:
    """``OUT.nii.gz`` → ``OUT_mask.nii.gz`` (and ``.nii`` alike): the mask beside the map."""
    suffix = ".nii.gz" if output.name.endswith(".nii.gz") else ".nii"
    if not output.name.endswith(suffix):
        return output.with_name(output.name + "_mask.nii.gz")
    return output.with_name(output.name[: -len(suffix)] + "_mask" + suffix)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``igconda``)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "detect":
            detect(args)
    except _UsageError as err:
        print(f"igconda {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
