"""The baseline jobs end to end on tiny data: ``ray_jobs.train_baseline`` trains each method
for an epoch and leaves ``OUT/best``; ``ray_jobs.score_method`` writes the per-slice scores and
the MLflow run the comparison reads (docs/CONTRACTS.md, "Method runs"); bad input exits 2;
``--resume`` continues; the unconditional DPM of ``dpm_cg`` comes from ``ray_jobs.train``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from igconda import checkpoint as ckpt
from igconda import tracking
from igconda.baselines.scoring import COMPARISON_SCORE_SCHEMA
from igconda.data.schema import validate_scores
from tests.helpers import make_dataset

pytestmark = pytest.mark.ray

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "test.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory, test_config) -> Path:
    root = tmp_path_factory.mktemp("baseline-data")
    for split, patients in {"train": {"a1": ("lung", "internal"), "a2": ("lymphoma", "internal")},
                            "valid": {"v1": ("lung", "internal")},
                            "tune": {"u1": ("lung", "internal")},
                            "test": {"s1": ("lung", "internal"),
                                     "s2": ("sarcoma_ext", "external")}}.items():
        make_dataset(root, test_config, patients, split)
    return root


def _train_args(method: str, data: Path, output: Path, *extra: str) -> list[str]:
    # 0.5 CPU for the worker: ray_session has 2 CPUs and Ray Data's readers need one.
    return ["--method", method, "--data", str(data), "--output", str(output), "--config", CONFIG,
            "--num-workers", "1", "--cpus-per-worker", "0.5", "--torch-threads", "1", *extra]


@pytest.fixture(scope="module")
def trained(ray_session, data, tmp_path_factory) -> dict[str, Path]:
    """Each method trained for one epoch through the job (and the DPM of dpm_cg by ray_jobs.train).

    test_resume_continues_from_the_latest_checkpoint trains ``supervised`` on: it runs last."""
    from ray_jobs import train, train_baseline

    root = tmp_path_factory.mktemp("baselines")
    outputs = {}
    for method in ("hirescam", "supervised", "fanogan", "dpm_classifier"):
        outputs[method] = root / method
        assert train_baseline.main(_train_args(method, data, outputs[method])) == 0, method
    # The unconditional DPM: the IgCONDA training job with model.conditioning: none.
    study = yaml.safe_load(Path(CONFIG).read_text())
    study["model"]["conditioning"] = "none"
    (root / "dpm.yaml").write_text(yaml.safe_dump(study))
    outputs["dpm"] = root / "dpm"
    assert train.main(["--data", str(data), "--output", str(outputs["dpm"]), "--config",
                       str(root / "dpm.yaml"), "--epochs", "1", "--num-workers", "1",
                       "--cpus-per-worker", "0.5", "--torch-threads", "1"]) == 0
    return outputs


def test_every_method_trains_an_epoch_and_leaves_its_best_checkpoint(trained):
    from igconda.baselines.scoring import load_method

    # f-AnoGAN's epoch 1 is its WGAN-GP stage, epoch 2 its encoder's: only that one is selectable.
    for method, epoch in (("hirescam", 1), ("supervised", 1), ("fanogan", 2)):
        best, scored_as = trained[method] / ckpt.BEST_DIR, method
        assert ckpt.read_best_pointer(trained[method])["epoch"] == epoch
        assert load_method(scored_as, best).names == (scored_as,)
        record = tracking.get_run(*_run_of(trained[method]))
        assert record["tags"]["igconda.stage"] == "train_baseline"
        assert record["tags"]["igconda.method"] == scored_as and record["status"] == "FINISHED"
        assert record["tags"]["igconda.init"] == "scratch"  # no local ImageNet weights given
        assert "best/valid_loss" in record["metrics"] and "baselines.epochs" in record["params"]
    dpm_cg = load_method("dpm_cg", trained["dpm_classifier"] / ckpt.BEST_DIR,
                         trained["dpm"] / ckpt.BEST_DIR)
    assert ckpt.load_checkpoint_config(trained["dpm"] / ckpt.BEST_DIR).model.conditioning == "none"
    assert dpm_cg.names == ("dpm_cg",)


@pytest.mark.parametrize("method", ["hirescam", "fanogan"])
def test_two_workers_train_on_shards_that_cover_the_split_once(ray_session, data, tmp_path, method):
    """DDP over two Ray Train workers: each epoch's reduced sample count is every training row
    of the method exactly once (f-AnoGAN: the healthy ones), and the checkpoint says 2 workers."""
    from ray_jobs import train_baseline

    out = tmp_path / method
    args = _train_args(method, data, out)
    args[args.index("--num-workers") + 1] = "2"
    args[args.index("--cpus-per-worker") + 1] = "0.5"  # 2 × 0.5: one CPU left for the readers
    assert train_baseline.main(args) == 0
    rows = pq.read_table(data / "slices" / "train", columns=["label"]).column("label").to_numpy()
    expected = int((rows == 1).sum()) if method == "fanogan" else len(rows)
    meta = ckpt.load_metadata(out / ckpt.BEST_DIR)
    assert meta["world_size"] == 2
    assert [h["samples"] for h in meta["history"]][:1] == [expected]


def _run_of(output: Path) -> tuple[str, str]:
    import json

    record = json.loads((output / "mlflow_run.json").read_text())
    return record["tracking_uri"], record["run_id"]


def test_score_method_in_one_pass_equals_calibrating_on_tune_then_scoring_test(ray_session, data,
                                                                              tmp_path):
    """The job's one Ray Data pass over both splits gives the τ and per-slice scores of the two
    passes it replaced: τ from the tune split's maps, then the test split scored at τ."""
    from igconda.baselines.scoring import (
        SCORE_INPUT_COLUMNS,
        load_method,
        score_slices,
        scores_table,
    )
    from igconda.evaluation import calibrate_threshold
    from igconda.slice_batch import batch_images
    from ray_jobs import score_method

    def unhealthy(split: str) -> dict[str, np.ndarray]:
        table = pq.read_table(data / "slices" / split, columns=list(SCORE_INPUT_COLUMNS))
        table = table.filter(pc.equal(table["label"], 2))
        return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}

    method, tune, test = load_method("intensity"), unhealthy("tune"), unhealthy("test")
    tau, dice = calibrate_threshold(method.maps(tune)["intensity"],
                                    batch_images(tune, "mask", dtype=np.uint8))
    expected = score_slices(method, test, {"intensity": tau}).sort_values(["patient_id", "slice_index"])
    out = tmp_path / "intensity"
    assert score_method.main(["--method", "intensity", "--data", str(data), "--output", str(out),
                              "--config", CONFIG, "--num-cpus", "0.5"]) == 0
    uri = tracking.resolve_tracking_uri(None, out)
    (run,) = tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'score'")
    assert float(run["params"]["tau"]) == tau and float(run["params"]["tune_dice_at_tau"]) == dice
    pd.testing.assert_frame_equal(pq.read_table(out / "per_slice_scores.parquet").to_pandas(),
                                  scores_table(expected).to_pandas(), check_dtype=False)


