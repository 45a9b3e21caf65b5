"""tandem.fileio: atomic writes leave the old content or the new, never half, and no temporary files."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tandem.fileio import atomic_dir, write_bytes, write_json, write_text


def test_write_json_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    write_json(path, {"name": "é", "path": tmp_path})
    assert json.loads(path.read_text(encoding="utf-8")) == {"name": "é", "path": str(tmp_path)}
    assert "é" in path.read_text(encoding="utf-8")  # non-ASCII kept as is
    assert os.listdir(tmp_path) == ["a.json"]


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t.txt").st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "b.bin"
    write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["b.bin"]


def test_atomic_dir_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.bin").write_text("stale")
    (tmp_path / ".adapter.partial").mkdir()  # left by a killed earlier write
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == []
        (tmp / "weights.bin").write_text("new")
        assert (out / "stale.bin").exists()  # the old folder stays until the new one is whole
    assert sorted(p.name for p in out.iterdir()) == ["weights.bin"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_atomic_dir_error_leaves_the_old_folder(tmp_path):
    out = tmp_path / "v1"
    out.mkdir()
    (out / "program.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["program.json"]
    assert sorted(os.listdir(tmp_path)) == ["v1"]


def test_atomic_dir_replaces_a_file_or_a_link_and_clears_old_leftovers(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(target)
    (tmp_path / ".link.old").mkdir()  # left by a write killed between its two renames
    with atomic_dir(link) as tmp:
        (tmp / "new").write_text("new")
    assert link.is_dir() and not link.is_symlink() and [p.name for p in link.iterdir()] == ["new"]
    assert (target / "keep").read_text() == "kept"  # the link is replaced, not what it pointed at
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "link"]
