"""Frames whose file went away before they were processed: found, recorded, said once.

A ranger empties a card while the daemon is stopped, or a sync tool moves files out of the
watch folder: the ledger still lists those frames as waiting. Reading each would fail with
"file vanished" and quarantine it as if it were a bad image, one WARNING a frame. Instead the
start-up sweep (:func:`sweep_gone`) finds every waiting frame whose file is no longer there,
records them as ``gone`` (edge/ledger.py) in one transaction, and the caller logs one summary
line (:func:`gone_summary`): how many, and a few names.

Invariants: only frames still waiting (``seen``) are swept, after ``Ledger.recover`` put the
interrupted ones back there; a frame is gone only when nothing at all is at its path (a broken
symlink is still something there, refused with its own reason later); nothing is deleted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edge.imageio import show_path
from edge.ledger import Ledger

SUMMARY_NAMES = 3  # names a summary line shows before "and N more"


def is_gone(path: str | os.PathLike[str]) -> bool:
    """Nothing at all at ``path`` (not even a broken link); an unreadable parent counts as there."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def sweep_gone(ledger: Ledger) -> list[str]:
    """Record every waiting frame whose file has gone as ``gone``; returns their paths."""
    rows = [r for r in ledger.images(state="seen") if is_gone(r.path)]
    changed = set(ledger.mark_gone(r.id for r in rows))
    return [r.path for r in rows if r.id in changed]


def gone_summary(paths: Sequence[str], when: str) -> str:
    """One line: '3 frame(s) deleted or moved away <when>, before they were processed: a.jpg,
    b.jpg, c.jpg and 2 more; recorded as gone (not quarantined)'."""
    names = [show_path(Path(p).name) for p in paths[:SUMMARY_NAMES]]
    more = f" and {len(paths) - SUMMARY_NAMES} more" if len(paths) > SUMMARY_NAMES else ""
    return (f"{len(paths)} frame(s) deleted or moved away {when}, before they were processed: "
            f"{', '.join(names)}{more}; recorded as gone (not quarantined)")
