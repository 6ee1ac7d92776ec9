"""The anomaly methods: objects that turn a batch of slices into named maps.

Every anomaly method (IgCONDA's map kinds, the w = 0 control, 41 % SUVmax thresholding, the raw
intensity control, and the trained baselines of :mod:`igconda.baselines`) has the same small
interface, :class:`AnomalyMethod`: it turns a batch of slices (numpy columns of
:data:`igconda.data.schema.SLICE_SCHEMA`, read with :mod:`igconda.slice_batch`) into named
(N, H, W) maps in [0, 1]; one IgCONDA pass yields several named maps. The maps are then scored
by :func:`igconda.evaluation.score_methods`; the method names are those of
:mod:`igconda.evaluation`. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from igconda.data.schema import HEALTHY
from igconda.evaluation import INTENSITY, THRESHOLD_41, igconda_method
from igconda.map_kinds import CONTROLS, MAP_KINDS
from igconda.slice_batch import batch_images


class AnomalyMethod(Protocol):
    """What every anomaly method offers: named maps of a batch of slices.

    Attributes:
        names: the method names ``maps`` returns, in a fixed order.
    """

    names: tuple[str, ...]

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Numpy columns of the slice schema → ``{name: (N, H, W) float32 map in [0, 1]}``."""
        ...


class ThresholdMethod:
    """41 % SUVmax thresholding (paper §3.3): a binary map, lesion where SUV ≥ 0.41 · SUVmax.

    Needs the ``suv_max``, ``scale_min`` and ``scale_max`` columns of the slice schema.
    """

    names = (THRESHOLD_41,)

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        from igconda.baselines.thresholding import threshold_maps

        missing = [c for c in ("suv_max", "scale_min", "scale_max") if c not in batch]
        if missing:
            raise ValueError(f"41 % SUVmax thresholding needs the slice columns {missing}")
        images = batch_images(batch)
        return {THRESHOLD_41: np.asarray(threshold_maps(
            images, batch["suv_max"], batch["scale_min"], batch["scale_max"]), dtype=np.float32)}


class IntensityMethod:
    """The raw-intensity control: the min–max scaled PET itself as the map."""

    names = (INTENSITY,)

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        from igconda.baselines.thresholding import intensity_maps

        return {INTENSITY: np.asarray(intensity_maps(batch_images(batch)), dtype=np.float32)}


def igconda_maps(images: np.ndarray, guided: np.ndarray, unguided: np.ndarray,
                 kinds: Sequence[str] = MAP_KINDS) -> dict[str, np.ndarray]:
    """Named IgCONDA maps from slices and their two decodes (numpy in, numpy out).

    Args:
        images: (N, H, W) slices x in [0, 1].
        guided: (N, H, W) healthy counterfactuals x̂_w.
        unguided: (N, H, W) unguided decodes x̂_∅ of the same encodings.
        kinds: map kinds of :data:`~igconda.map_kinds.MAP_KINDS`.

    Returns:
        ``{"igconda_<kind>": (N, H, W) float32}`` for each kind, and ``"igconda_w0"``.
    """
    from igconda.diffusion.counterfactual import anomaly_maps

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, np.float32, ["C", "W"])).unsqueeze(1)

    maps = anomaly_maps(tensor(images), tensor(guided), tensor(unguided), tuple(kinds))
    return {igconda_method(k): m.squeeze(1).numpy() for k, m in maps.items()}


class StoredCounterfactualMethod:
    """IgCONDA's maps from decodes already computed: the ``counterfactual`` (x̂_w) and
    ``counterfactual_w0`` (x̂_∅) columns of :data:`~igconda.data.schema.PREDICTION_SCHEMA`.

    Used to score stored predictions (every map kind costs no network evaluation)."""

    def __init__(self, kinds: Sequence[str] = MAP_KINDS) -> None:
        self.kinds = tuple(kinds)
        self.names = tuple(igconda_method(k) for k in (*self.kinds, *CONTROLS))

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return igconda_maps(batch_images(batch), batch_images(batch, "counterfactual"),
                            batch_images(batch, "counterfactual_w0"), self.kinds)


class IgCondaMethod:
    """IgCONDA: encode each slice once, decode guided towards healthy and unguided, all maps.

    Args:
        model: the noise-prediction network, in eval mode on ``device``.
        schedule: its ``NoiseSchedule``.
        noise_level: D; stride: s; guidance_scale: w (see :mod:`igconda.diffusion.ddim`).
        kinds: the map kinds to return (the w = 0 control is always returned).
        device: where the network runs.
        amp: autocast the network where it pays (:mod:`igconda.precision`).
        counterfactual_fn: replaces :func:`igconda.diffusion.counterfactual.counterfactual_pair` (tests).
    """

    def __init__(self, model: torch.nn.Module, schedule: Any, *, noise_level: int, stride: int,
                 guidance_scale: float, kinds: Sequence[str] = MAP_KINDS,
                 device: str | torch.device = "cpu", amp: bool = False,
                 counterfactual_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                 ) -> None:
        if counterfactual_fn is None:
            from igconda.diffusion.counterfactual import counterfactual_pair as counterfactual_fn
        self.model, self.schedule = model, schedule
        self.noise_level, self.stride = int(noise_level), int(stride)
        self.guidance_scale = float(guidance_scale)
        self.kinds = tuple(kinds)
        self.names = tuple(igconda_method(k) for k in (*self.kinds, *CONTROLS))
        self.device, self.amp = torch.device(device), bool(amp)
        self._pair = counterfactual_fn

    def counterfactuals(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) slices in [0, 1] → ``(x̂_w, x̂_∅)``, both (N, H, W) float32."""
        if images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
        if len(images) == 0:
            empty = np.zeros_like(images, dtype=np.float32)
            return empty, empty.copy()
        # np.require copies only when needed: Ray hands over read-only arrays, which torch rejects.
        x0 = torch.from_numpy(np.require(images, np.float32, ["C", "W"])).unsqueeze(1).to(self.device)
        with torch.inference_mode():
            guided, unguided = self._pair(
                self.model, x0, self.schedule, noise_level=self.noise_level, stride=self.stride,
                guidance_scale=self.guidance_scale, target_label=HEALTHY, amp=self.amp)
        return (guided.float().squeeze(1).cpu().numpy(), unguided.float().squeeze(1).cpu().numpy())

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        images = batch_images(batch)
        return igconda_maps(images, *self.counterfactuals(images), self.kinds)


def baseline_methods() -> list[AnomalyMethod]:
    """The baselines every study reports beside IgCONDA (41 % SUVmax, raw intensity)."""
    return [ThresholdMethod(), IntensityMethod()]
