"""The ledger: state machine, one result per image, the bounded outbox, and crash safety proven
by SIGKILLing a real writer process."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import edge.ledger as ledger_mod
from edge.ledger import DuplicateResult, Ledger, LedgerError, OutMsg

REPO = Path(__file__).resolve().parents[2]


def det(payload: str = "d", image_id: int | None = None) -> OutMsg:
    return OutMsg(kind="detection", topic="detections", payload=payload.encode(), image_id=image_id)


def msg(kind: str, payload: str) -> OutMsg:
    return OutMsg(kind=kind, topic=kind, payload=payload.encode())  # type: ignore[arg-type]


# -- schema ---------------------------------------------------------------------------------------
def test_fresh_ledger_is_wal_with_schema_version(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    db = sqlite3.connect(tmp_path / "l.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == ledger_mod.SCHEMA_VERSION
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"images", "outbox", "counters"} <= tables


def test_newer_schema_is_refused_and_foreign_db_too(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(LedgerError, match="newer"):
        Ledger(tmp_path / "l.db")
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE x (a)")
    with pytest.raises(LedgerError, match="not a camtrap ledger"):
        Ledger(tmp_path / "other.db")


def test_migration_hook_upgrades_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Ledger(tmp_path / "l.db") as led:
        iid = led.see("/a.jpg", 1, 1.0)
    current = ledger_mod.SCHEMA_VERSION
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(ledger_mod.MIGRATIONS, current, "ALTER TABLE images ADD COLUMN note TEXT;")
    with Ledger(tmp_path / "l.db") as led:
        assert led.get(iid) is not None  # data kept
    db = sqlite3.connect(tmp_path / "l.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert "note" in {r[1] for r in db.execute("PRAGMA table_info(images)")}


# -- images ---------------------------------------------------------------------------------------
def test_see_is_idempotent_and_reused_names_are_new_images(ledger: Ledger) -> None:
    a = ledger.see("/w/IMG_0001.JPG", 100, 1000.0)
    assert a is not None
    assert ledger.see("/w/IMG_0001.JPG", 100, 1000.0) == a  # still waiting: same id
    assert ledger.see("/w/IMG_0001.JPG", 150, 1001.0) == a  # grew before we got to it
    assert ledger.get(a).size == 150
    [row] = ledger.claim(5)
    assert row.id == a and row.state == "processing" and row.attempts == 0 and row.in_flight is None
    assert ledger.see("/w/IMG_0001.JPG", 150, 1001.0) is None  # being processed
    ledger.complete(a, {"empty": True}, [])
    assert ledger.see("/w/IMG_0001.JPG", 150, 1001.0) is None  # done: nothing to do, ever
    assert ledger.state_counts()["done"] == 1
    # the card was formatted and the camera reused the name: another file, another image
    b = ledger.see("/w/IMG_0001.JPG", 999, 5000.0)
    assert b is not None and b != a
    assert ledger.find("/w/IMG_0001.JPG").id == b
    assert ledger.get(a).result == {"empty": True}  # history kept
    assert ledger.state_counts() == {"seen": 1, "processing": 0, "done": 1, "disposed": 0, "quarantined": 0,
                                     "gone": 0}


def test_claim_takes_oldest_first_and_only_waiting(ledger: Ledger) -> None:
    ids = [ledger.see(f"/w/{i}.jpg", i, float(i)) for i in range(5)]
    assert [r.id for r in ledger.claim(2)] == ids[:2]
    assert [r.id for r in ledger.claim(10)] == ids[2:]
    assert ledger.claim(10) == []


def test_complete_writes_result_and_messages_together_once(ledger: Ledger) -> None:
    iid = ledger.see("/w/a.jpg", 1, 1.0)
    ledger.claim(1)
    seqs = ledger.complete(iid, {"sp": "lyn", "p": 0.93}, [det("one"), msg("alert", "lynx!")], event_id=7,
                           taken_at=123.0, counters={"processed": 1})
    assert len(seqs) == 2
    row = ledger.get(iid)
    assert (row.state, row.result, row.event_id, row.taken_at) == ("done", {"sp": "lyn", "p": 0.93}, 7, 123.0)
    pend = ledger.pending()
    assert [(m.seq, m.kind, m.payload, m.image_id) for m in pend] == [
        (seqs[0], "detection", b"one", iid), (seqs[1], "alert", b"lynx!", iid)]
    assert ledger.counters() == {"processed": 1}
    # one result per image, ever: the API refuses, and so does the database itself
    with pytest.raises(DuplicateResult):
        ledger.complete(iid, {"sp": "fox"}, [det("two")], counters={"processed": 1})
    assert ledger.outbox_depth() == 2 and ledger.counters() == {"processed": 1}  # nothing half-written
    db = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="one result per image"):
        db.execute("UPDATE images SET result='{}' WHERE id=?", (iid,))
    assert ledger.get(iid).result == {"sp": "lyn", "p": 0.93}


def test_complete_many_commits_a_batch_with_one_fsync_and_skips_a_refused_image(ledger: Ledger,
                                                                                  monkeypatch) -> None:
    from edge.ledger import Completion

    ids = [ledger.see(f"/w/{i}.jpg", 1, 1.0) for i in range(4)]
    ledger.claim(4)
    ledger.complete(ids[1], {"first": True})  # already has a result: refused in the batch, alone
    fulls: list[str] = []
    real = ledger._db.execute

    class Spy:  # counts the durable commits (synchronous=FULL, i.e. one WAL fsync each)
        def __getattr__(self, name):
            return getattr(ledger.__dict__["_real_db"], name)

        def execute(self, sql, *a):
            if sql == "PRAGMA synchronous=FULL":
                fulls.append(sql)
            return real(sql, *a)

    ledger.__dict__["_real_db"] = ledger._db
    monkeypatch.setattr(ledger, "_db", Spy())
    out = ledger.complete_many([Completion(i, {"n": i}, (det(f"d{i}"),), counters={"processed": 1}) for i in ids])
    assert len(fulls) == 1  # the issue measured two full-sync commits per frame
    assert isinstance(out[1], DuplicateResult) and all(isinstance(out[k], list) and out[k] for k in (0, 2, 3))
    assert [ledger.get(i).result for i in ids] == [{"n": ids[0]}, {"first": True}, {"n": ids[2]}, {"n": ids[3]}]
    assert ledger.outbox_depth() == 3 and ledger.counters() == {"processed": 3}  # the refused one left nothing


def test_complete_many_is_all_or_nothing_on_a_storage_error(ledger: Ledger, monkeypatch) -> None:
    from edge.ledger import Completion

    ids = [ledger.see(f"/w/{i}.jpg", 1, 1.0) for i in range(3)]
    ledger.claim(3)
    real = ledger._complete_in
    calls = []

    def failing(db, c, now):
        calls.append(c.image_id)
        if len(calls) == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real(db, c, now)

    monkeypatch.setattr(ledger, "_complete_in", failing)
    with pytest.raises(sqlite3.OperationalError):
        ledger.complete_many([Completion(i, {"n": i}, (det("x"),)) for i in ids])
    assert [ledger.get(i).state for i in ids] == ["processing"] * 3  # none durable: none may be disposed of
    assert ledger.outbox_depth() == 0


def test_transitions_are_checked(ledger: Ledger) -> None:
    iid = ledger.see("/w/a.jpg", 1, 1.0)
    with pytest.raises(LedgerError, match="not done"):
        ledger.mark_disposed(iid, "deleted")
    ledger.complete(iid, {"empty": True})
    ledger.mark_disposed(iid, "deleted")
    assert ledger.get(iid).state == "disposed" and ledger.get(iid).disposal == "deleted"
    with pytest.raises(DuplicateResult):
        ledger.complete(iid, {"empty": True})
    with pytest.raises(LedgerError):
        ledger.quarantine(iid, "late")
    bad = ledger.see("/w/b.jpg", 0, 1.0)
    ledger.quarantine(bad, "zero bytes")
    ledger.quarantine(bad, "zero bytes")  # idempotent
    assert ledger.get(bad).state == "quarantined" and ledger.get(bad).error == "zero bytes"
    assert ledger.state_counts()["quarantined"] == 1 and "quarantined" not in ledger.counters()
    assert ledger.see("/w/b.jpg", 0, 1.0) is None  # not retried by the next scan
    with pytest.raises(LedgerError, match="no image"):
        ledger.complete(12345, {})


def test_recover_blames_only_what_was_in_flight(tmp_path: Path) -> None:
    """Claimed but waiting (the read-ahead) is not in flight: a crash then blames nobody.
    Several frames in flight together become suspects, with no crash counted against any."""
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        ids = [led.see(f"/w/{k}.jpg", 1, float(k)) for k in range(6)]
        led.claim(6)
        led.in_flight(ids[:2], "inference")  # in the engine; ids[2:] wait in the queue
    with Ledger(path) as led:
        assert led.recover() == (6, 0)
        rows = {r.id: r for r in led.images()}
        assert all(r.state == "seen" and r.attempts == 0 and r.in_flight is None for r in rows.values())
        assert [i for i in ids if rows[i].suspect] == ids[:2]
        # suspects are claimed one at a time; a batch stops before a suspect
        assert [r.id for r in led.claim(4)] == [ids[0]]
        assert [r.id for r in led.claim(4)] == [ids[1]]
        assert [r.id for r in led.claim(4)] == ids[2:]
        led.in_flight(ids[2:], "decode")
        led.in_flight(ids[2:], None)  # decoded, then waiting again: no blame
        assert led.recover() == (6, 0)
        assert all(r.attempts == 0 for r in led.images())


def test_a_poison_frame_is_isolated_and_quarantined_alone(tmp_path: Path) -> None:
    """The daemon dies whenever the poison frame is decoded: the first time it shares the decoder
    with a good frame (both suspects), then each is tried alone; only the poison is quarantined,
    after MAX_CRASHES crashes while alone in flight."""
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        good = led.see("/w/good.jpg", 1, 1.0)
        bomb = led.see("/w/bomb.jpg", 1, 2.0)
        later = led.see("/w/later.jpg", 1, 3.0)
    deaths = 0
    for _ in range(10):
        with Ledger(path) as led:
            led.recover()
            while rows := led.claim(4):
                led.in_flight([r.id for r in rows], "decode")
                if any(r.id == bomb for r in rows):
                    break  # the process dies here, marks left as they are
                for r in rows:
                    led.complete(r.id, {"empty": True})
            else:
                break
            deaths += 1
    with Ledger(path) as led:
        assert led.get(good).state == "done" and led.get(later).state == "done"
        b = led.get(bomb)
        assert b.state == "quarantined" and b.attempts == ledger_mod.MAX_CRASHES
        assert "alone in the decoder" in b.error
        assert led.state_counts()["quarantined"] == 1
        assert deaths == 1 + ledger_mod.MAX_CRASHES  # once with company, then alone each time
        assert led.recover() == (0, 0)


def test_requeue_gives_quarantined_frames_another_try_alone(ledger: Ledger) -> None:
    a = ledger.see("/w/a.jpg", 1, 1.0)
    b = ledger.see("/w/b.jpg", 1, 2.0)
    c = ledger.see("/w/c.jpg", 1, 3.0)
    ledger.quarantine(a, "crashed")
    ledger.quarantine(b, "unreadable")
    with pytest.raises(LedgerError, match="not quarantined"):
        ledger.requeue(["/w/c.jpg"])
    with pytest.raises(LedgerError, match="not in the ledger"):
        ledger.requeue(["/w/zzz.jpg"])
    assert [r.id for r in ledger.requeue(["/w/b.jpg"])] == [b]
    assert ledger.get(b).state == "seen" and ledger.get(b).suspect and ledger.get(b).error is None
    assert [r.id for r in ledger.requeue()] == [a]
    assert [r.id for r in ledger.claim(5)] == [a]  # alone: a requeued frame may be a real poison
    assert ledger.get(c).state == "seen"


def test_release_puts_claimed_frames_back_without_blame(ledger: Ledger) -> None:
    ids = [ledger.see(f"/w/{k}.jpg", 1, float(k)) for k in range(3)]
    ledger.claim(3)
    ledger.in_flight(ids, "inference")
    assert ledger.release(ids[:1]) == 1
    assert ledger.release() == 2
    assert all(r.state == "seen" and r.in_flight is None and not r.suspect and r.attempts == 0
               for r in ledger.images())


def test_a_replaced_quarantined_file_no_longer_counts(ledger: Ledger) -> None:
    bad = ledger.see("/w/a.jpg", 10, 1.0)
    ledger.quarantine(bad, "truncated upload")
    assert ledger.state_counts()["quarantined"] == 1
    good = ledger.see("/w/a.jpg", 2000, 2.0)  # uploaded again, complete this time
    ledger.complete(good, {"empty": True})
    assert ledger.state_counts()["quarantined"] == 0 and ledger.state_counts()["done"] == 1
    assert ledger.latest(5, state="quarantined") == []
    assert [r.id for r in ledger.latest(5, with_result=True)] == [good]
    assert ledger.latest(0) == []


# -- outbox ---------------------------------------------------------------------------------------
def test_pending_ack_and_order(ledger: Ledger) -> None:
    seqs = ledger.enqueue([msg("telemetry", f"t{i}") for i in range(5)])
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert [m.payload for m in ledger.pending(2)] == [b"t0", b"t1"]
    assert [m.payload for m in ledger.pending(10, after=seqs[2])] == [b"t3", b"t4"]
    assert ledger.ack(seqs[0]) and not ledger.ack(seqs[0])
    assert ledger.outbox_depth() == 4
    more = ledger.enqueue([msg("telemetry", "t5")])
    assert more[0] > seqs[-1]  # seqs never go back, even after deletes (AUTOINCREMENT)


def test_outbox_bound_drops_telemetry_then_detections_never_alerts(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    led = Ledger(tmp_path / "l.db", max_outbox=5)
    led.enqueue([msg("telemetry", "t1"), msg("detection", "d1"), msg("alert", "a1"), msg("telemetry", "t2"),
                 msg("detection", "d2")])
    assert led.outbox_depth() == 5

    def payloads() -> list[bytes]:
        return [m.payload for m in led.pending(100)]

    led.enqueue([msg("detection", "d3")])  # full: the oldest telemetry goes first
    assert payloads() == [b"d1", b"a1", b"t2", b"d2", b"d3"]
    led.enqueue([msg("alert", "a2")])
    assert payloads() == [b"d1", b"a1", b"d2", b"d3", b"a2"]
    assert led.counters() == {"dropped_telemetry": 2}
    led.enqueue([msg("telemetry", "t3")])  # no telemetry left: the oldest detection goes
    assert payloads() == [b"a1", b"d2", b"d3", b"a2", b"t3"]
    led.enqueue([msg("alert", f"a{i}") for i in range(3, 6)])
    assert payloads() == [b"a1", b"a2", b"a3", b"a4", b"a5"]
    assert led.counters() == {"dropped_telemetry": 3, "dropped_detections": 3}
    # only alerts left: others are refused (counted), alerts are kept beyond the bound (alarm)
    caplog.set_level(logging.ERROR, logger="edge.ledger")
    iid = led.see("/w/x.jpg", 1, 1.0)
    led.complete(iid, {"sp": "fox"}, [det("d9")])
    assert led.get(iid).state == "done"  # the result still commits
    led.enqueue([msg("telemetry", "t9")])
    led.enqueue([msg("alert", "a6")])
    assert payloads() == [b"a1", b"a2", b"a3", b"a4", b"a5", b"a6"]
    assert led.counters() == {"dropped_telemetry": 4, "dropped_detections": 4, "alerts_over_bound": 1}
    assert any("ALARM" in r.getMessage() for r in caplog.records)
    led.close()


def test_message_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        OutMsg(kind="gossip", topic="x", payload=b"")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="qos"):
        OutMsg(kind="alert", topic="x", payload=b"", qos=3)
    assert OutMsg(kind="alert", topic="x", payload="ü").payload == "ü".encode()  # type: ignore[arg-type]


def test_listener_is_called_after_commit(ledger: Ledger) -> None:
    seen: list[int] = []
    ledger.add_outbox_listener(lambda: seen.append(ledger.outbox_depth()))
    iid = ledger.see("/w/a.jpg", 1, 1.0)
    ledger.complete(iid, {"empty": True}, [])  # no messages: no wake-up
    ledger.enqueue([msg("telemetry", "t")])
    assert seen == [1]  # called once, and the row was visible to it


# -- concurrency ----------------------------------------------------------------------------------
def test_two_threads_and_a_second_connection(tmp_path: Path) -> None:
    """Workers race over the same files through one shared Ledger and a second connection:
    each image is claimed and completed exactly once, nobody sees 'database is locked'."""
    path = tmp_path / "l.db"
    shared = Ledger(path)
    other = Ledger(path)
    errors: list[BaseException] = []
    done: list[int] = []
    lock = threading.Lock()

    def worker(led: Ledger, tag: str) -> None:
        try:
            for i in range(120):
                led.see(f"/w/common_{i:03d}.jpg", 10, float(i))  # every worker reports the same files
                led.see(f"/w/{tag}_{i:03d}.jpg", 10, float(i))
                for row in led.claim(2):
                    led.complete(row.id, {"by": tag}, [det(f"{row.id}")], counters={"processed": 1})
                    with lock:
                        done.append(row.id)
                if i % 10 == 0:
                    for m in led.pending(5):
                        led.ack(m.seq)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(shared, "a")), threading.Thread(target=worker, args=(shared, "b")),
               threading.Thread(target=worker, args=(other, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for row in shared.claim(10_000):  # what the workers left waiting
        shared.complete(row.id, {"by": "main"}, [det(f"{row.id}")], counters={"processed": 1})
        done.append(row.id)
    rows = shared.images()
    assert len(rows) == 120 * 4  # 120 common + 3 x 120 own, no duplicates from concurrent see()
    assert sorted(done) == sorted(r.id for r in rows)  # each completed exactly once
    assert all(r.state == "done" for r in rows)
    assert shared.counters()["processed"] == len(rows)
    assert shared.integrity_ok()
    shared.close()
    other.close()


# -- crash safety ---------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import json, sys
    from edge.ledger import Ledger, OutMsg
    led = Ledger(sys.argv[1])
    led.recover(max_attempts=1000)
    i = int(sys.argv[2])
    while True:
        led.see(f"/cam/IMG_{i:06d}.JPG", 1000 + i, 1.0e9 + i)
        i += 1
        for row in led.claim(2):
            body = json.dumps({"img": row.id}).encode()
            led.complete(row.id, {"img": row.id, "path": row.path},
                         [OutMsg("detection", "detections", body), OutMsg("alert", "alerts", body)],
                         counters={"processed": 1})
""")


