"""benchmarks/bench_infer_memory.py's pieces: the replicated cohort (new patient ids, every
slice copied) and a checkpoint the inference job accepts for that data."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tests.helpers import load_benchmark, make_dataset


def test_the_cohort_is_replicated_under_new_ids_with_a_matching_checkpoint(tmp_path, test_config):
    from igconda.config import to_plain
    from igconda.data.compat import check_data_for_checkpoint

    bench = load_benchmark("bench_infer_memory")
    data = make_dataset(tmp_path / "data", test_config,
                        {"P1": ("lung", "internal"), "P2": ("lymphoma", "internal")})
    (data / "dataset.json").write_text(json.dumps({"config": to_plain(test_config.to_dict()["preprocess"])}))
    rows = sum(pq.read_metadata(f).num_rows for f in (data / "slices" / "test").glob("*.parquet"))
    copies = bench.replicate(data, tmp_path / "x3", 3, "test")
    assert copies == 3 * rows
    files = sorted((tmp_path / "x3" / "slices" / "test").glob("*.parquet"))
    assert [f.stem for f in files] == [f"P{i}_c{j}" for i in (1, 2) for j in range(3)]
    for f in files:
        assert set(pq.read_table(f, columns=["patient_id"]).column(0).to_pylist()) == {f.stem}
    checkpoint = bench.tiny_checkpoint(tmp_path / "x3", tmp_path / "ckpt")
    assert check_data_for_checkpoint(tmp_path / "x3", checkpoint) is None  # same slice settings
