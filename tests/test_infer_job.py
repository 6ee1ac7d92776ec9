"""ray_jobs.infer: batch inference end to end on a tiny dataset, resume, settings precedence."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_jobs import infer, infer_config
from tests.helpers import make_checkpoint, make_dataset

PATIENTS = {"L1": ("lymphoma", "internal"), "N1": ("lung", "internal"), "S1": ("sts_ext", "external")}


@pytest.fixture(scope="module")
def study(tmp_path_factory, test_config):
    root = tmp_path_factory.mktemp("infer")
    checkpoint = make_checkpoint(root / "ckpt", test_config)
    data = make_dataset(root / "data", test_config, PATIENTS)
    return root, checkpoint, data


def _argv(study, output: Path, *extra: str) -> list[str]:
    root, checkpoint, data = study
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
            "--tracking-uri", str(root / "mlruns"), "--batch-size", "16", *extra]


# ---- settings (no Ray) ------------------------------------------------------------------------

def test_precedence_cli_over_tuned_over_config_over_checkpoint(study, tmp_path):
    _, checkpoint, _ = study
    config = tmp_path / "c.yaml"
    config.write_text("infer: {noise_level: 8, guidance_scale: 1.0, stride: 4, batch_size: 3}\n")
    tuned = tmp_path / "best.json"
    tuned.write_text(json.dumps({"noise_level": 6, "guidance_scale": 2.0, "stride": 2,
                                 "map_kind": "guidance", "threshold": 0.04,
                                 "thresholds": {"igconda_guidance": 0.04, "intensity": 0.3}}))
    base = ["--checkpoint", str(checkpoint), "--data", "d", "--output", "o"]

    _, s = infer.resolve_config(infer.parse_args(base))
    assert (s.noise_level, s.guidance_scale, s.stride) == (4, 3.0, 2)  # configs/test.yaml
    assert (s.map_kind, s.threshold, s.thresholds) == ("abs", 0.1, {"igconda_abs": 0.1})  # untuned
    cfg, s = infer.resolve_config(infer.parse_args([*base, "--config", str(config)]))
    assert (s.noise_level, s.guidance_scale, s.stride, cfg.infer.batch_size) == (8, 1.0, 4, 3)
    # The tuned D=6 is not a multiple of the config's stride 4: the tuning stride is used.
    _, s = infer.resolve_config(infer.parse_args([*base, "--config", str(config), "--tuned", str(tuned)]))
    assert (s.noise_level, s.guidance_scale, s.stride) == (6, 2.0, 2)
    assert (s.map_kind, s.threshold, s.method) == ("guidance", 0.04, "igconda_guidance")
    assert s.thresholds == {"igconda_guidance": 0.04, "intensity": 0.3}
    _, s = infer.resolve_config(infer.parse_args([*base, "--config", str(config), "--tuned", str(tuned),
                                                  "--noise-level", "4", "--guidance-scale", "5",
                                                  "--map", "hot", "--threshold", "0.2"]))
    assert (s.noise_level, s.guidance_scale, s.stride) == (4, 5.0, 2)
    assert (s.map_kind, s.threshold, s.thresholds["igconda_hot"]) == ("hot", 0.2, 0.2)


@pytest.mark.parametrize("extra, message", [
    (["--noise-level", "12"], "noise_level"), (["--stride", "3"], "stride"),
    (["--tuned", "/nonexistent/best.json"], "best.json"),
])
def test_bad_settings_are_clear_errors(study, extra, message, capsys):
    _, checkpoint, data = study
    code = infer.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output", "o", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_and_split_exit_2(study, tmp_path, capsys):
    _, checkpoint, data = study
    assert infer.main(["--checkpoint", str(tmp_path), "--data", str(data), "--output", "o"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert infer.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output",
                       str(tmp_path / "o"), "--split", "valid"]) == 2
    assert "no 'valid' split" in capsys.readouterr().err


@pytest.mark.parametrize("concurrency, cpus, cluster, starves", [
    (2, 1.0, 2.0, True),    # two 1-CPU actors on 2 CPUs: the readers never run (seen hanging)
    (1, 1.0, 2.0, False),   # the demo's setting
    (2, 0.5, 2.0, False),   # fractional actors leave one CPU for the readers
    (2, 0.75, 2.0, True),   # half a CPU is not enough: a read task asks for a whole one (hung)
    (4, 2.0, 8.0, True),
])
def test_actors_that_reserve_every_cpu_are_warned_about(concurrency, cpus, cluster, starves):
    problem = infer_config.actor_cpu_warning(concurrency, cpus, cluster)
    assert (problem is not None) is starves
    if starves:
        assert "infer.concurrency" in problem and f"{cluster:g} CPUs" in problem


def test_output_completeness_checks_rows_and_settings(tmp_path):
    import pyarrow as pa

    from igconda.data.schema import PREDICTION_SCHEMA

    settings = infer.InferSettings("/ck", 4, 3.0, 2, "abs")
    columns = {f.name: (np.zeros((2, 4), np.float32) if pa.types.is_list(f.type)
                        else np.array(["P", "P"], object) if pa.types.is_string(f.type)
                        else np.zeros(2, f.type.to_pandas_dtype())) for f in PREDICTION_SCHEMA}
    columns["slice_index"] = np.array([1, 0], np.int32)
    path = tmp_path / "P.parquet"
    with pytest.raises(ValueError, match="counterfactual_w0"):
        infer.write_patient({k: v for k, v in columns.items() if k != "counterfactual_w0"}, path,
                            settings)
    infer.write_patient(columns, path, settings)
    assert pq.read_table(path).column("slice_index").to_pylist() == [0, 1]
    assert infer.output_is_complete(path, 2, settings)
    assert not infer.output_is_complete(path, 3, settings)  # missing slices
    assert not infer.output_is_complete(path, 2, infer.InferSettings("/ck", 6, 3.0, 2, "abs"))
    assert not infer.output_is_complete(path, 2, infer.InferSettings("/ck", 4, 3.0, 2, "abs", "retrained"))
    assert not infer.output_is_complete(path, 2, infer.InferSettings("/ck", 4, 3.0, 2, "hot"))
    assert not infer.output_is_complete(path, 2, infer.InferSettings("/ck", 4, 3.0, 2, "abs", "", 0.3))
    # The patient's input slices changed (re-preprocessed): recomputed, whatever the settings.
    infer.write_patient(columns, path, settings, "digest-a")
    assert infer.output_is_complete(path, 2, settings, "digest-a")
    assert not infer.output_is_complete(path, 2, settings, "digest-b")
    assert not infer.output_is_complete(path, 2, settings)
    path.write_bytes(path.read_bytes()[:50])  # truncated by a crash mid-copy
    assert not infer.output_is_complete(path, 2, settings, "digest-a")
    assert [p.name for p in tmp_path.iterdir()] == ["P.parquet"]  # no temp files left


def test_input_digest_follows_the_file_content(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"slices of P")
    b.write_bytes(b"slices of P")
    assert infer.input_digest(a) == infer.input_digest(b)  # the content, not the path
    b.write_bytes(b"slices of P, re-preprocessed")
    assert infer.input_digest(a) != infer.input_digest(b)


def test_outputs_of_patients_no_longer_in_the_split_are_pruned(tmp_path):
    for name in ("slices/P.parquet", "slices/Q.parquet", "volumes/P_anomaly.nii.gz",
                 "volumes/Q_anomaly.nii.gz", "tables/methods.csv", "slices/.Q.parquet.1a2b.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = infer.prune_outputs(tmp_path, {"P"})
    assert sorted(removed) == ["slices/Q.parquet", "volumes/Q_anomaly.nii.gz"]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["slices/.Q.parquet.1a2b.tmp", "slices/P.parquet", "tables/methods.csv",
                    "volumes/P_anomaly.nii.gz"]


# ---- the job on Ray ---------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.e2e
def test_job_end_to_end_then_resume_after_crash(study, ray_session, capsys):
    root, _, data = study
    output = root / "out"
    result = infer.run(infer.infer_request(infer.parse_args(_argv(study, output))))
    assert sorted(result.computed) == sorted(PATIENTS) and result.skipped == []

    # Per-slice files: every slice exactly once, both decodes, the schema's columns.
    from igconda.data.schema import validate_predictions

    for pid in PATIENTS:
        source = pq.read_table(data / "slices" / "test" / f"{pid}.parquet").to_pandas()
        table = pq.read_table(output / "slices" / f"{pid}.parquet")
        validate_predictions(table)
        out = table.to_pandas()
        assert out["slice_index"].tolist() == sorted(source["slice_index"].tolist())
        assert all(len(m) == 16 * 16 for m in out["anomaly_map"])
        assert all(len(m) == 16 * 16 for m in out["counterfactual_w0"])

    # Tables: Table-1 rows per cohort plus the internal/external aggregates, every method.
    per_cohort = pd.read_csv(output / "tables" / "per_cohort.csv", index_col=0)
    assert {"lymphoma", "lung", "sts_ext", "internal (all)", "external (all)"} <= set(per_cohort.index)
    assert {"n_slices", "dsc_max_mean", "dsc_max_std", "dice_tau_mean", "tau", "hd95_mean",
            "auprc_mean", "sensitivity_mean"} <= set(per_cohort.columns)
    assert (per_cohort["tau"] == 0.1).all()  # untuned: infer.threshold of configs/test.yaml
    methods = pd.read_csv(output / "tables" / "methods.csv")
    assert set(methods["method"]) == {"igconda_abs", "igconda_hot", "igconda_guidance",
                                      "igconda_guidance_abs", "igconda_w0", "igconda_w0_hot",
                                      "threshold_41", "intensity"}
    n_slices = methods.groupby("method")["n_slices"].max()
    assert n_slices.nunique() == 1  # every method scored on the same unhealthy slices
    per_slice = pd.read_csv(output / "tables" / "per_slice_metrics.csv")
    assert per_slice.loc[per_slice.method == "igconda_abs", "dice_tau"].notna().all()
    assert per_slice.loc[per_slice.method == "igconda_w0", "dice_tau"].isna().all()  # no τ untuned
    assert "w = 0 control" in (output / "tables" / "baselines_per_cohort.md").read_text()
    assert "± " in (output / "tables" / "per_cohort.md").read_text()
    assert (output / "tables" / "baselines_per_cohort.md").is_file()

    # Figures (or a stated reason), 3D volumes on the original grid.
    assert result.figure_errors == {}, result.figure_errors
    assert {"qualitative_lymphoma.png", "qualitative_lung.png", "lesion_size.png"} <= {
        p.name for p in (output / "figures").iterdir()}
    for pid in PATIENTS:
        volume = nib.load(output / "volumes" / f"{pid}_anomaly.nii.gz")
        original = nib.load(data / "nifti" / f"{pid}_pet.nii.gz")
        assert volume.shape == original.shape
        np.testing.assert_allclose(volume.affine, original.affine, atol=1e-4)
        assert np.asarray(volume.dataobj).max() > 0

    # MLflow: params and per-cohort metrics of every method.
    from mlflow.tracking import MlflowClient

    from igconda.tracking import resolve_tracking_uri

    run = MlflowClient(resolve_tracking_uri(str(root / "mlruns"), root)).get_run(result.run_id)
    assert run.data.params["D"] == "4" and run.data.params["s"] == "2"
    assert run.data.params["map_kind"] == "abs" and run.data.params["threshold"] == "0.1"
    for key in ("igconda_abs/lung/dsc_max_mean", "igconda_abs/lung/dice_tau_mean",
                "igconda_w0/lung/dsc_max_mean", "threshold_41/external_all/dsc_max_mean",
                "intensity/lymphoma/auprc_mean"):
        assert key in run.data.metrics, sorted(run.data.metrics)[:20]
    # One method run per scored method, as the comparison stage reads them back.
    from igconda.comparison import load_scored_runs

    uri = resolve_tracking_uri(str(root / "mlruns"), root)
    experiment = MlflowClient(uri).get_experiment(run.info.experiment_id).name
    scores = load_scored_runs(uri, experiment).scores
    assert {"igconda_abs", "igconda_w0", "threshold_41", "intensity"} <= set(scores["method"])
    assert scores["lesion_size_norm"].between(0, 1).all()
    pooled = methods[(methods.method == "igconda_abs") & methods.group.str.endswith("(all)")]
    assert (scores["method"] == "igconda_abs").sum() == pooled["n_slices"].sum()

    # A crash lost one patient's output: only that patient is recomputed.
    before = {pid: (output / "slices" / f"{pid}.parquet").stat().st_mtime_ns for pid in PATIENTS}
    (output / "slices" / "N1.parquet").unlink()
    capsys.readouterr()
    again = infer.run(infer.infer_request(infer.parse_args(_argv(study, output))))
    assert again.computed == ["N1"] and sorted(again.skipped) == ["L1", "S1"]
    for pid in ("L1", "S1"):
        assert (output / "slices" / f"{pid}.parquet").stat().st_mtime_ns == before[pid]
    assert "2 already complete, 1 to run" in capsys.readouterr().out
    assert pd.read_csv(output / "tables" / "methods.csv").shape == methods.shape

    # The data re-preprocessed into another version: S1 (the only external patient) dropped,
    # N1's slices changed, L1's identical. Only N1 is recomputed and nothing of S1 remains.
    import shutil

    import pyarrow as pa

    data2 = root / "data2"
    shutil.copytree(data, data2)
    (data2 / "slices" / "test" / "S1.parquet").unlink()
    n1 = data2 / "slices" / "test" / "N1.parquet"
    table = pq.read_table(n1)
    frame = table.to_pandas()
    frame["image"] = [np.asarray(x) * 0.5 for x in frame["image"]]
    pq.write_table(pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False), n1)
    kept = (output / "slices" / "L1.parquet").stat().st_mtime_ns
    third = infer.run(infer.infer_request(infer.parse_args(_argv((root, study[1], data2), output))))
    assert third.computed == ["N1"] and third.skipped == ["L1"]
    assert sorted(third.removed) == ["scored/S1.parquet", "slices/S1.parquet",
                                     "volumes/S1_anomaly.nii.gz"]
    assert third.rescored == ["N1"]  # re-predicted, so scored again; L1's scores reused
    assert (output / "slices" / "L1.parquet").stat().st_mtime_ns == kept
    assert sorted(p.name for p in (output / "slices").glob("*.parquet")) == ["L1.parquet", "N1.parquet"]
    assert sorted(p.name for p in (output / "volumes").iterdir()) == ["L1_anomaly.nii.gz",
                                                                       "N1_anomaly.nii.gz"]
    assert not (output / "figures" / "qualitative_sts_ext.png").exists()
    assert "sts_ext" not in set(pd.read_csv(output / "tables" / "methods.csv")["group"])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["patients"] == 2 and summary["data_version"].startswith("files:")
    # A fourth run on the same data recomputes nothing and scores nothing again.
    fourth = infer.run(infer.infer_request(infer.parse_args(_argv((root, study[1], data2), output))))
    assert fourth.computed == [] and fourth.rescored == []


def test_a_truncated_checkpoint_is_refused_before_any_actor_starts(study, tmp_path, capsys):
    import shutil

    _, checkpoint, data = study
    damaged = tmp_path / "ckpt"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert infer.main(["--checkpoint", str(damaged), "--data", str(data), "--output",
                       str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: the checkpoint is damaged" in err and "Traceback" not in err


def test_data_preprocessed_otherwise_are_refused_before_any_actor_starts(study, test_config,
                                                                          tmp_path, capsys,
                                                                          monkeypatch):
    """Slices made with other settings than the checkpoint's training data: exit 2, naming
    dataset.json, the checkpoint and each differing setting (igconda.data.compat)."""
    import shutil

    from igconda.data.compat import settings_record

    _, checkpoint, data = study
    other = tmp_path / "data"
    shutil.copytree(data, other)
    recorded = {**settings_record(test_config.preprocess), "output_size": [32, 32, 10]}
    (other / "dataset.json").write_text(json.dumps({"config": recorded}))
    monkeypatch.setattr(infer, "predict_patients", lambda *a, **k: pytest.fail("actors started"))
    assert infer.main(["--checkpoint", str(checkpoint), "--data", str(other), "--output",
                       str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{other}/dataset.json: the data were preprocessed with other slice settings" in err
    assert f"checkpoint {checkpoint}" in err
    assert "preprocess.output_size: data [32, 32, 10], expected [16, 16, 10]" in err
    assert not (tmp_path / "o").exists()


def test_data_without_dataset_json_are_only_warned_about(study, tmp_path, capsys):
    _, checkpoint, data = study  # make_dataset writes no dataset.json
    # The valid split is missing: the job stops there, after the data check had its say.
    assert infer.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output",
                       str(tmp_path / "o"), "--split", "valid"]) == 2
    captured = capsys.readouterr()
    assert f"{data}: no dataset.json" in captured.err and "no 'valid' split" in captured.err


class _FailingFigure:
    """A figure whose save dies half-way, as on a full disk or a killed process."""

    def savefig(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")


def test_figures_are_saved_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ray_jobs.infer_outputs import save_png

    target = tmp_path / "qualitative_lung.png"
    fig = plt.figure(figsize=(1, 1))
    save_png(fig, target)
    plt.close(fig)
    previous = target.read_bytes()
    assert previous.startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(OSError, match="No space left"):
        save_png(_FailingFigure(), target)
    assert target.read_bytes() == previous  # the previous figure, whole
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file for *.png globs
