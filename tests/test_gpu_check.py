"""benchmarks/gpu_check.sh --dry-run: the GPU script's steps on CPU, tiny sizes, every file written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          env=env, capture_output=True, text=True, timeout=500)
    logs = "".join((out / name).read_text() for name in ("gpu_tests.log", "bench_gpu.log")
                   if (out / name).is_file())
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert (out / "status.txt").read_text().split() == ["gpu_tests", "0", "bench_gpu", "0"]

    # The GPU tests were collected and, without a GPU, all skipped (none passed, none failed).
    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 4 and int(suite.get("skipped")) == int(suite.get("tests"))
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0

    env_json = json.loads((out / "env.json").read_text())
    assert env_json["dry_run"] is True and env_json["device"] == "cpu"
    assert env_json["compile_backend"] == "eager"  # dynamo tracing only: inductor's CPU codegen takes minutes
    flops = json.loads((out / "flops.json").read_text())["test"]
    assert flops["forward_flops"] > 0 and 2.5 < flops["train_flops_per_sample"] / flops["forward_flops"] < 3.1
    assert json.loads((out / "matmul.json").read_text())["fp32_tflops"] > 0

    infer = list(csv.DictReader((out / "inference.csv").open()))
    assert [(r["precision"], r["mode"]) for r in infer] == [
        ("fp32", "eager"), ("fp32", "graphs"), ("bfloat16", "eager"), ("bfloat16", "graphs"),
        ("bfloat16", "compile"), ("bfloat16", "compile+graphs")]
    assert all(r["status"] == "ok" and float(r["evals_per_s"]) > 0 for r in infer)
    assert [r["applies"] for r in infer if "graphs" in r["mode"] and "compile" not in r["mode"]] == ["False"] * 2
    evals = float(infer[0]["evals_per_s"])
    assert float(infer[0]["tflops"]) == pytest.approx(evals * flops["forward_flops"] / 1e12)
    train = list(csv.DictReader((out / "training.csv").open()))
    assert len(train) == 3 and all(r["status"] == "ok" and float(r["samples_per_s"]) > 0 for r in train)
    assert "## Inference" in (out / "summary.md").read_text()
