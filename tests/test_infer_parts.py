"""ray_jobs.infer's per-patient writing from the workers: the predictor actors write each batch's
rows as per-patient parts, a Ray task merges a complete patient's parts into its file, and the
driver only ever receives small records (issue 11: the driver's memory must not grow with the
cohort, so no prediction may reach it)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igconda.data.io import InferOutput
from igconda.data.schema import PREDICTION_SCHEMA
from ray_jobs import infer, infer_patients
from tests.helpers import make_checkpoint, make_dataset

SETTINGS = infer.InferSettings("/ck", 4, 3.0, 2, "abs", "w0123", 0.1)


def predicted(pid: str, slices: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A predictor output of one patient's slices (4 pixels each), random values."""
    n = len(slices)
    columns = {}
    for f in PREDICTION_SCHEMA:
        if pa.types.is_list(f.type):
            columns[f.name] = (rng.integers(0, 2, (n, 4)).astype(np.uint8) if f.name == "mask"
                               else rng.normal(size=(n, 4)).astype(np.float32))
        elif pa.types.is_string(f.type):
            columns[f.name] = np.array([pid] * n, object)
        else:
            columns[f.name] = rng.integers(0, 50, n).astype(f.type.to_pandas_dtype())
    columns["slice_index"] = np.array(slices, np.int32)
    return columns


def rows(columns: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in columns.items()}


def test_parts_merge_into_the_file_written_at_once(tmp_path):
    rng = np.random.default_rng(0)
    p, q = predicted("P", [4, 0, 2, 1, 3, 5, 6], rng), predicted("Q", [1, 0, 2], rng)
    parts = InferOutput(tmp_path).parts
    # Batches as Ray Data may hand them to the actors: patients interleaved, slices unordered.
    batches = [(rows(p, np.array([0, 1])), rows(q, np.array([2]))),
               (rows(q, np.array([0, 1])), rows(p, np.array([5, 2, 3]))),
               (rows(p, np.array([4, 6])),)]
    records = []
    for pieces in batches:
        batch = {k: np.concatenate([piece[k] for piece in pieces]) for k in p}
        out = infer_patients.write_parts(batch, parts)
        assert set(out) == {"patient_id", "slices", "part"}  # no prediction in the records
        records += list(zip(out["patient_id"], out["slices"], out["part"], strict=True))
    assert sum(n for pid, n, _ in records if pid == "P") == 7
    assert sorted(p.name for p in (parts / "P").iterdir()) == ["0-4.parquet", "1-5.parquet",
                                                              "3-6.parquet"]

    merged, whole = tmp_path / "slices" / "P.parquet", tmp_path / "whole" / "P.parquet"
    p_parts = [part for pid, _, part in records if pid == "P"]
    assert infer_patients.merge_parts(p_parts, merged, 7, SETTINGS, "digest") == 7
    infer.write_patient(p, whole, SETTINGS, "digest")
    # The same content as the patient written at once: columns, types, values, stamp.
    assert pq.read_table(merged).equals(pq.read_table(whole), check_metadata=True)
    assert infer.output_is_complete(merged, 7, SETTINGS, "digest")
    assert not (parts / "P").exists() and (parts / "Q").is_dir()  # only the merged ones go
    # Retried after it wrote the file (its node lost): the parts are gone, the file is complete.
    assert infer_patients.merge_parts(p_parts, merged, 7, SETTINGS, "digest") == 7
    with pytest.raises(infer.InferError, match="are gone"):
        infer_patients.merge_parts(p_parts, merged, 7, SETTINGS, "another input")
    q_parts = [part for pid, _, part in records if pid == "Q"]
    with pytest.raises(infer.InferError, match="hold 3 slices, expected 4"):
        infer_patients.merge_parts(q_parts, tmp_path / "slices" / "Q.parquet", 4, SETTINGS, "digest")
    assert [f.name for f in (tmp_path / "slices").glob("*.parquet")] == ["P.parquet"]


@pytest.mark.ray
@pytest.mark.e2e
def test_the_driver_receives_only_small_records(tmp_path, test_config, ray_session, monkeypatch):
    """What the driver's iteration gets from Ray Data: one record per part (patient id, slice
    count, path), never a prediction or an input slice."""
    import ray.data

    patients = {"L1": ("lymphoma", "internal"), "N1": ("lung", "internal")}
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config, patients)
    received: list[dict[str, np.ndarray]] = []
    iter_batches = ray.data.Dataset.iter_batches

    def recorded(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            received.append(batch)
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", recorded)
    output = tmp_path / "out"
    result = infer.run(infer.infer_request(infer.parse_args([
        "--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
        "--tracking-uri", str(tmp_path / "mlruns"), "--batch-size", "4", "--no-volumes"])))
    assert sorted(result.computed) == sorted(patients)

    assert received, "the driver iterated over nothing"
    for batch in received:
        assert set(batch) == {"patient_id", "slices", "part"}
        assert all(np.asarray(v).ndim == 1 for v in batch.values())
        assert batch["slices"].dtype == np.int64
    slices = {pid: pq.read_metadata(data / "slices" / "test" / f"{pid}.parquet").num_rows
              for pid in patients}
    got = {pid: sum(int(n) for b in received for p, n in zip(b["patient_id"], b["slices"],
                                                               strict=True) if p == pid)
           for pid in patients}
    assert got == slices
    assert sum(len(b["part"]) for b in received) > len(patients)  # several parts per patient
    assert not InferOutput(output).parts.exists()  # merged, then removed
    for pid in patients:
        assert infer.output_is_complete(output / "slices" / f"{pid}.parquet", slices[pid],
                                        result.settings,
                                        infer.input_digest(data / "slices" / "test" / f"{pid}.parquet"))


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_the_actor_sets_its_torch_threads(tmp_path, test_config, threads):
    """infer.torch_threads > 0 sets the actor's intra-op threads; 0 keeps what Ray set."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        infer_patients.PartWriter(str(tmp_path / "parts"), torch_threads=threads,
                                  checkpoint=str(make_checkpoint(tmp_path / "ckpt", test_config)),
                                  noise_level=4, guidance_scale=3.0, stride=2, device="cpu")
        assert torch.get_num_threads() == (threads or 2)
    finally:
        torch.set_num_threads(before)
