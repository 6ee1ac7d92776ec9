"""The infer job's settings, resolved from its four sources (highest precedence first):
command-line flags, ``--tuned best.json`` (D, w, map kind and the τ's from ``ray_jobs.tune``),
``--config`` (only its ``infer`` and ``tracking`` sections: the network must match its weights)
and the checkpoint's own ``config.yaml``.

:func:`resolve_config` checks everything a run needs before Ray starts (the checkpoint's files,
the YAML, the tuned file, the (D, s, w) rule) and returns the study config with the
:class:`~ray_jobs.infer_patients.InferSettings` that each patient's output is stamped with.
No Ray here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from igconda.checkpoint import CheckpointError, check_checkpoint, load_checkpoint_config
from igconda.config import ConfigError, StudyConfig, load_config
from igconda.ddim_grid import check_counterfactual_params
from igconda.evaluation import igconda_method
from ray_jobs.infer_patients import InferError, InferSettings, weights_digest

logger = logging.getLogger("ray_jobs.infer")


def resolve_config(args: argparse.Namespace) -> tuple[StudyConfig, InferSettings]:
    """Apply the precedence CLI > tuned file > --config > checkpoint's config.

    Raises:
        InferError: unreadable checkpoint, config or tuned file, or invalid D/s/w.
    """
    checkpoint = Path(args.checkpoint)
    try:
        base = load_checkpoint_config(checkpoint)
        # Here, not in each actor, where a damaged file would end the job with a remote traceback.
        check_checkpoint(checkpoint)
    except (CheckpointError, ConfigError) as err:
        raise InferError(f"checkpoint {checkpoint}: {err}") from None
    infer: dict[str, Any] = {}
    track: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            load_config(path)  # full validation, with the file named in errors
            raw = yaml.safe_load(path.read_text()) or {}
        except (ConfigError, OSError, yaml.YAMLError) as err:
            raise InferError(f"config {path}: {err}") from None
        # Only the sections that do not define the model: the network must match its weights.
        infer.update(raw.get("infer") or {})
        track.update(raw.get("tracking") or {})
    stride_from_cli = args.stride is not None
    thresholds: dict[str, float] = {}
    if args.tuned:
        from tuning.results import read_best
        from tuning.trial import TuningError

        path = Path(args.tuned)
        try:
            tuned = read_best(path)
            infer["noise_level"] = int(tuned["noise_level"])
            infer["guidance_scale"] = float(tuned["guidance_scale"])
            infer["map_kind"] = str(tuned["map_kind"])
            if tuned.get("threshold") is not None:
                infer["threshold"] = float(tuned["threshold"])
            thresholds = {str(k): float(v) for k, v in (tuned.get("thresholds") or {}).items()
                          if v is not None}
        except (TuningError, ValueError, KeyError, TypeError) as err:
            raise InferError(f"tuned parameters {path}: cannot read them "
                             f"({type(err).__name__}: {err})") from None
        # The stride is a speed setting of inference, but it must divide the tuned D; fall back
        # to the stride the tuning itself used when it does not.
        stride = int(infer.get("stride", base.infer.stride))
        if not stride_from_cli and infer["noise_level"] % stride and "stride" in tuned:
            logger.warning("stride %d does not divide tuned D=%d; using the tuning stride %s",
                           stride, infer["noise_level"], tuned["stride"])
            infer["stride"] = int(tuned["stride"])
    for key, value in (("noise_level", args.noise_level), ("guidance_scale", args.guidance_scale),
                       ("stride", args.stride), ("batch_size", args.batch_size),
                       ("concurrency", args.concurrency), ("num_gpus_per_actor", args.num_gpus),
                       ("map_kind", args.map_kind), ("threshold", args.threshold)):
        if value is not None:
            infer[key] = value
    try:
        config = load_config(checkpoint / "config.yaml", overrides={"infer": infer, "tracking": track})
    except ConfigError as err:
        raise InferError(str(err)) from None
    i = config.infer
    try:
        check_counterfactual_params(i.noise_level, i.stride, i.guidance_scale,
                                    config.train.num_train_timesteps)
    except ValueError as err:
        raise InferError(str(err)) from None
    # The chosen map's τ is the one in effect (CLI > tuned > config); methods tuning did not
    # calibrate keep no τ and their Dice@τ stays empty rather than borrowing another's.
    thresholds[igconda_method(i.map_kind)] = float(i.threshold)
    settings = InferSettings(str(checkpoint.resolve()), i.noise_level, float(i.guidance_scale),
                             i.stride, i.map_kind, weights_digest(checkpoint),
                             float(i.threshold), thresholds)
    return config, settings

