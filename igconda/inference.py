"""Counterfactual prediction for one batch of slices: the worker side of batch inference.

:class:`CounterfactualPredictor` follows Ray Data's class-based predictor pattern: the model is
loaded once in ``__init__`` (one copy per actor), and ``__call__`` maps a batch of slice rows
(columns of :data:`igconda.data.schema.SLICE_SCHEMA`, as numpy arrays) to a batch of results.
There is no Ray in this module, so a plain test, ``igconda detect`` and the benchmarks call the
same object directly.

For each slice the predictor produces (paper §2.4, §3.4):

* ``counterfactual`` x̂ — the healthy counterfactual of x from DDIM encoding to level D with the
  unconditional model and guided decoding towards c = 1 (:func:`igconda.diffusion.ddim.counterfactual`);
* ``anomaly_map`` — |x − x̂| (``map_kind="abs"``, the paper's) or max(x − x̂, 0) (``"hot"``);
* the paper's metrics of :func:`igconda.metrics.score_batch` for unhealthy slices (label 2):
  ``dsc_max`` (⌈DSC⌉), ``tau_star``, ``hd95``, ``auprc``, ``n_lesions``, ``n_detected``,
  ``sensitivity``; healthy slices get NaN, since the paper's means run over unhealthy slices only;
* ``dsc_max_abs`` and ``dsc_max_hot`` — ⌈DSC⌉ of both map kinds, so the hot-only map can be
  reported beside the paper's map without a second diffusion pass.

Maps are returned flattened (H·W float32 per row), like the schema's ``image`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igconda.data.schema import HEALTHY, UNHEALTHY

logger = logging.getLogger(__name__)

MAP_KINDS = ("abs", "hot")

#: Columns copied from the input batch to the output, when present.
PASSTHROUGH_COLUMNS = (
    "patient_id", "cohort", "role", "tracer", "split", "slice_index", "num_slices", "label",
    "lesion_pixels", "height", "width",
)

#: Metric columns of :func:`igconda.metrics.score_batch` that the predictor reports.
METRIC_COLUMNS = ("dsc_max", "tau_star", "hd95", "auprc", "n_lesions", "n_detected", "sensitivity")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_counterfactual_params(noise_level: int, stride: int, guidance_scale: float,
                                num_train_timesteps: int) -> None:
    """Raise ValueError unless 0 < D < T, s ≥ 1 divides D, and w ≥ 0.

    D must be a multiple of s so that encoding and decoding walk the same timestep grid
    t = 0, s, 2s, …, D (DESIGN.md).
    """
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)):
        raise ValueError(f"noise level D must be an integer, got {noise_level!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)):
        raise ValueError(f"stride s must be an integer, got {stride!r}")
    if not 0 < noise_level < num_train_timesteps:
        raise ValueError(f"noise level D={noise_level} must be in (0, {num_train_timesteps}) for a "
                         f"model trained with T={num_train_timesteps} timesteps")
    if stride < 1 or noise_level % stride:
        raise ValueError(f"stride s={stride} must be >= 1 and divide the noise level D={noise_level}")
    if not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance scale w={guidance_scale} must be a finite number >= 0")


def stack_column(column: Any, height: int, width: int, dtype: Any = np.float32) -> np.ndarray:
    """An image/mask column as it arrives in a numpy batch → (N, H, W).

    Ray Data hands a ``list<...>`` column over either as an object array of 1D arrays or, when
    the lists have a fixed size, as a 2D (N, H·W) array; a plain caller may pass (N, H, W).
    """
    array = np.asarray(column) if not isinstance(column, np.ndarray) else column
    if array.dtype == object:
        if len(array) == 0:
            return np.zeros((0, height, width), dtype=dtype)
        array = np.stack([np.asarray(v, dtype=dtype).reshape(-1) for v in array])
    array = np.asarray(array, dtype=dtype)
    if array.ndim == 2 and array.shape[1] == height * width:
        return array.reshape(-1, height, width)
    if array.ndim == 3 and array.shape[1:] == (height, width):
        return array
    raise ValueError(f"cannot read an image column of shape {array.shape} as slices of {height}×{width}")


def _slice_shape(batch: Mapping[str, Any], default: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) from the batch's ``height``/``width`` columns, else the model's training size."""
    if "height" in batch and "width" in batch and len(batch["height"]):
        heights, widths = np.unique(np.asarray(batch["height"])), np.unique(np.asarray(batch["width"]))
        if len(heights) != 1 or len(widths) != 1:
            raise ValueError(f"a batch mixes slice sizes {heights.tolist()}×{widths.tolist()}")
        return int(heights[0]), int(widths[0])
    if default is None:
        raise ValueError("the batch has no height/width columns and no default slice size is known")
    return default


