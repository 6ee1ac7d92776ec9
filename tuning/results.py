"""From trial reports to the tuned settings: the grid, the chosen (D, w, map kind), the τ's.

The grid has one row per (D, w, map kind) plus one w = 0 control row per D. The chosen row is
the best mean ⌈DSC⌉ among the map kinds (never the control); ``best.json`` records it with its
calibrated threshold τ, and beside it the rows every study reports: the paper's |x − x̂| map at
the same (D, w) and the w = 0 control at the same D. The baselines' τ's are calibrated on the same
tune slices (:func:`baseline_thresholds`), so every method of the report has a τ a user can
apply, chosen without the test split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from igconda import evaluation as E
from igconda.anomaly_methods import baseline_methods
from igconda.map_kinds import CONTROLS, matching_control
from tuning.trial import TuneSlices, TuningError

#: The objective tuning maximises (mean ⌈DSC⌉ on the tune split, as the paper's Fig. 5).
METRIC = "mean_dsc"

#: Columns of grid.csv, in order (one row per (D, w, map kind), and per D one control row).
GRID_COLUMNS = (
    "noise_level", "guidance_scale", "map_kind", "stride", "mean_dsc", "std_dsc", "mean_dice_tau",
    "tau", "mean_auprc", "mean_hd95", "detection_sensitivity", "num_slices",
    "evaluations_per_slice", "seconds",
)

_INT_COLUMNS = ("noise_level", "stride", "num_slices", "evaluations_per_slice")


def collect_grid(reports: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Tune reports (one per evaluated (D, w, kind)) → the grid table, one row per distinct key.

    Random search may sample a pair twice; the objective is deterministic, so the first report
    of a key is kept. Rows are sorted by D, then w, then map kind. Reports without a map kind
    (older trials) count as the paper's ``abs`` map.
    """
    if not reports:
        raise TuningError("no trial reported a result")
    frame = pd.DataFrame([{k: r.get(k) for k in GRID_COLUMNS} for r in reports])
    frame["map_kind"] = frame["map_kind"].fillna("abs").astype(str)
    frame = frame.drop_duplicates(subset=["noise_level", "guidance_scale", "map_kind"], keep="first")
    frame = frame.sort_values(["noise_level", "guidance_scale", "map_kind"], kind="stable")
    frame["noise_level"] = frame["noise_level"].astype(int)
    frame["guidance_scale"] = frame["guidance_scale"].astype(float)
    return frame.reset_index(drop=True)


def _row_dict(row: pd.Series) -> dict[str, Any]:
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    out["guidance_scale"] = float(out["guidance_scale"])
    # A row Series upcasts ints to float; restore the integer columns.
    for key in _INT_COLUMNS:
        if key in out and out[key] is not None and not pd.isna(out[key]):
            out[key] = int(out[key])
    return out


def select_best(grid: pd.DataFrame) -> dict[str, Any]:
    """The best (D, w, map kind) by mean ⌈DSC⌉, with the reported references beside it.

    Ties go to the first row in (D, w, kind) order, i.e. the smaller D (cheaper), then the
    smaller w. The w = 0 control rows are never chosen.

    Returns:
        The chosen grid row as a plain dict (``threshold`` = its calibrated ``tau``), plus
        ``paper_map`` (the ``abs`` row at the same (D, w), when scored) and ``control`` (the
        w = 0 row at the same D, when scored), each ``{"mean_dsc", "mean_dice_tau", "tau", …}``,
        and ``thresholds``: ``{method name: τ}`` for those three.

    Raises:
        TuningError: no candidate row has a finite objective.
    """
    candidates = grid[~grid["map_kind"].isin(CONTROLS)]
    finite = candidates[np.isfinite(candidates[METRIC].astype(float))]
    if finite.empty:
        raise TuningError("no (D, w, map kind) has a finite mean ⌈DSC⌉")
    best = _row_dict(finite.loc[finite[METRIC].astype(float).idxmax()])
    best["threshold"] = best["tau"]
    thresholds = {E.igconda_method(best["map_kind"]): best["tau"]}
    same_d = grid["noise_level"] == best["noise_level"]
    references = {
        "paper_map": grid[same_d & (grid["guidance_scale"] == best["guidance_scale"])
                          & (grid["map_kind"] == "abs")],
        # The w = 0 control of the chosen map's sign (|x − x̂_∅| for abs, max(x − x̂_∅, 0) for hot).
        "control": grid[same_d & (grid["map_kind"] == matching_control(best["map_kind"]))],
    }
    for name, rows in references.items():
        if len(rows):
            ref = _row_dict(rows.iloc[0])
            best[name] = {k: ref[k] for k in ("map_kind", "guidance_scale", "mean_dsc",
                                              "mean_dice_tau", "tau", "mean_auprc")}
            thresholds[E.igconda_method(ref["map_kind"])] = ref["tau"]
    best["thresholds"] = thresholds
    return best


def baseline_thresholds(slices: TuneSlices) -> dict[str, float]:
    """τ of each baseline (41 % SUVmax, raw intensity), calibrated on the tune slices.

    Baselines whose inputs the slices lack (SUV columns) are left out.
    """
    batch = slices.batch()
    taus: dict[str, float] = {}
    for method in baseline_methods():
        try:
            maps = method.maps(batch)
        except ValueError:
            continue
        for name, method_maps in maps.items():
            taus[name] = E.calibrate_threshold(method_maps, slices.masks)[0]
    return taus


def read_best(path: str | Path) -> dict[str, Any]:
    """Read a ``best.json`` written by :func:`tuning.driver.run_tuning`.

    Returns a dict with at least ``noise_level`` (int), ``guidance_scale`` (float), ``stride``
    (int), ``map_kind`` (``abs`` for files written before map kinds were tuned) and ``mean_dsc``;
    ``threshold`` and ``thresholds`` when the file has them. Raises TuningError naming the file
    when it is unusable.
    """
    path = Path(path)
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TuningError(f"{path}: cannot read tuned parameters: {err}") from None
    missing = {"noise_level", "guidance_scale", "stride"} - set(best)
    if missing:
        raise TuningError(f"{path}: missing keys {sorted(missing)}")
    best.setdefault("map_kind", "abs")
    return best
