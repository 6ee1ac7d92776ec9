"""A model folder that carries its tuning: the checkpoint plus ``tuning.json``.

A study ends with ``<output>/model/``: the best checkpoint's files (``igconda.checkpoint``
layout, so every loader accepts the folder) and ``tuning.json``, the settings the study chose on
its tune split and where they came from::

    {"noise_level": 400, "guidance_scale": 8.0, "stride": 40, "map_kind": "guidance",
     "threshold": 0.04, "thresholds": {...}, "tuned": true,
     "source": {"tuning": ".../tune/best.json", "checkpoint": ".../train/best", ...}}

``igconda detect --checkpoint <output>/model`` runs with these settings; a plain checkpoint has
no ``tuning.json`` and runs the untuned defaults of its config's ``infer`` section.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from igconda.io_utils import atomic_write
from igconda.map_kinds import MAP_KINDS

TUNING_FILE = "tuning.json"
#: The settings ``tuning.json`` must hold.
TUNED_KEYS = ("noise_level", "guidance_scale", "stride", "map_kind", "threshold")


class TuningFileError(ValueError):
    """A ``tuning.json`` is unreadable or incomplete; the message names the file and the key."""


def tuned_settings(best: Mapping[str, Any] | None, infer_defaults: Any,
                   source: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tuning.json`` content from a tuning result (``tune/best.json``), or, when tuning
    was skipped (``best`` None), from the config's untuned ``infer`` defaults, marked so."""
    if best is None:
        settings = {"noise_level": infer_defaults.noise_level,
                    "guidance_scale": float(infer_defaults.guidance_scale),
                    "stride": infer_defaults.stride, "map_kind": infer_defaults.map_kind,
                    "threshold": float(infer_defaults.threshold), "thresholds": {}, "tuned": False}
    else:
        settings = {"noise_level": int(best["noise_level"]),
                    "guidance_scale": float(best["guidance_scale"]), "stride": int(best["stride"]),
                    "map_kind": str(best.get("map_kind", "abs")),
                    "threshold": float(best.get("threshold", infer_defaults.threshold)),
                    "thresholds": dict(best.get("thresholds") or {}), "tuned": True,
                    "tune_mean_dsc": best.get("mean_dsc"),
                    "tune_mean_dice_tau": best.get("mean_dice_tau")}
    settings["source"] = dict(source)
    return settings


def write_model_folder(checkpoint: str | Path, settings: Mapping[str, Any], folder: str | Path) -> Path:
    """Copy ``checkpoint`` into ``folder`` and add ``tuning.json`` (replacing an older folder).

    The copy is assembled beside ``folder`` and renamed into place, so a reader never sees a
    model folder without its tuning.
    """
    checkpoint, folder = Path(checkpoint), Path(folder)
    _check(settings, folder / TUNING_FILE)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(checkpoint, tmp)
    (tmp / TUNING_FILE).unlink(missing_ok=True)
    atomic_write(tmp / TUNING_FILE,
                 lambda path: path.write_text(json.dumps(dict(settings), indent=2) + "\n"), mode=0o644)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_tuning(folder: str | Path) -> dict[str, Any] | None:
    """The ``tuning.json`` of a model folder, or None for a plain checkpoint.

    Raises:
        TuningFileError: the file exists but is unreadable or lacks a setting.
    """
    path = Path(folder) / TUNING_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TuningFileError(f"{path}: cannot read the tuned settings: {err}") from None
    _check(settings, path)
    return settings


def _check(settings: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in TUNED_KEYS if settings.get(k) is None]
    if missing:
        raise TuningFileError(f"{path}: missing tuned settings {missing}")
    if settings["map_kind"] not in MAP_KINDS:
        raise TuningFileError(f"{path}: map_kind {settings['map_kind']!r} is not one of {list(MAP_KINDS)}")


def model_settings(folder: str | Path, config: Any) -> tuple[dict[str, Any], str]:
    """The D, w, stride, map kind and τ a model folder runs with, and where they come from.

    Its ``tuning.json`` when there is one (:func:`read_tuning`), else the untuned ``infer``
    defaults of ``config`` (the checkpoint's own). ``igconda detect`` and the MLflow model of a
    folder (:mod:`igconda.tracking.model`) both decide through here.

    Raises:
        TuningFileError: a ``tuning.json`` that is unreadable or incomplete.
    """
    folder = Path(folder)
    tuned = read_tuning(folder)
    if tuned is None:
        i = config.infer
        settings = {"noise_level": i.noise_level, "guidance_scale": float(i.guidance_scale),
                    "stride": i.stride, "map_kind": i.map_kind, "threshold": float(i.threshold)}
        return settings, (f"UNTUNED defaults of the checkpoint's config (no {TUNING_FILE} in "
                          f"{folder}; pass a study's model folder to use its tuned settings)")
    origin = (f"tuned settings from {folder / TUNING_FILE}" if tuned.get("tuned", True) else
              f"untuned defaults recorded in {folder / TUNING_FILE} (the study skipped tuning)")
    return {k: tuned[k] for k in TUNED_KEYS}, origin
