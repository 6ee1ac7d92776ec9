"""The one Parquet slice schema: every stage reads and writes slices through this module.

One row is one axial slice of one preprocessed volume. Images are stored flattened so that the
files stay readable by plain pyarrow and pandas without Ray or extension types:

=================  ==================  ==========================================================
column             type                meaning
=================  ==================  ==========================================================
patient_id         string              unique per study
cohort             string              e.g. ``lymphoma``, ``sts``
tracer             string              e.g. ``FDG``, ``PSMA``
role               string              ``internal`` | ``external`` | ``negative_control``
slice_index        int32               z index in the preprocessed volume (0 = inferior)
num_slices         int32               preprocessed volume depth
label              int8                1 healthy (no mask pixel), 2 unhealthy
height, width      int32               slice shape H, W
image              list<float32>       H·W values of the min–max scaled PET, row-major, in [0, 1]
mask               list<uint8>         H·W lesion mask values in {0, 1}
lesion_pixels      int32               number of mask pixels in this slice
suv_max            float32             SUVmax of the whole original volume (paper's 41 % rule)
scale_min          float32             SUV that maps to 0 (min of the resampled volume)
scale_max          float32             SUV that maps to 1 (max of the resampled volume)
pet_path           string              the source PET file, as given in the manifest (resolved)
geometry           string (JSON)       see :data:`GEOMETRY_KEYS`; identical for a volume's slices
=================  ==================  ==========================================================

``image * (scale_max - scale_min) + scale_min`` recovers SUV on the preprocessed grid.
A slice's split is the folder its file is in (``<data>/slices/<split>/``,
:func:`igconda.data.io.split_path`), decided once by the build: the rows carry no ``split``
column (files written by earlier versions do, and still read: :func:`validate_table`).
Axis convention: a preprocessed volume is a (X, Y, Z) array in RAS+ orientation; a slice is
``volume[:, :, slice_index]`` of shape (H=X, W=Y).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "valid", "tune", "test")
ROLES = ("internal", "external", "negative_control")
HEALTHY, UNHEALTHY = 1, 2


def healthy_per_unhealthy(counts: dict[int, int]) -> float | None:
    """n_healthy / n_unhealthy of a split's slices per label, the ratio class balancing uses
    (oversampling and loss weights alike); None when either class is absent."""
    healthy, unhealthy = counts.get(HEALTHY, 0), counts.get(UNHEALTHY, 0)
    return healthy / unhealthy if healthy and unhealthy else None


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """(N,) probabilities for drawing slices i.i.d. so that each class comes with probability 1/2:
    an unhealthy slice weighs :func:`healthy_per_unhealthy` healthy ones, the per-draw form of the
    training job's oversampling (``ray_jobs.train_runs.oversample_unhealthy``). Uniform when a
    class is absent.

    Args:
        labels: (N,) schema labels (:data:`HEALTHY`, :data:`UNHEALTHY`).
    """
    labels = np.asarray(labels)
    ratio = healthy_per_unhealthy({HEALTHY: int((labels == HEALTHY).sum()),
                                   UNHEALTHY: int((labels == UNHEALTHY).sum())})
    weights = np.where(labels == UNHEALTHY, ratio or 1.0, 1.0)
    return weights / weights.sum()

#: Keys of the ``geometry`` JSON: enough to map a slice back into the original scan.
#: ``output_affine`` is the 4×4 voxel→world (RAS, mm) affine of the preprocessed (X, Y, Z)
#: volume; ``original_affine``/``original_shape`` describe the source NIfTI grid.
GEOMETRY_KEYS = ("original_shape", "original_affine", "output_affine", "output_shape")

SLICE_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("cohort", pa.string()),
        ("tracer", pa.string()),
        ("role", pa.string()),
        ("slice_index", pa.int32()),
        ("num_slices", pa.int32()),
        ("label", pa.int8()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.list_(pa.float32())),
        ("mask", pa.list_(pa.uint8())),
        ("lesion_pixels", pa.int32()),
        ("suv_max", pa.float32()),
        ("scale_min", pa.float32()),
        ("scale_max", pa.float32()),
        ("pet_path", pa.string()),
        ("geometry", pa.string()),
    ]
)


def encode_geometry(geometry: dict[str, Any]) -> str:
    """JSON-encode a geometry dict (numpy arrays become nested lists)."""
    missing = set(GEOMETRY_KEYS) - set(geometry)
    if missing:
        raise ValueError(f"geometry is missing keys {sorted(missing)}")
    return json.dumps({k: np.asarray(v).tolist() for k, v in geometry.items()})


def decode_geometry(text: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_geometry`; affines come back as (4, 4) float64 arrays."""
    raw = json.loads(text)
    return {k: np.asarray(v, dtype=np.float64 if "affine" in k else np.int64) for k, v in raw.items()}


