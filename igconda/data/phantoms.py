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

Run it::

    python -m igconda.data.phantoms --config configs/test.yaml --output /tmp/phantoms
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from igconda.config import PhantomConfig, load_config
from igconda.io_utils import atomic_write

MANIFEST_COLUMNS = ("patient_id", "cohort", "tracer", "pet_path", "mask_path", "role")
LESION_COLUMNS = (
    "patient_id", "lesion", "site", "diameter_mm", "x_mm", "y_mm", "z_mm", "suv",
    "background_suv", "faint", "necrotic", "mask_voxels",
)
NEGATIVE_CONTROL = "negative_control"
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 5.0, 60.0

# Organ labels of the internal label map (used to keep lesion centres out of hot organs and to
# tell tests/benchmarks where false positives come from). 0 = outside the body.
LABELS = {
    "outside": 0, "soft_tissue": 1, "fat": 2, "lung": 3, "bone": 4, "blood_pool": 5,
    "myocardium": 6, "liver": 7, "spleen": 8, "kidney": 9, "bowel": 10, "bladder": 11,
    "prostate": 12, "brain": 13, "salivary": 14, "lacrimal": 15, "tonsil": 16,
}
# A lesion centre may not sit inside these (a lesion there would just look like the organ).
_FORBIDDEN_CENTRE = {LABELS[k] for k in ("outside", "brain", "bladder", "kidney", "myocardium")}

# Physiological uptake, SUV ranges (lo, hi) sampled uniformly per patient. Values follow common
# clinical reference ranges (e.g. EANM FDG guideline v2, PSMA biodistribution studies).
UPTAKE: dict[str, dict[str, tuple[float, float]]] = {
    "FDG": {
        "soft_tissue": (0.5, 1.0), "fat": (0.25, 0.45), "lung": (0.3, 0.55), "bone": (1.3, 2.2),
        "blood_pool": (1.5, 2.1), "myocardium": (1.5, 12.0), "liver": (2.0, 3.0),
        "spleen": (1.6, 2.5), "kidney": (2.5, 5.0), "renal_pelvis": (5.0, 15.0),
        "bowel": (1.3, 3.5), "bladder": (8.0, 35.0), "prostate": (1.2, 2.2),
        "brain": (3.5, 5.0), "cortex": (7.0, 13.0), "salivary": (1.5, 3.0),
        "lacrimal": (0.8, 1.5), "tonsil": (2.5, 6.0),
    },
    "PSMA": {
        "soft_tissue": (0.3, 0.6), "fat": (0.15, 0.3), "lung": (0.2, 0.4), "bone": (0.8, 1.5),
        "blood_pool": (0.8, 1.5), "myocardium": (1.0, 2.0), "liver": (4.0, 8.0),
        "spleen": (3.0, 7.0), "kidney": (20.0, 45.0), "renal_pelvis": (25.0, 60.0),
        "bowel": (3.0, 10.0), "bladder": (10.0, 40.0), "prostate": (2.0, 5.0),
        "brain": (0.1, 0.3), "cortex": (0.1, 0.3), "salivary": (10.0, 25.0),
        "lacrimal": (5.0, 12.0), "tonsil": (1.5, 3.0),
    },
}


@dataclass(frozen=True)
class CohortTemplate:
    """How one cohort's patients and lesions are drawn.

    Attributes:
        tracer: ``"FDG"`` or ``"PSMA"`` (selects the physiological uptake table).
        role: ``internal`` or ``external`` (external cohorts are test-only downstream).
        n_lesions: inclusive range of lesions per patient (every patient gets at least one).
        diameter_mm: equivalent-sphere diameter range of secondary lesions, log-uniform.
        primary_diameter_mm: diameter range of the first lesion (the primary tumour or the
            dominant node), log-uniform.
        suv: lesion SUV range (log-uniform) for non-faint lesions.
        sites: ``(site name, weight)`` pairs; see :data:`_SITES`. The first lesion uses the
            first site.
        faint_fraction: probability that a lesion is faint (1.5–2× its local background).
        necrosis_prob: probability that a lesion ≥ 30 mm has a cold necrotic core.
    """

    tracer: str
    role: str
    n_lesions: tuple[int, int]
    diameter_mm: tuple[float, float]
    primary_diameter_mm: tuple[float, float]
    suv: tuple[float, float]
    sites: tuple[tuple[str, float], ...]
    faint_fraction: float = 0.25
    necrosis_prob: float = 0.2