def _done(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM images WHERE state='done'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()


def test_sigkill_while_writing_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    """A child writes results in a tight loop and is SIGKILLed at random moments, five times.
    After each death: every image has zero or one result, every result has exactly its two
    outbox rows and no outbox row lacks its result, counters match; then everything redone
    finishes with one result per image."""
    path = tmp_path / "l.db"
    rng = random.Random(4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kills, next_index = 0, 0
    for _round in range(5):
        before = _done(path)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(next_index)], env=env)
        try:
            deadline = time.monotonic() + 30
            while _done(path) < before + 15 and time.monotonic() < deadline:
                assert child.poll() is None, "writer died on its own"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        kills += 1
        assert _done(path) >= before + 15, "writer made no progress"
        next_index += 100_000

        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with_result = db.execute("SELECT count(*) FROM images WHERE result IS NOT NULL").fetchone()[0]
        done = db.execute("SELECT count(*) FROM images WHERE state='done'").fetchone()[0]
        assert with_result == done
        # no result without its two messages, no message without its result
        bad = db.execute("""SELECT i.id, i.state, count(o.seq) FROM images i LEFT JOIN outbox o ON o.image_id=i.id
                            GROUP BY i.id HAVING (i.state='done') != (count(o.seq)=2)
                                             OR count(o.seq) NOT IN (0, 2)""").fetchall()
        assert bad == []
        orphans = db.execute("SELECT count(*) FROM outbox WHERE image_id NOT IN "
                             "(SELECT id FROM images WHERE result IS NOT NULL)").fetchone()[0]
        assert orphans == 0
        processed = db.execute("SELECT value FROM counters WHERE name='processed'").fetchone()[0]
        assert processed == done
        db.close()
    assert kills == 5

    with Ledger(path) as led:
        led.recover(max_attempts=1000)
        while batch := led.claim(1_000_000):  # suspects come one at a time
            for row in batch:
                led.complete(row.id, {"img": row.id}, [det(json.dumps({"img": row.id}))], counters={"processed": 1})
        rows = led.images()
        assert rows and all(r.state == "done" and r.result is not None for r in rows)
        assert led.counters()["processed"] == len(rows)
        assert len({r.path for r in rows}) == len(rows)


