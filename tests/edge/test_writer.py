"""The daemon's writer thread, in process (so the test can hold the writer and swap the model
between two batches): real inotify, real SQLite, real ONNX Runtime on the small test bundle.

The inference thread only classifies; results, records, disposal and events are the writer's,
in frame order, behind a bounded queue. What must hold:
- nothing is disposed of before its result is durable;
- each result names the model that classified it, even when a swap happens while it waits;
- a stopping daemon writes what was classified; a writer that dies stops the daemon, and a
  stuck one stops the watchdog pings.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from make_onnx import write_test_bundle
from test_daemon import Device, drop, empty_frame, lynx_frame
from test_full_disk import wait_until

import edge.daemon
from edge.config import load_config
from edge.daemon import WRITE_AHEAD, Daemon
from edge.sdnotify import Notifier


class Pings(Notifier):
    """sd_notify without a socket: records when the watchdog was pinged."""

    def __init__(self) -> None:
        super().__init__(socket_path=None)
        self.pings: list[float] = []

    def watchdog(self) -> bool:
        self.pings.append(time.monotonic())
        return True


class Live:
    """A Daemon running in this process (``run()`` on a thread), over a Device's config."""

    def __init__(self, dev: Device, notifier: Notifier | None = None) -> None:
        self.dev = dev
        self.d = Daemon(load_config(dev.config), notifier=notifier or Pings())
        self.d.start()
        self.thread = threading.Thread(target=self.d.run, name="inference", daemon=True)

    def go(self) -> Live:
        """Start the inference loop (after the test has put its hooks in)."""
        self.thread.start()
        return self

    def rows(self) -> dict[str, sqlite3.Row]:
        return {Path(r["path"]).name: r for r in self.dev.rows()}

    def close(self) -> None:
        self.d.stop()
        self.d.close()
        self.thread.join(10)


