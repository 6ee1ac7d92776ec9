"""An interrupted dataset build is resumed: only the unfinished patients run again (no Ray).

The subprocess case (the Ray driver SIGKILLed) is in tests/test_fault_kill.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from igconda.data import build
from igconda.data.build import build_dataset, process_patient
from igconda.data.build_resume import patient_file
from tests.data.test_preprocess_job import CONFIG, make_study, no_leftovers
from tests.helpers import dataset_contents


class Killed(BaseException):
    """Stands for SIGKILL: raised from the map, with the build's cleanup switched off."""


def test_a_killed_build_is_resumed_with_only_the_missing_patients(tmp_path, monkeypatch):
    manifest = make_study(tmp_path / "study")  # with bad rows: rejects are recorded as results
    reference_items = []

    def counting(items, config, root):
        reference_items.append(len(items))
        return [process_patient(i, config, root) for i in items]

    build_dataset(manifest, tmp_path / "reference", CONFIG, map_patients=counting, progress=False)

    out = tmp_path / "data"

    def killed_after_three(items, config, root):
        for n, item in enumerate(items):
            if n == 3:
                raise Killed
            yield process_patient(item, config, root)

    with monkeypatch.context() as m:
        m.setattr(build.shutil, "rmtree", lambda *a, **k: None)  # SIGKILL cleans nothing up
        with pytest.raises(Killed):
            build_dataset(manifest, out, CONFIG, map_patients=killed_after_three, progress=False)
    assert not out.exists()
    (partial,) = tmp_path.glob(".data.tmp-*")
    patient_file(partial, "cut").with_name(".cut.abc.tmp").write_bytes(b"half a file")  # cut short

    mapped: list[str] = []

    def recording(items, config, root):
        mapped.extend(i["patient_id"] for i in items)
        return [process_patient(i, config, root) for i in items]

    build_dataset(manifest, out, CONFIG, map_patients=recording, progress=False)
    assert len(set(mapped)) == len(mapped) == reference_items[0] - 3  # the 3 done are not re-run
    assert dataset_contents(out) == dataset_contents(tmp_path / "reference")
    assert no_leftovers(out)


def test_a_build_killed_while_filing_patients_in_their_splits_is_resumed(tmp_path, monkeypatch):
    # Killed after every task reported, while the driver moves files into split folders: the
    # re-run maps no patient again, decides the splits once more and files every patient.
    manifest = make_study(tmp_path / "study")
    build_dataset(manifest, tmp_path / "reference", CONFIG, progress=False)
    out, moves, real = tmp_path / "data", [], build.os.replace

    def killed_after_three_moves(src, dst):
        if "slices" in Path(dst).parts:  # the driver's moves, not the atomic writes' renames
            if len(moves) == 3:
                raise Killed
            moves.append(Path(dst))
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(build.shutil, "rmtree", lambda *a, **k: None)
        m.setattr(build.os, "replace", killed_after_three_moves)
        with pytest.raises(Killed):
            build_dataset(manifest, out, CONFIG, progress=False)
    assert len(moves) == 3 and all(p.is_file() for p in moves)
    mapped: list[str] = []

    def recording(items, config, root):
        mapped.extend(i["patient_id"] for i in items)
        return [process_patient(i, config, root) for i in items]

    build_dataset(manifest, out, CONFIG, map_patients=recording, progress=False)
    assert mapped == []
    assert dataset_contents(out) == dataset_contents(tmp_path / "reference")
    assert no_leftovers(out)


def test_a_build_with_other_settings_does_not_reuse_a_killed_one(tmp_path, monkeypatch):
    manifest = make_study(tmp_path / "study", bad=False)

    def killed_after_two(items, config, root):
        for n, item in enumerate(items):
            if n == 2:
                raise Killed
            yield process_patient(item, config, root)

    with monkeypatch.context() as m:
        m.setattr(build.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(Killed):
            build_dataset(manifest, tmp_path / "data", CONFIG, map_patients=killed_after_two,
                          progress=False)
    mapped: list[str] = []

    def recording(items, config, root):
        mapped.extend(i["patient_id"] for i in items)
        return [process_patient(i, config, root) for i in items]

    other = CONFIG.__class__(**{**CONFIG.__dict__, "output_size": (16, 16, 10)})
    build_dataset(manifest, tmp_path / "data", other, map_patients=recording, progress=False)
    assert len(mapped) == 12  # every patient, with the new settings
    assert no_leftovers(tmp_path / "data")  # the stale build was removed
