"""The comparison study runs every job (the pipeline's data step, IgCONDA's and the DPM's
trainings and tunings, the baselines, the scorings, the comparison) on a typed request built
from its loaded config, never on an argv, and each job's command line resolves the same request
from the same inputs (one resolver per job). No Ray: every job's ``run`` is a stand-in that
records its request and writes the output the study checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import igconda.config
from igconda import checkpoint as ckpt
from igconda.config import load_config, save_config
from ray_jobs import (
    compare,
    comparison_study,
    pipeline,
    score_method,
    train,
    train_baseline,
    tune,
)
from tests.helpers import make_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test.yaml"
TUNED = {"noise_level": 6, "guidance_scale": 2.0, "stride": 2, "map_kind": "guidance",
         "threshold": 0.04, "thresholds": {"igconda_guidance": 0.04}, "mean_dsc": 0.5}
DPM_CG_TUNED = {"noise_level": 4, "scale": 2.0, "stride": 2}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One comparison (variant 01, baselines hirescam and dpm_cg with its (D, scale) search)
    with every job's ``run`` replaced; returns the study folder, the requests each job was
    called with and how often each YAML file was parsed."""
    root = tmp_path_factory.mktemp("comparison_requests")
    config_file = root / "study.yaml"
    # A dpm_cg grid, so that the DPM + CG tuning and its tuned scoring run too.
    save_config(load_config(CONFIG).replace("baselines", dpm_cg_noise_levels=(4,),
                                            dpm_cg_scales=(2.0,)), config_file)
    output = root / "comparison"
    requests: dict[str, list] = {}
    parsed: Counter[str] = Counter()
    read_config_file = igconda.config.read_config_file

    def recorded(name: str, request) -> None:
        requests.setdefault(name, []).append(request)

    def fake_pipeline(request):
        recorded("pipeline", request)
        data = Path(request.output) / "data"
        data.mkdir(parents=True)
        (data / "dataset.json").write_text('{"created": 1}')
        return 0

    def fake_train(request):
        recorded("train", request)
        return make_checkpoint(Path(request.output) / "best", request.config)

    def fake_tune(request):
        recorded("tune", request)
        best = DPM_CG_TUNED if request.method == "dpm_cg" else TUNED
        Path(request.output).mkdir(parents=True, exist_ok=True)
        (Path(request.output) / "best.json").write_text(json.dumps(best))

    def fake_baseline(request):
        recorded("train_baseline", request)
        best = Path(request.output) / ckpt.BEST_DIR
        best.mkdir(parents=True)
        (best / "model.safetensors").write_bytes(request.method.encode())
        (Path(request.output) / ckpt.BEST_POINTER).write_text("{}")
        return best

    def fake_score(request):
        recorded("score_method", request)
        return {}

    def fake_compare(request):
        recorded("compare", request)
        return {}

    def no_argv(*args, **kwargs):
        raise AssertionError("a job was run on an argv list")

    def counted(path):
        parsed[str(Path(path).resolve())] += 1
        return read_config_file(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for job, fake in ((pipeline, fake_pipeline), (train, fake_train), (tune, fake_tune),
                          (train_baseline, fake_baseline), (score_method, fake_score),
                          (compare, fake_compare)):
            mp.setattr(job, "run", fake)
            mp.setattr(job, "parse_args", no_argv)  # no job parses a command line
        mp.setattr(igconda.config, "read_config_file", counted)
        mp.setattr(comparison_study, "init_ray", lambda *a, **k: None)  # the fakes need no Ray
        assert comparison_study.main([
            "--config", str(config_file), "--output", str(output), "--variants", "01",
            "--baselines", "hirescam,dpm_cg", "--num-workers", "1",
            "--tracking-uri", str(root / "mlruns.db")]) == 0
    return output.resolve(), config_file, requests, parsed


def test_the_comparison_runs_every_job_on_a_request_from_its_loaded_config(study):
    output, config_file, requests, parsed = study
    assert {name: len(made) for name, made in requests.items()} == {
        "pipeline": 1, "train": 2, "tune": 2, "train_baseline": 2, "score_method": 6,
        "compare": 1}
    (data,) = requests["pipeline"]
    assert isinstance(data, pipeline.PipelineRequest) and data.stop_after == "preprocess"
    assert data.config == load_config(config_file)
    assert [r.method for r in requests["train_baseline"]] == ["hirescam", "dpm_classifier"]
    assert all(isinstance(r, train_baseline.BaselineRequest) and r.config.train.num_workers == 1
               for r in requests["train_baseline"])
    scored = {(r.method, r.variant): r for r in requests["score_method"]}
    assert set(scored) == {("igconda", "01"), ("igconda_control", "01"), ("threshold_41", ""),
                           ("intensity", ""), ("hirescam", ""), ("dpm_cg", "")}
    # The tuned (D, scale) of the DPM + CG search is in the scoring's config.
    dpm_cg = scored["dpm_cg", ""]
    assert (dpm_cg.config.baselines.dpm_cg_noise_level, dpm_cg.config.baselines.dpm_cg_scale) \
        == (4, 2.0)
    (table,) = requests["compare"]
    assert isinstance(table, compare.CompareRequest) and table.data_version
    # The study's config parsed once, by the study; no job parsed the copies it writes.
    assert parsed[str(config_file.resolve())] == 1
    assert not [p for p in parsed if Path(p).is_relative_to(output / "configs")]


def test_the_scoring_resume_is_keyed_on_the_request(study):
    """A finished scoring is found from its request (no argv parsed to key it)."""
    output, _, requests, _ = study
    request = requests["score_method"][0]
    inputs = score_method.score_inputs(request)
    assert inputs["data_version"] and inputs["config_sha256"]
    folder = Path(request.output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / score_method.SCORES_FILE).write_bytes(b"PAR1")
    (folder / score_method.RUN_RECORD).write_text(json.dumps({"run_id": "r1", "inputs": inputs}))
    assert score_method.finished_run(folder, score_method.score_inputs(request))["run_id"] == "r1"


def _common(request) -> list[str]:
    return ["--tracking-uri", request.tracking_uri, "--experiment", request.experiment]


def test_pipeline_cli_and_comparison_give_the_same_request(study):
    _, _, requests, _ = study
    (request,) = requests["pipeline"]
    cli = pipeline.pipeline_request(pipeline.parse_args([
        "--config", request.config_file, "--output", request.output, "--stop-after",
        "preprocess", *_common(request)]))
    assert cli == request


def test_train_baseline_cli_and_comparison_give_the_same_request(study):
    _, _, requests, _ = study
    for request in requests["train_baseline"]:
        threads = ["--torch-threads", str(request.torch_threads)] if request.torch_threads else []
        cli = train_baseline.baseline_request(train_baseline.parse_args([
            "--method", request.method, "--data", request.data, "--output", request.output,
            "--config", request.config_file, "--num-workers", "1", *threads,
            *_common(request)]))
        assert cli == request, request.method


def test_score_method_cli_and_comparison_give_the_same_request(study):
    _, _, requests, _ = study
    for request in requests["score_method"]:
        paths = [arg for name in ("checkpoint", "checkpoint2", "tuned")
                 if getattr(request, name) for arg in (f"--{name}", getattr(request, name))]
        cli = score_method.score_request(score_method.parse_args([
            "--method", request.method, "--data", request.data, "--output", request.output,
            "--config", request.config_file, "--variant", request.variant, *paths,
            *_common(request)]))
        assert cli == request, request.method
        assert score_method.score_inputs(cli) == score_method.score_inputs(request)


def test_compare_cli_and_comparison_give_the_same_request(study):
    _, _, requests, _ = study
    (request,) = requests["compare"]
    cli = compare.compare_request(compare.parse_args([
        "--output", request.output, "--data-version", request.data_version,
        *_common(request)]))
    assert cli == request
