"""igconda.inference.CounterfactualPredictor on a tiny untrained model (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from igconda.checkpoint import CheckpointError
from igconda.config import save_config
from igconda.data.schema import HEALTHY, UNHEALTHY, stack_images
from igconda.inference import CounterfactualPredictor
from tests.helpers import load_benchmark, make_dataset

# ---- fixtures --------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, test_config) -> dict[str, np.ndarray]:
    root = make_dataset(tmp_path_factory.mktemp("data"), test_config, {"P1": ("lung", "internal")})
    table = pq.read_table(root / "slices" / "test" / "P1.parquet")
    cols = table.to_pandas()
    # A few healthy and unhealthy slices keep the network part short on a busy 2-core machine.
    label = cols["label"].to_numpy()
    rows = np.concatenate([np.flatnonzero(label == UNHEALTHY)[:3], np.flatnonzero(label == HEALTHY)[:3]])
    cols = cols.iloc[np.sort(rows)]
    batch = {k: cols[k].to_numpy() for k in cols.columns}  # image/mask: object arrays of arrays
    # The whole axial extent at the test config's 48 mm slices gives 2-3 slices of each class.
    assert (batch["label"] == UNHEALTHY).sum() >= 2 and (batch["label"] == HEALTHY).sum() >= 2
    return batch


def _shrink(model, x0, schedule, **kwargs):
    """A cheap deterministic stand-in for the DDIM counterfactual pair."""
    return 0.5 * x0, 0.75 * x0


def _predictor(checkpoint, **kwargs) -> CounterfactualPredictor:
    defaults = {"noise_level": 4, "guidance_scale": 3.0, "stride": 2, "device": "cpu"}
    return CounterfactualPredictor(checkpoint, **{**defaults, **kwargs})


# ---- tests -----------------------------------------------------------------------------------

def test_predictor_batch_shapes_ranges_and_metrics(checkpoint, batch):
    predictor = _predictor(checkpoint)
    out = predictor(batch)
    n, hw = len(batch["image"]), 16 * 16
    assert out["anomaly_map"].shape == (n, hw) and out["anomaly_map"].dtype == np.float32
    assert out["counterfactual"].shape == (n, hw) and out["counterfactual"].dtype == np.float32
    assert np.isfinite(out["counterfactual"]).all()
    assert out["anomaly_map"].min() >= 0.0 and out["anomaly_map"].max() <= 1.0
    assert out["anomaly_map"].max() > 1e-3  # the counterfactual is not the input itself
    for key in ("patient_id", "cohort", "role", "tracer", "slice_index", "label", "lesion_pixels"):
        np.testing.assert_array_equal(out[key], batch[key])
    sick = batch["label"] == UNHEALTHY
    assert out["counterfactual_w0"].shape == (n, hw) and np.isfinite(out["counterfactual_w0"]).all()
    for key in ("dsc_max", "tau_star", "auprc", "n_lesions", "sensitivity", "dsc_max_abs", "dsc_max_hot",
                "dsc_max_guidance", "dsc_max_guidance_abs", "dsc_max_w0"):
        assert out[key].shape == (n,)
        assert np.isnan(out[key][~sick]).all(), key  # healthy slices are not scored
        assert np.isfinite(out[key][sick]).all(), key
    assert ((out["dsc_max"][sick] >= 0) & (out["dsc_max"][sick] <= 1)).all()
    np.testing.assert_array_equal(out["dsc_max"], out["dsc_max_abs"])
    assert (out["n_lesions"][sick] >= 1).all()


def test_anomaly_map_is_the_abs_difference_to_the_counterfactual(checkpoint, batch):
    out = _predictor(checkpoint, score_other_map=False)(batch)
    images = stack_images(batch["image"], 16, 16).reshape(len(batch["image"]), -1)
    expected = np.clip(np.abs(images - out["counterfactual"]), 0, 1)
    np.testing.assert_allclose(out["anomaly_map"], expected, atol=1e-6)
    assert np.isnan(out["dsc_max_hot"]).all() and np.isnan(out["dsc_max_w0"]).all()


def test_image_column_as_2d_array_gives_the_same_result(checkpoint, batch):
    predictor = _predictor(checkpoint, counterfactual_fn=_shrink)
    flat = dict(batch, image=np.stack(batch["image"]), mask=np.stack(batch["mask"]))
    a, b = predictor(batch), predictor(flat)
    np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"], atol=1e-6)
    np.testing.assert_allclose(a["dsc_max"], b["dsc_max"], equal_nan=True)


def test_metric_plumbing_with_an_injected_counterfactual(checkpoint, batch):
    """A counterfactual of zeros makes the map the image itself: the metrics must be score_batch's."""
    from igconda.metrics import score_batch

    calls = []

    def zeros(model, x0, schedule, **kwargs):
        calls.append(kwargs)
        assert not torch.is_grad_enabled()  # inference mode
        return torch.zeros_like(x0), 0.5 * x0

    out = _predictor(checkpoint, counterfactual_fn=zeros, map_kind="hot", threshold=0.3,
                     amp=False)(batch)
    assert calls == [{"noise_level": 4, "stride": 2, "guidance_scale": 3.0, "target_label": HEALTHY,
                     "amp": False}]
    sick = batch["label"] == UNHEALTHY
    images = stack_images(batch["image"], 16, 16)[sick]
    masks = stack_images(batch["mask"], 16, 16, np.uint8)[sick]
    expected = score_batch(images, masks)
    np.testing.assert_allclose(out["dsc_max"][sick], expected["dsc_max"])
    np.testing.assert_allclose(out["dsc_max_hot"][sick], expected["dsc_max"])
    np.testing.assert_allclose(out["tau_star"][sick], expected["tau_star"])
    # dice_tau is the Dice of the chosen map at the given τ, whatever τ* each slice would pick.
    pred = images >= np.float32(0.3)
    dice = 2 * (pred & (masks > 0)).sum((1, 2)) / (pred.sum((1, 2)) + masks.sum((1, 2)))
    np.testing.assert_allclose(out["dice_tau"][sick], dice)
    assert np.isnan(out["dice_tau"][~sick]).all()
    # The w = 0 control is |x − x̂_∅| = x/2 here, and the guidance map max(x̂_∅ − x̂_w, 0) too.
    np.testing.assert_allclose(out["dsc_max_w0"][sick], score_batch(images / 2, masks)["dsc_max"])
    np.testing.assert_allclose(out["dsc_max_guidance"][sick], out["dsc_max_w0"][sick])