# -- events ---------------------------------------------------------------------------------------
def test_an_event_is_closed_once_with_its_message(ledger: Ledger) -> None:
    ids = [ledger.see(f"/w/{k}.jpg", 1, float(k)) for k in range(3)]
    ledger.claim(3)
    for k, iid in enumerate(ids):
        ledger.complete(iid, {"species": "lynx", "k": k}, [], event_id=7 if k < 2 else 8)
    assert ledger.unclosed_events() == [7, 8]
    assert [r["k"] for r in ledger.event_results(7)] == [0, 1]
    msg = OutMsg("detection", "events", b"{}")
    assert ledger.close_event(7, {"species": "lynx"}, [msg]) is True
    assert ledger.close_event(7, {"species": "lynx"}, [msg]) is False  # never twice
    assert ledger.unclosed_events() == [8]
    assert ledger.outbox_depth() == 1
    assert ledger.max_event_id() == 8


def _ledger_at(path: Path, version: int) -> sqlite3.Connection:
    """An open SQLite file holding the ledger schema as version ``version`` left it (the first
    schema, then the migrations up to it), for the migration tests to fill and close."""
    db = sqlite3.connect(path)
    for stmt in ledger_mod._split_sql(ledger_mod._SCHEMA_V1):
        db.execute(stmt)
    for v in range(1, version):
        for stmt in ledger_mod._split_sql(ledger_mod.MIGRATIONS[v]):  # type: ignore[arg-type]
            db.execute(stmt)
    db.execute(f"PRAGMA user_version={version}")
    return db


