"""One trial's work, without Ray in its maths: the tune slices and the scores of one noise level.

:func:`load_tune_slices` reads the tune split's unhealthy slices once (the driver puts them in
the object store); :func:`evaluate_noise_level` scores every (w, map kind) at one D on them, and
:func:`tune_trial` is the Tune function trainable around it.

Work shared within a trial, because a sweep is many counterfactual passes over the tuning set:
the DDIM encoding to level D is unconditional, so it is computed once per batch; the unguided
decode x̂_∅ (w = 0) does not depend on w either, so it is computed once per batch too; only the
guided decode x̂_w (2 D / s evaluations per slice, the (∅, c) pair batched) is done per w. Every
map kind of a (D, w) then costs no network evaluation. Each (D, w, kind) is scored through
:mod:`igconda.evaluation` (⌈DSC⌉ and the other paper metrics, and the threshold τ calibrated on
these slices with its mean Dice).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from igconda import evaluation as E
from igconda.config import ConfigError
from igconda.data.io import split_path
from igconda.data.schema import UNHEALTHY, slice_shape_of, stack_images
from igconda.ddim_grid import network_evaluations
from igconda.diffusion import counterfactual, ddim
from igconda.map_kinds import CONTROLS, MAP_KINDS
from tuning.space import trial_pairs


class TuningError(RuntimeError):
    """The search could not run or produced no usable result; the message says why."""


@dataclass(frozen=True)
class TuneSlices:
    """The slices every trial scores (shared through the object store).

    Attributes:
        images: (N, H, W) float32 PET in [0, 1].
        masks: (N, H, W) uint8 lesion masks (every slice has at least one lesion pixel).
        patient_id: (N,) patient of each slice.
        cohort: (N,) cohort of each slice.
        slice_index: (N,) z index of each slice in its volume.
        suv_max, scale_min, scale_max: (N,) float32 SUV columns (the 41 % SUVmax rule needs them).
    """

    images: np.ndarray
    masks: np.ndarray
    patient_id: np.ndarray
    cohort: np.ndarray
    slice_index: np.ndarray
    suv_max: np.ndarray | None = None
    scale_min: np.ndarray | None = None
    scale_max: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self) -> dict[str, np.ndarray]:
        """The slices as a batch of slice-schema columns, for :mod:`igconda.evaluation`."""
        n, h, w = self.images.shape
        out = {"image": self.images, "mask": self.masks, "patient_id": self.patient_id,
               "cohort": self.cohort, "slice_index": self.slice_index,
               "height": np.full(n, h, np.int32), "width": np.full(n, w, np.int32)}
        for name in ("suv_max", "scale_min", "scale_max"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def load_tune_slices(data_dir: str | Path, max_slices: int = 0, split: str = "tune") -> TuneSlices:
    """Read the unhealthy slices of one split, in a fixed order, capped at ``max_slices``.

    Rows are ordered by (patient_id, slice_index), so the selection does not depend on file
    listing order or on how many files the split was written as. With a cap, the slices are taken
    evenly spaced through that order rather than the first ``max_slices``, so every tuning patient
    (and lesions of every size along the body) stays represented.

    Args:
        data_dir: the preprocessed data folder (``<data>/slices/<split>/*.parquet``); a local
            path or any URI pyarrow can read.
        max_slices: at most this many slices; 0 keeps them all.
        split: which split's folder to read.

    Raises:
        TuningError: the split is missing or has no unhealthy slice.
    """
    if max_slices < 0:
        raise ConfigError(f"tune.max_slices must be >= 0, got {max_slices}")
    folder = split_path(data_dir, split)
    columns = ["patient_id", "cohort", "slice_index", "label", "height", "width", "image", "mask",
               "suv_max", "scale_min", "scale_max"]
    try:
        table = pq.read_table(folder, columns=columns)
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as err:
        raise TuningError(f"cannot read the {split} split at {folder}: {err}") from None
    table = table.filter(pc.equal(table["label"], UNHEALTHY))
    if table.num_rows == 0:
        raise TuningError(f"{folder}: no unhealthy slice (label {UNHEALTHY}) to tune on")
    table = table.sort_by([("patient_id", "ascending"), ("slice_index", "ascending")])
    if max_slices and table.num_rows > max_slices:
        keep = np.unique(np.linspace(0, table.num_rows - 1, max_slices).round().astype(np.int64))
        table = table.take(pa.array(keep))
    try:
        h, w = slice_shape_of(table["height"], table["width"])
    except ValueError as err:
        raise TuningError(f"{folder}: {err}") from None
    return TuneSlices(
        images=stack_images(table["image"], h, w, np.float32),
        masks=stack_images(table["mask"], h, w, np.uint8),
        patient_id=np.asarray(table["patient_id"].to_pylist(), dtype=object),
        cohort=np.asarray(table["cohort"].to_pylist(), dtype=object),
        slice_index=table["slice_index"].to_numpy(),
        suv_max=table["suv_max"].to_numpy().astype(np.float32),
        scale_min=table["scale_min"].to_numpy().astype(np.float32),
        scale_max=table["scale_max"].to_numpy().astype(np.float32),
    )


def score_row(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """One (D, w, kind)'s maps → its grid values, through :mod:`igconda.evaluation`.

    The per-slice scores are summarised by :func:`igconda.evaluation.summarize` (HD95 over the
    slices where it is defined, detection sensitivity pooled over lesions), and the threshold τ
    a user would apply is calibrated on the same slices (``tau``, ``mean_dice_tau``).
    """
    tau, mean_dice_tau = E.calibrate_threshold(maps, masks)
    scores = pd.DataFrame(E.score_maps(maps, masks))
    row = E.summarize(scores, by=()).iloc[0]
    return {
        "mean_dsc": float(row["dsc_max_mean"]),
        "std_dsc": float(row["dsc_max_std"]),
        "mean_auprc": float(row["auprc_mean"]),
        "mean_hd95": float(row["hd95_mean"]),
        "detection_sensitivity": float(row["sensitivity_pooled"]),
        "num_slices": int(row["n_slices"]),
        "tau": tau,
        "mean_dice_tau": mean_dice_tau,
    }


def evaluate_noise_level(
    model: torch.nn.Module,
    schedule: Any,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    noise_level: int,
    guidance_scales: Sequence[float],
    stride: int,
    map_kinds: Sequence[str] = MAP_KINDS,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    share_encoding: bool = True,
    amp: bool = False,
) -> list[dict[str, Any]]:
    """Score every (w, map kind) at one noise level D, and the w = 0 control, on the given slices.

    With ``share_encoding``, each batch is DDIM-encoded to level D once (D / s evaluations per
    slice) and decoded unguided once (D / s), then guided once per w (2 D / s each); otherwise
    :func:`igconda.diffusion.counterfactual.counterfactual_pair` runs the whole round trip per w.

    Args:
        model: the conditional UNet, in eval mode on ``device``.
        schedule: the checkpoint's ``NoiseSchedule``.
        images: (N, H, W) float32 slices in [0, 1].
        masks: (N, H, W) ground-truth masks.
        noise_level: D, a multiple of ``stride``.
        guidance_scales: the w values to decode.
        stride: DDIM stride s.
        map_kinds: the map kinds to score (:data:`igconda.map_kinds.MAP_KINDS`).
        batch_size: slices per forward batch.
        device: where the model runs.
        share_encoding: share the encoding and the unguided decode across w (same results,
            fewer evaluations).
        amp: autocast the network where it pays (:mod:`igconda.precision`).

    Returns:
        One dict per (w, kind), w in the order given, then one for the control (``map_kind``
        ``"w0"``, ``guidance_scale`` 0): ``noise_level``, ``guidance_scale``, ``stride``,
        ``map_kind``, the :func:`score_row` values, ``evaluations_per_slice`` (the network
        evaluations of the guided and unguided decodes of one slice on their own, 4 D / s) and
        ``seconds`` (wall time; shared work is split evenly across the w values).
    """
    n, h, w = images.shape
    scales = [float(g) for g in guidance_scales]
    kinds = tuple(map_kinds)
    maps = {(g, k): np.empty((n, h, w), np.float32) for g in scales for k in (*kinds, *CONTROLS)}
    seconds = dict.fromkeys(scales, 0.0)
    common = {"noise_level": noise_level, "stride": stride, "amp": amp}
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            # np.array copies: object-store arrays are read-only, torch wants writable memory.
            x0 = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))
            x0 = x0.unsqueeze(1).to(device)
            stop = start + x0.shape[0]
            if share_encoding:
                t0 = time.perf_counter()
                latent = ddim.ddim_encode(model, x0, schedule, **common)
                unguided = ddim.ddim_decode(model, latent, schedule, guidance_scale=0.0, **common)
                share = (time.perf_counter() - t0) / len(scales)
            for g in scales:
                t0 = time.perf_counter()
                if share_encoding:
                    guided = ddim.ddim_decode(model, latent, schedule, guidance_scale=g,
                                              target_label=1, **common)
                    seconds[g] += share
                else:
                    guided, unguided = counterfactual.counterfactual_pair(
                        model, x0, schedule, guidance_scale=g, target_label=1, **common)
                for kind, amap in counterfactual.anomaly_maps(x0, guided, unguided, kinds).items():
                    maps[(g, kind)][start:stop] = amap.reshape(-1, h, w).float().cpu().numpy()
                seconds[g] += time.perf_counter() - t0
    rows = []
    base = {"noise_level": int(noise_level), "stride": int(stride),
            "evaluations_per_slice": network_evaluations(noise_level, stride, unguided_decode=True)}
    for g in scales:
        for kind in kinds:
            rows.append({**base, "guidance_scale": g, "map_kind": kind,
                         **score_row(maps[(g, kind)], masks), "seconds": seconds[g] / len(kinds)})
    # The controls do not depend on w: scored once, from the first w's batch-mates.
    for control in CONTROLS:
        rows.append({**base, "guidance_scale": 0.0, "map_kind": control,
                     **score_row(maps[(scales[0], control)], masks), "seconds": 0.0,
                     "evaluations_per_slice": 2 * noise_level // stride})
    return rows


def tune_trial(
    config: dict[str, Any],
    *,
    slices_ref: Any,
    checkpoint: str,
    stride: int,
    batch_size: int,
    use_gpu: bool,
    map_kinds: Sequence[str] = MAP_KINDS,
    share_encoding: bool = True,
    amp: bool = False,
    num_threads: int = 1,
) -> None:
    """The Tune function trainable: one D and one or more w; reports one result per (w, kind).

    Runs in a Tune worker. The slices come from the object store by reference; the model is
    loaded once per trial.
    """
    import ray
    from ray import tune

    from igconda.checkpoint import load_model
    from igconda.diffusion.schedule import NoiseSchedule

    # One intra-op thread per reserved CPU: more threads than reserved cores oversubscribe the
    # node when trials run side by side (measured 20× slower on a loaded 2-core machine).
    torch.set_num_threads(max(1, num_threads))
    noise_level, scales = trial_pairs(config)
    slices: TuneSlices = ray.get(slices_ref)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model, study = load_model(checkpoint, device)
    schedule = NoiseSchedule.from_config(study.train)
    rows = evaluate_noise_level(
        model, schedule, slices.images, slices.masks, noise_level=noise_level,
        guidance_scales=scales, stride=stride, map_kinds=map_kinds, batch_size=batch_size,
        device=device, share_encoding=share_encoding, amp=amp,
    )
    for row in rows:
        tune.report(row)