@pytest.mark.parametrize("method", ["hirescam", "dpm_cg"])
def test_score_method_writes_scores_and_the_comparison_run(trained, data, tmp_path, method):
    from ray_jobs import score_method

    checkpoint = trained["dpm_classifier" if method == "dpm_cg" else method] / ckpt.BEST_DIR
    extra = ["--checkpoint2", str(trained["dpm"] / ckpt.BEST_DIR)] if method == "dpm_cg" else []
    out = tmp_path / "scores"
    assert score_method.main(["--method", method, "--checkpoint", str(checkpoint), *extra,
                              "--data", str(data), "--output", str(out), "--config", CONFIG,
                              "--variant", "tiny", "--num-cpus", "0.5"]) == 0
    table = pq.read_table(out / "per_slice_scores.parquet")
    validate_scores(table)
    assert table.schema.equals(COMPARISON_SCORE_SCHEMA)
    frame = table.to_pandas()
    assert set(frame["method"]) == {method} and set(frame["patient_id"]) == {"s1", "s2"}
    assert (frame["label"] == 2).all() and frame["tau"].nunique() == 1
    assert frame["lesion_size_norm"].between(0, 1, inclusive="right").all()
    assert frame["lesion_suv_mean_norm"].between(0, 1, inclusive="right").all()
    summary = (out / "summary.csv").read_text()
    assert "internal (all)" in summary and "external (all)" in summary

    uri = tracking.resolve_tracking_uri(None, out)
    (run,) = tracking.find_runs(uri, "igconda", "tags.`igconda.stage` = 'score'")
    assert run["tags"]["igconda.method"] == method and run["tags"]["igconda.variant"] == "tiny"
    assert run["tags"]["igconda.data_version"].startswith("files:")
    assert {"dsc_max_mean", "dice_tau_mean", "auprc_mean", "sensitivity_mean"} <= set(run["metrics"])
    assert float(run["params"]["tau"]) == pytest.approx(frame["tau"].iloc[0])
    assert sorted(tracking.list_artifacts(uri, run["run_id"], "scores")) == [
        "scores/per_slice_scores.parquet", "scores/summary.csv"]


