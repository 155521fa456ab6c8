"""edge.health: the degraded state's transitions and backoff (pure: the clock is passed in)."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from edge.health import StorageHealth, describe


def test_transitions_are_reported_once_and_the_backoff_grows_until_a_commit():
    h = StorageHealth(min_s=1.0, max_s=8.0)
    assert not h.degraded and not h.due(0.0)
    assert h.failed("committing a result: database or disk is full", 100.0) is True  # a spell starts
    assert h.degraded and not h.due(100.5) and h.due(101.0)
    assert h.failed("retrying: database or disk is full", 101.0) is False  # same spell: not said again
    assert h.next_try == 103.0
    for now in (103.0, 107.0, 115.0, 123.0):
        h.failed("retrying", now)
    assert h.delay == 8.0  # capped
    assert h.recovered() is True and not h.degraded and h.recovered() is False
    assert h.failed("again", 200.0) is True and h.delay == 8.0  # a probe write alone does not reset it
    h.committed()
    h.recovered()
    h.failed("again", 300.0)
    assert h.delay == 1.0
    with pytest.raises(ValueError):
        StorageHealth(min_s=0)


def test_describe_gives_one_line():
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x")) == \
        "No space left on device (/var/lib/x)"
    assert describe(sqlite3.OperationalError("database or disk is full")) == "database or disk is full"
