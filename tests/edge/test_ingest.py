"""edge.ingest with real inotify (and the polling observer) on real files in tmp dirs.

No timing assertions: tests wait (up to a generous deadline) for what must happen, and give a
short quiet window before asserting that something did NOT happen a second time.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from edge.imageio import file_complete
from edge.ingest import Ingest

sys.path.insert(0, str(Path(__file__).parent))
from badinputs import make_bad_corpus, real_frames

SETTLE = 0.2
QUIET = 0.6  # how long "nothing more happens" is watched
DEADLINE = 15.0


class Sink:
    """Collects callbacks; records whether each candidate was complete when it was passed on."""

    def __init__(self):
        self.cv = threading.Condition()
        self.candidates: list[Path] = []
        self.complete_at_call: dict[Path, bool] = {}
        self.rejects: list[tuple[Path, str]] = []

    def on_candidate(self, p: Path) -> None:
        ok = file_complete(p)
        with self.cv:
            self.candidates.append(p)
            self.complete_at_call[p] = ok
            self.cv.notify_all()

    def on_reject(self, p: Path, reason: str) -> None:
        with self.cv:
            self.rejects.append((p, reason))
            self.cv.notify_all()

    def wait(self, pred, timeout: float = DEADLINE) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: pred(self), timeout)

    def names(self) -> list[str]:
        with self.cv:
            return [p.name for p in self.candidates]


def ingest(sink: Sink, *folders: Path, **kw) -> Ingest:
    kw.setdefault("settle", SETTLE)
    kw.setdefault("reconcile_every", 3600.0)
    return Ingest(list(folders), sink.on_candidate, on_reject=sink.on_reject, **kw)


@pytest.fixture()
def jpeg() -> bytes:
    return real_frames()[0].read_bytes()


def test_write_in_place_in_chunks_gives_one_candidate_after_close(tmp_path, jpeg):
    watch = tmp_path / "watch"
    watch.mkdir()
    sink = Sink()
    with ingest(sink, watch):
        time.sleep(0.3)  # let the start-up scan finish on an empty folder
        target = watch / "IMG_0001.JPG"
        with open(target, "wb") as f:
            for i in range(0, len(jpeg), 60_000):
                assert sink.candidates == []  # the file so far is a prefix: nothing passed on
                f.write(jpeg[i:i + 60_000])
                f.flush()
                if i + 60_000 < len(jpeg):
                    time.sleep(3 * SETTLE / 2)  # pauses longer than 'settle' fool a size-only check
        assert sink.wait(lambda s: len(s.candidates) >= 1)
        time.sleep(QUIET)
    assert sink.candidates == [target]
    assert sink.complete_at_call[target]


def test_rename_into_place_from_sibling_dir(tmp_path, jpeg):
    watch, staging = tmp_path / "watch", tmp_path / "staging"
    watch.mkdir()
    staging.mkdir()
    sink = Sink()
    with ingest(sink, watch):
        time.sleep(0.3)
        (staging / "IMG_2.JPG").write_bytes(jpeg)
        os.rename(staging / "IMG_2.JPG", watch / "IMG_2.JPG")  # a move in from outside the tree
        assert sink.wait(lambda s: len(s.candidates) >= 1)
        time.sleep(QUIET)
    assert sink.candidates == [watch / "IMG_2.JPG"] and sink.complete_at_call[watch / "IMG_2.JPG"]


@pytest.mark.parametrize("how", ["close_write", "move_in_file", "move_in_folder"])
def test_complete_files_skip_settling(tmp_path, jpeg, how):
    """Closed after writing, or moved in from outside the watched tree (alone or in a folder):
    passed on at once, not after ``settle`` (here 60 s, far beyond the deadline). A move-in
    from outside used to arrive as a bare creation and wait for settling."""
    watch, outside = tmp_path / "watch", tmp_path / "outside"
    watch.mkdir()
    (outside / "card").mkdir(parents=True)
    sink = Sink()
    with ingest(sink, watch, settle=60.0, stale_s=120.0):
        time.sleep(0.3)
        if how == "close_write":
            want = [watch / "IMG_1.JPG"]
            want[0].write_bytes(jpeg)
        elif how == "move_in_file":
            (outside / "IMG_1.JPG").write_bytes(jpeg)
            os.rename(outside / "IMG_1.JPG", watch / "IMG_1.JPG")
            want = [watch / "IMG_1.JPG"]
        else:
            for n in (1, 2):
                (outside / "card" / f"IMG_{n}.JPG").write_bytes(jpeg)
            os.rename(outside / "card", watch / "card")
            want = [watch / "card" / "IMG_1.JPG", watch / "card" / "IMG_2.JPG"]
        assert sink.wait(lambda s: len(s.candidates) >= len(want), timeout=10.0), sink.names()
        time.sleep(QUIET)
    assert sorted(sink.candidates) == want


def test_closed_file_is_due_at_once_without_debounce(tmp_path, jpeg):
    """No debounce after close-write (it was 50 ms of the 60 ms from close to message)."""
    watch = tmp_path / "watch"
    watch.mkdir()
    ing = ingest(Sink(), watch, settle=60.0)  # not started: only the bookkeeping is looked at
    p = str(watch / "IMG_1.JPG")
    before = time.monotonic()
    ing._note(p, complete=True)
    assert ing._pending[p].due <= before + 0.001
    ing._note(str(watch / "IMG_2.JPG"), complete=False)
    assert ing._pending[str(watch / "IMG_2.JPG")].due >= before + 60.0


def test_rsync_style_hidden_temp_then_rename(tmp_path, jpeg):
    watch = tmp_path / "watch"
    (watch / "cam3").mkdir(parents=True)
    sink = Sink()
    with ingest(sink, watch):
        time.sleep(0.3)
        tmp = watch / "cam3" / ".IMG_3.JPG.Xa81kq"
        with open(tmp, "wb") as f:
            f.write(jpeg[:100_000])
            f.flush()
            time.sleep(SETTLE * 2)
            f.write(jpeg[100_000:])
        os.rename(tmp, watch / "cam3" / "IMG_3.JPG")
        assert sink.wait(lambda s: len(s.candidates) >= 1)
        time.sleep(QUIET)
    assert sink.candidates == [watch / "cam3" / "IMG_3.JPG"]


def test_startup_scan_finds_existing_files_and_ignores_junk_names(tmp_path, jpeg):
    watch = tmp_path / "watch"
    (watch / "sub" / "deeper").mkdir(parents=True)
    (watch / ".hidden-dir").mkdir()
    for rel in ["A.JPG", "b.jpeg", "sub/c.Png", "sub/deeper/d.jpg"]:
        (watch / rel).write_bytes(jpeg)
    for rel in [".e.jpg", "f.jpg.part", "~g.jpg", "h.jpg~", "i.tmp", "notes.txt", ".hidden-dir/j.jpg",
                "k.jpg.camtrap-partial"]:
        (watch / rel).write_bytes(jpeg)
    sink = Sink()
    with ingest(sink, watch):
        assert sink.wait(lambda s: len(s.candidates) >= 4)
        time.sleep(QUIET)
    assert sorted(sink.names()) == ["A.JPG", "b.jpeg", "c.Png", "d.jpg"]

    sink2 = Sink()  # non-recursive: only the top level
    with ingest(sink2, watch, recursive=False):
        assert sink2.wait(lambda s: len(s.candidates) >= 2)
        time.sleep(QUIET)
    assert sorted(sink2.names()) == ["A.JPG", "b.jpeg"]


def test_file_created_while_down_found_at_next_start(tmp_path, jpeg):
    watch = tmp_path / "watch"
    watch.mkdir()
    sink = Sink()
    with ingest(sink, watch):
        (watch / "one.jpg").write_bytes(jpeg)
        assert sink.wait(lambda s: len(s.candidates) >= 1)
    (watch / "two.jpg").write_bytes(jpeg)  # the daemon is down
    with ingest(sink, watch):
        assert sink.wait(lambda s: "two.jpg" in s.names())


def test_reconcile_finds_what_events_missed(tmp_path, jpeg):
    """Lost events (inotify queue overflow) are simulated by stopping the observer only."""
    watch = tmp_path / "watch"
    watch.mkdir()
    sink = Sink()
    ing = ingest(sink, watch, reconcile_every=0.5)
    with ing:
        time.sleep(0.3)
        ing._observer.stop()  # events stop flowing; the worker (and its reconcile) keeps going
        ing._observer.join()
        (watch / "missed.jpg").write_bytes(jpeg)
        assert sink.wait(lambda s: len(s.candidates) >= 1)
        time.sleep(QUIET)  # several more reconciles: the same version is not passed on again
    assert sink.names() == ["missed.jpg"]
    assert ing.counts["scans"] >= 3


def test_symlinks_outside_refused_inside_followed(tmp_path, jpeg):
    watch, outside = tmp_path / "watch", tmp_path / "outside"
    watch.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg)
    (watch / "real.jpg").write_bytes(jpeg)
    (watch / "out-link.jpg").symlink_to(outside / "secret.jpg")
    (watch / "in-link.jpg").symlink_to(watch / "real.jpg")
    (watch / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    sink = Sink()
    ing = ingest(sink, watch, reconcile_every=0.4)
    with ing:
        assert sink.wait(lambda s: len(s.rejects) >= 2 and len(s.candidates) >= 1)
        (watch / "late-out.jpg").symlink_to(outside / "secret.jpg")  # arrives as an event
        assert sink.wait(lambda s: len(s.rejects) >= 3)
        time.sleep(QUIET)  # reconciles keep finding them: reported once only
    assert sink.candidates == [watch / "real.jpg"]  # the inside link resolves to the same file
    reasons = dict((p.name, r) for p, r in sink.rejects)
    assert len(sink.rejects) == 3 and set(reasons) == {"out-link.jpg", "dangling.jpg", "late-out.jpg"}
    assert "outside the watch folder" in reasons["out-link.jpg"] and "dangling" in reasons["dangling.jpg"]
    assert ing.counts["rejected"] == 3


def test_polling_observer(tmp_path, jpeg):
    watch = tmp_path / "watch"
    watch.mkdir()
    sink = Sink()
    with ingest(sink, watch, polling=True, poll_interval=0.2):
        time.sleep(0.3)
        with open(watch / "p.jpg", "wb") as f:  # written slowly: polls see it growing
            for i in range(0, len(jpeg), 100_000):
                f.write(jpeg[i:i + 100_000])
                f.flush()
                time.sleep(0.15)
        assert sink.wait(lambda s: len(s.candidates) >= 1)
        time.sleep(QUIET)
    assert sink.candidates == [watch / "p.jpg"] and sink.complete_at_call[watch / "p.jpg"]


def test_folder_moved_in_and_multiple_roots(tmp_path, jpeg):
    w1, w2, card = tmp_path / "w1", tmp_path / "w2", tmp_path / "sdcard" / "DCIM"
    w1.mkdir()
    w2.mkdir()
    card.mkdir(parents=True)
    for i in range(3):
        (card / f"IMG_{i}.JPG").write_bytes(jpeg)
    sink = Sink()
    with ingest(sink, w1, w2):
        time.sleep(0.3)
        shutil.move(str(card), str(w2 / "DCIM"))
        (w1 / "x.jpg").write_bytes(jpeg)
        assert sink.wait(lambda s: len(s.candidates) >= 4)
        time.sleep(QUIET)
    assert sorted(str(p.relative_to(tmp_path)) for p in sink.candidates) == [
        "w1/x.jpg", "w2/DCIM/IMG_0.JPG", "w2/DCIM/IMG_1.JPG", "w2/DCIM/IMG_2.JPG"]


def test_excluded_subtree_and_rewritten_file(tmp_path, jpeg):
    watch = tmp_path / "watch"
    (watch / "quarantine").mkdir(parents=True)
    sink = Sink()
    with ingest(sink, watch, exclude=[watch / "quarantine"]):
        time.sleep(0.3)
        (watch / "quarantine" / "bad.jpg").write_bytes(b"junk")
        (watch / "a.jpg").write_bytes(jpeg)
        assert sink.wait(lambda s: len(s.candidates) >= 1)
        (watch / "a.jpg").write_bytes(jpeg[:-2] + b"\xff\xd9")  # rewritten: a new version
        assert sink.wait(lambda s: len(s.candidates) >= 2)
        time.sleep(QUIET)
    assert sink.names() == ["a.jpg", "a.jpg"]


def test_callback_error_does_not_stop_ingest(tmp_path, jpeg):
    watch = tmp_path / "watch"
    watch.mkdir()
    got: list[str] = []
    done = threading.Event()

    def flaky(p: Path) -> None:
        got.append(p.name)
        if len(got) == 1:
            raise RuntimeError("queue full")
        done.set()

    ing = Ingest([watch], flaky, settle=SETTLE, reconcile_every=0.5)
    with ing:
        (watch / "f.jpg").write_bytes(jpeg)
        assert done.wait(DEADLINE)  # offered again by the next reconcile
    assert got == ["f.jpg", "f.jpg"] and ing.counts["callback_errors"] == 1


def test_bad_corpus_through_ingest(tmp_path):
    watch = tmp_path / "watch"
    corpus = make_bad_corpus(watch)
    sink = Sink()
    expected = {p for p, e in corpus.values() if e != "reject"}
    with ingest(sink, watch, stale_s=1.0):  # junk never looks complete: passed on once stale
        assert sink.wait(lambda s: set(s.candidates) >= expected and len(s.rejects) >= 1)
        time.sleep(QUIET)
    assert sorted(map(str, sink.candidates)) == sorted(map(str, expected))
    assert [p for p, _ in sink.rejects] == [corpus["symlink_out"][0]]


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Ingest([tmp_path / "nope"], lambda p: None)
    with pytest.raises(ValueError):
        Ingest([], lambda p: None)


def test_incomplete_file_with_future_mtime_still_passed_on_when_stale(tmp_path, jpeg):
    """A camera with its clock set ahead writes a truncated file: it must not wait forever."""
    watch = tmp_path / "watch"
    watch.mkdir()
    cut = watch / "cut.jpg"
    cut.write_bytes(jpeg[:50_000])
    future = time.time() + 86400
    os.utime(cut, (future, future))
    sink = Sink()
    with ingest(sink, watch, stale_s=1.0):
        assert sink.wait(lambda s: len(s.candidates) >= 1)
    assert sink.candidates == [cut] and not sink.complete_at_call[cut]


def test_a_file_finished_while_its_end_marker_is_read_is_passed_on_once(tmp_path, jpeg, monkeypatch):
    """The race behind a flaky run under load: a settled prefix is stat'ed, then the writer
    finishes before the end marker is read, so the file looked complete under the prefix's
    (size, mtime), and the writer's close passed it on a second time as a 'new version'."""
    import edge.ingest as ingest_mod

    watch = tmp_path / "watch"
    watch.mkdir()
    p = watch / "IMG_0001.JPG"
    p.write_bytes(jpeg[:120_000])
    st = p.stat()
    sink = Sink()
    ing = ingest(sink, watch)  # not started: the worker's steps are called by hand
    real = ingest_mod.file_complete

    def writer_finishes_first(path):
        with open(path, "ab") as f:
            f.write(jpeg[120_000:])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: make the write visible
        return real(path)

    monkeypatch.setattr(ingest_mod, "file_complete", writer_finishes_first)
    ing._pending[str(p)] = ingest_mod._Pending(due=0.0, complete=False, size=st.st_size, mtime_ns=st.st_mtime_ns)
    ing._look(str(p))  # settled prefix, but it grew during the check: looked at again, not passed on
    monkeypatch.setattr(ingest_mod, "file_complete", real)
    assert sink.candidates == [] and str(p) in ing._pending
    ing._note(str(p), complete=True)  # the writer's close
    ing._look(str(p))
    ing._pending[str(p)] = ingest_mod._Pending(due=0.0, complete=False)  # a later scan or event
    ing._look(str(p))
    assert sink.candidates == [p] and sink.complete_at_call[p]


