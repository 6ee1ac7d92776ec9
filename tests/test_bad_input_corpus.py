"""The bad-input corpus (tests/bad_inputs.py): each case refused clearly; the preprocessing job on
good patients mixed with the bad ones loses none and lists every bad one; Ray tasks ask for the
memory their volume needs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from igconda.config import PreprocessConfig
from igconda.data.memory import (
    RESAMPLED_BYTES_PER_VOXEL,
    SOURCE_BYTES_PER_VOXEL,
    preprocess_memory_bytes,
    resampled_voxels,
    too_large,
)
from ray_jobs.preprocess import plan_memory
from tests.bad_input_harness import BARE, run_batch, try_case
from tests.bad_inputs import CASES, main
from tests.data.nifti_fixtures import LPS, write_nifti


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bad_input_is_refused_clearly(case, tmp_path):
    outcome = try_case(case, tmp_path)
    assert outcome.error != "accepted", f"{case.name}: {case.wrong} was accepted"
    assert outcome.error not in {e.__name__ for e in BARE}, f"crashed: {outcome.message}"
    assert not outcome.missing, f"the message lacks {outcome.missing}: {outcome.message}"
    assert outcome.clear, f"expected {case.expected.__name__}, got {outcome.error}: {outcome.message}"


def test_the_corpus_covers_the_issues_cases():
    names = {c.name for c in CASES}
    assert {"ct_as_pet", "same_pet_two_ids", "too_large", "preprocess.valid_fraction=0",
            "tune.stride=0", "truncated_weights", "corrupt_train_state", "resume_other_data",
            "data_other_settings", "detect_overwrites_scan", "igconda.cli --batch-size 0"} <= names
    assert len(names) == len(CASES)  # one record per case


@pytest.mark.ray
def test_the_job_keeps_every_good_patient_and_lists_every_bad_one(ray_session, tmp_path, monkeypatch):
    import ray

    requests = []
    real_map = ray.data.Dataset.map

    def spy(self, fn, *args, **kwargs):
        requests.append(kwargs.get("memory"))
        return real_map(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map", spy)
    batch = run_batch(tmp_path, CASES)
    assert batch.lost == [] and batch.kept == sorted(batch.good)
    assert all(batch.listed.values()), batch.problems
    assert set(batch.listed) == {c.name for c in CASES if c.batch}
    assert len(requests) == 1 and requests[0] > 0  # the tasks asked Ray for memory


def test_report_counts_tried_refused_and_lost(monkeypatch, capsys):
    """``python -m tests.bad_inputs`` prints the table and the totals (its batch job faked)."""
    from tests import bad_input_harness as harness

    def fake_batch(folder, cases):
        listed = {c.name: True for c in cases if c.batch}
        return harness.BatchOutcome(["a", "b"], ["a", "b"], [], listed, {})

    tried = CASES[:2]
    monkeypatch.setattr(harness, "run_batch", fake_batch)
    # No Ray of its own, and the session's (conftest's ray_session) left running for later tests.
    monkeypatch.setattr("ray.init", lambda **_: None)
    monkeypatch.setattr("ray.shutdown", lambda: None)
    monkeypatch.setattr("tests.bad_inputs.CASES", tried)
    assert main() == 0
    out = capsys.readouterr().out
    assert "| case | entry point | refused clearly? | good patients lost |" in out
    assert "Tried: 2; refused clearly: 2; good patients lost: 0 (of 2 good patients" in out


# ---- memory per task ---------------------------------------------------------------------------

def _header_only(path, shape, zooms=(2.0, 2.0, 2.0), dtype=np.float32):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    affine = np.diag([*zooms, 1.0])
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4)
    return path


def test_memory_is_estimated_from_the_header(tmp_path):
    config = PreprocessConfig(spacing_mm=(2.0, 2.0, 3.0))
    pet = _header_only(tmp_path / "p.nii", (200, 200, 150))
    resampled = 200 * 200 * 100  # 150 slices of 2 mm at 3 mm
    assert resampled_voxels((200, 200, 150), np.diag([2.0, 2.0, 2.0, 1.0]), (2.0, 2.0, 3.0)) == resampled
    expected = 200 * 200 * 150 * (4 + SOURCE_BYTES_PER_VOXEL) + resampled * RESAMPLED_BYTES_PER_VOXEL
    assert preprocess_memory_bytes(pet, None, config) == expected
    mask = _header_only(tmp_path / "m.nii", (200, 200, 150), dtype=np.uint8)
    assert preprocess_memory_bytes(pet, mask, config) == expected + 200 * 200 * 150
    # int16 files decode to fewer bytes; a coarser source grows when resampled finer.
    assert preprocess_memory_bytes(_header_only(tmp_path / "i.nii", (200, 200, 150), dtype=np.int16),
                                   None, config) == expected - 2 * 200 * 200 * 150
    coarse = _header_only(tmp_path / "c.nii", (200, 200, 150), zooms=(4.0, 4.0, 4.0))
    assert preprocess_memory_bytes(coarse, None, config) > 4 * expected
    assert preprocess_memory_bytes(tmp_path / "missing.nii", None, config) == 0  # the task says why


def test_the_axes_follow_the_orientation():
    """A volume stored with z first still resamples z to spacing_mm[2]."""
    affine = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    assert resampled_voxels((10, 20, 30), affine, (2.0, 2.0, 1.0)) == 30 * 20 * 30


def test_a_volume_no_node_holds_is_refused_naming_the_file_and_the_rest_run(tmp_path):
    small = write_nifti(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.float32), LPS)
    big = _header_only(tmp_path / "big.nii", (2048, 2048, 1024))
    items = [{"patient_id": p, "pet_path": str(f), "mask_path": ""} for p, f in (("s", small), ("b", big))]
    config = PreprocessConfig()
    run, refused, request = plan_memory(items, config, capacity=2 ** 30)
    assert [i["patient_id"] for i in run] == ["s"]
    assert request == preprocess_memory_bytes(small, None, config)
    (result,) = refused
    assert result["patient_id"] == "b" and not result["ok"] and result["file"] == str(big)
    assert "GiB" in result["problem"] and "crop or downsample" in result["problem"]
    assert too_large(big, 10, 0) is None  # no node reports memory: nothing refused
