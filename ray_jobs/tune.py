"""Tune the noise level D and guidance scale w on the tune split (Ray Tune, objective ⌈DSC⌉).

Run it on a trained checkpoint and a preprocessed data folder::

    python -m ray_jobs.tune --checkpoint runs/demo/train/best --data runs/demo/data \
        --output runs/demo/tune --config configs/demo.yaml

or on a Ray cluster, with trials sharing GPUs (``tune.gpus_per_trial: 0.25`` in the config)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ray_jobs.tune --checkpoint /shared/ckpt --data /shared/data --output /shared/tune

It writes ``<output>/best.json`` (the chosen (D, w); ``python -m ray_jobs.infer --tuned
<output>/best.json`` uses it), ``grid.csv`` and ``heatmap.png``, and logs an MLflow ``tune`` run
with one child run per (D, w). The search space is the config's ``tune`` section (without
``--config``, the one stored in the checkpoint).
"""

from __future__ import annotations

import argparse
import sys

from igconda.checkpoint import CheckpointError, load_checkpoint_config
from igconda.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.tune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (train/best)")
    parser.add_argument("--data", required=True, help="preprocessed data folder (with slices/tune)")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument("--config", help="study YAML whose tune section applies "
                                         "(default: the checkpoint's config)")
    parser.add_argument("--tracking-uri", default="", help="MLflow URI (default: tracking.tracking_uri, else "
                             "sqlite:///<output>/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name")
    parser.add_argument("--parent-run-id", default=None, help="nest the tune run under this run")
    parser.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    parser.add_argument("--max-slices", type=int, default=None, help="override tune.max_slices")
    parser.add_argument("--trial-per-pair", action="store_true",
                        help="one trial per (D, w) instead of one per D decoding every w "
                             "(more parallel trials, but each re-encodes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = load_config(args.config) if args.config else load_checkpoint_config(args.checkpoint)
        if args.max_slices is not None:
            study = study.replace("tune", max_slices=args.max_slices)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import ray

    from tuning.driver import TuningError, run_tuning

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.address)
    try:
        run_tuning(args.checkpoint, args.data, args.output, study=study,
                   tracking_uri=args.tracking_uri, experiment=args.experiment,
                   parent_run_id=args.parent_run_id, share_encoding=not args.trial_per_pair)
    except (ConfigError, CheckpointError, TuningError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        # The pipeline runs this job in its own process and Ray runtime: leave that one alone.
        if started_here:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
