"""Write-then-rename: complete results appear, failed ones leave nothing."""

from __future__ import annotations

import pytest

from compressed_perception.atomic import atomic_path


def test_file_appears_only_when_complete(tmp_path):
    dest = tmp_path / "out.json"
    with atomic_path(dest) as tmp:
        tmp.write_text("{}")
        assert tmp.name == "out.json"
        assert not dest.exists()
    assert dest.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_leaves_old_file_and_no_debris(tmp_path):
    dest = tmp_path / "out.json"
    dest.write_text("old")

    def interrupted_write() -> None:
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        interrupted_write()
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_folder_replaces_folder_or_file(tmp_path):
    dest = tmp_path / "bag"
    dest.write_text("a file in the way")
    for content in ("first", "second"):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text(content)
        assert (dest / "data.txt").read_text() == content
        assert sorted(p.name for p in dest.iterdir()) == ["data.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]
