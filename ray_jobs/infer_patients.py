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
import shutil
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


def prediction_table(columns: dict[str, Any]) -> pa.Table:
    """Predicted rows (one patient's, or a batch's rows of one patient) as a table sorted by slice.

    Args:
        columns: ``{name: values}`` of N rows as the predictor returns them; image-like columns
            (``anomaly_map``, ``counterfactual``, ``counterfactual_w0``, ``image``, ``mask``)
            hold N flattened H*W arrays.

    Returns:
        N rows; columns of :data:`~igconda.data.schema.PREDICTION_SCHEMA` cast to it (images
        as lists of float32, the mask of uint8), any others kept as they come.
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
    return pa.table(arrays)


def write_prediction_file(tables: list[pa.Table], path: Path, settings: InferSettings,
                          data_digest: str = "") -> None:
    """Write one patient's rows, given as one or more :func:`prediction_table` s, as its
    prediction file: sorted by slice, validated, stamped with ``settings`` and the
    :func:`input_digest` of the patient's input, atomically (temp file + rename)."""
    table = pa.concat_tables(tables, promote_options="default").sort_by("slice_index")
    table = table.combine_chunks().replace_schema_metadata(
        {SETTINGS_KEY: json.dumps(_stamp(settings, data_digest))})
    validate_predictions(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A ".tmp" suffix keeps a half-written file out of "*.parquet" globs (resume, the report).
    atomic_write(path, lambda tmp: pq.write_table(table, tmp), suffix=".tmp")


def write_patient(columns: dict[str, np.ndarray], path: Path, settings: InferSettings,
                  data_digest: str = "") -> None:
    """Write one patient's predicted rows (:func:`prediction_table`) as its prediction file
    (:func:`write_prediction_file`)."""
    write_prediction_file([prediction_table(columns)], path, settings, data_digest)


def _slice_rows(batch: dict[str, Any], index: np.ndarray) -> dict[str, Any]:
    return {k: (v[index] if isinstance(v, np.ndarray) else [v[i] for i in index]) for k, v in batch.items()}


def write_parts(batch: dict[str, np.ndarray], parts: Path) -> dict[str, np.ndarray]:
    """Write a predicted batch as one part file per patient; return one small record per part.

    Runs where the batch was predicted (:class:`PartWriter`), so that predictions never travel
    to the driver: it gets the records, counts each patient's slices and has the parts merged
    (:func:`merge_parts`) once they are all in. A part is ``<parts>/<patient_id>/<first>-<last>.parquet``
    (its first and last slice index): a batch that Ray Data retries (its actor or node lost)
    writes the same rows under the same name again, atomically, so a patient's parts never
    hold a slice twice.

    Args:
        batch: the predictor's output, N rows of one or more patients.
        parts: the folder of parts (:attr:`igconda.data.io.InferOutput.parts`).

    Returns:
        Columns ``patient_id`` (str), ``slices`` (int64, rows in the part) and ``part`` (str,
        its path), one row per patient in the batch.
    """
    ids = np.asarray(batch["patient_id"]).astype(str)
    records: dict[str, list] = {"patient_id": [], "slices": [], "part": []}
    for pid in np.unique(ids):
        table = prediction_table(_slice_rows(batch, np.flatnonzero(ids == pid)))
        first, last = table["slice_index"][0].as_py(), table["slice_index"][-1].as_py()
        path = parts / pid / f"{first}-{last}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, t=table: pq.write_table(t, tmp), suffix=".tmp")
        records["patient_id"].append(pid)
        records["slices"].append(table.num_rows)
        records["part"].append(str(path))
    return {"patient_id": np.array(records["patient_id"], dtype=object),
            "slices": np.array(records["slices"], dtype=np.int64),
            "part": np.array(records["part"], dtype=object)}


class PartWriter:
    """Ray Data callable class: :class:`~igconda.inference.CounterfactualPredictor` on a batch,
    then :func:`write_parts` in the same actor; returns only the parts' small records."""

    def __init__(self, parts: str, torch_threads: int = 0, **predictor: Any) -> None:
        import torch

        from igconda.inference import CounterfactualPredictor

        if torch_threads > 0:  # infer.torch_threads; 0 keeps Ray's one thread per reserved CPU
            torch.set_num_threads(torch_threads)
        self.parts = Path(parts)
        self.predict = CounterfactualPredictor(**predictor)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_parts(self.predict(batch), self.parts)


def merge_parts(parts: list[str], path: Path, expected_rows: int, settings: InferSettings,
                data_digest: str = "") -> int:
    """Write a patient's prediction file from its parts (:func:`write_prediction_file`), then
    remove the parts; returns the rows written.

    Idempotent, so a retried call (the task's node lost after it wrote the file) succeeds: with
    the parts gone and the file complete (:func:`output_is_complete`), it writes nothing.

    Raises:
        InferError: the parts hold another number of rows than ``expected_rows``, or some are
            gone without a complete file.
    """
    files = [Path(p) for p in parts]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        if output_is_complete(path, expected_rows, settings, data_digest):
            return expected_rows
        raise InferError(f"{path.stem}: part file(s) {missing} are gone and {path} is not "
                         f"complete; is the output folder shared by every node? Re-run the job")
    tables = [pq.read_table(f) for f in files]
    rows = sum(t.num_rows for t in tables)
    if rows != expected_rows:
        raise InferError(f"{path.stem}: its parts under {files[0].parent} hold {rows} slices, "
                         f"expected {expected_rows}")
    write_prediction_file(tables, path, settings, data_digest)
    shutil.rmtree(files[0].parent, ignore_errors=True)
    return rows


def prune_outputs(output: Path, patients: set[str]) -> list[str]:
    """Remove the prediction files and anomaly volumes of patients not in ``patients``.

    The output folder holds one split's results: a patient dropped from the split (by
    re-preprocessing, or a cohort removed from the manifest) must not stay in ``slices/``, where
    the report and ``igconda`` readers glob every file, nor in ``volumes/`` or ``scored/``. Returns the removed
    paths (relative to ``output``).
    """
    layout, removed = InferOutput(output), []
    for files in (layout.predictions(), layout.volume_files(), layout.scored_files()):
        for pid, path in files.items():
            if pid not in patients:
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(layout.root)))
    return removed