COHORTS: dict[str, CohortTemplate] = {
    # Nodal chains (neck, axilla, mediastinum, abdomen, pelvis), several per patient, often bulky.
    "lymphoma": CohortTemplate(
        "FDG", "internal", (3, 9), (8.0, 40.0), (25.0, 60.0), (4.0, 25.0),
        (("mediastinum", 0.2), ("neck_node", 0.18), ("axilla", 0.14), ("supraclavicular", 0.08),
         ("hilar", 0.06), ("paraaortic", 0.12), ("mesenteric", 0.08), ("pelvic_node", 0.06),
         ("inguinal", 0.05), ("spleen", 0.03)),
    ),
    # Primary in the lung (often next to the mediastinum or heart), hilar/mediastinal nodes.
    "lung": CohortTemplate(
        "FDG", "internal", (1, 4), (8.0, 30.0), (15.0, 55.0), (3.0, 15.0),
        (("lung", 0.45), ("lung_medial", 0.25), ("hilar", 0.15), ("mediastinum", 0.15)),
    ),
    # Scattered: skin/subcutaneous, liver, lung, nodal basins.
    "melanoma": CohortTemplate(
        "FDG", "internal", (2, 8), (5.0, 30.0), (10.0, 40.0), (3.0, 15.0),
        (("subcutaneous", 0.35), ("liver", 0.2), ("lung", 0.15), ("axilla", 0.1),
         ("inguinal", 0.1), ("neck_node", 0.1)),
    ),
    # Primary in the oropharynx/skull base next to Waldeyer's ring, salivary glands and brain.
    "headneck": CohortTemplate(
        "FDG", "internal", (1, 4), (8.0, 30.0), (15.0, 45.0), (4.0, 18.0),
        (("oropharynx", 0.35), ("neck_node", 0.45), ("skull_base", 0.1),
         ("supraclavicular", 0.1)),
    ),
    # Prostate bed (next to the bladder), pelvic nodes, bone.
    "psma": CohortTemplate(
        "PSMA", "internal", (1, 8), (5.0, 25.0), (10.0, 35.0), (4.0, 50.0),
        (("prostate_bed", 0.3), ("pelvic_node", 0.3), ("bone", 0.3), ("paraaortic", 0.1)),
        faint_fraction=0.2, necrosis_prob=0.0,
    ),
    # External: large soft-tissue masses in limbs/trunk, often necrotic; occasional lung mets.
    "sarcoma_ext": CohortTemplate(
        "FDG", "external", (1, 3), (6.0, 20.0), (30.0, 60.0), (3.0, 15.0),
        (("limb_soft_tissue", 0.6), ("trunk_wall", 0.25), ("lung", 0.15)),
        necrosis_prob=0.6,
    ),
}


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
class Lesion:
    """One lesion as drawn (world coordinates in mm, RAS)."""

    site: str
    center_mm: tuple[float, float, float]
    diameter_mm: float
    suv: float
    background_suv: float
    faint: bool
    necrotic: bool
    mask_voxels: int = 0


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


# --------------------------------------------------------------------------------------------
# Grid and painting helpers


