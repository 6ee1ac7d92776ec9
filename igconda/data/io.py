"""Data on disk: the one owner of where a dataset's and an inference run's files live, and the
filesystem helpers every stage reads them through (local paths, NFS mounts and pyarrow URIs such
as ``s3://`` alike). No Ray. A dataset's layout (``docs/CONTRACTS.md``)::

    <data>/slices/<split>/<patient_id>.parquet   rows = igconda.data.schema.SLICE_SCHEMA
    <data>/splits.csv                            patient_id,cohort,tracer,role,split
    <data>/rejects.csv                           rejected manifest rows, file, problem
    <data>/dataset.json                          counts, config, versions (written last)

The inference output's layout is :class:`InferOutput`; a study folder's and the tuning
output's are :mod:`igconda.data.study_layout`'s. Nothing else spells them:
``tests/test_layout_owner.py`` scans the library, the jobs, the tuning and the benchmarks for a
second spelling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from igconda.data.schema import HEALTHY, SLICE_SCHEMA, SPLITS, UNHEALTHY, validate_predictions


class DatasetError(ValueError):
    """A preprocessed dataset folder is missing, incomplete or does not have the split asked."""


def join_path(root: str | Path, *parts: str) -> str:
    """``root/part/...`` with ``/`` for local paths and URIs alike (``s3://b/x`` + ``y`` gives
    ``s3://b/x/y``; :class:`pathlib.Path` would fold the ``//`` of a URI)."""
    return "/".join([str(root).rstrip("/"), *parts])


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a pyarrow-filesystem URI.

    A URI (``s3://bucket/key``, ``gs://``, ``file://``) goes through
    ``pyarrow.fs.FileSystem.from_uri``; a plain path is resolved to an absolute local one.
    """
    uri = str(uri)
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def path_exists(uri: str | Path, want_dir: bool = False) -> bool:
    """True if ``uri`` (local path or URI) is a file, or with ``want_dir`` a folder."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return info.type == (pafs.FileType.Directory if want_dir else pafs.FileType.File)


def tree_bytes(uri: str | Path) -> int:
    """Total size in bytes of the files under a folder (local path or URI), recursively."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(info.size or 0 for info in infos if info.type == pafs.FileType.File)


def slices_root(data_dir: str | Path) -> str:
    """The folder of every split of a dataset: ``<data_dir>/slices`` (paths and URIs alike)."""
    return join_path(data_dir, "slices")


def is_local_dataset(data_dir: str | Path) -> bool:
    """True if ``data_dir`` is a local folder with a dataset's ``slices/`` (what MLflow's
    dataset logging reads); False for a URI, which is not looked up."""
    return "://" not in str(data_dir) and Path(slices_root(data_dir)).is_dir()


def split_path(data_dir: str | Path, split: str) -> str:
    """Folder holding one split's Parquet files: ``<data_dir>/slices/<split>``.

    Works for local paths and URIs (``s3://bucket/data``) alike, for ``ray.data.read_parquet``.

    Raises:
        DatasetError: for a split name other than train / valid / tune / test.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return join_path(slices_root(data_dir), split)


#: A dataset's summary file, written last: its presence marks the dataset complete.
DATASET_INFO = "dataset.json"


def dataset_info_path(data_dir: str | Path) -> str:
    """``<data_dir>/dataset.json`` (paths and URIs alike)."""
    return join_path(data_dir, DATASET_INFO)


#: A prediction file's and an anomaly volume's name after the patient id.
PREDICTION_SUFFIX, VOLUME_SUFFIX = ".parquet", "_anomaly.nii.gz"
#: The inference summary's file name (:attr:`InferOutput.summary`), the stage's done mark.
INFER_SUMMARY = "summary.json"


@dataclass(frozen=True)
class FolderLayout:
    """A layout rooted at one folder (``root``: any path-like, kept as a :class:`~pathlib.Path`);
    the stages' layouts below and in :mod:`igconda.data.study_layout` add its files."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class InferOutput(FolderLayout):
    """The batch-inference output folder (``ray_jobs.infer --output``), a local path::

        slices/<patient_id>.parquet            one file per patient, PREDICTION_SCHEMA rows
        slices/.parts/<patient_id>/            parts of the patients in flight (removed when merged)
        tables/methods.{csv,md}                every method per cohort; per_slice_metrics.csv,
                                               per_cohort.*, baselines_per_cohort.* beside it
        scores/<method>/                       one method run's files per method
        figures/*.png                          qualitative_<cohort>.png, lesion_size.png
        volumes/<patient_id>_anomaly.nii.gz    anomaly map on the original scan's grid
        scored/<patient_id>.parquet            every method's scores of the patient, kept for re-runs
        summary.json                           settings, counts, timings (the stage's done mark)
    """

    @property
    def slices(self) -> Path:
        """Folder of the per-patient prediction files."""
        return self.root / "slices"

    @property
    def parts(self) -> Path:
        """Hidden folder (below the ``*.parquet`` glob) where the predictor actors write the parts
        of the patients in flight, merged into each patient's file once all are in."""
        return self.slices / ".parts"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def scores(self) -> Path:
        """Folder of one method run's files per method (``igconda.baselines.scoring``)."""
        return self.root / "scores"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def summary(self) -> Path:
        return self.root / INFER_SUMMARY

    @property
    def methods_csv(self) -> Path:
        """Every method's per-cohort summary; its presence marks the tables written."""
        return self.tables / "methods.csv"

    @property
    def per_slice_metrics_csv(self) -> Path:
        """Every unhealthy slice's metrics for every method (``SCORE_SCHEMA``)."""
        return self.tables / "per_slice_metrics.csv"

    def prediction(self, patient_id: str) -> Path:
        """One patient's prediction file."""
        return self.slices / f"{patient_id}{PREDICTION_SUFFIX}"

    def volume(self, patient_id: str) -> Path:
        """One patient's anomaly volume (NIfTI)."""
        return self.volumes / f"{patient_id}{VOLUME_SUFFIX}"

    @property
    def scored(self) -> Path:
        """Folder of the per-patient scores a re-run reuses (``ray_jobs.infer_scores``)."""
        return self.root / "scored"

    def patient_scores(self, patient_id: str) -> Path:
        """One patient's scores of every method (``SCORE_SCHEMA`` rows)."""
        return self.scored / f"{patient_id}{PREDICTION_SUFFIX}"

    def predictions(self) -> dict[str, Path]:
        """{patient id: prediction file} of every finished file, sorted (a half-written file
        has a ``.tmp`` suffix and is not listed)."""
        return _by_patient(self.slices, PREDICTION_SUFFIX)

    def volume_files(self) -> dict[str, Path]:
        """{patient id: anomaly volume} of every volume written."""
        return _by_patient(self.volumes, VOLUME_SUFFIX)

    def scored_files(self) -> dict[str, Path]:
        """{patient id: scores file} of every patient scored."""
        return _by_patient(self.scored, PREDICTION_SUFFIX)

def read_predictions(path: str | Path, columns: list[str] | None = None,
                     filters: Any = None) -> pa.Table:
    """One prediction file (:meth:`InferOutput.prediction`), checked against
    :data:`~igconda.data.schema.PREDICTION_SCHEMA` (the columns read) before use.

    Args:
        path: the file.
        columns: a subset of the schema's columns (default: every column in the file).
        filters: ``pyarrow.parquet.read_table`` row filters, e.g. ``[("slice_index", "=", 3)]``.

    Raises:
        ValueError: naming the file, when a column is missing or of another type.
    """
    table = pq.read_table(path, columns=columns, filters=filters)
    try:
        validate_predictions(table, columns)
    except ValueError as err:
        raise ValueError(f"{path}: {err}; run the inference again into an empty folder") from None
    return table


def _by_patient(folder: Path, suffix: str) -> dict[str, Path]:
    return {path.name[:-len(suffix)]: path for path in sorted(folder.glob(f"*{suffix}"))}


def read_split(data_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """Read every slice of one split into one table.

    Args:
        data_dir: dataset folder written by ``ray_jobs.preprocess``.
        split: ``train``, ``valid``, ``tune`` or ``test``.
        columns: subset of :data:`SLICE_SCHEMA` names (default: all).

    Returns:
        pyarrow.Table with :data:`SLICE_SCHEMA` (or the chosen columns), rows ordered by file
        name (patient id) then slice index. A split with no patients gives an empty table.

    Raises:
        DatasetError: the folder is not a complete dataset, or a column name is unknown.
    """
    root = Path(str(data_dir))
    if "://" not in str(data_dir) and not (root / DATASET_INFO).is_file():
        raise DatasetError(f"{data_dir}: not a complete igconda dataset (no dataset.json); "
                           f"run `python -m ray_jobs.preprocess` first")
    if columns is not None:
        unknown = [c for c in columns if c not in SLICE_SCHEMA.names]
        if unknown:
            raise DatasetError(f"unknown column(s) {', '.join(unknown)}")
    schema = SLICE_SCHEMA if columns is None else pa.schema([SLICE_SCHEMA.field(c) for c in columns])
    path = split_path(data_dir, split)
    if "://" not in path and not Path(path).is_dir():
        return schema.empty_table()
    dataset = pads.dataset(path, format="parquet", schema=SLICE_SCHEMA)
    files = sorted(dataset.files)
    if not files:
        return schema.empty_table()
    dataset = pads.dataset(files, format="parquet", schema=SLICE_SCHEMA, filesystem=dataset.filesystem)
    return dataset.to_table(columns=columns)


def read_dataset_info(data_dir: str | Path) -> dict[str, Any]:
    """The ``dataset.json`` summary of a dataset folder (local path or pyarrow URI, e.g. s3://).

    Raises:
        DatasetError: if it is missing (the dataset is incomplete or was never written).
    """
    fs, root = filesystem(data_dir)
    path = join_path(root, DATASET_INFO)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise DatasetError(f"{data_dir}: not a complete igconda dataset (no dataset.json)")
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def check_training_classes(counts: dict[int, int], split_dir: str) -> None:
    """Refuse a training split without healthy or without unhealthy slices.

    The class-conditional model learns the guidance direction from both classes; trained on one
    it would run to the end and give anomaly maps that mean nothing. Preprocessing only warns
    (a cohort may lack lesion slices in a split: ``dataset.json``'s ``warnings``).

    Args:
        counts: slices per schema label in the split (``ray_jobs.train_runs.label_counts``).
        split_dir: the split's folder, for the message.

    Raises:
        DatasetError: naming the folder, the counts and the fix.
    """
    healthy, unhealthy = counts.get(HEALTHY, 0), counts.get(UNHEALTHY, 0)
    if healthy and unhealthy:
        return
    missing = "unhealthy (lesion)" if healthy else "healthy" if unhealthy else "any"
    raise DatasetError(
        f"{split_dir}: the train split has no {missing} slice ({healthy} healthy, {unhealthy} "
        f"unhealthy); a class-conditional model needs both classes. Add patients with lesions "
        f"(and without), or preprocess again with another preprocess.seed or train_fraction so "
        f"that both land in train (dataset.json lists the cohorts without a lesion slice per split)")
