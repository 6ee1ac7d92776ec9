"""Scoring one method of the comparison (no Ray): load it, score slices.

``python -m ray_jobs.score_method`` runs :func:`load_method` once per Ray Data actor,
:func:`score_slices_all_taus` per batch of tune and scored slices (the maps computed once) and
:func:`apply_calibration` on the rows; all of them, and :func:`score_slices` (one batch at a
known τ), run in a plain process as well.

Checkpoints per method (what ``python -m ray_jobs.train_baseline`` leaves in ``OUT/best``):
``hirescam``, ``supervised``, ``fanogan`` take one folder; ``dpm_cg`` takes the noisy
classifier's folder and, second, the unconditional DPM's (``ray_jobs.train`` with
``model.conditioning: none``). ``igconda`` takes a study's model folder (checkpoint +
``tuning.json``: D, w, s and the map kind tuning chose) and scores that map;
``igconda_control`` scores the same folder's w = 0 control of the map's sign (the DDIM round
trip alone, :mod:`igconda.map_kinds`). ``threshold_41`` and ``intensity`` need no checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from igconda.anomaly_methods import AnomalyMethod
from igconda.baselines.settings import BaselinesConfig
from igconda.config import ConfigError
from igconda.data.schema import SCORE_SCHEMA, validate_scores
from igconda.evaluation import (
    CALIBRATION_GRID,
    DPM_CG,
    FANOGAN,
    HIRESCAM,
    INTENSITY,
    SUPERVISED,
    THRESHOLD_41,
    best_threshold,
    score_methods,
)
from igconda.lesion_stats import LESION_STAT_COLUMNS, with_lesion_stats
from igconda.metrics import dice_curve, threshold_grid

#: ``--method`` values that score a study's IgCONDA model folder: its tuned map, its w = 0 control.
IGCONDA, IGCONDA_CONTROL = "igconda", "igconda_control"
#: Methods scored without any checkpoint (the controls every comparison reports).
CHECKPOINT_FREE = (THRESHOLD_41, INTENSITY)
#: ``--method`` values of the scoring job (``igconda.evaluation`` method names, and the two above).
SCORED_METHODS = (HIRESCAM, SUPERVISED, FANOGAN, DPM_CG, IGCONDA, IGCONDA_CONTROL, *CHECKPOINT_FREE)
#: Slice columns scoring reads (IDs copied into the score rows, image and mask; the SUV
#: scaling for 41 % SUVmax thresholding).
SCORE_INPUT_COLUMNS = ("patient_id", "cohort", "role", "tracer", "slice_index", "label",
                       "lesion_pixels", "height", "width", "image", "mask",
                       "suv_max", "scale_min", "scale_max")
#: A method run's files (``docs/CONTRACTS.md``, "Method runs"), logged under ``scores/``.
SCORES_FILE, SUMMARY_FILE = "per_slice_scores.parquet", "summary.csv"
#: The metrics a method run logs from its summary's ``internal (all)`` row.
SUMMARY_RUN_METRICS = ("dsc_max_mean", "dice_tau_mean", "auprc_mean", "hd95_mean", "sensitivity_mean")
INTERNAL_ROW = "internal (all)"
#: The per-slice score table: :data:`~igconda.data.schema.SCORE_SCHEMA` and the lesion statistics.
COMPARISON_SCORE_SCHEMA = pa.schema([*SCORE_SCHEMA,
                                     *(pa.field(c, pa.float64()) for c in LESION_STAT_COLUMNS)])
#: What :func:`score_slices_all_taus` adds to the score rows: the slice's split, and its Dice at
#: every τ of :data:`~igconda.evaluation.CALIBRATION_GRID`.
SPLIT_COLUMN, DICE_GRID_COLUMN = "split", "dice_grid"


class OneMap:
    """One named map of a method that computes several (IgCONDA decodes its map and the w = 0
    control in one pass; the comparison scores each as its own run)."""

    def __init__(self, method: AnomalyMethod, name: str) -> None:
        if name not in method.names:
            raise ValueError(f"{name!r} is not one of the method's maps {method.names}")
        self.method, self.names = method, (name,)

    def maps(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {self.names[0]: self.method.maps(batch)[self.names[0]]}


def load_igconda(model_folder: str | Path, *, control: bool = False,
                 device: str = "cpu") -> AnomalyMethod:
    """A study model folder's IgCONDA map (the tuned D, w, s and map kind of its
    ``tuning.json``, :func:`igconda.tuned_model.model_settings`), or with ``control`` its w = 0
    control of the same sign; the network autocasts as the folder's ``infer.use_amp`` says."""
    from igconda.anomaly_methods import IgCondaMethod
    from igconda.checkpoint import load_model
    from igconda.diffusion.schedule import NoiseSchedule
    from igconda.evaluation import igconda_method
    from igconda.map_kinds import matching_control
    from igconda.tuned_model import model_settings

    model, config = load_model(model_folder, device)
    settings, _ = model_settings(model_folder, config)
    kind = settings["map_kind"]
    method = IgCondaMethod(model, NoiseSchedule.from_config(config.train),
                           noise_level=settings["noise_level"], stride=settings["stride"],
                           guidance_scale=settings["guidance_scale"], kinds=(kind,),
                           device=device, amp=config.infer.use_amp)
    return OneMap(method, igconda_method(matching_control(kind) if control else kind))


