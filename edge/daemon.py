"""`camtrap-edge run`: the device's main job, wiring the parts together.

Threads and who owns what::

    ingest (watchdog) --see()--> ledger <--claim()+in_flight('decode'), one transaction--
                                   |      reader thread: decode (reduced JPEG), letterbox
                                   |            | bounded queue: READ_AHEAD decoded batches
                                   |            v
                                   |      inference loop: model swaps, events (frame order),
                                   |        in_flight('inference'), the cascade, in_flight(None),
                                   |        probation; watchdog pings while the writer keeps up
                                   |            | bounded queue: WRITE_AHEAD classified batches
                                   |            v     (no pixels; the model that served travels along)
       complete_many(): a batch's  <--- writer thread: MegaDetector records (written), results +
       results + outbox rows, one       messages (committed), records (fsynced), disposal, event
       durable transaction              answers; storage retries, telemetry (2 fsyncs per batch)
                                   |
                                   v
                      publisher (MQTT, removes a row on PUBACK)

Who owns what: the reader owns decoding; the inference loop owns the runner (and its event
route memory, edge/cascade.py) and the EventGrouper, so events are assigned in frame order
before the cascade runs (burst route reuse needs each frame's event); the writer owns the
records, disposal, the alerts on record and event answers. The inference loop only classifies:
on a Jetson the writer's fsyncs and file operations overlap the next batch's inference.

Invariants:
- Nothing is disposed of before its result is durable: the writer commits a batch's results
  (``Ledger.complete_many``, one fsync) and only then disposes of them (their disposals recorded
  in one more transaction, not fsynced: the file operations are safe to redo, and a disposal acts
  only on the file that was classified, not on a newer one under its name). Records are written
  to their journal just before the commit and fsynced just after it (off the messages' path),
  so a committed result always has its record, whenever the process dies; a crash before the
  commit leaves records of frames that are redone, and a redo replaces its record.
- One result per image, in frame order: one writer, one FIFO queue, the ledger's trigger.
- Each result names the model that classified it (``model``, ``bundle``): the serving model's
  ``_Serving`` is taken when the batch is classified and travels with it, so a swap between two
  batches cannot relabel results still waiting for the writer.
- Crash attribution is unchanged (edge/ledger.py): a frame is ``in_flight`` only inside the
  decoder or the engine; a batch waiting for the writer is out of flight.
- Backpressure, not memory: when the writer's queue is full the inference loop waits, and the
  reader stops at its read-ahead.
- A clean stop (SIGTERM) writes what was classified (the writer drains its queue, up to
  ``WRITER_DRAIN_S``), answers the open bursts and puts decoded-but-unclassified frames back.
- The reader or the writer failing stops the daemon with an error, so systemd restarts it; a
  live inference loop over a dead writer would keep pinging the watchdog while nothing is
  written; and one whose writer has made no progress for a watchdog interval (stuck in a write)
  stops pinging, so the watchdog restarts the service.

Crash safety comes from the ledger: an image is ``processing`` until its result and messages
commit in one transaction; only then is it disposed of. After a crash (SIGKILL at any moment,
the queues full or not), ``recover()`` puts ``processing`` rows back, done-but-not-disposed rows
are disposed again (idempotent), and events left open are reopened from the results on record.
Redoing is harmless: one result per image, ever.

A full or failing state disk is not a crash: a failed ledger/records write puts the daemon in a
``degraded`` state (edge/health.py) with the reason in the log (once), in sd_notify STATUS and in
the retained MQTT status (sent directly: the outbox is what cannot be written). Meanwhile it
claims nothing and deletes nothing; frames whose result could not be committed are put back to
``seen`` by the writer's first retry that can write (backoff), files it could not record are found again
by a scan, and pending disposals, records and event answers are written then. It starts on a full
disk and waits the same way.

Files it creates (ledger, records, unpacked models, audit folders) follow the daemon's own umask,
``UMASK`` (the systemd unit sets the same): owner read/write, group read, others nothing,
whatever the shell or container started it with. Moved and audit frames keep the camera file's
own mode.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from edge import __version__
from edge.cascade import Decision, event_decision
from edge.cli import int_at_least
from edge.config import Config, load_config
from edge.detection import Detection
from edge.disposal import DisposalPolicy, apply, lowest_free_mb, plan_disposal
from edge.events import EventGrouper, Frame, make_frame
from edge.gone import gone_summary, is_gone, sweep_gone
from edge.health import STORAGE_ERRORS, StorageHealth, describe
from edge.imageio import ImageError, LoadedImage, read_image, show_path
from edge.ledger import GONE, Completion, DuplicateResult, ImageRow, Ledger, LedgerError, OutMsg
from edge.messages import (
    Topics,
    encode_detection_json,
    message_from_decision,
    telemetry_counts,
    telemetry_payload,
)
from edge.mqtt_commands import CommandRegistry, Request
from edge.records.megadetector import MdResult
from edge.runner import CascadeRunner, Classified, Prepared
from edge.sdnotify import Notifier, watchdog_interval
from edge.throttle import ThrottledLog
from edge.updates import COMMANDS as UPDATE_COMMANDS
from edge.updates import update_line

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.updates import Updater
    from edge.updates_daemon import DaemonHost

if TYPE_CHECKING:
    from edge.ingest import Ingest
    from edge.publish import Publisher
    from edge.records.megadetector import MdBatchWriter

log = logging.getLogger("camtrap.daemon")

READ_AHEAD = 2  # decoded batches waiting for inference; bounds memory (a burst of 4K frames is ~100 MB)
# classified batches waiting for the writer (no pixels: a few kB each); when it is full the
# inference thread waits (backpressure), and what it holds is redone after a crash
WRITE_AHEAD = 4
WRITER_DRAIN_S = 30.0  # a clean stop waits this long for the writer to finish what was classified (unit: 60 s)
UMASK = 0o027  # files 0640, folders 0750 (the unit's UMask=0027): the ledger holds device paths and results
DISPOSAL_RETRY_S = 30.0  # how often frames waiting for free space are looked at again
# a frame that crashed the daemon while alone in the decoder/engine is tried again only after the
# daemon has been up this long (and nothing else waits): crashes that cluster right after a start
# (power flapping, an operator's kill loop) must not pin three crashes on whichever frame came first
OFFENDER_RETRY_AFTER_S = 10.0


@dataclass
class _Item:
    """A claimed frame, decoded (or why not): reader -> inference thread."""

    row: ImageRow
    image: LoadedImage | None
    error: str | None


@dataclass(frozen=True)
class _Serving:
    """What a result and its messages say of the model that produced them. Taken when a batch is
    classified and carried with it to the writer, so a model swap while results wait in the
    writer's queue cannot label them with the new model."""

    version: str
    bundle: str  # the manifest's sha256, 12 hex digits
    codes: dict[str, str]
    group_of: dict[str, str]
    watch_species: frozenset[str]