class CounterfactualPredictor:
    """Healthy counterfactuals, anomaly maps and metrics for batches of slices.

    Args:
        checkpoint: checkpoint folder (``igconda.checkpoint`` layout); the model is loaded once.
        noise_level: D, in training-timestep units (0 < D < T).
        guidance_scale: w, the reference code's form ε_u + w (ε_c − ε_u), w ≥ 0.
        stride: s, a divisor of D; the decoder makes 2·D/s guided network evaluations
            (batched as one pass of 2B) and the encoder D/s.
        map_kind: ``"abs"`` |x − x̂| (the paper's) or ``"hot"`` max(x − x̂, 0); it decides the
            ``anomaly_map`` column and the metric columns.
        device: ``None``/``"auto"`` picks CUDA when available; else e.g. ``"cpu"``, ``"cuda:1"``.
        amp: autocast the network where the hardware has fast low-precision units
            (:mod:`igconda.precision`: GPUs, CPUs with bf16 units).
        score_other_map: also compute ⌈DSC⌉ of the other map kind (``dsc_max_abs`` /
            ``dsc_max_hot``); costs one ⌈DSC⌉ pass, no network evaluation.
        counterfactual_fn: replaces :func:`igconda.diffusion.ddim.counterfactual` (tests).
        score_fn: replaces :func:`igconda.metrics.score_batch` (tests).
        keep_inputs: also return the input ``image`` and ``mask`` (flattened), so that the
            per-slice output files are self-contained for figures and viewers.

    Raises:
        igconda.checkpoint.CheckpointError: the checkpoint folder is missing or invalid.
        ValueError: invalid D, s, w or map kind.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        noise_level: int,
        guidance_scale: float,
        stride: int,
        map_kind: str = "abs",
        device: str | torch.device | None = None,
        amp: bool = True,
        score_other_map: bool = True,
        counterfactual_fn: Callable[..., torch.Tensor] | None = None,
        score_fn: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None,
        keep_inputs: bool = False,
    ) -> None:
        from igconda.checkpoint import load_model
        from igconda.diffusion.schedule import NoiseSchedule

        if map_kind not in MAP_KINDS:
            raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}")
        self.device = resolve_device(device)
        self.model, self.config = load_model(checkpoint, self.device)
        self.schedule = NoiseSchedule.from_config(self.config.train)
        check_counterfactual_params(noise_level, stride, guidance_scale,
                                    self.schedule.num_train_timesteps)
        self.noise_level = int(noise_level)
        self.guidance_scale = float(guidance_scale)
        self.stride = int(stride)
        self.map_kind = map_kind
        self.amp = bool(amp)
        self.score_other_map = score_other_map
        self.keep_inputs = keep_inputs
        if counterfactual_fn is None:
            from igconda.diffusion.ddim import counterfactual as counterfactual_fn
        if score_fn is None:
            from igconda.metrics import optimal_dice, score_batch

            self._score = score_batch
            # The other map needs only ⌈DSC⌉: skip HD95, AUPRC and detection for it.
            self._dice = lambda maps, masks: optimal_dice(maps, masks)[0]
        else:
            self._score = score_fn
            self._dice = lambda maps, masks: score_fn(maps, masks)["dsc_max"]
        self._counterfactual = counterfactual_fn
        side = self.config.preprocess.output_size[0]
        self._default_shape = (side, self.config.preprocess.output_size[1])

    # -- the network part ---------------------------------------------------------------------
    def counterfactuals(self, images: np.ndarray) -> np.ndarray:
        """Healthy counterfactuals x̂ of (N, H, W) images in [0, 1] → (N, H, W) float32."""
        if images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
        if len(images) == 0:
            return np.zeros_like(images, dtype=np.float32)
        # np.require copies only when needed: Ray hands over read-only arrays, which torch rejects.
        x0 = torch.from_numpy(np.require(images, np.float32, ["C", "W"])).unsqueeze(1).to(self.device)
        with torch.inference_mode():
            # amp: ddim autocasts only the network (bf16, or fp16 on V100s); the DDIM trajectory
            # itself stays float32.
            x_hat = self._counterfactual(
                self.model, x0, self.schedule, noise_level=self.noise_level, stride=self.stride,
                guidance_scale=self.guidance_scale, target_label=HEALTHY, amp=self.amp,
            )
        return x_hat.float().squeeze(1).cpu().numpy()

    @staticmethod
    def anomaly_maps(images: np.ndarray, counterfactuals: np.ndarray, kind: str) -> np.ndarray:
        """(N, H, W) anomaly maps in [0, 1]: |x − x̂| (``abs``) or max(x − x̂, 0) (``hot``).

        Computed by :func:`igconda.diffusion.ddim.anomaly_map`, which clips to [0, 1]: x̂ may
        leave [0, 1] slightly (DDIM does not clip x̂, which would break the inversion) while
        the metrics' thresholds τ ∈ {0.1 … 0.9} assume [0, 1].
        """
        from igconda.diffusion.ddim import anomaly_map

        if kind not in MAP_KINDS:
            raise ValueError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")
        x0 = torch.from_numpy(np.require(images, np.float32, ["C", "W"])).unsqueeze(1)
        x_hat = torch.from_numpy(np.require(counterfactuals, np.float32, ["C", "W"])).unsqueeze(1)
        return anomaly_map(x0, x_hat, kind).squeeze(1).numpy()

    # -- one batch ----------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Predict one batch of slice rows.

        Args:
            batch: numpy columns of :data:`~igconda.data.schema.SLICE_SCHEMA` (``image`` is
                required; ``mask`` and ``label`` enable the metrics; identifiers are copied).
                ``image``/``mask`` may be object arrays of flat arrays, (N, H·W) or (N, H, W).

        Returns:
            Numpy columns, one row per input slice: the identifiers present in the input
            (:data:`PASSTHROUGH_COLUMNS`), ``anomaly_map`` and ``counterfactual`` as (N, H·W)
            float32 arrays (flattened slices), the :data:`METRIC_COLUMNS` (float64, NaN for
            healthy slices or when there is no mask), ``dsc_max_abs`` and ``dsc_max_hot``.
        """
        if "image" not in batch:
            raise ValueError("the batch has no 'image' column")
        height, width = _slice_shape(batch, self._default_shape)
        images = stack_column(batch["image"], height, width, np.float32)
        n = len(images)
        masks = stack_column(batch["mask"], height, width, np.uint8) if "mask" in batch else None

        x_hat = self.counterfactuals(images)
        maps = {kind: self.anomaly_maps(images, x_hat, kind) for kind in MAP_KINDS}

        out: dict[str, np.ndarray] = {k: np.asarray(batch[k]) for k in PASSTHROUGH_COLUMNS if k in batch}
        out["height"] = np.full(n, height, dtype=np.int32)
        out["width"] = np.full(n, width, dtype=np.int32)
        if masks is not None and "label" not in out:
            out["label"] = np.where(masks.reshape(n, -1).any(axis=1), UNHEALTHY, HEALTHY).astype(np.int8)
        out["anomaly_map"] = _flat_rows(maps[self.map_kind])
        out["counterfactual"] = _flat_rows(x_hat)
        if self.keep_inputs:
            out["image"] = _flat_rows(images)
            if masks is not None:
                out["mask"] = masks.reshape(n, -1)
        out.update(self._metrics(maps, masks, out.get("label")))
        return out

    def _metrics(self, maps: dict[str, np.ndarray], masks: np.ndarray | None,
                 labels: np.ndarray | None) -> dict[str, np.ndarray]:
        """Metric columns; only unhealthy slices are scored, the rest stay NaN."""
        n = len(maps["abs"])
        result = {k: np.full(n, np.nan) for k in (*METRIC_COLUMNS, "dsc_max_abs", "dsc_max_hot")}
        if masks is None or labels is None:
            return result
        unhealthy = np.asarray(labels) == UNHEALTHY
        if not unhealthy.any():
            return result
        scores = self._score(maps[self.map_kind][unhealthy], masks[unhealthy])
        for key in METRIC_COLUMNS:
            if key in scores:
                result[key][unhealthy] = np.asarray(scores[key], dtype=np.float64)
        if "sensitivity" not in scores and "n_lesions" in scores:
            with np.errstate(invalid="ignore", divide="ignore"):
                result["sensitivity"][unhealthy] = (np.asarray(scores["n_detected"], float)
                                                    / np.asarray(scores["n_lesions"], float))
        result[f"dsc_max_{self.map_kind}"] = result["dsc_max"].copy()
        if self.score_other_map:
            other = "hot" if self.map_kind == "abs" else "abs"
            result[f"dsc_max_{other}"][unhealthy] = np.asarray(
                self._dice(maps[other][unhealthy], masks[unhealthy]), dtype=np.float64)
        return result


def _flat_rows(array: np.ndarray) -> np.ndarray:
    """(N, H, W) → (N, H·W) float32: one flattened slice per row, as the schema stores images.

    A 2D array (not an object array of rows) lets Ray Data keep the column as one contiguous
    tensor block instead of N Python objects.
    """
    return np.ascontiguousarray(array, dtype=np.float32).reshape(len(array), -1)
