"""The durable ledger: every image's state and result, the MQTT outbox and telemetry counters,
in one SQLite file (WAL).

Why one file: a result and the messages it produces are committed in ONE transaction, so a crash
(power cut, SIGKILL, OOM) at any instant leaves either both or neither; what is left in
``processing`` after a crash is exactly what to redo, and redoing is harmless because an image
can receive one result, ever (checked in Python and enforced again by a trigger).

Threads: one connection guarded by a lock (``check_same_thread=False``). Python's sqlite3
transactions belong to a connection, so sharing one without a lock would interleave them;
one connection per thread would make closing and ``:memory:`` awkward for no gain, because
SQLite serialises writers anyway and the device writes a handful of rows per image. Other
*processes* (a status command, a second daemon by mistake) are handled by WAL (readers never
block) plus ``busy_timeout`` and ``BEGIN IMMEDIATE`` (writers queue instead of failing).

Durability: ``synchronous=FULL`` for the commits that must survive a power cut (a result is
what allows the image file to be deleted afterwards; ``complete_many`` commits a batch's
results with one fsync, each image's rows all or nothing); ``NORMAL`` for the rest (``see``, acks,
counters, a batch's disposals), which WAL keeps crash-consistent and whose loss after a power cut
is harmless: the start-up scan sees the file again, an un-acked message is sent again, a
disposal is redone (and counted) again.

State machine of an image::

    seen --claim--> processing --complete--> done --mark_disposed--> disposed
      ^                 |   \\--quarantine--> quarantined
      +-recover/release-+        (also seen --quarantine--> quarantined)
      +------------------requeue--------------------------------------/
    seen/processing --mark_gone--> gone --see (the file is back)--> seen

``gone``: the file was deleted or moved away before it was processed (while the daemon was
down, or between its arrival and its turn). Not a decode failure: nothing was read, so nothing
is quarantined, and a file that comes back at the path is processed as if it had never left.
The quarantined count is ``state_counts()`` alone (rows, not a counter), so a frame quarantined,
requeued and quarantined again counts once; status and telemetry read that one source.

Crash attribution (who is to blame when the process dies): a row is ``in_flight`` (with the
stage, ``decode`` or ``inference``) only while it is inside the decoder or the engine; rows
that merely wait in the read-ahead queue are not. The mark is a plain (synchronous=NORMAL)
commit: it survives the process dying, which is all attribution needs. At the next start
``recover()`` looks at what was in flight:
- several rows: any of them may be the culprit; each becomes a ``suspect`` (no crash counted);
- one row: it was alone in the decoder/engine, the crash is counted against it (``attempts``),
  and it is quarantined after ``max_attempts`` such crashes.
``claim()`` hands out a suspect alone (the daemon then keeps everything else out of flight until
it is through), so a batch that keeps dying is retried frame by frame and only the poison frame
is quarantined; a frame with a crash counted against it goes after every other waiting frame
(and the daemon tries it only once it has been up a while: crashes that cluster right after a
start, a flapping power supply, an operator's kill loop, are unlikely to be the frame's doing).
A frame that merely sat in the queue, or shared the engine with the poison, is never blamed.
``requeue()`` gives quarantined frames another try (as suspects: alone).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
STATES = ("seen", "processing", "done", "disposed", "quarantined", "gone")
GONE = "gone before processing (deleted or moved away before the device read it)"  # the row's error
STAGES = ("decode", "inference")  # where an in-flight frame is
MAX_CRASHES = 3  # crashes while alone in the decoder/engine before a frame is quarantined
# the most process deaths one poison frame can cost: one in flight with others (all become
# suspects, no crash counted), then MAX_CRASHES alone; systemd's start limit is sized from it
# (systemd/camtrap-edge.service, tests/edge/test_systemd.py)
DEATHS_PER_POISON_FRAME = 1 + MAX_CRASHES
KINDS = ("detection", "alert", "telemetry", "status")
# When the outbox is full, rows are dropped in this order (oldest first within a kind);
# alerts are never dropped.
DROP_ORDER = ("status", "telemetry", "detection")
DROP_COUNTER = {"status": "dropped_status", "telemetry": "dropped_telemetry",
                "detection": "dropped_detections"}
ALERT_OVER_BOUND = "alerts_over_bound"  # counter: alerts kept although the outbox was full

Kind = Literal["detection", "alert", "telemetry", "status"]


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (bad state transition, newer schema, ...)."""


class DuplicateResult(LedgerError):
    """A second result for an image that already has one: refused, one result per image, ever."""