def test_v1_ledger_is_migrated_to_events_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = _ledger_at(path, 1)
    db.commit()
    db.close()
    with Ledger(path) as led:
        assert led.unclosed_events() == []
        assert led.close_event(1, {}, []) is True


def test_v2_ledger_is_migrated_and_old_claim_counts_are_cleared(tmp_path: Path) -> None:
    """Before v3, ``attempts`` counted claims (read-ahead rows were blamed for other frames'
    crashes): those counts are cleared, a quarantine stays."""
    path = tmp_path / "old.db"
    db = _ledger_at(path, 2)
    db.execute("INSERT INTO images (path, size, mtime, state, attempts, created, updated) "
               "VALUES ('/w/a.jpg', 1, 1, 'seen', 2, 0, 0), ('/w/b.jpg', 1, 1, 'quarantined', 3, 0, 0)")
    db.commit()
    db.close()
    with Ledger(path) as led:
        a, b = led.images()
        assert (a.attempts, a.suspect, a.in_flight) == (0, False, None)
        assert (b.state, b.attempts) == ("quarantined", 3)


def test_an_up_to_date_ledger_opens_without_writing(tmp_path: Path) -> None:
    """So the daemon can start on a full disk and wait for space (a write would fail)."""
    Ledger(tmp_path / "l.db").close()
    with Ledger(tmp_path / "l.db") as led:
        assert os.path.getsize(tmp_path / "l.db-wal") == 0
        assert led.state_counts()["seen"] == 0


