"""P4 and P5: how busy the engines are over a burst of frames, and the daemon's peak memory.

The real daemon (the demo config: demo bundle, ONNX Runtime CPU, no broker so nothing waits on
the network) watches a temporary folder; ``--frames`` frames (the demo's frames, under new names)
are moved into it at once, as an SD-card sync does. Measured in this process:

- P4, engine busy: the time spent inside the engines' runs (every model, the shared backbone
  included; measured around each engine call of the daemon's own engines) over the wall time
  from the burst's arrival to its last result. Beside it, the share of the cascade on the
  inference thread (the engines plus decoding, NMS and routing): what the inference thread does
  besides that is waiting (for the reader, or for the writer when its queue is full) and the
  in-flight marks; results, records and disposal are the writer thread's. The per-frame shares
  the results record (result ``ms``) are printed too: they split a batch's run between its
  frames and undercount runs repeated within a batch (staged background rounds, route-reuse
  waves), so they are not the measure;
- P5, peak RSS (``ru_maxrss``) before the daemon starts, after it loaded the bundle, and after the
  burst: growth with results held (``--frames``) and with the bundle's models.

Not a test: record results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Busy:
    """Wall time inside wrapped calls (the outermost call only: an engine that calls another
    wrapped one, a head over its backbone, is counted once)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = threading.local()

    def wrap(self, obj: object, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._depth.n = depth
                if depth == 0:
                    self.seconds += time.perf_counter() - t

        setattr(obj, name, timed)


def finished(ledger_path: Path) -> int:
    """Frames with a final state, read on a connection of our own (WAL: the daemon is not held up)."""
    import sqlite3

    db = sqlite3.connect(ledger_path, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM images WHERE state IN ('done', 'disposed', 'quarantined', 'gone')"
                          ).fetchone()[0]
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: the demo bundle)")
    ap.add_argument("--batch", type=int, default=4, help="engine.max_batch")
    ap.add_argument("--engine", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more engine settings, e.g. allow_spinning=true intra_op_threads=1 (benchmarks/threads.py)")
    args = ap.parse_args(argv)
    import yaml

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.demo import DEMO_BUNDLE, DEMO_DIR, DEMO_KEYS

    rss0 = rss_mb()
    work = Path(tempfile.mkdtemp(prefix="p4-"))
    watch, state, staging = work / "watch", work / "state", work / "staging"
    for d in (watch, state, staging):
        d.mkdir()
    src = sorted((DEMO_DIR / "frames").glob("*.JPG"))
    for i in range(args.frames):
        shutil.copyfile(src[i % len(src)], staging / f"{i:05d}.jpg")
    bundle = args.bundle or DEMO_BUNDLE
    cfg = {"device": {"id": "p4"}, "watch": {"folders": [str(watch)], "settle_s": 0.3},
           "bundle": {"path": str(bundle), "public_keys_dir": str(DEMO_KEYS),
                      "require_signature": args.bundle is None},
           "engine": {"type": "onnxruntime", "max_batch": args.batch,
                      **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.engine)}},
           "events": {"gap_s": 3.0, "clock": "mtime"}, "disposal": {"policy": "keep", "audit_rate": 0.0},
           "paths": {"state_dir": str(state)}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(work / "config.yaml"))
    try:
        daemon.start()
        rss_loaded = rss_mb()
        engines, cascade = Busy(), Busy()
        for eng in daemon.engines.values():
            for name in ("infer", "run_features"):
                if hasattr(eng, name):
                    engines.wrap(eng, name)
            if getattr(eng, "backbone", None) is not None and not hasattr(eng.backbone, "_p4"):
                engines.wrap(eng.backbone, "run")
                eng.backbone._p4 = True
        cascade.wrap(daemon.runner, "classify_prepared")
        threading.Thread(target=daemon.run, name="daemon", daemon=True).start()
        t0 = time.time()
        os.rename(staging, watch / "card")  # the whole burst arrives at once
        while (done := finished(Path(daemon.ledger.path))) < args.frames:
            if time.time() - t0 > 1800:
                raise RuntimeError(f"burst not finished after 30 min: {done} of {args.frames} frames")
            time.sleep(0.05)
        wall = time.time() - t0  # polled every 50 ms
        rows = [r for r in daemon.ledger.images() if r.result]
        infer = sum(sum(r.result.get("ms", {}).values()) for r in rows) / 1000.0
        rss_after = rss_mb()
    finally:
        daemon.stop()
        daemon.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.frames} frames in one burst, {bundle.name if args.bundle else 'demo bundle'} on ONNX Runtime CPU, "
          f"max_batch {args.batch}, {os.cpu_count()} cores, engine {cfg['engine']}")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| burst wall time (arrival -> last result) | {wall:.1f} s ({1000 * wall / args.frames:.1f} ms/frame) |")
    print(f"| time inside the engines (all models, backbone included) | {engines.seconds:.1f} s |")
    print(f"| P4 engine busy [>= 90%] | {100 * engines.seconds / wall:.0f}% |")
    print(f"| the cascade on the inference thread (engines, decode, NMS, routing) | {cascade.seconds:.1f} s "
          f"({100 * cascade.seconds / wall:.0f}%) |")
    print(f"| inference the results record (result ms, per-frame shares; undercounts) | {infer:.1f} s |")
    print(f"| P5 peak RSS: before start / bundle loaded / after the burst | {rss0:.0f} / {rss_loaded:.0f} / "
          f"{rss_after:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
