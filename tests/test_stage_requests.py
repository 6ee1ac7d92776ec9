"""The pipeline runs each stage on a typed request built from its loaded config (no argv lists,
no stage re-parsing the study's YAML), and each stage's command line resolves the same request
from the same inputs (one resolver per stage). No Ray: the stages' ``run`` are stand-ins that
record their request and write the output the pipeline checks."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

import igconda.config
from igconda.config import load_config
from ray_jobs import infer, pipeline, preprocess, train, tune
from tests.helpers import make_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test.yaml"
TUNED = {"noise_level": 6, "guidance_scale": 2.0, "stride": 2, "map_kind": "guidance",
         "threshold": 0.04, "thresholds": {"igconda_guidance": 0.04, "intensity": 0.3},
         "mean_dsc": 0.5}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One pipeline run (cohorts → infer) with every stage's ``run`` replaced; returns the
    study folder, what each stage was called with, and how often each YAML file was parsed."""
    root = tmp_path_factory.mktemp("requests")
    output = root / "study"
    requests: dict[str, object] = {}
    parsed: Counter[str] = Counter()
    read_config_file = igconda.config.read_config_file

    def write(relative: str, text: str = "{}") -> Path:
        path = output / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def fake_preprocess(request):
        requests["preprocess"] = request
        write("data/dataset.json")
        return object()

    def fake_train(request):
        requests["train"] = request
        return make_checkpoint(Path(request.output) / "best", request.config)

    def fake_tune(request):
        requests["tune"] = request
        write("tune/best.json", json.dumps(TUNED))

    def fake_infer(request):
        requests["infer"] = request
        write("infer/summary.json", "{}")

    def no_argv(*args, **kwargs):
        raise AssertionError("a stage was run on an argv list")

    def counted(path):
        parsed[str(Path(path).resolve())] += 1
        return read_config_file(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for job, fake in ((preprocess, fake_preprocess), (train, fake_train), (tune, fake_tune),
                          (infer, fake_infer)):
            mp.setattr(job, "run", fake)
            mp.setattr(job, "parse_args", no_argv)  # no stage parses a command line
        mp.setattr(preprocess, "summary_to_dict", lambda summary: {})
        mp.setattr(igconda.config, "read_config_file", counted)
        mp.setattr(pipeline.console, "init_ray", lambda *a, **k: None)  # the fakes need no Ray
        mp.setattr("igconda.data.phantoms.generate_study",
                   lambda folder, config: write("cohorts/manifest.csv"))
        mp.setattr("igconda.tracking.model.log_dataset", lambda *a, **k: None)
        mp.setattr("igconda.tracking.model.log_model_folder", lambda *a, **k: None)
        mp.setattr(pipeline.tracking, "log_artifact", lambda *a, **k: None)
        assert pipeline.main(["--config", str(CONFIG), "--output", str(output), "--num-workers",
                              "1", "--stop-after", "infer",
                              "--tracking-uri", str(root / "mlruns.db")]) == 0
    return output.resolve(), requests, parsed


def test_the_pipeline_runs_each_stage_on_its_request_from_the_loaded_config(study):
    output, requests, parsed = study
    assert set(requests) == {"preprocess", "train", "tune", "infer"}
    config = load_config(CONFIG)
    pre, tr, tu, inf = (requests[s] for s in ("preprocess", "train", "tune", "infer"))
    assert isinstance(pre, preprocess.PreprocessRequest) and pre.config == config
    assert (pre.manifest, pre.output) == (str(output / "cohorts" / "manifest.csv"),
                                          str(output / "data"))
    # The pipeline's config object itself, not a copy parsed again per stage.
    assert tu.study is pre.config
    assert isinstance(tr, train.TrainRequest) and tr.config == config.replace("train", num_workers=1)
    assert tr.config_file == str(CONFIG) and not tr.resume
    assert tr.torch_threads == max(1, (os.cpu_count() or 1) // 1)  # local CPU: every core
    assert isinstance(tu, tune.TuneRequest) and tu.checkpoint == str(output / "train" / "best")
    assert tu.checkpoint_config == config.replace("train", num_workers=1)  # the checkpoint's
    assert isinstance(inf, infer.InferRequest) and inf.output == str(output / "infer")
    s = inf.settings
    assert (s.noise_level, s.guidance_scale, s.stride, s.map_kind, s.threshold) == \
        (6, 2.0, 2, "guidance", 0.04)  # the tuned file
    # Every self-logging stage logs under the study's parent run, to the study's store.
    parents = {r.parent_run_id for r in (tr, tu, inf)}
    assert len(parents) == 1 and None not in parents
    assert len({r.tracking_uri for r in (tr, tu, inf)}) == 1
    # Each YAML parsed once: the study config by the pipeline, the checkpoint's config once
    # by tuning and once by inference (each stage's resolver hands it to its checks).
    assert parsed[str(CONFIG.resolve())] == 1
    assert parsed[str(output / "train" / "best" / "config.yaml")] == 2


def _common(request) -> list[str]:
    return ["--tracking-uri", request.tracking_uri, "--experiment", request.experiment,
            "--parent-run-id", request.parent_run_id]


def test_preprocess_cli_and_pipeline_give_the_same_request(study):
    _, requests, _ = study
    request = requests["preprocess"]
    cli = preprocess.preprocess_request(preprocess.parse_args([
        "--manifest", request.manifest, "--output", request.output, "--config", str(CONFIG)]))
    assert cli == request


def test_train_cli_and_pipeline_give_the_same_request(study):
    _, requests, _ = study
    request = requests["train"]
    cli = train.train_request(train.parse_args([
        "--data", request.data, "--output", request.output, "--config", str(CONFIG),
        "--num-workers", "1", "--torch-threads", str(request.torch_threads),
        *_common(request)]))
    assert cli == request


def test_tune_cli_and_pipeline_give_the_same_request(study):
    _, requests, _ = study
    request = requests["tune"]
    cli = tune.tune_request(tune.parse_args([
        "--checkpoint", request.checkpoint, "--data", request.data, "--output", request.output,
        "--config", str(CONFIG), *_common(request)]))
    assert cli == request


def test_infer_cli_and_pipeline_give_the_same_request(study):
    output, requests, _ = study
    request = requests["infer"]
    cli = infer.infer_request(infer.parse_args([
        "--checkpoint", request.checkpoint, "--data", request.data, "--output", request.output,
        "--config", str(CONFIG), "--tuned", str(output / "tune" / "best.json"),
        *_common(request)]))
    assert cli == request
    assert cli.settings.thresholds == request.settings.thresholds  # not part of ==


def test_tuning_and_inference_read_the_checkpoints_config_once(tmp_path, test_config,
                                                               monkeypatch):
    """Resolver and the driver's checks before Ray (checkpoint files, data against the
    checkpoint's training data) share one parse of the checkpoint's ``config.yaml``."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    parsed: Counter[str] = Counter()
    read_config_file = igconda.config.read_config_file

    def counted(path):
        parsed[Path(path).name] += 1
        return read_config_file(path)

    monkeypatch.setattr(igconda.config, "read_config_file", counted)
    common = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--output",
              str(tmp_path / "out")]
    assert tune.check_inputs(tune.tune_request(tune.parse_args(common))) is not None  # no json
    assert parsed == {"config.yaml": 1}
    parsed.clear()
    # Refused before Ray (no test split), after the checkpoint and data checks.
    with pytest.raises(infer.InferError, match="no 'test' split"):
        infer.run(infer.infer_request(infer.parse_args(common)))
    assert parsed == {"config.yaml": 1}
