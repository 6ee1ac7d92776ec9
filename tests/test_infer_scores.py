"""Per-patient scores are kept and reused: a patient is scored again only when its prediction,
the τ's or the scoring code changed (ray_jobs.infer_scores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from igconda.config import load_config
from igconda.data.io import InferOutput, split_path
from igconda.data.schema import PREDICTION_SCHEMA, UNHEALTHY
from ray_jobs import infer_scores
from ray_jobs.infer_patients import InferSettings, input_digest, write_patient
from tests.helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]

SETTINGS = InferSettings("/ck", 4, 3.0, 2, "abs", "w0123", 0.1)
TAUS = {"igconda_abs": 0.1, "intensity": 0.3}


def _predict(input_file, output, settings=SETTINGS, shift=0.5):
    """A prediction file made from the input slices (counterfactual = image * ``shift``)."""
    rows = pq.read_table(input_file).to_pydict()
    columns = {name: rows[name] for name in PREDICTION_SCHEMA.names if name in rows}
    image = [np.asarray(v, np.float32) for v in rows["image"]]
    columns["counterfactual"] = [v * shift for v in image]
    columns["counterfactual_w0"] = [v * 0.9 for v in image]
    columns["anomaly_map"] = [np.clip(v - v * shift, 0, 1) for v in image]
    columns = {k: np.asarray(v) if k not in ("image", "mask", "counterfactual",
                                              "counterfactual_w0", "anomaly_map") else v
               for k, v in columns.items()}
    write_patient(columns, output, settings, input_digest(input_file))


@pytest.fixture
def patient(tmp_path):
    config = load_config(REPO / "configs" / "test.yaml")
    data = make_dataset(tmp_path / "data", config, {"P1": ("lung", "internal")})
    input_file = sorted(Path(split_path(data, "test")).glob("*.parquet"))[0]
    assert (pq.read_table(input_file, columns=["label"])["label"].to_numpy() == UNHEALTHY).any()
    layout = InferOutput(tmp_path / "infer")
    _predict(input_file, layout.prediction("P1"))
    return input_file, layout


def test_a_patient_is_scored_once_and_its_scores_reused(patient, monkeypatch):
    input_file, layout = patient
    first, rescored = infer_scores.score_patients({"P1": layout.prediction("P1")},
                                                  {"P1": input_file}, TAUS, layout)
    assert rescored == ["P1"] and layout.patient_scores("P1").is_file()
    calls = []
    monkeypatch.setattr(infer_scores, "score_patient", lambda *a: calls.append(a))
    again, rescored = infer_scores.score_patients({"P1": layout.prediction("P1")},
                                                  {"P1": input_file}, TAUS, layout)
    assert rescored == [] and calls == []  # read back, not scored
    pd.testing.assert_frame_equal(again[0], first[0])


@pytest.mark.parametrize("change", ["prediction", "taus", "code", "truncated"])
def test_a_change_to_what_a_score_depends_on_scores_again(patient, monkeypatch, change):
    input_file, layout = patient
    prediction, store = layout.prediction("P1"), layout.patient_scores("P1")
    infer_scores.patient_scores(prediction, input_file, TAUS, store)
    taus = TAUS
    if change == "prediction":  # re-predicted with other settings
        _predict(input_file, prediction, InferSettings("/ck", 8, 3.0, 2, "abs", "w0123", 0.1), 0.25)
    elif change == "taus":
        taus = {**TAUS, "intensity": 0.5}
    elif change == "code":
        monkeypatch.setattr(infer_scores, "scoring_code_digest", lambda: "another version")
    else:
        store.write_bytes(store.read_bytes()[:40])
    fresh = infer_scores.score_patient(prediction, input_file, taus)
    frame, reused = infer_scores.patient_scores(prediction, input_file, taus, store)
    assert not reused
    pd.testing.assert_frame_equal(frame, fresh)
    assert infer_scores.patient_scores(prediction, input_file, taus, store)[1]  # stored again


def test_the_scoring_code_digest_covers_every_scoring_module():
    import importlib

    for name in infer_scores.SCORING_MODULES:
        importlib.import_module(name)  # each names a real module
    assert len(infer_scores.scoring_code_digest()) == 64
