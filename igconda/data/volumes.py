"""Loading and validating PET / mask NIfTI volumes.

Every problem with an input volume raises :class:`VolumeError`, whose ``path`` names the file and
``problem`` says what is wrong in words a user can act on, so that a preprocessing job can list
the rejected patients (``rejects.csv``) and carry on with the good ones.

Checks (see :func:`load_pet` and :func:`load_mask`):

* the file exists and nibabel can read it (a truncated ``.nii.gz`` fails while decompressing);
* the image is 3D; a 4D image whose trailing dimension is 1 is squeezed to 3D and the squeeze is
  reported through :attr:`LoadedVolume.notes`; 2D and true 4D images are rejected;
* PET has no NaN/Inf and is not all zero, and its values are on the SUV scale: a CT in Hounsfield
  units or an image in Bq/mL given as PET is refused (:func:`check_suv_scale`);
* a mask has its PET's shape and affine (within ``AFFINE_TOLERANCE_MM``) and holds only 0/1
  (bool and 0/1 floats are accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

#: The start of the problem of a missing file (the job's driver looks for it, see
#: :func:`igconda.data.build._check_visible`).
NOT_FOUND = "file not found"
#: How to fix a mask that does not sit on its PET's grid.
REGRID_FIX = ("resample the mask onto its PET's grid (nearest neighbour) or pair the PET with the "
              "mask drawn on it")

#: Largest allowed difference (mm) between a mask's and its PET's affine entries. Scanners and
#: converters round the affine differently; 1e-3 mm is far below any voxel size.
AFFINE_TOLERANCE_MM = 1e-3


#: A PET in SUV is >= 0 up to reconstruction noise (FBP, or OSEM without a non-negativity
#: constraint, can give a few voxels of about -1 SUV). A CT in Hounsfield units has air at -1000
#: and lung near -800, and fat at about -100 covers a large share of any body region. A volume is
#: taken as HU, not SUV, when BOTH hold: more than CT_NEGATIVE_FRACTION of its voxels are below
#: CT_NEGATIVE_HU, and its minimum is below CT_MIN_HU. Either alone could be met by odd but
#: genuine PET (one outlier voxel; a strongly negative-biased reconstruction), both together not.
CT_NEGATIVE_HU = -50.0
CT_NEGATIVE_FRACTION = 0.01
CT_MIN_HU = -500.0
#: SUV is uptake relative to the body's mean: even the bladder or kidneys of a PSMA scan stay in
#: the hundreds, and only a handful of voxels at that. An image with more than SUV_HIGH_FRACTION
#: of its voxels above SUV_IMPLAUSIBLE is in activity units (Bq/mL: thousands in soft tissue) or
#: is not a PET at all.
SUV_IMPLAUSIBLE = 1000.0
SUV_HIGH_FRACTION = 0.001


class VolumeError(ValueError):
    """An input volume (or manifest entry) cannot be used.

    Attributes:
        path: the offending file (as a string).
        problem: what is wrong with it, in plain words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep path/problem when pickled across Ray workers
        return (type(self), (self.path, self.problem))


