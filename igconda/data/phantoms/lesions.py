"""Lesions: each cohort's sites, sizes and uptake, and how one irregular lesion is painted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from igconda.data.phantoms.anatomy import _FORBIDDEN_CENTRE, LABELS, T_ANKLE, T_KNEE, _Anatomy
from igconda.data.phantoms.grid import _Grid

NEGATIVE_CONTROL = "negative_control"
#: Scans of negative controls that run to the feet.
NEGATIVE_CONTROL_FEET_FRACTION = 0.1
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 5.0, 60.0


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
        feet_fraction: probability that the scan runs on to the feet instead of stopping at
            mid-thigh (``PhantomConfig.scan_length: anatomical``).
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
    feet_fraction: float = 0.0


COHORTS: dict[str, CohortTemplate] = {
    # Nodal chains (neck, axilla, mediastinum, abdomen, pelvis), several per patient, often bulky.
    "lymphoma": CohortTemplate(
        "FDG", "internal", (3, 9), (8.0, 40.0), (25.0, 60.0), (4.0, 25.0),
        (("mediastinum", 0.2), ("neck_node", 0.18), ("axilla", 0.14), ("supraclavicular", 0.08),
         ("hilar", 0.06), ("paraaortic", 0.12), ("mesenteric", 0.08), ("pelvic_node", 0.06),
         ("inguinal", 0.05), ("spleen", 0.03)),
        feet_fraction=0.1,
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
        feet_fraction=0.5,  # primaries of the legs and feet are common: scanned to the feet
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
        necrosis_prob=0.6, feet_fraction=0.8,  # extremity sarcoma: the whole limb is scanned
    ),
}


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
        # Thigh, knee or calf (a draw below the scan's end is retried by _place); the leg's
        # radius and axis follow the outline of anatomy._draw_body.
        t = rng.uniform(T_ANKLE + 0.1, 0.2)
        r = np.interp(t, [T_ANKLE, -0.6, T_KNEE, -0.25, 0.0], [32, 50, 44, 60, 78]) * np.sqrt(anat.sx * anat.sy)
        x = np.interp(t, [T_ANKLE, 0.0], [0.8, 1.0]) * 85.0 * anat.sx
        th = rng.uniform(0, 2 * np.pi)
        f = rng.uniform(0.3, 0.6)
        return np.array([rng.choice([-1.0, 1.0]) * x + f * r * np.cos(th),
                         anat.y0 + f * r * np.sin(th), anat.z(t)])
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

