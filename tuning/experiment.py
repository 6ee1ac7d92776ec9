"""The tuning's Ray Tune experiment: a new one, or the one a killed driver left, resumed.

A tuning driver killed mid-way (SIGKILL, a lost head node) leaves Tune's experiment folder with
the trials it had finished. The experiment is named by a *tuning key* (:func:`tuning_key`: a
digest of the checkpoint's weights, the tune slices, the search space and the trial settings),
``<output>/ray_results/tune-<key>``, so :func:`make_tuner`

- restores it (``Tuner.restore``) when it is there and ``best.json`` does not record it as
  finished: the finished trials are kept, the unfinished ones run again from their start (a
  trial saves no checkpoint; its scores are deterministic, so the result equals an
  uninterrupted run's);
- starts a new experiment otherwise: the first run, a re-run of a finished tuning (asked for
  again, so done again), or other inputs (another key: experiments of other keys are deleted).

How much a killed run loses depends on how often Tune saves its experiment state: at most every
10 s by default (``TUNE_GLOBAL_CHECKPOINT_S``); a trial finished after the last save runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

#: ``best.json``'s field naming the experiment it was chosen from.
KEY_FIELD = "tuning_key"


def tuning_key(checkpoints: list[Path], slices: Any, settings: dict[str, Any]) -> str:
    """A digest of what the trials compute: the checkpoints' weights files, the tune slices'
    arrays (:class:`tuning.trial.TuneSlices`) and ``settings`` (search space, stride, batch
    size, precision, encoding sharing)."""
    import numpy as np

    from igconda.checkpoint import MODEL_FILE

    digest = hashlib.sha256()
    for checkpoint in checkpoints:
        with open(checkpoint / MODEL_FILE, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    for name in ("images", "masks", "patient_id", "cohort", "slice_index"):
        values = np.asarray(getattr(slices, name))
        if values.dtype.kind == "O":  # strings: their text (the array's bytes are pointers)
            digest.update("\0".join(map(str, values)).encode())
        else:
            digest.update(f"{values.dtype.str}{values.shape}".encode())
            digest.update(np.ascontiguousarray(values).tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def finished_key(best_path: Path) -> str | None:
    """The tuning key ``best.json`` was written for (None: no file, or written before keys)."""
    try:
        return json.loads(best_path.read_text()).get(KEY_FIELD)
    except (OSError, ValueError, AttributeError):
        return None


def make_tuner(trainable: Any, param_space: dict[str, Any], tune_config: Any, run_config_kwargs:
               dict[str, Any], *, storage: Path, key: str, best_path: Path) -> tuple[Any, str]:
    """A ``tune.Tuner`` for the experiment ``<storage>/tune-<key>``: restored if a killed run
    left it unfinished, else new; returns ``(tuner, what was done, for the console)``."""
    from ray import tune

    name = f"tune-{key}"
    path = storage / name
    if finished_key(best_path) != key and tune.Tuner.can_restore(str(path)):
        finished, total = _trial_counts(path)
        tuner = tune.Tuner.restore(str(path), trainable, param_space=param_space,
                                   resume_unfinished=True, restart_errored=True)
        return tuner, (f"resuming the interrupted tuning in {path}: {finished} of {total} trials "
                       f"already finished")
    if storage.is_dir():
        for old in storage.iterdir():  # other inputs' experiments, or this one's finished run
            # Renamed aside first: a kill half-way through the delete must not leave a
            # half-deleted experiment that a re-run would take for an interrupted one.
            aside = old.with_name(f".{old.name}.discarded-{uuid.uuid4().hex[:8]}")
            old.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                       run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                                 **run_config_kwargs))
    return tuner, f"new experiment {path}"


def _trial_counts(path: Path) -> tuple[int, int]:
    """(finished trials, trials) recorded in a Tune experiment folder."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(path)).trials
    return sum(t.status == "TERMINATED" for t in trials), len(trials)
