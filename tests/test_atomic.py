"""mu.atomic: a write appears whole or not at all, and a failed one leaves the old target and no debris."""

import errno
import json

import pytest

from mu.atomic import atomic_directory, atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text
from mu.errors import MuError


def test_writers_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo\n")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "r.json", {"k": "é", "n": [1, 2]})
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"k": "é", "n": [1, 2]} and "é" in text and text.endswith("\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "r.json"]  # no temporary files left


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(OSError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_directory_is_replaced_whole_or_not_at_all(tmp_path):
    d = tmp_path / "model"
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(d) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("killed mid-save")
    assert (d / "a.txt").read_text() == "1"
    with atomic_directory(d) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["b.txt"]  # the old contents went with the old directory
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_bad_targets_get_one_line_errors(tmp_path):
    with pytest.raises(MuError, match="is a directory"):
        atomic_write_text(tmp_path, "x")
    (tmp_path / "f").write_text("")
    with pytest.raises(MuError, match="in the way"):
        atomic_write_text(tmp_path / "f" / "g.json", "x")
