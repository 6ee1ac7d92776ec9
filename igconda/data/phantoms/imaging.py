"""Image formation: the scanner model, and one patient from anatomy, lesions and scanner."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from igconda.config import PhantomConfig
from igconda.data.phantoms.anatomy import _draw_anatomy, _draw_body, draw_scan_length
from igconda.data.phantoms.grid import _Grid
from igconda.data.phantoms.lesions import (
    COHORTS,
    MAX_DIAMETER_MM,
    MIN_DIAMETER_MM,
    NEGATIVE_CONTROL,
    NEGATIVE_CONTROL_FEET_FRACTION,
    CohortTemplate,
    Lesion,
    _local_background,
    _log_uniform,
    _paint_lesion,
    _place,
)


@dataclass(frozen=True)
class Scanner:
    """A PET system: PSF FWHM range (mm) and a relative noise factor range."""

    name: str
    fwhm_mm: tuple[float, float]
    noise: tuple[float, float]


SCANNERS = (
    Scanner("digital_tof", (4.0, 5.5), (0.5, 0.8)),
    Scanner("analog_tof", (5.5, 7.0), (0.8, 1.2)),
    Scanner("legacy", (7.0, 9.0), (1.1, 1.5)),
)
# Noise variance per unit SUV at 4 mm voxels, 3.5 MBq/kg, 75 kg on the reference scanner:
# gives a liver coefficient of variation of ~10–15 %, as on clinical whole-body FDG.
_NOISE_K_REF = 0.036


@dataclass
class PhantomPatient:
    """One synthetic patient.

    Attributes:
        pet: (X, Y, Z) float32 SUV, non-negative.
        mask: (X, Y, Z) uint8 in {0, 1}, the lesions' true extent.
        labels: (X, Y, Z) uint8 organ labels (:data:`LABELS`), before lesions; not written.
        affine: (4, 4) voxel → RAS world (mm).
    """

    patient_id: str
    cohort: str
    tracer: str
    role: str
    pet: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    scanner: str
    fwhm_mm: float
    noise_k: float
    lesions: list[Lesion] = field(default_factory=list)



def patient_seed(seed: int, cohort: str, index: int) -> np.random.SeedSequence:
    """The seed of one patient: depends only on (seed, cohort, index), stable across runs."""
    return np.random.SeedSequence([int(seed), zlib.crc32(cohort.encode()), int(index)])


def _check_cohort(name: str) -> CohortTemplate:
    if name not in COHORTS:
        raise ValueError(
            f"unknown phantom cohort {name!r}; known cohorts: {', '.join(sorted(COHORTS))}"
        )
    return COHORTS[name]


def make_patient(config: PhantomConfig, cohort: str, index: int) -> PhantomPatient:
    """Generate one synthetic patient (no I/O).

    Args:
        config: geometry (``shape``, ``spacing_mm``, ``scan_length``) and ``seed``. With
            ``scan_length: anatomical`` the grid is ``shape[0] × shape[1]`` in-plane and as many
            slices as the patient's scan needs (vertex to mid-thigh or to the feet, 0.8–2 m),
            with the body up to 6 % of the field of view off the array's centre; with
            ``fixed`` it is ``shape``, the body squeezed into it.
        cohort: a key of :data:`COHORTS`, or :data:`NEGATIVE_CONTROL` (FDG, no lesions).
        index: the patient's index within its cohort.

    Returns:
        The patient: ``pet`` (X, Y, Z) float32 SUV ≥ 0 (Z per ``scan_length``), ``mask`` (X, Y, Z) uint8, the affine and
        the drawn lesions.

    Raises:
        ValueError: unknown cohort or an invalid geometry.
    """
    if cohort == NEGATIVE_CONTROL:
        template = None
        tracer, role = "FDG", NEGATIVE_CONTROL
    else:
        template = _check_cohort(cohort)
        tracer, role = template.tracer, template.role
    shape, spacing = tuple(config.shape), tuple(config.spacing_mm)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"phantoms.shape must be 3 sizes >= 4 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantoms.spacing_mm must be 3 positive values, got {spacing}")
    rng = np.random.default_rng(patient_seed(config.seed, cohort, index))
    if config.scan_length == "anatomical":
        feet = NEGATIVE_CONTROL_FEET_FRACTION if template is None else template.feet_fraction
        length, body, margin = draw_scan_length(rng, feet)
        # The patient lies up to 6 % of the field of view off the scanner's axis.
        offset = rng.uniform(-0.06, 0.06, size=2) * np.asarray(shape[:2]) * np.asarray(spacing[:2])
        grid = _Grid((shape[0], shape[1], int(np.ceil(length / spacing[2]))), spacing, offset)
        anat = _draw_anatomy(grid, rng, body, margin)
    else:
        grid = _Grid(shape, spacing)
        anat = _draw_anatomy(grid, rng)
    act, lab, body = _draw_body(grid, anat, tracer, rng)
    mask = np.zeros(grid.shape, np.uint8)
    lesions: list[Lesion] = []
    if template is not None:
        n = int(rng.integers(template.n_lesions[0], template.n_lesions[1] + 1))
        names = [s for s, _ in template.sites]
        weights = np.array([w for _, w in template.sites], dtype=np.float64)
        # A lesion cohort's patient always has a lesion: if every draw missed the body (only
        # conceivable on tiny grids), keep drawing, ending with a site that cannot miss.
        k = 0
        while k < n or (not lesions and k < n + 5):
            if k < n:
                site = names[0] if k == 0 else str(rng.choice(names, p=weights / weights.sum()))
            else:
                site = "trunk_wall"
            k += 1
            centre = _place(grid, anat, lab, site, rng)
            if centre is None:
                continue
            d_range = template.primary_diameter_mm if k == 1 else template.diameter_mm
            diameter = float(np.clip(_log_uniform(rng, *d_range), MIN_DIAMETER_MM,
                                     MAX_DIAMETER_MM))
            bg = _local_background(grid, act, centre, diameter)
            # The primary is faint half as often (it is what brought the patient to the scan);
            # a faint lesion is never also necrotic, which would make it invisible.
            faint = bool(rng.random() < template.faint_fraction * (0.5 if k == 1 else 1.0))
            if faint:
                suv = bg * rng.uniform(1.5, 2.0)
            else:
                suv = max(_log_uniform(rng, *template.suv), 2.2 * bg)
            necrotic = bool(not faint and diameter >= 30
                            and rng.random() < template.necrosis_prob)
            lesion = Lesion(site, tuple(float(v) for v in centre), diameter, float(suv),
                            float(bg), faint, necrotic)
            lesion.mask_voxels = _paint_lesion(grid, act, mask, body, lesion, rng)
            if lesion.mask_voxels > 0:
                lesions.append(lesion)
    scanner = SCANNERS[int(rng.integers(len(SCANNERS)))]
    fwhm = rng.uniform(*scanner.fwhm_mm)
    dose_per_kg = rng.uniform(2.5, 4.5)  # MBq/kg
    voxel_ml = float(np.prod(grid.spacing)) / 64.0
    noise_k = (_NOISE_K_REF * rng.uniform(*scanner.noise) * (3.5 / dose_per_kg)
               * np.sqrt(anat.weight_kg / 75.0) / voxel_ml)
    pet = _acquire(act, grid, fwhm, noise_k, rng)
    return PhantomPatient(
        patient_id=f"{cohort}_{index:03d}", cohort=cohort, tracer=tracer, role=role, pet=pet,
        mask=mask, labels=lab, affine=grid.affine.copy(), scanner=scanner.name,
        fwhm_mm=float(fwhm), noise_k=float(noise_k), lesions=lesions,
    )



def _acquire(act: np.ndarray, grid: _Grid, fwhm_mm: float, noise_k: float,
             rng: np.random.Generator) -> np.ndarray:
    """Scanner model: Gaussian PSF, then count-dependent correlated noise, clipped at 0.

    Args:
        act: (X, Y, Z) float32 true activity (SUV).
        fwhm_mm: PSF full width at half maximum.
        noise_k: noise variance per unit SUV (variance = k · activity).

    Returns:
        (X, Y, Z) float32 SUV ≥ 0.
    """
    sigma = fwhm_mm / (2 * np.sqrt(2 * np.log(2))) / grid.spacing
    pet = ndimage.gaussian_filter(act, sigma, mode="constant", truncate=3.0)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    # Reconstruction correlates noise over about half the PSF; renormalise to unit variance.
    corr = 0.5 * sigma
    if corr.max() >= 0.3:
        noise = ndimage.gaussian_filter(noise, corr, mode="wrap", truncate=3.0)
        noise /= max(float(noise.std()), 1e-6)
    pet += np.sqrt(noise_k * np.maximum(pet, 0.0)) * noise
    np.maximum(pet, 0.0, out=pet)
    return pet.astype(np.float32, copy=False)