def test_batch_without_mask_has_no_metrics(checkpoint, batch):
    out = _predictor(checkpoint, counterfactual_fn=_shrink)({"image": batch["image"][:3]})
    assert out["anomaly_map"].shape == (3, 256)
    assert np.isnan(out["dsc_max"]).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_level": 10}, "noise_level D=10"), ({"noise_level": 0}, "noise_level D=0"),
    ({"stride": 3}, "multiple of stride s=3"), ({"guidance_scale": -1.0}, "guidance"),
    ({"map_kind": "sq"}, "map_kind"),
    ({"threshold": 0.0}, "threshold"),
])
def test_invalid_parameters_are_clear_errors(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _predictor(checkpoint, **kwargs)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        _predictor(tmp_path / "nowhere")


def test_stack_images_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="16×16"):
        stack_images(np.zeros((2, 100), np.float32), 16, 16)


def test_stride_benchmark_runs_on_the_tiny_model(checkpoint, tmp_path, test_config, capsys):
    """benchmarks/bench_strides.py: one row per dividing stride, fewer evaluations as s grows."""
    bench = load_benchmark("bench_strides")
    data = make_dataset(tmp_path / "data", test_config, {"P1": ("lung", "internal")}, split="tune")
    out = tmp_path / "strides.csv"
    code = bench.main(["--checkpoint", str(checkpoint), "--data", str(data), "--noise-level", "4",
                       "--strides", "1,2,3,4", "--max-slices", "4", "--device", "cpu",
                       "--control", "--output", str(out)])
    assert code == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert table["stride"].tolist() == [1, 2, 4]  # s = 3 does not divide D = 4
    assert table["evaluations_per_slice"].tolist() == [16, 8, 4]  # the predictor decodes guided + unguided: 4·D/s
    assert table["dsc_max_mean"].between(0, 1).all() and (table["slices_per_s"] > 0).all()
    # --control: the unguided (w = 0) score and what guidance adds on top of it.
    assert table["dsc_max_w0_mean"].between(0, 1).all()
    assert np.allclose(table["guidance_gain"], table["dsc_max_mean"] - table["dsc_max_w0_mean"])
    assert "largest stride within 0.01" in capsys.readouterr().out
    best = bench.default_stride(pd.DataFrame({"stride": [1, 2, 5], "dsc_max_mean": [0.5, 0.495, 0.47]}))
    assert best == 2


def test_balance_benchmark_trains_both_samplings_and_scores_them(tmp_path, test_config, capsys):
    """benchmarks/bench_balance.py on the tiny config: two checkpoints, one score row per (s, w)."""
    bench = load_benchmark("bench_balance")
    data = tmp_path / "data"
    make_dataset(data, test_config, {"P1": ("lung", "internal"), "P2": ("lung", "internal")}, split="train")
    make_dataset(data, test_config, {"P3": ("lung", "internal")}, split="test")
    config = tmp_path / "test.yaml"
    save_config(test_config, config)
    code = bench.main(["--data", str(data), "--config", str(config), "--output", str(tmp_path / "out"),
                       "--steps", "2", "--noise-level", "4", "--strides", "2,4",
                       "--guidance-scales", "0,3", "--max-slices", "4", "--threads", "1"])
    assert code == 0
    for name in ("natural", "balanced"):
        assert (tmp_path / "out" / name / "config.yaml").is_file()
    lines = [line for line in capsys.readouterr().out.splitlines() if "⌈DSC⌉" in line]
    assert len(lines) == 2 * 2 * 2  # two samplings × two strides × two w
