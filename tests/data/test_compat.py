"""igconda.data.compat: a dataset's recorded preprocessing against a checkpoint's or a config's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from igconda.data.compat import (
    SLICE_SETTINGS,
    PreprocessMismatch,
    check_data_for_checkpoint,
    check_dataset_settings,
    settings_record,
    slice_setting_differences,
)


def write_summary(data: Path, settings: dict | None) -> Path:
    """A dataset folder whose dataset.json records ``settings`` (as build_dataset writes them)."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "dataset.json").write_text(json.dumps({"patients": 1, **(
        {"config": settings} if settings is not None else {})}))
    return data


def _check(data: Path, test_config) -> str | None:
    return check_dataset_settings(data, test_config.preprocess, expected_from="config X",
                                  fix="Do Y.")


def test_the_same_settings_pass(tmp_path, test_config):
    assert _check(write_summary(tmp_path / "d", settings_record(test_config.preprocess)),
                  test_config) is None


def test_settings_that_do_not_change_a_slice_are_not_compared(tmp_path, test_config):
    other = test_config.replace("preprocess", train_fraction=0.3, valid_fraction=0.3,
                                tune_per_cohort=5, seed=7, num_cpus_per_volume=4.0,
                                binarize_mask=True).preprocess
    data = write_summary(tmp_path / "d", settings_record(other))
    assert _check(data, test_config) is None
    assert slice_setting_differences(settings_record(other), test_config.preprocess) == ({}, [])


def test_each_differing_slice_setting_is_named_with_both_values(tmp_path, test_config):
    recorded = settings_record(test_config.preprocess)
    recorded.update(output_size=[32, 32, 10], fov_centre="array", seed=99)
    data = write_summary(tmp_path / "d", recorded)
    with pytest.raises(PreprocessMismatch) as err:
        _check(data, test_config)
    message = str(err.value)
    assert message.startswith(f"{data}/dataset.json: ") and "config X" in message
    assert "preprocess.output_size: data [32, 32, 10], expected [16, 16, 10]" in message
    assert "preprocess.fov_centre: data 'array', expected 'body'" in message
    assert "seed" not in message and message.endswith("Do Y.")


@pytest.mark.parametrize("name, value", [
    ("spacing_mm", [12.0, 12.0, 6.0]), ("crop_size", [32, 32, 80]), ("output_size", [16, 16, 20]),
    ("axial_extent", "crop"), ("fov_centre", "array"),
])
def test_every_slice_setting_is_compared(tmp_path, test_config, name, value):
    recorded = {**settings_record(test_config.preprocess), name: value}
    with pytest.raises(PreprocessMismatch, match=rf"preprocess\.{name}: data "):
        _check(write_summary(tmp_path / "d", recorded), test_config)


def test_numbers_compare_by_value_not_by_json_form(tmp_path, test_config):
    recorded = settings_record(test_config.preprocess)
    recorded["spacing_mm"] = [12, 12, 12]  # ints in the file, floats in the config
    assert _check(write_summary(tmp_path / "d", recorded), test_config) is None


def test_data_that_cannot_be_checked_give_a_warning_not_a_refusal(tmp_path, test_config):
    warning = _check(tmp_path / "hand-made", test_config)
    assert "no dataset.json" in warning and "config X" in warning
    warning = _check(write_summary(tmp_path / "no-settings", None), test_config)
    assert "records no preprocessing settings" in warning
    older = {k: v for k, v in settings_record(test_config.preprocess).items() if k != "fov_centre"}
    warning = _check(write_summary(tmp_path / "older", older), test_config)
    assert "does not record preprocess.fov_centre" in warning
    # What it does record is still compared.
    with pytest.raises(PreprocessMismatch, match="crop_size"):
        _check(write_summary(tmp_path / "older2", {**older, "crop_size": [8, 8, 8]}), test_config)


def test_against_a_checkpoint_names_it_and_the_fix(tmp_path, test_config, checkpoint):
    recorded = {**settings_record(test_config.preprocess), "spacing_mm": [2.0, 2.0, 3.0]}
    data = write_summary(tmp_path / "d", recorded)
    with pytest.raises(PreprocessMismatch) as err:
        check_data_for_checkpoint(data, checkpoint)
    message = str(err.value)
    assert f"checkpoint {checkpoint} ({checkpoint / 'config.yaml'}, section preprocess)" in message
    assert "preprocess.spacing_mm: data [2.0, 2.0, 3.0], expected [12.0, 12.0, 12.0]" in message
    assert f"ray_jobs.preprocess --config {checkpoint / 'config.yaml'}" in message
    assert check_data_for_checkpoint(
        write_summary(tmp_path / "ok", settings_record(test_config.preprocess)), checkpoint) is None


def test_slice_settings_are_preprocess_fields():
    from dataclasses import fields

    from igconda.config import PreprocessConfig

    assert set(SLICE_SETTINGS) < {f.name for f in fields(PreprocessConfig)}
