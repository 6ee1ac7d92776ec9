"""The study-level benchmarks' own logic: arms parsed right, seeds aggregated, targets checked."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arm_overrides_are_typed_and_nested():
    bench = _load("bench_condition")
    name, overrides = bench.parse_arm("ce=model.conditioning=class_embedding,train.max_timestep=500")
    assert name == "ce"
    assert overrides == {"model": {"conditioning": "class_embedding"}, "train": {"max_timestep": 500}}
    assert bench.parse_arm("paper=") == ("paper", {})


def test_condition_bench_refuses_test_split(tmp_path):
    bench = _load("bench_condition")
    with pytest.raises(SystemExit, match="test"):
        bench.main(["--data", str(tmp_path), "--config", "configs/test.yaml", "--output", str(tmp_path),
                    "--arm", "a=", "--splits", "tune,test"])


def _runs(gain: float, gap: float) -> pd.DataFrame:
    """Two seeds, two cohorts and the pooled row; chosen = w0 + gain, threshold = chosen − gap."""
    rows = []
    for seed, group in itertools.product((0, 1), ("lung", "psma", "internal (all)")):
        base = 0.3 + 0.01 * seed
        values = {"chosen": base + gain, "control": base, "igconda_abs": base, "igconda_w0": base,
                  "intensity": base + gain - 0.01, "threshold_41": base + gain - gap}
        for method, value in values.items():
            rows.append({"seed": seed, "group": group, "method": method, "dsc_max_mean": value,
                         "dice_tau_mean": value / 2, "auprc_mean": value})
    return pd.DataFrame(rows)


def test_seed_targets_say_met_and_not_met():
    bench = _load("bench_seeds")
    met = bench.targets(_runs(gain=0.12, gap=0.2))
    assert "+12.0, +12.0" in met[0] and met[0].endswith("met") and "NOT" not in met[0]
    assert "NOT" not in met[1]
    assert "on 2 of 2 cohorts" in met[2]
    missed = bench.targets(_runs(gain=0.05, gap=0.1))
    assert missed[0].endswith("NOT met") and missed[1].endswith("NOT met")


def test_seed_summary_mean_and_spread():
    bench = _load("bench_seeds")
    summary = bench.summarize(_runs(gain=0.1, gap=0.2))
    row = summary[(summary["group"] == "lung") & (summary["method"] == "igconda_w0")].iloc[0]
    assert row["dsc_max_mean_seeds_mean"] == pytest.approx(0.305)
    assert row["dsc_max_mean_seeds_std"] == pytest.approx(0.005)
    assert "| lung |" in bench.markdown(summary)