def slice_shape_of(heights: Any, widths: Any) -> tuple[int, int]:
    """The one (H, W) of a set of slices, from their ``height`` and ``width`` columns (pyarrow
    arrays or numpy/sequence alike): the one place a mix of slice sizes is refused.

    Raises:
        ValueError: for no slices, or slices of more than one size.
    """
    def values(column: Any) -> np.ndarray:
        if isinstance(column, (pa.ChunkedArray, pa.Array)):
            column = column.to_numpy(zero_copy_only=False)
        return np.unique(np.asarray(column))

    hs, ws = values(heights), values(widths)
    if len(hs) == 0 or len(ws) == 0:
        raise ValueError("no slices: their height/width columns are empty")
    if len(hs) != 1 or len(ws) != 1:
        raise ValueError(f"a set of slices mixes slice sizes: heights {hs.tolist()}, widths {ws.tolist()}; "
                         "preprocess every volume to the same preprocess.output_size")
    return int(hs[0]), int(ws[0])


def encode_images(images: Any, dtype: Any = np.float32) -> pa.Array:
    """N images → a ``list<dtype>`` column of N rows of H·W row-major values (the one encoder of
    the slice and prediction schemas' image-like columns).

    Args:
        images: an (N, H, W) or (N, H·W) array, or a sequence of N arrays of one size.
        dtype: numpy dtype of the values (``float32`` for images and maps, ``uint8`` for masks).
    """
    list_type = pa.list_(pa.from_numpy_dtype(dtype))
    if len(images) == 0:
        return pa.array([], type=list_type)
    if isinstance(images, np.ndarray) and images.dtype != object:
        flat = images.reshape(len(images), -1)
    else:
        flat = np.stack([np.asarray(v, dtype).ravel() for v in images])
    flat = np.ascontiguousarray(flat, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]).cast(list_type)


def stack_images(column: Any, height: int, width: int, dtype: Any = np.float32) -> np.ndarray:
    """An image-like list column → (N, H, W) (the one decoder, inverse of :func:`encode_images`).

    Takes the column as pyarrow hands it over (``Array``/``ChunkedArray``: a zero-copy view where
    the types allow, so copy before writing to it) or as a numpy batch does: an object array of
    1D arrays, a 2D (N, H·W) array when the lists have a fixed size (Ray Data), an (N, H, W)
    array, or a pandas/list sequence of arrays.

    Raises:
        ValueError: if a row does not hold H·W values.
    """
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != height * width or lengths.max() != height * width):
            raise ValueError(f"cannot read an image column with rows of {sorted(set(lengths.tolist()))} "
                             f"values as slices of {height}×{width}")
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.astype(dtype, copy=False).reshape(-1, height, width)
    array = column if isinstance(column, np.ndarray) else np.asarray(list(column), dtype=object)
    if len(array) == 0:
        return np.zeros((0, height, width), dtype=dtype)
    if array.dtype == object:
        rows = [np.asarray(v, dtype=dtype).reshape(-1) for v in array]
        if any(r.size != height * width for r in rows):
            raise ValueError(f"cannot read an image column with rows of {sorted({r.size for r in rows})} "
                             f"values as slices of {height}×{width}")
        array = np.stack(rows)
    array = np.asarray(array, dtype=dtype)
    if array.ndim == 2 and array.shape[1] == height * width:
        return array.reshape(-1, height, width)
    if array.ndim == 3 and array.shape[1:] == (height, width):
        return array
    raise ValueError(f"cannot read an image column of shape {array.shape} as slices of {height}×{width}")


def volume_to_rows(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    patient_id: str,
    cohort: str,
    tracer: str,
    role: str,
    suv_max: float,
    scale_min: float,
    scale_max: float,
    pet_path: str,
    geometry: dict[str, Any],
) -> pa.Table:
    """Slice a preprocessed (X, Y, Z) volume and its mask into a table of :data:`SLICE_SCHEMA`."""
    if image.ndim != 3 or image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be the same 3D shape")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    h, w, depth = image.shape
    slices = np.ascontiguousarray(np.moveaxis(image.astype(np.float32), 2, 0)).reshape(depth, h * w)
    masks = np.ascontiguousarray(np.moveaxis((mask > 0).astype(np.uint8), 2, 0)).reshape(depth, h * w)
    lesion = masks.sum(axis=1).astype(np.int32)
    geo = encode_geometry(geometry)
    n = depth

    def rep(value: Any) -> list:
        return [value] * n

    columns = {
        "patient_id": rep(patient_id),
        "cohort": rep(cohort),
        "tracer": rep(tracer),
        "role": rep(role),
        "slice_index": np.arange(n, dtype=np.int32),
        "num_slices": np.full(n, depth, dtype=np.int32),
        "label": np.where(lesion > 0, UNHEALTHY, HEALTHY).astype(np.int8),
        "height": np.full(n, h, dtype=np.int32),
        "width": np.full(n, w, dtype=np.int32),
        "image": encode_images(slices, np.float32),
        "mask": encode_images(masks, np.uint8),
        "lesion_pixels": lesion,
        "suv_max": np.full(n, suv_max, dtype=np.float32),
        "scale_min": np.full(n, scale_min, dtype=np.float32),
        "scale_max": np.full(n, scale_max, dtype=np.float32),
        "pet_path": rep(pet_path),
        "geometry": rep(geo),
    }
    return pa.table(columns, schema=SLICE_SCHEMA)


