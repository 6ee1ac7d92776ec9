"""benchmarks/bench_precision.py runs every path and leaves the model as igconda builds it."""

from pathlib import Path

from tests.helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
bench_precision = load_benchmark("bench_precision")


def test_bench_precision_times_every_path(capsys, one_torch_thread):
    assert bench_precision.main(["--config", str(REPO / "configs" / "test.yaml"), "--batch-size", "2",
                                 "--rounds", "1", "--repeats", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("  ")[0] for line in lines[1:]]
    assert names == ["forward fp32", "forward bfloat16", "train step fp32", "train step bfloat16 (igconda)",
                     "train step bfloat16, MONAI attention"]
    assert all("fp32 / this" in line and line.rstrip().endswith("x") for line in lines[1:])
