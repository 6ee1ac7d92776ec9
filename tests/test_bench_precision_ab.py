"""benchmarks/bench_precision_ab.py on the tiny config: both arms trained, evaluated and tabled."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.helpers import load_benchmark, make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATIENTS = {"P1": ("lung", "internal"), "P2": ("lymphoma", "internal")}


@pytest.fixture(scope="module")
def data(tmp_path_factory, test_config):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, test_config, PATIENTS, split="train")
    return make_dataset(root, test_config, {"P3": ("lung", "internal")}, split="tune")


def test_both_arms_train_and_score_with_paired_differences(tmp_path, data, repo_root, monkeypatch):
    # bf16 forced (emulated where the CPU has no bf16 units): the arms must differ in precision.
    monkeypatch.setenv("IGCONDA_CPU_BF16", "1")
    bench = load_benchmark("bench_precision_ab")
    runs, summary = bench.run(repo_root / "configs" / "test.yaml", data, seeds=[0, 1], steps=3, chunk=2,
                              output=tmp_path / "ab", max_slices=4)
    assert sorted(zip(runs["seed"], runs["arm"], strict=True)) == [(0, "bf16"), (0, "fp32"), (1, "bf16"), (1, "fp32")]
    assert set(runs.loc[runs["arm"] == "bf16", "dtype"]) == {"torch.bfloat16"}
    assert set(runs.loc[runs["arm"] == "fp32", "dtype"]) == {"None"}
    assert (runs["steps"] == 3).all()
    for column in (*bench.TRAINING, *bench.METRICS):
        assert runs[column].map(math.isfinite).all(), column
    assert runs["gain"].to_numpy() == pytest.approx((runs["dsc"] - runs["dsc_control"]).to_numpy())
    # The two arms' models differ (precision changed the training), the seeds' too.
    assert runs["valid_loss"].nunique() == 4
    # The difference row is the mean of the paired per-seed differences.
    rows = summary.set_index("arm")
    wide = runs.pivot(index="seed", columns="arm", values="valid_loss")
    assert rows.loc["bf16 − fp32", "valid_loss_mean"] == pytest.approx((wide["bf16"] - wide["fp32"]).mean())
    assert rows.loc["fp32", "seeds"] == 2 and math.isfinite(rows.loc["bf16 − fp32", "dsc_std"])
    written = pd.read_csv(tmp_path / "ab" / "runs.csv")
    assert len(written) == 4
    table = (tmp_path / "ab" / "summary.md").read_text()
    assert "| fp32 |" in table and "| bf16 |" in table and "| bf16 − fp32 |" in table

    # A second run re-evaluates the saved checkpoints: the same numbers, no training.
    monkeypatch.setattr(bench, "train_pair", lambda *a, **k: pytest.fail("retrained"))
    again, _ = bench.run(repo_root / "configs" / "test.yaml", data, seeds=[0, 1], steps=3, chunk=2,
                         output=tmp_path / "ab", max_slices=4)
    assert again["valid_loss"].tolist() == runs["valid_loss"].tolist()


def test_held_out_loss_uses_the_same_draws_for_every_checkpoint(tmp_path, data, repo_root, monkeypatch):
    """The held-out loss is a function of the weights only: not of the checkpoint's train.seed."""
    monkeypatch.setenv("IGCONDA_CPU_BF16", "1")
    bench = load_benchmark("bench_precision_ab")
    trained = bench.train_pair(repo_root / "configs" / "test.yaml", data, steps=1, seed=3, output=tmp_path)
    checkpoint = trained["fp32"]["checkpoint"]
    first = bench.held_out_loss(checkpoint, data, "tune", eval_seed=0)
    assert bench.held_out_loss(checkpoint, data, "tune", eval_seed=0) == first
    assert bench.held_out_loss(checkpoint, data, "tune", eval_seed=1) != first


def test_refuses_when_both_arms_would_be_fp32(tmp_path, data, repo_root, monkeypatch):
    monkeypatch.setenv("IGCONDA_CPU_BF16", "0")
    bench = load_benchmark("bench_precision_ab")
    with pytest.raises(SystemExit, match="IGCONDA_CPU_BF16=1"):
        bench.train_pair(repo_root / "configs" / "test.yaml", data, steps=1, seed=0, output=tmp_path)


def test_test_split_is_refused(tmp_path, data, repo_root):
    bench = load_benchmark("bench_precision_ab")
    with pytest.raises(SystemExit, match="test"):
        bench.run(repo_root / "configs" / "test.yaml", data, seeds=[0], steps=1, output=tmp_path, split="test")
