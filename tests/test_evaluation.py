"""igconda.evaluation: the methods behind one interface, scoring, calibration, summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from igconda import anomaly_methods as M
from igconda import evaluation as E
from igconda.data import schema
from igconda.metrics import score_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n: int = 6, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Slice columns as Ray hands them over: flat images and masks, the schema's identifiers."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.3, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n - 2):  # the last two slices are healthy
        masks[i, 3 + i: 7 + i, 4:9] = 1
    images[masks > 0] += 0.6
    return {
        "patient_id": np.array(["p1"] * (n // 2) + ["p2"] * (n - n // 2), dtype=object),
        "cohort": np.array(["lung"] * (n // 2) + ["lymphoma"] * (n - n // 2), dtype=object),
        "role": np.array(["internal"] * n, dtype=object),
        "tracer": np.array(["FDG"] * n, dtype=object),
        "slice_index": np.arange(n, dtype=np.int32),
        "label": np.where(masks.reshape(n, -1).any(1), 2, 1).astype(np.int8),
        "lesion_pixels": masks.reshape(n, -1).sum(1).astype(np.int32),
        "height": np.full(n, size, np.int32), "width": np.full(n, size, np.int32),
        "image": images.reshape(n, -1), "mask": masks.reshape(n, -1),
        "suv_max": np.full(n, 10.0, np.float32), "scale_min": np.zeros(n, np.float32),
        "scale_max": np.full(n, 10.0, np.float32),
    }


def test_every_method_turns_a_batch_into_named_maps():
    batch = _batch()
    images = batch["image"].reshape(-1, 16, 16)
    guided, unguided = 0.5 * images, 0.8 * images
    stored = dict(batch, counterfactual=guided.reshape(6, -1), counterfactual_w0=unguided.reshape(6, -1))
    methods = [M.ThresholdMethod(), M.IntensityMethod(), M.StoredCounterfactualMethod()]
    maps = {}
    for method in methods:
        out = method.maps(stored)
        assert tuple(out) == method.names
        maps.update(out)
    assert set(maps) == {"threshold_41", "intensity", "igconda_abs", "igconda_hot",
                         "igconda_guidance", "igconda_guidance_abs", "igconda_w0", "igconda_w0_hot"}
    for name, m in maps.items():
        assert m.shape == (6, 16, 16) and m.dtype == np.float32, name
        assert m.min() >= 0 and m.max() <= 1, name
    np.testing.assert_allclose(maps["intensity"], images)
    np.testing.assert_allclose(maps["threshold_41"], (images * 10 >= 4.1).astype(np.float32))
    np.testing.assert_allclose(maps["igconda_abs"], 0.5 * images, atol=1e-6)
    np.testing.assert_allclose(maps["igconda_w0"], 0.2 * images, atol=1e-6)
    np.testing.assert_allclose(maps["igconda_w0_hot"], 0.2 * images, atol=1e-6)  # x ≥ x̂_∅ here
    np.testing.assert_allclose(maps["igconda_guidance"], 0.3 * images, atol=1e-6)
    with pytest.raises(ValueError, match="suv_max"):
        M.ThresholdMethod().maps({k: v for k, v in batch.items() if k != "suv_max"})


def test_igconda_method_runs_the_pair_once_and_matches_the_stored_path(checkpoint):
    from igconda.checkpoint import load_model
    from igconda.diffusion.schedule import NoiseSchedule

    model, config = load_model(checkpoint, "cpu")
    method = M.IgCondaMethod(model, NoiseSchedule.from_config(config.train), noise_level=4,
                             stride=2, guidance_scale=3.0)
    batch = _batch()
    live = method.maps(batch)
    guided, unguided = method.counterfactuals(batch["image"].reshape(-1, 16, 16))
    stored = M.StoredCounterfactualMethod().maps(
        dict(batch, counterfactual=guided.reshape(6, -1), counterfactual_w0=unguided.reshape(6, -1)))
    assert tuple(live) == method.names == M.StoredCounterfactualMethod().names
    for name in live:
        np.testing.assert_allclose(live[name], stored[name], atol=1e-6)
    assert live["igconda_guidance_abs"].max() > 1e-4


def test_score_maps_scores_unhealthy_slices_and_dice_at_tau():
    batch = _batch()
    images, masks = batch["image"].reshape(-1, 16, 16), batch["mask"].reshape(-1, 16, 16)
    out = E.score_maps(images, masks, tau=0.5)
    sick = masks.reshape(6, -1).any(1)
    expected = score_batch(images[sick], masks[sick])
    for key in ("dsc_max", "tau_star", "auprc", "hd95"):
        np.testing.assert_allclose(out[key][sick], expected[key], equal_nan=True)
        assert np.isnan(out[key][~sick]).all()
    assert (out["n_lesions"][~sick] == 0).all()
    pred = images[sick] >= 0.5
    dice = 2 * (pred & (masks[sick] > 0)).sum((1, 2)) / (pred.sum((1, 2)) + masks[sick].sum((1, 2)))
    np.testing.assert_allclose(out["dice_tau"][sick], dice)
    assert np.isnan(E.score_maps(images, masks)["dice_tau"]).all()  # no τ, no Dice@τ


def test_calibration_maximises_mean_dice_on_a_fine_grid():
    # A low-amplitude map (lesion 0.05, background 0.01): the paper's grid (≥ 0.1) finds nothing,
    # the calibration grid finds the τ that separates them.
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[:, 2:5, 2:5] = 1
    maps = np.where(masks > 0, 0.05, 0.01).astype(np.float32)
    tau, dice = E.calibrate_threshold(maps, masks)
    assert tau == pytest.approx(0.02) and dice == pytest.approx(1.0)
    assert E.calibrate_threshold(maps, masks, grid=(0.1, 0.2))[1] == 0.0
    # The mean over slices decides: τ = 0.4 is perfect on two slices, 0.2 on one.
    maps = np.stack([np.where(masks[0] > 0, 0.5, 0.3)] * 2 + [np.where(masks[0] > 0, 0.3, 0.1)])
    tau, dice = E.calibrate_threshold(maps.astype(np.float32), masks, grid=(0.2, 0.4))
    assert tau == 0.4 and dice == pytest.approx(2 / 3)
    assert E.CALIBRATION_GRID[0] == 0.02 and E.CALIBRATION_GRID[-1] == 0.9
    with pytest.raises(ValueError, match="no slice with a lesion"):
        E.calibrate_threshold(maps, np.zeros_like(masks))


def test_score_methods_rows_follow_the_score_schema_and_summarize_counts_slices():
    batch = _batch()
    maps = {**M.IntensityMethod().maps(batch), **M.ThresholdMethod().maps(batch)}
    rows = E.score_methods(batch, maps, taus={"intensity": 0.5})
    schema.validate_scores(rows)
    pa.Table.from_pandas(rows, preserve_index=False).cast(schema.SCORE_SCHEMA)  # types fit
    assert len(rows) == 2 * 4 and set(rows["method"]) == {"intensity", "threshold_41"}
    assert rows.loc[rows.method == "intensity", "tau"].eq(0.5).all()
    assert rows.loc[rows.method == "threshold_41", "dice_tau"].isna().all()
    summary = E.summarize(rows)
    assert list(summary["method"].unique()) == ["threshold_41", "intensity"]  # method_order
    lung = summary[(summary.method == "intensity") & (summary.group == "lung")].iloc[0]
    assert lung["n_slices"] == 3 and lung["tau"] == 0.5
    expected = rows[(rows.method == "intensity") & (rows.cohort == "lung")]
    assert lung["dice_tau_mean"] == pytest.approx(expected["dice_tau"].mean())
    assert lung["dsc_max_mean"] == pytest.approx(expected["dsc_max"].mean())
    internal = summary[(summary.method == "intensity") & (summary.group == "internal (all)")].iloc[0]
    assert internal["n_slices"] == 4
    text = E.format_table(summary)
    assert "### raw intensity (τ = 0.5)" in text and "| Group | Unhealthy slices | ⌈DSC⌉ | Dice@τ |" in text


def _per_slice() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cohort": ["a", "a", "b", "b", "ext", "a"],
            "role": ["internal", "internal", "internal", "internal", "external", "internal"],
            "dsc_max": [0.5, 1.0, 0.2, 0.4, 0.9, np.nan],
            "hd95": [2.0, np.nan, 4.0, 6.0, 1.0, np.nan],
            "auprc": [0.5, 0.7, 0.1, 0.3, 0.8, np.nan],
            "n_lesions": [1, 3, 2, 2, 1, 0],  # the last row is a healthy slice: dropped
            "n_detected": [1, 1, 0, 1, 1, 0],
        }
    )


def test_summarize_by_cohort_and_role():
    s = E.summarize(_per_slice()).set_index("group")
    assert list(s.index) == ["a", "b", "ext", "internal (all)", "external (all)"]
    a = s.loc["a"]
    assert a["n_slices"] == 2
    assert a["dsc_max_mean"] == pytest.approx(0.75) and a["dsc_max_std"] == pytest.approx(0.25)
    assert a["hd95_mean"] == pytest.approx(2.0) and a["hd95_n"] == 1  # NaN HD95 skipped, counted
    assert a["sensitivity_mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert a["sensitivity_pooled"] == pytest.approx(2 / 4)
    internal = s.loc["internal (all)"]
    assert internal["n_slices"] == 4
    assert internal["dsc_max_mean"] == pytest.approx(np.mean([0.5, 1.0, 0.2, 0.4]))
    assert internal["sensitivity_pooled"] == pytest.approx(3 / 8)
    assert s.loc["external (all)", "auprc_mean"] == pytest.approx(0.8)


def test_summarize_without_role_and_errors():
    s = E.summarize(_per_slice().drop(columns="role")).set_index("group")
    assert list(s.index)[-1] == "all" and s.loc["all", "n_slices"] == 5
    with pytest.raises(ValueError, match="lacks columns"):
        E.summarize(_per_slice(), by=("tracer",))


def test_format_table_cells():
    text = E.format_table(E.summarize(_per_slice()))
    lines = [line for line in text.strip().splitlines() if line.startswith("|")]
    assert lines[0].startswith("| Group | Unhealthy slices | ⌈DSC⌉ | HD95 (px) | AUPRC |")
    assert len(lines) == 2 + 5
    row_a = next(line for line in lines if line.startswith("| a |"))
    assert "0.750 ± 0.250" in row_a and "0.500 (2/4)" in row_a


def test_prediction_schema_validation():
    n, hw = 2, 4
    flat = pa.array([np.zeros(hw, np.float32)] * n, type=pa.list_(pa.float32()))
    columns = {f.name: pa.array([0] * n, type=f.type) if not pa.types.is_list(f.type) and
               not pa.types.is_string(f.type) else None for f in schema.PREDICTION_SCHEMA}
    for f in schema.PREDICTION_SCHEMA:
        if pa.types.is_string(f.type):
            columns[f.name] = pa.array(["x"] * n)
        elif pa.types.is_list(f.type):
            columns[f.name] = flat if f.type.value_type == pa.float32() else pa.array(
                [np.zeros(hw, np.uint8)] * n, type=pa.list_(pa.uint8()))
    table = pa.table(columns)
    schema.validate_predictions(table)
    with pytest.raises(ValueError, match="counterfactual_w0"):
        schema.validate_predictions(table.drop(["counterfactual_w0"]))
