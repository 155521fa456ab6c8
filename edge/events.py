"""Grouping trigger frames into events (pure: no clocks, no files).

A trap fires bursts of 3-10 frames; users want one answer per visit, not ten. Frames belong to
the same event when they come from the same camera (folder) and each is at most ``gap_s``
seconds after the previous one, by the camera's own clock (EXIF DateTimeOriginal), or by file
mtime when the image carries no EXIF time or an implausible one (see below).

Times: a naive EXIF time (no OffsetTimeOriginal, the usual case) is read as if it were UTC, so it
becomes a float on a per-camera scale. That is only compared with other frames of the same
camera, where the offset cancels out. A camera that writes EXIF on some frames and not on
others would mix clocks; traps do not do that in practice.

Implausible camera clocks (:func:`frame_time`): a trap whose clock was never set, or lost its
battery, stamps 1970, 1980 or 2000-01-01; a wrong year setting stamps 2099. Such a time would
put the frame, its event and its Camtrap DP record years away from the real visit, so an EXIF
time is used only when it lies in the window a real capture can have:
- not before ``EARLIEST_PLAUSIBLE`` (2001-01-01: the reset values of unset clocks lie before it);
- not more than ``CLOCK_SLACK_S`` (one day: time zones, drift) after the file's mtime or after
  now: a picture is taken before its file is written. An mtime or a now that is itself before
  2001 (FAT times of 1980, a box that booted without its clock) is no bound.
An EXIF time years *before* the mtime is kept: a card copied without its times (an archive, a
season's card) is normal. Outside the window the frame takes its mtime (or, when the mtime is
as implausible, the time it was received; with no plausible clock at all, the mtime), and says
so: ``source`` names what was used and ``issue`` keeps the refused values and why, so nothing
is lost.

Two APIs: :func:`group_events` for a batch (records, evaluation), and :class:`EventGrouper` for
the daemon, which sees frames one at a time: an event stays open until a later frame of the same
camera comes more than ``gap_s`` after it, or until nothing has joined it for ``idle_s`` seconds of
wall time (the caller passes ``now``) and no frame of its camera waits to be processed (the caller
says which cameras have some); then it is closed and its event-level answer can be sent.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_GAP_S = 5.0
DEFAULT_IDLE_S = 30.0
EARLIEST_PLAUSIBLE = datetime(2001, 1, 1, tzinfo=timezone.utc)  # unset clocks: 1970, 1980, 2000-01-01
CLOCK_SLACK_S = 86_400.0  # how far a capture time may lie after its file's mtime (or now)


@dataclass(frozen=True)
class Frame:
    """One image as the grouping sees it. ``t`` is seconds on the camera's clock (see module doc);
    ``issue`` says why an EXIF time was not used (None when it was, or when there was none)."""

    path: str
    camera: str
    t: float
    source: str = "exif"  # "exif" | "mtime" | "received"
    issue: str | None = None


@dataclass(frozen=True)
class FrameTime:
    """When a frame was taken: ``t`` epoch seconds, ``source`` what it came from, ``issue`` why
    the EXIF time was refused (None unless it was)."""

    t: float
    source: str  # "exif" | "mtime" | "received"
    issue: str | None = None


def _why_not(t: float, mtime: float | None, now: float | None) -> str | None:
    """None when ``t`` can be a capture time for a file written at ``mtime`` and seen at
    ``now``, else why not. A reference that is itself before EARLIEST_PLAUSIBLE is no bound: a
    card whose FAT times say 1980, or a box that booted without its clock (1970), must not
    overrule a camera whose clock is right."""
    floor = EARLIEST_PLAUSIBLE.timestamp()
    if t < floor:
        return f"before {EARLIEST_PLAUSIBLE:%Y-%m-%d} (a clock that was never set)"
    if mtime is not None and mtime >= floor and t > mtime + CLOCK_SLACK_S:
        return "after the file was written (a camera clock set wrong)"
    if now is not None and now >= floor and t > now + CLOCK_SLACK_S:
        return "in the future (a clock set wrong)"
    return None


def frame_time(taken_at: datetime | None, mtime: float, now: float | None = None) -> FrameTime:
    """The frame's time: the EXIF time when present and plausible, else the file's mtime when
    plausible, else ``now`` (the time it was received) when the device's own clock is, else
    the mtime all the same; ``issue`` says what was refused and why. Naive EXIF reads as UTC
    (the caller attaches the camera's zone first when it knows it). See the module doc."""
    notes = []
    if taken_at is not None:
        aware = taken_at if taken_at.tzinfo is not None else taken_at.replace(tzinfo=timezone.utc)
        try:
            t = aware.timestamp()
        except (OverflowError, ValueError, OSError):  # year 1 or 9999 shifted past the range
            t = float("-inf")
        why = _why_not(t, mtime, now)
        if why is None:
            return FrameTime(t, "exif")
        notes.append(f"EXIF time {taken_at.replace(tzinfo=None).isoformat(sep=' ')} ignored: {why}")
    why_not_mtime = _why_not(mtime, None, now)
    if why_not_mtime is None:
        return FrameTime(float(mtime), "mtime", "; ".join(notes) or None)
    notes.append(f"file mtime {_utc(mtime)} {'ignored too' if notes else 'ignored'}: {why_not_mtime}")
    if now is not None and _why_not(now, None, None) is None:
        return FrameTime(float(now), "received", "; ".join(notes))
    notes.append("no clock to trust: the mtime is kept")
    return FrameTime(float(mtime), "mtime", "; ".join(notes))


def _utc(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"{t:.0f} s"


def make_frame(path: str | os.PathLike, taken_at: datetime | None, mtime: float,
               camera: str | None = None, now: float | None = None) -> Frame:
    """A Frame whose camera is the folder the file sits in unless given (``now``: see
    :func:`frame_time`)."""
    ft = frame_time(taken_at, mtime, now)
    p = os.fspath(path)
    return Frame(path=p, camera=camera if camera is not None else os.fspath(Path(p).parent), t=ft.t,
                 source=ft.source, issue=ft.issue)


def group_events(frames: Iterable[Frame], gap_s: float = DEFAULT_GAP_S) -> list[list[Frame]]:
    """Split frames into events: per camera, sorted by time, a new event after a gap > gap_s.

    Events come back ordered by (start time, camera), frames inside by (time, path).
    """
    if gap_s < 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s}")
    by_camera: dict[str, list[Frame]] = {}
    for f in frames:
        by_camera.setdefault(f.camera, []).append(f)
    events: list[list[Frame]] = []
    for cam_frames in by_camera.values():
        cam_frames.sort(key=lambda f: (f.t, f.path))
        current = [cam_frames[0]]
        for f in cam_frames[1:]:
            if f.t - current[-1].t > gap_s:
                events.append(current)
                current = []
            current.append(f)
        events.append(current)
    events.sort(key=lambda ev: (ev[0].t, ev[0].camera))
    return events


@dataclass
class Event:
    """An event being built (open) or finished (closed)."""

    id: int
    camera: str
    start: float  # camera-clock seconds of the earliest frame
    end: float  # ... of the latest frame
    frames: list[Frame] = field(default_factory=list)
    last_added: float = 0.0  # caller's wall clock (monotonic) when a frame last joined
    closed: bool = False


@dataclass(frozen=True)
class Assignment:
    """What adding one frame did: the event it joined, and the events this closed."""

    event: Event
    new: bool
    closed: list[Event]


class EventGrouper:
    """Incremental event grouping for a daemon that sees frames one at a time.

    Frames may arrive out of camera-time order (start-up scans, FTP uploads in parallel): a
    frame joins an open event of its camera when it lies within ``gap_s`` of that event's span.
    It never merges two open events (their ids may already be stored); a frame that arrives
    after its event was closed starts a new one. Event ids count up from ``first_id``: pass
    the ledger's highest id + 1 on restart so ids stay unique. Not thread-safe: one owner.
    """

    def __init__(self, gap_s: float = DEFAULT_GAP_S, idle_s: float = DEFAULT_IDLE_S, first_id: int = 1):
        if gap_s < 0 or idle_s <= 0:
            raise ValueError(f"need gap_s >= 0 and idle_s > 0, got gap_s={gap_s} idle_s={idle_s}")
        self.gap_s = gap_s
        self.idle_s = idle_s
        self._next_id = first_id
        self._open: dict[str, list[Event]] = {}

    @property
    def open_events(self) -> list[Event]:
        return sorted((e for evs in self._open.values() for e in evs), key=lambda e: e.id)

    @property
    def next_id(self) -> int:
        return self._next_id

    def add(self, frame: Frame, now: float) -> Assignment:
        """Place ``frame``; ``now`` is the caller's monotonic clock (used for idle timeouts)."""
        evs = self._open.setdefault(frame.camera, [])
        closed = [e for e in evs if frame.t - e.end > self.gap_s]
        for e in closed:
            e.closed = True
        evs[:] = [e for e in evs if not e.closed]
        target = None
        for e in evs:  # earliest-id event whose span (widened by gap) holds the frame
            if e.start - self.gap_s <= frame.t <= e.end + self.gap_s:
                target = e
                break
        new = target is None
        if target is None:
            target = Event(id=self._next_id, camera=frame.camera, start=frame.t, end=frame.t)
            self._next_id += 1
            evs.append(target)
        target.frames.append(frame)
        target.start = min(target.start, frame.t)
        target.end = max(target.end, frame.t)
        target.last_added = now
        return Assignment(event=target, new=new, closed=closed)

    def reopen(self, event_id: int, frames: Sequence[Frame], now: float) -> Event:
        """Put back an event a stop left open (its frames as recorded), so that a burst spanning
        a restart stays one event; it closes like any other, by gap or idle time."""
        if not frames:
            raise ValueError(f"event {event_id}: nothing to reopen")
        ev = Event(id=event_id, camera=frames[0].camera, start=min(f.t for f in frames),
                   end=max(f.t for f in frames), frames=list(frames), last_added=now)
        self._open.setdefault(ev.camera, []).append(ev)
        self._next_id = max(self._next_id, event_id + 1)
        return ev

    def idle_cameras(self, now: float) -> set[str]:
        """Cameras with an event nothing has joined for ``idle_s`` (what :meth:`expire` may close)."""
        return {cam for cam, evs in self._open.items() if any(now - e.last_added >= self.idle_s for e in evs)}

    def expire(self, now: float, waiting: Container[str] = frozenset()) -> list[Event]:
        """Close and return the events nothing has joined for ``idle_s`` (call it periodically).

        Idle time is the daemon's wall clock, not the cameras': an event of a camera in
        ``waiting`` (frames of it found but not yet processed: a backlog, a frame held back after
        a crash) stays open, since those frames may still join it."""
        out = []
        for cam, evs in list(self._open.items()):
            keep = []
            for e in evs:
                if now - e.last_added >= self.idle_s and cam not in waiting:
                    e.closed = True
                    out.append(e)
                else:
                    keep.append(e)
            if keep:
                self._open[cam] = keep
            else:
                del self._open[cam]
        return sorted(out, key=lambda e: e.id)

    def close_all(self) -> list[Event]:
        """Close everything (shutdown)."""
        out = [e for evs in self._open.values() for e in evs]
        for e in out:
            e.closed = True
        self._open.clear()
        return sorted(out, key=lambda e: e.id)
