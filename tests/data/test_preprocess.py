"""preprocess_volume against hand-computed cases: orientation, spacing, pad vs crop, scaling,
output affine (world points map to the same place), mask resizing, and slice labels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from igconda.config import PreprocessConfig
from igconda.data.preprocess import preprocess_arrays, preprocess_volume
from igconda.data.schema import GEOMETRY_KEYS, UNHEALTHY, volume_to_rows
from igconda.data.volumes import VolumeError
from tests.data.nifti_fixtures import pet_and_mask, write_nifti


def cfg(spacing, crop, out=None, extent="crop", centre="array") -> PreprocessConfig:
    """The paper's fixed centre crop unless told otherwise (most tests here check that chain)."""
    return PreprocessConfig(spacing_mm=tuple(map(float, spacing)), crop_size=tuple(crop),
                            output_size=tuple(out or crop), axial_extent=extent, fov_centre=centre)


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def test_lps_input_equals_the_ras_flipped_array():
    rng = np.random.default_rng(0)
    data = (1 + rng.random((6, 5, 4))).astype(np.float32)
    lps = np.array([[-2.0, 0, 0, 40.0], [0, -2.0, 0, 30.0], [0, 0, 3.0, -50.0], [0, 0, 0, 1]])
    # The same scan stored RAS: flip x and y, move the origin to the other end.
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    ras[:3, 3] = [40.0 - 2.0 * 5, 30.0 - 2.0 * 4, -50.0]
    c = cfg((2, 2, 3), data.shape)
    a = preprocess_arrays(data, lps, None, c)
    b = preprocess_arrays(np.ascontiguousarray(data[::-1, ::-1]), ras, None, c)
    np.testing.assert_allclose(a.image, minmax(data[::-1, ::-1]), atol=1e-5)
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)
    np.testing.assert_allclose(a.geometry["output_affine"], ras, atol=1e-4)
    np.testing.assert_allclose(b.geometry["output_affine"], ras, atol=1e-4)


def test_spacing_gives_the_hand_computed_shape_then_centre_pad():
    # 20 x 16 x 12 voxels of 2 mm = 40 x 32 x 24 mm -> 10 x 8 x 6 voxels of 4 mm; padding to
    # 14 x 12 x 10 adds 2 zero voxels on each side.
    data = np.full((20, 16, 12), 3.0, np.float32)
    data[0, 0, 0] = 5.0  # so min-max has a range; the pad (0) becomes the minimum
    out = preprocess_arrays(data, np.diag([2.0, 2.0, 2.0, 1.0]), None, cfg((4, 4, 4), (14, 12, 10)))
    inside = np.zeros(out.image.shape, bool)
    inside[2:12, 2:10, 2:8] = True
    assert np.all(out.image[inside] > 0.5) and np.all(out.image[~inside] == 0)
    assert out.scale_min == 0.0
    np.testing.assert_allclose(np.diag(out.geometry["output_affine"])[:3], [4, 4, 4], atol=1e-5)


def test_crop_takes_the_centre():
    rng = np.random.default_rng(1)
    data = rng.random((8, 8, 8)).astype(np.float32)
    out = preprocess_arrays(data, np.eye(4), None, cfg((1, 1, 1), (4, 4, 4)))
    centre = data[2:6, 2:6, 2:6]
    np.testing.assert_allclose(out.image, minmax(centre), atol=1e-5)
    assert out.scale_min == pytest.approx(centre.min()) and out.scale_max == pytest.approx(centre.max())
    assert out.suv_max == pytest.approx(data.max())  # of the ORIGINAL volume, not the crop
    # voxel (0, 0, 0) of the output is input voxel (2, 2, 2)
    np.testing.assert_allclose(world(out.geometry["output_affine"], (0, 0, 0)), [2, 2, 2], atol=1e-5)


def test_pad_where_smaller_instead_of_stretching():
    rng = np.random.default_rng(2)
    data = (1 + rng.random((8, 8, 8))).astype(np.float32)
    out = preprocess_arrays(data, np.eye(4), None, cfg((1, 1, 1), (12, 12, 12)))
    np.testing.assert_allclose(out.image, minmax(np.pad(data, 2)), atol=1e-5)
    np.testing.assert_allclose(world(out.geometry["output_affine"], (2, 2, 2)), [0, 0, 0], atol=1e-5)


def test_mixed_pad_and_crop_per_axis():
    data = (1 + np.random.default_rng(3).random((10, 4, 6))).astype(np.float32)
    out = preprocess_arrays(data, np.eye(4), None, cfg((1, 1, 1), (6, 8, 6)))
    np.testing.assert_allclose(out.image, minmax(np.pad(data[2:8], ((0, 0), (2, 2), (0, 0)))), atol=1e-5)


def test_output_is_float_in_unit_range_with_geometry():
    pet, mask = pet_and_mask()
    out = preprocess_arrays(pet, np.diag([-4.0, -4.0, 4.0, 1.0]), mask, cfg((4, 4, 4), (24, 24, 20), (12, 12, 10)))
    assert out.image.shape == (12, 12, 10) and out.image.dtype == np.float32
    assert out.mask.shape == (12, 12, 10) and out.mask.dtype == np.uint8
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert set(out.geometry) == set(GEOMETRY_KEYS)
    np.testing.assert_array_equal(out.geometry["original_shape"], pet.shape)
    np.testing.assert_array_equal(out.geometry["output_shape"], (12, 12, 10))
    # downsampling by 2 doubles the voxel size, and the axes are RAS (positive diagonal)
    np.testing.assert_allclose(np.diag(out.geometry["output_affine"])[:3], [8, 8, 8], atol=1e-5)


