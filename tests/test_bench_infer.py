"""benchmarks/bench_infer.py's plain path runs the job's actor class over every slice."""

from pathlib import Path

from tests.helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_plain_loop_writes_every_slice_as_parts(tmp_path, one_torch_thread):
    bench = load_benchmark("bench_infer")
    checkpoint, folder = bench.make_inputs(tmp_path, REPO / "configs" / "test.yaml", slices=10, patients=3)
    kwargs = {"noise_level": 4, "guidance_scale": 3.0, "stride": 2, "device": "cpu",
              "keep_inputs": True, "score": False}
    timing = bench.plain_loop(checkpoint, folder, kwargs, batch_size=4, threads=1, parts=tmp_path / "parts")
    assert timing["slices"] == 10
    assert 0 < timing["first_batch_s"] <= timing["seconds"]
    assert timing["slices_per_s"] > 0
    written = sorted(p.parent.name for p in (tmp_path / "parts").glob("*/*.parquet"))
    assert sorted(set(written)) == ["P000", "P001", "P002"]