def test_dpm_cg_is_tuned_by_the_tune_job_and_scored_at_the_chosen_pair(trained, data, tmp_path):
    import json

    import pandas as pd

    from ray_jobs import score_method, tune

    study = yaml.safe_load(Path(CONFIG).read_text())
    study["baselines"].update(dpm_cg_noise_levels=[2, 4], dpm_cg_scales=[1.0, 6.0])
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(study))
    classifier = str(trained["dpm_classifier"] / ckpt.BEST_DIR)
    dpm = str(trained["dpm"] / ckpt.BEST_DIR)
    out = tmp_path / "tune"
    pair = ["--checkpoint", classifier, "--checkpoint2", dpm, "--data", str(data)]
    assert tune.main(["--method", "dpm_cg", *pair, "--output", str(out), "--config", str(config)]) == 0
    grid = pd.read_csv(out / "grid.csv")
    pairs = sorted(zip(grid["noise_level"], grid["guidance_scale"], strict=True))
    assert pairs == [(2, 1.0), (2, 6.0), (4, 1.0), (4, 6.0)]
    assert set(grid["map_kind"]) == {"dpm_cg"} and grid["num_slices"].gt(0).all()
    best = json.loads((out / "best.json").read_text())
    top = grid[grid["mean_dsc"] == grid["mean_dsc"].max()].iloc[0]  # ties: smaller D, then scale
    assert (best["noise_level"], best["scale"]) == (int(top["noise_level"]), float(top["guidance_scale"]))
    (run,) = tracking.find_runs(tracking.resolve_tracking_uri(None, out), "igconda",
                                "tags.`igconda.method` = 'dpm_cg'")
    assert run["tags"]["igconda.stage"] == "tune" and "tune/grid.csv" in tracking.list_artifacts(
        tracking.resolve_tracking_uri(None, out), run["run_id"], "tune")

    scores = tmp_path / "scores"
    assert score_method.main(["--method", "dpm_cg", *pair, "--tuned", str(out / "best.json"),
                              "--output", str(scores), "--config", CONFIG, "--num-cpus", "0.5"]) == 0
    (scored,) = tracking.find_runs(tracking.resolve_tracking_uri(None, scores), "igconda",
                                   "tags.`igconda.stage` = 'score'")
    assert int(scored["params"]["baselines.dpm_cg_noise_level"]) == best["noise_level"]
    assert float(scored["params"]["baselines.dpm_cg_scale"]) == best["scale"]
    # --checkpoint2 belongs to dpm_cg and is needed there.
    assert tune.main(["--method", "dpm_cg", *pair[:2], "--data", str(data), "--output",
                      str(tmp_path / "x")]) == 2


def test_bad_method_and_missing_data_exit_2(ray_session, data, tmp_path, capsys):
    from ray_jobs import score_method, train_baseline

    assert train_baseline.main(_train_args("resnet", data, tmp_path / "a")) == 2
    assert "unknown baseline 'resnet'" in capsys.readouterr().err
    assert train_baseline.main(_train_args("hirescam", tmp_path / "nowhere", tmp_path / "b")) == 2
    assert "no train split" in capsys.readouterr().err
    args = ["--checkpoint", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "c")]
    assert score_method.main(["--method", "resnet", *args]) == 2
    assert "unknown --method 'resnet'" in capsys.readouterr().err
    assert score_method.main(["--method", "hirescam", *args[:3], str(tmp_path / "none"),
                              *args[4:]]) == 2
    assert "no tune split" in capsys.readouterr().err


def test_resume_continues_from_the_latest_checkpoint(trained, data):
    from ray_jobs import train_baseline

    output = trained["supervised"]
    assert train_baseline.main(_train_args("supervised", data, output)) == 2  # exists: explicit
    assert train_baseline.main(_train_args("supervised", data, output, "--resume", "--epochs", "2")) == 0
    latest = output / "ray_results" / "supervised" / "checkpoint_epoch_000002"
    meta = ckpt.load_metadata(latest)
    assert meta["epoch"] == 2 and [h["epoch"] for h in meta["history"]] == [1.0, 2.0]
    uri, run_id = _run_of(output)
    assert [s for s, _ in tracking.get_metric_history(uri, run_id, "train_loss")] == [1, 2]