def test_a_backlog_found_at_start_is_passed_on_before_newer_frames_of_its_folder(tmp_path, jpeg):
    """Frames a camera wrote while the daemon was down are found by the start-up scan and settle
    first; frames written right after the start are complete at once. Passed on in the order they
    arrive, the newer frames went first: the event of the burst cut in three across a restart
    (seen by running a daemon killed mid-burst and restarted while the camera kept writing). A
    newer frame now waits for the older frames of its folder that are still settling; another
    folder (camera) does not wait."""
    watch, other = tmp_path / "watch", tmp_path / "other"
    watch.mkdir()
    other.mkdir()
    t0 = time.time() - 5
    backlog = [watch / f"B{k:02d}.JPG" for k in range(5)]
    for k, p in enumerate(backlog):  # written while the daemon was down
        p.write_bytes(jpeg)
        os.utime(p, (t0 + k * 0.1, t0 + k * 0.1))
    sink = Sink()
    with ingest(sink, watch, other, settle=1.0) as ing:
        deadline = time.monotonic() + DEADLINE
        while ing.counts["scans"] < 1 and time.monotonic() < deadline:  # the backlog is found, settling
            time.sleep(0.01)
        time.sleep(0.1)  # inotify watches are added on the observer's own thread
        for name, folder in (("LIVE.JPG", watch), ("ELSEWHERE.JPG", other)):  # renamed into place: complete
            tmp = folder / f".{name}.part"
            tmp.write_bytes(jpeg)
            os.replace(tmp, folder / name)
        assert sink.wait(lambda s: len(s.candidates) >= 7)
    names = sink.names()
    assert names.index("ELSEWHERE.JPG") < names.index("B00.JPG")  # another camera's frame is not held back
    assert [n for n in names if n != "ELSEWHERE.JPG"] == [p.name for p in backlog] + ["LIVE.JPG"]
