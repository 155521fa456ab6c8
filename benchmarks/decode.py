"""Reading a real camera-trap frame for the model: full decode vs reduced JPEG decode, side by side.

The frames are the Reconyx night burst shipped in tests/data/real-frames (2048x1440, CC BY 4.0,
see its README) or ``--frames DIR``. For each model input size it times, interleaved in one run:

- before: ``read_image`` decoding the whole frame (``max_side=4096``, what the daemon did), then
  the letterbox to the input size;
- after: ``read_image(max_side=size)``: libjpeg's DCT scaling at the largest 1/2, 1/4, 1/8 that
  still covers the input, resized to the input side, then the (now resize-free) letterbox.

and prints milliseconds per frame and the ratio, plus how far the model input moved (mean absolute
difference of the letterboxed uint8 pixels, 0-255). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.imageio import read_image  # noqa: E402
from edge.vision import letterbox_uint8  # noqa: E402

REAL = ROOT / "tests" / "data" / "real-frames" / "reconyx-heron-night-burst"
FULL_SIDE = 4096  # the daemon's max_side before reduced decoding


def prepare(path: Path, size: int, max_side: int) -> np.ndarray:
    return letterbox_uint8(read_image(path, max_side=max_side).bgr, size)[0]


def per_frame_ms(paths: list[Path], size: int, max_side: int) -> float:
    t = time.perf_counter()
    for p in paths:
        prepare(p, size, max_side)
    return (time.perf_counter() - t) * 1000.0 / len(paths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=Path, default=REAL, help="folder of JPEGs (default: the shipped Reconyx burst)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 320, 640, 1280])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    args = ap.parse_args(argv)
    paths = sorted(p for p in args.frames.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    first = read_image(paths[0])
    print(f"{len(paths)} frames of {first.orig_size[0]}x{first.orig_size[1]} from {args.frames}; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"median of {args.rounds} interleaved rounds")
    print("| input px | decoded at | before: full decode + letterbox (ms) | after: reduced decode (ms) "
          "| after/before | input change (mean abs, 0-255) |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in args.sizes:
        before, after = [], []
        for _ in range(args.rounds):  # interleaved, so machine load hits both alike
            before.append(per_frame_ms(paths, size, FULL_SIDE))
            after.append(per_frame_ms(paths, size, size))
        diff = statistics.mean(
            float(np.abs(prepare(p, size, FULL_SIDE).astype(np.int16) - prepare(p, size, size)).mean())
            for p in paths)
        im = read_image(paths[0], max_side=size)
        b, a = statistics.median(before), statistics.median(after)
        print(f"| {size} | {im.bgr.shape[1]}x{im.bgr.shape[0]} | {b:.2f} | {a:.2f} | {a / b:.2f}x | {diff:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
