"""Tuning over (D, w): the search space, the per-trial evaluation, and a tiny Ray Tune run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from igconda.config import ConfigError, TuneConfig
from igconda.data import schema
from tuning import driver, space

GEOMETRY = {"original_shape": [16, 16, 6], "original_affine": np.eye(4),
            "output_affine": np.eye(4), "output_shape": [16, 16, 6]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ space


@pytest.mark.parametrize("group, trials", [(True, 3), (False, 6)])
def test_grid_space_covers_every_pair(group, trials):
    from ray.tune.search.variant_generator import generate_variants

    cfg = TuneConfig(noise_levels=(2, 4, 6), guidance_scales=(1.0, 3.0), stride=2)
    param_space, num_samples = space.build_param_space(cfg, 10, group_by_noise_level=group)
    assert num_samples == 1
    assert space.grid_size(cfg, group_by_noise_level=group) == (trials, 6)
    configs = [config for _, config in generate_variants(param_space)]
    assert len(configs) == trials
    pairs = {(d, w) for c in configs for d, ws in [space.trial_pairs(c)] for w in ws}
    assert pairs == {(d, w) for d in (2, 4, 6) for w in (1.0, 3.0)}


def test_random_space_samples_num_samples_from_the_grid():
    from ray.tune.search.sample import Categorical

    cfg = TuneConfig(noise_levels=(2, 4), guidance_scales=(1.0, 2.0, 3.0), stride=2,
                     search="random", num_samples=5)
    param_space, num_samples = space.build_param_space(cfg, 10)
    assert num_samples == 5
    assert isinstance(param_space["noise_level"], Categorical)
    assert list(param_space["noise_level"].categories) == [2, 4]
    assert list(param_space["guidance_scale"].categories) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("levels, scales, stride, t, message", [
    ((2, 5), (1.0,), 2, 10, "must be a multiple"),
    ((2, 10), (1.0,), 2, 10, "must be < the checkpoint's"),
    ((0,), (1.0,), 2, 10, "must be > 0"),
    ((400,), (3.0,), 10, 100, "checkpoint"),
    ((2, 2), (1.0,), 2, 10, "duplicates"),
    ((2,), (-1.0,), 2, 10, ">= 0"),
    ((2,), (1.0,), 0, 10, "stride"),
    ((), (1.0,), 2, 10, "empty"),
])
def test_invalid_space_is_refused(levels, scales, stride, t, message):
    with pytest.raises(ConfigError, match=message):
        space.validate_space(levels, scales, stride, t)


def test_space_is_checked_against_the_checkpoint_timesteps():
    cfg = TuneConfig(noise_levels=(100, 400), guidance_scales=(3.0,), stride=10)
    with pytest.raises(ConfigError, match="T=200"):
        space.build_param_space(cfg, 200)


# ------------------------------------------------------------------ data


def _write_patient(folder: Path, pid: str, rng: np.random.Generator, lesion_slices=(1, 2, 4)) -> None:
    image = rng.uniform(0, 0.3, size=(16, 16, 6)).astype(np.float32)
    mask = np.zeros((16, 16, 6), np.uint8)
    for z in lesion_slices:
        mask[5:9, 6:10, z] = 1
        image[5:9, 6:10, z] = 0.9
    table = schema.volume_to_rows(image, mask, patient_id=pid, cohort="lymphoma", tracer="FDG",
                                  role="internal", suv_max=10.0, scale_min=0.0,
                                  scale_max=10.0, pet_path=f"{pid}.nii.gz", geometry=GEOMETRY)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"{pid}.parquet")


@pytest.fixture
def tune_data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    # Written in reverse order: selection must not depend on file order.
    for pid in ("p2", "p1"):
        _write_patient(tmp_path / "data" / "slices" / "tune", pid, rng)
    return tmp_path / "data"


def test_load_tune_slices_keeps_unhealthy_in_a_fixed_order(tune_data):
    slices = driver.load_tune_slices(tune_data)
    assert len(slices) == 6
    assert list(slices.patient_id) == ["p1"] * 3 + ["p2"] * 3
    assert list(slices.slice_index) == [1, 2, 4, 1, 2, 4]
    assert slices.images.shape == (6, 16, 16) and slices.images.dtype == np.float32
    assert (slices.masks.reshape(6, -1).sum(1) == 16).all()


def test_load_tune_slices_cap_spreads_over_patients(tune_data):
    slices = driver.load_tune_slices(tune_data, max_slices=2)
    assert list(zip(slices.patient_id, slices.slice_index, strict=True)) == [("p1", 1), ("p2", 4)]
    again = driver.load_tune_slices(tune_data, max_slices=2)
    np.testing.assert_array_equal(slices.images, again.images)


def test_load_tune_slices_errors(tmp_path):
    with pytest.raises(driver.TuningError, match="cannot read"):
        driver.load_tune_slices(tmp_path / "nowhere")
    _write_patient(tmp_path / "d" / "slices" / "tune", "p1", np.random.default_rng(0), lesion_slices=())
    with pytest.raises(driver.TuningError, match="no unhealthy"):
        driver.load_tune_slices(tmp_path / "d")


# ------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def tiny_model(test_config):
    from igconda.models import build_unet

    torch.manual_seed(0)
    model = build_unet(test_config.model).eval()
    # MONAI zero-initialises the output convolution: an untrained UNet predicts ε = 0 for every
    # class, which would make every w decode alike. Random weights give class-dependent outputs.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def test_shared_encoding_gives_the_same_grid_with_fewer_encodings(tiny_model, test_config, monkeypatch):
    from igconda.diffusion import counterfactual, ddim
    from igconda.diffusion.schedule import NoiseSchedule

    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (5, 16, 16)).astype(np.float32)
    masks = np.zeros((5, 16, 16), np.uint8)
    masks[:, 4:8, 4:8] = 1
    schedule = NoiseSchedule.from_config(test_config.train)
    calls = {"encode": 0, "unguided": 0}
    real_encode, real_decode = ddim.ddim_encode, ddim.ddim_decode

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    def counting_decode(*args, **kwargs):
        calls["unguided"] += kwargs["guidance_scale"] == 0.0
        return real_decode(*args, **kwargs)

    # Patched where each is looked up: trial calls ddim's, counterfactual_pair its own imports.
    for module in (ddim, counterfactual):
        monkeypatch.setattr(module, "ddim_encode", counting_encode)
        monkeypatch.setattr(module, "ddim_decode", counting_decode)
    kwargs = dict(noise_level=4, guidance_scales=[1.0, 3.0], stride=2, batch_size=2,
                  map_kinds=("abs", "guidance"))
    shared = driver.evaluate_noise_level(tiny_model, schedule, images, masks, share_encoding=True, **kwargs)
    # One encoding and one unguided decode per batch of 2 slices, not one per (batch, w).
    assert calls == {"encode": 3, "unguided": 3}
    calls.update(encode=0)
    separate = driver.evaluate_noise_level(tiny_model, schedule, images, masks, share_encoding=False, **kwargs)
    assert calls["encode"] == 6
    keys = [(r["guidance_scale"], r["map_kind"]) for r in shared]
    assert keys == [(1.0, "abs"), (1.0, "guidance"), (3.0, "abs"), (3.0, "guidance"), (0.0, "w0"),
                    (0.0, "w0_hot")]
    for a, b in zip(shared, separate, strict=True):
        assert a["mean_dsc"] == pytest.approx(b["mean_dsc"], abs=1e-6)
        assert a["mean_auprc"] == pytest.approx(b["mean_auprc"], abs=1e-6)
        assert a["num_slices"] == 5 and 0 < a["tau"] <= 0.9
        assert 0 <= a["mean_dice_tau"] <= 1
    assert shared[0]["evaluations_per_slice"] == 8 and shared[-1]["evaluations_per_slice"] == 4
    # w changes the decode, so the maps (and almost surely the scores) differ across w.
    assert len({round(r["mean_auprc"], 9) for r in shared}) > 1


def test_score_row_goes_through_the_evaluation_path():
    from igconda import evaluation as E

    rng = np.random.default_rng(2)
    masks = np.zeros((4, 12, 12), np.uint8)
    masks[:, 3:7, 3:7] = 1
    masks[1, 9:11, 9:11] = 1  # a second lesion
    maps = np.clip(0.3 * masks + 0.2 * rng.random(masks.shape), 0, 1).astype(np.float32)
    row = driver.score_row(maps, masks)
    scores = E.score_maps(maps, masks)
    assert row["mean_dsc"] == pytest.approx(np.mean(scores["dsc_max"]))
    assert row["mean_auprc"] == pytest.approx(np.mean(scores["auprc"]))
    assert row["detection_sensitivity"] == pytest.approx(scores["n_detected"].sum() / 5)
    assert (row["tau"], row["mean_dice_tau"]) == pytest.approx(E.calibrate_threshold(maps, masks))
    assert row["num_slices"] == 4


def test_collect_grid_and_select_best():
    def report(d, w, kind, dsc, tau=0.1):
        return {"noise_level": d, "guidance_scale": w, "map_kind": kind, "stride": 2,
                "mean_dsc": dsc, "tau": tau, "mean_dice_tau": dsc / 2, "mean_auprc": 0.1}

    reports = [
        report(4, 3.0, "guidance", 0.7, tau=0.04),
        report(2, 1.0, "abs", 0.7),
        report(2, 3.0, "abs", float("nan")),
        report(4, 3.0, "guidance", 0.1),  # repeat (random search)
        report(4, 3.0, "abs", 0.5, tau=0.2),
        report(2, 0.0, "w0", 0.95, tau=0.3),  # the control is never chosen ...
        report(4, 0.0, "w0", 0.4, tau=0.06),
    ]
    grid = driver.collect_grid(reports)
    assert list(zip(grid.noise_level, grid.guidance_scale, grid.map_kind, strict=True)) == [
        (2, 0.0, "w0"), (2, 1.0, "abs"), (2, 3.0, "abs"), (4, 0.0, "w0"), (4, 3.0, "abs"),
        (4, 3.0, "guidance")]
    best = driver.select_best(grid)
    assert (best["noise_level"], best["guidance_scale"], best["map_kind"]) == (2, 1.0, "abs")  # tie → smaller D
    assert best["control"]["mean_dsc"] == 0.95  # ... but reported beside the chosen map
    best = driver.select_best(grid[grid.noise_level == 4])
    assert (best["map_kind"], best["threshold"]) == ("guidance", 0.04)
    assert best["paper_map"]["mean_dsc"] == 0.5 and best["control"]["tau"] == 0.06
    assert best["thresholds"] == {"igconda_guidance": 0.04, "igconda_abs": 0.2, "igconda_w0": 0.06}
    with pytest.raises(driver.TuningError, match="finite"):
        driver.select_best(grid.assign(mean_dsc=float("nan")))
    with pytest.raises(driver.TuningError):
        driver.collect_grid([])


def test_baseline_thresholds_are_calibrated_on_the_tune_slices(tune_data):
    slices = driver.load_tune_slices(tune_data)
    taus = driver.baseline_thresholds(slices)
    assert set(taus) == {"threshold_41", "intensity"}
    # Lesions are 0.9 on a background below 0.3: any τ in [0.3, 0.9] is perfect; the lowest wins.
    assert taus["intensity"] == pytest.approx(0.3)
    assert taus["threshold_41"] == pytest.approx(0.02)  # a binary map: every τ is the same


# ------------------------------------------------------------------ a tiny Tune run


@pytest.mark.ray
def test_tune_job_refuses_data_preprocessed_otherwise_before_ray(tune_data, test_config,
                                                                 checkpoint, tmp_path, capsys,
                                                                 monkeypatch):
    """The tune slices must be made as the checkpoint's training data were: exit 2 before Ray
    starts, naming dataset.json, the checkpoint and the setting (igconda.data.compat)."""
    import ray

    from igconda.data.compat import settings_record
    from ray_jobs import shared_storage
    from ray_jobs import tune as tune_job

    recorded = {**settings_record(test_config.preprocess), "axial_extent": "crop"}
    (tune_data / "dataset.json").write_text(json.dumps({"config": recorded}))
    for module, name in ((ray, "init"), (shared_storage, "preflight")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the job went on to Ray"))
    code = tune_job.main(["--checkpoint", str(checkpoint), "--data", str(tune_data),
                          "--output", str(tmp_path / "tune")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{tune_data}/dataset.json" in err and f"checkpoint {checkpoint}" in err
    assert "preprocess.axial_extent: data 'crop', expected 'whole'" in err
    assert not (tmp_path / "tune").exists()


def test_tune_job_writes_best_grid_heatmap_and_nested_runs(ray_session, tune_data, test_config, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from igconda import tracking
    from igconda.checkpoint import save_checkpoint
    from igconda.models import build_unet
    from ray_jobs import tune as tune_job

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=build_unet(test_config.model), config=test_config)
    out = tmp_path / "tune"
    uri = tracking.resolve_tracking_uri("", tmp_path)
    with tracking.start_run(uri, "tune-test", "parent") as parent_id:
        pass
    code = tune_job.main(["--checkpoint", str(ckpt), "--data", str(tune_data), "--output", str(out),
                          "--tracking-uri", uri, "--experiment", "tune-test",
                          "--parent-run-id", parent_id, "--max-slices", "4"])
    assert code == 0

    grid = pd.read_csv(out / "grid.csv")
    # The full 2 × 2 × 4-kind grid and the two w = 0 control rows per D, though only 2 trials ran.
    assert len(grid) == 2 * 2 * 4 + 2 * 2
    candidates = grid[~grid.map_kind.isin(["w0", "w0_hot"])]
    assert set(zip(candidates.noise_level, candidates.guidance_scale, strict=True)) == {
        (2, 1.0), (2, 3.0), (4, 1.0), (4, 3.0)}
    assert set(candidates.map_kind) == {"abs", "hot", "guidance", "guidance_abs"}
    assert (grid.num_slices == 4).all()
    best = json.loads((out / "best.json").read_text())
    top = candidates.loc[candidates.mean_dsc.idxmax()]
    assert (best["noise_level"], best["guidance_scale"], best["map_kind"]) == (
        int(top.noise_level), float(top.guidance_scale), top.map_kind)
    assert best["mean_dsc"] == pytest.approx(top.mean_dsc)
    assert best["stride"] == 2 and best["threshold"] == pytest.approx(top.tau)
    assert {f"igconda_{best['map_kind']}", "igconda_abs", "igconda_w0", "threshold_41",
            "intensity"} <= set(best["thresholds"])
    assert "mean_dsc" in best["control"] and "mean_dsc" in best["paper_map"]
    assert driver.read_best(out / "best.json")["noise_level"] == best["noise_level"]
    assert (out / "heatmap.png").stat().st_size > 1000
    assert not list(out.glob(".*"))  # no temporary files left behind

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    tune_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(tune_runs) == 1
    tune_run = tune_runs[0]
    assert tune_run.info.run_id == best["mlflow_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]
    assert len(children) == 4 + 2  # every (D, w), and each D's w = 0 control
    pairs = {(int(r.data.params["noise_level"]), float(r.data.params["guidance_scale"])) for r in children}
    assert pairs == {(2, 1.0), (2, 3.0), (4, 1.0), (4, 3.0), (2, 0.0), (4, 0.0)}
    for child in children:
        kinds = ("w0",) if float(child.data.params["guidance_scale"]) == 0 else ("abs", "guidance")
        for kind in kinds:
            assert f"{kind}/mean_dsc" in child.data.metrics and f"{kind}/tau" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(tune_run.info.run_id, "tune")}
    assert {"tune/best.json", "tune/grid.csv", "tune/heatmap.png"} <= artifacts


@pytest.mark.ray
def test_tune_job_keeps_its_result_when_the_tracking_server_is_down(ray_session, tune_data, test_config,
                                                                   tmp_path, capsys):
    from igconda.checkpoint import save_checkpoint
    from igconda.models import build_unet
    from ray_jobs import tune as tune_job

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=build_unet(test_config.model), config=test_config)
    out = tmp_path / "tune"
    code = tune_job.main(["--checkpoint", str(ckpt), "--data", str(tune_data), "--output", str(out),
                          "--tracking-uri", "http://127.0.0.1:1", "--max-slices", "4"])
    assert code == 0  # the tuning itself succeeded
    err = capsys.readouterr().err
    assert "MLflow tracking at http://127.0.0.1:1 failed while logging the tuning run" in err
    assert f"python -m ray_jobs.relog --tune {out}" in err
    best = driver.read_best(out / "best.json")  # on disk, complete, without a run id
    assert {"noise_level", "guidance_scale", "map_kind", "threshold", "thresholds"} <= set(best)
    assert "mlflow_run_id" not in best
    assert (out / "grid.csv").is_file() and (out / "heatmap.png").is_file()
