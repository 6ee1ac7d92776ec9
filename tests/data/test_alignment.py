"""Mask and PET on one sampling grid, the whole axial extent, the FOV on the body, coverage.

Hand-made volumes whose answer is known: a lesion's mask centroid after preprocessing must be
the PET hot spot's, a voxel must map back to the world point it came from for any depth and any
in-plane FOV placement, and every lesion voxel the FOV leaves out must be counted."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from igconda.config import PreprocessConfig
from igconda.data.fov import body_centre, output_depth
from igconda.data.preprocess import preprocess_arrays
from igconda.export import to_original_grid


def cfg(spacing, crop, out, extent="whole", centre="body") -> PreprocessConfig:
    return PreprocessConfig(spacing_mm=tuple(map(float, spacing)), crop_size=tuple(crop),
                            output_size=tuple(out), axial_extent=extent, fov_centre=centre)


def world(affine: np.ndarray, ijk) -> np.ndarray:
    ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1).astype(np.uint8)


@pytest.mark.parametrize("factor", [2, 3, 2.5])
def test_lesion_centroid_matches_the_pet_hot_spot(factor):
    # An off-grid ellipsoidal lesion in a flat background; PET and mask share its extent, so after
    # preprocessing the mask centroid must sit where the PET's excess uptake is centred.
    out_n = 12
    n = int(round(out_n * factor))
    mask = ellipsoid((n, n, n), centre=(0.43 * n, 0.57 * n, 0.51 * n), radii=(0.21 * n, 0.17 * n, 0.26 * n))
    pet = (1.0 + 9.0 * mask).astype(np.float32)
    out = preprocess_arrays(pet, np.eye(4), mask, cfg((1, 1, 1), (n, n, n), (out_n,) * 3, extent="crop",
                                                      centre="array"))
    excess = out.image - np.median(out.image)
    excess[excess < 0] = 0
    hot = (np.argwhere(excess > -1) * excess.reshape(-1, 1)).sum(0) / excess.sum()
    lesion = np.argwhere(out.mask).mean(0)
    # nearest-neighbour masks were off by one input voxel per axis (1/factor of an output voxel)
    assert np.all(np.abs(lesion - hot) < 0.12), (lesion, hot)
    # and both agree with the input lesion in world coordinates
    before = world(np.eye(4), np.argwhere(mask).mean(0))[0]
    after = world(out.geometry["output_affine"], lesion)[0]
    assert np.all(np.abs(after - before) < 0.12 * factor), (before, after)


def test_whole_extent_keeps_every_slice_and_the_crop_option_does_not():
    # 4 mm slices over 400 mm; output slices of 8 * 4 / 4 = 8 mm: 50 of them, lesion near the top.
    shape = (16, 16, 100)
    pet = np.ones(shape, np.float32)
    pet[0, 0, :] = 2.0  # not constant inside the crop
    mask = np.zeros(shape, np.uint8)
    mask[6:10, 6:10, 92:96] = 1
    pet[mask > 0] = 6.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    whole = preprocess_arrays(pet, affine, mask, cfg((4, 4, 4), (16, 16, 8), (8, 8, 4)))
    assert whole.image.shape == (8, 8, 50)
    assert whole.coverage == {"lesion_voxels": 64, "lesion_voxels_outside": 0, "fraction_outside": 0.0}
    np.testing.assert_allclose(np.diag(whole.geometry["output_affine"])[:3], [8, 8, 8], atol=1e-6)
    crop = preprocess_arrays(pet, affine, mask, cfg((4, 4, 4), (16, 16, 40), (8, 8, 20), extent="crop"))
    assert crop.image.shape == (8, 8, 20)
    assert crop.coverage["lesion_voxels_outside"] == 64 and crop.coverage["fraction_outside"] == 1.0
    assert any("outside the field of view" in n for n in crop.notes)


@pytest.mark.parametrize("slices,crop_z,out_z,expected", [(100, 8, 4, (50, 100)), (101, 8, 4, (51, 102)),
                                                          (7, 3, 1, (3, 9)), (10, 5, 2, (4, 10))])
def test_output_depth(slices, crop_z, out_z, expected):
    assert output_depth(slices, crop_z, out_z) == expected


def off_centre_body(shape=(60, 40, 37), centre=(40, 18), radius=(14, 10)):
    """A uniform elliptic 'body' whose in-plane centre is far from the array's."""
    xy = ellipsoid(shape[:2], centre, radius)
    pet = np.repeat(xy[:, :, None], shape[2], axis=2).astype(np.float32)
    pet += 0.01  # air is not exactly 0 in a reconstruction
    return pet


