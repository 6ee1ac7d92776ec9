"""Every bad-input case of igconda.data.volumes gives a VolumeError naming the file and problem."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from igconda.data.volumes import AFFINE_TOLERANCE_MM, VolumeError, load_mask, load_pet
from tests.data.nifti_fixtures import LPS, pet_and_mask, write_nifti


@pytest.fixture
def pet_file(tmp_path):
    pet, _ = pet_and_mask()
    return write_nifti(tmp_path / "pet.nii.gz", pet, LPS)


def _err(fn, *args) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        fn(*args)
    return info.value


def test_good_pet_and_mask_load(pet_file, tmp_path):
    pet = load_pet(pet_file)
    assert pet.data.shape == (24, 24, 20) and pet.data.dtype == np.float32
    np.testing.assert_allclose(pet.affine, LPS)
    _, mask = pet_and_mask()
    m = load_mask(write_nifti(tmp_path / "m.nii.gz", mask, LPS), pet)
    assert m.data.dtype == np.uint8 and m.data.sum() == mask.sum()


def test_missing_file(tmp_path):
    err = _err(load_pet, tmp_path / "nope.nii.gz")
    assert err.path == str(tmp_path / "nope.nii.gz") and "not found" in err.problem
    assert str(tmp_path / "nope.nii.gz") in str(err)


@pytest.mark.parametrize("content", [b"garbage, not a nifti", "truncated"])
def test_corrupt_file(pet_file, tmp_path, content):
    bad = tmp_path / "bad.nii.gz"
    if content == "truncated":
        raw = pet_file.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    else:
        bad.write_bytes(gzip.compress(content))
    err = _err(load_pet, bad)
    assert err.path == str(bad) and "corrupt" in err.problem


def test_2d_image_rejected(tmp_path):
    f = write_nifti(tmp_path / "flat.nii.gz", np.ones((8, 8), np.float32))
    assert "expected a 3D image, got 2D" in _err(load_pet, f).problem


def test_4d_image_rejected(tmp_path):
    f = write_nifti(tmp_path / "dyn.nii.gz", np.ones((8, 8, 8, 3), np.float32))
    assert "got 4D" in _err(load_pet, f).problem


def test_4d_singleton_is_squeezed_and_reported(tmp_path):
    f = write_nifti(tmp_path / "s.nii.gz", np.ones((8, 8, 6, 1), np.float32))
    pet = load_pet(f)
    assert pet.data.shape == (8, 8, 6)
    assert any("squeezed" in n for n in pet.notes)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pet(tmp_path, value):
    pet, _ = pet_and_mask()
    pet[3, 4, 5] = value
    f = write_nifti(tmp_path / "nan.nii.gz", pet)
    assert "1 NaN/Inf voxel" in _err(load_pet, f).problem


def test_all_zero_pet(tmp_path):
    f = write_nifti(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), np.float32))
    assert "all zero" in _err(load_pet, f).problem


def test_mask_shape_mismatch(pet_file, tmp_path):
    m = write_nifti(tmp_path / "m.nii.gz", np.zeros((24, 24, 19), np.uint8), LPS)
    err = _err(load_mask, m, load_pet(pet_file))
    assert err.path == str(m) and "shape (24, 24, 19) does not match PET shape (24, 24, 20)" in err.problem


def test_mask_affine_mismatch(pet_file, tmp_path):
    _, mask = pet_and_mask()
    shifted = LPS.copy()
    shifted[0, 3] += 10 * AFFINE_TOLERANCE_MM
    err = _err(load_mask, write_nifti(tmp_path / "m.nii.gz", mask, shifted), load_pet(pet_file))
    assert "affine differs" in err.problem


def test_mask_affine_within_tolerance_is_accepted(pet_file, tmp_path):
    _, mask = pet_and_mask()
    nudged = LPS.copy()
    nudged[0, 3] += 0.1 * AFFINE_TOLERANCE_MM
    assert load_mask(write_nifti(tmp_path / "m.nii.gz", mask, nudged), load_pet(pet_file)).data.sum() > 0


@pytest.mark.parametrize("bad_value", [2, 0.5, -1])
def test_non_binary_mask(pet_file, tmp_path, bad_value):
    _, mask = pet_and_mask()
    mask = mask.astype(np.float32)
    mask[0, 0, 0] = bad_value
    err = _err(load_mask, write_nifti(tmp_path / "m.nii.gz", mask, LPS), load_pet(pet_file))
    assert "not binary" in err.problem


def test_multi_label_mask_is_binarized_only_when_asked(pet_file, tmp_path):
    _, mask = pet_and_mask()
    labels = mask.astype(np.int16)
    labels[labels > 0] = 2  # HECKTOR-style: 1 primary tumour, 2 lymph nodes
    labels[0, 0, 0] = 1
    path = write_nifti(tmp_path / "m.nii.gz", labels, LPS)
    assert "binarize_mask" in _err(load_mask, path, load_pet(pet_file)).problem
    loaded = load_mask(path, load_pet(pet_file), binarize=True)
    assert loaded.data.dtype == np.uint8 and set(np.unique(loaded.data)) == {0, 1}
    assert int(loaded.data.sum()) == int((labels > 0).sum())


@pytest.mark.parametrize("bad_value", [0.5, -1])
def test_binarize_still_rejects_non_integer_or_negative_labels(pet_file, tmp_path, bad_value):
    _, mask = pet_and_mask()
    mask = mask.astype(np.float32)
    mask[0, 0, 0] = bad_value
    err = _err(load_mask, write_nifti(tmp_path / "m.nii.gz", mask, LPS), load_pet(pet_file), True)
    assert "non-negative integers" in err.problem


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
def test_binary_masks_of_any_dtype_are_accepted(pet_file, tmp_path, dtype):
    _, mask = pet_and_mask()
    m = load_mask(write_nifti(tmp_path / "m.nii.gz", mask.astype(dtype), LPS), load_pet(pet_file))
    np.testing.assert_array_equal(m.data, mask)


def test_volume_error_pickles_with_fields():
    import pickle

    err = pickle.loads(pickle.dumps(VolumeError("/x.nii.gz", "bad")))
    assert (err.path, err.problem) == ("/x.nii.gz", "bad")


def test_a_ct_in_hounsfield_units_is_refused_as_pet(tmp_path):
    from tests.data.nifti_fixtures import ct_like

    f = write_nifti(tmp_path / "ct.nii.gz", ct_like())
    err = _err(load_pet, f)
    assert err.path == str(f)
    assert "does not look like a PET in SUV" in err.problem and "Hounsfield" in err.problem
    # A CT cropped to the body (no air at -1000, but fat and lung) is refused too.
    body = ct_like(shape=(40, 40, 20))[10:30, 10:30]
    assert "Hounsfield" in _err(load_pet, write_nifti(tmp_path / "body.nii.gz", body)).problem


def test_an_activity_image_in_bq_per_ml_is_refused_as_pet(tmp_path):
    pet, _ = pet_and_mask()
    f = write_nifti(tmp_path / "bqml.nii.gz", pet * 5000.0)  # SUV ~1 -> ~5000 Bq/mL
    err = _err(load_pet, f)
    assert "does not look like a PET in SUV" in err.problem and "convert it to SUV" in err.problem


def test_small_negative_reconstruction_noise_and_hot_spots_still_pass(tmp_path):
    pet, _ = pet_and_mask()
    rng = np.random.default_rng(1)
    noisy = pet + rng.normal(0, 0.5, pet.shape).astype(np.float32)  # many voxels slightly < 0
    noisy[0, 0, :5] = -60.0  # and a few outliers, as a streak artefact might give
    noisy[1, 1, 0] = -900.0
    noisy[5, 5, 5] = 2500.0  # one implausibly hot voxel alone is not a unit problem
    assert (noisy < 0).mean() > 0.01
    pet_loaded = load_pet(write_nifti(tmp_path / "noisy.nii.gz", noisy))
    assert pet_loaded.data.min() == -900.0
