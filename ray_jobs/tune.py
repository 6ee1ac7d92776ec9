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

The command line is parsed into a :class:`TuneRequest` (:func:`tune_request`, through the one
resolver :func:`resolve_request`, which reads the checkpoint's config and the ``--config`` YAML
once each) and :func:`run` runs it; the pipeline builds its request with the same resolver from
its loaded config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from igconda.argtypes import TRACKING_URI_HELP, non_negative_int
from igconda.checkpoint import CheckpointError, check_checkpoint, load_checkpoint_config
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.data.compat import PreprocessMismatch, check_data_for_checkpoint
from ray_jobs.console import add_verbose_flag, init_ray, is_verbose
from ray_jobs.tune_progress import trial_bar


class TuneInputError(ValueError):
    """A tuning refused before Ray starts (usage, config, checkpoint or data): exit status 2."""


@dataclass(frozen=True)
class TuneRequest:
    """What one tuning runs with, every setting resolved (:func:`resolve_request`).

    ``study`` is the config whose ``tune`` section applies (``--config``, else the checkpoint's);
    ``checkpoint_config`` the IgCONDA checkpoint's own (None for ``dpm_cg``, whose
    ``--checkpoint`` is the classifier's), read once and handed to the checks and the driver.
    """

    checkpoint: str
    data: str
    output: str
    study: StudyConfig
    checkpoint_config: StudyConfig | None = None
    method: str = "igconda"
    checkpoint2: str | None = None
    tracking_uri: str = ""
    experiment: str | None = None
    parent_run_id: str | None = None
    address: str | None = None
    verbose: bool | None = None
    trial_per_pair: bool = False


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


def check_method(method: str, checkpoint2: str | Path | None) -> None:
    """``--checkpoint2`` goes with ``--method dpm_cg`` and only there (TuneInputError)."""
    if (method == "dpm_cg") != (checkpoint2 is not None):
        raise TuneInputError("--checkpoint2 (the unconditional DPM) is needed with --method "
                             "dpm_cg and only there")


def resolve_request(checkpoint: str | Path, data: str | Path, output: str | Path, *,
                    config: StudyConfig | None = None, method: str = "igconda",
                    checkpoint2: str | Path | None = None, max_slices: int | None = None,
                    **job) -> TuneRequest:
    """The one resolver of a tuning's settings: ``config`` (a loaded ``--config``) or else the
    checkpoint's config, with ``max_slices`` over ``tune.max_slices``; the checkpoint's
    ``config.yaml`` is parsed here, once. ``job``: the other :class:`TuneRequest` fields.

    Raises:
        TuneInputError: ``--checkpoint2`` given without ``--method dpm_cg`` or missing with it,
            or an unreadable checkpoint config.
    """
    check_method(method, checkpoint2)
    try:
        # dpm_cg: --checkpoint is the noisy classifier's folder, not an IgCONDA checkpoint.
        own = load_checkpoint_config(checkpoint) if method == "igconda" else None
        study = config or own or load_checkpoint_config(checkpoint)
    except (ConfigError, CheckpointError) as err:
        raise TuneInputError(str(err)) from None
    if max_slices is not None:
        study = study.replace("tune", max_slices=max_slices)
    return TuneRequest(str(checkpoint), str(data), str(output), study, own, method,
                       None if checkpoint2 is None else str(checkpoint2), **job)


def tune_request(args: argparse.Namespace) -> TuneRequest:
    """The request of a ``ray_jobs.tune`` command line (:func:`resolve_request`)."""
    check_method(args.method, args.checkpoint2)  # a usage error, before any file is read
    try:
        config = load_config(args.config) if args.config else None
    except ConfigError as err:
        raise TuneInputError(str(err)) from None
    return resolve_request(args.checkpoint, args.data, args.output, config=config,
                           method=args.method, checkpoint2=args.checkpoint2,
                           max_slices=args.max_slices, tracking_uri=args.tracking_uri,
                           experiment=args.experiment, parent_run_id=args.parent_run_id,
                           address=args.address, verbose=args.verbose,
                           trial_per_pair=args.trial_per_pair)


def check_inputs(request: TuneRequest) -> str | None:
    """The driver's checks before Ray: the checkpoints' files (before the trials each load
    them) and the tune slices against the diffusion model's training data (dpm_cg: the DPM's;
    the classifier's checkpoint records no preprocessing). Returns a warning line, or None.

    Raises:
        TuneInputError: naming the damaged checkpoint or the differing slice settings.
    """
    try:
        check_checkpoint(request.checkpoint, config=request.checkpoint_config)
        if request.checkpoint2:
            check_checkpoint(request.checkpoint2)
        return check_data_for_checkpoint(request.data, request.checkpoint2 or request.checkpoint,
                                         config=None if request.checkpoint2
                                         else request.checkpoint_config)
    except (ConfigError, CheckpointError, PreprocessMismatch) as err:
        raise TuneInputError(str(err)) from None


def run(request: TuneRequest) -> None:
    """The tuning ``request`` says (see the module docstring); Ray is started here if it is not
    running, and shut down again if it was started here.

    Raises:
        TuneInputError: refused before Ray (:func:`check_inputs`).
        SharedStorageError: a path not every node sees.
        ConfigError, CheckpointError, TuningError: the search failed.
    """
    problem = check_inputs(request)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)

    import ray

    from ray_jobs.shared_storage import preflight
    from tuning.dpm_cg import run_dpm_cg_tuning
    from tuning.driver import run_tuning

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(request.address, verbose=request.verbose)  # quiet unless --verbose
    try:
        # Trials write their results under <output>/ray_results and load the checkpoints on
        # their node; the driver reads the tune slices itself and hands them to the trials.
        preflight(outputs={"the tuning's --output (Tune's trial results, ray_results/)":
                           request.output},
                  checkpoints={"--checkpoint": request.checkpoint,
                               "--checkpoint2": request.checkpoint2})
        if request.method == "dpm_cg":
            run_dpm_cg_tuning(request.checkpoint, request.checkpoint2, request.data,
                              request.output, study=request.study,
                              tracking_uri=request.tracking_uri, experiment=request.experiment,
                              parent_run_id=request.parent_run_id)
        else:
            run_tuning(request.checkpoint, request.data, request.output, study=request.study,
                       checkpoint_config=request.checkpoint_config,
                       tracking_uri=request.tracking_uri, experiment=request.experiment,
                       parent_run_id=request.parent_run_id,
                       share_encoding=not request.trial_per_pair,
                       verbose=int(is_verbose()),  # Tune's status tables with --verbose only
                       callbacks=[trial_bar()])
    finally:
        # The pipeline runs this job in its own process and Ray runtime: leave that one alone.
        if started_here:
            ray.shutdown()


def execute(build: Callable[[], TuneRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, its errors reported as the command line
    reports them; the job's exit status (the pipeline runs its tune stage through this)."""
    from ray_jobs.shared_storage import SharedStorageError
    from tuning.driver import TuningError

    try:
        run(build())
    except (TuneInputError, SharedStorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, TuningError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: tune_request(args))


if __name__ == "__main__":
    sys.exit(main())