def test_body_centre_is_the_bounding_box_centre_of_the_body():
    pet = off_centre_body()
    np.testing.assert_allclose(body_centre(pet), [40, 18], atol=0.5)
    pet[2, 2, :] = 50.0  # a hot speck in the air does not move it
    np.testing.assert_allclose(body_centre(pet), [40, 18], atol=0.5)


def test_fov_on_the_body_keeps_a_lesion_the_array_centre_cuts_and_maps_back_to_the_world():
    pet = off_centre_body()
    mask = np.zeros(pet.shape, np.uint8)
    mask[50:54, 17:20, 12:15] = 1  # at the body's right edge (x = 26..54)
    pet[mask > 0] = 8.0
    affine = np.array([[3.0, 0, 0, -90.0], [0, 3.0, 0, -60.0], [0, 0, 3.0, 200.0], [0, 0, 0, 1]])
    c = dict(spacing=(3, 3, 3), crop=(32, 32, 6), out=(16, 16, 3))
    array = preprocess_arrays(pet, affine, mask, cfg(c["spacing"], c["crop"], c["out"], centre="array"))
    body = preprocess_arrays(pet, affine, mask, cfg(c["spacing"], c["crop"], c["out"], centre="body"))
    assert array.coverage["lesion_voxels_outside"] == 36 and array.mask.sum() == 0
    assert body.coverage["lesion_voxels_outside"] == 0 and body.mask.sum() > 0
    # 37 slices of 3 mm -> output slices of 6 * 3 / 3 = 6 mm: 19 slices, padded at one end.
    assert body.image.shape == (16, 16, 19)
    # A known voxel maps back to its world position: the lesion's centre, through the output
    # affine of an off-centre FOV and a depth that no config states.
    geo = body.geometry
    before = world(affine, np.argwhere(mask).mean(0))[0]
    after = world(geo["output_affine"], np.argwhere(body.mask).mean(0))[0]
    assert np.all(np.abs(after - before) <= 3.0 + 1e-6), (before, after)
    # export's inverse: the output mask on the source grid overlaps the source lesion.
    back = np.asarray(to_original_grid(body.mask.astype(np.float32), geo, order=0).dataobj)
    assert back.shape == pet.shape
    overlap = (back > 0) & (mask > 0)
    assert overlap.sum() >= 0.5 * mask.sum()
    # The FOV's corner is on the body, not the array: its 32 columns are centred on the body's
    # x = 40 (source voxels 25..56), so its edge is the edge of source voxel 25.
    corner = world(geo["output_affine"], (-0.5, -0.5, -0.5))[0]
    assert corner[0] == pytest.approx(-90.0 + 3.0 * 24.5, abs=1e-4)


def test_coverage_counts_a_lesion_half_outside_the_fov():
    pet = np.ones((40, 40, 10), np.float32)
    pet[20, 20, 0] = 2.0
    mask = np.zeros(pet.shape, np.uint8)
    mask[2:10, 18:22, 4:6] = 1  # x 2..9, FOV x 4..35 (32 voxels, array-centred): 2 of 8 columns out
    out = preprocess_arrays(pet, np.eye(4), mask, cfg((1, 1, 1), (32, 32, 10), (16, 16, 5), centre="array"))
    assert out.coverage == {"lesion_voxels": 64, "lesion_voxels_outside": 16, "fraction_outside": 0.25}


def test_nifti_round_trip_of_a_hot_voxel(tmp_path):
    # A 2x2x2 hot cube of an LPS scan: its uptake-weighted centre in the output is its world
    # centre, and the image written back on the source grid peaks on the cube's voxels.
    shape = (30, 24, 21)
    pet = np.ones(shape, np.float32)
    pet[10:12, 6:8, 14:16] = 20.0
    lps = np.array([[-2.0, 0, 0, 30.0], [0, -2.0, 0, 20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
    out = preprocess_arrays(pet, lps, None, cfg((2, 2, 2), (24, 24, 8), (12, 12, 4)))
    excess = out.image - np.median(out.image)
    excess[excess < 0] = 0
    hot = (np.indices(out.image.shape).reshape(3, -1) * excess.ravel()).sum(1) / excess.sum()
    np.testing.assert_allclose(world(out.geometry["output_affine"], hot)[0],
                               world(lps, (10.5, 6.5, 14.5))[0], atol=1e-3)
    back = to_original_grid(out.image, out.geometry, order=1)
    nib.save(back, str(tmp_path / "b.nii.gz"))
    data = np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj)
    excess = data - np.median(data)
    excess[excess < 0] = 0
    centre = (np.indices(shape).reshape(3, -1) * excess.ravel()).sum(1) / excess.sum()
    np.testing.assert_allclose(centre, (10.5, 6.5, 14.5), atol=0.25)
