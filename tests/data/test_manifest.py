"""Manifest parsing, row-level errors, and the AutoPET / HECKTOR folder builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from igconda.data.manifest import (
    ManifestError,
    build_autopet_manifest,
    build_hecktor_manifest,
    parse_manifest,
    read_manifest,
)
from igconda.data.splits import assign_splits
from tests.data.nifti_fixtures import write_manifest_csv, write_nifti

ROW = ("P1", "lymphoma", "FDG", "images/P1.nii.gz", "labels/P1.nii.gz", "internal")


def test_sts_crops_manifest_reads_as_is(sts_crops):
    entries = read_manifest(sts_crops / "manifest.csv")
    assert len(entries) == 35
    assert len({e.patient_id for e in entries}) == 35
    assert {e.role for e in entries} == {"internal"} and {e.tracer for e in entries} == {"FDG"}
    for e in entries:
        assert Path(e.pet_path).is_absolute() and Path(e.pet_path).is_file()
        assert Path(e.mask_path).is_file()


def test_relative_paths_resolve_against_the_manifest_folder_and_absolute_stay(tmp_path):
    absolute = str(tmp_path / "elsewhere" / "P2.nii.gz")
    (tmp_path / "sub").mkdir()
    f = write_manifest_csv(tmp_path / "sub" / "m.csv", [ROW, ("P2", "lung", "FDG", absolute, "", "negative_control")])
    a, b = read_manifest(f)
    assert a.pet_path == str(tmp_path / "sub" / "images" / "P1.nii.gz")
    assert b.pet_path == absolute and b.mask_path is None and b.role == "negative_control"


def test_missing_column_names_file_line_and_column(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("patient_id,cohort,pet_path,mask_path,role\nP1,a,x.nii.gz,,internal\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(f)
    assert info.value.row == 1 and "tracer" in info.value.problem and str(f) in str(info.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")


def test_unknown_role_is_a_row_error(tmp_path):
    f = write_manifest_csv(tmp_path / "m.csv", [ROW, ("P2", "a", "FDG", "p.nii.gz", "", "training")])
    entries, errors = parse_manifest(f)
    assert [e.patient_id for e in entries] == ["P1"]
    assert len(errors) == 1 and errors[0].row == 3 and "unknown role 'training'" in errors[0].problem
    with pytest.raises(ManifestError, match="line 3: unknown role"):
        read_manifest(f)


def test_duplicate_patient_id_rejects_every_copy(tmp_path):
    f = write_manifest_csv(tmp_path / "m.csv", [ROW, ("P2", "a", "FDG", "q.nii.gz", "", "internal"), ROW])
    entries, errors = parse_manifest(f)
    assert [e.patient_id for e in entries] == ["P2"]
    assert [e.row for e in errors] == [2, 4]
    assert all("duplicate patient_id 'P1' (lines 2, 4)" in e.problem for e in errors)


@pytest.mark.parametrize("row, problem", [
    (("", "a", "FDG", "p.nii.gz", "", "internal"), "empty value for patient_id"),
    (("P3", "a", "FDG", "", "", "internal"), "empty value for pet_path"),
    (("../evil", "a", "FDG", "p.nii.gz", "", "internal"), "patient_id '../evil' must start"),
    (("P3", "a", "FDG", "p.nii.gz", "", "internal", "surplus"), "more fields"),
])
def test_other_row_errors(tmp_path, row, problem):
    f = write_manifest_csv(tmp_path / "m.csv", [ROW, row])
    entries, errors = parse_manifest(f)
    assert len(entries) == 1 and len(errors) == 1 and problem in errors[0].problem


def test_empty_manifest(tmp_path):
    f = write_manifest_csv(tmp_path / "m.csv", [])
    with pytest.raises(ManifestError, match="no patients"):
        read_manifest(f)


def _case(folder: Path, name: str, mask_value: int = 1) -> None:
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[1, 1, 1] = mask_value
    write_nifti(folder / "labelsTr" / f"{name}.nii.gz", mask)


def test_autopet_builder(tmp_path):
    root = tmp_path / "autopet"
    for name, lesion in [("fdg_a", 1), ("psma_b", 0)]:
        write_nifti(root / "imagesTr" / f"{name}_0000.nii.gz", np.ones((4, 4, 4), np.float32))  # CT
        write_nifti(root / "imagesTr" / f"{name}_0001.nii.gz", np.ones((4, 4, 4), np.float32))  # PET
        _case(root, name, lesion)
    manifest = build_autopet_manifest(root, tmp_path / "m.csv")
    entries = read_manifest(manifest)
    assert [e.patient_id for e in entries] == ["fdg_a", "psma_b"]
    assert entries[0].pet_path.endswith("imagesTr/fdg_a_0001.nii.gz")
    assert entries[0].mask_path.endswith("labelsTr/fdg_a.nii.gz")
    # lesion-free studies are negative controls by default; the tracer comes from the name
    assert [e.role for e in entries] == ["internal", "negative_control"]
    assert [e.tracer for e in entries] == ["FDG", "PSMA"]
    assert "imagesTr/fdg_a_0001.nii.gz" in manifest.read_text()  # written relative when possible
    kept = read_manifest(build_autopet_manifest(root, tmp_path / "k.csv", empty_mask_role=None, tracer="X"))
    assert [(e.role, e.tracer) for e in kept] == [("internal", "X"), ("internal", "X")]


def test_autopet_builder_keys_subjects_by_patient_not_study(tmp_path):
    # AutoPET names: <tracer>_<patient hash>_<study date>. Two studies of one patient.
    root = tmp_path / "autopet"
    names = ["fdg_0b57b247b6_05-02-2002", "fdg_0b57b247b6_11-30-2002", "psma_95b833d46f153cd2_2017-11-18"]
    for name in names:
        write_nifti(root / "imagesTr" / f"{name}_0001.nii.gz", np.ones((4, 4, 4), np.float32))
        _case(root, name)
    entries = read_manifest(build_autopet_manifest(root))
    assert [e.subject for e in entries] == ["fdg_0b57b247b6", "fdg_0b57b247b6", "psma_95b833d46f153cd2"]
    assert len({e.patient_id for e in entries}) == 3  # still one file per study
    # and the split keeps them together, whatever the seed
    for seed in range(20):
        split = assign_splits(entries, train_fraction=0.34, valid_fraction=0.0, tune_per_cohort=0, seed=seed)
        assert split[names[0]] == split[names[1]]


def test_hecktor_builder(tmp_path):
    root = tmp_path / "hecktor"
    for name in ("CHUM-001", "MDA-002"):
        write_nifti(root / "imagesTr" / f"{name}__CT.nii.gz", np.ones((4, 4, 4), np.float32))
        write_nifti(root / "imagesTr" / f"{name}__PT.nii.gz", np.ones((4, 4, 4), np.float32))
        _case(root, name)
    entries = read_manifest(build_hecktor_manifest(root, cohort="headneck"))
    assert [(e.patient_id, e.cohort) for e in entries] == [("CHUM-001", "headneck"), ("MDA-002", "headneck")]
    assert [e.subject for e in entries] == ["CHUM-001", "MDA-002"]
    assert all(e.mask_path.endswith(f"{e.patient_id}.nii.gz") for e in entries)


def test_builder_without_pet_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no PET files"):
        build_hecktor_manifest(tmp_path / "empty")


def test_one_pet_file_under_two_patient_ids_rejects_both_naming_both(tmp_path):
    write_nifti(tmp_path / "images" / "P1.nii.gz", np.ones((4, 4, 4), np.float32))
    (tmp_path / "images" / "alias.nii.gz").symlink_to(tmp_path / "images" / "P1.nii.gz")
    f = write_manifest_csv(tmp_path / "m.csv", [
        ROW,
        ("P2", "a", "FDG", "q.nii.gz", "", "internal"),
        ("P1-copy", "lymphoma", "FDG", "./images/../images/P1.nii.gz", "", "internal"),
        ("P1-link", "lymphoma", "FDG", str(tmp_path / "images" / "alias.nii.gz"), "", "external"),
    ])
    entries, errors = parse_manifest(f)
    assert [e.patient_id for e in entries] == ["P2"]
    assert [e.row for e in errors] == [2, 4, 5]
    for err in errors:
        assert "'P1' (line 2)" in err.problem and "'P1-copy' (line 4)" in err.problem
        assert "'P1-link' (line 5)" in err.problem and "leak" in err.problem
    assert {e.patient_id for e in errors} == {"P1", "P1-copy", "P1-link"}
    with pytest.raises(ManifestError, match="line 2: the PET file .*P1.nii.gz is listed under"):
        read_manifest(f)


def test_distinct_missing_pet_files_are_not_taken_as_shared(tmp_path):
    f = write_manifest_csv(tmp_path / "m.csv", [ROW, ("P2", "a", "FDG", "q.nii.gz", "", "internal")])
    entries, errors = parse_manifest(f)
    assert [e.patient_id for e in entries] == ["P1", "P2"] and errors == []
