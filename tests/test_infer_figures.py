"""The inference figures are drawn from the prediction files alone (no second read of the inputs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from igconda.data.schema import PREDICTION_SCHEMA, UNHEALTHY, encode_images
from ray_jobs.infer_outputs import make_figures

H = W = 8


def _prediction_file(path, pid: str, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((n, H, W), dtype=np.float32)
    masks = (images > 0.7).astype(np.uint8)
    columns = {
        "patient_id": [pid] * n, "cohort": ["lung"] * n, "tracer": ["FDG"] * n,
        "role": ["internal"] * n, "slice_index": list(range(n)), "num_slices": [n] * n,
        "label": [UNHEALTHY] * n, "lesion_pixels": masks.reshape(n, -1).sum(1).tolist(),
        "height": [H] * n, "width": [W] * n,
        "image": encode_images(images), "mask": encode_images(masks, np.uint8),
        "counterfactual": encode_images(images * 0.5), "counterfactual_w0": encode_images(images * 0.9),
        "anomaly_map": encode_images(np.clip(images - 0.5, 0, 1)),
    }
    pq.write_table(pa.table(columns, schema=PREDICTION_SCHEMA), path)


def test_qualitative_figures_need_only_the_prediction_files(tmp_path):
    pid = "P1"
    _prediction_file(tmp_path / f"{pid}.parquet", pid)
    per_slice = pd.DataFrame({
        "method": "igconda_abs", "cohort": "lung", "patient_id": pid, "slice_index": [0, 1, 2],
        "lesion_pixels": [5, 9, 2], "dsc_max": [0.5, 0.6, 0.2], "tau": 0.3, "tau_star": 0.2,
        "dice_tau": [0.4, 0.5, 0.1]})
    errors = make_figures({pid: tmp_path / f"{pid}.parquet"}, per_slice, tmp_path / "figures",
                          "igconda_abs")
    assert "qualitative_lung" not in errors, errors
    png = tmp_path / "figures" / "qualitative_lung.png"
    assert png.read_bytes().startswith(b"\x89PNG")
