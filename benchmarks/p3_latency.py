"""P3: from a camera closing a file to its detection message at a subscriber, minus the inference.

The real daemon (edge.daemon.Daemon, the demo's config: demo bundle, ONNX Runtime CPU) watches a
temporary folder and publishes to a real Mosquitto on a free loopback port (the tests' helper,
tests/edge/broker.py); a paho subscriber in this process stamps each detection message on
arrival. Frames (the demo's animal frames, which always give a detection) are written in place
one at a time, as a camera does: open, write, close, then the close time is stamped, and the
next frame waits until the message for this one arrived (no queueing). Per frame:

    latency  = message received - file closed
    overhead = latency - the inference the daemon recorded for it (result ``ms``, all models)

p50 and p95 of both are printed. Not a test: record results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "edge"))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--gap", type=float, default=0.1, help="seconds between a message and the next frame")
    args = ap.parse_args(argv)

    import paho.mqtt.client as mqtt
    from broker import Mosquitto
    from paho.mqtt.enums import CallbackAPIVersion

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.demo import DEMO_DIR, DEVICE_ID, write_config
    from edge.messages import topics

    build = json.loads((DEMO_DIR / "build.json").read_text())
    animal = [DEMO_DIR / "frames" / f["file"] for f in build["frames"] if f.get("predicted")]
    work = Path(tempfile.mkdtemp(prefix="p3-"))
    watch, state = work / "watch", work / "state"
    watch.mkdir()
    state.mkdir()
    broker = Mosquitto(work / "mosquitto").start()
    arrived: queue.Queue[tuple[float, dict]] = queue.Queue()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="p3-sub", protocol=mqtt.MQTTv311)
    ready = threading.Event()
    det_topic = topics(None, DEVICE_ID).detections
    sub.on_connect = lambda c, u, f, r, p=None: c.subscribe(det_topic, qos=1)
    sub.on_subscribe = lambda c, u, m, r, p=None: ready.set()
    sub.on_message = lambda c, u, msg: arrived.put((time.time(), json.loads(msg.payload)))
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    daemon = None
    try:
        if not ready.wait(10):
            raise RuntimeError("subscriber did not subscribe")
        cfg = load_config(write_config(work / "config.yaml", watch=watch, state=state, host=broker.host,
                                       port=broker.port))
        daemon = live = Daemon(cfg)
        daemon.start()
        runner = threading.Thread(target=live.run, name="daemon", daemon=True)
        runner.start()
        closed: dict[str, float] = {}
        got: dict[str, float] = {}
        for i in range(args.frames):
            src = animal[i % len(animal)]
            name = f"{i:04d}.jpg"
            data = src.read_bytes()
            with open(watch / name, "wb") as f:  # written in place, as a camera does
                f.write(data)
            closed[name] = time.time()
            deadline = time.monotonic() + 10
            while name not in got and time.monotonic() < deadline:
                try:
                    t, payload = arrived.get(timeout=0.5)
                except queue.Empty:
                    continue
                got[payload.get("f", "")] = t
            time.sleep(args.gap)
        infer = {}
        for row in daemon.ledger.images():
            if row.result:
                infer[Path(row.path).name] = sum(row.result.get("ms", {}).values())
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.close()
        sub.loop_stop()
        sub.disconnect()
        broker.close()
    names = [n for n in closed if n in got and n in infer][2:]  # the first two warm the caches
    lat = [(got[n] - closed[n]) * 1000.0 for n in names]
    over = [lat[k] - infer[n] for k, n in enumerate(names)]
    print(f"{len(names)} frames (of {args.frames}; {args.frames - len([n for n in closed if n in got])} without a "
          f"message), demo bundle on ONNX Runtime CPU, Mosquitto on loopback")
    print("| per frame (ms) | p50 | p95 | max |")
    print("|---|---:|---:|---:|")
    print(f"| file closed -> message received | {pct(lat, .5):.1f} | {pct(lat, .95):.1f} | {max(lat):.1f} |")
    print(f"| inference recorded by the daemon | {pct([infer[n] for n in names], .5):.1f} | "
          f"{pct([infer[n] for n in names], .95):.1f} | {max(infer[n] for n in names):.1f} |")
    print(f"| latency minus inference [p95 <= 20 ms] | {pct(over, .5):.1f} | {pct(over, .95):.1f} | {max(over):.1f} |")
    print(f"mean overhead {statistics.mean(over):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
