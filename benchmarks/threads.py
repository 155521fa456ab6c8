"""Thread-pool policy for a bundle's ONNX Runtime sessions: every setting measured side by side.

Each model of a bundle is its own InferenceSession with its own intra-op thread pool, and the
cascade runs them one after the other; the daemon's reader thread decodes and letterboxes the
next frames meanwhile (OpenCV, with its own thread pool). Which pool settings are fastest
depends on how these compete for the cores, so each setting is measured on four workloads:

- ``single 160``: the demo bundle's global model alone, batch 1 (P1's latency case), the edge
  path (engine + decode), median per call;
- ``single 640``: a YOLOv8n at 640 px, batch 1, median per call (built with random weights when
  ultralytics is importable, or ``--model640 FILE.onnx``; left out otherwise);
- ``cascade``: the demo bundle's cascade with every expert on background frames (4 sessions,
  the heaviest policy), batches of 8 of the demo build's test frames, ms per frame;
- ``cascade + reader``: the same while a second thread reads real 2048x1440 JPEGs
  (``read_image`` reduced to the model input, then ``prepare``) in a loop, as the daemon's
  reader does during a burst; ms per cascade frame, and the frames the reader got through.

A setting is ``SPIN/THREADS[/cvN]``: ``on``/``off`` = ONNX Runtime's pool spinning
(``engine.allow_spinning``), THREADS = ``engine.intra_op_threads`` (0: ONNX Runtime's default, one
per core), ``cvN`` = ``cv2.setNumThreads(N)`` in the process (OpenCV's pool; default: untouched).
``global/THREADS`` is ONNX Runtime's process-wide pool shared by every session (not a product
setting: see edge/engines/onnxruntime.py ``thread_pool_entries``).

Why one process per setting: a pool spins after its own runs, so settings sharing a process
would slow each other. Each setting runs in a fresh child process; the settings run in turn,
then again in reverse order, ``--repeats`` times, and the median over repeats is reported, so a
change in the machine's load hits every setting alike. Not a test: record results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = ROOT / "tests" / "data" / "real-frames" / "reconyx-heron-night-burst"
DEFAULT_SETTINGS = ["on/0", "on/1", "on/2", "off/0", "off/1", "off/2", "off/0/cv1", "off/1/cv1", "global/0"]
REFERENCE = "on/0"  # ONNX Runtime's own defaults: spinning pools, one thread per core
WORKLOADS = ("single 160", "single 640", "cascade", "cascade + reader")


@dataclass(frozen=True)
class Setting:
    spin: bool
    threads: int
    cv_threads: int | None = None
    global_pool: bool = False

    @classmethod
    def parse(cls, spec: str) -> Setting:
        parts = spec.split("/")
        if len(parts) not in (2, 3) or parts[0] not in ("on", "off", "global") or not parts[1].isdigit() or (
                len(parts) == 3 and not (parts[2].startswith("cv") and parts[2][2:].isdigit())):
            raise argparse.ArgumentTypeError(f"setting {spec!r}: expected SPIN/THREADS[/cvN], SPIN on, off or "
                                             "global, e.g. off/1 or off/1/cv1")
        return cls(spin=parts[0] != "off", threads=int(parts[1]),
                   cv_threads=int(parts[2][2:]) if len(parts) == 3 else None, global_pool=parts[0] == "global")


def _use_global_pool(threads: int) -> None:
    """ONNX Runtime's process-wide pools for every session of this child (a benchmark-only setting:
    the pools must be sized before the first session, and then no session may have its own)."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads, 0)
    base = ort.SessionOptions

    class GlobalPoolOptions(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.use_per_session_threads = False

    ort.SessionOptions = GlobalPoolOptions  # type: ignore[misc]


def child(args: argparse.Namespace) -> dict:
    """Run every workload under one setting; the numbers as a dict (printed as JSON)."""
    import cv2

    s = Setting.parse(args.child)
    if s.cv_threads is not None:
        cv2.setNumThreads(s.cv_threads)
    if s.global_pool:
        _use_global_pool(s.threads)
    from edge.bundle import load_bundle
    from edge.engines import load_engines
    from edge.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
    from edge.imageio import read_image
    from edge.manifest import ModelEntry
    from edge.runner import CascadeRunner, ModelRunner
    from edge.vision import letterbox_batch

    cfg = OnnxRuntimeConfig(providers=["cpu"], intra_op_threads=s.threads, allow_spinning=s.spin)
    b = load_bundle(args.bundle)
    policy = b.manifest.cascade.model_copy(update={"gate_threshold": None, "background_stop": None})
    runner = CascadeRunner(b.manifest, load_engines(b, cfg), policy)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    paths = (paths * (args.frames // max(1, len(paths)) + 1))[:args.frames]  # a small folder is cycled
    imgs = [read_image(p, max_side=runner.input_side).bgr for p in paths]
    batches = [runner.prepare(imgs[k:k + args.batch]) for k in range(0, len(imgs), args.batch)]
    out: dict[str, float] = {}

    def per_call(r: ModelRunner, inputs: list, rounds: int) -> float:
        times = []
        for _ in range(rounds):
            for x, lbs in inputs:
                t = time.perf_counter()
                r.detect_inputs(x, lbs)
                times.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(times)

    g = runner.global_runner
    singles = [runner.prepare([im]).inputs[g.entry.imgsz] for im in imgs[:40]]
    per_call(g, singles[:2], 1)
    out["single 160"] = per_call(g, singles, args.rounds)
    real_paths = sorted(REAL.glob("*.JPG"))
    if args.model640:
        entry = ModelEntry.model_validate_json(args.model640.with_suffix(".json").read_text())
        r640 = ModelRunner(entry, OnnxRuntimeEngine(args.model640, entry, cfg))
        frames = [read_image(p, max_side=max(entry.input_hw)).bgr for p in real_paths[:5]]
        inputs = [letterbox_batch([im], entry.imgsz) for im in frames]
        out["single 640"] = per_call(r640, inputs, max(1, args.rounds // 2))
        r640.engine.close()

    def cascade_ms() -> float:
        best = float("inf")
        for _ in range(args.rounds):
            t = time.perf_counter()
            for prep in batches:
                runner.classify_prepared(prep)
            best = min(best, (time.perf_counter() - t) * 1000.0 / len(imgs))
        return best

    out["cascade"] = cascade_ms()
    stop, read = threading.Event(), [0]

    def reader() -> None:  # the daemon's reader: decode reduced, then letterbox for every input size
        while not stop.is_set():
            im = read_image(real_paths[read[0] % len(real_paths)], max_side=runner.input_side).bgr
            runner.prepare([im])
            read[0] += 1

    th = threading.Thread(target=reader, daemon=True)
    t0 = time.perf_counter()
    th.start()
    out["cascade + reader"] = cascade_ms()
    stop.set()
    th.join()
    out["reader frames/s"] = read[0] / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "edge" / "demo" / "bundle")
    ap.add_argument("--images", type=Path, default=ROOT / "edge" / "demo" / "frames",
                    help="folder of frames for the cascade (e.g. the demo build's test split; default: the "
                    "demo's own frames)")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per workload in each child (fastest / median)")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the settings, alternating the order")
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, type=str,
                    help="SPIN/THREADS[/cvN]: " + " ".join(DEFAULT_SETTINGS))
    ap.add_argument("--model640", type=Path, help="a 640 px YOLO .onnx with its ModelEntry as FILE.json beside it "
                    "(default: a random YOLOv8n exported here when ultralytics is installed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    for spec in args.settings:
        Setting.parse(spec)  # refuse a bad setting before anything runs
    with tempfile.TemporaryDirectory() as tmp:
        if args.model640 is None:
            try:
                from benchmarks.random_yolo import export_random_yolov8n
                y = export_random_yolov8n(Path(tmp), 640)
                y.onnx.with_suffix(".json").write_text(y.entry.model_dump_json())
                args.model640 = y.onnx
            except ImportError:
                print("(no ultralytics here: the single 640 column is left out; give --model640)")
        results: dict[str, list[dict]] = {s: [] for s in args.settings}
        load0 = os.getloadavg()
        t0 = time.time()
        for rep in range(args.repeats):
            for spec in args.settings if rep % 2 == 0 else args.settings[::-1]:
                cmd = [sys.executable, __file__, "--child", spec, "--bundle", str(args.bundle), "--images",
                       str(args.images), "--frames", str(args.frames), "--batch", str(args.batch), "--rounds",
                       str(args.rounds)] + (["--model640", str(args.model640)] if args.model640 else [])
                run = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
                if run.returncode or not line:
                    print(run.stdout + run.stderr, file=sys.stderr)
                    raise SystemExit(f"setting {spec}: the child failed")
                results[spec].append(json.loads(line[0][7:]))
        load1 = os.getloadavg()
    cols = [w for w in (*WORKLOADS, "reader frames/s") if all(w in r for rs in results.values() for r in rs)]
    med = {s: {c: statistics.median(r[c] for r in rs) for c in cols} for s, rs in results.items()}
    ref = med.get(REFERENCE) or med[args.settings[0]]
    print(f"{os.cpu_count()} cores; load average {load0[0]:.1f} before, {load1[0]:.1f} after "
          f"({time.time() - t0:.0f} s); "
          f"each setting in its own process, {args.repeats} passes in alternating order, median of the passes; "
          f"cascade: {args.frames} frames of {args.images.name}, batch {args.batch}, every expert on background")
    print("| setting (spin/threads[/OpenCV threads]) | " + " | ".join(
        (c if "frames/s" in c else f"{c} ({'ms/frame' if c.startswith('cascade') else 'ms'})") for c in cols)
        + " |")
    print("|---|" + "---:|" * len(cols))
    for s, m in med.items():
        cells = [f"{m[c]:.1f}" if "frames/s" in c else f"{m[c]:.2f} ({m[c] / ref[c]:.2f}x)" for c in cols]
        print(f"| {s}{' (ONNX Runtime default)' if s == REFERENCE else ''} | " + " | ".join(cells) + " |")
    print(f"(x: vs {REFERENCE}; spread: each pass's cascade + reader ms/frame: "
          + "; ".join(f"{s} " + "/".join(f"{r['cascade + reader']:.1f}" for r in rs) for s, rs in results.items())
          + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
