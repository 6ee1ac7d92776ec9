"""``ray_jobs.comparison_study``: one command trains and scores every method of a tiny study,
logs each as a method run, builds the comparison from MLflow, and a rerun resumes (skips what
is finished); bad options are usage errors; a failing step is reported and the others go on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from igconda import tracking
from igconda.config import ConfigError, load_config, save_config

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "test.yaml")


def test_bad_options_are_usage_errors(tmp_path, capsys):
    from ray_jobs import comparison_study

    base = ["--config", CONFIG, "--output", str(tmp_path / "c")]
    assert comparison_study.main([*base, "--baselines", "hirescam,resnet"]) == 2
    assert "unknown baselines ['resnet']" in capsys.readouterr().err
    # configs/test.yaml has two UNet levels: a three-digit variant does not fit it.
    assert comparison_study.main([*base, "--variants", "011"]) == 2
    assert "one 0/1 digit per level" in capsys.readouterr().err
    assert comparison_study.main([*base, "--variants", "01,01"]) == 2
    assert "listed twice" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_variant_config_changes_only_the_attention_levels():
    from ray_jobs.comparison_study import variant_config

    study = load_config(CONFIG)
    variant = variant_config(study, "00")
    assert variant.model.attention == "00"
    assert variant.replace("model", attention=study.model.attention) == study
    with pytest.raises(ConfigError):
        variant_config(study, "0a")


def test_a_failed_step_is_recorded_and_the_steps_that_need_it_do_not_run(tmp_path, capsys):
    from ray_jobs.comparison_study import Study

    args = argparse.Namespace(output=str(tmp_path), tracking_uri=None, experiment=None,
                              address=None, num_workers=None, use_gpu=False)
    study = Study(args, load_config(CONFIG))
    ran = []

    def broken() -> None:
        raise SystemExit("stage 'train' failed with exit code 1")

    assert not study.step("train a", broken)
    assert not study.step("score a", lambda: ran.append("a"), needs=("train a",))
    assert study.step("score b", lambda: ran.append("b"))
    assert ran == ["b"] and set(study.failed) == {"train a", "score a"}
    assert "exit code 1" in study.failed["train a"] and "train a failed" in study.failed["score a"]
    assert "going on with the other methods" in capsys.readouterr().out


def test_a_training_made_with_other_settings_is_made_again(tmp_path, monkeypatch, capsys):
    """A rerun after a config change must not keep the old variant's training, tuning and model
    (the steps skip by presence of their outputs); an unchanged rerun keeps them."""
    from ray_jobs import comparison_study
    from ray_jobs.comparison_study import Study, igconda_variant

    trained = []

    def fake_training(paths, request, **_):
        best = paths.best_checkpoint / "model.safetensors"
        if not best.is_file():
            trained.append(paths.root.name)
            best.parent.mkdir(parents=True)
            best.write_bytes(b"weights")
            save_config(request.config, best.parent / "config.yaml")

    def fake_tune(name, build):
        out = Path(build().output)
        out.mkdir(parents=True)
        (out / "best.json").write_text("{}")

    def fake_model(paths, config, config_file, **_):
        (paths.model).mkdir(parents=True)
        (paths.model / "tuning.json").write_text("{}")

    monkeypatch.setattr(comparison_study, "run_training", fake_training)
    monkeypatch.setattr(comparison_study, "run_stage", fake_tune)
    monkeypatch.setattr(comparison_study, "write_study_model", fake_model)
    args = argparse.Namespace(output=str(tmp_path), tracking_uri=None, experiment=None,
                              address=None, num_workers=None, use_gpu=False)

    def run(config) -> None:
        study = Study(args, config)
        study.data_version = "dataset.json:0123"
        igconda_variant(study, "01")
        assert not study.failed

    config = load_config(CONFIG)
    run(config)
    run(config)
    assert trained == ["igconda_01"]
    capsys.readouterr()
    run(config.replace("train", epochs=config.train.epochs + 1))
    assert trained == ["igconda_01", "igconda_01"]
    out = capsys.readouterr().out
    assert "train igconda_01: made with other settings (train.epochs: 2 -> 3)" in out
    # A tuning setting keeps the training but makes the tuning and the model again.
    tuned = tmp_path / "igconda_01" / "tune" / "best.json"
    tuned.write_text('{"stale": true}')
    run(config.replace("train", epochs=config.train.epochs + 1).replace("tune", stride=1))
    assert trained == ["igconda_01", "igconda_01"]
    assert json.loads(tuned.read_text()) == {}


@pytest.mark.ray
@pytest.mark.e2e
def test_one_command_scores_every_method_and_resumes(tmp_path, ray_session, capsys):
    from ray_jobs import comparison_study

    out = tmp_path / "study"
    argv = ["--config", CONFIG, "--output", str(out), "--variants", "01",
            "--baselines", "hirescam"]
    assert comparison_study.main(argv) == 0
    record = json.loads((out / "comparison_study.json").read_text())
    assert record["failed"] == {} and record["variants"] == ["01"]

    uri = tracking.resolve_tracking_uri(None, out)
    runs = tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'score'")
    by_method = {r["tags"]["igconda.method"]: r for r in runs}
    kind = json.loads((out / "igconda_01" / "model" / "tuning.json").read_text())["map_kind"]
    control = "igconda_w0_hot" if kind == "hot" else "igconda_w0"
    assert set(by_method) == {f"igconda_{kind}", control, "threshold_41", "intensity", "hirescam"}
    assert len(runs) == 5
    assert by_method[f"igconda_{kind}"]["tags"]["igconda.variant"] == "01"
    assert by_method[control]["tags"]["igconda.variant"] == "01"
    versions = {r["tags"]["igconda.data_version"] for r in runs}
    assert len(versions) == 1  # every method scored the same data
    (train,) = tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'train'")
    assert train["tags"]["igconda.method"] == "igconda" and train["tags"]["igconda.variant"] == "01"
    assert train["tags"]["igconda.data_version"] in versions

    # The comparison was read back from those runs: every method is in every table.
    (comparison,) = tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'comparison'")
    assert int(comparison["params"]["score_runs"]) == 5
    page = (out / "comparison" / "comparison.md").read_text()
    for label in ("(01)", "41% SUVmax", "raw intensity", "ResNet-18 HiResCAM", "w = 0 control"):
        assert label in page, label

    # A rerun resumes: nothing is trained or scored again; only the comparison is rebuilt.
    capsys.readouterr()
    assert comparison_study.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("scored already") == 5 and "found, skipping" in printed
    assert len(tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'score'")) == 5
    assert len(tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'comparison'")) == 2


def test_a_score_record_is_finished_only_for_the_inputs_it_was_scored_from(tmp_path):
    from ray_jobs.score_method import (
        RUN_RECORD,
        finished_run,
        parse_args,
        score_inputs,
        score_request,
    )

    argv = ["--method", "intensity", "--data", str(tmp_path / "data"), "--output", str(tmp_path)]
    inputs = score_inputs(score_request(parse_args(argv)))
    assert finished_run(tmp_path, inputs) is None  # nothing scored
    (tmp_path / "per_slice_scores.parquet").write_bytes(b"PAR1")
    (tmp_path / RUN_RECORD).write_text(json.dumps({"run_id": "r1", "inputs": inputs}))
    assert finished_run(tmp_path, inputs)["run_id"] == "r1"
    other = score_inputs(score_request(parse_args([*argv, "--variant", "011"])))
    assert finished_run(tmp_path, other) is None  # stale: scored from other inputs
    (tmp_path / RUN_RECORD).write_text("{half")
    assert finished_run(tmp_path, inputs) is None


def test_a_score_is_stale_when_its_checkpoint_or_data_changed_in_place(tmp_path):
    """A baseline retrained, or the data re-preprocessed, into the same folder is another
    input: the record keys on contents, not only on paths."""
    from ray_jobs.score_method import (
        RUN_RECORD,
        finished_run,
        parse_args,
        score_inputs,
        score_request,
    )

    data, checkpoint, out = tmp_path / "data", tmp_path / "ckpt", tmp_path / "out"
    data.mkdir()
    (data / "dataset.json").write_text('{"created": 1}')
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights 1")
    argv = ["--method", "hirescam", "--checkpoint", str(checkpoint), "--data", str(data),
            "--output", str(out)]
    out.mkdir()
    (out / "per_slice_scores.parquet").write_bytes(b"PAR1")
    (out / RUN_RECORD).write_text(json.dumps({"run_id": "r1",
                                               "inputs": score_inputs(score_request(parse_args(argv)))}))
    assert finished_run(out, score_inputs(score_request(parse_args(argv))))["run_id"] == "r1"
    (checkpoint / "model.safetensors").write_bytes(b"weights 2")  # retrained in place
    assert finished_run(out, score_inputs(score_request(parse_args(argv)))) is None
    (checkpoint / "model.safetensors").write_bytes(b"weights 1")
    assert finished_run(out, score_inputs(score_request(parse_args(argv))))["run_id"] == "r1"
    (data / "dataset.json").write_text('{"created": 2}')  # re-preprocessed in place
    assert finished_run(out, score_inputs(score_request(parse_args(argv)))) is None
