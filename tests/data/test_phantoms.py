"""igconda.data.phantoms: files and manifest, determinism, hardness for thresholding, geometry."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from igconda.config import PhantomConfig
from igconda.data import phantoms
from igconda.data.phantoms import (
    COHORTS,
    LABELS,
    MANIFEST_COLUMNS,
    NEGATIVE_CONTROL,
    generate_study,
    main,
    make_patient,
)

# Every cohort, two patients each, on the test grid (32 × 32 × 40 at 12 mm): ~0.03 s a patient.
ALL_COHORTS = PhantomConfig(
    cohorts={name: 2 for name in COHORTS}, negative_controls=2, shape=(32, 32, 40),
    spacing_mm=(12.0, 12.0, 12.0), seed=0,
)
TRACERS = {"lymphoma": "FDG", "lung": "FDG", "melanoma": "FDG", "headneck": "FDG",
           "psma": "PSMA", "sarcoma_ext": "FDG", NEGATIVE_CONTROL: "FDG"}
ROLES = {"sarcoma_ext": "external", NEGATIVE_CONTROL: "negative_control"}


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == MANIFEST_COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The study of ALL_COHORTS written once for the module; returns manifest.csv."""
    return generate_study(tmp_path_factory.mktemp("study"), ALL_COHORTS, progress=False)


@pytest.fixture(scope="module")
def patients() -> list[phantoms.PhantomPatient]:
    """Three patients of every lesion cohort on the test grid, in memory."""
    return [make_patient(ALL_COHORTS, name, i) for name in COHORTS for i in range(3)]