def load_method(method: str, checkpoint: str | Path | None = None,
                checkpoint2: str | Path | None = None, *,
                settings: BaselinesConfig | None = None, device: str = "cpu") -> AnomalyMethod:
    """The :class:`~igconda.anomaly_methods.AnomalyMethod` of a method of :data:`SCORED_METHODS`.

    Args:
        method: one of :data:`SCORED_METHODS`.
        checkpoint: its folder (``dpm_cg``: the noisy classifier's; ``igconda``,
            ``igconda_control``: the study's model folder; none for :data:`CHECKPOINT_FREE`).
        checkpoint2: ``dpm_cg`` only: the unconditional DPM's folder.
        settings: ``score_batch_size``, ``hirescam_target_layer`` and the ``dpm_cg_*`` decoding
            (default: the defaults).
        device: where the networks run.

    Raises:
        ConfigError: unknown method, or a checkpoint missing / given where it has no use.
        CheckpointError: a folder that is not the method's.
    """
    from igconda.anomaly_methods import IntensityMethod, ThresholdMethod

    settings = settings or BaselinesConfig()
    if method not in SCORED_METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(SCORED_METHODS)}")
    if (method == DPM_CG) != (checkpoint2 is not None):
        raise ConfigError(f"--checkpoint2 (the unconditional DPM) is needed for {DPM_CG} and only "
                          f"for it; method {method!r} got {checkpoint2!r}")
    if (method in CHECKPOINT_FREE) != (checkpoint is None):
        raise ConfigError(f"method {method!r} " + ("takes no checkpoint" if checkpoint is not None
                                                    else "needs --checkpoint"))
    if method == THRESHOLD_41:
        return ThresholdMethod()
    if method == INTENSITY:
        return IntensityMethod()
    if method in (IGCONDA, IGCONDA_CONTROL):
        return load_igconda(checkpoint, control=method == IGCONDA_CONTROL, device=device)
    batch = settings.score_batch_size
    if method == HIRESCAM:
        from igconda.baselines.classifier_cam import HiResCamMethod

        return HiResCamMethod.from_checkpoint(checkpoint, device=device, batch_size=batch,
                                              target_layer=settings.hirescam_target_layer)
    if method == SUPERVISED:
        from igconda.baselines.supervised import SupervisedMethod

        return SupervisedMethod.from_checkpoint(checkpoint, device=device, batch_size=batch)
    if method == FANOGAN:
        from igconda.baselines.fanogan import FAnoGANMethod

        return FAnoGANMethod.from_folder(checkpoint, device, batch_size=batch)
    from igconda.baselines.dpm_classifier_guidance import DPMClassifierGuidanceMethod
    from igconda.checkpoint import load_checkpoint_config

    steps = load_checkpoint_config(checkpoint2).train.num_train_timesteps
    noise_level, stride, scale = settings.dpm_cg_decoding(steps)
    return DPMClassifierGuidanceMethod.from_checkpoints(
        checkpoint2, checkpoint, device=device, noise_level=noise_level, stride=stride, scale=scale)


