"""`camtrap-edge demo`: the main job end to end on this machine, in about half a minute.

Why: a person who just installed the package should see the product do its job without a
camera, a broker or a model of their own. The demo runs the real daemon (edge.daemon.Daemon)
on the shipped, signed demo bundle (edge/demo/bundle, verified against edge/demo/keys/demo.pub)
with a temporary watch folder and state folder, and an embedded MQTT broker (amqtt, pure
Python, the `demo` extra) on a free loopback port unless ``--broker HOST:PORT`` names one. It
drops the demo frames into the watch folder one by one as a camera does (write to a temporary
name, then rename; a burst one second apart), prints every message a subscriber to
``camtrap/demo/#`` receives, waits until every frame has a result and the outbox is drained,
and prints a summary. Exit 0 on success, 1 when the wait times out, 2 on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("camtrap.demo")

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_BUNDLE = DEMO_DIR / "bundle"
DEMO_KEYS = DEMO_DIR / "keys"
DEMO_FRAMES = DEMO_DIR / "frames"
DEVICE_ID = "demo"
FRAME_SUFFIXES = (".jpg", ".jpeg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_broker(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or 'HOST', port 1883) -> (host, port); a bad value is one clear line."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    if not host:
        raise ValueError(f"--broker {text!r}: want HOST:PORT, e.g. localhost:1883")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"--broker {text!r}: port {port!r} is not a number") from None
    if not 1 <= p <= 65535:
        raise ValueError(f"--broker {text!r}: port {p} outside 1..65535")
    return host, p


# --- the embedded broker --------------------------------------------------------------------------


class EmbeddedBroker:
    """amqtt on 127.0.0.1:<port> in a background thread with its own event loop (MQTT 3.1.1)."""

    def __init__(self, port: int | None = None) -> None:
        self.host, self.port = "127.0.0.1", port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise ValueError("the embedded broker needs amqtt: pip install 'camtrap-cascade[demo]' "
                             "(or give --broker HOST:PORT)") from None
        for name in ("amqtt", "transitions"):  # their INFO lines would drown the demo's output
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def boot() -> None:
            self._broker = Broker(config, loop=loop)
            await self._broker.start()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except BaseException as e:  # reported to start()
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port} in {timeout} s")
        if failure:
            raise RuntimeError(f"embedded MQTT broker failed to start on {self.host}:{self.port}: {failure[0]}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or self._thread is None:
            return
        if broker is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout)
            except Exception as e:  # a broker that will not stop cleanly must not hide the demo's result
                log.debug("embedded broker shutdown: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._loop = self._thread = None


# --- the subscriber -------------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: Any  # decoded JSON, else text, else the bytes as hex
    retained: bool


def decode_payload(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass
class Subscriber:
    """A paho client subscribed to ``topic``; messages land in a queue the main thread prints."""

    host: str
    port: int
    topic: str
    messages: queue.Queue[Received] = field(default_factory=queue.Queue)

    def start(self, timeout: float = 10.0) -> Subscriber:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"camtrap-demo-sub-{os.getpid()}",
                                   protocol=mqtt.MQTTv311)

        def on_connect(client, userdata, flags, reason, props=None):
            if not reason.is_failure:
                client.subscribe(self.topic, qos=1)

        def on_subscribe(client, userdata, mid, reasons, props=None):
            subscribed.set()

        def on_message(client, userdata, msg):
            self.messages.put(Received(msg.topic, decode_payload(msg.payload), bool(msg.retain)))

        self._client.on_connect, self._client.on_subscribe = on_connect, on_subscribe
        self._client.on_message = on_message
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as e:
            raise ValueError(f"cannot reach the MQTT broker at {self.host}:{self.port} ({e})") from None
        self._client.loop_start()
        if not subscribed.wait(timeout):
            self.stop()
            raise ValueError(f"MQTT broker at {self.host}:{self.port}: no subscription to {self.topic} "
                             f"within {timeout:.0f} s")
        return self

    def stop(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.disconnect()
            client.loop_stop()
            del self._client


# --- the demo -------------------------------------------------------------------------------------


def demo_frames(folder: Path) -> list[Path]:
    frames = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
                    and not p.name.startswith("."))
    if not frames:
        raise FileNotFoundError(f"{folder}: no .jpg frames to drop into the watch folder")
    return frames


def write_config(path: Path, *, watch: Path, state: Path, host: str, port: int) -> Path:
    """The demo device's config file (a real one: the daemon reads it through edge.config)."""
    import yaml

    cfg = {
        "device": {"id": DEVICE_ID, "location_name": "camtrap-edge demo"},
        "watch": {"folders": [str(watch)], "settle_s": 0.3, "reconcile_every_s": 5.0},
        "bundle": {"path": str(DEMO_BUNDLE), "public_keys_dir": str(DEMO_KEYS), "require_signature": True},
        "engine": {"type": "onnxruntime", "max_batch": 4},
        # frames 1 s apart form one event; it closes 10 s after its last frame and is published
        "events": {"gap_s": 3.0, "clock": "mtime"},
        "mqtt": {"host": host, "port": port, "protocol": "3.1.1", "keepalive": 30, "reconnect_max_s": 5.0},
        "telemetry": {"every_s": 30.0},
        "disposal": {"policy": "keep", "audit_rate": 0.0},
        "paths": {"state_dir": str(state)},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def drop_frame(src: Path, watch: Path) -> Path:
    """As a camera or FTP server does: write under a temporary name, then rename into place."""
    tmp = watch / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    final = watch / src.name
    os.replace(tmp, final)
    return final


def _show(msg: Received, say: Callable[[str], None]) -> None:
    body = json.dumps(msg.payload, separators=(",", ":")) if not isinstance(msg.payload, str) else msg.payload
    say(f"  <- {msg.topic}{' (retained)' if msg.retained else ''}: {body}")


def run_demo(*, frames_dir: Path | None = None, broker: str | None = None, keep: bool = False,
             interval: float = 1.0, timeout: float = 60.0, say: Callable[[str], None] = print) -> int:
    """Run the demo; returns the exit status (0 ok, 1 timed out)."""
    from edge.bundle import load_bundle
    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.messages import topics

    frames = demo_frames(Path(frames_dir) if frames_dir else DEMO_FRAMES)
    bundle = load_bundle(DEMO_BUNDLE, public_keys=sorted(DEMO_KEYS.glob("*.pub")), require_signature=True)
    man = bundle.manifest
    say(f"demo bundle {bundle.version}: signature verified (key {bundle.key_id}); models "
        f"{', '.join(m.name for m in man.models)}; groups "
        + "; ".join(f"{g}: {', '.join(s)}" for g, s in man.groups.items()))

    work = Path(tempfile.mkdtemp(prefix="camtrap-demo-"))
    watch, state = work / "watch", work / "state"
    watch.mkdir()
    state.mkdir()
    embedded: EmbeddedBroker | None = None
    sub: Subscriber | None = None
    daemon: Daemon | None = None
    runner: threading.Thread | None = None
    crashed: list[BaseException] = []
    received: list[Received] = []
    status = 1
    try:
        if broker:
            host, port = parse_broker(broker)
            say(f"broker: {host}:{port}")
        else:
            embedded = EmbeddedBroker().start()
            host, port = embedded.host, embedded.port
            say(f"broker: embedded amqtt on {host}:{port}")
        device_topics = topics(None, DEVICE_ID)  # the demo config keeps the default prefix
        topic = device_topics.prefix + "#"
        sub = Subscriber(host, port, topic).start()
        say(f"subscribed to {topic}")
        cfg_path = write_config(work / "config.yaml", watch=watch, state=state, host=host, port=port)
        cfg = load_config(cfg_path)
        say(f"device config {cfg_path}; watching {watch}")
        daemon = live = Daemon(cfg)
        daemon.start()

        def run() -> None:
            try:
                live.run()
            except BaseException as e:  # reported by the main thread
                crashed.append(e)
                log.exception("daemon loop failed")

        runner = threading.Thread(target=run, name="daemon", daemon=True)
        runner.start()

        def pump() -> None:
            while True:
                try:
                    m = sub.messages.get_nowait()
                except queue.Empty:
                    return
                received.append(m)
                _show(m, say)

        for i, f in enumerate(frames):
            if i:
                time.sleep(interval)
            pump()
            drop_frame(f, watch)
            say(f"-> {f.name} dropped into the watch folder ({i + 1}/{len(frames)})")
        deadline = time.monotonic() + timeout
        done = False
        while time.monotonic() < deadline and not crashed:
            pump()
            states = daemon.ledger.state_counts()
            finished = sum(states.get(k, 0) for k in ("done", "disposed", "quarantined", "gone"))
            open_events = daemon.events.open_events
            if finished >= len(frames) and daemon.ledger.outbox_depth() == 0 and not open_events:
                done = True
                break
            time.sleep(0.2)
        rows = [r for r in daemon.ledger.images() if Path(r.path).parent == watch]
        animals = sum(1 for r in rows if r.result and not r.result.get("empty"))
        empties = sum(1 for r in rows if r.result and r.result.get("empty"))
        failed = sum(1 for r in rows if r.state in ("quarantined", "gone"))
        outbox = daemon.ledger.outbox_depth()
        say("stopping the daemon")
        daemon.stop()
        runner.join(10)
        daemon.close()  # publishes the retained 'stopped' status
        daemon = None
        time.sleep(0.5)  # the last messages may still be on their way to the subscriber
        pump()
        detections = [m for m in received if m.topic == device_topics.detections]
        say(f"summary: frames {len(frames)}, results {animals + empties + failed}, animals {animals}, "
            f"empties {empties}, unreadable {failed}, messages {len(received)} "
            f"(detections {len(detections)}), outbox {outbox}")
        if crashed:
            say(f"demo: FAILED: the daemon's processing loop stopped: {crashed[0]!r}")
        elif not done:
            say(f"demo: FAILED: not every frame had a result and a delivered message after {timeout:.0f} s")
        else:
            say("demo: ok")
            status = 0
    finally:
        if daemon is not None:
            daemon.stop()
            if runner is not None:
                runner.join(10)
            daemon.close()
        if sub is not None:
            sub.stop()
        if embedded is not None:
            embedded.stop()
        if keep:
            say(f"kept {work} (config.yaml, watch/, state/ with the ledger and records)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


def _cmd(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):  # the demo narrates; the daemon's INFO lines only with -v
        logging.getLogger().setLevel(logging.WARNING)
    return run_demo(frames_dir=args.frames, broker=args.broker, keep=args.keep, interval=args.interval,
                    timeout=args.timeout)


def add_cli(sub: Any) -> None:
    from edge.cli import number_in

    p = sub.add_parser("demo", help="run the daemon on the shipped demo bundle and frames, with an embedded broker",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=Path, help=f"folder of .jpg frames to drop (default: the shipped {DEMO_FRAMES})")
    p.add_argument("--broker", help="HOST:PORT of an MQTT broker (default: an embedded amqtt on a free port)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (config, ledger, records)")
    p.add_argument("--interval", type=number_in(0, 3600), default=1.0, help="seconds between frames (default 1)")
    p.add_argument("--timeout", type=number_in(0, 86_400), default=60.0,
                   help="seconds to wait for all results (default 60)")
    p.set_defaults(func=_cmd)
