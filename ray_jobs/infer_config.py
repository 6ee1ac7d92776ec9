"""The infer job's settings, resolved from its four sources (highest precedence first):
command-line flags, ``--tuned best.json`` (D, w, map kind and the τ's from ``ray_jobs.tune``),
``--config`` (only its ``infer`` and ``tracking`` sections: the network must match its weights)
and the checkpoint's own ``config.yaml``.

:func:`resolve_request` is the one resolver: it parses each file once (the checkpoint's
``config.yaml``, the ``--config`` YAML, the tuned file), checks everything a run needs before
Ray starts (the checkpoint's files, the YAML, the tuned file; the (D, s, w) rule through the
config's validation, :mod:`igconda.ddim_grid`) and returns the :class:`InferRequest` that
:func:`ray_jobs.infer.run` runs: the study config with the
:class:`~ray_jobs.infer_patients.InferSettings` that each patient's output is stamped with.
The command line (:func:`infer_request`) and the pipeline (its already-loaded config,
:func:`config_sections`) both go through it. No Ray here.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igconda.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    check_checkpoint,
    load_checkpoint_config,
)
from igconda.config import ConfigError, StudyConfig, apply_overrides, from_dict, read_config_file
from igconda.evaluation import igconda_method
from ray_jobs.infer_patients import InferError, InferSettings, weights_digest

logger = logging.getLogger("ray_jobs.infer")

#: The sections of a ``--config`` that apply to inference (the others define the model).
CONFIG_SECTIONS = ("infer", "tracking")


@dataclass(frozen=True)
class InferRequest:
    """What one inference runs with, every setting resolved (:func:`resolve_request`).

    The job fields keep the command line's option names (``ray_jobs.infer --help``).
    """

    checkpoint: str
    data: str
    output: str
    config: StudyConfig          # the checkpoint's, with the infer/tracking overrides applied
    settings: InferSettings      # what each patient's output is stamped with
    split: str = "test"
    device: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    address: str | None = None
    no_volumes: bool = False
    log_slices: bool = False
    verbose: bool | None = None


def config_sections(config: StudyConfig) -> dict[str, dict[str, Any]]:
    """A loaded study config's sections that apply to inference (every key, defaults included):
    what the pipeline hands :func:`resolve_request` instead of its config file."""
    plain = config.to_dict()
    return {name: plain[name] for name in CONFIG_SECTIONS}


def config_file_sections(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``infer`` and ``tracking`` keys a ``--config`` file sets, the file parsed once and
    validated whole (the sections it leaves out keep the checkpoint's values).

    Raises:
        InferError: naming the file.
    """
    try:
        raw = read_config_file(path)
        from_dict(raw, str(path))  # full validation, with the file named in errors
    except (ConfigError, OSError) as err:
        raise InferError(f"config {path}: {err}") from None
    return {name: dict(raw.get(name) or {}) for name in CONFIG_SECTIONS}


def infer_request(args: argparse.Namespace) -> InferRequest:
    """The request of a ``ray_jobs.infer`` command line (:func:`resolve_request`)."""
    cli = {"noise_level": args.noise_level, "guidance_scale": args.guidance_scale,
           "stride": args.stride, "batch_size": args.batch_size, "concurrency": args.concurrency,
           "num_gpus_per_actor": args.num_gpus, "map_kind": args.map_kind,
           "threshold": args.threshold}
    return resolve_request(
        args.checkpoint, args.data, args.output,
        sections=config_file_sections(args.config) if args.config else None,
        tuned=args.tuned, cli=cli, split=args.split, device=args.device,
        tracking_uri=args.tracking_uri, experiment=args.experiment,
        parent_run_id=args.parent_run_id, address=args.address, no_volumes=args.no_volumes,
        log_slices=args.log_slices, verbose=args.verbose)


def resolve_config(args: argparse.Namespace) -> tuple[StudyConfig, InferSettings]:
    """The study config and the settings of a ``ray_jobs.infer`` command line."""
    request = infer_request(args)
    return request.config, request.settings


