"""The ``igconda`` command line: ``detect`` on a real FDG scan, errors, ``--version``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from igconda.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan(sts_crops) -> tuple[Path, Path]:
    return sts_crops / "images" / "STS_002.nii.gz", sts_crops / "labels" / "STS_002.nii.gz"


def test_detect_on_a_real_scan_writes_a_map_on_its_grid(checkpoint, scan, tmp_path, capsys):
    pet, mask = scan
    out = tmp_path / "maps" / "STS_002_anomaly.nii.gz"
    code = main(["detect", str(pet), "--checkpoint", str(checkpoint), "-o", str(out),
                 "--mask", str(mask), "--device", "cpu", "--batch-size", "7"])
    assert code == 0
    result, source = nib.load(out), nib.load(pet)
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    data = np.asarray(result.dataobj)
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1 + 1e-6 and data.max() > 0
    captured = capsys.readouterr()
    assert "⌈DSC⌉:" in captured.out and "AUPRC:" in captured.out
    assert "slice" in captured.err  # the progress bar and summary go to stderr
    # Off a terminal the bar is plain lines ending at every slice done, not carriage returns.
    assert "\r" not in captured.err
    last = [line for line in captured.err.splitlines() if line.startswith("detect:")][-1]
    done = re.search(r"(\d+)/(\d+) \[", last)
    assert done and done[1] == done[2] and int(done[1]) > 0, last


def test_detect_options_change_the_map(checkpoint, scan, tmp_path):
    pet, _ = scan
    a, b = tmp_path / "abs.nii.gz", tmp_path / "hot.nii.gz"
    base = ["detect", str(pet), "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet",
            "--noise-level", "4", "--stride", "1", "--guidance-scale", "5"]
    assert main([*base, "-o", str(a)]) == 0
    assert main([*base, "-o", str(b), "--map", "hot"]) == 0
    hot, absolute = nib.load(b).get_fdata(), nib.load(a).get_fdata()
    assert (hot <= absolute + 1e-5).all()  # max(x - x̂, 0) <= |x - x̂| (linear resampling keeps it)
    assert np.abs(hot - absolute).max() > 0


@pytest.mark.parametrize("case", ["missing_scan", "corrupt_scan", "missing_checkpoint",
                                  "bad_stride", "bad_output", "bad_device"])
def test_detect_errors_name_the_file_and_exit_2(case, checkpoint, scan, tmp_path, capsys):
    pet, _ = scan
    argv = {"scan": str(pet), "--checkpoint": str(checkpoint), "-o": str(tmp_path / "o.nii.gz")}
    extra: list[str] = []
    named = None
    if case == "missing_scan":
        argv["scan"] = named = str(tmp_path / "nope.nii.gz")
    elif case == "corrupt_scan":
        bad = tmp_path / "bad.nii.gz"
        bad.write_bytes(pet.read_bytes()[:200])
        argv["scan"] = named = str(bad)
    elif case == "missing_checkpoint":
        argv["--checkpoint"] = named = str(tmp_path / "no_ckpt")
    elif case == "bad_stride":
        extra = ["--stride", "3"]
        named = "stride"
    elif case == "bad_device":
        extra = ["--device", "tpu9"]
        named = "tpu9"
    else:
        argv["-o"] = named = str(tmp_path / "o.png")
    code = main(["detect", argv["scan"], "--checkpoint", argv["--checkpoint"], "-o", argv["-o"],
                 "--quiet", *(extra or ["--device", "cpu"])])
    assert code == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_version_and_console_script():
    done = subprocess.run([sys.executable, "-m", "igconda.cli", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("igconda ")


def test_detect_uses_the_model_folders_tuning_and_writes_the_mask_at_tau(checkpoint, scan, tmp_path,
                                                                         capsys):
    from igconda.config import InferConfig
    from igconda.tuned_model import read_tuning, tuned_settings, write_model_folder

    pet, mask = scan
    best = {"noise_level": 4, "guidance_scale": 1.0, "stride": 2, "map_kind": "hot",
            "threshold": 0.02, "thresholds": {"igconda_hot": 0.02}, "mean_dsc": 0.3}
    model = write_model_folder(checkpoint, tuned_settings(best, InferConfig(), {"tuning": "t.json"}),
                               tmp_path / "model")
    assert read_tuning(model)["map_kind"] == "hot" and read_tuning(checkpoint) is None
    out = tmp_path / "a.nii.gz"
    assert main(["detect", str(pet), "--checkpoint", str(model), "-o", str(out), "--quiet",
                 "--device", "cpu", "--mask", str(mask)]) == 0
    captured = capsys.readouterr()
    assert "using tuned settings from" in captured.err
    assert "D=4 w=1 s=2 map=hot τ=0.02" in captured.err
    assert "Dice@τ:" in captured.out
    lesion = nib.load(tmp_path / "a_mask.nii.gz")
    values = np.asarray(lesion.dataobj)
    assert lesion.shape == nib.load(pet).shape and set(np.unique(values)) <= {0, 1}
    # The mask is the map at τ (the map is resampled linearly, the mask by nearest neighbour, so
    # compare where the map is clearly on one side of τ).
    amap = nib.load(out).get_fdata()
    high, low = amap > 0.04, amap < 0.01
    assert high.any() and low.any()
    assert (values[high] == 1).mean() > 0.9 and (values[low] == 0).mean() > 0.9

    # A plain checkpoint says it runs untuned defaults; a flag overrides and is named.
    other = tmp_path / "b.nii.gz"
    assert main(["detect", str(pet), "--checkpoint", str(checkpoint), "-o", str(other), "--quiet",
                 "--device", "cpu", "--threshold", "0.3", "--mask-output",
                 str(tmp_path / "m.nii")]) == 0
    err = capsys.readouterr().err
    assert "UNTUNED defaults" in err and "overridden: threshold" in err and "τ=0.3" in err
    assert (tmp_path / "m.nii").is_file()


@pytest.mark.parametrize("target", ["scan", "mask_output"])
def test_detect_refuses_to_overwrite_the_input_scan(checkpoint, scan, tmp_path, capsys, target):
    pet, _ = scan
    copy = tmp_path / "scan.nii.gz"
    copy.write_bytes(pet.read_bytes())
    before = copy.read_bytes()
    outputs = (["-o", str(copy)] if target == "scan"
               else ["-o", str(tmp_path / "o.nii.gz"), "--mask-output", str(copy)])
    assert main(["detect", str(copy), "--checkpoint", str(checkpoint), *outputs, "--quiet"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert copy.read_bytes() == before