def test_a_path_that_is_not_utf8_is_recorded_and_found(ledger: Ledger) -> None:
    odd = os.fsdecode(b"/w/latin1-\xe9t\xe9.jpg")  # surrogate-escaped, as os.listdir returns it
    iid = ledger.see(odd, 10, 1.0)
    assert iid is not None and ledger.see(odd, 10, 1.0) == iid
    assert ledger.find(odd).path == odd and ledger.get(iid).path == odd
    assert os.fsencode(ledger.get(iid).path) == b"/w/latin1-\xe9t\xe9.jpg"


def test_a_frame_that_crashed_alone_waits_behind_the_others(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        bad = led.see("/w/bad.jpg", 1, 1.0)
        [row] = led.claim(4)
        led.in_flight([row.id], "decode")  # alone in the decoder when the process died
    with Ledger(path) as led:
        led.recover()
        assert led.get(bad).attempts == 1
        fresh = [led.see(f"/w/new{k}.jpg", 1, 2.0) for k in range(2)]
        assert [r.id for r in led.claim(4, offenders=False)] == fresh
        assert led.claim(4, offenders=False) == []  # just after a start: not yet
        assert [r.id for r in led.claim(4)] == [bad]


def test_waiting_in_names_the_folders_with_frames_still_to_process(ledger: Ledger) -> None:
    ledger.see("/w/cam1/A.JPG", 100, 1000.0)
    ledger.see("/w/cam1/sub/B.JPG", 100, 1000.0)
    ledger.see("/w/cam2/C.JPG", 100, 1000.0)
    folders = ["/w/cam1", "/w/cam2", "/w/cam3"]
    assert ledger.waiting_in(folders) == {"/w/cam1", "/w/cam2"}
    rows = ledger.claim(5)  # processing still waits
    assert ledger.waiting_in(folders) == {"/w/cam1", "/w/cam2"}
    for r in rows:
        if r.path != "/w/cam1/sub/B.JPG":
            ledger.complete(r.id, {"empty": True}, [])
    assert ledger.waiting_in(folders) == set() and ledger.waiting_in(["/w/cam1/sub"]) == {"/w/cam1/sub"}


def test_v3_ledger_is_migrated_and_waiting_frames_keep_their_folder(tmp_path: Path) -> None:
    """v4 stores each image's folder for ``waiting_in``: a v3 ledger's waiting rows (a backlog
    left by the old version, a Latin-1 name among them) still hold their camera's events open."""
    path = tmp_path / "old.db"
    db = _ledger_at(path, 3)
    latin = os.fsencode("/w/c\udce9m/a.jpg")  # not UTF-8: stored as a BLOB
    db.execute("INSERT INTO images (path, size, mtime, state, created, updated) VALUES "
               "('/w/cam1/a.jpg', 1, 1, 'seen', 0, 0), ('/w/cam2/b.jpg', 1, 1, 'processing', 0, 0), "
               "(?, 1, 1, 'seen', 0, 0)",
               (latin,))
    db.commit()
    db.close()
    with Ledger(path) as led:
        assert led.waiting_in(["/w/cam1", "/w/cam2", "/w/c\udce9m", "/w/cam3"]) == {"/w/cam1", "/w/cam2",
                                                                                      "/w/c\udce9m"}


def test_waiting_in_is_one_index_lookup_per_folder(ledger: Ledger) -> None:
    """It read every waiting path (a 100k-frame backlog: 100k rows) each tick an event idled.
    Now the partial index of waiting rows answers each folder, whatever the backlog."""
    for k in range(2000):
        ledger.see(f"/w/cam1/{k:05d}.jpg", 1, 1.0)
    plan = " ".join(r[-1] for r in ledger._read(
        "EXPLAIN QUERY PLAN SELECT 1 FROM images WHERE folder=? AND state IN ('seen', 'processing') "
        "AND superseded IS NULL LIMIT 1", ("/w/cam1",)))
    assert "USING INDEX images_waiting" in plan, plan
    t = time.perf_counter()
    for _ in range(100):
        assert ledger.waiting_in(["/w/cam1", "/w/cam2"]) == {"/w/cam1"}
    assert time.perf_counter() - t < 1.0  # 100 questions; reading 2,000 paths each took longer
    for r in ledger.claim(2000):
        ledger.complete(r.id, {"empty": True})
    assert ledger.waiting_in(["/w/cam1"]) == set()


def test_claim_can_mark_the_batch_in_flight_but_never_a_suspect(ledger: Ledger) -> None:
    """One transaction for claim + in_flight('decode'); a suspect enters flight only once
    nothing else is in flight, so the caller marks it itself."""
    ids = [ledger.see(f"/w/{k}.jpg", 1, 1.0) for k in range(4)]
    rows = ledger.claim(2, stage="decode")
    assert [r.in_flight for r in rows] == ["decode", "decode"]
    assert all(ledger.get(i).in_flight == "decode" for i in ids[:2])  # type: ignore[union-attr]
    ledger.recover()  # two in flight together: both suspects
    [alone] = ledger.claim(4, stage="decode")
    assert alone.suspect and alone.in_flight is None and ledger.get(alone.id).in_flight is None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="stage"):
        ledger.claim(1, stage="engine")


