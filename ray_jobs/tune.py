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
``--config``, the one stored in the checkpoint). Tune's own trial folders go to
``<output>/ray_results/tune-<key>`` (the study's storage). A run whose driver was killed is
resumed by running the same command again: the trials Tune recorded as finished are kept and
only the others run (:mod:`tuning.experiment`). On a Ray cluster of more than one node,
``--output`` and the checkpoints must be the same for every node, and the job refuses them
before any trial otherwise (:func:`ray_jobs.shared_storage.preflight`, exit status 2). Data
preprocessed with other slice settings than the checkpoint's training data (``dataset.json``
against its ``config.yaml``; :mod:`igconda.data.compat`) are refused the same way, before Ray
starts; data without ``dataset.json`` are tuned on with a warning.

The DPM + classifier guidance baseline's D and gradient scale are searched by the same job on
the same tune slices (grid: the config's ``baselines.dpm_cg_noise_levels`` × ``dpm_cg_scales``;
:mod:`tuning.dpm_cg`)::

    python -m ray_jobs.tune --method dpm_cg --checkpoint <classifier>/best \
        --checkpoint2 <dpm>/best --data runs/demo/data --output runs/demo/tune_dpm_cg \
        --config configs/comparison.yaml
"""

from __future__ import annotations

import argparse
import sys

from igconda.argtypes import TRACKING_URI_HELP, non_negative_int
from igconda.checkpoint import CheckpointError, check_checkpoint, load_checkpoint_config
from igconda.config import ConfigError, load_config
from igconda.data.compat import PreprocessMismatch, check_data_for_checkpoint
from ray_jobs.console import add_verbose_flag, init_ray, is_verbose
from ray_jobs.tune_progress import trial_bar


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.tune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder (train/best; dpm_cg: the noisy classifier's)")
    parser.add_argument("--method", choices=("igconda", "dpm_cg"), default="igconda",
                        help="what to tune (default %(default)s)")
    parser.add_argument("--checkpoint2", default=None, help="dpm_cg: the unconditional DPM's checkpoint")
    parser.add_argument("--data", required=True, help="preprocessed data folder (with slices/tune)")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument("--config", help="study YAML whose tune section applies "
                                         "(default: the checkpoint's config)")
    parser.add_argument("--tracking-uri", default="", help=TRACKING_URI_HELP)
    parser.add_argument("--experiment", default=None, help="MLflow experiment name")
    parser.add_argument("--parent-run-id", default=None, help="nest the tune run under this run")
    parser.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    add_verbose_flag(parser)
    parser.add_argument("--max-slices", type=non_negative_int, default=None, help="override tune.max_slices")
    parser.add_argument("--trial-per-pair", action="store_true",
                        help="one trial per (D, w) instead of one per D decoding every w "
                             "(more parallel trials, but each re-encodes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.method == "dpm_cg") != (args.checkpoint2 is not None):
        print("error: --checkpoint2 (the unconditional DPM) is needed with --method dpm_cg and "
              "only there", file=sys.stderr)
        return 2
    try:
        study = load_config(args.config) if args.config else load_checkpoint_config(args.checkpoint)
        if args.max_slices is not None:
            study = study.replace("tune", max_slices=args.max_slices)
        check_checkpoint(args.checkpoint)  # before the trials each load it
        if args.checkpoint2:
            check_checkpoint(args.checkpoint2)
        # The tune slices must be made as the diffusion model's training data were (dpm_cg: the
        # DPM's; the classifier's checkpoint records no preprocessing).
        problem = check_data_for_checkpoint(args.data, args.checkpoint2 or args.checkpoint)
    except (ConfigError, CheckpointError, PreprocessMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if problem:
        print(f"warning: {problem}", file=sys.stderr)

    import ray

    from ray_jobs.shared_storage import SharedStorageError, preflight
    from tuning.dpm_cg import run_dpm_cg_tuning
    from tuning.driver import TuningError, run_tuning

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(args.address, verbose=args.verbose)  # quiet unless --verbose: ray_jobs.console
    try:
        # Trials write their results under <output>/ray_results and load the checkpoints on
        # their node; the driver reads the tune slices itself and hands them to the trials.
        preflight(outputs={"the tuning's --output (Tune's trial results, ray_results/)": args.output},
                  checkpoints={"--checkpoint": args.checkpoint, "--checkpoint2": args.checkpoint2})
        if args.method == "dpm_cg":
            run_dpm_cg_tuning(args.checkpoint, args.checkpoint2, args.data, args.output,
                              study=study, tracking_uri=args.tracking_uri,
                              experiment=args.experiment, parent_run_id=args.parent_run_id)
        else:
            run_tuning(args.checkpoint, args.data, args.output, study=study,
                       tracking_uri=args.tracking_uri, experiment=args.experiment,
                       parent_run_id=args.parent_run_id, share_encoding=not args.trial_per_pair,
                       verbose=int(is_verbose()),  # Tune's status tables with --verbose only
                       callbacks=[trial_bar()])
    except SharedStorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
