"""Build an output folder completely or not at all (datasets, synthetic scenes, bundles)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yield an empty ``OUT.tmp-<pid>`` to fill; on success it replaces ``out``, on any error it
    is removed, so a reader never sees a half-written folder and a failed run leaves nothing."""
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
