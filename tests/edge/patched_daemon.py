"""`camtrap-edge` with test knobs on its decoder and engine (test-only: the product has none;
this wrapper patches the daemon's functions, then runs the ordinary command line).

- ``$CAMTRAP_TEST_CRASH_ON`` (a glob): decoding a file whose name matches takes the whole
  process down (``os._exit(70)``: no cleanup, no exception), the way a decompression bomb or a
  crashing native decoder would.
- ``$CAMTRAP_TEST_DECODE_MS`` / ``$CAMTRAP_TEST_INFER_MS``: milliseconds added per frame to
  decoding / inference, so the tiny test model runs at the pace of a real one on a Jetson (the
  read-ahead queue then fills up, as in the field).
- ``$CAMTRAP_TEST_FULL_FLAG`` (a path): while that file exists, committing a result (alone or a
  batch's) fails the way SQLite fails on a full disk (``database or disk is full``).
- ``$CAMTRAP_TEST_COMMIT_MS``: milliseconds added to each batch's result commit (a slow card),
  so classified batches pile up in the writer's queue; ``$CAMTRAP_TEST_WRITER_FULL_FLAG`` (a
  path): that file is created once the writer's queue is full.
- ``$CAMTRAP_TEST_DISPOSAL_RETRY_S``: how often empties waiting for free space are looked at.
- ``$CAMTRAP_TEST_OFFENDER_RETRY_AFTER_S``: uptime before a frame with a crash against it is retried.

Usage: ``python tests/edge/patched_daemon.py run --config C``.
"""

from __future__ import annotations

import fnmatch
import os
import sqlite3
import sys
import time

import edge.daemon
import edge.ledger
import edge.runner
from edge.cli import main

_CRASH_ON = os.environ.get("CAMTRAP_TEST_CRASH_ON")
_DECODE_S = float(os.environ.get("CAMTRAP_TEST_DECODE_MS", "0")) / 1000
_INFER_S = float(os.environ.get("CAMTRAP_TEST_INFER_MS", "0")) / 1000
_real_read_image = edge.daemon.read_image
_real_classify_prepared = edge.runner.CascadeRunner.classify_prepared
_real_complete = edge.ledger.Ledger.complete
_real_complete_many = edge.ledger.Ledger.complete_many
_FULL_FLAG = os.environ.get("CAMTRAP_TEST_FULL_FLAG")
_COMMIT_S = float(os.environ.get("CAMTRAP_TEST_COMMIT_MS", "0")) / 1000
_WRITER_FULL_FLAG = os.environ.get("CAMTRAP_TEST_WRITER_FULL_FLAG")
_real_to_writer = edge.daemon.Daemon._to_writer


def _read_image(path, *args, **kwargs):
    if _CRASH_ON and fnmatch.fnmatch(os.path.basename(str(path)), _CRASH_ON):
        os._exit(70)
    time.sleep(_DECODE_S)
    return _real_read_image(path, *args, **kwargs)


def _classify_prepared(self, prep, *args, **kwargs):
    out = _real_classify_prepared(self, prep, *args, **kwargs)
    time.sleep(_INFER_S * len(out))
    return out


def _complete(self, *args, **kwargs):
    if _FULL_FLAG and os.path.exists(_FULL_FLAG):
        raise sqlite3.OperationalError("database or disk is full")
    return _real_complete(self, *args, **kwargs)


def _complete_many(self, *args, **kwargs):  # the daemon commits a batch's results at once
    if _FULL_FLAG and os.path.exists(_FULL_FLAG):
        raise sqlite3.OperationalError("database or disk is full")
    time.sleep(_COMMIT_S)
    return _real_complete_many(self, *args, **kwargs)


def _to_writer(self, job):
    if _WRITER_FULL_FLAG and self._writes.full():
        open(_WRITER_FULL_FLAG, "a").close()
    return _real_to_writer(self, job)


edge.daemon.read_image = _read_image
edge.ledger.Ledger.complete = _complete
edge.ledger.Ledger.complete_many = _complete_many
edge.daemon.Daemon._to_writer = _to_writer
if "CAMTRAP_TEST_OFFENDER_RETRY_AFTER_S" in os.environ:
    edge.daemon.OFFENDER_RETRY_AFTER_S = float(os.environ["CAMTRAP_TEST_OFFENDER_RETRY_AFTER_S"])
if "CAMTRAP_TEST_DISPOSAL_RETRY_S" in os.environ:
    edge.daemon.DISPOSAL_RETRY_S = float(os.environ["CAMTRAP_TEST_DISPOSAL_RETRY_S"])
edge.runner.CascadeRunner.classify_prepared = _classify_prepared

if __name__ == "__main__":
    sys.exit(main())
