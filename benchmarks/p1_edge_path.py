"""P1: what the device code adds around one model, and how it compares with ultralytics predict.

Per image, batch of one, side by side in one run (call by call, medians):

- bare: ``session.run`` of the model's own ONNX Runtime session on an input letterboxed beforehand;
- edge: ``ModelRunner.detect`` (letterbox + the engine + decode and NMS at the decode floor), the
  daemon's per-model path;
- ultralytics (640 px): ``YOLO(pt).predict`` of the same weights the ONNX graph was exported from.

Graphs: at 160 px the shipped demo bundle's global model on the demo frames (a trained model, so
decode and NMS have real candidates); at 160 and 640 px a YOLOv8n built from ultralytics' own
yolov8n.yaml (random weights, nothing downloaded) exported by ``export.onnx.export_onnx``, on the
real Reconyx frames; and the same exported at 480x640 (h x w), the frames' own aspect, which is
the rectangle ultralytics' predict letterboxes a 2048x1440 frame into at imgsz 640 (equal pixels
on both sides, so this row is the like-for-like comparison with ultralytics). Needs the
workstation venv (torch, ultralytics). Not a test: record results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine  # noqa: E402
from edge.imageio import read_image  # noqa: E402
from edge.manifest import input_hw  # noqa: E402
from edge.runner import ModelRunner  # noqa: E402
from edge.vision import decode, letterbox_batch  # noqa: E402

DEMO = ROOT / "edge" / "demo"
REAL = ROOT / "tests" / "data" / "real-frames" / "reconyx-heron-night-burst"


def bare_run(engine):
    """``session.run`` of the graph(s) the engine runs, nothing around them: the model's session, or
    for a head over a shared backbone (the demo bundle ships one) the backbone's then the head's."""
    backbone = getattr(engine, "backbone", None)
    if backbone is None:
        session, inp = engine._session, engine.input_name
        return lambda x: session.run(None, {inp: x})[0]
    head, bb = engine._session, backbone._session
    names, bb_inp = backbone.entry.outputs, backbone.input_name
    wanted = engine.entry.head_inputs

    def run(x: np.ndarray) -> np.ndarray:
        feats = dict(zip(names, bb.run(names, {bb_inp: x}), strict=True))
        return head.run(None, {k: feats[k] for k in wanted})[0]

    return run


def compare(runner: ModelRunner, images: list[np.ndarray], rounds: int, extra=None,
            originals: list[np.ndarray] | None = None) -> dict:
    """Per image, the paths run back to back (bare, edge, extra), ``rounds`` times over the
    images; the median of the per-call times of each path, in ms. Alternating call by call
    keeps load from other processes hitting every path alike."""
    bare = bare_run(runner.engine)
    inputs = [letterbox_batch([im], runner.entry.imgsz)[0] for im in images]
    raws = [bare(x) for x in inputs]
    lbs = [letterbox_batch([im], runner.entry.imgsz)[1][0] for im in images]
    e = runner.entry
    paths = {"bare": lambda i: bare(inputs[i]), "edge": lambda i: runner.detect([images[i]]),
             "letterbox": lambda i: letterbox_batch([images[i]], e.imgsz),
             "decode": lambda i: decode(raws[i][0], e.layout, e.classes, lbs[i], conf=runner.conf,
                                        iou=e.iou_threshold)}
    if extra:
        paths[extra[0]] = lambda i: extra[1]((originals or images)[i])
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():
        fn(0)  # warm up
    for _ in range(rounds):
        for i in range(len(images)):
            for k, fn in paths.items():
                t = time.perf_counter()
                fn(i)
                times[k].append((time.perf_counter() - t) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def allocations(runner: ModelRunner, images: list[np.ndarray], sizes: tuple[int, ...] = (1, 8),
                loops: int = 10) -> list[tuple[int, str, float, float]]:
    """tracemalloc over a loop of batches (not a timing): per stage and batch size, the memory each
    call allocates at its peak beyond what was live before (every numpy buffer counts; ONNX
    Runtime's own arena does not), per image, and what is still held after the loop (a leak)."""
    import tracemalloc

    rows = []
    e = runner.entry
    for n in sizes:
        batch = (images * n)[:n]
        x, lbs = letterbox_batch(batch, e.imgsz)
        raw = runner.engine.infer(x)
        stages = {"letterbox": lambda b=batch: letterbox_batch(b, e.imgsz),
                  "engine": lambda x=x: runner.engine.infer(x),
                  "decode": lambda raw=raw, lbs=lbs: [decode(raw[i], e.layout, e.classes, lb, conf=runner.conf,
                                                             iou=e.iou_threshold) for i, lb in enumerate(lbs)]}
        for name, fn in stages.items():
            fn()
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for _ in range(loops):
                fn()
            cur, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rows.append((n, name, (peak - base) / n, (cur - base) / loops))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--allow-spinning", action="store_true",
                    help="spinning thread pools (ONNX Runtime's own default; the engine's default is off)")
    args = ap.parse_args(argv)
    import onnxruntime
    import torch
    import ultralytics
    from ultralytics import YOLO

    from benchmarks.random_yolo import export_random_yolov8n
    from edge.bundle import load_bundle
    from edge.engines import load_engines

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = OnnxRuntimeConfig(providers=["cpu"], intra_op_threads=args.threads, allow_spinning=args.allow_spinning)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime "
          f"{onnxruntime.__version__}, ultralytics {ultralytics.__version__}, torch {torch.__version__}; "
          f"median per call over {args.rounds} rounds, the paths alternating call by call, batch 1; engine "
          f"intra_op_threads {cfg.intra_op_threads}, allow_spinning {cfg.allow_spinning}; load average "
          f"{os.getloadavg()[0]:.1f}")
    rows = []

    bundle = load_bundle(DEMO / "bundle")
    g = bundle.manifest.global_model
    demo_runner = ModelRunner(g, load_engines(bundle, cfg)[g.name])  # a head over the shared backbone
    demo_frames = [cv2.imread(str(p)) for p in sorted((DEMO / "frames").glob("*.JPG"))]
    r = compare(demo_runner, demo_frames, args.rounds)
    rows.append(("demo global (trained; backbone + head), 160 px, demo frames", r))

    real_paths = sorted(REAL.glob("*.JPG"))
    real = [cv2.imread(str(p)) for p in real_paths]
    with tempfile.TemporaryDirectory() as tmp:
        for size in (160, 640, (480, 640)):
            y = export_random_yolov8n(Path(tmp), size)  # ultralytics' yolov8n.yaml, random weights: no download
            entry = y.entry
            runner = ModelRunner(entry, OnnxRuntimeEngine(y.onnx, entry, cfg))
            yolo = YOLO(str(y.pt))
            side = max(input_hw(size))  # ultralytics at 640 letterboxes these frames to 480x640 itself
            extra = ("ultralytics", lambda im, s=side, y=yolo: y.predict(im, imgsz=s, conf=0.05, iou=0.45,
                                                                         device="cpu", verbose=False))
            frames = [read_image(p, max_side=side).bgr for p in real_paths]
            label = f"{size} px" if isinstance(size, int) else f"{size[0]}x{size[1]} (h x w, the frames' aspect)"
            rows.append((f"yolov8n (random weights), {label}, real 2048x1440 frames",
                         compare(runner, frames, args.rounds, extra, originals=real)))
            if size == 640:
                allocs = allocations(runner, frames)

    print("| graph | bare session.run (ms) | edge path (ms) | edge / bare [<= 1.05x] | letterbox + decode "
          "(ms) | (bare + those) / bare | ultralytics predict (ms) | ultralytics / edge [>= 2x] |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        u, e, b = r.get("ultralytics"), r["edge"], r["bare"]
        parts = r["letterbox"] + r["decode"]
        ucol = "| |" if u is None else f"| {u:.2f} | {u / e:.2f}x |"
        print(f"| {label} | {b:.2f} | {e:.2f} | {e / b:.2f}x | {r['letterbox']:.2f} + {r['decode']:.2f} "
              f"| {(b + parts) / b:.3f}x {ucol}")
    print("Edge path: letterbox + engine + decode/NMS on the frame as the daemon's reader hands it "
          "(real frames read reduced to the input size, benchmarks/decode.py times that read); "
          "ultralytics predict gets the full decoded 2048x1440 frame and letterboxes it itself.")
    print("\nAllocations in the hot path (tracemalloc, yolov8n 640 px, real frames; not timed): what one call "
          "allocates at its peak beyond what was live before, per image, and what stays allocated per call")
    print("| batch | stage | peak per image (KB) | held after the call (KB) |")
    print("|---:|---|---:|---:|")
    for n, name, per_image, held in allocs:
        print(f"| {n} | {name} | {per_image / 1024:.0f} | {held / 1024:.1f} |")
    print("The letterbox's inherent buffers are the uint8 canvas and the float32 input: "
          f"{640 * 640 * 15 / 1024:.0f} KB per image at 640 px.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