def validate_table(table: pa.Table) -> None:
    """Raise ValueError if ``table`` does not follow :data:`SLICE_SCHEMA` (names and types).

    Columns beyond the schema are allowed: files written before the split folder became the only
    record of a slice's split carry a ``split`` column, which readers ignore."""
    for f in SLICE_SCHEMA:
        if f.name not in table.schema.names:
            raise ValueError(f"slice table is missing column {f.name!r}")
        actual = table.schema.field(f.name).type
        if not actual.equals(f.type) and not (
            pa.types.is_dictionary(actual) and actual.value_type.equals(f.type)
        ):
            raise ValueError(f"column {f.name!r} has type {actual}, expected {f.type}")


# ---------------------------------------------------------------------------------------------
# Per-slice predictions and scores (written by batch inference, read by the report)
# ---------------------------------------------------------------------------------------------

#: One row per slice of the batch-inference output (``<infer>/slices/<patient_id>.parquet``):
#: the slice's identifiers, its inputs, and what IgCONDA made of it. Every map kind and the w = 0
#: control can be recomputed from ``image``, ``counterfactual`` and ``counterfactual_w0`` without
#: a network (:class:`igconda.anomaly_methods.StoredCounterfactualMethod`).
#:
#: ==================  ==============  ==========================================================
#: counterfactual      list<float32>   x̂_w, the guided (healthy) decode, H·W row-major
#: counterfactual_w0   list<float32>   x̂_∅, the unguided decode of the same encoding
#: anomaly_map         list<float32>   the chosen map kind (see the file's settings metadata)
#: ==================  ==============  ==========================================================
PREDICTION_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("cohort", pa.string()),
        ("tracer", pa.string()),
        ("role", pa.string()),
        ("slice_index", pa.int32()),
        ("num_slices", pa.int32()),
        ("label", pa.int8()),
        ("lesion_pixels", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.list_(pa.float32())),
        ("mask", pa.list_(pa.uint8())),
        ("counterfactual", pa.list_(pa.float32())),
        ("counterfactual_w0", pa.list_(pa.float32())),
        ("anomaly_map", pa.list_(pa.float32())),
    ]
)

#: One row per unhealthy slice and anomaly method (``igconda.evaluation.score_methods``; the
#: infer job's ``tables/per_slice_metrics.csv``): the paper's metrics (``igconda.metrics``) and
#: ``dice_tau``, the Dice at the method's threshold ``tau`` calibrated on the tune split.
SCORE_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("cohort", pa.string()),
        ("role", pa.string()),
        ("tracer", pa.string()),
        ("slice_index", pa.int32()),
        ("label", pa.int8()),
        ("lesion_pixels", pa.int32()),
        ("method", pa.string()),
        ("dsc_max", pa.float64()),
        ("tau_star", pa.float64()),
        ("hd95", pa.float64()),
        ("auprc", pa.float64()),
        ("n_lesions", pa.int64()),
        ("n_detected", pa.int64()),
        ("sensitivity", pa.float64()),
        ("dice_tau", pa.float64()),
        ("tau", pa.float64()),
    ]
)


def validate_predictions(table: pa.Table, columns: list[str] | None = None) -> None:
    """Raise ValueError unless ``table`` has every :data:`PREDICTION_SCHEMA` column (or every
    one of ``columns``, a subset read), typed so; other columns are allowed."""
    schema = PREDICTION_SCHEMA if columns is None else pa.schema(
        [PREDICTION_SCHEMA.field(c) for c in columns])
    _validate_against(table, schema, "prediction table")


def validate_scores(columns: Any) -> None:
    """Raise ValueError unless a score table (pyarrow Table or pandas DataFrame) has every
    :data:`SCORE_SCHEMA` column; a DataFrame's columns are checked by name and numeric kind."""
    if isinstance(columns, pa.Table):
        _validate_against(columns, SCORE_SCHEMA, "score table")
        return
    missing = [f.name for f in SCORE_SCHEMA if f.name not in columns]
    if missing:
        raise ValueError(f"score table is missing columns {missing}")
    for f in SCORE_SCHEMA:
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        if numeric and len(columns) and not np.issubdtype(np.asarray(columns[f.name]).dtype, np.number):
            raise ValueError(f"score column {f.name!r} must be numeric, got {columns[f.name].dtype}")


def _validate_against(table: pa.Table, schema: pa.Schema, what: str) -> None:
    for f in schema:
        if f.name not in table.schema.names:
            raise ValueError(f"{what} is missing column {f.name!r}")
        actual = table.schema.field(f.name).type
        if not actual.equals(f.type) and not (
            pa.types.is_dictionary(actual) and actual.value_type.equals(f.type)
        ):
            raise ValueError(f"{what}: column {f.name!r} has type {actual}, expected {f.type}")
