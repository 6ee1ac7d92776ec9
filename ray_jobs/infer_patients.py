"""The infer job's per-patient prediction files: what decides them, writing, resuming, pruning.

Each patient's prediction file (:meth:`igconda.data.io.InferOutput.prediction`) carries in its Parquet
metadata the settings it was made with (:class:`InferSettings`: checkpoint, weight digest, D, w,
s, map kind, τ) and a digest of the patient's input slice file. A re-run keeps a file only when
both match (:func:`output_is_complete`), so new weights, new settings or re-preprocessed data
each recompute exactly the patients they change; :func:`prune_outputs` removes the files,
volumes and figures of patients that are no longer in the split. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from igconda.data.io import InferOutput, split_path
from igconda.data.schema import PREDICTION_SCHEMA, encode_images, validate_predictions
from igconda.evaluation import igconda_method
from igconda.io_utils import atomic_write, file_digest

#: Key of the per-patient Parquet schema metadata that records how its rows were made.
SETTINGS_KEY = b"igconda.infer"
#: The stamp's entry for the digest of the patient's input slice file.
INPUT_KEY = "input"


class InferError(RuntimeError):
    """The job cannot run as asked; the message says why."""


@dataclass(frozen=True)
class InferSettings:
    """The values that decide a patient's output; stored in each file to detect stale results."""

    checkpoint: str
    noise_level: int
    guidance_scale: float
    stride: int
    map_kind: str
    weights: str = ""  # digest of the weight files: a checkpoint overwritten in place is stale
    threshold: float | None = None  # τ of the chosen map (calibrated on the tune split)
    # τ of every method, for Dice@τ; not part of the stamp (scores are recomputed every run).
    thresholds: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def method(self) -> str:
        """The chosen map's method name (``igconda_<kind>``)."""
        return igconda_method(self.map_kind)

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "noise_level": self.noise_level,
                "guidance_scale": self.guidance_scale, "stride": self.stride,
                "map_kind": self.map_kind, "threshold": self.threshold, "weights": self.weights}


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 (first 16 hex digits) of the checkpoint's weight files."""
    from igconda.checkpoint import EMA_FILE, MODEL_FILE

    digest = hashlib.sha256()
    for name in (MODEL_FILE, EMA_FILE):
        path = checkpoint / name
        if path.is_file():
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def input_digest(path: Path) -> str:
    """SHA-256 (first 16 hex digits) of one patient's input slice file: the data version of
    that patient's output.

    Per patient rather than the whole dataset's version (``dataset.json``), so that
    re-preprocessing a cohort with one patient added, dropped or changed recomputes only the
    patients whose slices changed; any change to the slices (new scan, other preprocessing
    settings) changes the file and so the digest.
    """
    return file_digest(path)


def _stamp(settings: InferSettings, data_digest: str) -> dict[str, Any]:
    return {**settings.as_dict(), INPUT_KEY: data_digest}


def list_patients(data: Path, split: str) -> dict[str, Path]:
    """``{patient_id: input Parquet file}`` of one split (one file per patient, CONTRACTS.md)."""
    folder = Path(split_path(data, split))
    if not folder.is_dir():
        raise InferError(f"{folder}: no '{split}' split in the data folder {data}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise InferError(f"{folder}: no Parquet files")
    return {f.stem: f for f in files}


def check_has_unhealthy(files: dict[str, Path], split: str) -> None:
    """Refuse, before any prediction, a split with no unhealthy slice: its scores (computed on
    unhealthy slices only) would be empty, and the job would fail only after its predictions.

    Args:
        files: ``{patient_id: input Parquet file}`` (:func:`list_patients`).
        split: the split's name, for the message.

    Raises:
        InferError: naming the split's folder, its slice count and the fix.
    """
    import pyarrow.compute as pc

    from igconda.data.schema import UNHEALTHY

    slices = unhealthy = 0
    for path in files.values():
        labels = pq.read_table(path, columns=["label"])["label"]
        slices += len(labels)
        unhealthy += int(pc.sum(pc.equal(labels, UNHEALTHY)).as_py() or 0)
    if not unhealthy:
        folder = next(iter(files.values())).parent
        raise InferError(f"{folder}: split '{split}' has no unhealthy (lesion) slice to score "
                         f"({slices} slices, all healthy); run on a split with lesions (--split) "
                         f"or preprocess again so that patients with lesions land in it")


def output_is_complete(path: Path, expected_rows: int, settings: InferSettings,
                       data_digest: str = "") -> bool:
    """True if ``path`` holds ``expected_rows`` rows made with exactly ``settings`` from the
    input whose :func:`input_digest` is ``data_digest``."""
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
        stored = json.loads((meta.metadata or {}).get(SETTINGS_KEY, b"{}"))
    except Exception:  # a truncated or foreign file is simply recomputed
        return False
    return meta.num_rows == expected_rows and stored == _stamp(settings, data_digest)


def write_patient(columns: dict[str, np.ndarray], path: Path, settings: InferSettings,
                  data_digest: str = "") -> None:
    """Write one patient's predicted rows (sorted by slice) atomically (temp file + rename),
    stamped with ``settings`` and the :func:`input_digest` of the patient's input.

    Columns of :data:`~igconda.data.schema.PREDICTION_SCHEMA` are cast to it; any others are
    kept as they come.
    """
    order = np.argsort(columns["slice_index"], kind="stable")
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values)[order] if not isinstance(values, list) else [values[i] for i in order]
        if name in ("anomaly_map", "counterfactual", "counterfactual_w0", "image", "mask"):
            arrays[name] = encode_images(values, np.uint8 if name == "mask" else np.float32)
        elif name in PREDICTION_SCHEMA.names:
            arrays[name] = pa.array(values).cast(PREDICTION_SCHEMA.field(name).type)
        else:
            arrays[name] = pa.array(values)
    table = pa.table(arrays).replace_schema_metadata(
        {SETTINGS_KEY: json.dumps(_stamp(settings, data_digest))})
    validate_predictions(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A ".tmp" suffix keeps a half-written file out of "*.parquet" globs (resume, the report).
    atomic_write(path, lambda tmp: pq.write_table(table, tmp), suffix=".tmp")


def _slice_rows(batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, Any]:
    return {k: (v[index] if isinstance(v, np.ndarray) else [v[i] for i in index]) for k, v in batch.items()}


def _concat(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if all(isinstance(v, np.ndarray) and v.dtype != object for v in values):
            out[key] = np.concatenate(values)
        else:
            out[key] = [x for v in values for x in v]
    return out


def prune_outputs(output: Path, patients: set[str]) -> list[str]:
    """Remove the prediction files and anomaly volumes of patients not in ``patients``.

    The output folder holds one split's results: a patient dropped from the split (by
    re-preprocessing, or a cohort removed from the manifest) must not stay in ``slices/``, where
    the report and ``igconda`` readers glob every file, nor in ``volumes/``. Returns the removed
    paths (relative to ``output``).
    """
    layout, removed = InferOutput(output), []
    for files in (layout.predictions(), layout.volume_files()):
        for pid, path in files.items():
            if pid not in patients:
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(layout.root)))
    return removed