def score_slices(method: AnomalyMethod, batch: Mapping[str, Any],
                 taus: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One batch of slices → its score rows with the lesion statistics.

    Args:
        method: the anomaly method.
        batch: numpy columns of :data:`SCORE_INPUT_COLUMNS`.
        taus: ``{method name: calibrated τ}`` for ``dice_tau``.

    Returns:
        One row per unhealthy slice and map name, columns of :data:`COMPARISON_SCORE_SCHEMA`.
    """
    rows = score_methods(batch, method.maps(batch), taus)
    return with_lesion_stats(rows, batch) if len(rows) else rows


def score_slices_all_taus(method: AnomalyMethod, batch: Mapping[str, Any],
                          scored_split: str) -> pd.DataFrame:
    """One batch of the comparison's one-pass scoring: the maps of a batch that mixes the tune
    split's slices and the scored split's, computed once, and what τ and Dice@τ need from them
    before τ is known (:func:`apply_calibration` then finishes the rows).

    Args:
        method: the anomaly method (one map name).
        batch: numpy columns of :data:`SCORE_INPUT_COLUMNS` and :data:`SPLIT_COLUMN`.
        scored_split: the split whose slices get the paper's metrics; the others only calibrate τ.

    Returns:
        One row per unhealthy slice: the columns of :func:`score_slices` without a τ
        (``dice_tau`` and ``tau`` NaN; for slices not of ``scored_split`` every metric NaN and
        zero lesion counts), :data:`SPLIT_COLUMN` and :data:`DICE_GRID_COLUMN`, the (T,) Dice of
        the map at each τ of :data:`~igconda.evaluation.CALIBRATION_GRID` (T = 45 numbers: far
        less than the map, and for a scored slice its Dice at whichever τ the tune split picks).
    """
    from igconda.slice_batch import batch_images

    (name,) = method.names
    maps = method.maps(batch)
    masks = batch_images(batch, "mask", maps[name].shape[1:], np.uint8)
    unhealthy = masks.reshape(len(masks), -1).any(axis=1)
    split = np.asarray(batch[SPLIT_COLUMN]).astype(str)
    rows = score_methods(batch, maps, scored=split == scored_split)
    if not len(rows):
        return rows
    rows = with_lesion_stats(rows, batch)
    rows[SPLIT_COLUMN] = split[unhealthy]
    # The same per-slice Dice that calibrate_threshold computes, and dice_at at each grid τ.
    rows[DICE_GRID_COLUMN] = list(dice_curve(maps[name][unhealthy], masks[unhealthy],
                                             CALIBRATION_GRID)[1].T)
    return rows


def apply_calibration(rows: pd.DataFrame, scored_split: str,
                      tune_split: str) -> tuple[float, float, pd.DataFrame]:
    """Rows of :func:`score_slices_all_taus` → τ calibrated on ``tune_split``'s rows alone and
    the score rows of ``scored_split`` at that τ: the same τ and per-slice scores as
    :func:`~igconda.evaluation.calibrate_threshold` on the tune maps followed by
    :func:`score_slices` of the scored slices at τ.

    Returns:
        ``(tau, mean tune Dice at tau, rows)``: ``rows`` the scored split's score rows
        (:data:`COMPARISON_SCORE_SCHEMA` columns, ``dice_tau`` and ``tau`` filled), sorted by
        patient and slice.

    Raises:
        ValueError: no row of ``tune_split`` or of ``scored_split``.
    """
    order = ["patient_id", "slice_index"]
    tune = rows[rows[SPLIT_COLUMN] == tune_split].sort_values(order)
    scored = rows[rows[SPLIT_COLUMN] == scored_split].sort_values(order)
    for split, part in ((tune_split, tune), (scored_split, scored)):
        if part.empty:
            raise ValueError(f"split {split!r} has no unhealthy slice")
    tau, dice = best_threshold(_dice_grid(tune).T)
    at_tau = int(np.flatnonzero(threshold_grid(CALIBRATION_GRID) == tau)[0])
    dice_tau = _dice_grid(scored)[:, at_tau]
    scored = scored.drop(columns=[SPLIT_COLUMN, DICE_GRID_COLUMN])
    scored["dice_tau"], scored["tau"] = dice_tau, tau
    return tau, dice, scored


def _dice_grid(rows: pd.DataFrame) -> np.ndarray:
    """(N, T) float64 from the :data:`DICE_GRID_COLUMN` of N rows (one array per row)."""
    return np.stack([np.asarray(v, dtype=np.float64) for v in rows[DICE_GRID_COLUMN]])


def scores_table(rows: pd.DataFrame) -> pa.Table:
    """Score rows as an Arrow table of :data:`COMPARISON_SCORE_SCHEMA` (validated)."""
    missing = [c for c in COMPARISON_SCORE_SCHEMA.names if c not in rows]
    if missing:
        raise ValueError(f"score rows lack the columns {missing}")
    frame = rows[list(COMPARISON_SCORE_SCHEMA.names)].reset_index(drop=True)
    for field in COMPARISON_SCORE_SCHEMA:
        if pa.types.is_floating(field.type):
            # A metric that is NaN in every row (HD95 when no map reaches τ*) comes back from
            # Ray Data's Arrow blocks typed null, i.e. as an object column of None.
            frame[field.name] = pd.to_numeric(frame[field.name]).astype(np.float64)
    table = pa.Table.from_pandas(frame, schema=COMPARISON_SCORE_SCHEMA, preserve_index=False)
    validate_scores(table)
    return table


def write_method_scores(rows: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """One method's score rows as a method run's files: ``folder/``:data:`SCORES_FILE`
    (validated :data:`COMPARISON_SCORE_SCHEMA`) and ``folder/``:data:`SUMMARY_FILE`; returns the
    per-cohort summary (:func:`igconda.evaluation.summarize`)."""
    import pyarrow.parquet as pq

    from igconda.evaluation import summarize
    from igconda.io_utils import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    table = scores_table(rows)
    summary = summarize(rows, by=("cohort",))
    atomic_write(folder / SCORES_FILE, lambda tmp: pq.write_table(table, tmp), suffix=".tmp")
    atomic_write(folder / SUMMARY_FILE, lambda tmp: tmp.write_text(summary.to_csv(index=False)),
                 suffix=".tmp")
    return summary


def run_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The finite :data:`SUMMARY_RUN_METRICS` of a summary's :data:`INTERNAL_ROW`."""
    internal = summary[summary["group"] == INTERNAL_ROW]
    if internal.empty:
        return {}
    row = internal.iloc[0]
    return {k: float(row[k]) for k in SUMMARY_RUN_METRICS if k in row and np.isfinite(row[k])}
