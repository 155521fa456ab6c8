"""Finding new trigger images: inotify (or polling) events, a start-up scan and a periodic reconcile.

Cameras and FTP servers write files in place; rsync and careful uploaders write a hidden temp
file and rename it into place; SD-card syncs move whole folders in. Events alone are not
enough: the kernel drops inotify events when its queue overflows, and nothing at all is seen
while the daemon is down. So :class:`Ingest` combines
- close-after-write (``IN_CLOSE_WRITE``, watchdog ``FileClosedEvent``) and rename-into-place
  (``FileMovedEvent`` whose destination is in a watch folder): the file is complete, it becomes a
  candidate at once, with no debounce (a 50 ms one was 51 of the 60 ms between a camera closing
  a file and its MQTT message). A writer that closes and reopens a file is still safe: a
  version already passed on is not passed on again, a rewrite is a new version the ledger
  judges, and a still-incomplete version is refused by the reader as truncated, not lost;
- a file moved in from outside the watched tree (``IN_MOVED_TO`` without its ``IN_MOVED_FROM``;
  watchdog's full events report it as a move from ""), and every file of a folder renamed or
  moved in: complete by the same convention, a candidate at once;
- a file that merely appears (a polling observer only sees creations and modifications, a scan
  finds it, a creation not yet closed): it becomes a candidate once it looks ready: same size
  and mtime at two looks ``settle`` seconds apart and a JPEG/PNG end marker (counted only if
  size and mtime did not change while it was read: else the version passed on would be a
  prefix and the writer's close would pass the file on again), or unchanged for ``stale_s``
  (then it is passed on anyway so the reader can quarantine it instead of it waiting forever);
- a scan at start-up and every ``reconcile_every`` seconds, which only passes on files whose
  (size, mtime) it has not passed on before. Within a folder, a frame is not passed on while an
  older frame a scan found still settles (a backlog goes before the frames written after a
  restart, so a burst stays one event; at most ``stale_s`` of waiting).

Repeated events for one path are coalesced (one pending entry per path; a version of a file
already passed on is not passed on again). The ledger stays the judge of what is new: this only
keeps the daemon from being flooded. Symlinks are followed only when the target lies inside a
watch folder (the target's path is passed on); others are refused through ``on_reject``.
Hidden and temporary names are ignored. Both callbacks run on one worker thread, one at a time.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.imageio import file_complete, show_path

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*.jpg", "*.jpeg", "*.png")
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".swp", ".camtrap-partial")


@dataclass
class _Pending:
    due: float  # monotonic time of the next look
    complete: bool  # writer closed it or renamed it into place: no readiness wait
    size: int = -1  # at the previous look
    mtime_ns: int = -1
    since: float = field(default_factory=time.monotonic)  # first noticed (stale even if mtime lies)


class Ingest:
    """Watch ``folders`` and call ``on_candidate(path)`` for each new, complete-looking image.

    ``polling=True`` uses watchdog's PollingObserver (network mounts, where inotify sees nothing
    of remote writes; every ``poll_interval`` s). ``exclude``: subtrees never passed on (put
    quarantine/disposal/audit folders here if they live inside a watch folder).
    """

    def __init__(
        self,
        folders: Iterable[str | os.PathLike],
        on_candidate: Callable[[Path], None],
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        recursive: bool = True,
        polling: bool = False,
        reconcile_every: float = 60.0,
        settle: float = 0.5,
        *,
        stale_s: float = 30.0,
        on_reject: Callable[[Path, str], None] | None = None,
        exclude: Iterable[str | os.PathLike] = (),
        poll_interval: float = 1.0,
    ):
        self.roots = [os.path.abspath(os.fspath(f)) for f in folders]
        if not self.roots:
            raise ValueError("ingest needs at least one folder to watch")
        for r in self.roots:
            if not os.path.isdir(r):
                raise FileNotFoundError(f"watch folder {show_path(r)} does not exist or is not a folder")
        self._real_roots = [os.path.realpath(r) for r in self.roots]
        self._exclude = [os.path.realpath(os.fspath(e)) for e in exclude]
        self.on_candidate = on_candidate
        self.on_reject = on_reject
        self.patterns = tuple(p.lower() for p in patterns)
        self.recursive = recursive
        self.polling = polling
        self.reconcile_every = reconcile_every
        self.settle = settle
        self.stale_s = stale_s
        self.poll_interval = poll_interval

        self._cv = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._known: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) passed on
        self._rejected: dict[str, str] = {}  # path -> reason already reported
        self._scan_requested = False
        self._next_reconcile = 0.0
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self.counts = {"candidates": 0, "rejected": 0, "scans": 0, "callback_errors": 0}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching (events first, then the start-up scan, so nothing falls in between)."""
        if self._worker is not None:
            raise RuntimeError("ingest already started")
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )

        observer: BaseObserver
        if self.polling:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=self.poll_interval)
            wanted = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent,
                      DirCreatedEvent, DirMovedEvent]
        else:
            try:  # Linux: full events tell a file moved in from outside the tree from a creation
                from watchdog.observers.inotify import InotifyObserver

                observer = InotifyObserver(generate_full_events=True)
            except ImportError:  # other platforms (development only): moves-in settle like creations
                from watchdog.observers import Observer

                observer = Observer()
            # no IN_MODIFY (one per write() call: floods the queue during bulk copies) and no
            # IN_OPEN/IN_CLOSE_NOWRITE (our own reads would echo back)
            wanted = [FileCreatedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
                      DirCreatedEvent, DirMovedEvent]
        handler = _handler(self)
        kwargs: dict[str, Any] = {"recursive": self.recursive}
        if "event_filter" in inspect.signature(observer.schedule).parameters:  # watchdog >= 4
            kwargs["event_filter"] = wanted
        for r in self.roots:
            observer.schedule(handler, r, **kwargs)
        observer.start()
        self._observer = observer
        self._stop.clear()
        with self._cv:
            self._scan_requested = True
        self._worker = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; pending files are left for the next start-up scan."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None

    def __enter__(self) -> Ingest:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def scan_now(self) -> None:
        """Ask for a reconcile scan at once (e.g. after a broker or disk hiccup)."""
        with self._cv:
            self._scan_requested = True
            self._cv.notify_all()

    def forget(self, path: str | os.PathLike) -> None:
        """Let a path be passed on again by the next scan (the daemon could not take it)."""
        with self._cv:
            self._known.pop(os.path.abspath(os.fspath(path)), None)

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    # -- events (observer thread) ------------------------------------------------------------
    def _note(self, path: str, complete: bool) -> None:
        if self._root_of(path) is None or not self._name_ok(path):
            return
        now = time.monotonic()
        with self._cv:
            item = self._pending.get(path)
            if item is None:
                item = self._pending[path] = _Pending(due=0.0, complete=complete)
            else:
                item.complete = complete or item.complete
            item.due = now if item.complete else now + self.settle  # settling only for bare appearances
            self._cv.notify_all()

    def _note_tree(self, folder: str) -> None:
        """Every file under a folder that was renamed or moved in is complete: no settling."""
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames[:] = [d for d in dirnames if not _hidden_or_temp(d)
                           and not self._excluded(os.path.join(dirpath, d))] if self.recursive else []
            for name in filenames:
                self._note(os.path.join(dirpath, name), complete=True)

    def _note_modified(self, path: str) -> None:
        """A write after a close or a rename: the file is being rewritten; wait for it again."""
        if self._root_of(path) is None or not self._name_ok(path):
            return
        with self._cv:
            item = self._pending.get(path)
            if item is None:
                item = self._pending[path] = _Pending(due=0.0, complete=False)
            item.complete = False
            item.due = time.monotonic() + self.settle
            self._cv.notify_all()

    def _note_deleted(self, path: str) -> None:
        with self._cv:
            self._pending.pop(path, None)
            self._known.pop(path, None)
            self._rejected.pop(path, None)

    # -- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                now = time.monotonic()
                do_scan = self._scan_requested or now >= self._next_reconcile
                if do_scan:
                    self._scan_requested = False
                    self._next_reconcile = now + self.reconcile_every
                due = self._in_order([p for p, it in self._pending.items() if it.due <= now], now)
                if not do_scan and not due:
                    wake = min([it.due for it in self._pending.values()] + [self._next_reconcile])
                    self._cv.wait(timeout=max(0.005, min(wake - now, 1.0)))
                    continue
            try:
                if do_scan:
                    self._scan()
                for p in due:
                    if self._stop.is_set():
                        break
                    self._look(p)
            except Exception:  # never let one odd file kill ingest
                log.exception("ingest: unexpected error; carrying on")

    def _scan(self) -> None:
        """Queue every matching file whose (size, mtime) has not been passed on yet."""
        self.counts["scans"] += 1
        seen: set[str] = set()
        now = time.monotonic()
        for root in self.roots:
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames
                                     if not _hidden_or_temp(d) and not self._excluded(os.path.join(dirpath, d)))
                if not self.recursive:
                    dirnames[:] = []
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    if not self._name_ok(path):
                        continue
                    seen.add(path)
                    try:
                        st = os.lstat(path)
                    except OSError:
                        continue
                    with self._cv:
                        if path in self._pending:
                            continue
                        if self._known.get(path) == (st.st_size, st.st_mtime_ns):
                            continue
                        if path in self._rejected:
                            continue
                        self._pending[path] = _Pending(due=now + self.settle, complete=False,
                                                       size=st.st_size, mtime_ns=st.st_mtime_ns)
        with self._cv:  # forget what left the folders (disposed, moved away) so memory stays bounded
            for d in (self._known, self._rejected):
                for p in [p for p in d if p not in seen]:
                    del d[p]

    def _in_order(self, due: list[str], now: float) -> list[str]:
        """``due`` less the frames an older frame of their folder still settles before (called with
        the lock held): those wait until it has been looked at. A backlog the start-up scan found
        (written while the daemon was down) settles first, while a frame renamed into place just
        after the start is complete at once; passed on first, it made the burst's later frames a
        new event (and the backlog a third). A frame waits at most ``stale_s`` (an older file still
        being written is passed on by then); another folder (camera) never waits."""
        settling: dict[str, list[_Pending]] = {}
        for p, it in self._pending.items():
            if it.due > now and it.mtime_ns >= 0:  # found by a scan: its mtime is known
                settling.setdefault(os.path.dirname(p), []).append(it)
        if not settling:
            return due
        ready = []
        for p in due:
            older = settling.get(os.path.dirname(p))
            if older:
                try:
                    mtime_ns = os.lstat(p).st_mtime_ns
                except OSError:
                    mtime_ns = -1  # gone: _look drops it
                blockers = [it for it in older if it.mtime_ns <= mtime_ns]
                if blockers:
                    self._pending[p].due = max(it.due for it in blockers)  # after them, in _run's wait
                    continue
            ready.append(p)
        return ready

    def _look(self, path: str) -> None:
        now = time.monotonic()
        with self._cv:
            item = self._pending.get(path)
            if item is None or item.due > now:
                return  # re-armed by a newer event meanwhile
            del self._pending[path]
        try:
            st = os.lstat(path)
        except OSError:
            return  # gone again (moved on, deleted)
        if os.path.islink(path):
            target = self._check_symlink(path)
            if target is None:
                return
            try:
                path, st = target, os.stat(target)
            except OSError:
                return
        if not _is_regular(st):
            return
        key = (st.st_size, st.st_mtime_ns)
        with self._cv:
            if self._known.get(path) == key:
                return  # this version was passed on already
        if not item.complete:
            stable = key == (item.size, item.mtime_ns)
            stale = time.time() - st.st_mtime >= self.stale_s or now - item.since >= self.stale_s
            if stable and not stale:
                stable, key = _complete_version(path, key)
            if not (stale or stable):
                log.debug("ingest: %s still changing or incomplete", show_path(path))
                with self._cv:  # look again later (unless an event re-armed it meanwhile)
                    self._pending.setdefault(path, _Pending(due=now + self.settle, complete=False,
                                                            size=key[0], mtime_ns=key[1],
                                                            since=item.since))
                    self._cv.notify_all()
                return
        with self._cv:
            self._known[path] = key
        self.counts["candidates"] += 1
        try:
            self.on_candidate(Path(path))
        except Exception:
            self.counts["callback_errors"] += 1
            log.exception("ingest: on_candidate failed for %s", show_path(path))
            self.forget(path)  # let the next reconcile offer it again

    def _check_symlink(self, path: str) -> str | None:
        """The link's target as a path under its watch folder, or None (refused, reported once)."""
        real = os.path.realpath(path)
        reason = f"symlink leads outside the watch folder (to {show_path(real)})"
        for root, real_root in zip(self.roots, self._real_roots, strict=True):
            if _inside(real, real_root) and os.path.isfile(real):
                target = os.path.join(root, os.path.relpath(real, real_root))
                if self._name_ok(target):
                    return target
                reason = f"symlink to an ignored name (to {show_path(real)})"
        if not os.path.exists(real):
            reason = "dangling symlink"
        with self._cv:
            first = self._rejected.get(path) != reason
            self._rejected[path] = reason
        if first:
            self.counts["rejected"] += 1
            log.warning("ingest: refused %s: %s", show_path(path), reason)
            if self.on_reject is not None:
                try:
                    self.on_reject(Path(path), reason)
                except Exception:
                    self.counts["callback_errors"] += 1
                    log.exception("ingest: on_reject failed for %s", show_path(path))
        return None

    # -- filters -----------------------------------------------------------------------------
    def _root_of(self, path: str) -> str | None:
        for r in self.roots:
            if _inside(path, r):
                return r
        return None

    def _name_ok(self, path: str) -> bool:
        """Matches a pattern, no hidden/temp part below the root, not in an excluded subtree."""
        root = self._root_of(path)
        if root is None:
            return False
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if not self.recursive and len(parts) > 1:
            return False
        if any(_hidden_or_temp(p) for p in parts):
            return False
        name = parts[-1].lower()
        if not any(fnmatch.fnmatchcase(name, pat) for pat in self.patterns):
            return False
        return not self._excluded(path)

    def _excluded(self, path: str) -> bool:
        if not self._exclude:
            return False
        real = os.path.realpath(os.path.dirname(path)) if not os.path.isdir(path) else os.path.realpath(path)
        return any(_inside(real, e) for e in self._exclude)


