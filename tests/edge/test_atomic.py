"""edge/atomic.py: the one atomic-write helper. A failed write (a full disk) leaves the old file
whole and no temporary file behind; a good one replaces the file in one step."""

from __future__ import annotations

import errno
import os

import pytest

from edge.atomic import atomic_write_bytes, atomic_write_json


def test_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "md_results.json"
    p.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(p, b"new data")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["md_results.json"]  # no .md_results.json.*.tmp
