"""igconda.io_utils.atomic_write: temp file beside the target, then os.replace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from igconda.io_utils import atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_content_lands_and_nothing_is_left_behind(tmp_path):
    target = tmp_path / "out.txt"
    assert atomic_write(str(target), lambda tmp: tmp.write_text("hello")) == target
    assert target.read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write(target, lambda tmp: tmp.write_text("new"), fsync=True)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize(("name", "suffix"), [("scan.nii.gz", ".nii.gz"), ("grid.png", ".png"),
                                             ("a.b.parquet", ".parquet"), ("notes", ""),
                                             ("table.csv.gz", ".csv.gz")])
def test_temp_file_is_a_hidden_sibling_keeping_the_suffix(tmp_path, name, suffix):
    seen = []
    atomic_write(tmp_path / name, lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(f".{name}.")
    assert tmp.name.endswith(suffix) and tmp.name != f".{name}.{suffix}"
    assert not tmp.exists() and (tmp_path / name).read_bytes() == b"x"


def test_suffix_can_be_overridden(tmp_path):
    seen = []
    atomic_write(tmp_path / "p.parquet", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"),
                 suffix=".tmp")
    assert seen[0].name.startswith(".p.parquet.") and seen[0].suffix == ".tmp"


def test_writer_that_raises_leaves_the_old_file_intact_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_interrupted_writer_creates_nothing(tmp_path):
    def interrupted(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.txt", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_mode_0644(tmp_path):
    target = tmp_path / "shared.html"
    atomic_write(target, lambda tmp: tmp.write_text("x"), mode=0o644)
    assert _mode(target) == 0o644


def test_mode_is_applied_whatever_the_umask(tmp_path):
    before = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a", lambda tmp: tmp.write_text("x"), mode=0o644)
        atomic_write(tmp_path / "b", lambda tmp: tmp.write_text("x"), mode=0o600)
    finally:
        os.umask(before)
    assert _mode(tmp_path / "a") == 0o644 and _mode(tmp_path / "b") == 0o600


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_default_mode_is_what_open_gives(tmp_path, umask):
    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "a", lambda tmp: tmp.write_text("x"))
        (tmp_path / "b").write_text("x")
    finally:
        os.umask(before)
    assert _mode(tmp_path / "a") == _mode(tmp_path / "b") == 0o666 & ~umask


def test_missing_folder_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "out.txt", lambda tmp: tmp.write_text("x"))
    assert list(tmp_path.iterdir()) == []


def test_replace_dir_swaps_a_folder_in_and_removes_the_old_one(tmp_path):
    from igconda.io_utils import replace_dir

    target, new = tmp_path / "best", tmp_path / ".best.incoming"
    target.mkdir()
    (target / "model").write_text("old")
    new.mkdir()
    (new / "model").write_text("new")
    assert replace_dir(new, target) == target
    assert (target / "model").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no .old-* left behind
    # Into a place where nothing was yet.
    fresh = tmp_path / ".other.incoming"
    fresh.mkdir()
    assert replace_dir(fresh, tmp_path / "other").is_dir()


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path):
    from igconda.io_utils import replace_dir

    target = tmp_path / "best"
    target.mkdir()
    (target / "model").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", target)
    assert (target / "model").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