@dataclass(frozen=True)
class OutMsg:
    """One message for the broker. ``topic`` is relative to the MQTT prefix (e.g. ``detections``)
    so a prefix change in the config does not strand queued rows. ``qos=None`` means "the
    configured QoS for this kind". ``seq`` is set on rows read back from the outbox."""

    kind: Kind
    topic: str
    payload: bytes
    qos: int | None = None
    retain: bool = False
    image_id: int | None = None
    seq: int | None = None
    created: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"outbox message kind {self.kind!r} is not one of {KINDS}")
        if self.qos not in (None, 0, 1, 2):
            raise ValueError(f"outbox message qos {self.qos!r} is not 0, 1 or 2")
        if isinstance(self.payload, str):  # be forgiving: store text as UTF-8
            object.__setattr__(self, "payload", self.payload.encode())


@dataclass(frozen=True)
class Completion:
    """One image's result for ``Ledger.complete_many`` (the arguments of ``complete``)."""

    image_id: int
    result: Mapping[str, Any]
    messages: Sequence[OutMsg] = ()
    event_id: int | None = None
    taken_at: float | None = None
    sha256: str | None = None
    counters: Mapping[str, int] | None = None


@dataclass(frozen=True)
class ImageRow:
    id: int
    path: str
    size: int
    mtime: float
    state: str
    attempts: int  # crashes counted against it (it was alone in flight when the process died)
    sha256: str | None = None
    result: dict[str, Any] | None = None
    event_id: int | None = None
    taken_at: float | None = None
    disposal: str | None = None
    error: str | None = None
    created: float = 0.0
    updated: float = 0.0
    superseded: int | None = None  # id of the newer file's row at the same path, if any
    in_flight: str | None = None  # 'decode' / 'inference' while inside the decoder/engine
    suspect: bool = False  # in flight with others when the process died: processed alone


_SCHEMA_V1 = """
CREATE TABLE images (
    id          INTEGER PRIMARY KEY,
    path        TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    mtime       REAL    NOT NULL,
    sha256      TEXT,
    state       TEXT    NOT NULL DEFAULT 'seen'
                CHECK (state IN ('seen', 'processing', 'done', 'disposed', 'quarantined')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    result      TEXT,               -- JSON, written once
    event_id    INTEGER,
    taken_at    REAL,               -- EXIF DateTimeOriginal, else mtime (unix seconds)
    disposal    TEXT,               -- how the file was disposed of (kept, moved:<path>, deleted)
    error       TEXT,
    superseded  INTEGER REFERENCES images(id),  -- set when a new file reuses this path
    created     REAL    NOT NULL,
    updated     REAL    NOT NULL,
    CHECK (state NOT IN ('done', 'disposed') OR result IS NOT NULL)
);
-- one live row per path; rows of earlier files at a reused path stay as history
CREATE UNIQUE INDEX images_path ON images(path) WHERE superseded IS NULL;
CREATE INDEX images_state ON images(state, id);
CREATE TRIGGER images_one_result BEFORE UPDATE OF result ON images
    WHEN OLD.result IS NOT NULL AND NEW.result IS NOT OLD.result
    BEGIN SELECT RAISE(ABORT, 'one result per image: result already recorded'); END;

CREATE TABLE outbox (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,   -- publish order; never reused
    topic     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    qos       INTEGER CHECK (qos IS NULL OR qos IN (0, 1, 2)),
    retain    INTEGER NOT NULL DEFAULT 0,
    kind      TEXT    NOT NULL CHECK (kind IN ('detection', 'alert', 'telemetry', 'status')),
    image_id  INTEGER REFERENCES images(id),
    created   REAL    NOT NULL
);
CREATE INDEX outbox_kind ON outbox(kind, seq);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


def _add_folders(db: sqlite3.Connection) -> None:
    """v4: the folder of every image (the rows of old ledgers too), then the waiting index."""
    db.execute("ALTER TABLE images ADD COLUMN folder TEXT")
    db.executemany("UPDATE images SET folder=? WHERE id=?",
                   [(_db_folder(_py_path(r[1])), r[0]) for r in db.execute("SELECT id, path FROM images")])
    # the frames still to process, by folder: small (only waiting rows), so cheap to keep up to date
    db.execute("CREATE INDEX images_waiting ON images(folder) "
               "WHERE state IN ('seen', 'processing') AND superseded IS NULL")


def _add_gone(db: sqlite3.Connection) -> None:
    """Widen the images.state CHECK to allow 'gone'. SQLite cannot ALTER a CHECK; widening one
    changes no stored row, so the documented writable_schema edit (sqlite.org/lang_altertable.html,
    "other kinds of table schema changes") is safe and needs no table rebuild."""
    old = "CHECK (state IN ('seen', 'processing', 'done', 'disposed', 'quarantined'))"
    sql = db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='images'").fetchone()[0]
    if old not in sql:
        raise LedgerError("ledger schema 4 without the expected images.state CHECK; cannot upgrade it")
    version = db.execute("PRAGMA schema_version").fetchone()[0]
    db.execute("PRAGMA writable_schema=ON")
    try:
        db.execute("UPDATE sqlite_master SET sql=? WHERE type='table' AND name='images'",
                   (sql.replace(old, old[:-2] + ", 'gone'))"),))
        db.execute(f"PRAGMA schema_version={int(version) + 1}")
    finally:
        db.execute("PRAGMA writable_schema=OFF")
    db.execute("DELETE FROM counters WHERE name='quarantined'")


# version v -> SQL (or a function of the connection) that upgrades v to v + 1, run inside the
# opening transaction. Add an entry, bump SCHEMA_VERSION, never edit an old one.
MIGRATIONS: dict[int, str | Callable[[sqlite3.Connection], None]] = {
    # v2: events whose event-level answer has been enqueued (an event is closed exactly once,
    # in the same transaction as its message, so a restart re-closes only what was left open)
    1: """