@dataclass
class _Frame:
    """A classified frame for the writer: what its result needs, not its pixels."""

    row: ImageRow
    size: tuple[int, int]  # original (width, height)
    scale: float  # decoded pixels per original pixel
    format: str
    frame: Frame  # its time and camera (edge/events.py)
    event: int
    answer: Classified


@dataclass
class _Job:
    """One unit of the writer's work, done in the order queued: frames that could not be read
    (quarantined), a classified batch (results), then events to close (after those results)."""

    serving: _Serving
    frames: list[_Frame] = field(default_factory=list)
    failed: list[_Item] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)


_END = object()  # the writer's last job: everything classified before it is written


def _same_file(path: Path, row: ImageRow) -> bool:
    """Is the file at ``path`` the one ``row`` describes (or gone: a redone delete)?"""
    try:
        st = path.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return True  # apply() says why it cannot act on it
    return st.st_size == row.size and st.st_mtime == row.mtime


def cpu_temperature() -> float | None:
    """Highest thermal zone in degrees C (Jetson: CPU/GPU/SoC zones), None where unreadable."""
    temps = []
    for p in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(p.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


class Daemon:
    """One running device. ``start()`` returns once READY; ``run()`` blocks until ``stop()``."""

    def __init__(self, cfg: Config, *, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._batches: queue.Queue[tuple[list[_Item], Prepared]] = queue.Queue(maxsize=READ_AHEAD)
        self._writes: queue.Queue[_Job | object] = queue.Queue(maxsize=WRITE_AHEAD)
        # batches handed to the inference loop and not out of the engine yet: a suspect frame is
        # decoded and run only when this is 0, so it is alone in flight (edge/ledger.py, crash
        # attribution); frames waiting for the writer are out of flight
        self._outstanding = 0
        self._idle = threading.Condition()
        self._up_since = time.monotonic()  # reset when READY
        self._infer_ms: deque[float] = deque(maxlen=200)
        self._alerted: set[tuple[int, str]] = set()
        self._next_telemetry = 0.0
        self._last_ping = 0.0
        self._disposal_alarm: str | None = None
        self._disposal_waiting = False  # some empties wait for free space (disposed when it returns)
        self._next_disposal_retry = 0.0
        self.health = StorageHealth()
        self._stranded: set[int] = set()  # claimed, result not committed: back to 'seen' on recovery
        self._md_backlog: list[MdResult] = []  # records not yet written
        self._unclosed: set[int] = set()  # events whose answer could not be recorded
        self._held = threading.Lock()  # guards the three above
        self.publisher: Publisher | None = None
        self.ingest: Ingest | None = None
        self.md_writer: MdBatchWriter | None = None
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._writer_seen = time.monotonic()  # the writer's last sign of progress (idle counts)
        self._loop: threading.Thread | None = None  # the thread in run()
        self.fatal: BaseException | None = None
        self._max_pixels = int(cfg.watch.max_megapixels * 1_000_000)
        self._camera_tz = ZoneInfo(cfg.device.timezone)
        self._clock_log = ThrottledLog(log, rate=1 / 300, burst=3)  # a camera with an unset clock: every frame
        self._gone_log = ThrottledLog(log, rate=1 / 60, burst=5)  # a folder emptied under the daemon
        self._publishing = cfg.mqtt is not None  # no broker configured: ledger and records only
        # MQTT commands (cmd/<name>); later features register theirs here before start()
        self.commands = CommandRegistry()
        self.commands.register("ping", self._cmd_ping)
        self.commands.register("status", self._cmd_status)
        for name in UPDATE_COMMANDS:  # signed: edge/updates_command.py
            self.commands.register(name, self._cmd_update)
        self.updates: Updater | None = None  # remote model updates (edge/updates.py)
        self.update_host: DaemonHost | None = None
        self._updates_off = ""
        self._update_payload: bytes | None = None

    # -- start-up ---------------------------------------------------------------------------
    def start(self) -> None:
        from edge.bundle import load_bundle
        from edge.engines import load_engines, read_samples

        cfg = self.cfg
        assert cfg.bundle.path is not None and cfg.ledger.path is not None  # set by Config._derive
        keys = sorted(Path(cfg.bundle.public_keys_dir).glob("*.pub")) if cfg.bundle.public_keys_dir else []
        if cfg.bundle.require_signature and not keys:
            raise ValueError(f"bundle.public_keys_dir: no *.pub keys in {cfg.bundle.public_keys_dir} "
                             "but bundle.require_signature is true")
        self._setup_updates(keys)
        self.notifier.status("loading model bundle")
        path = Path(cfg.bundle.path)
        bundle = load_bundle(path.resolve() if self.updates is not None else path, public_keys=keys or None,
                             require_signature=cfg.bundle.require_signature,
                             extract_to=Path(cfg.paths.state_dir) / "models" / "unpacked")
        self.notifier.extend_timeout(1800)  # a TensorRT build on a Jetson takes minutes
        self.use_model(bundle, load_engines(bundle, cfg.engine))
        samples = read_samples(self.bundle)
        if samples:  # warm-up: a first slow run must not trip the watchdog later
            self.runner.classify(samples[:1])
        man = self.bundle.manifest

        max_outbox = cfg.mqtt.max_outbox if cfg.mqtt else 10_000

        ledger_path = Path(cfg.ledger.path)  # asserted set above

        def open_ledger() -> Ledger:
            ledger_path.parent.mkdir(parents=True, exist_ok=True)
            return Ledger(ledger_path, max_outbox=max_outbox)

        ledger = self._wait_for_storage("opening the ledger", open_ledger)
        if ledger is None:
            return  # stopped while waiting
        self.ledger = ledger
        if self._wait_for_storage("recovering the ledger", self.ledger.recover) is None:
            return  # recover() logs what it requeued and quarantined
        self.disposal = DisposalPolicy(policy=cfg.disposal.policy, move_to=cfg.disposal.move_to,
                                       audit_rate=cfg.disposal.audit_rate, audit_dir=cfg.disposal.audit_dir,
                                       floor=cfg.disposal.floor, min_free_mb=cfg.disposal.min_free_mb)
        if cfg.records.md_json:
            from edge.records.megadetector import MdBatchWriter

            self.md_writer = self._wait_for_storage("opening the MegaDetector records", lambda: MdBatchWriter(
                cfg.records.md_json, detector=f"{man.global_model.name}@{man.bundle_version}",
                classifier=f"cascade@{man.bundle_version}", species=man.global_model.classes,
                model_classes={m.name: m.classes for m in man.models}, flush_every=cfg.records.md_flush_every))
            if self.md_writer is None:
                return
        if not self._sweep_gone():
            return  # stopped while waiting for storage
        first_event = self.ledger.max_event_id() + 1
        self.events = EventGrouper(gap_s=cfg.events.gap_s, idle_s=max(cfg.events.gap_s * 2, 1.0),
                                   first_id=first_event)
        self._finish_interrupted()
        if self._update_payload is not None:  # the update record settled before the ledger opened
            self.publish_update(self._update_payload)
        if cfg.mqtt is not None:
            from edge.publish import Publisher

            self.publisher = Publisher(cfg.mqtt, self.ledger, cfg.device.id, model=self.model_version,
                                       commands=self.commands)
            self.publisher.start()
        from edge.ingest import Ingest

        self.ingest = Ingest(cfg.watch.folders, self._on_candidate, patterns=cfg.watch.patterns,
                             recursive=cfg.watch.recursive, polling=cfg.watch.polling,
                             reconcile_every=cfg.watch.reconcile_every_s, settle=cfg.watch.settle_s,
                             on_reject=self._on_reject, poll_interval=cfg.watch.poll_interval_s)
        self._reader = self._essential("reader", self._read_forever)
        self._writer = self._essential("writer", self._write_forever)
        self._up_since = time.monotonic()
        self._writer.start()
        self._reader.start()
        self.ingest.start()
        if self.updates is not None:
            self.updates.after_start()  # an update a restart interrupted goes on, in the background
        self.notifier.ready(self._running_status())
        if self.health.degraded:  # a write failed after the waits above (e.g. a disposal record)
            self._announce_degraded()
        log.info("camtrap-edge %s ready: model %s (%s), backend %s, watching %s", __version__,
                 self.model_version, ", ".join(self.engines), cfg.engine.type,
                 ", ".join(map(str, cfg.watch.folders)))

    def use_model(self, bundle: Bundle, engines: dict) -> None:
        """Serve ``bundle`` with ``engines`` from the next batch on (start-up, and a model update's
        swap, which the inference loop performs between two batches). Batches classified before
        carry the old model's ``_Serving`` to the writer; the new runner starts with no event
        routes to reuse (edge/cascade.py, route reuse)."""
        man = bundle.manifest
        self.bundle, self.engines = bundle, engines
        self.runner = CascadeRunner(man, engines, self.cfg.cascade.apply(man.cascade))
        self.model_version = man.bundle_version
        watch, unknown = man.pick_classes(self.cfg.alerts.species)
        self._serving = _Serving(man.bundle_version, bundle.manifest_sha256[:12], dict(man.codes),
                                 {s: g for g, members in man.groups.items() for s in members}, frozenset(watch))
        for name in unknown:
            log.warning("alerts.species: %r names no class of model %s (class names, short codes, scientific or "
                        "vernacular names); it raises no alert", name, man.bundle_version)
        if self.update_host is not None:
            self.update_host.serving = (bundle, engines)
        if self.publisher is not None:
            self.publisher.update_status(model=self.model_version)

    def _setup_updates(self, keys: list[Path]) -> None:
        """Remote updates (edge/updates.py) manage ``<state_dir>/models/current``; a bundle.path
        elsewhere keeps the box on that bundle and update commands are refused with the reason.
        Runs before the model loads: a crash loop on probation rolls back here."""
        cfg = self.cfg
        store_root = Path(cfg.paths.state_dir) / "models"
        if not cfg.updates.enabled:
            self._updates_off = "remote updates are disabled in this box's config (updates.enabled)"
            return
        if cfg.bundle.path is None or Path(cfg.bundle.path) != store_root / "current":
            self._updates_off = (f"bundle.path is {cfg.bundle.path}; remote updates manage {store_root / 'current'} "
                                 "(leave bundle.path at its default)")
            log.info("%s", self._updates_off)
            return
        from edge.updates import Updater
        from edge.updates_daemon import DaemonHost, adopt_installed
        from edge.updates_store import ModelStore

        adopt_installed(ModelStore(store_root))
        self.update_host = DaemonHost(self)
        self.updates = Updater(cfg.updates, device_id=cfg.device.id, state_dir=Path(cfg.paths.state_dir),
                               public_keys=keys, host=self.update_host,
                               engines_dir=getattr(cfg.engine, "cache_dir", None))
        action = self.updates.resume_on_start()
        if action != "none":
            log.warning("model update: %s after the restart (%s)", action, self.updates.record)

    def publish_update(self, payload: bytes) -> None:
        """The retained ``update`` topic (kept until the ledger is open at start-up)."""
        self._update_payload = payload
        if self._publishing and getattr(self, "ledger", None) is not None:
            self.ledger.enqueue([OutMsg("status", Topics.UPDATE, payload, retain=True)])

    def _cmd_update(self, req: Request) -> dict:
        """cmd/update, cmd/rollback, cmd/models (long work runs on the updater's own thread)."""
        if self.updates is None:
            return {"ok": False, "state": "refused", "reason": self._updates_off}
        return self.updates.handle(req.name, req.payload)

    def _running_status(self) -> str:
        return f"watching {len(self.cfg.watch.folders)} folder(s), model {self.model_version}"

    def _wait_for_storage(self, what: str, fn):
        """``fn()``, retried with backoff while the state disk cannot be written (degraded, the
        watchdog pinged and READY sent so systemd neither times the start out nor restarts it).
        None if the daemon was stopped meanwhile."""
        while not self._stop.is_set():
            try:
                out = fn()
            except STORAGE_ERRORS as e:
                self._storage_failed(what, e)
                self.notifier.ready(f"degraded: {self.health.reason}")
                while not self._stop.is_set() and not self.health.due(time.monotonic()):
                    self.notifier.watchdog()
                    self._stop.wait(min(1.0, max(0.05, self.health.next_try - time.monotonic())))
                continue
            if self.health.recovered():
                log.warning("storage writable again: %s done; carrying on", what)
            return out
        return None

    def _finish_interrupted(self) -> None:
        """Work a stop left half-done: disposal of committed results, and open events, which are
        reopened (with the alerts they already raised) so a burst spanning a restart stays one."""
        self._dispose_pending()
        now = time.monotonic()
        for ev in self.ledger.unclosed_events():
            results = self.ledger.event_results(ev)
            frames = [make_frame(r["file"], None, float(r["taken_at"])) for r in results
                      if "file" in r and "taken_at" in r]
            if not frames:
                self._close_event(ev, self._serving)
                continue
            self.events.reopen(ev, frames, now)
            self._alerted.update((ev, r["alerted"]) for r in results if r.get("alerted"))

    # -- ingest side ------------------------------------------------------------------------
    def _on_candidate(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            return
        if self.health.degraded:  # no write attempt per file and scan: the recovery scans again
            if self.ingest is not None:
                self.ingest.forget(path)
            return
        try:
            new = self.ledger.see(path, st.st_size, st.st_mtime)
        except STORAGE_ERRORS as e:
            self._storage_failed("recording a new file", e)
            if self.ingest is not None:
                self.ingest.forget(path)  # the scan after recovery passes it on again
            return
        if new is not None:
            self._wake.set()

    def _on_reject(self, path: Path, reason: str) -> None:
        """Count a file ingest refused (ingest has already logged it, once, with the reason)."""
        try:
            self.ledger.bump("rejected")
        except STORAGE_ERRORS as e:
            self._storage_failed("counting a refused file", e)

    def _essential(self, name: str, body: Callable[[], None]) -> threading.Thread:
        """A thread the daemon cannot live without (the reader, the writer). If it fails, the
        whole daemon stops with an error (systemd restarts it and the ledger says what to redo):
        a live inference loop over a dead reader or writer would ping the watchdog while nothing
        gets done."""
        def guarded() -> None:
            try:
                body()
            except Exception as e:
                log.exception("%s thread failed; stopping so that the service restarts", name)
                self.fatal = e
                self.stop()

        return threading.Thread(target=guarded, name=name, daemon=True)

    def _read_forever(self) -> None:
        """Claim waiting images and decode them ahead of inference."""
        batch = max(1, self.cfg.engine.max_batch)
        while not self._stop.is_set():
            if self.health.degraded:  # claim nothing until the ledger can record results again
                self._stop.wait(0.5)
                continue
            offenders = time.monotonic() - self._up_since >= OFFENDER_RETRY_AFTER_S
            try:  # claimed and marked in flight (in the decoder) in one transaction, unless a suspect
                rows = self.ledger.claim(batch, offenders=offenders, stage="decode")
            except STORAGE_ERRORS as e:
                self._storage_failed("claiming frames", e)
                continue
            if not rows:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            alone = any(r.suspect for r in rows)  # claim() hands a suspect out on its own
            ids = [r.id for r in rows]
            if alone:  # it enters flight once nothing else is in the decoder or the engine
                self._wait_idle()
                try:
                    self.ledger.in_flight(ids, "decode")
                except STORAGE_ERRORS as e:
                    self._strand(ids, "marking frames in flight", e)
                    continue
            items = []
            for row in rows:
                try:
                    items.append(_Item(row, read_image(row.path, max_side=self.runner.input_side,
                                                          max_pixels=self._max_pixels), None))
                except ImageError as e:
                    items.append(_Item(row, None, str(e)))
                except OSError as e:
                    items.append(_Item(row, None, f"{row.path}: cannot read ({e.strerror or e})"))
            good = [it.image.bgr for it in items if it.image is not None]
            prepared = self.runner.prepare(good)  # letterboxing, too, overlaps the previous inference
            try:
                self.ledger.in_flight(ids, None)  # waiting in the queue is no reason to be blamed
            except STORAGE_ERRORS as e:
                self._strand(ids, "marking frames decoded", e)
                continue
            with self._idle:
                self._outstanding += 1
            while not self._stop.is_set():
                try:
                    self._batches.put((items, prepared), timeout=0.5)
                    break
                except queue.Full:
                    continue
            if alone:
                self._wait_idle()  # nothing else enters flight until the suspect is through

    def _wait_idle(self) -> None:
        """Block until every batch handed to the inference loop is out of the engine (or stopping)."""
        with self._idle:
            while self._outstanding and not self._stop.is_set():
                self._idle.wait(0.5)

    def _batch_done(self) -> None:
        with self._idle:
            self._outstanding -= 1
            self._idle.notify_all()

    # -- the inference loop -------------------------------------------------------------------
    def run(self) -> None:
        """The inference loop: model swaps, events, the cascade, then the batch to the writer;
        watchdog pings while the writer keeps up (a loop that only waits on a stuck writer, or
        runs over a dead one, must not tell systemd that all is well)."""
        interval = watchdog_interval()
        ping_every = interval / 3 if interval else 10.0
        stall_s = interval or 60.0  # a writer without progress this long: no more pings
        self._loop = threading.current_thread()
        if self.update_host is not None:
            self.update_host.loop_thread = self._loop
        while not self._stop.is_set():
            if self._writer is not None and not self._writer.is_alive():
                break  # it set self.fatal and stopped the daemon; systemd restarts it
            if self.update_host is not None:
                self.update_host.run_pending()  # a model swap, between two batches
            now = time.monotonic()
            if now - self._last_ping >= ping_every and now - self._writer_seen < stall_s:
                self.notifier.watchdog()  # from the loop that does the work, not a timer
                self._last_ping = now
            try:
                batch = self._batches.get(timeout=0.5)
            except queue.Empty:
                pass
            else:
                try:
                    self._process(*batch)
                except STORAGE_ERRORS as e:  # a write not handled where it happens: same rule
                    self._strand([it.row.id for it in batch[0]], "processing a batch", e)
                finally:
                    self._batch_done()
            self._tick(time.monotonic())

    def _process(self, items: list[_Item], prepared: Prepared) -> None:
        """One decoded batch: events assigned (frame order), the cascade, out of flight, then
        everything else is the writer's (frames that could not be read included)."""
        failed = [it for it in items if it.error is not None]
        good = [it for it in items if it.error is None]
        if not good:
            self._to_writer(_Job(self._serving, failed=failed))
            return
        ids = [it.row.id for it in good]
        try:
            self.ledger.in_flight(ids, "inference")  # a crash from here on is counted against these
        except STORAGE_ERRORS as e:
            self._strand(ids, "marking frames in flight", e)
            self._to_writer(_Job(self._serving, failed=failed))
            return
        frames, closed = self._assign_events(good)
        t = time.perf_counter()
        answers, serving = self._classify(good, prepared, [ev for _, ev in frames])
        ms = (time.perf_counter() - t) * 1000.0 / len(good)
        self._infer_ms.append(ms)
        try:
            self.ledger.in_flight(ids, None)
        except STORAGE_ERRORS as e:
            self._strand(ids, "marking frames inferred", e)
            self._to_writer(_Job(serving, failed=failed, closed=closed))
            return
        done = []
        for it, (frame, ev), ans in zip(good, frames, answers, strict=True):
            img = it.image
            assert img is not None
            done.append(_Frame(it.row, img.orig_size, img.scale or 1.0, img.format, frame, ev, ans))
        self._to_writer(_Job(serving, frames=done, failed=failed, closed=closed))
        if self.update_host is not None:
            empties = sum(1 for a in answers if a.decision.empty)
            for a in answers:
                self.update_host.frame_done(a.decision.empty, ms)
            if self.updates is not None:
                self.updates.observe(frames=len(answers), empty=empties, ms_total=ms * len(answers))

    def _assign_events(self, good: list[_Item]) -> tuple[list[tuple[Frame, int]], list[int]]:
        """Each frame's time and event, in frame order, before the cascade runs (so the runner can
        reuse an event's confident route); and the events these frames closed (by the gap)."""
        out: list[tuple[Frame, int]] = []
        closed: list[int] = []
        for it in good:
            img = it.image
            assert img is not None
            taken = img.taken_at if self.cfg.events.clock == "exif" else None  # mtime: the camera clock is not trusted
            if taken is not None and taken.tzinfo is None:  # EXIF has no zone: the camera clock's, from config
                taken = taken.replace(tzinfo=self._camera_tz)
            frame = make_frame(it.row.path, taken, it.row.mtime, now=time.time())
            if frame.issue:  # an implausible camera clock (edge/events.py): the result flags the time
                self._clock_log.log(logging.WARNING, "%s: %s; using the file's %s", show_path(it.row.path),
                                    frame.issue, "mtime" if frame.source == "mtime" else "arrival time")
            assign = self.events.add(frame, time.monotonic())
            out.append((frame, assign.event.id))
            closed.extend(e.id for e in assign.closed)
        for ev in closed:
            self.runner.forget(ev)
        return out, closed

    def _classify(self, good: list[_Item], prepared: Prepared, events: list[int]
                  ) -> tuple[list[Classified], _Serving]:
        """The cascade on a batch, and what served it. A new model on probation that fails counts
        an error (enough of them roll it back, here on this thread) and the batch is run again on
        what serves then, so no frame is lost to a bad update."""
        if set(self.runner.input_sizes) - set(prepared.inputs):  # read ahead for the model before a swap
            prepared = self.runner.prepare([it.image.bgr for it in good if it.image is not None])
        try:
            return self.runner.classify_prepared(prepared, events=events), self._serving
        except Exception:
            if self.updates is None or not self.updates.on_probation:
                raise
            log.exception("the new model failed on probation")
            self.updates.observe(errors=1)
            prepared = self.runner.prepare([it.image.bgr for it in good if it.image is not None])
            return self.runner.classify_prepared(prepared, events=events), self._serving

    def _to_writer(self, job: _Job | object) -> None:
        """Queue work for the writer, in order; waits while its queue is full (backpressure).
        A dead writer takes nothing: the frames stay claimed and go back at the stop."""
        while self._writer is not None and self._writer.is_alive():
            try:
                self._writes.put(job, timeout=0.5)
                return
            except queue.Full:
                continue

    # -- the writer ---------------------------------------------------------------------------
    def _write_forever(self) -> None:
        """Write what the inference loop classified, in order (results, records, disposal,
        events), until the ``_END`` job; between jobs, the writer's periodic work."""
        while True:
            self._writer_seen = time.monotonic()
            try:
                job = self._writes.get(timeout=0.5)
            except queue.Empty:
                job = None
            if job is _END:
                return
            if isinstance(job, _Job):
                self._write(job)
                self._writer_seen = time.monotonic()
            self._writer_tick(time.monotonic())

    def _write(self, job: _Job) -> None:
        for it in job.failed:
            assert it.error is not None
            if is_gone(it.row.path):
                self._gone(it.row)
                continue
            try:
                self.ledger.quarantine(it.row.id, it.error)
            except STORAGE_ERRORS as e:
                self._strand([it.row.id], "quarantining a frame", e)
                continue
            log.warning("quarantined %s", it.error)
            self._record([MdResult(it.row.path, failure=it.error[:300])])
        if job.frames:
            try:
                self._finish(job)
            except STORAGE_ERRORS as e:  # a write not handled where it happens: same rule
                self._strand([f.row.id for f in job.frames], "writing a batch's results", e)
        for ev in job.closed:
            self._close_event(ev, job.serving)

    def _finish(self, job: _Job) -> None:
        """A batch's results, built in frame order: their records written first (not fsynced:
        they survive the process dying, so a committed result always has its record; a crash
        before the commit leaves records of frames that are redone, and a redo replaces its
        record), then ONE durable transaction (``Ledger.complete_many``: the messages can go),
        then the records' fsync (off the messages' path), and only then are they disposed of
        (one transaction for the batch's disposals). A frame the ledger refuses is
        skipped alone; a storage error strands the whole batch (nothing of it is durable, so
        nothing of it is disposed of)."""
        alerting: set[tuple[int, str]] = set()  # alerts of this batch, not on record yet
        done = [self._result_of(f, job.serving, alerting) for f in job.frames]
        self._record([MdResult(f.row.path, [Detection.from_dict(x) for x in c.result["detections"]], f.size)
                      for c, f in zip(done, job.frames, strict=True)], sync=False)
        try:
            outcomes = self.ledger.complete_many(done)
        except STORAGE_ERRORS as e:  # disk full, I/O error: the frames are kept and redone later
            self._strand([f.row.id for f in job.frames], "committing results", e)
            return
        self.health.committed()
        if self.md_writer is not None:
            try:
                self.md_writer.sync()
            except STORAGE_ERRORS as e:  # held by the writer for its next rewrite; written by then
                self._storage_failed("writing the MegaDetector records", e)
        committed = []
        for c, f, out in zip(done, job.frames, outcomes, strict=True):
            if isinstance(out, DuplicateResult):
                log.info("%s already has a result; keeping the first", f.row.path)
                continue
            if isinstance(out, LedgerError):
                log.error("%s: result not recorded: %s", f.row.path, out)
                continue
            if c.result.get("alerted"):
                self._alerted.add((f.event, c.result["alerted"]))  # only once the alert is on record
            committed.append((f.row, c.result))  # only id and path are used; both are what was claimed
        self._dispose_many(committed)

    def _result_of(self, f: _Frame, serving: _Serving, alerting: set[tuple[int, str]]) -> Completion:
        """One frame's result and messages, labelled with the model that classified it;
        ``alerting`` holds the (event, species) alerts raised earlier in the batch, not on record yet."""
        d, frame, ev = f.answer.decision, f.frame, f.event
        w, h = f.size
        sp, score = d.top
        result = {
            "file": f.row.path, "width": w, "height": h, "format": f.format, "taken_at": frame.t, "event": ev,
            "model": serving.version, "bundle": serving.bundle, **d.to_dict(),
            "max_animal_score": round(f.answer.max_animal_score, 5),
            "ms": {k: round(v, 2) for k, v in f.answer.timings_ms.items()}, "time_source": frame.source,
        }
        if frame.issue:  # an implausible camera clock (edge/events.py): the records flag the time
            result["time_issue"] = frame.issue
        for det in result["detections"]:  # back to original-image pixels when decoded reduced
            det["box"] = [round(v / f.scale, 1) for v in det["box"]]
        msgs = []
        if not d.empty and self._publishing:
            alert = bool(sp in serving.watch_species and score >= self.cfg.alerts.min_score
                         and (ev, sp) not in self._alerted and (ev, sp) not in alerting)
            msg = message_from_decision(d, seq=f.row.id, time=int(frame.t), codes=serving.codes,
                                        group_of=serving.group_of, model=serving.version, event=ev,
                                        file=os.path.basename(f.row.path), alert=alert)
            payload = encode_detection_json(msg)
            msgs.append(OutMsg("detection", Topics.DETECTIONS, payload, image_id=f.row.id))
            if alert and sp is not None:  # sp is a watch-list species here
                msgs.append(OutMsg("alert", Topics.ALERTS, payload, image_id=f.row.id))
                result["alerted"] = sp  # so a restart does not alert twice for this event
                alerting.add((ev, sp))
        return Completion(f.row.id, result, tuple(msgs), event_id=ev, taken_at=frame.t,
                          counters={"empty": 1} if d.empty else None)

    def _sweep_gone(self) -> bool:
        """Frames deleted while the daemon was down: recorded as gone, said in one line
        (edge/gone.py); False when stopped while waiting for storage."""
        gone = self._wait_for_storage("recording frames that are gone", lambda: sweep_gone(self.ledger))
        if gone is None:
            return False
        if gone:
            log.warning("%s", gone_summary(gone, "while the daemon was down"))
        self._record([MdResult(path, failure=GONE) for path in gone])
        return True

    def _gone(self, row: ImageRow) -> None:
        """A frame whose file went away between its arrival and its turn: gone, not quarantined."""
        try:
            self.ledger.mark_gone([row.id])
        except STORAGE_ERRORS as e:
            self._strand([row.id], "recording a frame that is gone", e)
            return
        self._gone_log.log(logging.WARNING, "%s: %s; recorded as gone, not quarantined", show_path(row.path), GONE)
        self._record([MdResult(row.path, failure=GONE)])

    def _record(self, results: list[MdResult], *, sync: bool = True) -> None:
        """MegaDetector records (one fsync for them all, or none: ``MdBatchWriter.add_many``); kept
        for a retry when the records cannot be written (the ledger has the results: the records
        are a copy of them)."""
        if self.md_writer is None or not results:
            return
        try:
            self.md_writer.add_many(results, sync=sync)
        except STORAGE_ERRORS as e:
            with self._held:
                self._md_backlog.extend(results)
            self._storage_failed("writing the MegaDetector records", e)

    def _disposal_paths(self, root: Path) -> list[Path]:
        """Every filesystem a disposal involves: the watch folder, the state folder (the ledger
        records the disposal) and the move and audit targets. Rule 5 uses the lowest free space."""
        d = self.disposal
        ledger = self.cfg.ledger.path
        return [root, Path(self.cfg.paths.state_dir), *([Path(ledger).parent] if ledger else []),
                *([d.move_to] if d.policy == "move" and d.move_to else []), *([d.audit_dir] if d.audit_dir else [])]

    def _dispose_many(self, frames: list[tuple[ImageRow, Mapping[str, Any]]]) -> None:
        """Keep, move or delete frames whose results are committed, then record them all in one
        transaction (the file operations are safe to redo: a crash before that commit leaves
        ``done`` rows that the next start disposes of again). Only the file that was classified:
        a file of another size or time at its path is a new frame (a card formatted and
        refilled while a disposal waited or was redone), left alone. Nothing while degraded (a
        disposal that cannot be recorded waits); an empty that waits for free space stays
        ``done`` (pending) and is disposed of when space returns. Free space is read once per
        folder and batch."""
        if self.health.degraded or not frames:
            return
        free: dict[Path, float] = {}
        marks: list[tuple[int, str]] = []
        counts: dict[str, int] = {}
        for row, result in frames:
            path = Path(row.path)
            if not _same_file(path, row):
                log.info("%s: a newer file has this name; the disposal of the frame classified before is dropped",
                         show_path(row.path))
                continue
            root = next((Path(f) for f in self.cfg.watch.folders if path.is_relative_to(f)), path.parent)
            if root not in free:
                free[root] = lowest_free_mb(self._disposal_paths(root))
            action = plan_disposal(self.disposal, rel_path=str(path.relative_to(root)),
                                   empty=bool(result.get("empty")),
                                   max_animal_score=float(result.get("max_animal_score", 1.0)),
                                   committed=True, disk_free_mb=free[root])
            if action.kind == "wait":
                self._disposal_waiting = True
                if self._disposal_alarm is None:
                    log.error("disposal paused: %s (empty frames stay until it is back)", action.reason)
                    self._disposal_alarm = action.reason
                    counts["disposal_alarms"] = 1
                continue
            res = apply(action, path, root=root)
            if not res.ok:
                log.error("disposal of %s failed: %s", path, res.note)
                continue
            marks.append((row.id, {"keep": "kept", "delete": "deleted"}.get(res.kind, f"moved:{res.dest}")))
            # the words edge.records maps to Camtrap DP
            counter = "audit_kept" if action.audit else "discarded" if res.kind in ("delete", "move") else None
            if counter:
                counts[counter] = counts.get(counter, 0) + 1
        try:
            self.ledger.mark_disposed_many(marks, counts)
        except STORAGE_ERRORS as e:  # done already; redone (idempotent) and recorded on recovery
            self._storage_failed("recording disposals", e)

    def _dispose_pending(self) -> None:
        """Dispose of every committed frame not yet disposed of (after a stop, a degraded spell,
        or while empties waited for free space), a batch at a time."""
        self._disposal_waiting = False
        was = self._disposal_alarm
        try:
            rows = self.ledger.images("done")
        except STORAGE_ERRORS as e:
            self._storage_failed("reading pending disposals", e)
            return
        # a superseded row's path holds a newer file now (a card formatted and refilled while
        # its empties waited): disposing of it would delete the new frame, which has its own row
        rows = [r for r in rows if r.disposal is None and r.result is not None and r.superseded is None]
        step = max(1, self.cfg.engine.max_batch)
        for k in range(0, len(rows), step):
            if self.health.degraded or self._disposal_waiting:
                return
            self._dispose_many([(r, r.result) for r in rows[k:k + step] if r.result is not None])
            self._writer_seen = time.monotonic()  # progress (a long backlog is not a stuck writer)
        if was is not None and not self._disposal_waiting and not self.health.degraded:
            log.warning("disposal resumed: free space is back above %s MB", self.disposal.min_free_mb)
            self._disposal_alarm = None

    # -- storage health (a full or failing state disk) ----------------------------------------
    def _storage_failed(self, what: str, e: BaseException) -> None:
        """A durable write failed: degraded (said once per spell), retried with backoff."""
        if self.health.failed(f"{what}: {describe(e)}", time.monotonic()):
            self._announce_degraded()

    def _announce_degraded(self) -> None:
        reason = self.health.reason or "storage"
        log.error("DEGRADED: the state disk cannot be written (%s); claiming and deleting nothing, retrying "
                  "with backoff", reason)
        self.notifier.status(f"degraded: {reason}")
        if self.publisher is not None:
            self.publisher.set_state("degraded", reason)

    def _strand(self, ids: list[int], what: str, e: BaseException) -> None:
        """Claimed frames whose result cannot be committed: put back to ``seen`` on recovery."""
        with self._held:
            self._stranded.update(ids)
        self._storage_failed(what, e)

    def _retry_storage(self) -> None:
        """The writer, while degraded, when the backoff is up: write what waits (stranded frames
        back to 'seen', records, event answers); if all of it goes in, carry on."""
        with self._held:
            stranded, backlog, unclosed = sorted(self._stranded), list(self._md_backlog), sorted(self._unclosed)
        try:
            self.ledger.release(stranded)
            self.ledger.bump("storage_retries")  # a write even when nothing was stranded
            with self._held:
                self._stranded.difference_update(stranded)
            if backlog and self.md_writer is not None:
                self.md_writer.add_many(backlog)
            with self._held:
                del self._md_backlog[:len(backlog)]
            for ev in unclosed:
                self._close_event(ev, self._serving, raise_errors=True)
        except STORAGE_ERRORS as e:
            self._storage_failed("retrying", e)
            return
        if not self.health.recovered():
            return
        log.warning("storage writable again: %d frame(s) put back to redo; resuming", len(stranded))
        self.notifier.status(self._running_status())
        if self.publisher is not None:
            self.publisher.set_state("online")
        if self.ingest is not None:
            self.ingest.scan_now()  # files that could not be recorded meanwhile
        self._wake.set()
        self._dispose_pending()

    # -- events -----------------------------------------------------------------------------
    def _close_event(self, ev: int, serving: _Serving, *, raise_errors: bool = False) -> None:
        """One event-level answer per burst, on the ``events`` topic, from the results on record
        (so an event left open by a crash is closed the same way after the restart), labelled
        with the model that served when it closed. When the ledger cannot take it, the event is
        kept for the storage retry. The writer's (or, at start-up and stop, the only thread's)."""
        try:
            results = self.ledger.event_results(ev)
            if not results:
                return
            ev_dec = event_decision([Decision.from_dict(r) for r in results])
            msgs = []
            if not ev_dec.empty and self._publishing:
                msg = message_from_decision(ev_dec, seq=ev, time=int(min(r.get("taken_at") or 0 for r in results)),
                                            codes=serving.codes, group_of=serving.group_of,
                                            model=serving.version, event=ev)
                msgs.append(OutMsg("detection", Topics.EVENTS, encode_detection_json(msg)))
            self.ledger.close_event(ev, ev_dec.to_dict(), msgs)
        except STORAGE_ERRORS as e:
            with self._held:
                self._unclosed.add(ev)
            if raise_errors:
                raise
            self._storage_failed("recording an event's answer", e)
            return
        with self._held:
            self._unclosed.discard(ev)

    # -- periodic ---------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        """The inference loop's: idle events closed (by the writer, after the results queued
        before), probation's clock."""
        idle = self.events.idle_cameras(now)
        if idle:  # frames of a camera that wait (a backlog, a frame held back after a crash) keep its event open
            try:
                waiting = self.ledger.waiting_in(idle)  # frames queued for the writer still wait
            except STORAGE_ERRORS as e:
                self._storage_failed("reading the frames that wait", e)
                waiting = idle
            closed = [ev.id for ev in self.events.expire(now, waiting=waiting)]
            for ev in closed:
                self.runner.forget(ev)
            if closed:
                self._to_writer(_Job(self._serving, closed=closed))
        if self.updates is not None:
            self.updates.observe()  # probation also ends on time, frames or not

    def _writer_tick(self, now: float) -> None:
        """The writer's: storage retries, empties waiting for free space, telemetry."""
        if self.health.due(now):
            self._retry_storage()
        if self._disposal_waiting and now >= self._next_disposal_retry and not self.health.degraded:
            self._next_disposal_retry = now + DISPOSAL_RETRY_S
            self._dispose_pending()
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.cfg.telemetry.every_s
            self._telemetry()

    def _telemetry(self) -> None:
        c = self.ledger.counters()
        states = self.ledger.state_counts()
        counts = telemetry_counts(states, c)
        ms = sum(self._infer_ms) / len(self._infer_ms) if self._infer_ms else None
        disk = min(lowest_free_mb(self._disposal_paths(Path(f))) for f in self.cfg.watch.folders)
        alarm = self.health.reason or self._disposal_alarm
        payload = telemetry_payload(time=int(time.time()), counts=counts,
                                    queue=states.get("seen", 0) + states.get("processing", 0),
                                    outbox=self.ledger.outbox_depth(), infer_ms=ms,
                                    disk_free_mb=disk, temp_c=cpu_temperature(),
                                    extra={"alarm": alarm} if alarm else None)
        if self._publishing and not self.health.degraded:
            try:
                self.ledger.enqueue([OutMsg("telemetry", Topics.TELEMETRY, payload)])
            except STORAGE_ERRORS as e:
                self._storage_failed("queueing telemetry", e)
        log.info("telemetry %s", payload.decode())

    # -- commands (the command thread; edge.mqtt_commands) -------------------------------------
    def _cmd_ping(self, req: Request) -> dict:
        return {"pong": int(time.time()), "model": self.model_version}

    def _cmd_status(self, req: Request) -> dict:
        return {"model": self.model_version, "states": self.ledger.state_counts(),
                "outbox": self.ledger.outbox_depth()}

    # -- shutdown ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _end_writer(self) -> bool:
        """Let the writer finish what is queued, then end it. False if it could not in
        ``WRITER_DRAIN_S`` (a stuck disk): what it holds is redone at the next start."""
        w = self._writer
        if w is None or not w.is_alive():
            return True
        try:
            self._writes.put(_END, timeout=WRITER_DRAIN_S)
        except queue.Full:
            pass
        w.join(WRITER_DRAIN_S)
        if w.is_alive():
            log.error("the writer did not finish within %.0f s; what it holds is redone at the next start",
                      WRITER_DRAIN_S)
            return False
        return True

    def close(self) -> None:
        """Orderly stop: ingest off, classify nothing new, write what was classified (the
        writer drains its queue), answer the open bursts, flush records, publish 'stopped'.
        Batches decoded but not classified go back to 'seen' (redone at the next start); a
        clean stop blames no frame."""
        self.notifier.stopping("stopping")
        if self.updates is not None:
            self.updates.clean_stop()  # not a crash, for probation's count
        if self.ingest is not None:
            self.ingest.stop()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._loop is not None and self._loop is not threading.current_thread():
            self._loop.join(timeout=WRITER_DRAIN_S)  # run() on another thread: its batch in hand goes to the writer
        drained = self._end_writer()
        if drained and getattr(self, "events", None) is not None:
            for e in self.events.close_all():  # a clean stop answers the bursts in hand now
                self._close_event(e.id, self._serving)
        if self.md_writer is not None:
            try:
                self.md_writer.close()
            except STORAGE_ERRORS as e:  # its journal keeps what the JSON lacks, for the next start
                log.error("MegaDetector records not rewritten at stop (%s); the next start does it", describe(e))
        if self.publisher is not None:
            if self.publisher.connected:
                self.publisher.wait_drained(5.0)  # what is left stays in the outbox for the next start
            self.publisher.stop()
        for engine in getattr(self, "engines", {}).values():
            engine.close()
        if getattr(self, "ledger", None) is not None:
            if drained and (self._reader is None or not self._reader.is_alive()):
                try:
                    self.ledger.release()
                except STORAGE_ERRORS as e:  # then the next start's recover() does it
                    log.error("ledger: claimed frames not put back at stop (%s)", describe(e))
            self.ledger.close()


def run_daemon(cfg: Config) -> int:
    from edge.statelock import lock_state_dir

    os.umask(UMASK)  # our own, not the caller's (see the module docstring)
    lock = lock_state_dir(cfg.paths.state_dir)  # before anything touches the state (edge/statelock.py)
    d = Daemon(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: d.stop())
    try:
        d.start()
        d.run()
    finally:
        d.close()
        if lock is not None:
            lock.close()
    return 1 if d.fatal is not None else 0


def _cmd_run(args: argparse.Namespace) -> int:
    return run_daemon(load_config(args.config))


def status_report(cfg: Config, last: int = 5) -> str:
    """What the ledger says, for a ranger at the console (safe while the daemon runs: WAL)."""
    assert cfg.ledger.path is not None  # set by Config._derive
    path = Path(cfg.ledger.path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger yet (has the daemon run with this config?)")
    with Ledger(path) as led:
        states, counters = led.state_counts(), led.counters()
        lines = [f"ledger {path}",
                 "images: " + ", ".join(f"{k} {v}" for k, v in states.items()),
                 f"outbox: {led.outbox_depth()} message(s) waiting for the broker",
                 "totals: " + ", ".join(f"{k} {v}" for k, v in telemetry_counts(states, counters).items()),
                 "counters: " + (", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none")]
        for r in led.latest(last, with_result=True):
            res = r.result or {}
            what = "empty" if res.get("empty") else f"{res.get('species')} {res.get('score', 0):.2f}"
            lines.append(f"  {Path(r.path).name}: {what} ({r.state}{', ' + r.disposal if r.disposal else ''})")
        for r in led.latest(last, state="quarantined"):
            lines.append(f"  {Path(r.path).name}: quarantined: {r.error}")
        for r in led.latest(last, state="gone"):
            lines.append(f"  {Path(r.path).name}: {r.error or GONE}")
    lines.append(update_line(Path(cfg.paths.state_dir)))
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    print(status_report(load_config(args.config), args.last))
    return 0


def requeue(cfg: Config, files: list[Path] | None) -> list[ImageRow]:
    """Give quarantined frames another try (all of them when ``files`` is None). Safe while the
    daemon runs: it picks them up at its next claim, each alone (they come back as suspects)."""
    assert cfg.ledger.path is not None  # set by Config._derive
    path = Path(cfg.ledger.path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger yet (has the daemon run with this config?)")
    with Ledger(path) as led:
        try:
            return led.requeue(None if files is None else [os.path.abspath(f) for f in files])
        except LedgerError as e:
            raise ValueError(str(e)) from None


def _cmd_requeue(args: argparse.Namespace) -> int:
    rows = requeue(load_config(args.config), None if args.quarantined else args.files)
    for r in rows:
        print(f"requeued {r.path}")
    print(f"{len(rows)} quarantined frame(s) requeued")
    return 0


def _count(text: str) -> int:
    """A count of rows, 0 or more; a huge one means all (SQLite's LIMIT takes 64-bit numbers only)."""
    return min(int_at_least(0)(text), 2**62)


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="the daemon: watch folders, classify, publish, dispose of empties")
    p.add_argument("--config", required=True, type=Path, help="device config YAML")
    p.set_defaults(func=_cmd_run)
    s = sub.add_parser("status", help="what the ledger says: image states, outbox, latest results")
    s.add_argument("--config", required=True, type=Path, help="device config YAML")
    s.add_argument("--last", type=_count, default=5,
                   help="latest results (and quarantined and gone frames) to list; 0: none")
    s.set_defaults(func=_cmd_status)
    r = sub.add_parser("requeue", help="give quarantined frames another try (each alone)")
    r.add_argument("--config", required=True, type=Path, help="device config YAML")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--quarantined", action="store_true", help="every quarantined frame")
    which.add_argument("files", nargs="*", type=Path, default=[], metavar="FILE", help="quarantined frames to retry")
    r.set_defaults(func=_cmd_requeue)
