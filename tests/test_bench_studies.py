"""The study-level benchmarks' own logic: arms parsed right, seeds aggregated, targets checked."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import load_benchmark


def test_arm_overrides_are_typed_and_nested():
    bench = load_benchmark("bench_condition")
    name, overrides = bench.parse_arm("ce=model.conditioning=class_embedding,train.max_timestep=500")
    assert name == "ce"
    assert overrides == {"model": {"conditioning": "class_embedding"}, "train": {"max_timestep": 500}}
    assert bench.parse_arm("paper=") == ("paper", {})


def test_condition_bench_refuses_test_split(tmp_path):
    bench = load_benchmark("bench_condition")
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
    bench = load_benchmark("bench_seeds")
    met = bench.targets(_runs(gain=0.12, gap=0.2))
    assert "+12.0, +12.0" in met[0] and met[0].endswith("met") and "NOT" not in met[0]
    assert "NOT" not in met[1]
    assert "on 2 of 2 cohorts" in met[2]
    missed = bench.targets(_runs(gain=0.05, gap=0.1))
    assert missed[0].endswith("NOT met") and missed[1].endswith("NOT met")


def test_seed_summary_mean_and_spread():
    bench = load_benchmark("bench_seeds")
    summary = bench.summarize(_runs(gain=0.1, gap=0.2))
    row = summary[(summary["group"] == "lung") & (summary["method"] == "igconda_w0")].iloc[0]
    assert row["dsc_max_mean_seeds_mean"] == pytest.approx(0.305)
    assert row["dsc_max_mean_seeds_std"] == pytest.approx(0.005)
    assert "| lung |" in bench.markdown(summary)


def test_label_chosen_pairs_each_kind_with_its_own_sign_of_control():
    bench = load_benchmark("bench_seeds")
    table = pd.DataFrame({"method": ["igconda_hot", "igconda_abs", "igconda_w0", "igconda_w0_hot"],
                          "group": "lung", "dsc_max_mean": [0.4, 0.3, 0.2, 0.1]})
    labelled = bench.label_chosen(table, "hot").set_index("method")["dsc_max_mean"]
    assert labelled["chosen"] == 0.4 and labelled["control"] == 0.1
    labelled = bench.label_chosen(table, "abs").set_index("method")["dsc_max_mean"]
    assert labelled["chosen"] == 0.3 and labelled["control"] == 0.2


def test_training_milestones_save_a_checkpoint_per_budget(tmp_path, test_config, one_torch_thread):
    from igconda.checkpoint import load_metadata, load_weights
    from tests.helpers import make_dataset

    bench = load_benchmark("bench_condition")
    data = make_dataset(tmp_path / "data", test_config,
                        {"P1": ("lung", "internal"), "P2": ("psma", "internal")}, split="train")
    folders = {2: tmp_path / "s2", 4: tmp_path / "s4"}
    rate = bench.train_milestones(Path("configs/test.yaml"), {}, data, folders, seed=0)
    assert rate > 0
    assert [load_metadata(f)["steps"] for f in folders.values()] == [2, 4]
    early, late = (load_weights(f / "model.safetensors") for f in folders.values())
    assert any((early[k] != late[k]).any() for k in early)  # steps 3-4 changed the weights


def test_budget_scores_test_slices_with_the_tuned_settings(tmp_path, test_config, checkpoint,
                                                           one_torch_thread):
    from tests.helpers import make_dataset

    bench = load_benchmark("bench_budget")
    data = make_dataset(tmp_path / "data", test_config,
                        {"P1": ("lung", "internal"), "P2": ("psma", "internal")})
    batch = bench.test_slices(data)
    assert len(batch["image"]) > 0 and (batch["label"] == 2).all()  # unhealthy only
    best = {"map_kind": "hot", "noise_level": 4, "stride": 2, "guidance_scale": 3.0,
            "thresholds": {"igconda_hot": 0.3, "intensity": 0.5}}
    summary = bench.score(checkpoint, best, batch)
    pooled = summary[summary["group"] == "internal (all)"].set_index("method")
    assert {"chosen", "control", "igconda_abs", "intensity", "threshold_41"} <= set(pooled.index)
    assert pooled.at["chosen", "dsc_max_mean"] == pooled.at["igconda_hot", "dsc_max_mean"]
    assert pooled.at["control", "dsc_max_mean"] == pooled.at["igconda_w0_hot", "dsc_max_mean"]
    assert pooled.at["chosen", "tau"] == 0.3 and np.isnan(pooled.at["igconda_abs", "dice_tau_mean"])
    curve = summary.assign(steps=10, stride=2, map_kind="hot", D=4, w=3.0)
    assert "| 10 | 2 | hot | 4 | 3 |" in bench.markdown(curve)


def test_budget_refuses_data_without_test_slices(tmp_path):
    bench = load_benchmark("bench_budget")
    with pytest.raises(SystemExit, match="does not exist"):
        bench.test_slices(tmp_path)


def test_budget_plot_and_stride_config(tmp_path):
    bench = load_benchmark("bench_budget")
    config = bench.with_stride(Path("configs/demo.yaml"), 10, tmp_path)
    import yaml

    data = yaml.safe_load(config.read_text())
    assert data["tune"]["stride"] == 10 and data["infer"]["stride"] == 10
    assert data["model"] == yaml.safe_load(Path("configs/demo.yaml").read_text())["model"]
    rows = [{"group": "internal (all)", "method": m, "stride": s, "steps": n, "dsc_max_mean": 0.3}
            for m in ("chosen", "control", "intensity") for s in (10, 50) for n in (1, 2)]
    bench.plot(pd.DataFrame(rows), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_rescore_refuses_a_seed_without_a_model(tmp_path):
    bench = load_benchmark("bench_rescore")
    with pytest.raises(SystemExit, match="no trained model"):
        bench.rescore_seed(tmp_path, 0, Path("configs/demo.yaml"), tmp_path / "out")
