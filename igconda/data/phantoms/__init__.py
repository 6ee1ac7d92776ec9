"""Synthetic whole-body PET cohorts: 3D phantoms in SUV with lesion masks, NIfTI plus a manifest.

The phantoms are meant to be hard in the ways real PET is hard, so that a method which works on
them has a chance on patients and a method which fails on patients (41 % SUVmax thresholding)
also fails here:

* a body outline (thighs, pelvis, trunk, neck, head, arms up or down) whose size varies between
  patients, with a low-uptake subcutaneous fat layer and a smooth, patient-specific background;
* physiological uptake that a 41 % SUVmax threshold mistakes for lesions: for FDG a very hot
  brain, a variable myocardium, kidneys, a very hot bladder, liver (~2–3 SUV), spleen, blood pool
  (~1.5–2), bone marrow, bowel and Waldeyer's ring; for PSMA the salivary and lacrimal glands,
  very hot kidneys, bladder, liver, spleen, small bowel and a cold brain;
* lesions of 5–60 mm whose surface is an ellipsoid deformed by low-frequency noise, at
  cohort-typical sites, some faint (1.5–2× the local background) and many next to hot organs;
* a per-patient "scanner": Gaussian PSF (FWHM 4–9 mm) and count-dependent noise (variance
  proportional to activity) whose level depends on the scanner, the injected dose per kg and the
  patient's size.

The mask is each lesion's true extent before blurring (partial-volume aware: a voxel is in the
mask when at least half of it lies inside the lesion, and a lesion smaller than a voxel keeps the
voxel holding its centre).

Geometry: an ``(X, Y, Z)`` array of ``PhantomConfig.shape`` voxels at ``PhantomConfig.spacing_mm``
with an RAS+ affine (x towards the patient's right, y anterior, z superior); z index 0 is the
inferior end (thighs), the head is at the top. The body is laid out as fractions of the scan
length and the in-plane field of view, so any shape/spacing gives a complete, plausible body.

Determinism: each patient's generator is seeded from ``(seed, cohort, index)``, so the same
config gives byte-identical arrays and adding a cohort leaves the other cohorts unchanged.

The package: :mod:`.grid` (voxel grid), :mod:`.anatomy` (body and organs), :mod:`.lesions`
(cohorts, sites, painting), :mod:`.imaging` (scanner model, one patient) and :mod:`.writing`
(files and the command line).

Run it::

    python -m igconda.data.phantoms --config configs/test.yaml --output /tmp/phantoms
"""

from igconda.data.phantoms.anatomy import LABELS, UPTAKE
from igconda.data.phantoms.grid import _Grid
from igconda.data.phantoms.imaging import (
    SCANNERS,
    PhantomPatient,
    Scanner,
    make_patient,
    patient_seed,
)
from igconda.data.phantoms.lesions import (
    _SITE_TISSUE,
    _SITES,
    COHORTS,
    MAX_DIAMETER_MM,
    MIN_DIAMETER_MM,
    NEGATIVE_CONTROL,
    CohortTemplate,
    Lesion,
    _paint_lesion,
)
from igconda.data.phantoms.writing import LESION_COLUMNS, MANIFEST_COLUMNS, generate_study, main

__all__ = [
    "COHORTS", "LABELS", "LESION_COLUMNS", "MANIFEST_COLUMNS", "MAX_DIAMETER_MM", "MIN_DIAMETER_MM",
    "NEGATIVE_CONTROL", "SCANNERS", "UPTAKE", "CohortTemplate", "Lesion", "PhantomPatient", "Scanner",
    "_Grid", "_SITES", "_SITE_TISSUE", "_paint_lesion", "generate_study", "main", "make_patient",
    "patient_seed",
]
