"""One daemon per state folder: an exclusive lock on ``<state_dir>/daemon.lock``.

A second ``camtrap-edge run`` on the same state (a ranger at the console while the service runs)
must stop before it touches anything: its start-up ``recover()`` would put the running daemon's
frames in flight back to ``seen`` and count them as crashes, and without MegaDetector records (whose
journal has its own lock) both daemons would classify and publish the same frames.

Invariants: the lock is ``flock``'d by the process for its whole life and released by the kernel
when it ends, however it ends (a SIGKILL leaves no stale lock to clean up). The file holds the
holder's pid, for the refusal's one line. A lock file that cannot be created (a full or read-only
state disk on the very first start) is logged and the daemon runs without it, since waiting for
storage is the daemon's job, not this module's.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"


class StateLocked(ValueError):
    """Another live process holds the state folder."""


def lock_state_dir(state_dir: str | os.PathLike[str]) -> IO[str] | None:
    """Take the state folder's lock and return the open file that holds it (keep it open), or
    None where the lock file cannot be made. Raises :class:`StateLocked` if another process holds it."""
    path = Path(state_dir) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        log.warning("cannot create %s (%s): running without the one-daemon-per-state-folder lock", path,
                    e.strerror or e)
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise StateLocked(f"{state_dir}: another camtrap-edge daemon (pid {holder}) is running on this state "
                          "folder; stop it first (systemctl stop camtrap-edge)") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError:
        pass  # a full disk: the lock holds all the same, only the pid in the refusal is missing
    return f
