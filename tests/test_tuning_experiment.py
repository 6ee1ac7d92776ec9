"""The tuning key that names a Tune experiment, so that a killed tuning is resumed only by a
run computing the same thing (tuning/experiment.py); the kill itself: tests/test_fault_kill.py."""

from __future__ import annotations

import json

import numpy as np

from tests.helpers import make_checkpoint
from tuning.experiment import KEY_FIELD, finished_key, tuning_key
from tuning.trial import TuneSlices


def slices(seed: int = 0, patients=("p1", "p2")) -> TuneSlices:
    rng = np.random.default_rng(seed)
    # Fresh string objects each call: equal text, other objects (as in another process).
    ids = np.array(["".join(list(p)) for p in patients for _ in range(2)], dtype=object)
    return TuneSlices(images=rng.random((4, 8, 8), dtype=np.float32),
                      masks=np.ones((4, 8, 8), np.uint8), patient_id=ids,
                      cohort=np.array(["".join(list("lung"))] * 4, dtype=object),
                      slice_index=np.arange(4))


def test_the_key_depends_on_what_the_trials_compute_only(tmp_path, test_config):
    ckpt = make_checkpoint(tmp_path / "a", test_config)
    settings = {"tune": {"noise_levels": [2, 4]}, "batch_size": 8}
    key = tuning_key([ckpt], slices(), settings)
    assert tuning_key([ckpt], slices(), dict(settings)) == key  # equal content, other objects
    assert tuning_key([make_checkpoint(tmp_path / "b", test_config, seed=1)], slices(), settings) != key
    assert tuning_key([ckpt], slices(seed=1), settings) != key
    assert tuning_key([ckpt], slices(patients=("p1", "p3")), settings) != key
    assert tuning_key([ckpt], slices(), {**settings, "batch_size": 4}) != key


def test_finished_key_reads_best_json(tmp_path):
    best = tmp_path / "best.json"
    assert finished_key(best) is None
    best.write_text(json.dumps({"noise_level": 2}))
    assert finished_key(best) is None  # written before keys
    best.write_text(json.dumps({KEY_FIELD: "abc"}))
    assert finished_key(best) == "abc"
