"""The request of one scoring (``ray_jobs.score_method``): :class:`ScoreRequest`, every setting
resolved by the one resolver the command line (:func:`score_request`) and the comparison study
(:mod:`ray_jobs.comparison_study`) share (:func:`resolve_request`), the study's config loaded
once by the caller, not parsed again from an argv.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igconda.baselines.scoring import IGCONDA, IGCONDA_CONTROL, SCORED_METHODS
from igconda.checkpoint import load_checkpoint_config
from igconda.config import StudyConfig, load_config
from igconda.evaluation import DPM_CG
from ray_jobs.train_runs import UsageError


@dataclass(frozen=True)
class ScoreRequest:
    """What one scoring runs with, every setting resolved (:func:`resolve_request`).

    ``config`` is the study whose ``baselines`` and ``tracking`` sections apply (with a
    ``--tuned`` D and scale in place); ``config_file`` names the file it came from (its
    contents are one of the scoring's :func:`score_inputs`). The other fields keep the
    command line's option names.
    """

    method: str
    data: str
    output: str
    config: StudyConfig
    config_file: str | None = None
    checkpoint: str | None = None
    checkpoint2: str | None = None
    tuned: str | None = None
    split: str = "test"
    tune_split: str = "tune"
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str | None = None
    variant: str = ""
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    address: str | None = None
    verbose: bool | None = None


def resolve_request(method: str, data: str | Path, output: str | Path, *,
                    config: StudyConfig | None = None, checkpoint: str | Path | None = None,
                    checkpoint2: str | Path | None = None, tuned: str | Path | None = None,
                    **job: Any) -> ScoreRequest:
    """The one resolver of a scoring's settings (the command line's and the comparison
    study's): ``config`` (a loaded ``--config``), else the checkpoint's study (``dpm_cg``: the
    classifier's; ``igconda``: the model folder's), else the defaults; for ``dpm_cg`` with
    ``tuned``, the tuned D and scale in place of the config's. ``job``: the other
    :class:`ScoreRequest` fields.

    Raises:
        UsageError: an unknown ``method``, ``tuned`` with another method, or an unreadable
            tuned file. ConfigError, CheckpointError: an unreadable checkpoint config.
    """
    if method not in SCORED_METHODS:
        raise UsageError(f"unknown --method {method!r}; known: {', '.join(SCORED_METHODS)}")

    def text(path: str | Path | None) -> str | None:
        return None if path is None else str(path)

    if config is None:
        config = (load_checkpoint_config(checkpoint) if method in (DPM_CG, IGCONDA, IGCONDA_CONTROL)
                  else load_config(None))
    if tuned is not None:
        if method != DPM_CG:
            raise UsageError(f"--tuned is for {DPM_CG}; {method!r} reads its own settings")
        from tuning.dpm_cg import read_dpm_cg_best

        try:
            config = config.replace("baselines", **read_dpm_cg_best(tuned))
        except ValueError as err:
            raise UsageError(f"--tuned: {err}") from None
    return ScoreRequest(method, str(data), str(output), config, checkpoint=text(checkpoint),
                        checkpoint2=text(checkpoint2), tuned=text(tuned), **job)


def score_request(args: argparse.Namespace) -> ScoreRequest:
    """The request of a ``ray_jobs.score_method`` command line; its ``--config`` parsed once."""
    return resolve_request(
        args.method, args.data, args.output,
        config=load_config(args.config) if args.config else None, config_file=args.config,
        checkpoint=args.checkpoint, checkpoint2=args.checkpoint2, tuned=args.tuned,
        split=args.split, tune_split=args.tune_split, concurrency=args.concurrency,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, device=args.device,
        variant=args.variant, tracking_uri=args.tracking_uri, experiment=args.experiment,
        parent_run_id=args.parent_run_id, address=args.address, verbose=args.verbose)
