"""The filesystem helpers of ``igconda.data.io`` (local paths and pyarrow URIs alike)."""

from __future__ import annotations

from pathlib import Path

from igconda.data.io import (
    filesystem,
    is_local_dataset,
    join_path,
    path_exists,
    slices_root,
    split_path,
    tree_bytes,
)


def test_join_path_keeps_a_uri_whole():
    assert join_path("s3://bucket/data/", "slices", "test") == "s3://bucket/data/slices/test"
    assert join_path(Path("/d"), "x") == "/d/x"
    assert slices_root("s3://b/d") == "s3://b/d/slices"


def test_filesystem_resolves_local_paths_and_reads_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem("rel")
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path.resolve() / "rel")
    fs, path = filesystem(f"file://{tmp_path}")
    assert type(fs).__name__ == "LocalFileSystem" and Path(path) == tmp_path


def test_exists_and_tree_bytes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.bin").write_bytes(b"123")
    (tmp_path / "a" / "b" / "y.bin").write_bytes(b"45")
    assert path_exists(tmp_path / "a", want_dir=True) and not path_exists(tmp_path / "a")
    assert path_exists(tmp_path / "a" / "x.bin") and not path_exists(tmp_path / "a" / "x.bin", want_dir=True)
    assert not path_exists(tmp_path / "missing", want_dir=True)
    assert tree_bytes(tmp_path / "a") == 5
    assert tree_bytes(f"file://{tmp_path}/a") == 5


def test_is_local_dataset(tmp_path):
    assert not is_local_dataset(tmp_path)
    Path(split_path(tmp_path, "train")).mkdir(parents=True)
    assert is_local_dataset(tmp_path) and is_local_dataset(str(tmp_path))
    assert not is_local_dataset("s3://bucket/data")  # a URI is never looked up
