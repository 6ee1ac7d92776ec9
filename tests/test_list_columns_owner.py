"""One owner for the image-like list columns: ``igconda.data.schema``.

``encode_images`` is the one encoder of the ``list<...>`` image, mask and map columns,
``stack_images`` the one decoder (with its H·W check), ``slice_shape_of`` the one check that a set
of slices has one height and width; the prediction schema is declared beside the slice schema and
a prediction file is checked against it when read (``igconda.data.io.read_predictions``). A second
encoder, decoder or size check in the library, the jobs, the tuning or the benchmarks fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igconda.data import schema
from igconda.data.io import read_predictions

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("igconda", "ray_jobs", "tuning", "benchmarks")
OWNER = ROOT / "igconda" / "data" / "schema.py"


def _mentions(node: ast.AST, value: str) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == value for n in ast.walk(node))


def _second_copies(path: Path) -> list[int]:
    """Lines that encode a list column (``FixedSizeListArray``), decode one by hand
    (``.flatten().to_numpy()``), or read a slice size without the one-size check
    (``x["height"][0]``, ``np.unique(x["height"])``, ``set(x["height"]...)``)."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "FixedSizeListArray":
            lines.add(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "to_numpy" \
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) \
                and node.value.func.attr == "flatten":
            lines.add(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and node.slice.value == 0 and _mentions(node.value, "height"):
            lines.add(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("unique", "set") and node.args and _mentions(node.args[0], "height"):
            lines.add(node.lineno)
    return sorted(lines)


def test_one_encoder_one_decoder_one_size_check():
    found = {str(p.relative_to(ROOT)): lines for package in PACKAGES
             for p in sorted((ROOT / package).rglob("*.py")) if p != OWNER
             if (lines := _second_copies(p))}
    assert found == {}


def test_the_scan_finds_each_copy(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('a = pa.FixedSizeListArray.from_arrays(x, 4)\nb = col.flatten().to_numpy()\n'
                   'c = int(t["height"][0])\nd = t.column("height")[0].as_py()\n'
                   'e = np.unique(t["height"].to_numpy())\nf = set(t["height"].to_pylist())\n'
                   'g = schema.slice_shape_of(t["height"], t["width"])\n')
    assert _second_copies(bad) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("form", ["arrow", "chunked", "object", "2d", "3d", "list"])
def test_encode_then_decode_every_form(form):
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    column = schema.encode_images(images)
    assert column.type == pa.list_(pa.float32())
    given = {"arrow": column, "chunked": pa.chunked_array([column[:1], column[1:]]),
             "object": np.array([r.ravel() for r in images] + [None], dtype=object)[:2],
             "2d": images.reshape(2, -1), "3d": images, "list": [r.ravel() for r in images]}[form]
    assert np.array_equal(schema.stack_images(given, 3, 4), images)


@pytest.mark.parametrize("column", [schema.encode_images(np.zeros((2, 12), np.float32)),
                                    np.zeros((2, 12), np.float32),
                                    np.array([np.zeros(12), np.zeros(12)], dtype=object)])
def test_decode_refuses_another_size(column):
    with pytest.raises(ValueError, match="as slices of 4×4"):
        schema.stack_images(column, 4, 4)


def test_mask_encoding_keeps_its_type_and_empty_columns_decode():
    assert schema.encode_images(np.ones((1, 2, 2), np.uint8), np.uint8).type == pa.list_(pa.uint8())
    assert schema.encode_images(np.zeros((0, 4), np.float32)).type == pa.list_(pa.float32())
    assert schema.stack_images(schema.encode_images([]), 2, 2).shape == (0, 2, 2)
    assert schema.stack_images(np.zeros(0, dtype=object), 2, 2).shape == (0, 2, 2)


def test_slice_shape_of_refuses_mixed_or_no_sizes():
    assert schema.slice_shape_of(pa.array([4, 4], pa.int32()), np.array([5, 5])) == (4, 5)
    with pytest.raises(ValueError, match="mixes slice sizes"):
        schema.slice_shape_of([4, 8], [4, 4])
    with pytest.raises(ValueError, match="no slices"):
        schema.slice_shape_of([], [])


def test_prediction_files_are_checked_when_read(tmp_path):
    good = {f.name: pa.array([], f.type) for f in schema.PREDICTION_SCHEMA}
    path = tmp_path / "P.parquet"
    pq.write_table(pa.table(good), path)
    assert read_predictions(path).num_rows == 0
    assert read_predictions(path, columns=["slice_index", "anomaly_map"]).column_names == [
        "slice_index", "anomaly_map"]
    bad = {**good, "anomaly_map": pa.array([], pa.list_(pa.float64()))}
    pq.write_table(pa.table(bad), path)
    with pytest.raises(ValueError, match=r"P\.parquet.*anomaly_map"):
        read_predictions(path, columns=["anomaly_map"])