def test_mark_disposed_many_records_a_batch_and_its_counters_at_once(ledger: Ledger) -> None:
    ids = [ledger.see(f"/w/{k}.jpg", 1, 1.0) for k in range(3)]
    for r in ledger.claim(3):
        ledger.complete(r.id, {"empty": True})
    ledger.mark_disposed_many([(ids[0], "deleted"), (ids[1], "kept")], {"discarded": 1})
    ledger.mark_disposed_many([(ids[0], "kept")])  # disposed already (a redo): left as it was
    assert [(r.state, r.disposal) for r in ledger.images()] == [("disposed", "deleted"), ("disposed", "kept"),
                                                                 ("done", None)]
    assert ledger.counters()["discarded"] == 1


def _v3_ledger(path: Path) -> None:
    """A ledger as schema 3 left it: a quarantined frame requeued and quarantined again (the
    old counter said 2), and a waiting frame."""
    db = _ledger_at(path, 3)
    db.execute("INSERT INTO images (path, size, mtime, state, attempts, error, created, updated) "
               "VALUES ('/w/a.jpg', 1, 1, 'seen', 0, NULL, 0, 0), ('/w/b.jpg', 1, 1, 'quarantined', 0, 'bad', 0, 0)")
    db.execute("INSERT INTO counters (name, value) VALUES ('quarantined', 2), ('empty', 4)")
    db.commit()
    db.close()