class Gate:
    """Holds the writer inside ``Ledger.complete_many`` until opened."""

    def __init__(self, led, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        real = led.complete_many

        def held(batch):
            self.entered.set()
            self.open.wait(60)
            return real(batch)

        monkeypatch.setattr(led, "complete_many", held)


def _device(tmp_path: Path, **kw) -> Device:
    dev = Device(tmp_path, **kw)
    dev.config.write_text(dev.config.read_text().replace("max_batch: 4", "max_batch: 2"))
    return dev


def _waiting(dev: Device, frames: dict[str, bytes]) -> list[Path]:
    """Frames found before the start (the reader then claims full batches of 2)."""
    from edge.ledger import Ledger

    paths = [drop(dev.watch, name, data) for name, data in frames.items()]
    dev.state.mkdir(parents=True, exist_ok=True)
    with Ledger(dev.state / "ledger.sqlite3") as led:
        for p in paths:
            st = p.stat()
            led.see(p, st.st_size, st.st_mtime)
    return paths


def queued(d: Daemon) -> int:
    """Classified frames waiting in the writer's queue."""
    return sum(len(getattr(j, "frames", ())) for j in list(d._writes.queue))


def test_a_swap_while_results_wait_for_the_writer_does_not_relabel_them(tmp_path, monkeypatch):
    """Batches classified by model A wait for the writer while the inference loop swaps to B:
    they are recorded as A's (the model travels with the batch), the later ones as B's; the
    results are committed in frame order, and no empty is deleted before its result is durable."""
    from edge.bundle import load_bundle
    from edge.engines import load_engines
    from edge.updates_daemon import DaemonHost

    dev = _device(tmp_path, policy="delete")
    b2 = write_test_bundle(tmp_path / "bundle-b", version="2026.2.0")
    first = _waiting(dev, {f"A{k}.JPG": lynx_frame(k) if k % 2 == 0 else empty_frame(k) for k in range(4)})
    live = Live(dev)
    d = live.d
    d.update_host = DaemonHost(d)  # the updater's host: swaps happen on the inference loop, between batches
    d.update_host.serving = (d.bundle, d.engines)
    gate = Gate(d.ledger, monkeypatch)
    live.go()
    try:
        wait_until(lambda: gate.entered.is_set() and queued(d) == 2, 30, "batch 1 held, batch 2 queued")
        assert all(p.exists() for p in first)  # nothing deleted: no result is durable yet
        bundle_b = load_bundle(b2, require_signature=False)
        d.update_host.swap(bundle_b, load_engines(bundle_b, d.cfg.engine))  # waits for the loop to take it
        assert d.model_version == "2026.2.0"
        later = [drop(dev.watch, f"B{k}.JPG", lynx_frame(k)) for k in range(2)]
        wait_until(lambda: queued(d) == 4, 30, "the frames model B classified queued")
        gate.open.set()
        rows = dev.wait_done(6)
    finally:
        gate.open.set()
        live.close()
    by = {Path(r["path"]).name: r for r in rows}
    results = {n: json.loads(r["result"]) for n, r in by.items()}
    assert {n: res["model"] for n, res in results.items()} == {
        **{p.name: "2026.1.0" for p in first}, **{p.name: "2026.2.0" for p in later}}
    assert len({results[p.name]["bundle"] for p in first}) == 1
    assert results["A0.JPG"]["bundle"] != results["B0.JPG"]["bundle"]
    done_order = [r["id"] for r in sorted(rows, key=lambda r: r["updated"])]
    assert done_order == sorted(done_order)  # written in the order they were claimed
    assert [p.exists() for p in first] == [True, False, True, False]  # empties deleted once durable
    md = json.loads((dev.state / "records" / "md_results.json").read_text())
    assert sorted(Path(i["file"]).name for i in md["images"]) == sorted(by)


def test_a_stop_writes_what_was_classified(tmp_path, monkeypatch):
    """SIGTERM (stop, then close) while classified batches wait for a held writer: close() lets
    the writer finish them; each frame has its one result and nothing is left claimed."""
    dev = _device(tmp_path, policy="keep")
    _waiting(dev, {f"F{k}.JPG": lynx_frame(k) for k in range(8)})
    live = Live(dev)
    d = live.d
    gate = Gate(d.ledger, monkeypatch)
    live.go()
    try:
        wait_until(lambda: gate.entered.is_set() and queued(d) == 6, 30, "4 batches classified")
        d.stop()
        threading.Timer(0.5, gate.open.set).start()
        d.close()
        live.thread.join(10)
    finally:
        gate.open.set()
    rows = dev.rows()
    assert len(rows) == 8 and all(r["result"] is not None for r in rows), [(r["path"], r["state"]) for r in rows]
    assert not any(r["state"] in ("seen", "processing") for r in rows)


def test_a_writer_that_dies_stops_the_daemon_and_its_pings(tmp_path, monkeypatch):
    """A bug on the writer's path ends the process with the error (systemd restarts it); the
    frames it held go back to 'seen' and nothing was deleted."""
    dev = _device(tmp_path, policy="delete")
    pings = Pings()
    live = Live(dev, notifier=pings)
    d = live.d

    def boom(frames):
        raise RuntimeError("a bug on the writer's path")

    monkeypatch.setattr(d, "_dispose_many", boom)
    live.go()
    frames = [drop(dev.watch, f"E{k}.JPG", empty_frame(k)) for k in range(4)]
    live.thread.join(30)
    assert not live.thread.is_alive()  # run() returned: the daemon is stopping
    assert isinstance(d.fatal, RuntimeError)
    n = len(pings.pings)
    time.sleep(0.3)
    assert len(pings.pings) == n
    d.close()
    assert all(p.exists() for p in frames)
    assert all(r["state"] in ("seen", "done") for r in dev.rows())  # committed ones are disposed of at the next start


def test_a_stuck_writer_stops_the_watchdog_pings(tmp_path, monkeypatch):
    """The inference loop pings systemd only while the writer makes progress: a loop waiting on
    a writer stuck in a write must let the watchdog restart the service."""
    monkeypatch.setattr(edge.daemon, "watchdog_interval", lambda: 1.2)  # pings every 0.4 s, stuck after 1.2 s
    dev = _device(tmp_path, policy="keep")
    pings = Pings()
    live = Live(dev, notifier=pings)
    d = live.d
    gate = Gate(d.ledger, monkeypatch)
    live.go()
    try:
        time.sleep(2.0)
        assert len(pings.pings) >= 2  # an idle daemon pings (each turn of its loop: at least every 0.5 s)
        drop(dev.watch, "F0.JPG", lynx_frame(0))
        wait_until(gate.entered.is_set, 30, "the writer held")
        held = time.monotonic()
        time.sleep(3.0)
        assert [t for t in pings.pings if t > held + 1.2 + 0.6] == []  # none once it stalled
        gate.open.set()
        dev.wait_done(1)
        time.sleep(1.5)
        assert pings.pings[-1] > time.monotonic() - 1.2  # pinging again
    finally:
        gate.open.set()
        live.close()


def test_the_writer_queue_is_bounded(tmp_path, monkeypatch):
    """Backpressure: with the writer held, the inference loop stops at WRITE_AHEAD batches (and
    the reader at its read-ahead) instead of holding the whole burst in memory."""
    dev = _device(tmp_path, policy="keep")
    live = Live(dev)
    d = live.d
    gate = Gate(d.ledger, monkeypatch)
    live.go()
    try:
        for k in range(40):
            drop(dev.watch, f"F{k:02d}.JPG", lynx_frame(k))
        wait_until(lambda: d._writes.full(), 30, "the writer's queue full")
        time.sleep(0.5)
        assert d._writes.qsize() == WRITE_AHEAD
        states = [r["state"] for r in dev.rows()]
        assert states.count("seen") >= 40 - 2 * (1 + WRITE_AHEAD + 1 + edge.daemon.READ_AHEAD + 1)
        gate.open.set()
        dev.wait_done(40, final=("done", "disposed"))
    finally:
        gate.open.set()
        live.close()