def test_a_world_point_maps_to_the_same_place_after_all_transforms():
    # Anisotropic LPS scan, resampled, cropped and downsampled: the lesion centroid in world
    # coordinates must stay put (within one output voxel).
    shape = (40, 36, 30)
    lesion_at = (27, 10, 19)
    pet, mask = pet_and_mask(shape=shape, lesion_at=lesion_at, radius=3)
    affine = np.array([[-3.5, 0, 0, 100.0], [0, -3.5, 0, 60.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    out = preprocess_arrays(pet, affine, mask, cfg((2, 2, 3), (64, 64, 32), (32, 32, 16)))
    before = world(affine, np.argwhere(mask).mean(0))
    after = world(out.geometry["output_affine"], np.argwhere(out.mask).mean(0))
    # The hot spot of the image, too: the centroid of the voxels above half maximum.
    hot = world(out.geometry["output_affine"], np.argwhere(out.image > 0.5).mean(0))
    voxel = np.abs(np.diag(out.geometry["output_affine"])[:3])
    assert np.all(np.abs(after - before) <= voxel / 2 + 1e-3), (before, after)
    assert np.all(np.abs(hot - before) <= voxel / 2 + 1e-3), (before, hot)


def test_tiny_lesion_is_kept_by_the_mask_resize():
    pet = np.ones((12, 12, 12), np.float32)
    pet[0, 0, 0] = 2.0
    mask = np.zeros_like(pet, dtype=np.uint8)
    mask[7, 7, 7] = 1  # nearest samples input voxels 0, 3, 6, 9: it would drop this lesion
    big = np.zeros_like(mask)
    big[0:6, 0:6, 0:6] = 1
    out = preprocess_arrays(pet, np.eye(4), mask | big, cfg((1, 1, 1), (12, 12, 12), (4, 4, 4)))
    assert out.mask[2, 2, 2] == 1  # the output voxel holding input voxel 7 (7 // 3 = 2)
    assert out.mask[0:2, 0:2, 0:2].all() and out.mask.sum() == 8 + 1  # big lesion not dilated
    assert any("kept 1 lesion" in n for n in out.notes)


def test_mask_resize_uses_the_pet_blocks_not_their_first_voxel():
    # A lesion filling input planes 1-2 of the block 0-2 (and nothing else): nearest would read
    # plane 0 and call the slice healthy; the block holds 2/3 lesion, so it is lesion.
    pet = np.ones((6, 6, 6), np.float32)
    pet[0, 0, 0] = 2.0
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[:, :, 1:3] = 1
    out = preprocess_arrays(pet, np.eye(4), mask, cfg((1, 1, 1), (6, 6, 6), (2, 2, 2)))
    assert out.mask[:, :, 0].all() and not out.mask[:, :, 1].any()


def test_no_mask_gives_zeros_and_constant_volume_is_rejected():
    pet, _ = pet_and_mask()
    out = preprocess_arrays(pet, np.eye(4), None, cfg((2, 2, 2), (12, 12, 10)))
    assert out.mask.sum() == 0
    with pytest.raises(VolumeError, match="constant"):
        preprocess_arrays(np.full((8, 8, 8), 2.0, np.float32), np.eye(4), None, cfg((1, 1, 1), (4, 4, 4)))


def test_slice_labels_are_two_iff_any_mask_pixel():
    pet, mask = pet_and_mask(shape=(16, 16, 12), lesion_at=(8, 8, 5), radius=2)
    out = preprocess_arrays(pet, np.eye(4), mask, cfg((1, 1, 1), (16, 16, 12)))
    table = volume_to_rows(out.image, out.mask, patient_id="p", cohort="c", tracer="FDG", role="internal",
                           suv_max=out.suv_max, scale_min=out.scale_min,
                           scale_max=out.scale_max, pet_path="p.nii.gz", geometry=out.geometry)
    labels = table.column("label").to_numpy()
    expected = out.mask.reshape(-1, out.mask.shape[2]).any(axis=0)
    np.testing.assert_array_equal(labels == UNHEALTHY, expected)
    assert 0 < expected.sum() < len(expected)  # the case has both kinds of slice


def test_preprocess_volume_reads_files_and_reports_bad_ones(tmp_path):
    pet, mask = pet_and_mask()
    p = write_nifti(tmp_path / "p.nii.gz", pet)
    m = write_nifti(tmp_path / "m.nii.gz", mask[:, :, :-1])
    with pytest.raises(VolumeError) as info:
        preprocess_volume(p, m, cfg((4, 4, 4), (8, 8, 8)))
    assert info.value.path == str(m)


@pytest.mark.parametrize("pid", ["STS_002", "STS_011", "STS_035"])
def test_sts_crops_patients(sts_crops, pid):
    pet_path, mask_path = sts_crops / "images" / f"{pid}.nii.gz", sts_crops / "labels" / f"{pid}.nii.gz"
    if not pet_path.is_file():
        pytest.skip(f"{pid} not in this copy of sts-crops")
    c = cfg((4, 4, 4), (64, 64, 96), (32, 32, 48))
    out = preprocess_volume(pet_path, mask_path, c)
    img = nib.load(str(pet_path))
    assert out.image.shape == (32, 32, 48) and 0 <= out.image.min() and out.image.max() <= 1
    assert out.suv_max == pytest.approx(float(np.asarray(img.dataobj).max()))
    assert out.mask.sum() > 0
    in_mask = np.asarray(nib.load(str(mask_path)).dataobj)
    before = world(img.affine, np.argwhere(in_mask).mean(0))
    after = world(out.geometry["output_affine"], np.argwhere(out.mask).mean(0))
    assert np.linalg.norm(after - before) < 8.0  # within one 8 mm output voxel
