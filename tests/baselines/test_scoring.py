"""What the comparison's scoring job loads for the methods that are not trained baselines
(no Ray): a study's IgCONDA model folder (its tuned map and that map's w = 0 control) and the
checkpoint-free controls, and how their batches become score rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from igconda.anomaly_methods import IgCondaMethod
from igconda.baselines.scoring import (
    COMPARISON_SCORE_SCHEMA,
    SCORE_INPUT_COLUMNS,
    SPLIT_COLUMN,
    OneMap,
    apply_calibration,
    load_method,
    score_slices,
    score_slices_all_taus,
    scores_table,
)
from igconda.config import ConfigError
from igconda.evaluation import calibrate_threshold
from igconda.slice_batch import batch_images
from igconda.tuned_model import write_model_folder
from tests.helpers import make_dataset

TUNED = {"noise_level": 4, "guidance_scale": 3.0, "stride": 2, "map_kind": "hot", "threshold": 0.1}


@pytest.fixture(scope="module")
def model_folder(checkpoint, tmp_path_factory):
    return write_model_folder(checkpoint, TUNED, tmp_path_factory.mktemp("study") / "model")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, test_config) -> dict[str, np.ndarray]:
    """Numpy columns of every test slice of two tiny patients (as a Ray Data batch)."""
    root = make_dataset(tmp_path_factory.mktemp("data"), test_config,
                        {"p1": ("lung", "internal"), "p2": ("sarcoma_ext", "external")})
    table = pq.read_table(root / "slices" / "test", columns=list(SCORE_INPUT_COLUMNS))
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def test_a_model_folder_scores_its_tuned_map_and_that_maps_own_control(model_folder, batch, one_torch_thread):
    method = load_method("igconda", model_folder)
    control = load_method("igconda_control", model_folder)
    assert method.names == ("igconda_hot",)  # tuning.json chose "hot"
    assert control.names == ("igconda_w0_hot",)  # the one-sided control of a one-sided map
    maps = method.maps(batch)["igconda_hot"]
    n, (h, w) = len(batch["image"]), batch_images(batch).shape[1:]
    assert maps.shape == (n, h, w) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and maps.any()
    # DDIM encoding is deterministic: a second load and pass gives the same map.
    np.testing.assert_array_equal(load_method("igconda", model_folder).maps(batch)["igconda_hot"], maps)
    # The same numbers as the full method at the tuned settings.
    full: IgCondaMethod = method.method
    assert (full.noise_level, full.stride, full.guidance_scale) == (4, 2, 3.0)
    every = full.maps(batch)
    np.testing.assert_array_equal(every["igconda_hot"], maps)
    np.testing.assert_array_equal(control.maps(batch)["igconda_w0_hot"], every["igconda_w0_hot"])


def test_controls_need_no_checkpoint_and_the_others_need_one(model_folder, batch):
    for name in ("threshold_41", "intensity"):
        method = load_method(name)
        maps = method.maps(batch)[name]
        assert method.names == (name,) and maps.shape == batch_images(batch).shape
        assert 0 <= maps.min() and maps.max() <= 1
        with pytest.raises(ConfigError, match="takes no checkpoint"):
            load_method(name, model_folder)
    with pytest.raises(ConfigError, match="needs --checkpoint"):
        load_method("igconda")
    with pytest.raises(ConfigError, match="unknown method"):
        load_method("igconda_abs", model_folder)


def test_one_map_refuses_a_name_its_method_does_not_make():
    with pytest.raises(ValueError, match="not one of the method's maps"):
        OneMap(load_method("intensity"), "threshold_41")


def test_score_rows_of_a_control_follow_the_comparison_schema(batch):
    rows = score_slices(load_method("threshold_41"), batch, {"threshold_41": 0.5})
    unhealthy = int((batch["label"] == 2).sum())
    assert 0 < len(rows) == unhealthy and set(rows["method"]) == {"threshold_41"}
    assert (rows["tau"] == 0.5).all() and rows["dice_tau"].between(0, 1).all()
    assert scores_table(rows).schema.equals(COMPARISON_SCORE_SCHEMA)


def _split_batch(batch: dict[str, np.ndarray], split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {**{k: v[rows] for k, v in batch.items()}, SPLIT_COLUMN: np.full(len(rows), split)}


def test_one_pass_gives_the_tau_and_scores_of_calibrating_on_tune_then_scoring_test(batch):
    """score_method's one pass (every map once, τ read off the tune rows afterwards) equals the
    two passes it replaced: calibrate_threshold on the tune maps, then score_slices at that τ."""
    method = load_method("intensity")
    sick = np.flatnonzero(batch["label"] == 2)
    test = _split_batch(batch, "test", sick)
    # The tune split: the same slices, dimmer (so its best τ is lower) and as other patients.
    tune = _split_batch(batch, "tune", sick)
    test["image"] = batch_images(test).reshape(len(sick), -1)  # (N, H·W), as Ray may hand it over
    tune["image"] = test["image"] * 0.5
    tune["patient_id"] = np.char.add("tune-", tune["patient_id"].astype(str)).astype(object)

    def maps_and_masks(part):
        return method.maps(part)["intensity"], batch_images(part, "mask", dtype=np.uint8)

    tau, tune_dice = calibrate_threshold(*maps_and_masks(tune))
    assert tau != calibrate_threshold(*maps_and_masks(test))[0]  # a τ from test rows would differ
    expected = score_slices(method, test, {"intensity": tau}).sort_values(["patient_id", "slice_index"])

    # Ray Data's batches mix the splits: interleave them and cut into uneven batches.
    both = {k: np.concatenate([tune[k], test[k]]) for k in test}
    order = np.random.default_rng(0).permutation(2 * len(sick))
    cuts = np.split(order, [3, len(order) // 2 + 1])
    rows = pd.concat([score_slices_all_taus(method, {k: v[c] for k, v in both.items()}, "test")
                      for c in cuts], ignore_index=True)
    got_tau, got_dice, scored = apply_calibration(rows, "test", "tune")
    assert (got_tau, got_dice) == (tau, tune_dice)
    columns = list(COMPARISON_SCORE_SCHEMA.names)
    pd.testing.assert_frame_equal(scored[columns].reset_index(drop=True),
                                  expected[columns].reset_index(drop=True))
    with pytest.raises(ValueError, match="'valid' has no unhealthy slice"):
        apply_calibration(rows, "test", "valid")