def resolve_request(checkpoint: str | Path, data: str | Path, output: str | Path, *,
                    sections: dict[str, dict[str, Any]] | None = None,
                    tuned: str | Path | None = None, cli: dict[str, Any] | None = None,
                    **job: Any) -> InferRequest:
    """Apply the precedence CLI > tuned file > --config > checkpoint's config.

    Args:
        checkpoint: the checkpoint folder; its ``config.yaml`` is read once here.
        data, output: the job's folders.
        sections: the ``infer``/``tracking`` keys of ``--config`` (:func:`config_file_sections`,
            or the pipeline's :func:`config_sections`); None without one.
        tuned: a ``best.json`` of ``ray_jobs.tune``.
        cli: the command line's infer settings (``{key: value or None}``; None = not given).
        job: the other :class:`InferRequest` fields (split, tracking, Ray address...).

    Raises:
        InferError: unreadable checkpoint, config or tuned file, or invalid D/s/w.
    """
    checkpoint = Path(checkpoint)
    try:
        base = load_checkpoint_config(checkpoint)
        # Here, not in each actor, where a damaged file would end the job with a remote traceback.
        check_checkpoint(checkpoint, config=base)
    except (CheckpointError, ConfigError) as err:
        raise InferError(f"checkpoint {checkpoint}: {err}") from None
    # Only the sections that do not define the model: the network must match its weights.
    infer: dict[str, Any] = dict((sections or {}).get("infer") or {})
    track: dict[str, Any] = dict((sections or {}).get("tracking") or {})
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    thresholds: dict[str, float] = {}
    if tuned:
        from tuning.results import read_best
        from tuning.trial import TuningError

        path = Path(tuned)
        try:
            best = read_best(path)
            infer["noise_level"] = int(best["noise_level"])
            infer["guidance_scale"] = float(best["guidance_scale"])
            infer["map_kind"] = str(best["map_kind"])
            if best.get("threshold") is not None:
                infer["threshold"] = float(best["threshold"])
            thresholds = {str(k): float(v) for k, v in (best.get("thresholds") or {}).items()
                          if v is not None}
        except (TuningError, ValueError, KeyError, TypeError) as err:
            raise InferError(f"tuned parameters {path}: cannot read them "
                             f"({type(err).__name__}: {err})") from None
        # The stride is a speed setting of inference, but it must divide the tuned D; fall back
        # to the stride the tuning itself used when it does not.
        stride = int(infer.get("stride", base.infer.stride))
        if "stride" not in cli and infer["noise_level"] % stride and "stride" in best:
            logger.warning("stride %d does not divide tuned D=%d; using the tuning stride %s",
                           stride, infer["noise_level"], best["stride"])
            infer["stride"] = int(best["stride"])
    infer.update(cli)
    try:
        # The config's validation applies the (D, s, w) rule (igconda.ddim_grid) to the result.
        config = apply_overrides(base, {"infer": infer, "tracking": track},
                                 source=str(checkpoint / CONFIG_FILE))
    except ConfigError as err:
        raise InferError(str(err)) from None
    i = config.infer
    # The chosen map's τ is the one in effect (CLI > tuned > config); methods tuning did not
    # calibrate keep no τ and their Dice@τ stays empty rather than borrowing another's.
    thresholds[igconda_method(i.map_kind)] = float(i.threshold)
    settings = InferSettings(str(checkpoint.resolve()), i.noise_level, float(i.guidance_scale),
                             i.stride, i.map_kind, weights_digest(checkpoint),
                             float(i.threshold), thresholds)
    return InferRequest(str(checkpoint), str(data), str(output), config, settings, **job)


def actor_cpu_warning(concurrency: int, cpus_per_actor: float, cluster_cpus: float) -> str | None:
    """Why the predictor actors may starve the Parquet readers of CPUs, or None if they cannot.

    Ray Data starts the actor pool first; if the actors reserve every CPU, the read tasks that
    feed them are never scheduled and the job waits forever (seen on a 2-CPU machine with two
    1-CPU actors). Only a warning: an autoscaling cluster may add the CPUs once asked.
    """
    reserved = concurrency * cpus_per_actor
    if cluster_cpus - reserved >= 1.0:  # a Ray Data read task asks for one whole CPU
        return None
    return (f"{concurrency} predictor actor(s) x {cpus_per_actor:g} CPU reserve {reserved:g} of the "
            f"cluster's {cluster_cpus:g} CPUs, leaving none for Ray Data's Parquet readers: unless "
            f"the cluster adds CPUs the job will wait forever. Lower infer.concurrency or "
            f"infer.num_cpus_per_actor (fractions such as 0.5 are fine) so one CPU stays free")