@dataclass
class LoadedVolume:
    """A validated 3D volume in its file's voxel order.

    Attributes:
        data: (X, Y, Z) array (float32 for PET, uint8 for masks).
        affine: (4, 4) float64 voxel → world (RAS+, mm) affine, as nibabel reports it.
        path: the file it came from.
        notes: non-fatal remarks (e.g. a squeezed singleton 4th dimension).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str
    notes: list[str] = field(default_factory=list)


def _read(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a NIfTI file into a 3D float array, or raise VolumeError."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, f"{NOT_FOUND}; check the path (a manifest's relative paths are "
                                f"read from the manifest's folder)")
    if not path.is_file():
        raise VolumeError(path, "not a regular file; give the path of a .nii or .nii.gz file")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error …)
        raise VolumeError(path, f"unreadable or corrupt NIfTI file ({type(err).__name__}: {err}); "
                                f"copy or export it again") from None
    notes: list[str] = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        notes.append(f"squeezed a singleton 4th dimension (shape {tuple(img.shape)})")
    if data.ndim != 3:
        raise VolumeError(path, f"expected a 3D image, got {data.ndim}D with shape {tuple(data.shape)}; "
                                f"give one 3D volume (of a dynamic series, the static frame)")
    if min(data.shape) < 1:
        raise VolumeError(path, f"empty image of shape {tuple(data.shape)}; export the scan again")
    if not np.all(np.isfinite(affine)):
        raise VolumeError(path, "the affine (voxel to world transform) contains NaN/Inf; export "
                                "the scan again with its geometry")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "the affine (voxel to world transform) is singular; export the "
                                "scan again with its geometry")
    return data, affine, notes


def load_pet(path: str | Path) -> LoadedVolume:
    """Load a PET volume (SUV) and check it is usable.

    Args:
        path: NIfTI file.

    Returns:
        LoadedVolume with ``data`` (X, Y, Z) float32.

    Raises:
        VolumeError: missing/corrupt file, not 3D, NaN/Inf values, or an all-zero scan.
    """
    data, affine, notes = _read(path)
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - finite.sum())
        raise VolumeError(path, f"PET contains {bad} NaN/Inf voxel(s); export the scan again, or "
                                f"set those voxels to 0 if they lie outside the body")
    if not np.any(data):
        raise VolumeError(path, "PET is all zero (empty scan); check that pet_path names the "
                                "PET series and export it again")
    check_suv_scale(data, path)
    return LoadedVolume(data=data, affine=affine, path=str(path), notes=notes)


def check_suv_scale(data: np.ndarray, path: str | Path) -> None:
    """Refuse a volume whose values are not SUV: a CT (Hounsfield units) or an activity image.

    The rules and their thresholds are those of :data:`CT_NEGATIVE_HU`, :data:`CT_MIN_HU` and
    :data:`SUV_IMPLAUSIBLE` (see there why); small negative reconstruction noise passes.

    Raises:
        VolumeError: naming ``path``, the evidence and the fix.
    """
    size = data.size
    negative = float(np.count_nonzero(data < CT_NEGATIVE_HU)) / size
    low = float(data.min())
    if negative > CT_NEGATIVE_FRACTION and low < CT_MIN_HU:
        raise VolumeError(path, f"does not look like a PET in SUV: {negative:.0%} of its voxels are "
                                f"below {CT_NEGATIVE_HU:g} and its minimum is {low:.4g}, as in a CT in "
                                f"Hounsfield units; give the PET image (in SUV) as pet_path, not the CT")
    high = float(np.count_nonzero(data > SUV_IMPLAUSIBLE)) / size
    if high > SUV_HIGH_FRACTION:
        raise VolumeError(path, f"does not look like a PET in SUV: {high:.2%} of its voxels are above "
                                f"{SUV_IMPLAUSIBLE:g} (maximum {float(data.max()):.4g}), which is no "
                                f"SUV; convert it to SUV first (e.g. from Bq/mL: multiply by body "
                                f"weight in g / injected dose in Bq, decay-corrected)")


def load_mask(path: str | Path, pet: LoadedVolume, binarize: bool = False) -> LoadedVolume:
    """Load a lesion mask and check that it matches its PET.

    Args:
        path: NIfTI file of the mask.
        pet: the already loaded PET the mask belongs to.
        binarize: accept multi-label masks (non-negative integer labels), every positive label
            a lesion; otherwise only 0 and 1 are accepted.

    Returns:
        LoadedVolume with ``data`` (X, Y, Z) uint8 in {0, 1}.

    Raises:
        VolumeError: missing/corrupt file, not 3D, shape or affine differing from the PET's
            (tolerance :data:`AFFINE_TOLERANCE_MM`), or values other than 0/1.
    """
    data, affine, notes = _read(path)
    if data.shape != pet.data.shape:
        raise VolumeError(path, f"mask shape {tuple(data.shape)} does not match PET shape "
                                f"{tuple(pet.data.shape)} ({pet.path}); {REGRID_FIX}")
    diff = float(np.max(np.abs(affine - pet.affine)))
    if diff > AFFINE_TOLERANCE_MM:
        raise VolumeError(path, f"mask affine differs from PET affine ({pet.path}) by up to "
                                f"{diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); {REGRID_FIX}")
    if data.dtype != np.bool_:
        values = np.unique(data)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (" …" if len(values) > 6 else "")
        if binarize:
            if not (np.all(values >= 0) and np.all(values == np.round(values))):
                raise VolumeError(path, f"mask labels must be non-negative integers: values {shown}; "
                                        f"give a label map, not a probability map")
        elif not np.all(np.isin(values, (0, 1))):
            raise VolumeError(path, f"mask is not binary: values {shown} (expected only 0 and 1; "
                                    "set preprocess.binarize_mask to count every positive label "
                                    "as lesion)")
    return LoadedVolume(data=(np.asarray(data) > 0).astype(np.uint8), affine=affine,
                        path=str(path), notes=notes)
