"""Voxel grid of a phantom (RAS+, mm) and the geometric helpers every other part paints with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class _Grid:
    """Voxel-centre coordinates (mm) of the output volume, RAS, x/y centred (plus an offset),
    z from 0."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float],
                 offset_mm: Sequence[float] = (0.0, 0.0)):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        # offset_mm moves the array against the body (the patient lies off the scanner's axis),
        # so the body is off the array's centre; world x = y = 0 stays the body's axis.
        self.origin = np.array(
            [-(self.shape[0] - 1) / 2 * spacing[0] - offset_mm[0],
             -(self.shape[1] - 1) / 2 * spacing[1] - offset_mm[1], 0.0]
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

