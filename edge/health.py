"""The daemon's storage health: ``ok``, or ``degraded`` with the reason, and when to try again.

Pure (the clock is passed in): the daemon reports here what happened to its durable writes
(ledger, records) and does the I/O itself (the log, sd_notify STATUS, the retained MQTT status)
on the transitions these methods return. Threads share one instance under its lock.

Invariants the daemon keeps around it:
- Degraded from the first failed durable write (a full or failing state disk) until a retry
  succeeds. Meanwhile it claims no frame, deletes nothing, and keeps pinging the watchdog
  (it is alive and retrying, which is what systemd should see; the STATUS line says why).
- Retries back off: ``min_s``, doubling, up to ``max_s`` (30 s: space that returns is used
  soon). Only a committed result resets the backoff, so a probe that succeeds while results
  still cannot be written does not turn into a tight loop of failures.
"""

from __future__ import annotations

import errno
import sqlite3
import threading

STORAGE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)


def describe(e: BaseException) -> str:
    """One line for a storage error (``database or disk is full``, ``No space left on device``)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{e.strerror or errno.errorcode.get(e.errno, e.errno)}" + (f" ({e.filename})" if e.filename else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class StorageHealth:
    """``failed()`` / ``recovered()`` return True on a transition (log and publish it then)."""

    def __init__(self, min_s: float = 1.0, max_s: float = 30.0) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s, self.max_s = min_s, max_s
        self.reason: str | None = None
        self.delay = 0.0
        self.next_try = 0.0
        self._lock = threading.Lock()

    @property
    def degraded(self) -> bool:
        return self.reason is not None

    def failed(self, reason: str, now: float) -> bool:
        """A durable write failed: degraded (again), next try after a longer wait. True when
        this starts a degraded spell."""
        with self._lock:
            was = self.reason
            self.reason = reason
            self.delay = min(self.max_s, self.delay * 2 if self.delay else self.min_s)
            self.next_try = now + self.delay
            return was is None

    def due(self, now: float) -> bool:
        """Time to retry (only while degraded)."""
        with self._lock:
            return self.reason is not None and now >= self.next_try

    def recovered(self) -> bool:
        """A retry wrote what was waiting: back to ok. True when this ends a degraded spell."""
        with self._lock:
            was = self.reason
            self.reason = None
            return was is not None

    def committed(self) -> None:
        """A result was committed: storage is healthy, the next failure starts the backoff afresh."""
        with self._lock:
            self.delay = 0.0
