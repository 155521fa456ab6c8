"""P4 and P5: how busy the engines are over a burst of frames, and the daemon's peak memory.

The real daemon (the demo config: demo bundle, ONNX Runtime CPU, no broker so nothing waits on
the network) watches a temporary folder; ``--frames`` frames (the demo's frames, under new names)
are moved into it at once, as an SD-card sync does. Measured in this process:

- P4, engine busy: the inference time the daemon recorded for every frame (result ``ms``, all
  models, the shared backbone included) over the wall time from the burst's arrival to its last
  result; what is left is reading, letterboxing the reader does not hide, commits, records and
  disposal on the inference thread;
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
        threading.Thread(target=daemon.run, name="daemon", daemon=True).start()
        t0 = time.time()
        os.rename(staging, watch / "card")  # the whole burst arrives at once
        while True:
            states = daemon.ledger.state_counts()
            if sum(states.get(k, 0) for k in ("done", "disposed", "quarantined")) >= args.frames:
                break
            if time.time() - t0 > 1800:
                raise RuntimeError(f"burst not finished after 30 min: {states}")
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
    print(f"| inference recorded (all models) | {infer:.1f} s |")
    print(f"| P4 engine busy [>= 90%] | {100 * infer / wall:.0f}% |")
    print(f"| P5 peak RSS: before start / bundle loaded / after the burst | {rss0:.0f} / {rss_loaded:.0f} / "
          f"{rss_after:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