class _Grid:
    """Voxel-centre coordinates (mm) of the output volume, RAS, x/y centred, z from 0."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = np.array(
            [-(self.shape[0] - 1) / 2 * spacing[0], -(self.shape[1] - 1) / 2 * spacing[1], 0.0]
        )
        self.axes = [
            (self.origin[i] + np.arange(self.shape[i]) * self.spacing[i]).astype(np.float32)
            for i in range(3)
        ]
        self.affine = np.diag([*self.spacing, 1.0])
        self.affine[:3, 3] = self.origin
        self.fov = self.spacing * np.asarray(self.shape)

    def box(self, center: np.ndarray, half: np.ndarray) -> tuple[slice, ...] | None:
        """Voxel slices covering ``center ± half`` (mm), or None if outside the volume."""
        lo = np.floor((center - half - self.origin) / self.spacing).astype(int)
        hi = np.ceil((center + half - self.origin) / self.spacing).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    def coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (x, y, z) coordinate arrays of a box."""
        x, y, z = (self.axes[i][box[i]] for i in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def voxel(self, point: np.ndarray) -> tuple[int, int, int] | None:
        idx = np.round((np.asarray(point) - self.origin) / self.spacing).astype(int)
        if np.any(idx < 0) or np.any(idx >= self.shape):
            return None
        return tuple(int(i) for i in idx)


def _ellipsoid(grid: _Grid, center: np.ndarray, radii: np.ndarray):
    """(box, inside) for an axis-aligned ellipsoid; inside is a bool array of the box."""
    center = np.asarray(center, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    box = grid.box(center, radii)
    if box is None:
        return None, None
    x, y, z = grid.coords(box)
    r2 = ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
    inside = (r2 + ((z - center[2]) / radii[2]) ** 2) <= 1.0
    return box, inside


# --------------------------------------------------------------------------------------------
# Anatomy


@dataclass
class _Anatomy:
    """Where things are in one patient (mm, RAS). ``t`` is the fraction of the body length
    from the bottom of the scan (mid-thigh, t = 0) to the vertex (t = 1)."""

    z_bottom: float
    length: float  # body length (mm) from t = 0 to t = 1
    sz: float  # mm per nominal mm along z (body squeezed to fit the scan length)
    sx: float  # in-plane scale of the body outline
    sy: float
    so: float  # in-plane scale of organs
    y0: float  # antero-posterior centre of the trunk
    fat_mm: float
    arms_up: bool
    weight_kg: float
    organs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def z(self, t: float) -> float:
        return self.z_bottom + t * self.length

    def t(self, z: np.ndarray) -> np.ndarray:
        return (z - self.z_bottom) / self.length

    # Trunk outline half-width/half-depth (mm) as a function of t.
    _T = np.array([0.20, 0.24, 0.30, 0.42, 0.55, 0.68, 0.74, 0.775])
    _A = np.array([150.0, 158.0, 165.0, 140.0, 150.0, 158.0, 172.0, 150.0])
    _B = np.array([95.0, 100.0, 105.0, 100.0, 105.0, 105.0, 98.0, 80.0])

    def trunk(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.interp(t, self._T, self._A) * self.sx, np.interp(t, self._T, self._B) * self.sy

    @property
    def spine_y_offset(self) -> float:
        return -0.62


def _draw_anatomy(grid: _Grid, rng: np.random.Generator) -> _Anatomy:
    fov = grid.fov
    # Body length vertex → mid-thigh of a nominal adult is ~900 mm; squeeze it into the scan
    # (with a random top margin and the thighs cut at a random height).
    margin = rng.uniform(0.01, 0.04) * fov[2]
    length = fov[2] * rng.uniform(0.95, 1.06)
    z_top = grid.origin[2] + (grid.shape[2] - 0.5) * grid.spacing[2] - margin
    z_bottom = z_top - length
    arms_up = bool(rng.random() < 0.6)
    s_w = rng.uniform(0.85, 1.15)  # habitus: width
    s_d = rng.uniform(0.85, 1.2) * (0.6 + 0.4 * s_w)  # depth, correlated with width
    # Widest point: shoulders, or the arms beside the trunk.
    half_width = 172.0 * s_w + (0.0 if arms_up else 2 * 38.0 * s_w)
    half_depth = 105.0 * s_d
    fit = min(1.0, 0.46 * fov[0] / half_width, 0.44 * fov[1] / half_depth)
    anat = _Anatomy(
        z_bottom=float(z_bottom), length=float(length), sz=float(length / 900.0),
        sx=float(s_w * fit), sy=float(s_d * fit), so=float(fit * np.sqrt(s_w * s_d) ** 0.5),
        y0=float(rng.uniform(-8, 8)), fat_mm=float(rng.uniform(6, 14) * s_d**2 * fit),
        arms_up=arms_up, weight_kg=float(75.0 * s_w * s_d * rng.uniform(0.9, 1.1)),
    )
    j = lambda: rng.uniform(0.9, 1.1)  # noqa: E731 - organ size jitter
    so, sz = anat.so, anat.sz

    def organ(name: str, t: float, x: float, y: float, radii: tuple[float, float, float]):
        # In-plane position jitter (~4 mm): healthy anatomy differs between patients.
        c = np.array([x * so + rng.normal(0, 4), anat.y0 + y * so + rng.normal(0, 4), anat.z(t)])
        r = np.array([radii[0] * so * j(), radii[1] * so * j(), radii[2] * sz * j()])
        anat.organs[name] = (c, r)

    dz = lambda: rng.uniform(-0.01, 0.01)  # noqa: E731 - organ height jitter
    for side, sgn in (("r", 1.0), ("l", -1.0)):
        organ(f"lung_{side}", 0.655 + dz(), sgn * 75, -5, (55, 75, 100))
        organ(f"kidney_{side}", 0.455 + dz(), sgn * 65, -45, (28, 25, 50))
        organ(f"parotid_{side}", 0.84, sgn * 50, -5, (13, 18, 22))
        organ(f"submandibular_{side}", 0.815, sgn * 35, 30, (10, 10, 12))
        organ(f"lacrimal_{side}", 0.895, sgn * 32, 70, (7, 5, 5))
    organ("heart", 0.61 + dz(), -25, 25, (55, 48, 55))
    organ("aorta_arch", 0.7, -8, 5, (18, 30, 30))
    organ("liver", 0.55 + dz(), 55, 5, (85, 70, 70))
    organ("spleen", 0.545 + dz(), -85, -35, (30, 40, 50))
    bladder_fill = rng.uniform(0.6, 1.4)
    organ("bladder", 0.29, 0, 35, (35 * bladder_fill, 30 * bladder_fill, 35 * bladder_fill))
    organ("prostate", 0.245, 0, 25, (18, 15, 18))
    organ("brain", 0.925, 0, -5, (68, 80, 62))
    organ("tonsils", 0.83, 0, 15, (22, 12, 14))
    return anat


def _draw_body(grid: _Grid, anat: _Anatomy, tracer: str, rng: np.random.Generator):
    """Activity (pre-PSF, SUV) and label volumes of a lesion-free patient."""
    suv = {k: rng.uniform(*v) for k, v in UPTAKE[tracer].items()}
    # Bimodal myocardium for FDG: fasting suppresses it in about half of patients.
    if tracer == "FDG" and rng.random() < 0.5:
        suv["myocardium"] = rng.uniform(1.5, 3.0)
    act = np.zeros(grid.shape, np.float32)
    lab = np.zeros(grid.shape, np.uint8)
    X = grid.axes[0][:, None, None]
    Y = grid.axes[1][None, :, None]
    Z = grid.axes[2]
    t = anat.t(Z)[None, None, :]
    so, sz = anat.so, anat.sz

    def paint(mask_box, box, name, value):
        if box is None:
            return
        sub_a, sub_l = act[box], lab[box]
        sub_a[mask_box] = value
        sub_l[mask_box] = LABELS[name]

    # ---- outline: trunk, neck, head, thighs, arms
    a, b = anat.trunk(t)
    in_trunk_z = (t >= 0.20) & (t <= 0.775)
    r2 = (X / a) ** 2 + ((Y - anat.y0) / b) ** 2
    trunk = (r2 <= 1.0) & in_trunk_z
    inner = ((X / np.maximum(a - anat.fat_mm, 1)) ** 2
             + ((Y - anat.y0) / np.maximum(b - anat.fat_mm, 1)) ** 2) <= 1.0
    neck_r = 58.0 * so
    neck = ((X**2 + (Y - anat.y0 - 10 * so) ** 2) <= neck_r**2) & (t > 0.76) & (t <= 0.86)
    head_c = np.array([0.0, anat.y0 + 5 * so, anat.z(0.9)])
    head_r = np.array([80 * so, 100 * so, 90 * sz])
    head = (((X - head_c[0]) / head_r[0]) ** 2 + ((Y - head_c[1]) / head_r[1]) ** 2
            + ((Z[None, None, :] - head_c[2]) / head_r[2]) ** 2) <= 1.0
    thigh_x = 85.0 * anat.sx
    thigh_r = 78.0 * np.sqrt(anat.sx * anat.sy)
    legs = np.zeros(grid.shape, bool)
    for sgn in (1.0, -1.0):
        legs |= (((X - sgn * thigh_x) ** 2 + (Y - anat.y0) ** 2) <= thigh_r**2) & (t < 0.235)
    arms = np.zeros(grid.shape, bool)
    arm_r = 38.0 * anat.sx
    for sgn in (1.0, -1.0):
        if anat.arms_up:
            ax = sgn * (head_r[0] + arm_r + 8)
            arms |= (((X - ax) ** 2 + (Y - anat.y0 + 20 * so) ** 2) <= arm_r**2) & (t > 0.78)
        else:
            ax = sgn * (np.interp(0.7, anat._T, anat._A) * anat.sx + arm_r)
            arms |= (((X - ax) ** 2 + (Y - anat.y0) ** 2) <= arm_r**2) & (t > 0.3) & (t < 0.77)
    body = trunk | neck | head | legs | arms
    lab[body] = LABELS["fat"]
    act[body] = suv["fat"]
    soft = (trunk & inner) | neck | head | legs | arms
    # Limbs and neck: muscle inside a thin fat layer.
    lab[soft] = LABELS["soft_tissue"]
    act[soft] = suv["soft_tissue"]

    # ---- bone marrow: spine, pelvis, femurs
    spine_y = anat.y0 + b * anat.spine_y_offset
    spine = ((X**2 + (Y - spine_y) ** 2) <= (16 * so) ** 2) & (t > 0.24) & (t < 0.80)
    act[spine] = suv["bone"]
    lab[spine] = LABELS["bone"]
    for sgn in (1.0, -1.0):
        box, ins = _ellipsoid(grid, [sgn * 95 * anat.sx, anat.y0 - 25 * so, anat.z(0.31)],
                              [35 * so, 18 * so, 45 * sz])
        paint(ins, box, "bone", suv["bone"])
        femur = (((X - sgn * thigh_x) ** 2 + (Y - anat.y0) ** 2) <= (14 * so) ** 2) & (t < 0.25)
        act[femur] = suv["bone"] * 0.8
        lab[femur] = LABELS["bone"]

    # ---- thorax
    for side in ("r", "l"):
        box, ins = _ellipsoid(grid, *anat.organs[f"lung_{side}"])
        paint(ins, box, "lung", suv["lung"])
    c, r = anat.organs["aorta_arch"]
    box, ins = _ellipsoid(grid, c, r)
    paint(ins, box, "blood_pool", suv["blood_pool"])
    aorta = ((((X + 5 * so) ** 2 + (Y - spine_y - 30 * so) ** 2) <= (13 * so) ** 2)
             & (t > 0.33) & (t < 0.7))
    act[aorta] = suv["blood_pool"]
    lab[aorta] = LABELS["blood_pool"]
    c, r = anat.organs["heart"]
    box, ins = _ellipsoid(grid, c, r)
    paint(ins, box, "myocardium", suv["myocardium"])
    box, ins = _ellipsoid(grid, c + np.array([4 * so, 0, 0]), r * rng.uniform(0.55, 0.7))
    paint(ins, box, "blood_pool", suv["blood_pool"])

    # ---- abdomen
    for name in ("liver", "spleen"):
        box, ins = _ellipsoid(grid, *anat.organs[name])
        paint(ins, box, name, suv[name])
    for side in ("r", "l"):
        c, r = anat.organs[f"kidney_{side}"]
        box, ins = _ellipsoid(grid, c, r)
        paint(ins, box, "kidney", suv["kidney"])
        # Urine in the renal pelvis, hotter than the cortex.
        box, ins = _ellipsoid(grid, c + np.array([-np.sign(c[0]) * 8 * so, 5 * so, 0]), r * 0.4)
        paint(ins, box, "kidney", suv["renal_pelvis"])
    for _ in range(rng.integers(4, 11)):
        tb = rng.uniform(0.33, 0.47)
        ab, bb = anat.trunk(np.array(tb))
        c = np.array([rng.uniform(-0.6, 0.6) * ab, anat.y0 + rng.uniform(-0.1, 0.6) * bb,
                      anat.z(tb)])
        r = np.array([rng.uniform(8, 20) * so, rng.uniform(8, 18) * so, rng.uniform(10, 30) * sz])
        box, ins = _ellipsoid(grid, c, r)
        if box is not None:
            ins &= lab[box] == LABELS["soft_tissue"]  # bowel only in free abdominal space
            paint(ins, box, "bowel", suv["bowel"] * rng.uniform(0.7, 1.3))

    # ---- pelvis
    box, ins = _ellipsoid(grid, *anat.organs["bladder"])
    paint(ins, box, "bladder", suv["bladder"])
    box, ins = _ellipsoid(grid, *anat.organs["prostate"])
    paint(ins, box, "prostate", suv["prostate"])

    # ---- head and neck
    c, r = anat.organs["brain"]
    box, ins = _ellipsoid(grid, c, r)
    paint(ins, box, "brain", suv["cortex"])
    box, ins = _ellipsoid(grid, c, r * rng.uniform(0.7, 0.8))  # white matter inside the cortex
    paint(ins, box, "brain", suv["brain"])
    for name in ("parotid_r", "parotid_l", "submandibular_r", "submandibular_l"):
        box, ins = _ellipsoid(grid, *anat.organs[name])
        paint(ins, box, "salivary", suv["salivary"] * rng.uniform(0.85, 1.15))
    for name in ("lacrimal_r", "lacrimal_l"):
        box, ins = _ellipsoid(grid, *anat.organs[name])
        paint(ins, box, "lacrimal", suv["lacrimal"])
    box, ins = _ellipsoid(grid, *anat.organs["tonsils"])
    paint(ins, box, "tonsil", suv["tonsil"])

    # Keep the organs inside the skin (small FOVs can push organs past a squeezed outline).
    act[~body] = 0.0
    lab[~body] = 0
    # Smooth patient-specific heterogeneity (±~10 %): a coarse random field, trilinearly upsampled.
    coarse = rng.normal(1.0, 0.07, size=(4, 4, 6)).astype(np.float32)
    act *= _upsample_linear(coarse, grid.shape)
    return act, lab, body


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1D linear interpolation from n_in nodes spanning the axis."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    w[np.arange(n_out), lo] = 1 - frac
    w[np.arange(n_out), lo + 1] = frac
    return w


def _upsample_linear(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable trilinear upsampling of a small (a, b, c) array to ``shape`` (float32).

    Three small matrix products instead of ``ndimage.zoom``, which is ~20× slower here.
    """
    wx, wy, wz = (_interp_matrix(n, m) for n, m in zip(shape, coarse.shape, strict=True))
    out = np.tensordot(wx, coarse, axes=(1, 0))  # (X, b, c)
    out = np.tensordot(out, wz, axes=(2, 1))  # (X, b, Z)
    return np.einsum("jb,xbz->xjz", wy, out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Lesion sites: each returns a candidate centre (mm) for one lesion.


def _in_organ(anat: _Anatomy, name: str, rng: np.random.Generator, shrink: float = 0.8):
    c, r = anat.organs[name]
    u = rng.normal(size=3)
    u *= rng.random() ** (1 / 3) / np.linalg.norm(u)
    return c + u * r * shrink


def _trunk_point(anat, rng, t_range, x_frac, y_frac, sides=True):
    t = rng.uniform(*t_range)
    a, b = anat.trunk(np.array(t))
    sgn = rng.choice([-1.0, 1.0]) if sides else 1.0
    return np.array([sgn * rng.uniform(*x_frac) * a, anat.y0 + rng.uniform(*y_frac) * b,
                     anat.z(t)])


def _site_neck_node(anat, rng):
    so = anat.so
    return np.array([rng.choice([-1.0, 1.0]) * rng.uniform(25, 50) * so,
                     anat.y0 + rng.uniform(-15, 35) * so, anat.z(rng.uniform(0.775, 0.835))])


def _site_lung(anat, rng):
    return _in_organ(anat, rng.choice(["lung_r", "lung_l"]), rng, 0.75)


def _site_lung_medial(anat, rng):
    name = str(rng.choice(["lung_r", "lung_l"]))
    c, r = anat.organs[name]
    # Medial edge of the lung, next to the mediastinum or the heart.
    x = c[0] - np.sign(c[0]) * rng.uniform(0.55, 0.85) * r[0]
    return np.array([x, c[1] + rng.uniform(-0.3, 0.5) * r[1], c[2] + rng.uniform(-0.5, 0.4) * r[2]])


def _site_mediastinum(anat, rng):
    so = anat.so
    return np.array([rng.uniform(-20, 20) * so, anat.y0 + rng.uniform(-5, 40) * so,
                     anat.z(rng.uniform(0.64, 0.73))])


def _site_hilar(anat, rng):
    so = anat.so
    return np.array([rng.choice([-1.0, 1.0]) * rng.uniform(30, 50) * so,
                     anat.y0 + rng.uniform(-10, 20) * so, anat.z(rng.uniform(0.63, 0.68))])


def _site_paraaortic(anat, rng):
    so = anat.so
    t = rng.uniform(0.38, 0.52)
    _, b = anat.trunk(np.array(t))
    return np.array([rng.uniform(-35, 30) * so, anat.y0 + anat.spine_y_offset * b + 35 * so,
                     anat.z(t)])


def _site_subcutaneous(anat, rng):
    if rng.random() < 0.75:
        t = rng.uniform(0.25, 0.75)
        a, b = anat.trunk(np.array(t))
        th = rng.uniform(0, 2 * np.pi)
        depth = rng.uniform(10, 25)  # mm under the skin: in or just under the fat layer
        return np.array([(a - depth) * np.cos(th), anat.y0 + (b - depth) * np.sin(th),
                         anat.z(t)])
    th = rng.uniform(0, 2 * np.pi)
    r = 78.0 * np.sqrt(anat.sx * anat.sy) - rng.uniform(10, 25)
    return np.array([rng.choice([-1.0, 1.0]) * 85.0 * anat.sx + r * np.cos(th),
                     anat.y0 + r * np.sin(th), anat.z(rng.uniform(0.03, 0.2))])


def _site_oropharynx(anat, rng):
    so = anat.so
    return np.array([rng.uniform(-18, 18) * so, anat.y0 + rng.uniform(0, 30) * so,
                     anat.z(rng.uniform(0.81, 0.845))])


def _site_skull_base(anat, rng):
    so = anat.so
    return np.array([rng.uniform(-40, 40) * so, anat.y0 + rng.uniform(10, 45) * so,
                     anat.z(rng.uniform(0.845, 0.86))])


def _site_prostate_bed(anat, rng):
    c, r = anat.organs["prostate"]
    return c + np.array([rng.uniform(-12, 12), rng.uniform(-15, 5), rng.uniform(-5, 15)]) * anat.so


def _site_bone(anat, rng):
    u = rng.random()
    so = anat.so
    if u < 0.5:  # vertebra
        t = rng.uniform(0.28, 0.76)
        _, b = anat.trunk(np.array(t))
        return np.array([rng.uniform(-8, 8) * so, anat.y0 + anat.spine_y_offset * b, anat.z(t)])
    if u < 0.75:  # pelvic bone
        return np.array([rng.choice([-1.0, 1.0]) * rng.uniform(80, 110) * anat.sx,
                         anat.y0 - 25 * so, anat.z(rng.uniform(0.28, 0.34))])
    if u < 0.9:  # rib
        return _trunk_point(anat, rng, (0.56, 0.74), (0.75, 0.85), (-0.5, 0.5))
    return np.array([rng.choice([-1.0, 1.0]) * 85.0 * anat.sx, anat.y0,  # femur
                     anat.z(rng.uniform(0.05, 0.22))])


def _site_limb_soft_tissue(anat, rng):
    if anat.arms_up or rng.random() < 0.75:
        r = 78.0 * np.sqrt(anat.sx * anat.sy)
        th = rng.uniform(0, 2 * np.pi)
        f = rng.uniform(0.3, 0.6)
        return np.array([rng.choice([-1.0, 1.0]) * 85.0 * anat.sx + f * r * np.cos(th),
                         anat.y0 + f * r * np.sin(th), anat.z(rng.uniform(0.04, 0.2))])
    ax = np.interp(0.7, anat._T, anat._A) * anat.sx + 38 * anat.sx
    return np.array([rng.choice([-1.0, 1.0]) * ax, anat.y0, anat.z(rng.uniform(0.35, 0.7))])


_SITES: dict[str, Callable[[_Anatomy, np.random.Generator], np.ndarray]] = {
    "neck_node": _site_neck_node,
    "supraclavicular": lambda a, r: _trunk_point(a, r, (0.745, 0.77), (0.25, 0.5), (-0.2, 0.3)),
    "axilla": lambda a, r: _trunk_point(a, r, (0.66, 0.74), (0.72, 0.85), (-0.3, 0.3)),
    "mediastinum": _site_mediastinum,
    "hilar": _site_hilar,
    "paraaortic": _site_paraaortic,
    "mesenteric": lambda a, r: _trunk_point(a, r, (0.36, 0.47), (0.0, 0.4), (0.0, 0.5)),
    "pelvic_node": lambda a, r: _trunk_point(a, r, (0.27, 0.35), (0.3, 0.55), (-0.3, 0.3)),
    "inguinal": lambda a, r: _trunk_point(a, r, (0.21, 0.25), (0.35, 0.6), (0.3, 0.65)),
    "spleen": lambda a, r: _in_organ(a, "spleen", r, 0.6),
    "liver": lambda a, r: _in_organ(a, "liver", r, 0.75),
    "lung": _site_lung,
    "lung_medial": _site_lung_medial,
    "subcutaneous": _site_subcutaneous,
    "oropharynx": _site_oropharynx,
    "skull_base": _site_skull_base,
    "prostate_bed": _site_prostate_bed,
    "bone": _site_bone,
    "limb_soft_tissue": _site_limb_soft_tissue,
    "trunk_wall": lambda a, r: _trunk_point(a, r, (0.3, 0.7), (0.6, 0.8), (-0.6, 0.6)),
}
# Tissue a site's lesion centre must lie in (else the draw is retried): keeps nodes out of the
# liver, bone lesions in bone, lung lesions in the lung, and so on.
_NODAL = ("soft_tissue", "fat", "blood_pool")
_SITE_TISSUE: dict[str, tuple[str, ...]] = {
    "neck_node": _NODAL, "supraclavicular": _NODAL, "axilla": _NODAL, "mediastinum": _NODAL,
    "hilar": (*_NODAL, "lung"), "paraaortic": _NODAL, "mesenteric": (*_NODAL, "bowel"),
    "pelvic_node": _NODAL, "inguinal": _NODAL, "spleen": ("spleen",), "liver": ("liver",),
    "lung": ("lung",), "lung_medial": ("lung",), "subcutaneous": ("fat", "soft_tissue"),
    "oropharynx": ("soft_tissue", "tonsil", "salivary"),
    "skull_base": ("soft_tissue", "tonsil", "salivary"),
    "prostate_bed": ("prostate", "soft_tissue", "fat"), "bone": ("bone", "soft_tissue"),
    "limb_soft_tissue": ("soft_tissue", "fat", "bone"), "trunk_wall": ("soft_tissue", "fat"),
}


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _paint_lesion(grid: _Grid, act: np.ndarray, mask: np.ndarray, body: np.ndarray,
                  lesion: Lesion, rng: np.random.Generator) -> int:
    """Paint one irregular lesion (partial-volume aware) into ``act`` and ``mask`` in place.

    The surface is ``|R^T (p - c) / radii| = 1 + amp * f(direction)`` with ``f`` a sum of a few
    random low-frequency cosines, so lesions are lobulated rather than perfect ellipsoids.
    Returns the number of mask voxels added.
    """
    c = np.asarray(lesion.center_mm)
    radius = lesion.diameter_mm / 2
    aspect = np.exp(rng.uniform(-0.3, 0.3, size=3))
    radii = radius * aspect / np.prod(aspect) ** (1 / 3)  # same volume as the sphere
    rot = _random_rotation(rng)
    amp = rng.uniform(0.08, 0.25)
    n_waves = 4
    waves = rng.normal(size=(n_waves, 3)) * rng.uniform(1.0, 2.5, size=(n_waves, 1))
    phases = rng.uniform(0, 2 * np.pi, size=n_waves)
    weights = rng.normal(size=n_waves) / np.sqrt(n_waves / 2)
    box = grid.box(c, np.full(3, radii.max() * (1 + 3 * amp) + grid.spacing.max()))
    if box is None:
        return 0
    # Supersample each voxel ss³ times so that occupancy (partial volume) is known.
    ss = 3
    pts = []
    for i in range(3):
        idx = np.arange(box[i].start, box[i].stop)
        sub = idx[:, None] + (np.arange(ss)[None, :] + 0.5) / ss - 0.5
        pts.append((grid.origin[i] + sub.reshape(-1) * grid.spacing[i] - c[i]).astype(np.float32))
    p = np.stack(np.meshgrid(*pts, indexing="ij"), axis=-1)  # (nx*ss, ny*ss, nz*ss, 3)
    d = (p @ rot.astype(np.float32)) / radii.astype(np.float32)
    rho = np.linalg.norm(d, axis=-1)
    direction = d / np.maximum(rho, 1e-6)[..., None]
    f = np.cos(direction @ waves.T.astype(np.float32) + phases.astype(np.float32)) @ weights
    surface = 1.0 + amp * np.clip(f, -2.5, 2.5)
    inside = rho <= surface
    # Uptake profile: slightly hotter rim, optional cold necrotic core, mild texture.
    uptake = lesion.suv * (1.0 + 0.1 * f.astype(np.float32) * amp * 4)
    if lesion.necrotic:
        core = rho < surface * rng.uniform(0.4, 0.65)
        uptake = np.where(core, np.maximum(lesion.background_suv, uptake * rng.uniform(0.15, 0.4)),
                          uptake)
    nx, ny, nz = (box[i].stop - box[i].start for i in range(3))
    occ = inside.reshape(nx, ss, ny, ss, nz, ss).mean(axis=(1, 3, 5)).astype(np.float32)
    hot = np.where(inside, uptake, 0).reshape(nx, ss, ny, ss, nz, ss).mean(axis=(1, 3, 5))
    inbody = body[box]
    occ *= inbody
    hot = hot.astype(np.float32) * inbody
    sub_act = act[box]
    sub_act *= 1.0 - occ
    sub_act += hot
    sub_mask = mask[box]
    new = (occ >= 0.5) & (sub_mask == 0)
    centre = grid.voxel(c)
    if centre is not None and mask[centre] == 0 and not new.any():
        # Smaller than a voxel: keep the voxel holding the centre (and give it the lesion's
        # partial-volume-weighted uptake, which the occupancy already did).
        new[tuple(centre[i] - box[i].start for i in range(3))] = True
    sub_mask[new] = 1
    return int(new.sum())


# --------------------------------------------------------------------------------------------
# One patient


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
        config: geometry (``shape``, ``spacing_mm``) and ``seed``.
        cohort: a key of :data:`COHORTS`, or :data:`NEGATIVE_CONTROL` (FDG, no lesions).
        index: the patient's index within its cohort.

    Returns:
        The patient: ``pet`` (X, Y, Z) float32 SUV ≥ 0, ``mask`` (X, Y, Z) uint8, the affine and
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


def _place(grid, anat, lab, site, rng, tries: int = 30) -> np.ndarray | None:
    """Draw a lesion centre for ``site``: inside the body, not inside a hot organ, and in the
    site's tissue when a draw achieves that within ``tries`` (coarse grids can make a small
    organ miss every voxel centre); None if no draw even lands in the body."""
    tissue = {LABELS[name] for name in _SITE_TISSUE.get(site, ())}
    fallback = None
    for _ in range(tries):
        c = _SITES[site](anat, rng)
        v = grid.voxel(c)
        if v is None:
            continue
        label = int(lab[v])
        if label in _FORBIDDEN_CENTRE:
            continue
        if tissue and label not in tissue:
            fallback = c if fallback is None else fallback
            continue
        return c
    return fallback


def _local_background(grid: _Grid, act: np.ndarray, c: np.ndarray, diameter: float) -> float:
    """Median activity of the (pre-lesion) tissue around a lesion centre, SUV."""
    box = grid.box(c, np.full(3, max(diameter / 2, grid.spacing.max())))
    region = act[box]
    region = region[region > 0]
    return float(np.median(region)) if region.size else 0.5


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


# --------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=True, suffix=".tmp")


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode()[:79]
    # mtime=0: the same arrays give byte-identical files.
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _plan(config: PhantomConfig) -> list[tuple[str, int]]:
    for name in config.cohorts:
        _check_cohort(name)
    plan = [(name, i) for name, n in config.cohorts.items() for i in range(int(n))]
    plan += [(NEGATIVE_CONTROL, i) for i in range(int(config.negative_controls))]
    return plan


def _write_patient(job: tuple[PhantomConfig, str, int, str]) -> tuple[dict, list[dict]]:
    config, cohort, index, out = job
    out_dir = Path(out)
    patient = make_patient(config, cohort, index)
    pet_rel = Path(cohort) / f"{patient.patient_id}_pet.nii.gz"
    mask_rel = Path(cohort) / f"{patient.patient_id}_mask.nii.gz"
    (out_dir / cohort).mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / pet_rel, _nifti_bytes(patient.pet, patient.affine, "PET SUV (bw)"))
    _atomic_write(out_dir / mask_rel, _nifti_bytes(patient.mask, patient.affine, "lesion mask"))
    row = {"patient_id": patient.patient_id, "cohort": cohort, "tracer": patient.tracer,
           "pet_path": pet_rel.as_posix(), "mask_path": mask_rel.as_posix(), "role": patient.role}
    lesions = [
        {"patient_id": patient.patient_id, "lesion": k, "site": les.site,
         "diameter_mm": f"{les.diameter_mm:.1f}", "x_mm": f"{les.center_mm[0]:.1f}",
         "y_mm": f"{les.center_mm[1]:.1f}", "z_mm": f"{les.center_mm[2]:.1f}",
         "suv": f"{les.suv:.2f}", "background_suv": f"{les.background_suv:.2f}",
         "faint": int(les.faint), "necrotic": int(les.necrotic), "mask_voxels": les.mask_voxels}
        for k, les in enumerate(patient.lesions)
    ]
    return row, lesions


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write, suffix=".tmp")


def generate_study(output_dir: str | Path, config: PhantomConfig, *, progress: bool = True,
                   num_workers: int = 1) -> Path:
    """Write a synthetic study: one PET and one mask NIfTI per patient, then ``manifest.csv``.

    Layout::

        <output_dir>/<cohort>/<patient_id>_pet.nii.gz    float32 SUV, RAS affine
        <output_dir>/<cohort>/<patient_id>_mask.nii.gz   uint8 {0, 1}, same grid
        <output_dir>/lesions.csv                         one row per lesion (site, size, SUV, …)
        <output_dir>/manifest.csv                        written last

    Every file is written to a ``.tmp`` sibling and renamed, so an interrupted run never leaves
    a half-written NIfTI; an existing ``manifest.csv`` is removed before the first volume is
    written and the new one is written last, so a manifest exists only once every volume it
    lists does. Volumes of an earlier, larger study in the same folder are left in place but
    are not listed.

    Args:
        output_dir: created if missing.
        config: cohorts (name → count), negative_controls, shape, spacing_mm, seed.
        progress: show a tqdm progress bar.
        num_workers: processes to use (1 = in this process). Patients are independent and
            individually seeded, so the output does not depend on it.

    Returns:
        Path of ``manifest.csv``.

    Raises:
        ValueError: an unknown cohort name (the message lists the known ones).
    """
    plan = _plan(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    # A manifest marks a complete study: drop an old one first, so that a re-run that fails
    # half-way cannot leave an old manifest over a mix of old and new volumes.
    manifest.unlink(missing_ok=True)
    jobs = [(config, cohort, i, str(out)) for cohort, i in plan]
    rows: list[dict] = []
    lesion_rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc="phantoms", unit="patient", disable=not progress)
    try:
        if num_workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for row, les in pool.map(_write_patient, jobs):
                    rows.append(row)
                    lesion_rows.extend(les)
                    bar.update()
        else:
            for job in jobs:
                row, les = _write_patient(job)
                rows.append(row)
                lesion_rows.extend(les)
                bar.update()
    finally:
        bar.close()
    _write_csv(out / "lesions.csv", LESION_COLUMNS, lesion_rows)
    _write_csv(manifest, MANIFEST_COLUMNS, rows)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m igconda.data.phantoms --config YAML --output DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m igconda.data.phantoms",
        description="Generate synthetic whole-body PET cohorts (NIfTI + manifest.csv).",
    )
    parser.add_argument("--config", help="study YAML (its phantoms section); default: defaults")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--seed", type=int, help="override phantoms.seed")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = {"phantoms": {"seed": args.seed}} if args.seed is not None else None
    start = time.perf_counter()
    try:  # ConfigError is a ValueError: a bad config or cohort name gets one line, not a trace
        config = load_config(args.config, overrides).phantoms
        manifest = generate_study(args.output, config, progress=not args.no_progress,
                                  num_workers=args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(manifest.parent / "lesions.csv", newline="") as fh:
        n_lesions = sum(1 for _ in csv.DictReader(fh))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["cohort"]] = counts.get(row["cohort"], 0) + 1
    print(f"wrote {len(rows)} patients ({n_lesions} lesions) in {elapsed:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"grid {tuple(config.shape)} at {tuple(config.spacing_mm)} mm, seed {config.seed}")
    print(f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