def _handler(ingest: Ingest):
    """A watchdog event handler routing events into ``ingest`` (runs on the observer's thread)."""
    from watchdog.events import FileSystemEventHandler

    class _Handler(FileSystemEventHandler):
        def dispatch(self, event) -> None:
            _route(ingest, event)

    return _Handler()


def _route(ing: Ingest, event) -> None:
    from watchdog.events import (
        EVENT_TYPE_CLOSED,
        EVENT_TYPE_CREATED,
        EVENT_TYPE_DELETED,
        EVENT_TYPE_MODIFIED,
        EVENT_TYPE_MOVED,
    )

    try:
        src = os.fsdecode(event.src_path)
        if event.event_type == EVENT_TYPE_MOVED:
            dest = os.fsdecode(event.dest_path) if event.dest_path else ""
            if not event.is_directory:
                if src:
                    ing._note_deleted(src)
                if dest:
                    ing._note(dest, complete=True)  # renamed or moved in: complete by convention
            elif dest and ing._root_of(dest) is not None:
                ing._note_tree(dest)  # a folder renamed or moved in: its files are complete
            return
        if event.is_directory:
            return  # new folders: watchdog itself reports the files inside as created
        if event.event_type == EVENT_TYPE_CLOSED:
            ing._note(src, complete=True)
        elif event.event_type == EVENT_TYPE_CREATED:
            ing._note(src, complete=False)  # also how a move-in from outside the tree looks
        elif event.event_type == EVENT_TYPE_MODIFIED:
            ing._note_modified(src)
        elif event.event_type == EVENT_TYPE_DELETED:
            ing._note_deleted(src)
    except Exception:
        log.exception("ingest: cannot handle event %r", event)


def _hidden_or_temp(name: str) -> bool:
    low = name.lower()
    return name.startswith((".", "~")) or name.endswith("~") or low.endswith(TEMP_SUFFIXES)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _complete_version(path: str, key: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
    """Whether the file whose stat gave ``key`` (size, mtime_ns) ends with its end marker, and
    the version it has now. The marker is read after the stat: a writer that finished in between
    leaves a complete-looking file whose recorded version is a prefix, and the writer's close
    would then pass it on a second time (seen under load). So it counts only if the file did not
    change meanwhile."""
    if key[0] <= 0 or not file_complete(path):
        return False, key
    try:
        st = os.stat(path)
    except OSError:
        return False, key
    now = (st.st_size, st.st_mtime_ns)
    return now == key, now


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)
