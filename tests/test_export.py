"""igconda.export: preprocessed slices back onto the original scan's grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from igconda.config import PreprocessConfig
from igconda.data.preprocess import preprocess_arrays
from igconda.data.schema import decode_geometry, encode_geometry
from igconda.export import assemble_volume, export_volume, to_original_grid, write_nifti_atomic

# An LPS-stored scan (x and y axes flipped w.r.t. RAS, as DICOM converters often write them) with
# anisotropic voxels and an off-centre origin: the cases where a lost flip or a spacing mix-up
# shows up as a displaced or mirrored map.
SHAPE = (40, 36, 30)
SPACING = (2.5, 3.0, 4.0)
AFFINE_LPS = np.array([
    [-SPACING[0], 0.0, 0.0, 60.0],
    [0.0, -SPACING[1], 0.0, 40.0],
    [0.0, 0.0, SPACING[2], -70.0],
    [0.0, 0.0, 0.0, 1.0],
])
CONFIG = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), crop_size=(32, 32, 32), output_size=(16, 16, 16))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _blob_scan() -> tuple[np.ndarray, np.ndarray]:
    """A PET with background uptake and one off-centre ellipsoidal lesion (and its mask)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(float)
    mm = grid * np.asarray(SPACING)
    centre = np.array([12, 24, 14]) * np.asarray(SPACING)  # deliberately not symmetric
    radii = np.array([14.0, 12.0, 16.0])
    mask = (((mm - centre) / radii) ** 2).sum(-1) <= 1.0
    rng = np.random.default_rng(0)
    pet = 1.0 + 0.1 * rng.random(SHAPE) + 6.0 * mask
    return pet.astype(np.float32), mask.astype(np.uint8)


@pytest.fixture(scope="module")
def preprocessed():
    pet, mask = _blob_scan()
    return pet, mask, preprocess_arrays(pet, AFFINE_LPS, mask, CONFIG)


def test_mask_round_trip_overlaps_original(preprocessed, tmp_path):
    _, mask, vol = preprocessed
    assert vol.mask.sum() > 0
    slices = np.moveaxis(vol.mask, 2, 0)  # (Z, X, Y), the way the schema stores a patient
    out = export_volume(slices, encode_geometry(vol.geometry), tmp_path / "mask.nii.gz", order=0)
    image = nib.load(out)
    assert image.shape == SHAPE
    np.testing.assert_allclose(image.affine, AFFINE_LPS, atol=1e-5)
    back = np.asarray(image.dataobj)
    assert set(np.unique(back)) <= {0.0, 1.0}
    assert _dice(back, mask) > 0.7


def test_map_round_trip_is_not_mirrored(preprocessed):
    """A linearly resampled map peaks inside the original lesion, not in its mirror image."""
    pet, mask, vol = preprocessed
    image = to_original_grid(vol.image, vol.geometry, order=1)
    data = np.asarray(image.dataobj)
    assert data.shape == SHAPE
    assert 0.0 <= data.min() and data.max() <= 1.0 + 1e-6
    inside, outside = data[mask > 0].mean(), data[mask == 0].mean()
    assert inside > 0.5 > outside
    mirrored = mask[::-1, ::-1, :]
    assert data[mirrored > 0].mean() < inside - 0.3


def test_shuffled_slices_are_put_back_by_index(preprocessed):
    _, _, vol = preprocessed
    slices = np.moveaxis(vol.image, 2, 0)
    order = np.random.default_rng(1).permutation(len(slices))
    volume = assemble_volume([slices[i].ravel() for i in order], order,
                             height=vol.image.shape[0], width=vol.image.shape[1])
    np.testing.assert_array_equal(volume, vol.image)


@pytest.mark.parametrize("indices, message", [([0, 0, 1], "duplicated"), ([0, 1, 5], "lie in"),
                                              ([0, 1], "missing")])
def test_assemble_rejects_bad_indices(indices, message):
    slices = np.zeros((len(indices), 4, 4))
    with pytest.raises(ValueError, match=message):
        assemble_volume(slices, indices, num_slices=3)


def test_wrong_volume_shape_is_an_error(preprocessed):
    _, _, vol = preprocessed
    with pytest.raises(ValueError, match="preprocessed shape"):
        to_original_grid(vol.image[:-1], vol.geometry)


def test_geometry_json_and_dict_agree(preprocessed):
    _, _, vol = preprocessed
    a = to_original_grid(vol.image, vol.geometry).get_fdata()
    b = to_original_grid(vol.image, decode_geometry(encode_geometry(vol.geometry))).get_fdata()
    np.testing.assert_allclose(a, b)


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    path = write_nifti_atomic(image, tmp_path / "sub" / "a.nii.gz")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["a.nii.gz"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(OSError):
        write_nifti_atomic(image, tmp_path / "sub" / "b.nii.gz")
    assert [p.name for p in path.parent.iterdir()] == ["a.nii.gz"]
