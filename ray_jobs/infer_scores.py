"""Every method's scores per patient, kept beside the predictions so that a re-run scores only
what changed.

Scoring (the counterfactual's maps and the baselines' on every unhealthy slice, then the
paper's metrics) runs on the driver, one patient at a time. A patient's rows are stored in
``<infer>/scored/<patient_id>.parquet`` (:attr:`igconda.data.io.InferOutput.scored`) with a key
in the file's metadata; a re-run whose key matches reads them instead of scoring again. The key
is everything a score depends on:

- the patient's prediction stamp (the inference settings and the digest of its input slice file,
  ``ray_jobs.infer_patients``) and row count: a re-predicted patient is re-scored;
- the calibrated τ of every method (``dice_tau``);
- the digest of the scoring code's source files (:data:`SCORING_MODULES`), so that a fixed metric
  never leaves old scores behind; the key costs one hash of a few source files per job.

No Ray here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from igconda.data.io import InferOutput
from igconda.io_utils import atomic_write
from ray_jobs.infer_outputs import score_patient
from ray_jobs.infer_patients import SETTINGS_KEY

#: Where each stored score file keeps the key it was made with.
SCORES_KEY = b"igconda.scores"
#: Modules whose source decides a patient's scores: the maps of every method, the metrics, the
#: lesion statistics and the per-patient scoring itself. A module that starts to decide scores
#: must be added here, or its changes would leave stored scores stale.
SCORING_MODULES = ("igconda.anomaly_methods", "igconda.evaluation", "igconda.metrics",
                   "igconda.lesion_stats", "igconda.map_kinds", "ray_jobs.infer_outputs")


@functools.cache
def scoring_code_digest() -> str:
    """SHA-256 of the :data:`SCORING_MODULES` source files (once per process)."""
    digest = hashlib.sha256()
    for name in SCORING_MODULES:
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()


def score_key(prediction: Path, taus: Mapping[str, float]) -> str:
    """The key of a patient's scores: its prediction's stamp and rows, the τ's, the code."""
    meta = pq.read_metadata(prediction)
    stamp = (meta.metadata or {}).get(SETTINGS_KEY, b"").decode()
    record = {"prediction": stamp, "rows": meta.num_rows, "code": scoring_code_digest(),
              "taus": {k: float(v) for k, v in sorted(taus.items())}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def stored_scores(path: Path, key: str) -> pd.DataFrame | None:
    """The scores stored at ``path`` if they were made with ``key``, else None."""
    try:
        if (pq.read_metadata(path).metadata or {}).get(SCORES_KEY) != key.encode():
            return None
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException):  # absent, truncated or foreign: scored again
        return None


def patient_scores(prediction: Path, input_file: Path, taus: Mapping[str, float],
                   store: Path) -> tuple[pd.DataFrame, bool]:
    """One patient's scores (:func:`~ray_jobs.infer_outputs.score_patient`), read from ``store``
    when it holds them for this key, else computed and written there (atomically).

    Returns:
        (the rows, empty for a patient without an unhealthy slice; True if they were reused).
    """
    key = score_key(prediction, taus)
    stored = stored_scores(store, key)
    if stored is not None:
        return stored, True
    frame = score_patient(prediction, input_file, taus)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SCORES_KEY: key})
    store.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(store, lambda tmp: pq.write_table(table, tmp), suffix=".tmp")
    return frame, False


def score_patients(predictions: Mapping[str, Path], inputs: Mapping[str, Path],
                   taus: Mapping[str, float], layout: InferOutput) -> tuple[list[pd.DataFrame], list[str]]:
    """Every patient's scores (:func:`patient_scores`, stored under ``layout.scored``).

    Returns:
        (the non-empty per-patient frames, in ``inputs`` order; the patients scored afresh, the
        others' scores having been reused).
    """
    frames, rescored = [], []
    for pid, input_file in inputs.items():
        frame, reused = patient_scores(predictions[pid], input_file, taus, layout.patient_scores(pid))
        if not reused:
            rescored.append(pid)
        if len(frame):
            frames.append(frame)
    return frames, rescored