CREATE TABLE events (
    id       INTEGER PRIMARY KEY,
    summary  TEXT    NOT NULL,
    closed   REAL    NOT NULL
);
""",
    # v3: crash attribution. ``attempts`` used to count claims (so frames waiting in the
    # read-ahead were blamed for other frames' crashes); it now counts crashes while the frame
    # was alone in the decoder/engine, so old counts are cleared.
    2: """
ALTER TABLE images ADD COLUMN in_flight TEXT CHECK (in_flight IS NULL OR in_flight IN ('decode', 'inference'));
ALTER TABLE images ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0;
UPDATE images SET attempts=0 WHERE state != 'quarantined';
""",
    # v4: the folder (camera) of each image, and an index of the folders with frames still to
    # process: ``waiting_in`` asks it every tick while an event idles, and read every waiting
    # path before (a 100k-frame backlog meant 100k rows per question)
    3: _add_folders,
    # v5: the 'gone' state (see the module docstring); the 'quarantined' counter goes (it counted
    # quarantine events, so a requeued frame quarantined again counted twice: rows are the count)
    4: _add_gone,
}



def _rowid(cur: sqlite3.Cursor) -> int:
    """The id an INSERT gave its row (sqlite3 types ``lastrowid`` as optional: None before any insert)."""
    if cur.lastrowid is None:
        raise LedgerError("INSERT returned no row id")
    return cur.lastrowid


def _db_path(path: str | Path) -> str | bytes:
    """A path as stored: text when it is valid UTF-8, else its raw bytes (a BLOB), so a camera's
    Latin-1 file name is recorded and processed rather than crashing the insert."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def _db_folder(path: str | Path) -> str | bytes:
    """The folder an image sits in (its camera, as edge.events groups frames), as stored."""
    return _db_path(os.path.dirname(os.fspath(path)))


