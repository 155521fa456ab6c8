"""Atomic file output, the one place both wings take it from.

Invariants:
- ``atomic_write_bytes``: a reader (or a crash, or a power cut once it returned) sees the old
  file or the whole new one, never a part: the bytes go to a unique temporary name in the same
  folder, are fsynced, renamed over the target, and the folder is fsynced so the rename itself
  is durable. On any failure (a full disk included) the temporary file is removed, so nothing
  is left behind; the old file is untouched.
- ``building``: a folder is built completely or not at all (datasets, synthetic scenes,
  bundles): it is filled under ``OUT.tmp-<pid>`` and renamed into place only when complete.
- ``fsync_dir``: makes a rename or unlink durable; a filesystem that cannot open a folder for
  reading is tolerated (the rename still happened, only its durability is not promised).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder, so a rename or unlink inside it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not every filesystem lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module's invariants)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """``atomic_write_bytes`` of a JSON document (UTF-8, newline-terminated)."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8") + b"\n")


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yield an empty ``OUT.tmp-<pid>`` to fill; on success it replaces ``out``, on any error it
    is removed, so a reader never sees a half-written folder and a failed run leaves nothing.
    An existing ``out`` that is not a folder is refused before any work: it is somebody's file,
    not an earlier build to replace."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give a new or folder path to write into")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # swap: the old folder is moved aside before the new one takes its name
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