def test_manifest_rows_roles_tracers_and_relative_paths(study: Path):
    rows = read_manifest(study)
    expected = {f"{name}_{i:03d}" for name in COHORTS for i in range(2)}
    expected |= {f"{NEGATIVE_CONTROL}_{i:03d}" for i in range(2)}
    assert {r["patient_id"] for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert r["tracer"] == TRACERS[r["cohort"]]
        assert r["role"] == ROLES.get(r["cohort"], "internal")
        for key in ("pet_path", "mask_path"):
            assert not Path(r[key]).is_absolute()
            assert (study.parent / r[key]).is_file()


def test_volumes_load_with_matching_grid_and_valid_values(study: Path):
    for r in read_manifest(study):
        pet = nib.load(study.parent / r["pet_path"])
        mask = nib.load(study.parent / r["mask_path"])
        assert pet.shape == mask.shape and pet.shape[:2] == ALL_COHORTS.shape[:2]
        assert 800 <= pet.shape[2] * ALL_COHORTS.spacing_mm[2] <= 2000  # a whole body, not a crop
        np.testing.assert_allclose(pet.affine, mask.affine)
        np.testing.assert_allclose(np.diag(pet.affine)[:3], ALL_COHORTS.spacing_mm)
        assert nib.aff2axcodes(pet.affine) == ("R", "A", "S")
        assert pet.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        suv = pet.get_fdata(dtype=np.float32)
        lesion = np.asarray(mask.dataobj)
        assert np.isfinite(suv).all() and suv.min() >= 0 and suv.max() > 1
        assert set(np.unique(lesion)) <= {0, 1}
        if r["role"] == "negative_control":
            assert lesion.sum() == 0
        else:
            assert lesion.sum() > 0


def test_no_temporary_files_left(study: Path):
    assert not list(study.parent.rglob("*.tmp"))
    assert (study.parent / "lesions.csv").is_file()


def test_same_seed_gives_identical_files_and_other_seed_differs(study: Path, tmp_path):
    config = dataclasses.replace(ALL_COHORTS, cohorts={"lung": 2, "psma": 1}, negative_controls=1)
    again = generate_study(tmp_path / "a", config, progress=False)
    for r in read_manifest(again):
        for key in ("pet_path", "mask_path"):
            assert (again.parent / r[key]).read_bytes() == (study.parent / r[key]).read_bytes()
    other = make_patient(dataclasses.replace(config, seed=1), "lung", 0)
    same = make_patient(config, "lung", 0)
    assert not np.array_equal(other.pet, same.pet)


def test_adding_a_cohort_leaves_the_others_unchanged():
    alone = dataclasses.replace(ALL_COHORTS, cohorts={"lymphoma": 2})
    patient = make_patient(alone, "lymphoma", 1)
    # Same (seed, cohort, index) in a larger study: generate_study seeds patients identically.
    reference = make_patient(ALL_COHORTS, "lymphoma", 1)
    np.testing.assert_array_equal(patient.pet, reference.pet)
    np.testing.assert_array_equal(patient.mask, reference.mask)
    assert not np.array_equal(make_patient(alone, "lymphoma", 0).pet, patient.pet)


def test_parallel_workers_write_the_same_study(study: Path, tmp_path):
    config = dataclasses.replace(ALL_COHORTS, cohorts={"headneck": 2}, negative_controls=1)
    manifest = generate_study(tmp_path, config, progress=False, num_workers=2)
    rows = read_manifest(manifest)
    assert [r["patient_id"] for r in rows] == ["headneck_000", "headneck_001",
                                               "negative_control_000"]
    for r in rows:
        assert (manifest.parent / r["pet_path"]).read_bytes() == (
            study.parent / r["pet_path"]).read_bytes()


def test_every_lesion_cohort_has_lesions_and_controls_have_none(patients):
    by_cohort: dict[str, int] = {}
    for p in patients:
        assert p.lesions and p.mask.sum() > 0, p.patient_id
        assert sum(les.mask_voxels for les in p.lesions) == p.mask.sum()
        by_cohort[p.cohort] = by_cohort.get(p.cohort, 0) + len(p.lesions)
    assert set(by_cohort) == set(COHORTS)
    control = make_patient(ALL_COHORTS, NEGATIVE_CONTROL, 0)
    assert control.mask.sum() == 0 and not control.lesions
    assert (control.tracer, control.role) == ("FDG", "negative_control")


def test_lesion_sizes_span_5_to_60_mm():
    diameters = np.array([les.diameter_mm for name in COHORTS for i in range(4)
                          for les in make_patient(ALL_COHORTS, name, i).lesions])
    assert diameters.min() >= 5.0 and diameters.max() <= 60.0
    assert (diameters < 12).any() and (diameters > 40).any()


@pytest.mark.parametrize(("diameter", "spacing"), [(10.0, 4.0), (30.0, 4.0), (60.0, 6.0),
                                                   (30.0, 12.0)])
def test_lesion_mask_volume_matches_its_diameter(diameter, spacing):
    grid = phantoms._Grid((40, 40, 40), (spacing,) * 3)
    act = np.ones(grid.shape, np.float32)
    mask = np.zeros(grid.shape, np.uint8)
    body = np.ones(grid.shape, bool)
    lesion = phantoms.Lesion("test", (1.0, -2.0, 20 * spacing), diameter, 8.0, 1.0, False, False)
    n = phantoms._paint_lesion(grid, act, mask, body, lesion, np.random.default_rng(0))
    sphere = np.pi / 6 * diameter**3 / spacing**3
    assert n == mask.sum()
    assert 0.5 * sphere < n < 1.6 * sphere
    # Partial volume: total extra activity equals the lesion volume times its contrast.
    extra = (act.sum() - act.size) * spacing**3
    assert extra == pytest.approx(7.0 * np.pi / 6 * diameter**3, rel=0.6)


def test_sub_voxel_lesion_keeps_one_mask_voxel():
    grid = phantoms._Grid((16, 16, 16), (12.0, 12.0, 12.0))
    mask = np.zeros(grid.shape, np.uint8)
    lesion = phantoms.Lesion("test", (5.0, 3.0, 90.0), 5.0, 8.0, 1.0, False, False)
    n = phantoms._paint_lesion(grid, np.ones(grid.shape, np.float32), mask,
                               np.ones(grid.shape, bool), lesion, np.random.default_rng(0))
    assert n == 1 and mask[grid.voxel(np.array(lesion.center_mm))] == 1


def test_41_percent_threshold_finds_physiological_false_positives(patients):
    hit = 0
    for p in patients:
        threshold = 0.41 * p.pet.max()
        # Ignore the blurred rim of lesions: anything within 2 voxels of a lesion.
        near_lesion = ndimage.binary_dilation(p.mask > 0, iterations=2)
        false_pos = (p.pet >= threshold) & ~near_lesion
        hit += bool(false_pos.sum() >= 2)
    assert hit >= 0.8 * len(patients)


def test_tracer_physiology():
    config = dataclasses.replace(ALL_COHORTS, shape=(48, 48, 64), spacing_mm=(8.0, 8.0, 10.0))
    fdg = make_patient(config, NEGATIVE_CONTROL, 0)
    psma = make_patient(config, "psma", 0)

    def organ_mean(p, name):
        core = ndimage.binary_erosion(p.labels == LABELS[name])
        return float(p.pet[core].mean())

    # A hot cortex around cooler white matter: mean well above liver, peak far above it.
    assert organ_mean(fdg, "brain") > 1.5 * organ_mean(fdg, "liver")
    assert fdg.pet[fdg.labels == LABELS["brain"]].max() > 2 * organ_mean(fdg, "liver")
    assert 1.5 < organ_mean(fdg, "liver") < 3.5
    assert organ_mean(fdg, "bladder") > organ_mean(fdg, "liver")
    assert organ_mean(psma, "brain") < 0.5
    assert organ_mean(psma, "kidney") > 3 * organ_mean(psma, "liver")
    # Salivary glands are small (a few voxels, no eroded core): compare plain means.
    def salivary_mean(p):
        return float(p.pet[p.labels == LABELS["salivary"]].mean())

    assert salivary_mean(psma) > 2 * salivary_mean(fdg)


@pytest.mark.parametrize(("shape", "spacing"), [((16, 16, 20), (24.0, 24.0, 24.0)),
                                                ((40, 32, 56), (10.0, 12.0, 10.0))])
def test_body_fits_any_grid_with_head_at_the_top(shape, spacing):
    config = dataclasses.replace(ALL_COHORTS, shape=shape, spacing_mm=spacing, scan_length="fixed")
    p = make_patient(config, "headneck", 0)
    assert p.pet.shape == shape and p.mask.any()
    z = np.arange(shape[2])
    brain_z = z[(p.labels == LABELS["brain"]).any(axis=(0, 1))].mean()
    bladder_z = z[(p.labels == LABELS["bladder"]).any(axis=(0, 1))].mean()
    assert brain_z > 0.7 * shape[2] and bladder_z < brain_z
    body = p.labels > 0
    assert not body[[0, -1]].any() and not body[:, [0, -1]].any()  # nothing cut in-plane


def test_unknown_cohort_names_the_known_ones(tmp_path):
    config = dataclasses.replace(ALL_COHORTS, cohorts={"lymphoma": 1, "glioma": 2})
    with pytest.raises(ValueError, match="glioma.*lymphoma.*sarcoma_ext"):
        generate_study(tmp_path, config, progress=False)
    assert not (tmp_path / "manifest.csv").exists()


def test_interrupted_run_leaves_no_manifest_and_no_partial_files(tmp_path, monkeypatch):
    real = phantoms.make_patient
    calls = []

    def flaky(config, cohort, index):
        calls.append(index)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(config, cohort, index)

    monkeypatch.setattr(phantoms.writing, "make_patient", flaky)  # where generate_study looks it up
    config = dataclasses.replace(ALL_COHORTS, cohorts={"lung": 3}, negative_controls=0)
    (tmp_path / "manifest.csv").write_text("patient_id\nfrom_an_earlier_run\n")
    with pytest.raises(RuntimeError, match="disk full"):
        generate_study(tmp_path, config, progress=False)
    assert not (tmp_path / "manifest.csv").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    written = sorted(p.name for p in tmp_path.rglob("*.nii.gz"))
    assert written == ["lung_000_mask.nii.gz", "lung_000_pet.nii.gz"]
    nib.load(tmp_path / "lung" / "lung_000_pet.nii.gz").get_fdata()


def test_cli_writes_the_test_config_study(repo_root, tmp_path, capsys):
    code = main(["--config", str(repo_root / "configs" / "test.yaml"), "--output",
                 str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "manifest" in out and "wrote 9 patients" in out
    assert len(read_manifest(tmp_path / "manifest.csv")) == 9


def voxel(p: phantoms.PhantomPatient, point_mm) -> tuple[int, ...]:
    return tuple(np.round(np.linalg.solve(p.affine, np.r_[point_mm, 1.0])[:3]).astype(int))


def test_lesions_sit_in_their_site_tissue_and_outside_hot_organs(patients):
    hot = {LABELS[name] for name in ("brain", "bladder", "kidney", "myocardium", "outside")}
    in_tissue = []
    for p in patients:
        for les in p.lesions:
            label = int(p.labels[voxel(p, les.center_mm)])
            assert label not in hot, (p.patient_id, les.site)
            in_tissue.append(label in {LABELS[n] for n in phantoms._SITE_TISSUE[les.site]})
    assert np.mean(in_tissue) >= 0.8


def test_cli_reports_a_bad_cohort_in_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("phantoms:\n  cohorts: {glioma: 1}\n  shape: [16, 16, 20]\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "glioma" in err and "psma" in err
    assert not (tmp_path / "out" / "manifest.csv").exists()


# --- whole-body scan lengths --------------------------------------------------------------------

WHOLE_BODY = dataclasses.replace(ALL_COHORTS, cohorts={"headneck": 8, "sarcoma_ext": 8, "lung": 8})


@pytest.fixture(scope="module")
def bodies() -> dict[str, list[phantoms.PhantomPatient]]:
    return {c: [make_patient(WHOLE_BODY, c, i) for i in range(8)] for c in WHOLE_BODY.cohorts}


def z_of(p: phantoms.PhantomPatient, label: str) -> float:
    """Mean z (mm) of an organ's voxels."""
    k = np.nonzero((p.labels == LABELS[label]).any(axis=(0, 1)))[0]
    return float(p.affine[2, 2] * k.mean() + p.affine[2, 3])


def test_scans_are_as_long_as_the_body_head_to_thighs_or_feet(bodies):
    lengths = {c: [p.pet.shape[2] * WHOLE_BODY.spacing_mm[2] for p in ps] for c, ps in bodies.items()}
    for p in (p for ps in bodies.values() for p in ps):
        length = p.pet.shape[2] * WHOLE_BODY.spacing_mm[2]
        assert 800 <= length <= 2000
        assert length - z_of(p, "brain") < 250  # the head is at the top of every scan
        if length > 1400:  # scanned to the feet: the soles within 5 cm of the scan's end
            assert (p.labels[:, :, : int(np.ceil(50 / WHOLE_BODY.spacing_mm[2]))] > 0).any()
    # head-and-neck and lung patients are scanned to mid-thigh, extremity sarcoma mostly to the feet
    assert max(lengths["headneck"] + lengths["lung"]) < 1300
    assert sum(v > 1400 for v in lengths["sarcoma_ext"]) >= 4


def test_lesions_are_where_the_cohort_has_them(bodies):
    for p in bodies["headneck"]:
        for les in p.lesions:  # neck and skull base: between the lungs' apex and the brain
            assert z_of(p, "lung") < les.center_mm[2] < z_of(p, "brain"), (p.patient_id, les.site)
    limb = [(p, les) for p in bodies["sarcoma_ext"] for les in p.lesions if les.site == "limb_soft_tissue"]
    assert limb
    below_pelvis = [les.center_mm[2] < z_of(p, "bladder") for p, les in limb]
    assert np.mean(below_pelvis) >= 0.6  # legs (the rest: arms hanging beside the trunk)


def test_the_body_lies_off_the_array_centre_but_inside_it(bodies):
    offsets = []
    for p in (p for ps in bodies.values() for p in ps):
        body = p.labels > 0
        assert not body[[0, -1]].any() and not body[:, [0, -1]].any()
        xy = np.argwhere(body.any(axis=2))
        offsets.append(np.abs((xy.min(0) + xy.max(0)) / 2 - (np.asarray(body.shape[:2]) - 1) / 2).max())
    assert max(offsets) >= 1.0  # at least one body a voxel or more off the centre
