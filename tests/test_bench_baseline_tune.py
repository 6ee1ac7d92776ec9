"""benchmarks/bench_baseline_tune.py on a tiny classifier: one line per explained stage, on the
tune split's unhealthy slices only."""

from __future__ import annotations

import re

import pytest

from igconda.baselines.resnet_classifier import ClassifierConfig, build_classifier, save_classifier
from tests.helpers import load_benchmark, make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_stage_is_scored_on_the_unhealthy_tune_slices(tmp_path, test_config, capsys):
    data = make_dataset(tmp_path / "data", test_config, {"P1": ("lung", "internal")}, split="tune")
    (data / "dataset.json").write_text("{}")  # read_split wants a complete dataset folder
    bench = load_benchmark("bench_baseline_tune")
    unhealthy = len(bench.unhealthy_batch(str(data), "tune")["image"])
    assert unhealthy > 0
    config = ClassifierConfig(widen_factor=0.125)
    folder = save_classifier(tmp_path / "clf", build_classifier(widen_factor=0.125).eval(), config)
    bench.main(["--method", "hirescam", "--checkpoint", str(folder), "--data", str(data),
                "--layers", "layer3,layer4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["hirescam layer3", "hirescam layer4"]
    for line in lines:
        assert f"{unhealthy} unhealthy tune slices" in line
        dsc, ap = map(float, re.search(r"⌈DSC⌉ ([\d.]+), mean AUPRC ([\d.]+)", line).groups())
        assert 0 <= dsc <= 1 and 0 <= ap <= 1
