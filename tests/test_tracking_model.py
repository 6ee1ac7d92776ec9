"""igconda.tracking.model: a model folder logged and registered as an MLflow pyfunc model that
``mlflow.pyfunc.load_model`` loads and runs on a slice batch; the dataset as a run input."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from igconda import tracking
from igconda.inference import CounterfactualPredictor
from igconda.tracking.model import log_dataset, log_model_folder
from igconda.tuned_model import write_model_folder
from tests.helpers import make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # MLflow's default store is ./mlflow.db: whatever falls back to it lands in tmp, not the repo.
    monkeypatch.chdir(tmp_path)


@contextlib.contextmanager
def store(uri: str) -> Iterator[None]:
    """MLflow pointed at ``uri``, as a user loading the model would point it (tracking.start_run
    leaves the process-wide tracking URI as it found it, so a test must not rely on an earlier
    test's)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def test_registered_model_loads_through_mlflow_and_runs_on_slices(checkpoint, test_config, tmp_path):
    settings = {"noise_level": 4, "guidance_scale": 2.0, "stride": 2, "map_kind": "guidance",
                "threshold": 0.05, "thresholds": {}, "tuned": True, "source": {}}
    model = write_model_folder(checkpoint, settings, tmp_path / "model")
    data = make_dataset(tmp_path / "data", test_config, {"P1": ("lung", "internal")})
    uri = tracking.resolve_tracking_uri("", tmp_path / "store")
    with tracking.start_run(uri, "exp", "model") as run_id:
        model_uri = log_model_folder(model, registered_model_name="igconda-test")
        log_dataset(data, "test")

    # Loaded by MLflow alone, from the registry, in this process.
    with store(uri):
        loaded = mlflow.pyfunc.load_model("models:/igconda-test/1")
    slices = pq.read_table(data / "slices" / "test" / "P1.parquet").to_pandas()
    batch = slices[["patient_id", "slice_index", "height", "width", "image"]].head(3)
    out = loaded.predict(batch)
    assert out["slice_index"].tolist() == batch["slice_index"].tolist()
    assert {"anomaly_map", "counterfactual", "counterfactual_w0", "lesion_mask"} <= set(out.columns)
    maps = np.stack(out["anomaly_map"].to_numpy())
    assert maps.shape == (3, 16 * 16) and np.isfinite(maps).all()
    # The tuned settings of tuning.json were used: the same maps as the predictor built with them.
    direct = CounterfactualPredictor(model, noise_level=4, guidance_scale=2.0, stride=2,
                                     map_kind="guidance", threshold=0.05, device="cpu",
                                     score=False)
    expected = direct({"image": np.stack(batch["image"].map(np.asarray)), "height": batch["height"].to_numpy(),
                       "width": batch["width"].to_numpy()})["anomaly_map"]
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_array_equal(np.stack(out["lesion_mask"].to_numpy()), expected >= 0.05)
    assert model_uri.startswith("models:/")

    # The run records the dataset it was evaluated on, under the data version's digest.
    from igconda.train_loop import dataset_version

    run = mlflow.MlflowClient(uri).get_run(run_id)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.digest == dataset_version(str(data)).split(":")[-1]
    assert inputs[0].tags[0].value == "test"


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    uri = tracking.resolve_tracking_uri("", tmp_path / "store")
    with tracking.start_run(uri, "exp", "model"), pytest.raises(FileNotFoundError, match="config.yaml"):
        log_model_folder(tmp_path)


def test_predict_needs_an_image_column(checkpoint, tmp_path):
    uri = tracking.resolve_tracking_uri("", tmp_path / "store")
    with tracking.start_run(uri, "exp", "model"):
        model_uri = log_model_folder(checkpoint)
    with store(uri):
        loaded = mlflow.pyfunc.load_model(model_uri)
    with pytest.raises(Exception, match="no 'image' column"):
        loaded.predict(pd.DataFrame({"slice_index": [0]}))
