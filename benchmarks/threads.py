"""ONNX Runtime thread pools for a bundle's sessions: which setting, measured side by side.

Each model of a bundle is its own InferenceSession with its own intra-op thread pool; the
cascade runs them one after the other, so on a small CPU the idle pools' spinning threads can
compete with the working one. This runs the demo bundle's cascade (every expert on background
frames, the heaviest policy) over the demo build's test frames with every session set alike:

- ``intra_op_threads`` 0 (ONNX Runtime's default: one thread per core), 1, 2, ...;
- the same with spinning off (``session.intra_op.allow_spinning = 0``) where given.

Engines are built for each setting and then run interleaved batch by batch; the fastest round
per setting is reported (the least disturbed). Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.bundle import load_bundle  # noqa: E402
from edge.engines import load_engines  # noqa: E402
from edge.imageio import read_image  # noqa: E402
from edge.runner import CascadeRunner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "edge" / "demo" / "bundle")
    ap.add_argument("--images", type=Path, required=True, help="folder of frames (e.g. the demo build's test split)")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    b = load_bundle(args.bundle)
    policy = b.manifest.cascade.model_copy(update={"gate_threshold": None, "background_stop": None})
    runners = {}
    for n in args.threads:
        engines = load_engines(b, "onnxruntime", providers=["cpu"], intra_op_threads=n)
        runners[f"intra_op_threads {n}{' (default: one per core)' if n == 0 else ''}"] = \
            CascadeRunner(b.manifest, engines, policy)
    first = next(iter(runners.values()))
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:args.frames]
    imgs = [read_image(p, max_side=first.input_side).bgr for p in paths]
    batches = [first.prepare(imgs[k:k + args.batch]) for k in range(0, len(imgs), args.batch)]
    best = {k: float("inf") for k in runners}
    for _ in range(args.rounds):
        spent = dict.fromkeys(runners, 0.0)
        for prep in batches:
            for k, r in runners.items():
                t = time.perf_counter()
                r.classify_prepared(prep)
                spent[k] += time.perf_counter() - t
        for k in runners:
            best[k] = min(best[k], spent[k] * 1000.0 / len(imgs))
    ref = best[next(iter(runners))]
    print(f"{len(imgs)} frames, batch {args.batch}, {os.cpu_count()} cores, fastest of {args.rounds} rounds; "
          f"cascade with every expert on background frames, {len(b.manifest.models)} sessions")
    print("| sessions' thread setting | ms/frame | vs default |")
    print("|---|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} | {v / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