def test_v3_ledger_is_migrated_to_the_gone_state_and_one_quarantine_count(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _v3_ledger(path)
    with Ledger(path) as led:
        assert led.state_counts()["quarantined"] == 1 and led.counters() == {"empty": 4}
        a = led.find("/w/a.jpg")
        assert a is not None and led.mark_gone([a.id]) == [a.id]
        assert led.integrity_ok()
    with Ledger(path) as led:  # the widened CHECK holds after a reopen, and still refuses junk
        assert led.get(a.id).state == "gone"
        with pytest.raises(sqlite3.IntegrityError):
            led._db.execute("UPDATE images SET state='lost' WHERE id=?", (a.id,))


def test_a_frame_whose_file_went_away_is_gone_not_quarantined(ledger: Ledger) -> None:
    """Waiting or claimed frames become gone (with the reason); done ones are left alone; a file
    that comes back at the path is processed again; gone frames are counted apart."""
    waiting = ledger.see("/w/a.jpg", 1, 1.0)
    claimed = ledger.see("/w/b.jpg", 1, 2.0)
    done = ledger.see("/w/c.jpg", 1, 3.0)
    assert waiting and claimed and done
    assert [r.id for r in ledger.claim(3)] == [waiting, claimed, done]
    ledger.complete(done, {"empty": True})
    ledger.release([waiting])
    assert sorted(ledger.mark_gone([waiting, claimed, done])) == sorted([waiting, claimed])
    assert ledger.get(done).state == "done"
    g = ledger.get(waiting)
    assert (g.state, g.error, g.in_flight) == ("gone", ledger_mod.GONE, None)
    counts = ledger.state_counts()
    assert (counts["gone"], counts["quarantined"], counts["seen"]) == (2, 0, 0)
    assert ledger.claim(5) == []  # nothing to read
    with pytest.raises(LedgerError):
        ledger.requeue(["/w/a.jpg"])  # not quarantined: requeue is for bad images
    assert ledger.see("/w/a.jpg", 5, 9.0) == waiting  # the file is back: processed as if it never left
    back = ledger.get(waiting)
    assert (back.state, back.error, back.size) == ("seen", None, 5)
