"""The preprocessing job: layout, schema, rejects, splits, atomicity; on Ray Data and without."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igconda.config import PreprocessConfig
from igconda.data import build, summary
from igconda.data.build import PreprocessingError, build_dataset, process_patient
from igconda.data.build_resume import patient_file
from igconda.data.compat import PreprocessMismatch, check_dataset_settings
from igconda.data.io import read_dataset_info, read_split, split_path
from igconda.data.schema import SLICE_SCHEMA, SPLITS, UNHEALTHY, stack_images, validate_table
from ray_jobs.preprocess import run_preprocessing
from tests.data.nifti_fixtures import (
    LPS,
    ct_like,
    pet_and_mask,
    write_manifest_csv,
    write_nifti,
    write_patient,
)

CONFIG = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), crop_size=(24, 24, 20), output_size=(16, 16, 12),
                          train_fraction=0.5, valid_fraction=0.25, tune_per_cohort=1)

# patient -> expected words in its reject problem
BAD = {
    "bad_missing": "file not found",
    "bad_nan": "NaN/Inf",
    "bad_shape": "does not match PET shape",
    "bad_values": "not binary",
    "bad_dup": "duplicate patient_id",
    "bad_role": "unknown role",
    "bad_ct": "Hounsfield",  # the CT of a PET/CT given as the PET
    "bad_alias_a": "is listed under patient ids 'bad_alias_a' (line",  # one scan, two ids
    "bad_alias_b": "'bad_alias_b' (line",
}


def make_study(root: Path, bad: bool = True) -> Path:
    """2 internal cohorts x 4, an external cohort of 2, 2 negative controls, plus bad rows."""
    rows = []
    for cohort, n, role in [("lymphoma", 4, "internal"), ("lung", 4, "internal"), ("sarcoma", 2, "external"),
                            ("negative", 2, "negative_control")]:
        for i in range(n):
            pid = f"{cohort}{i}"
            write_patient(root, pid, LPS, lesion=role != "negative_control", seed=i)
            rows.append((pid, cohort, "FDG", f"images/{pid}.nii.gz", f"labels/{pid}.nii.gz", role))
    if bad:
        pet, mask = pet_and_mask()
        rows.append(("bad_missing", "lung", "FDG", "images/nope.nii.gz", "", "internal"))
        nan = pet.copy()
        nan[1, 2, 3] = np.nan
        write_nifti(root / "images/bad_nan.nii.gz", nan, LPS)
        rows.append(("bad_nan", "lung", "FDG", "images/bad_nan.nii.gz", "", "internal"))
        write_nifti(root / "images/bad_shape.nii.gz", pet, LPS)
        write_nifti(root / "labels/bad_shape.nii.gz", mask[:-1], LPS)
        rows.append(("bad_shape", "lung", "FDG", "images/bad_shape.nii.gz", "labels/bad_shape.nii.gz", "internal"))
        write_nifti(root / "images/bad_values.nii.gz", pet, LPS)
        write_nifti(root / "labels/bad_values.nii.gz", mask * 3, LPS)
        rows.append(("bad_values", "lung", "FDG", "images/bad_values.nii.gz", "labels/bad_values.nii.gz", "internal"))
        rows += [("bad_dup", "lung", "FDG", "images/lung0.nii.gz", "", "internal")] * 2
        rows.append(("bad_role", "lung", "FDG", "images/lung0.nii.gz", "", "holdout"))
        write_nifti(root / "images/bad_ct.nii.gz", ct_like(), LPS)
        rows.append(("bad_ct", "lung", "FDG", "images/bad_ct.nii.gz", "", "internal"))
        write_nifti(root / "images/alias.nii.gz", pet, LPS)
        rows += [("bad_alias_a", "lung", "FDG", "images/alias.nii.gz", "", "internal"),
                 ("bad_alias_b", "lymphoma", "FDG", "images/alias.nii.gz", "", "external")]
    return write_manifest_csv(root / "manifest.csv", rows)


def no_leftovers(output: Path) -> bool:
    return not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


# ---- without Ray -------------------------------------------------------------------------------

def test_process_patient_writes_one_file_or_reports_the_problem(tmp_path):
    pet, mask = write_patient(tmp_path, "p1")
    item = {"row": 2, "patient_id": "p1", "cohort": "c", "tracer": "FDG", "role": "internal",
            "pet_path": str(pet), "mask_path": str(mask)}
    r = process_patient(item, CONFIG, tmp_path / "ds")
    assert r["ok"] and r["slices"] == 12 and 0 < r["unhealthy"] < 12
    assert r["input_slices"] == 20 and r["lesion_voxels"] == 33 and r["lesion_voxels_outside"] == 0
    assert "split" not in r  # the task cannot know it: the driver decides once all are in
    table = pq.read_table(patient_file(tmp_path / "ds", "p1"))
    validate_table(table)
    assert "split" not in table.schema.names  # the split folder is its only record
    r = process_patient({**item, "pet_path": str(tmp_path / "gone.nii.gz")}, CONFIG, tmp_path / "ds")
    assert not r["ok"] and r["file"].endswith("gone.nii.gz") and "not found" in r["problem"]


def test_a_ct_given_as_pet_is_reported_not_raised(tmp_path):
    ct = write_nifti(tmp_path / "ct.nii.gz", ct_like(), LPS)
    item = {"row": 2, "patient_id": "p1", "cohort": "c", "tracer": "FDG", "role": "internal",
            "pet_path": str(ct), "mask_path": ""}
    r = process_patient(item, CONFIG, tmp_path / "ds")
    assert not r["ok"] and r["file"] == str(ct) and "Hounsfield" in r["problem"]
    assert not r["traceback"]  # a known bad input, not an unexpected error
    assert not (tmp_path / "ds").exists()


def _result(pid, cohort, role, split, unhealthy, voxels=10, outside=0):
    return {"patient_id": pid, "cohort": cohort, "role": role, "split": split, "unhealthy": unhealthy,
            "slices": 20, "input_slices": 40, "lesion_voxels": voxels, "lesion_voxels_outside": outside}


def test_coverage_and_warnings_name_the_cohort_and_the_split():
    results = [_result("a1", "hn", "internal", "train", 3), _result("a2", "hn", "internal", "test", 0, 10, 10),
               _result("a3", "hn", "internal", "valid", 1), _result("a4", "hn", "internal", "tune", 2),
               _result("s1", "sarc", "external", "test", 0, 40, 30), _result("n1", "neg", "negative_control",
                                                                               "train", 0, 0, 0)]
    cov = summary.lesion_coverage_summary(results)
    assert cov["cohorts"]["sarc"] == {"lesion_voxels": 40, "lesion_voxels_outside": 30, "fraction_outside": 0.75,
                                      "patients_with_lesions_outside": 1}
    assert cov["cohorts"]["hn"]["lesion_voxels_outside"] == 10 and cov["patients"]["a2"]["fraction_outside"] == 1.0
    warnings = summary.lesion_warnings(results)
    assert warnings == ["cohort 'hn' (internal) has no unhealthy slice in test (1 patient(s), none with a "
                        "lesion slice; 10 lesion voxels lie outside the field of view)",
                        "cohort 'sarc' (external) has no unhealthy slice in test (1 patient(s), none with a "
                        "lesion slice; 30 lesion voxels lie outside the field of view)"]
    table = summary.unhealthy_table(results)
    assert table["test"] == {"hn": 0, "neg": 0, "sarc": 0} and table["train"]["hn"] == 3
    # a cohort with no patient at all in a split it belongs to is reported too
    assert summary.lesion_warnings(results[:1]) == [
        f"cohort 'hn' (internal) has no unhealthy slice in {s} (no patient)" for s in ("valid", "tune", "test")]


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(PreprocessingError, match="not an igconda dataset"):
        build_dataset(make_study(tmp_path / "s", bad=False), tmp_path / "home", CONFIG, progress=False)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_build_dataset_in_process_skips_bad_patients_and_files_each_in_its_split(tmp_path):
    manifest = make_study(tmp_path / "study")
    out = tmp_path / "data"
    summary = build_dataset(manifest, out, CONFIG, progress=False)  # map_in_process: no Ray
    assert no_leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "rejects.csv", "slices", "splits.csv"]
    rejects = list(csv.DictReader((out / "rejects.csv").open()))
    assert {r["patient_id"] for r in rejects} == set(BAD) and len(summary.rejects) == len(BAD) + 1
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 12 and set(splits[splits.role == "external"].split) == {"test"}
    for row in splits.itertuples():
        table = pq.read_table(out / "slices" / row.split / f"{row.patient_id}.parquet")
        assert "split" not in table.schema.names and table.num_rows == 12
    assert read_dataset_info(out)["patients"] == 12 == sum(summary.patients.values())
    # dataset.json records the settings as the later stages compare them (igconda.data.compat).
    assert check_dataset_settings(out, CONFIG, expected_from="CONFIG", fix="") is None
    with pytest.raises(PreprocessMismatch, match=r"preprocess\.crop_size: data \[24, 24, 20\]"):
        check_dataset_settings(out, PreprocessConfig(), expected_from="defaults", fix="")


def test_the_map_is_called_once_with_every_planned_patient(tmp_path):
    calls = []

    def recording_map(items, config, root):
        calls.append(([i["patient_id"] for i in items], config, root))
        return [process_patient(i, config, root) for i in items]

    build_dataset(make_study(tmp_path / "study", bad=False), tmp_path / "data", CONFIG,
                  map_patients=recording_map, progress=False)
    assert len(calls) == 1
    ids, config, root = calls[0]
    assert sorted(ids) == sorted(pd.read_csv(tmp_path / "data" / "splits.csv").patient_id)
    assert config == CONFIG and Path(root).name.startswith(".data.tmp-")  # built aside, then moved


@pytest.mark.parametrize("fault", ["elsewhere", "short", "no_input"])
def test_a_task_report_the_driver_cannot_confirm_fails_the_build_and_writes_nothing(tmp_path, fault):
    # Tasks on a node that does not share the folders still report as if all were well. The
    # stand-in runs every second patient as such a task: it writes "on another node's disk", or
    # reports more slices than its file holds, or finds no PET file where the driver sees one.
    elsewhere = tmp_path / "other_node"

    def node_local_map(items, config, root):
        for n, item in enumerate(items):
            if n % 2 == 0:
                yield process_patient(item, config, root)
            elif fault == "elsewhere":
                yield process_patient(item, config, elsewhere / ".data.tmp")
            elif fault == "short":
                r = process_patient(item, config, root)
                yield {**r, "slices": r["slices"] + 1}
            else:
                r = process_patient({**item, "pet_path": str(elsewhere / "pet.nii.gz")}, config, root)
                yield {**r, "file": item["pet_path"]}

    out = tmp_path / "data"
    with pytest.raises(PreprocessingError) as err:
        build_dataset(make_study(tmp_path / "study", bad=False), out, CONFIG,
                      map_patients=node_local_map, progress=False)
    message = str(err.value)
    assert "6 of 12 patient(s) are not what their preprocessing task reported" in message
    assert "must be on shared storage" in message and "docs/cluster.md" in message
    assert "(+1 more)" in message
    assert {"elsewhere": "FileNotFoundError", "short": "rows, its task wrote",
            "no_input": "its task found no such file; the driver sees it"}[fault] in message
    assert not out.exists() and no_leftovers(out)  # no dataset.json, no half-built folder


def test_split_path_and_unknown_split(tmp_path):
    assert split_path("s3://bucket/data/", "tune") == "s3://bucket/data/slices/tune"
    with pytest.raises(ValueError, match="unknown split"):
        split_path(tmp_path, "holdout")


def test_splits_are_decided_once_and_no_file_is_rewritten_after_its_task(tmp_path, monkeypatch):
    # One split decision per build, on the survivors, after every task has reported; each
    # file then moves into its split folder by rename: the inode and mtime its task left.
    calls, written = [], {}
    real = build.assign_splits

    def counting(rows, **kwargs):
        calls.append([r["patient_id"] for r in rows])
        return real(rows, **kwargs)

    monkeypatch.setattr(build, "assign_splits", counting)

    def recording_map(items, config, root):
        for item in items:
            assert not calls  # no split is decided while tasks run
            r = process_patient(item, config, root)
            if r["ok"]:
                st = patient_file(Path(root), item["patient_id"]).stat()
                written[item["patient_id"]] = (st.st_ino, st.st_mtime_ns)
            yield r

    out = tmp_path / "data"
    build_dataset(make_study(tmp_path / "study"), out, CONFIG, map_patients=recording_map,
                  progress=False)
    splits = pd.read_csv(out / "splits.csv")
    assert calls == [sorted(splits.patient_id)]  # once, on the 12 survivors only
    assert len(written) == 12
    for row in splits.itertuples():
        st = (out / "slices" / row.split / f"{row.patient_id}.parquet").stat()
        assert (st.st_ino, st.st_mtime_ns) == written[row.patient_id]


def test_a_dataset_written_with_a_split_column_still_reads(tmp_path):
    # Datasets written before the split folder became the only record carry the column.
    out = tmp_path / "data"
    build_dataset(make_study(tmp_path / "study", bad=False), out, CONFIG, progress=False)
    for path in (out / "slices").glob("*/*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.append_column("split", pa.array([path.parent.name] * len(table))), path)
    test = read_split(out, "test")
    validate_table(pq.read_table(out / "slices" / "test"))
    n_test = (pd.read_csv(out / "splits.csv").split == "test").sum()
    assert test.schema.names == SLICE_SCHEMA.names and test.num_rows == 12 * n_test > 0


# ---- on Ray Data -------------------------------------------------------------------------------

@pytest.mark.ray
def test_job_on_synthetic_cohort_with_bad_patients(ray_session, tmp_path):
    manifest = make_study(tmp_path / "study")
    out = tmp_path / "data"
    summary = run_preprocessing(manifest, out, CONFIG, progress=False)
    assert no_leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "rejects.csv", "slices", "splits.csv"]

    # every bad patient is listed with its file and problem; the good ones all came out
    rejects = list(csv.DictReader((out / "rejects.csv").open()))
    for pid, problem in BAD.items():
        hits = [r for r in rejects if r["patient_id"] == pid]
        assert hits and all(problem in r["problem"] and r["file"] for r in hits), (pid, rejects)
    assert len(summary.rejects) == len(rejects) == len(BAD) + 1  # the duplicate id twice
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 12 and splits.patient_id.is_unique
    assert list(splits.columns) == ["patient_id", "subject_id", "cohort", "tracer", "role", "split"]

    # split rules, and each file in the folder of its split
    assert set(splits[splits.role == "external"].split) == {"test"}
    assert set(splits[splits.role == "negative_control"].split) <= {"train", "valid"}
    assert splits[splits.split == "tune"].groupby("cohort").size().to_dict() == {"lung": 1, "lymphoma": 1}
    for row in splits.itertuples():
        assert (out / "slices" / row.split / f"{row.patient_id}.parquet").is_file()
    assert sum(len(list((out / "slices" / s).glob("*.parquet"))) for s in SPLITS) == 12

    # schema: readable by plain pyarrow and pandas; labels follow the masks
    for split in SPLITS:
        table = pq.read_table(f"{out}/slices/{split}")
        validate_table(table)
        df = pd.read_parquet(f"{out}/slices/{split}")
        assert len(df) == table.num_rows == 12 * len(splits[splits.split == split])
        if len(df):
            masks = stack_images(table.column("mask"), 16, 16, np.uint8)
            images = stack_images(table.column("image"), 16, 16)
            assert images.min() >= 0 and images.max() <= 1
            np.testing.assert_array_equal(table.column("label").to_numpy() == UNHEALTHY,
                                          masks.reshape(len(masks), -1).any(1))
            assert "split" not in df.columns  # the folder says it
    neg = read_split(out, "train", columns=["patient_id", "label"]).to_pandas()
    assert set(neg[neg.patient_id.str.startswith("negative")].label) <= {1}

    info = read_dataset_info(out)
    assert info["patients"] == 12 and info["rejected"] == len(rejects)
    assert sum(info["splits"][s]["patients"] for s in SPLITS) == 12
    assert info["splits"]["test"]["cohorts"]["sarcoma"]["patients"] == 2
    assert info["config"]["output_size"] == [16, 16, 12] and "monai" in info["versions"]
    tot = info["splits"]["train"]
    assert tot["label_1"] + tot["label_2"] == tot["slices"] == read_split(out, "train").num_rows
    # coverage: every lesion voxel kept; unhealthy slices per split and cohort as in the counts
    assert info["coverage"]["cohorts"]["sarcoma"]["lesion_voxels_outside"] == 0
    assert info["coverage"]["patients"]["lung0"]["input_slices"] == 20
    assert info["unhealthy_slices"]["test"]["sarcoma"] == info["splits"]["test"]["cohorts"]["sarcoma"]["label_2"] > 0
    assert info["num_slices_per_volume"] is None and info["slices_per_volume"]["max"] == 12
    assert summary.coverage["lung"]["lesion_voxels_outside"] == 0


@pytest.mark.ray
def test_strict_and_nothing_survived_write_nothing_and_keep_the_old_dataset(ray_session, tmp_path):
    manifest = make_study(tmp_path / "study")
    out = tmp_path / "data"
    with pytest.raises(PreprocessingError, match="rejected with --strict"):
        run_preprocessing(manifest, out, CONFIG, strict=True, progress=False)
    assert not out.exists() and no_leftovers(out)

    good = run_preprocessing(make_study(tmp_path / "good", bad=False), out, CONFIG, progress=False)
    before = (out / "dataset.json").read_text()
    all_bad = write_manifest_csv(tmp_path / "bad.csv", [("x", "a", "FDG", "none.nii.gz", "", "internal")])
    with pytest.raises(PreprocessingError, match="no patient survived"):
        run_preprocessing(all_bad, out, CONFIG, progress=False)
    assert (out / "dataset.json").read_text() == before and no_leftovers(out)
    assert sum(good.patients.values()) == 12


@pytest.mark.ray
def test_a_crash_before_the_end_leaves_the_previous_dataset_intact(ray_session, tmp_path, monkeypatch):
    out = tmp_path / "data"
    run_preprocessing(make_study(tmp_path / "a", bad=False), out, CONFIG, progress=False)
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(build, "_write_csv", crash)
    with pytest.raises(OSError, match="disk full"):
        run_preprocessing(make_study(tmp_path / "b", bad=False), out, CONFIG, progress=False)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert no_leftovers(out)


@pytest.mark.ray
def test_cli_on_the_sts_crops_manifest(ray_session, sts_crops, tmp_path, capsys):
    from ray_jobs.preprocess import main

    config = tmp_path / "small.yaml"
    config.write_text("preprocess:\n  spacing_mm: [8.0, 8.0, 8.0]\n  crop_size: [32, 32, 48]\n"
                      "  output_size: [16, 16, 24]\n")
    out = tmp_path / "sts"
    assert main(["--manifest", str(sts_crops / "manifest.csv"), "--output", str(out),
                 "--config", str(config), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rejected"] == 0 and sum(printed["patients"].values()) == 35
    splits = pd.read_csv(out / "splits.csv")
    assert splits.split.value_counts().to_dict() == {"train": 21, "test": 9, "valid": 4, "tune": 2} or \
        splits.split.value_counts().sum() == 35
    assert (splits.split == "tune").sum() == 2
    test = read_split(out, "test")
    validate_table(test)
    assert (test.column("label").to_numpy() == UNHEALTHY).any()  # the sarcomas are there
    assert main(["--manifest", str(tmp_path / "none.csv"), "--output", str(out)]) == 2


@pytest.mark.ray
def test_job_on_a_generated_phantom_study(ray_session, test_config, tmp_path):
    from igconda.data.phantoms import generate_study

    manifest = generate_study(tmp_path / "study", test_config.phantoms, progress=False)
    out = tmp_path / "data"
    summary = run_preprocessing(manifest, out, test_config, progress=False)
    assert summary.rejects == []
    splits = pd.read_csv(out / "splits.csv")
    assert splits.patient_id.is_unique and len(splits) == len(pd.read_csv(manifest))
    assert set(splits[splits.role == "external"].split) == {"test"}
    assert set(splits[splits.role == "negative_control"].split) <= {"train", "valid"}
    assert (splits.split == "tune").sum() == test_config.preprocess.tune_per_cohort * splits[
        splits.role == "internal"].cohort.nunique()
    h, w, _ = test_config.preprocess.output_size
    train = read_split(out, "train")
    # the whole axial extent: each volume has its own number of slices, all of them present
    depths = train.select(["patient_id", "num_slices"]).to_pandas().groupby("patient_id").num_slices
    assert (depths.size() == depths.first()).all() and train.num_rows == depths.first().sum()
    info = read_dataset_info(out)
    assert info["slices_per_volume"]["max"] > info["slices_per_volume"]["min"]
    assert set(train.column("height").to_pylist()) == {h}
    assert (train.column("label").to_numpy() == UNHEALTHY).any()
