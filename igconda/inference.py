"""Counterfactual prediction for one batch of slices: the worker side of batch inference.

:class:`CounterfactualPredictor` follows Ray Data's class-based predictor pattern: the model is
loaded once in ``__init__`` (one copy per actor), and ``__call__`` maps a batch of slice rows
(columns of :data:`igconda.data.schema.SLICE_SCHEMA`, as numpy arrays) to a batch of results.
There is no Ray in this module, so a plain test, ``igconda detect`` and the benchmarks call the
same object directly. The maps come from :class:`igconda.anomaly_methods.IgCondaMethod` and the
metrics from :func:`igconda.evaluation.score_maps`, the path every stage evaluates through.

For each slice the predictor produces (paper §2.4, §3.4; the columns of
:data:`igconda.data.schema.PREDICTION_SCHEMA`):

* ``counterfactual`` x̂_w — the healthy counterfactual of x (DDIM encoding to level D with the
  unconditional model, decoding guided towards c = 1), and ``counterfactual_w0`` x̂_∅ — the
  unguided decode of the same encoding, batched with it
  (:func:`igconda.diffusion.counterfactual.counterfactual_pair`);
* ``anomaly_map`` — the chosen map kind (``map_kind``: ``abs`` |x − x̂_w|, the paper's; ``hot``;
  ``guidance``; ``guidance_abs``; see :func:`igconda.diffusion.counterfactual.anomaly_maps`);
* with ``score=True``, the paper's metrics of the chosen map for unhealthy slices (label 2):
  ``dsc_max`` (⌈DSC⌉), ``tau_star``, ``hd95``, ``auprc``, ``n_lesions``, ``n_detected``,
  ``sensitivity``, ``dice_tau`` (Dice at ``threshold``); healthy slices get NaN, since the paper's
  means run over unhealthy slices only; and ``dsc_max_<kind>`` for every map kind and the w = 0
  control (``dsc_max_w0``), so they can be compared without another diffusion pass.

Maps are returned flattened (H·W float32 per row), like the schema's ``image`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igconda.accel import accelerate_for_inference, batch_size_for_memory, measure_slice_bytes
from igconda.anomaly_methods import IgCondaMethod, igconda_maps
from igconda.data.schema import UNHEALTHY
from igconda.ddim_grid import check_counterfactual_params
from igconda.evaluation import igconda_method, score_maps
from igconda.map_kinds import CONTROLS, MAP_KINDS
from igconda.precision import autocast_dtype
from igconda.slice_batch import batch_images, batch_labels, slice_shape

logger = logging.getLogger(__name__)

__all__ = ["METRIC_COLUMNS", "PASSTHROUGH_COLUMNS", "CounterfactualPredictor", "resolve_device"]

#: Columns copied from the input batch to the output, when present.
PASSTHROUGH_COLUMNS = (
    "patient_id", "cohort", "role", "tracer", "slice_index", "num_slices", "label",
    "lesion_pixels", "height", "width",
)

#: Metric columns of the chosen map that the predictor reports (``score=True``).
METRIC_COLUMNS = ("dsc_max", "tau_star", "hd95", "auprc", "n_lesions", "n_detected", "sensitivity",
                  "dice_tau")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CounterfactualPredictor:
    """Healthy counterfactuals, anomaly maps and metrics for batches of slices.

    Args:
        checkpoint: checkpoint folder (``igconda.checkpoint`` layout); the model is loaded once.
        noise_level: D, in training-timestep units (0 < D < T).
        guidance_scale: w, the reference code's form ε_u + w (ε_c − ε_u), w ≥ 0.
        stride: s, a divisor of D; the encoder makes D/s network evaluations per slice and the
            guided/unguided pair 3·D/s (one batched pass of 3B per step).
        map_kind: one of :data:`~igconda.map_kinds.MAP_KINDS`; it decides the
            ``anomaly_map`` column and the metric columns.
        threshold: the calibrated τ of ``map_kind`` (``dice_tau`` is the Dice of
            ``anomaly_map >= threshold``); None leaves ``dice_tau`` NaN.
        device: ``None``/``"auto"`` picks CUDA when available; else e.g. ``"cpu"``, ``"cuda:1"``.
        amp: autocast the network where the hardware has fast low-precision units
            (:mod:`igconda.precision`: GPUs, CPUs with bf16 units).
        score: compute the metric columns (the batch inference job scores on its driver instead,
            through the same :func:`igconda.evaluation.score_methods`).
        score_other_map: also compute ⌈DSC⌉ of every other map kind and of the w = 0 control
            (``dsc_max_<kind>``); costs ⌈DSC⌉ passes, no network evaluation.
        counterfactual_fn: replaces :func:`igconda.diffusion.counterfactual.counterfactual_pair`
            (tests).
        keep_inputs: also return the input ``image`` and ``mask`` (flattened), so that the
            per-slice output files are self-contained for figures and viewers.
        compile: ``infer.compile``: torch.compile the network (:mod:`igconda.accel`).
        cuda_graphs: ``infer.cuda_graphs``: replay the DDIM loop from CUDA graphs (CUDA only).
        memory_fraction: ``infer.memory_fraction``; > 0 on CUDA measures the per-slice activation
            memory once and runs each batch in chunks of :attr:`batch_size` slices, chosen from
            that fraction of the free memory. 0 (or CPU) keeps ``batch_size``.
        batch_size: ``infer.batch_size``: the chunk size when memory does not choose it (None:
            every batch as it comes).

    Raises:
        igconda.checkpoint.CheckpointError: the checkpoint folder is missing or invalid.
        ValueError: invalid D, s, w (:mod:`igconda.ddim_grid`), τ or map kind.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        noise_level: int,
        guidance_scale: float,
        stride: int,
        map_kind: str = "abs",
        threshold: float | None = None,
        device: str | torch.device | None = None,
        amp: bool = True,
        score: bool = True,
        score_other_map: bool = True,
        counterfactual_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep_inputs: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
        memory_fraction: float = 0.0,
        batch_size: int | None = None,
    ) -> None:
        from igconda.checkpoint import load_model
        from igconda.diffusion.schedule import NoiseSchedule

        if map_kind not in MAP_KINDS:
            raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}")
        if threshold is not None and not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold τ must be in (0, 1], got {threshold!r}")
        self.device = resolve_device(device)
        self.model, self.config = load_model(checkpoint, self.device)
        self.schedule = NoiseSchedule.from_config(self.config.train)
        check_counterfactual_params(noise_level, stride, guidance_scale,
                                    self.schedule.num_train_timesteps)
        self.noise_level = int(noise_level)
        self.guidance_scale = float(guidance_scale)
        self.stride = int(stride)
        self.map_kind = map_kind
        self.threshold = None if threshold is None else float(threshold)
        self.amp = bool(amp)
        self.score = score
        self.score_other_map = score_other_map
        self.keep_inputs = keep_inputs
        self.batch_size = batch_size
        if memory_fraction > 0 and self.device.type == "cuda":
            per_slice = measure_slice_bytes(self.model, self.config.preprocess.output_size[0], self.device,
                                            amp_dtype=autocast_dtype(self.device, self.amp))
            self.batch_size = batch_size_for_memory(batch_size or 1, self.device, fraction=memory_fraction,
                                                    per_slice_bytes=per_slice)
            logger.info("memory_fraction %.2f: %.1f MiB per slice, batch %d", memory_fraction,
                        per_slice / 2**20, self.batch_size)
        # After the memory probe: it runs the eager network at two batch sizes that compiling
        # or recording graphs for would waste.
        self.network = accelerate_for_inference(self.model, self.device, compile=compile,
                                                cuda_graphs=cuda_graphs)
        self.method = IgCondaMethod(
            self.network, self.schedule, noise_level=self.noise_level, stride=self.stride,
            guidance_scale=self.guidance_scale, device=self.device, amp=self.amp,
            counterfactual_fn=counterfactual_fn)
        self._default_shape = tuple(self.config.preprocess.output_size[:2])

    # -- the network part ---------------------------------------------------------------------
    def counterfactuals(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) images in [0, 1] → ``(x̂_w, x̂_∅)``, both (N, H, W) float32, in chunks of
        at most :attr:`batch_size` slices (each slice's result does not depend on its batch)."""
        step = self.batch_size or len(images)
        if len(images) <= step:
            return self.method.counterfactuals(images)
        parts = [self.method.counterfactuals(images[i:i + step]) for i in range(0, len(images), step)]
        return np.concatenate([g for g, _ in parts]), np.concatenate([u for _, u in parts])

    # -- one batch ----------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Predict one batch of slice rows.

        Args:
            batch: numpy columns of :data:`~igconda.data.schema.SLICE_SCHEMA` (``image`` is
                required; ``mask`` and ``label`` enable the metrics; identifiers are copied).
                ``image``/``mask`` may be object arrays of flat arrays, (N, H·W) or (N, H, W).

        Returns:
            Numpy columns, one row per input slice: the identifiers present in the input
            (:data:`PASSTHROUGH_COLUMNS`), ``anomaly_map``, ``counterfactual`` and
            ``counterfactual_w0`` as (N, H·W) float32 arrays, and with ``score`` the
            :data:`METRIC_COLUMNS` (float64, NaN for healthy slices or without a mask) and
            ``dsc_max_<kind>`` for every map kind and ``w0``.
        """
        if "image" not in batch:
            raise ValueError("the batch has no 'image' column")
        height, width = slice_shape(batch, self._default_shape)
        images = batch_images(batch, "image", (height, width))
        n = len(images)
        masks = batch_images(batch, "mask", (height, width), np.uint8) if "mask" in batch else None

        guided, unguided = self.counterfactuals(images)
        maps = igconda_maps(images, guided, unguided)

        out: dict[str, np.ndarray] = {k: np.asarray(batch[k]) for k in PASSTHROUGH_COLUMNS if k in batch}
        out["height"] = np.full(n, height, dtype=np.int32)
        out["width"] = np.full(n, width, dtype=np.int32)
        labels = batch_labels(batch, masks)
        if labels is not None and "label" not in out:
            out["label"] = labels
        out["anomaly_map"] = _flat_rows(maps[igconda_method(self.map_kind)])
        out["counterfactual"] = _flat_rows(guided)
        out["counterfactual_w0"] = _flat_rows(unguided)
        if self.keep_inputs:
            out["image"] = _flat_rows(images)
            if masks is not None:
                out["mask"] = masks.reshape(n, -1)
        if self.score:
            out.update(self._metrics(maps, masks, labels))
        return out

    def _metrics(self, maps: dict[str, np.ndarray], masks: np.ndarray | None,
                 labels: np.ndarray | None) -> dict[str, np.ndarray]:
        """Metric columns; only unhealthy slices are scored, the rest stay NaN."""
        from igconda.metrics import optimal_dice

        n = len(next(iter(maps.values())))
        kinds = (*MAP_KINDS, *CONTROLS)
        result = {k: np.full(n, np.nan) for k in (*METRIC_COLUMNS, *(f"dsc_max_{k}" for k in kinds))}
        if masks is None or labels is None:
            return result
        unhealthy = np.asarray(labels) == UNHEALTHY
        if not unhealthy.any():
            return result
        chosen = igconda_method(self.map_kind)
        scores = score_maps(maps[chosen][unhealthy], masks[unhealthy], self.threshold)
        for key in METRIC_COLUMNS:
            result[key][unhealthy] = np.asarray(scores[key], dtype=np.float64)
        result[f"dsc_max_{self.map_kind}"] = result["dsc_max"].copy()
        if self.score_other_map:
            for kind in kinds:
                if kind != self.map_kind:
                    # The other maps need only ⌈DSC⌉: skip HD95, AUPRC and detection for them.
                    result[f"dsc_max_{kind}"][unhealthy] = optimal_dice(
                        maps[igconda_method(kind)][unhealthy], masks[unhealthy])[0]
        return result


def _flat_rows(array: np.ndarray) -> np.ndarray:
    """(N, H, W) → (N, H·W) float32: one flattened slice per row, as the schema stores images.

    A 2D array (not an object array of rows) lets Ray Data keep the column as one contiguous
    tensor block instead of N Python objects.
    """
    return np.ascontiguousarray(array, dtype=np.float32).reshape(len(array), -1)
