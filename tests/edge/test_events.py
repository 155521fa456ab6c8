"""edge.events: burst grouping, on the real Reconyx night burst and on constructed frames."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge.events import (
    EventGrouper,
    Frame,
    FrameTime,
    frame_time,
    group_events,
    make_frame,
)
from edge.imageio import read_image

sys.path.insert(0, str(Path(__file__).parent))
from badinputs import real_frames


@pytest.fixture(scope="module")
def burst() -> list[Frame]:
    frames = []
    for p in real_frames():
        im = read_image(p, max_side=64)
        frames.append(make_frame(p, im.taken_at, p.stat().st_mtime))
    return frames


def test_real_burst_exif_times(burst):
    """EXIF holds the camera clock 2021-04-11 20:43:09..15 (no offset tag); the file names'
    20210531082538.. prefix is a later renaming, not the capture time."""
    assert len(burst) == 10 and all(f.source == "exif" for f in burst)
    t0 = datetime(2021, 4, 11, 20, 43, 9, tzinfo=timezone.utc).timestamp()
    ts = sorted(f.t - t0 for f in burst)
    assert ts == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]


def test_real_burst_is_one_event(burst):
    events = group_events(burst, gap_s=5.0)
    assert len(events) == 1 and len(events[0]) == 10
    assert [f.path for f in events[0]] == sorted(f.path for f in burst)
    # the same burst with a gap smaller than its 1 s spacing splits: the grouping is real
    assert len(group_events(burst, gap_s=0.5)) == 7


def test_real_burst_incremental_one_event_closed_by_next_visit(burst):
    g = EventGrouper(gap_s=5.0, idle_s=30.0, first_id=41)
    ids = {g.add(f, now=i * 0.1).event.id for i, f in enumerate(reversed(burst))}  # any order
    assert ids == {41}
    later = Frame(path="x/later.jpg", camera=burst[0].camera, t=max(f.t for f in burst) + 60)
    a = g.add(later, now=2.0)
    assert a.new and a.event.id == 42
    assert [e.id for e in a.closed] == [41] and a.closed[0].closed and len(a.closed[0].frames) == 10
    assert a.closed[0].end - a.closed[0].start == 6.0


def test_cameras_are_separate_and_gap_boundary():
    fs = [Frame("a/1.jpg", "a", 100.0), Frame("b/1.jpg", "b", 101.0), Frame("a/2.jpg", "a", 105.0),
          Frame("a/3.jpg", "a", 110.01)]
    evs = group_events(fs, gap_s=5.0)
    assert [[f.path for f in e] for e in evs] == [["a/1.jpg", "a/2.jpg"], ["b/1.jpg"], ["a/3.jpg"]]
    assert group_events([]) == []
    with pytest.raises(ValueError):
        group_events(fs, gap_s=-1)


def test_frame_time_exif_else_mtime():
    naive = datetime(2021, 4, 11, 20, 43, 9)
    t = datetime(2021, 4, 11, 20, 43, 9, tzinfo=timezone.utc).timestamp()
    assert frame_time(naive, t + 60) == FrameTime(t, "exif")
    aware = datetime(2021, 4, 11, 20, 43, 9, tzinfo=timezone(timedelta(hours=1)))
    assert frame_time(aware, t + 60).t == t - 3600
    assert frame_time(None, 1234567890.5) == FrameTime(1234567890.5, "mtime")
    f = make_frame("/cams/c7/IMG_1.JPG", None, 1234567890.0)
    assert (f.camera, f.t, f.source, f.issue) == ("/cams/c7", 1234567890.0, "mtime", None)
    assert make_frame("/x/y.jpg", None, 1.0, camera="trap-3").camera == "trap-3"


NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("exif, why", [
    (datetime(1970, 1, 1), "never set"),  # the epoch of a clock that lost its battery
    (datetime(1980, 1, 1, 0, 0, 5), "never set"),  # the FAT epoch
    (datetime(2000, 1, 1, 0, 12), "never set"),  # a common firmware default
    (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))), "never set"),  # before year 1 in UTC
    (datetime(2099, 12, 31, 23, 59), "written"),  # a year typed wrong
    (datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-14))), "written"),  # past year 9999 in UTC
    (datetime(2026, 12, 2, 12, 0), "written"),  # two days after its file was written
])  # fmt: skip
def test_an_implausible_camera_clock_falls_back_to_the_mtime_and_says_why(exif, why):
    mtime = NOW - 3600
    ft = frame_time(exif, mtime, NOW)
    assert (ft.t, ft.source) == (mtime, "mtime")
    assert ft.issue is not None and why in ft.issue and "EXIF time" in ft.issue
    assert str(exif.year) in ft.issue  # the camera's value is kept in the note
    f = make_frame("/cams/c7/IMG_1.JPG", exif, mtime, now=NOW)
    assert (f.t, f.source, f.issue) == (mtime, "mtime", ft.issue)


@pytest.mark.parametrize("exif", [
    datetime(2015, 6, 1, 4, 30),  # an archive copied today: years before its mtime is fine
    datetime(2001, 1, 1, 0, 0, 1),  # the first plausible second
    datetime(2026, 11, 30, 20, 0),  # hours ahead of its mtime: a camera zone set wrong, drift
])  # fmt: skip
def test_a_plausible_camera_clock_is_kept(exif):
    ft = frame_time(exif, NOW - 3600, NOW)
    assert ft.source == "exif" and ft.issue is None
    assert ft.t == exif.replace(tzinfo=timezone.utc).timestamp()


def test_a_future_clock_is_refused_against_now_even_when_the_mtime_agrees():
    """The camera wrote the file with the same wrong clock (mtime 2099 too): neither is used,
    the frame takes the time it was received."""
    bad = datetime(2099, 1, 1, tzinfo=timezone.utc)
    ft = frame_time(bad.replace(tzinfo=None), bad.timestamp() + 5, NOW)
    assert (ft.t, ft.source) == (NOW, "received")
    assert ft.issue is not None and "future" in ft.issue and "mtime 2099-01-01 00:00:05 UTC ignored" in ft.issue
    no_exif = frame_time(None, 0.0, NOW)  # no EXIF and a 1970 mtime
    assert (no_exif.t, no_exif.source) == (NOW, "received") and "never set" in (no_exif.issue or "")
    batch = frame_time(None, 0.0)  # without now (the batch APIs): nothing better, the mtime, flagged
    assert (batch.t, batch.source) == (0.0, "mtime") and "no clock to trust" in (batch.issue or "")


def test_a_reference_clock_that_is_itself_unset_does_not_overrule_a_right_camera():
    """A card whose FAT times say 1980, or a box that booted without its clock (1970, before
    NTP): a plausible EXIF time is not refused for being 'after' them."""
    exif = datetime(2026, 11, 29, 6, 0)
    t = exif.replace(tzinfo=timezone.utc).timestamp()
    assert frame_time(exif, datetime(1980, 1, 1, tzinfo=timezone.utc).timestamp(), NOW) == FrameTime(t, "exif")
    assert frame_time(exif, 5.0, 10.0) == FrameTime(t, "exif")  # device clock at 1970 too
    unset = frame_time(datetime(1970, 1, 1), 5.0, 10.0)  # nothing plausible anywhere: kept, flagged
    assert (unset.t, unset.source) == (5.0, "mtime")
    assert unset.issue is not None and unset.issue.startswith("EXIF time 1970-01-01 00:00:00 ignored")


def test_incremental_idle_expiry_and_close_all():
    g = EventGrouper(gap_s=5.0, idle_s=10.0)
    a1 = g.add(Frame("a/1", "a", 0.0), now=100.0)
    b1 = g.add(Frame("b/1", "b", 0.0), now=104.0)
    assert (a1.event.id, b1.event.id) == (1, 2) and a1.new and b1.new
    assert g.expire(now=105.0) == []
    a2 = g.add(Frame("a/2", "a", 3.0), now=106.0)  # joins and refreshes camera a's event
    assert not a2.new and a2.event.id == 1
    assert [e.id for e in g.expire(now=114.5)] == [2]  # b idle for 10.5 s, a for 8.5 s
    assert [e.id for e in g.open_events] == [1]
    assert [e.id for e in g.close_all()] == [1] and g.open_events == []
    assert g.next_id == 3


def test_incremental_out_of_order_and_late_frames():
    g = EventGrouper(gap_s=2.0, idle_s=60.0)
    assert g.add(Frame("c/5", "c", 5.0), now=0).event.id == 1
    assert g.add(Frame("c/4", "c", 3.5), now=0).event.id == 1  # earlier but within the gap
    assert g.add(Frame("c/9", "c", 9.0), now=0).new  # beyond the gap: new event, closes 1
    late = g.add(Frame("c/6", "c", 6.0), now=0)  # fits the closed event 1: starts a new one
    assert late.event.id not in (1,) and late.new
    with pytest.raises(ValueError):
        EventGrouper(gap_s=1.0, idle_s=0)


def test_reopened_event_keeps_its_id_and_takes_later_frames():
    g = EventGrouper(gap_s=2.0, idle_s=5.0, first_id=10)
    ev = g.reopen(7, [Frame("c/1", "c", 100.0), Frame("c/2", "c", 101.0)], now=0.0)
    assert ev.id == 7 and g.next_id == 10
    a = g.add(Frame("c/3", "c", 102.5), now=1.0)
    assert a.event.id == 7 and not a.new and len(a.event.frames) == 3
    assert g.add(Frame("c/9", "c", 200.0), now=2.0).event.id == 10  # a later burst: a new event
    assert [e.id for e in g.expire(now=100.0)] == [10]  # 7 was closed by the gap, 10 by idle time
    with pytest.raises(ValueError):
        g.reopen(8, [], now=0.0)


def test_an_idle_event_stays_open_while_frames_of_its_camera_wait():
    """Idle time is the daemon's clock: frames of the camera still waiting to be processed (a
    backlog, a frame held back after a crash) may still join, so the event is not closed."""
    g = EventGrouper(gap_s=2.0, idle_s=4.0)
    g.add(Frame("a/2", "a", 101.0), now=0.0)
    g.add(Frame("b/1", "b", 50.0), now=0.0)
    assert g.idle_cameras(now=3.0) == set() and g.idle_cameras(now=5.0) == {"a", "b"}
    assert [e.camera for e in g.expire(now=5.0, waiting={"a"})] == ["b"]
    late = g.add(Frame("a/1", "a", 100.0), now=12.0)  # the held-back frame, processed late
    assert not late.new and late.event.id == 1 and len(late.event.frames) == 2
    assert [e.id for e in g.expire(now=16.0)] == [1]
