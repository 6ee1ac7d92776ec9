"""benchmarks/bench_reference.py on a tiny checkpoint: both paths run on the same slices, in seconds."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark, make_checkpoint, make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_benchmark_compares_both_paths_on_the_same_slices(tmp_path, test_config, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config,
                        {"P1": ("lung", "internal"), "P2": ("lymphoma", "internal")})
    (data / "dataset.json").write_text("{}")  # read_split wants a complete dataset folder
    out = tmp_path / "result.json"
    code = load_benchmark("bench_reference").main(["--checkpoint", str(checkpoint), "--data", str(data), "--slices", "6",
                          "--batch", "4", "--ref-noise-level", "4", "--matmul-size", "128",
                          "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    ref, ours = result["reference"], result["igconda"]
    # The tiny config: igconda at D = 4, s = 2, w = 3 (4·D/s = 8), the reference at D = 4, s = 1 (3·D).
    assert (ref["evals_per_slice"], ours["evals_per_slice"]) == (12, 8)
    # igconda's path runs in bf16 where this CPU has the units (igconda.precision), the
    # reference always in float32.
    from igconda.precision import autocast_dtype

    assert (ours["noise_level"], ours["stride"]) == (4, 2)
    assert ours["autocast"] == str(autocast_dtype("cpu")) and ref["autocast"] == "None"
    assert result["slices"] >= 4
    assert ref["calibration"] == ours["calibration"] == "patients"
    for row in (ref, ours):
        for key in ("dsc_max", "auprc", "dice_tau"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["slices_per_s"] > 0 and row["gflops"] > 0 and len(row["taus"]) == 2
    ratios = result["igconda_over_reference"]
    assert ratios["slices_per_s"] == pytest.approx(ours["slices_per_s"] / ref["slices_per_s"])
    assert ratios["evals_per_slice"] == pytest.approx(8 / 12)
    assert ratios["auprc_difference"] == pytest.approx(ours["auprc"] - ref["auprc"])
    assert result["flops_per_evaluation"] > 0 and result["fp32_matmul_gflops"] > 0 and result["bf16_matmul_gflops"] > 0
    assert ref["matmul_peak_gflops"] == result["fp32_matmul_gflops"]  # the reference runs fp32
    assert ours["matmul_peak_gflops"] in (result["fp32_matmul_gflops"], result["bf16_matmul_gflops"])
    assert "igconda / reference" in capsys.readouterr().out


def test_reference_loop_equals_igconda_at_stride_one(tmp_path, test_config):
    """At s = 1, D, w and the map 'abs' alike, both loops are the same DDIM: the same maps."""
    import numpy as np

    bench = load_benchmark("bench_reference")
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    images = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    from igconda.checkpoint import load_model

    model, config = load_model(checkpoint)
    ref = bench.reference_maps(model, config, images, noise_level=4, w=3.0, batch=2)
    # float32 on both paths (amp off): the same maths, whatever this CPU's bf16 units.
    ours, _, _ = bench.igconda_maps(checkpoint, images, 2, amp=False, noise_level=4, stride=1,
                                    guidance_scale=3.0, map_kind="abs")
    np.testing.assert_allclose(ours, ref, atol=1e-5)
