"""A study re-run never reuses a stale stage: each stage's key covers its settings and those of
the stages before it (ray_jobs.stage_records), and the pipeline re-runs a stage whose recorded
key differs, with every stage after it, saying what changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from igconda.config import load_config
from ray_jobs import pipeline, stage_records
from ray_jobs.study_steps import STAGES

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test.yaml"


def keys_for(config, **kw):
    return stage_records.stage_keys(stage_records.stage_settings(config, **kw))


def test_every_config_section_but_tracking_belongs_to_a_stage():
    # A section no stage lists would be a setting whose change reuses stale outputs.
    listed = {section for sections in stage_records.STAGE_SECTIONS.values() for section in sections}
    assert set(load_config(CONFIG).to_dict()) - {"tracking"} == listed
    assert tuple(stage_records.STAGE_SECTIONS) == STAGES


def test_a_setting_changes_its_stage_and_every_later_one_only():
    config = load_config(CONFIG)
    before = keys_for(config)
    after = keys_for(config.replace("train", epochs=config.train.epochs + 1))
    changed = [s for s in STAGES if before[s] != after[s]]
    assert changed == ["train", "tune", "model", "infer", "report"]
    # An inference setting leaves the training (and everything before it) as it is.
    after = keys_for(config.replace("infer", threshold=0.37))
    assert [s for s in STAGES if before[s] != after[s]] == ["tune", "model", "infer", "report"]
    # The tracking section is where results go, not what they are.
    assert keys_for(config.replace("tracking", experiment="elsewhere")) == before
    assert keys_for(config, skip_tune=True)["train"] == before["train"]
    assert keys_for(config, skip_tune=True)["tune"] != before["tune"]


def test_the_manifest_and_its_files_are_part_of_the_data(tmp_path):
    pet, mask = tmp_path / "p1.nii.gz", tmp_path / "p1_mask.nii.gz"
    pet.write_bytes(b"pet")
    mask.write_bytes(b"mask")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,cohort,tracer,pet_path,mask_path,role\n"
                        f"p1,lymphoma,FDG,{pet},{mask},internal\n")
    config = load_config(CONFIG)
    first = keys_for(config, manifest=manifest)
    assert keys_for(config, manifest=manifest) == first
    assert first["cohorts"] != keys_for(config)["cohorts"]  # not the phantoms any more
    # A scan replaced under the same name (new size and time) changes every stage.
    pet.write_bytes(b"a re-exported pet")
    os.utime(pet, ns=(1, 1))
    second = keys_for(config, manifest=manifest)
    assert all(second[s] != first[s] for s in STAGES)
    # The phantom settings no longer matter once a manifest gives the cohorts.
    other = config.replace("phantoms", seed=config.phantoms.seed + 1)
    assert keys_for(other, manifest=manifest) == second


def test_records_round_trip_and_a_damaged_file_is_named(tmp_path):
    assert stage_records.read_records(tmp_path) == {}
    stage_records.record(tmp_path, "train", "k1", {"train.epochs": 2}, finished=False)
    stage_records.record(tmp_path, "tune", "k2", {}, finished=True)
    records = stage_records.read_records(tmp_path)
    assert records["train"] == {"key": "k1", "settings": {"train.epochs": 2}, "finished": False}
    assert records["tune"]["finished"] is True
    assert stage_records.describe_change("train", records["train"], {"train.epochs": 3}) == \
        "train.epochs: 2 -> 3"
    assert "(train) changed" in stage_records.describe_change("tune", records["tune"], {})
    (tmp_path / stage_records.RECORDS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="stages.json"):
        stage_records.read_records(tmp_path)


class FakeStages:
    """Stand-ins for the stage jobs that write the outputs the pipeline checks, and log which
    ran (the pipeline's own logic, records and MLflow runs are real)."""

    def __init__(self, monkeypatch, root: Path):
        self.ran: list[str] = []
        self.root = root
        monkeypatch.setattr(pipeline, "run_stage", self.run_stage)
        monkeypatch.setattr(pipeline, "run_training", self.run_training)
        monkeypatch.setattr(pipeline, "write_study_model", self.write_model)
        monkeypatch.setattr("igconda.data.phantoms.generate_study", self.cohorts)
        monkeypatch.setattr("igconda.tracking.model.log_dataset", lambda *a, **k: None)
        monkeypatch.setattr("igconda.tracking.model.log_model_folder", lambda *a, **k: None)
        monkeypatch.setattr(pipeline.tracking, "log_artifact", lambda *a, **k: None)

    def write(self, relative: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")

    def cohorts(self, folder, config):
        self.ran.append("cohorts")
        self.write("cohorts/manifest.csv")

    def run_stage(self, module, build):
        self.ran.append(module)
        self.write({"preprocess": "data/dataset.json", "tune": "tune/best.json",
                    "infer": "infer/summary.json"}[module])

    def run_training(self, paths, request, *, forced=False):
        self.ran.append("train (fresh)" if forced else "train")
        self.write("train/best/model.safetensors")

    def write_model(self, paths, config, config_file, *, tuned=True):
        self.ran.append("model")
        self.write("model/tuning.json")


@pytest.mark.ray
def test_the_pipeline_re_runs_what_changed_and_what_was_interrupted(tmp_path, ray_session,
                                                                    monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tmp_path / "study"
    fake = FakeStages(monkeypatch, study)
    config = tmp_path / "study.yaml"
    config.write_text(CONFIG.read_text())

    def run() -> list[str]:
        fake.ran.clear()
        assert pipeline.main(["--config", str(config), "--output", str(study), "--stop-after",
                              "infer", "--tracking-uri", str(tmp_path / "mlruns.db")]) == 0
        return list(fake.ran)

    assert run() == ["cohorts", "preprocess", "train (fresh)", "tune", "model", "infer"]
    assert run() == []  # everything finished with these settings

    config.write_text(CONFIG.read_text().replace("epochs: 2", "epochs: 3"))
    capsys.readouterr()
    assert run() == ["train (fresh)", "tune", "model", "infer"]
    out = capsys.readouterr().out
    assert "train: its output was made with other settings (train.epochs: 2 -> 3)" in out
    assert run() == []

    # A tuning killed half-way: the record says it started and never finished, so the old
    # best.json it left is not taken as this run's result.
    records = json.loads((study / "stages.json").read_text())
    records["tune"]["finished"] = False
    (study / "stages.json").write_text(json.dumps(records))
    assert run() == ["tune", "model", "infer"]

    # An output from before the records existed is kept, with a warning, and recorded.
    (study / "stages.json").unlink()
    capsys.readouterr()
    assert run() == []
    assert "no record of the settings" in capsys.readouterr().out
    assert set(json.loads((study / "stages.json").read_text())) >= set(STAGES[:-1])