def _py_path(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _now() -> float:
    return time.time()


class Ledger:
    """The device's memory. Safe to share between threads; see the module docstring."""

    def __init__(self, path: str | Path, *, max_outbox: int = 10_000, busy_timeout_ms: int = 10_000,
                 durable: bool = True) -> None:
        if max_outbox < 1:
            raise ValueError(f"max_outbox must be >= 1, got {max_outbox}")
        self.path = str(path)
        self.max_outbox = max_outbox
        self._durable = durable
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (the sqlite3 module's implicit
        # transactions open late and as DEFERRED, which can fail with SQLITE_BUSY on upgrade).
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal" and self.path != ":memory:":
                raise LedgerError(f"{self.path}: cannot switch the ledger to WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Create or upgrade the schema. An up-to-date ledger is only read here, so the daemon
        can open it on a full disk (and wait for space) instead of failing to start."""
        if self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._tx(durable=True) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema version {version} is newer than this "
                                  f"software understands ({SCHEMA_VERSION}); refusing to touch it")
            if version == 0:
                has_tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type='table' "
                                        "AND name NOT LIKE 'sqlite_%'").fetchone()[0]
                if has_tables:
                    raise LedgerError(f"{self.path}: not a camtrap ledger (tables but no schema version)")
                for stmt in _split_sql(_SCHEMA_V1):
                    db.execute(stmt)
                version = 1
            while version < SCHEMA_VERSION:
                step = MIGRATIONS[version]
                if callable(step):
                    step(db)
                else:
                    for stmt in _split_sql(step):
                        db.execute(stmt)
                log.info("ledger %s migrated from schema %d to %d", self.path, version, version + 1)
                version += 1
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``durable`` commits with synchronous=FULL (fsync of the WAL)."""
        with self._lock:
            full = durable and self._durable
            if full:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if full:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_outbox_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called (outside the lock) after every commit that adds outbox rows,
        so a publisher can wake up instead of polling."""
        self._listeners.append(fn)

    def remove_outbox_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # a listener must never break a commit that already happened
                log.exception("outbox listener failed")

    # -- images -----------------------------------------------------------------------------
    def see(self, path: str | Path, size: int, mtime: float, *, taken_at: float | None = None,
            sha256: str | None = None) -> int | None:
        """Record a file found in the watch folder. Returns its id when it needs processing
        (new, or still waiting), ``None`` when it is already being handled or finished.

        Idempotent: the scan, the watcher and the reconcile may all report the same file.
        A file of another size or mtime at the path of a finished image is a NEW image (cameras
        reuse names after a card is formatted): the old row is kept as history."""
        key, now = _db_path(path), _now()
        insert = ("INSERT INTO images (path, folder, size, mtime, sha256, taken_at, created, updated) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        with self._tx() as db:
            row = db.execute("SELECT id, state, size, mtime FROM images WHERE path=? AND superseded IS NULL",
                             (key,)).fetchone()
            if row is not None:
                same = row["size"] == size and row["mtime"] == mtime
                if row["state"] == "gone":  # the file is back: process it as if it had never left
                    db.execute("UPDATE images SET state='seen', size=?, mtime=?, taken_at=coalesce(?, taken_at), "
                               "sha256=?, error=NULL, updated=? WHERE id=?",
                               (size, mtime, taken_at, sha256, now, row["id"]))
                    return int(row["id"])
                if row["state"] == "seen":
                    if not same:  # still being written, or replaced before we got to it
                        db.execute("UPDATE images SET size=?, mtime=?, taken_at=coalesce(?, taken_at), "
                                   "sha256=?, updated=? WHERE id=?",
                                   (size, mtime, taken_at, sha256, now, row["id"]))
                    return int(row["id"])
                if same or row["state"] == "processing":
                    return None
                # a new file at a reused path: retire the old row (pointing at itself until the new
                # row exists, which keeps the foreign key valid), then insert
                db.execute("UPDATE images SET superseded=id WHERE id=?", (row["id"],))
            new_id = _rowid(db.execute(insert, (key, _db_folder(path), size, mtime, sha256, taken_at, now, now)))
            if row is not None:
                db.execute("UPDATE images SET superseded=? WHERE id=?", (new_id, row["id"]))
                log.info("%s: a new file reuses the path of image %d (%s); treated as a new image",
                         path, row["id"], row["state"])
            return new_id

    def claim(self, limit: int = 1, *, offenders: bool = True, stage: str | None = None) -> list[ImageRow]:
        """Move up to ``limit`` waiting images (oldest first) to ``processing`` and return them
        (not yet in flight: see :meth:`in_flight`). A suspect (in flight with others when the process
        died) is claimed alone, and a batch stops before the next suspect, so that a crash
        while it is processed can be counted against it and nothing else. A frame that already
        crashed the daemon alone waits until no other frame does: a likely poison frame delays
        nobody (each of its crashes costs a restart); ``offenders=False`` leaves such frames
        waiting altogether (the daemon's first seconds after a start).

        ``stage`` marks the claimed rows in flight in the same transaction (one commit where
        ``in_flight`` would add a second), except a suspect: it must enter flight only once
        nothing else is in flight, which the caller waits for before calling ``in_flight``."""
        if stage is not None and stage not in STAGES:
            raise ValueError(f"in_flight stage must be one of {STAGES} or None, got {stage!r}")
        now = _now()
        with self._tx() as db:
            rows = db.execute("SELECT id, suspect FROM images WHERE state='seen' AND (? OR attempts = 0) "
                              "ORDER BY attempts > 0, id LIMIT ?", (int(offenders), max(1, int(limit)))).fetchall()
            if rows and rows[0]["suspect"]:
                rows = rows[:1]
            else:
                rows = rows[:next((k for k, r in enumerate(rows) if r["suspect"]), len(rows))]
            ids = [r["id"] for r in rows]
            mark = stage if rows and not rows[0]["suspect"] else None
            db.executemany("UPDATE images SET state='processing', in_flight=?, updated=? WHERE id=?",
                           [(mark, now, i) for i in ids])
            out = [_image(db.execute("SELECT * FROM images WHERE id=?", (i,)).fetchone()) for i in ids]
        return out

    def in_flight(self, ids: Iterable[int], stage: str | None) -> None:
        """Mark claimed images as inside the decoder/engine (``stage``), or out of it (None):
        call it just before and just after the risky step. Not fsynced on purpose: it must
        survive the process dying (it does, WAL), not a power cut (then nobody is to blame)."""
        if stage is not None and stage not in STAGES:
            raise ValueError(f"in_flight stage must be one of {STAGES} or None, got {stage!r}")
        ids = [int(i) for i in ids]
        if not ids:
            return
        with self._tx() as db:
            db.executemany("UPDATE images SET in_flight=? WHERE id=? AND state='processing'",
                           [(stage, i) for i in ids])

    def recover(self, max_attempts: int = MAX_CRASHES) -> tuple[int, int]:
        """After a crash: images left in ``processing`` go back to ``seen``. What was in flight
        is judged (see the module docstring): a row alone in the decoder/engine has the crash
        counted against it and is quarantined at ``max_attempts``; rows in flight together
        become suspects (to be tried alone). Returns (requeued, quarantined)."""
        now = _now()
        with self._tx(durable=True) as db:
            flying = db.execute("SELECT id, attempts, in_flight, path FROM images "
                                "WHERE state='processing' AND in_flight IS NOT NULL").fetchall()
            poison = 0
            if len(flying) == 1:
                row = flying[0]
                crashes = row["attempts"] + 1
                if crashes >= max_attempts:
                    where = "decoder" if row["in_flight"] == "decode" else "engine"
                    why = f"the daemon died {crashes} times while this frame was alone in the {where}"
                    db.execute("UPDATE images SET state='quarantined', attempts=?, in_flight=NULL, error=?, "
                               "updated=? WHERE id=?", (crashes, why, now, row["id"]))
                    poison = 1
                    log.error("quarantined %s: %s", _py_path(row["path"]), why)
                else:
                    db.execute("UPDATE images SET attempts=?, suspect=1 WHERE id=?", (crashes, row["id"]))
            else:
                db.executemany("UPDATE images SET suspect=1 WHERE id=?", [(r["id"],) for r in flying])
            requeued = db.execute("UPDATE images SET state='seen', in_flight=NULL, updated=? "
                                  "WHERE state='processing'", (now,)).rowcount
        if requeued or poison:
            log.warning("ledger recovery: %d interrupted image(s) requeued (%d were in the decoder/engine), "
                        "%d quarantined", requeued, len(flying) - poison, poison)
        return requeued, poison

    def release(self, ids: Iterable[int] | None = None) -> int:
        """Put claimed images (all of them: ``ids=None``) back to ``seen`` without blame: their
        result could not be committed (a full disk), or the daemon is stopping cleanly. They are
        redone when the ledger can write again. Returns how many went back."""
        now = _now()
        sql = "UPDATE images SET state='seen', in_flight=NULL, updated=? WHERE state='processing'"
        with self._tx() as db:
            if ids is None:
                return int(db.execute(sql, (now,)).rowcount)
            return sum(db.execute(sql + " AND id=?", (now, int(i))).rowcount for i in ids)

    def requeue(self, paths: Iterable[str | Path] | None = None) -> list[ImageRow]:
        """Give quarantined images another try (``camtrap-edge requeue``): all of them
        (``paths=None``) or those at ``paths``. They come back as suspects, so each is tried
        alone and a real poison frame is quarantined again without taking others with it.
        Raises LedgerError naming a path that has no quarantined image."""
        now = _now()
        with self._tx(durable=True) as db:
            if paths is None:
                ids = [r[0] for r in db.execute("SELECT id FROM images WHERE state='quarantined' "
                                                "AND superseded IS NULL ORDER BY id")]
            else:
                ids = []
                for p in paths:
                    row = db.execute("SELECT id, state FROM images WHERE path=? AND superseded IS NULL",
                                     (_db_path(p),)).fetchone()
                    if row is None:
                        raise LedgerError(f"{p}: not in the ledger")
                    if row["state"] != "quarantined":
                        raise LedgerError(f"{p}: not quarantined (it is {row['state']})")
                    ids.append(row["id"])
            db.executemany("UPDATE images SET state='seen', attempts=0, suspect=1, in_flight=NULL, error=NULL, "
                           "updated=? WHERE id=?", [(now, i) for i in ids])
            out = [_image(db.execute("SELECT * FROM images WHERE id=?", (i,)).fetchone()) for i in ids]
        return out

    def complete(self, image_id: int, result: Mapping[str, Any], messages: Iterable[OutMsg] = (), *,
                 state: Literal["done"] = "done", event_id: int | None = None,
                 taken_at: float | None = None, sha256: str | None = None,
                 counters: Mapping[str, int] | None = None) -> list[int]:
        """Record an image's result and enqueue its messages, in ONE durable transaction, with
        optional counter increments (so telemetry counts match results exactly).
        Raises DuplicateResult if the image already has a result. Returns the outbox seqs
        (messages refused by a full outbox have no seq; see ``enqueue``)."""
        if state != "done":
            raise ValueError(f"complete(): state must be 'done', got {state!r}")
        c = Completion(image_id, result, tuple(messages), event_id, taken_at, sha256, counters)
        with self._tx(durable=True) as db:
            seqs = self._complete_in(db, c, _now())
        if seqs:
            self._notify()
        return seqs

    def complete_many(self, batch: Sequence[Completion]) -> list[list[int] | LedgerError]:
        """``complete`` for a batch of images in ONE durable transaction (one fsync for the batch,
        not one per image). Each image's rows are all or nothing (a savepoint each): an image
        that already has a result, or is in no state to take one, is skipped and its error
        returned in its place; the others commit. A storage error rolls back the whole batch
        and is raised (nothing of it is durable, so nothing of it may be disposed of)."""
        out: list[list[int] | LedgerError] = []
        now = _now()
        with self._tx(durable=True) as db:
            for c in batch:
                db.execute("SAVEPOINT one")
                try:
                    out.append(self._complete_in(db, c, now))
                except LedgerError as e:  # DuplicateResult included
                    db.execute("ROLLBACK TO one")
                    out.append(e)
                db.execute("RELEASE one")
        if any(isinstance(x, list) and x for x in out):
            self._notify()
        return out

    def _complete_in(self, db: sqlite3.Connection, c: Completion, now: float) -> list[int]:
        image_id = c.image_id
        blob = json.dumps(c.result, sort_keys=True, separators=(",", ":"), allow_nan=False)
        msgs = [m if m.image_id is not None else _with_image(m, image_id) for m in c.messages]
        state, event_id, taken_at, sha256, counters = "done", c.event_id, c.taken_at, c.sha256, c.counters
        row = db.execute("SELECT state, result FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            raise LedgerError(f"complete(): no image with id {image_id}")
        if row["result"] is not None:
            raise DuplicateResult(f"image {image_id} already has a result (state {row['state']})")
        if row["state"] not in ("seen", "processing"):
            raise LedgerError(f"complete(): image {image_id} is {row['state']}, not seen/processing")
        db.execute("UPDATE images SET state=?, result=?, event_id=coalesce(?, event_id), "
                   "taken_at=coalesce(?, taken_at), sha256=coalesce(?, sha256), error=NULL, in_flight=NULL, "
                   "updated=? WHERE id=?", (state, blob, event_id, taken_at, sha256, now, image_id))
        seqs = self._enqueue(db, msgs, now)
        for name, n in (counters or {}).items():
            _bump(db, name, n)
        return seqs

    def quarantine(self, image_id: int, reason: str) -> None:
        """Give up on an image (unreadable, hostile, repeatedly crashing); counted in telemetry
        (from the rows: :meth:`state_counts`)."""
        with self._tx(durable=True) as db:
            row = db.execute("SELECT state FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None:
                raise LedgerError(f"quarantine(): no image with id {image_id}")
            if row["state"] == "quarantined":
                return
            if row["state"] not in ("seen", "processing"):
                raise LedgerError(f"quarantine(): image {image_id} is already {row['state']}")
            db.execute("UPDATE images SET state='quarantined', error=?, in_flight=NULL, updated=? WHERE id=?",
                       (reason, _now(), image_id))

    def mark_gone(self, image_ids: Iterable[int], reason: str = GONE) -> list[int]:
        """Record images whose file was deleted or moved away before they were processed (waiting
        or claimed, not yet done); returns the ids that changed (others had moved on meanwhile)."""
        now, changed = _now(), []
        with self._tx(durable=True) as db:
            for i in image_ids:
                if db.execute("UPDATE images SET state='gone', error=?, in_flight=NULL, suspect=0, updated=? "
                              "WHERE id=? AND state IN ('seen', 'processing')", (reason, now, int(i))).rowcount:
                    changed.append(int(i))
        return changed

    def mark_disposed(self, image_id: int, how: str) -> None:
        """Record that a done image's file was kept/moved/deleted (call it AFTER doing it)."""
        with self._tx(durable=True) as db:
            row = db.execute("SELECT state FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None:
                raise LedgerError(f"mark_disposed(): no image with id {image_id}")
            if row["state"] != "done":
                raise LedgerError(f"mark_disposed(): image {image_id} is {row['state']}, not done")
            db.execute("UPDATE images SET state='disposed', disposal=?, updated=? WHERE id=?",
                       (how, _now(), image_id))

    def mark_disposed_many(self, done: Sequence[tuple[int, str]], counters: Mapping[str, int] | None = None) -> None:
        """``mark_disposed`` for a batch's frames (image id, how), with counter increments, in ONE
        transaction, not fsynced: it survives the process dying (WAL), and a power cut that
        loses it loses its counters with it, so the next start disposes of those ``done`` rows
        again (the file operations are safe to redo, and the daemon acts only on the file it
        classified) and counts them once. A row that is not ``done`` (disposed already) is left
        as it is."""
        if not done and not counters:
            return
        now = _now()
        with self._tx() as db:
            db.executemany("UPDATE images SET state='disposed', disposal=?, updated=? WHERE id=? AND state='done'",
                           [(how, now, int(i)) for i, how in done])
            for name, n in (counters or {}).items():
                _bump(db, name, n)

    def set_event(self, image_id: int, event_id: int) -> None:
        """Attach an image to an event (bursts are grouped after their frames are seen)."""
        with self._tx() as db:
            db.execute("UPDATE images SET event_id=?, updated=? WHERE id=?", (event_id, _now(), image_id))

    def get(self, image_id: int) -> ImageRow | None:
        rows = self._read("SELECT * FROM images WHERE id=?", (image_id,))
        return _image(rows[0]) if rows else None

    def find(self, path: str | Path) -> ImageRow | None:
        """The live row for a path (not the history of earlier files at that path)."""
        rows = self._read("SELECT * FROM images WHERE path=? AND superseded IS NULL", (_db_path(path),))
        return _image(rows[0]) if rows else None

    def images(self, state: str | None = None, limit: int = 1_000_000) -> list[ImageRow]:
        if state is not None and state not in STATES:
            raise ValueError(f"unknown image state {state!r}")
        if state is None:
            rows = self._read("SELECT * FROM images ORDER BY id LIMIT ?", (limit,))
        else:
            rows = self._read("SELECT * FROM images WHERE state=? ORDER BY id LIMIT ?", (state, limit))
        return [_image(r) for r in rows]

    # -- events ------------------------------------------------------------------------------
    def event_results(self, event_id: int) -> list[dict[str, Any]]:
        """Results of an event's frames, oldest first."""
        rows = self._read("SELECT result FROM images WHERE event_id=? AND result IS NOT NULL ORDER BY id",
                          (event_id,))
        return [json.loads(r["result"]) for r in rows]

    def unclosed_events(self) -> list[int]:
        """Events with results on record but no event-level answer yet (left open by a stop)."""
        rows = self._read("SELECT DISTINCT event_id FROM images WHERE event_id IS NOT NULL AND result IS NOT NULL "
                          "AND event_id NOT IN (SELECT id FROM events) ORDER BY event_id")
        return [int(r["event_id"]) for r in rows]

    def waiting_in(self, folders: Iterable[str]) -> set[str]:
        """Those of ``folders`` holding an image still to be processed (``seen`` or
        ``processing``): an event of that camera must not close by idle time while its later
        frames wait (a backlog, a frame held back after a crash)."""
        sql = ("SELECT 1 FROM images WHERE folder=? AND state IN ('seen', 'processing') AND superseded IS NULL "
               "LIMIT 1")  # the partial index images_waiting: one lookup per folder, whatever the backlog
        with self._lock:
            return {f for f in set(folders) if self._db.execute(sql, (_db_path(f),)).fetchone() is not None}

    def max_event_id(self) -> int:
        row = self._read("SELECT max(m) AS m FROM (SELECT max(event_id) AS m FROM images "
                         "UNION ALL SELECT max(id) FROM events)")
        return int(row[0]["m"] or 0)

    def close_event(self, event_id: int, summary: Mapping[str, Any], messages: Iterable[OutMsg] = ()) -> bool:
        """Record an event's answer and enqueue its messages in one transaction; False (and
        nothing enqueued) if the event was closed before."""
        now = _now()
        with self._tx(durable=True) as db:
            if db.execute("SELECT 1 FROM events WHERE id=?", (event_id,)).fetchone():
                return False
            db.execute("INSERT INTO events (id, summary, closed) VALUES (?, ?, ?)",
                       (event_id, json.dumps(summary, sort_keys=True, separators=(",", ":")), now))
            seqs = self._enqueue(db, list(messages), now)
        if seqs:
            self._notify()
        return True

    def state_counts(self) -> dict[str, int]:
        """Images per state. An earlier file at a reused path still counts as processed work
        (done/disposed), but not as quarantined: the file that replaced it is what counts."""
        counts = dict.fromkeys(STATES, 0)
        counts.update({r[0]: r[1] for r in self._read(
            "SELECT state, count(*) FROM images WHERE superseded IS NULL OR state IN ('done', 'disposed') "
            "GROUP BY state")})
        return counts

    def latest(self, n: int, *, state: str | None = None, with_result: bool = False) -> list[ImageRow]:
        """The ``n`` newest live images (oldest of them first), optionally in one ``state`` or
        only those with a result; ``n <= 0`` gives none."""
        if n <= 0:
            return []
        if state is not None and state not in STATES:
            raise ValueError(f"unknown image state {state!r}")
        where = ["superseded IS NULL", *(["state=?"] if state else []),
                 *(["result IS NOT NULL"] if with_result else [])]
        rows = self._read(f"SELECT * FROM images WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                          ([state] if state else []) + [int(n)])
        return [_image(r) for r in reversed(rows)]

    # -- outbox -----------------------------------------------------------------------------
    def enqueue(self, messages: Iterable[OutMsg]) -> list[int]:
        """Add messages that belong to no result (telemetry, status). Returns their seqs."""
        now = _now()
        with self._tx() as db:
            seqs = self._enqueue(db, list(messages), now)
        if seqs:
            self._notify()
        return seqs

    def _enqueue(self, db: sqlite3.Connection, msgs: list[OutMsg], now: float) -> list[int]:
        """Insert under the bound. Full outbox: drop the oldest status, then telemetry, then
        detection rows; if only alerts are left, refuse incoming non-alerts and keep incoming
        alerts beyond the bound (counted and logged as an alarm). Every drop is counted."""
        seqs: list[int] = []
        for m in msgs:
            depth = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            if depth >= self.max_outbox and not self._make_room(db, depth - self.max_outbox + 1):
                if m.kind != "alert":
                    _bump(db, DROP_COUNTER[m.kind])
                    log.error("outbox full (%d rows, alerts only): new %s message refused", depth, m.kind)
                    continue
                _bump(db, ALERT_OVER_BOUND)
                log.error("ALARM: outbox full of alerts (%d rows, bound %d): keeping the new alert beyond "
                          "the bound", depth, self.max_outbox)
            cur = db.execute("INSERT INTO outbox (topic, payload, qos, retain, kind, image_id, created) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (m.topic, m.payload, m.qos, int(m.retain), m.kind, m.image_id, now))
            seqs.append(_rowid(cur))
        return seqs

    def _make_room(self, db: sqlite3.Connection, need: int) -> bool:
        for kind in DROP_ORDER:
            if need <= 0:
                break
            gone = db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE kind=? "
                              "ORDER BY seq LIMIT ?)", (kind, need)).rowcount
            if gone:
                _bump(db, DROP_COUNTER[kind], gone)
                log.warning("outbox at its bound (%d): dropped the %d oldest %s message(s)",
                            self.max_outbox, gone, kind)
                need -= gone
        return need <= 0

    def pending(self, limit: int = 100, after: int = 0) -> list[OutMsg]:
        """Outbox rows in publish order (seq ascending), those with seq > ``after``."""
        rows = self._read("SELECT * FROM outbox WHERE seq>? ORDER BY seq LIMIT ?", (after, limit))
        return [OutMsg(kind=r["kind"], topic=r["topic"], payload=bytes(r["payload"]), qos=r["qos"],
                       retain=bool(r["retain"]), image_id=r["image_id"], seq=r["seq"], created=r["created"])
                for r in rows]

    def ack(self, seq: int) -> bool:
        """The broker has the message (PUBACK, or QoS 0 written): remove it. False if already gone
        (acked before, or dropped by the bound while in flight)."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM outbox WHERE seq=?", (seq,)).rowcount
        return bool(gone)

    def outbox_depth(self) -> int:
        return int(self._read("SELECT count(*) FROM outbox")[0][0])

    # -- counters ---------------------------------------------------------------------------
    def bump(self, name: str, n: int = 1) -> None:
        with self._tx() as db:
            _bump(db, name, n)

    def counters(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._read("SELECT name, value FROM counters ORDER BY name")}

    def integrity_ok(self) -> bool:
        return self._read("PRAGMA integrity_check")[0][0] == "ok"


def _bump(db: sqlite3.Connection, name: str, n: int = 1) -> None:
    db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
               "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, int(n)))


def _with_image(m: OutMsg, image_id: int) -> OutMsg:
    return OutMsg(kind=m.kind, topic=m.topic, payload=m.payload, qos=m.qos, retain=m.retain, image_id=image_id)


def _image(r: sqlite3.Row) -> ImageRow:
    return ImageRow(id=r["id"], path=_py_path(r["path"]), size=r["size"], mtime=r["mtime"], state=r["state"],
                    attempts=r["attempts"], sha256=r["sha256"],
                    result=json.loads(r["result"]) if r["result"] is not None else None,
                    event_id=r["event_id"], taken_at=r["taken_at"], disposal=r["disposal"], error=r["error"],
                    created=r["created"], updated=r["updated"], superseded=r["superseded"],
                    in_flight=r["in_flight"], suspect=bool(r["suspect"]))


def _split_sql(script: str) -> list[str]:
    """Split a schema script into statements, keeping trigger bodies (BEGIN ... END;) whole."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:60]}")
    return out
