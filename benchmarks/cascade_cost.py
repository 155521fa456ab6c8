"""What the cascade costs per image on this machine, measured side by side in one run.

Runs the shipped demo bundle (or --bundle) through the device code on ONNX Runtime (CPU) over
synthetic frames (half empty), and prints ratios against the single-stage global model:

- single stage: the global model alone (letterbox + inference + decode);
- cascade, letterboxing per model (each model resizes the frame itself);
- cascade, letterboxing once per input size (``CascadeRunner.prepare``, what the daemon's
  reader thread does ahead of inference);
- the cost split by route: empty frames run every expert (1 + K models), animals 1 + 1.

Not a test: timings depend on the machine. Record results in BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.bundle import load_bundle  # noqa: E402
from edge.engines import load_engines  # noqa: E402
from edge.runner import CascadeRunner  # noqa: E402


def frames(n: int, seed: int) -> list:
    from export.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        coco = synthesize(Path(tmp) / "s", seed=seed, n_images=n)
        return [cv2.imread(str(p)) for p in sorted((coco.parent / "images").rglob("*.JPG"))][:n]


def per_model_cascade(runner: CascadeRunner, imgs: list) -> None:
    """The cascade with each model letterboxing for itself (the path before prepare())."""
    from edge.cascade import decide, plan

    g = runner.global_runner.detect(imgs)
    routes = [plan(gd, runner.group_of, list(runner.experts), runner.policy) for gd in g]
    dets: list[dict] = [{} for _ in imgs]
    for grp, expert in runner.experts.items():  # each expert batched over its frames, as classify() does
        idx = [i for i, r in enumerate(routes) if grp in r.groups]
        for i, d in zip(idx, expert.detect([imgs[i] for i in idx]) if idx else [], strict=True):
            dets[i][grp] = d
    for gd, route, d in zip(g, routes, dets, strict=True):
        decide(gd, d, route, runner.policy)


def timed(fn, reps: int) -> float:
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return statistics.median(best)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "edge" / "demo" / "bundle"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="frames per call (a burst)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    bundle = load_bundle(a.bundle)
    runner = CascadeRunner(bundle.manifest, load_engines(bundle, "onnxruntime"))
    imgs = frames(a.images, a.seed)
    chunks = [imgs[i:i + a.batch] for i in range(0, len(imgs), a.batch)]
    runner.classify(chunks[0])  # warm-up
    n = len(imgs)
    single = timed(lambda: [runner.global_runner.detect(c) for c in chunks], a.reps) / n
    per_model = timed(lambda: [per_model_cascade(runner, c) for c in chunks], a.reps) / n
    shared = timed(lambda: [runner.classify(c) for c in chunks], a.reps) / n
    prep = timed(lambda: [runner.prepare(c) for c in chunks], a.reps) / n
    results = [r for c in chunks for r in runner.classify(c)]
    runs = [len(r.decision.models_run) for r in results]
    empty_runs = [k for k, r in zip(runs, results, strict=True) if r.decision.route.reason == "background"]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}; bundle "
          f"{bundle.version}, {len(bundle.manifest.models)} models at {bundle.manifest.global_model.imgsz} px; "
          f"{n} frames of {imgs[0].shape[1]}x{imgs[0].shape[0]}, batches of {a.batch}")
    print(f"single stage (global only)          {single * 1000:7.2f} ms/frame   1.00x")
    print(f"cascade, letterbox per model        {per_model * 1000:7.2f} ms/frame   {per_model / single:.2f}x")
    print(f"cascade, letterbox once per size    {shared * 1000:7.2f} ms/frame   {shared / single:.2f}x")
    print(f"  of which letterboxing (prepare)   {prep * 1000:7.2f} ms/frame   (moves to the reader thread "
          f"in the daemon: {(shared - prep) / single:.2f}x on the inference thread)")
    print(f"model runs per frame: {statistics.mean(runs):.2f} (background route {len(empty_runs)} frames at "
          f"{statistics.mean(empty_runs) if empty_runs else 0:.2f}, routed {n - len(empty_runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
