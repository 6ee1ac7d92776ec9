"""Ray Tune over the noise level D and gradient scale of DPM + classifier guidance (paper §3.3,
which reports D = 200 and scale 6), on the tune split as IgCONDA's (D, w) search.

The grid is ``baselines.dpm_cg_noise_levels`` × ``baselines.dpm_cg_scales`` of the study config
at ``baselines.dpm_cg_stride``; every trial decodes the tune split's unhealthy slices at one
(D, scale) (:class:`igconda.baselines.dpm_classifier_guidance.DPMClassifierGuidanceMethod`) and
reports the same grid values as IgCONDA's trials (:func:`tuning.trial.score_row`: mean ⌈DSC⌉,
the objective, and the calibrated τ with its Dice). Rows use the IgCONDA grid's columns, with
the scale in ``guidance_scale`` and ``map_kind`` = ``dpm_cg``, so that the grid, the choice
and the heatmap are made by the same code (:mod:`tuning.results`, :func:`igconda.figures.heatmap_figure`).

Writes ``best.json`` (``noise_level``, ``scale``, ``stride``, the scores; read by
``python -m ray_jobs.score_method --method dpm_cg --tuned``), ``grid.csv`` and ``heatmap.png``,
then logs a ``tune`` run tagged ``igconda.method = dpm_cg``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from igconda.config import ConfigError, StudyConfig
from igconda.data.study_layout import TuneOutput
from igconda.evaluation import DPM_CG
from tuning.results import METRIC, collect_grid
from tuning.trial import TuneSlices, TuningError, load_tune_slices, score_row


def read_dpm_cg_best(path: str | Path) -> dict[str, Any]:
    """The ``baselines`` settings a dpm_cg ``best.json`` chose: ``{dpm_cg_noise_level,
    dpm_cg_scale, dpm_cg_stride}`` (for ``StudyConfig.replace("baselines", ...)``).

    Raises:
        ValueError: unreadable, or not a dpm_cg tuning result; the message names the file.
    """
    import json

    try:
        best = json.loads(Path(path).read_text())
        return {"dpm_cg_noise_level": int(best["noise_level"]),
                "dpm_cg_scale": float(best["scale"]), "dpm_cg_stride": int(best["stride"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a dpm_cg tuning result ({err!r})") from None


def dpm_cg_trial(config: dict[str, Any], *, slices_ref: Any, classifier: str, dpm: str, stride: int,
                 batch_size: int, use_gpu: bool, amp: bool, num_threads: int = 1) -> None:
    """The Tune function trainable of one (D, scale): loads both networks, decodes every tune
    slice, reports one grid row."""
    import ray
    import torch
    from ray import tune

    from igconda.baselines.dpm_classifier_guidance import DPMClassifierGuidanceMethod

    torch.set_num_threads(max(1, num_threads))  # one thread per reserved CPU (see tuning.trial)
    slices: TuneSlices = ray.get(slices_ref)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    noise_level, scale = int(config["noise_level"]), float(config["guidance_scale"])
    method = DPMClassifierGuidanceMethod.from_checkpoints(
        dpm, classifier, device=device, noise_level=noise_level, stride=stride, scale=scale, amp=amp)
    started = time.perf_counter()
    batch = slices.batch()
    maps = np.concatenate([
        method.maps({k: v[i:i + batch_size] for k, v in batch.items()})[DPM_CG]
        for i in range(0, len(slices), batch_size)])
    tune.report({"noise_level": noise_level, "guidance_scale": scale, "map_kind": DPM_CG,
                 "stride": stride, **score_row(maps, slices.masks),
                 # per step: the DPM's ε and the classifier's gradient (a forward and a backward)
                 "evaluations_per_slice": 2 * noise_level // stride,
                 "seconds": time.perf_counter() - started})


def run_dpm_cg_tuning(classifier: str | Path, dpm: str | Path, data_dir: str | Path,
                      output_dir: str | Path, *, study: StudyConfig, tracking_uri: str = "",
                      experiment: str | None = None, parent_run_id: str | None = None,
                      verbose: int = 1) -> dict[str, Any]:
    """Search the study's (D, scale) grid; write ``best.json``, ``grid.csv``, ``heatmap.png``
    into ``output_dir`` and log the ``tune`` run. Ray must be initialised.

    Returns:
        The chosen settings (``best.json``'s content).

    Raises:
        ConfigError: the study has no dpm_cg grid.
        CheckpointError: the two folders are not a DPM and its classifier.
        TuningError: no tune slices, or a trial failed.
    """
    import ray
    from ray import tune

    from igconda import tracking
    from igconda.baselines.dpm_classifier_guidance import DPMClassifierGuidanceMethod
    from tuning.driver import save_result_figure, write_best, write_result_text
    from tuning.experiment import KEY_FIELD, make_tuner, tuning_key

    b = study.baselines
    if not b.dpm_cg_noise_levels:
        raise ConfigError("the study config has no DPM + CG grid: set baselines.dpm_cg_noise_levels "
                          "and baselines.dpm_cg_scales")
    classifier, dpm = Path(classifier).resolve(), Path(dpm).resolve()
    DPMClassifierGuidanceMethod.from_checkpoints(dpm, classifier)  # a wrong pair fails here, named
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    layout = TuneOutput(output_dir)
    slices = load_tune_slices(data_dir, study.tune.max_slices)
    print(f"tune dpm_cg: {len(slices)} unhealthy slices; D {list(b.dpm_cg_noise_levels)} × scale "
          f"{list(b.dpm_cg_scales)} at stride {b.dpm_cg_stride}", flush=True)
    trainable = functools.partial(
        dpm_cg_trial, slices_ref=ray.put(slices), classifier=str(classifier), dpm=str(dpm),
        stride=b.dpm_cg_stride, batch_size=b.score_batch_size,
        use_gpu=study.tune.gpus_per_trial > 0, amp=study.infer.use_amp,
        num_threads=int(study.tune.cpus_per_trial))
    param_space = {"noise_level": tune.grid_search(list(b.dpm_cg_noise_levels)),
                   "guidance_scale": tune.grid_search(list(b.dpm_cg_scales))}
    # A killed run's experiment with the same key is resumed (tuning.experiment).
    key = tuning_key([classifier, dpm], slices, {
        "grid": param_space, "stride": b.dpm_cg_stride, "batch_size": b.score_batch_size,
        "amp": study.infer.use_amp})
    tuner, how = make_tuner(
        tune.with_resources(trainable, {"cpu": study.tune.cpus_per_trial,
                                        "gpu": study.tune.gpus_per_trial}),
        param_space, tune.TuneConfig(metric=METRIC, mode="max"), {"verbose": verbose},
        storage=layout.ray_results, key=key, best_path=layout.best)
    print(f"tune dpm_cg: {how}", flush=True)
    started = time.perf_counter()
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        raise TuningError(f"{len(failed)} of {len(results)} dpm_cg trials failed; first error: "
                          f"{failed[0].error}")
    empty = [r.path for r in results if r.metrics_dataframe is None or r.metrics_dataframe.empty]
    if empty:
        raise TuningError(f"dpm_cg trial {empty[0]} reported nothing")
    grid = collect_grid([row for r in results for row in r.metrics_dataframe.to_dict("records")])
    finite = grid[np.isfinite(grid[METRIC].astype(float))]
    if finite.empty:
        raise TuningError("no (D, scale) has a finite mean ⌈DSC⌉")
    # Ties go to the first row in (D, scale) order: the smaller D (cheaper), then scale.
    chosen = finite.loc[finite[METRIC].astype(float).idxmax()]
    best = {"method": DPM_CG, "noise_level": int(chosen["noise_level"]),
            "scale": float(chosen["guidance_scale"]), "stride": int(chosen["stride"]),
            "threshold": float(chosen["tau"]), "objective": METRIC,
            **{k: float(chosen[k]) for k in ("mean_dsc", "mean_dice_tau", "mean_auprc")},
            "classifier": str(classifier), "dpm": str(dpm), "data": str(data_dir),
            "tuning_seconds": time.perf_counter() - started, KEY_FIELD: key}
    from igconda.figures import heatmap_figure

    write_result_text(layout.grid, grid.to_csv(index=False))
    figure = heatmap_figure(grid)
    figure.axes[0].set_xlabel("classifier gradient scale")
    save_result_figure(figure, layout.heatmap)
    write_best(layout.best, best)  # on disk before MLflow is asked for anything
    uri = tracking.resolve_tracking_uri(tracking_uri or study.tracking.tracking_uri, output_dir)
    with tracking.outage_tolerant("logging the dpm_cg tuning run", uri, on_disk=str(output_dir)):
        with tracking.start_run(uri, experiment or study.tracking.experiment, "tune-dpm_cg",
                                tags={"igconda.stage": "tune", "igconda.method": DPM_CG},
                                parent_run_id=parent_run_id):
            tracking.log_params({"noise_levels": list(b.dpm_cg_noise_levels),
                                 "scales": list(b.dpm_cg_scales), "stride": b.dpm_cg_stride,
                                 "num_slices": len(slices)})
            tracking.log_metrics({"best_mean_dsc": best["mean_dsc"],
                                  "best_noise_level": best["noise_level"],
                                  "best_scale": best["scale"], "tau": best["threshold"]})
            for path in layout.files:
                tracking.log_artifact(path, "tune")
    print(f"tune dpm_cg: best D={best['noise_level']} scale={best['scale']:g} mean ⌈DSC⌉="
          f"{best['mean_dsc']:.3f} ({best['tuning_seconds']:.0f} s); wrote {layout.best}",
          flush=True)
    return best
