"""Anatomy: body outline, organs and physiological uptake of one lesion-free patient.

Positions along the body are fractions ``t`` of the length from mid-thigh (t = 0) to the vertex
(t = 1); in-plane sizes scale with the patient's habitus. Below mid-thigh the legs go on to the
knees (t ≈ -0.39), ankles (t ≈ -0.87) and soles (t ≈ -0.95), for scans that include the feet.
:func:`draw_scan_length` draws a patient's height and scan range (vertex to mid-thigh, or to
the feet), :func:`_draw_anatomy` where things are, :func:`_draw_body` the activity (SUV) and
organ label volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from igconda.data.phantoms.grid import _ellipsoid, _Grid, _upsample_linear

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


#: Vertex to mid-thigh (t = 0 → 1) as a fraction of standing height, and the leg landmarks in t.
TRUNK_FRACTION = 0.514
T_KNEE, T_ANKLE, T_SOLE = -0.39, -0.87, -0.945


def draw_scan_length(rng: np.random.Generator, feet_fraction: float) -> tuple[float, float, float]:
    """A patient's height and the axial range of their scan (all mm).

    Whole-body PET runs from above the vertex to mid-thigh, or on to the feet when the disease
    may sit in the legs (sarcoma, melanoma): with probability ``feet_fraction``.

    Returns:
        (scan length, body length vertex → mid-thigh, top margin above the vertex).
    """
    height = rng.uniform(1550.0, 1900.0)
    body = TRUNK_FRACTION * height
    margin = rng.uniform(10.0, 40.0)
    if rng.random() < feet_fraction:
        below = -T_SOLE * body + rng.uniform(10.0, 30.0)  # the soles and a little air
    else:
        below = rng.uniform(0.0, 0.12) * body  # mid-thigh, give or take
    return float(margin + body + below), float(body), float(margin)


def _draw_anatomy(grid: _Grid, rng: np.random.Generator, length_mm: float | None = None,
                  margin_mm: float | None = None) -> _Anatomy:
    fov = grid.fov
    if length_mm is None:
        # Fixed scan length: the vertex → mid-thigh body (~900 mm for a nominal adult) squeezed
        # into the grid, with a random top margin and the thighs cut at a random height.
        margin = rng.uniform(0.01, 0.04) * fov[2]
        length = fov[2] * rng.uniform(0.95, 1.06)
    else:  # the patient's own size, the grid sized to the scan (draw_scan_length)
        margin, length = margin_mm, length_mm
    z_top = grid.origin[2] + (grid.shape[2] - 0.5) * grid.spacing[2] - margin
    z_bottom = z_top - length
    arms_up = bool(rng.random() < 0.6)
    s_w = rng.uniform(0.85, 1.15)  # habitus: width
    s_d = rng.uniform(0.85, 1.2) * (0.6 + 0.4 * s_w)  # depth, correlated with width
    # Widest point: shoulders, or the arms beside the trunk.
    half_width = 172.0 * s_w + (0.0 if arms_up else 2 * 38.0 * s_w)
    half_depth = 105.0 * s_d
    # Leave room in-plane for the off-axis offset (make_patient: up to 6 % of the FOV).
    room = (0.46, 0.44) if length_mm is None else (0.42, 0.40)
    fit = min(1.0, room[0] * fov[0] / half_width, room[1] * fov[1] / half_depth)
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
    # Legs below mid-thigh: narrowing to the knee, calf, ankle; the legs converge a little.
    leg_r = np.interp(t, [T_ANKLE, -0.6, T_KNEE, -0.25, 0.0], [32, 50, 44, 60, 78]) / 78 * thigh_r
    leg_x = np.interp(t, [T_ANKLE, 0.0], [0.8, 1.0]) * thigh_x
    legs = np.zeros(grid.shape, bool)
    for sgn in (1.0, -1.0):
        legs |= (((X - sgn * leg_x) ** 2 + (Y - anat.y0) ** 2) <= leg_r**2) & (t < 0.235) & (t >= T_ANKLE)
        # the foot: pointing anteriorly from the ankle to the sole
        foot = ((((X - sgn * 0.8 * thigh_x) / (38 * anat.so)) ** 2
                 + ((Y - anat.y0 - 45 * anat.so) / (95 * anat.so)) ** 2) <= 1.0)
        legs |= foot & (t < T_ANKLE) & (t >= T_SOLE)
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
        # femur down to the knee, then the thinner tibia down to the ankle
        bone_r = np.where(t > T_KNEE, 14.0, 10.0) * so
        femur = (((X - sgn * leg_x) ** 2 + (Y - anat.y0) ** 2) <= bone_r ** 2) & (t < 0.25) & (t > T_ANKLE)
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

