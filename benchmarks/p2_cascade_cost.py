"""P2: what the cascade costs against one model, and what the gate and the staged background pass save.

On the shipped demo bundle and its own held-out test locations (synthetic scenes regenerated
from the build's seed: ``export.synth`` seed 0, 1600 images, ``prepare`` with L6, L7 held out,
as scripts/build_demo_bundle.py made them), a mix with 55% empty frames (every empty test
frame, animal frames drawn to match) is run, batch by batch, through:

- single: the global model alone (what one detector costs);
- cascade: every expert on background frames (the paper's rule, the recall reference);
- + gate: ``gate_threshold`` chosen by ``export.calibrate.choose_gate`` on the *validation* split
  (within 0.5 points of animal recall), then applied to the test mix;
- + stop: ``background_stop`` = the expert floor (experts one at a time, likeliest first);
- + gate + stop;
- the shared-backbone version of the bundle (``export.backbone.share_backbone``: layers 0-9 run
  once per batch, then only the routed heads), with every expert and with gate + stop.

Every policy sees the same prepared batches, interleaved batch by batch, so machine load hits
them alike, and the fastest of the rounds is reported per policy (the least disturbed one);
printed: ms per frame and its ratio to single, model runs per frame, animal recall
(labelled animal frames answered with an animal) and its change against the cascade, and how
often the species answer changed. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.bundle import load_bundle  # noqa: E402
from edge.engines import load_engines  # noqa: E402
from edge.imageio import read_image  # noqa: E402
from edge.runner import CascadeRunner  # noqa: E402
from export.calibrate import choose_gate, run_outcomes  # noqa: E402
from export.evaluate import split_images  # noqa: E402
from export.metrics import BACKGROUND  # noqa: E402

DEMO = ROOT / "edge" / "demo" / "bundle"


def demo_data(work: Path) -> Path:
    """The demo build's dataset (same generator, seed and split), made once into ``work``."""
    from export.datasets import prepare
    from export.synth import synthesize

    data = work / "data" / "data.yaml"
    if not data.is_file():
        synthesize(work / "synth", seed=0, n_images=1600, size=(320, 240), n_locations=8, overwrite=True)
        prepare(work / "data", coco=work / "synth" / "coco.json", test_locations=["L6", "L7"], seed=0,
                link="hardlink", overwrite=True)
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEMO)
    ap.add_argument("--data", type=Path, help="data.yaml (default: regenerate the demo build's, ~1 min)")
    ap.add_argument("--empty", type=float, default=0.55, help="share of empty frames in the mix")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="rounds; the least disturbed (fastest) one is reported")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per session (0: default)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="p2-"))
    data = args.data or demo_data(work)
    bundle = load_bundle(args.bundle)
    man = bundle.manifest
    engines = load_engines(bundle, "onnxruntime", providers=["cpu"], intra_op_threads=args.threads)

    # the gate, calibrated on validation frames as `camtrap-export calibrate` does
    v_imgs, v_truths, _, _ = split_images(data, "val")
    gate, _, _ = choose_gate(run_outcomes(bundle, v_imgs, v_truths, BACKGROUND), ceiling=man.cascade.route_threshold)

    imgs, truths, _, _ = split_images(data, "test")
    empties = [i for i, t in enumerate(truths) if t == BACKGROUND]
    animals = [i for i, t in enumerate(truths) if t != BACKGROUND]
    n_animals = min(len(animals), round(len(empties) * (1 - args.empty) / args.empty))
    pick = sorted(empties + random.Random(0).sample(animals, n_animals))
    base = man.cascade.model_copy(update={"gate_threshold": None, "background_stop": None})
    stop = man.cascade.expert_floor
    policies = {
        "cascade (every expert on background)": base,
        f"+ gate {gate}": base.model_copy(update={"gate_threshold": gate}),
        f"+ stop {stop}": base.model_copy(update={"background_stop": stop}),
        "+ gate + stop": base.model_copy(update={"gate_threshold": gate, "background_stop": stop}),
    }
    runners = {k: CascadeRunner(man, engines, p) for k, p in policies.items()}
    # the same bundle with its frozen layers stored and run once (camtrap-export share-backbone)
    from export.backbone import share_backbone

    share_backbone(args.bundle, work / "shared")
    shared = load_bundle(work / "shared")
    s_engines = load_engines(shared, "onnxruntime", providers=["cpu"], intra_op_threads=args.threads)
    for k in ("cascade (every expert on background)", "+ gate + stop"):
        runners[f"shared backbone: {k}"] = CascadeRunner(shared.manifest, s_engines, policies[k])
    first = next(iter(runners.values()))
    arrays = [read_image(imgs[i], max_side=first.input_side).bgr for i in pick]
    labels = [truths[i] for i in pick]
    batches = [first.prepare(arrays[k:k + args.batch]) for k in range(0, len(arrays), args.batch)]

    ms: dict[str, list[float]] = {"single": [], **{k: [] for k in runners}}
    answers: dict[str, list] = {}
    g = first.global_runner
    for _ in range(args.rounds):
        per = {k: 0.0 for k in ms}
        outs: dict[str, list] = {k: [] for k in runners}
        for prep in batches:  # policies interleaved batch by batch
            t = time.perf_counter()
            g.detect_inputs(*prep.inputs[g.entry.imgsz])
            per["single"] += time.perf_counter() - t
            for k, runner in runners.items():
                t = time.perf_counter()
                outs[k] += runner.classify_prepared(prep)
                per[k] += time.perf_counter() - t
        for k in ms:
            ms[k].append(per[k] * 1000.0 / len(arrays))
        answers = outs

    ref = answers[next(iter(runners))]
    n_anim = sum(t != BACKGROUND for t in labels)

    def recall(res) -> float:
        return sum(1 for c, t in zip(res, labels, strict=True) if t != BACKGROUND and not c.decision.empty) / n_anim

    single_ms = min(ms["single"])
    print(f"bundle {man.bundle_version} ({len(runners[next(iter(runners))].experts)} experts), "
          f"{len(arrays)} test frames ({len(arrays) - n_anim} empty, {100 * (1 - n_anim / len(arrays)):.0f}%), "
          f"batch {args.batch}, fastest of {args.rounds} rounds per policy; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; gate {gate} calibrated on {len(v_imgs)} validation frames")
    print("| policy | ms/frame | vs single [<= 1.35x] | model runs/frame | animal recall | vs cascade [within 0.5 pp] "
          "| species answers changed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| single (global model only) | {single_ms:.2f} | 1.00x | 1.00 | | | |")
    for k, res in answers.items():
        m = min(ms[k])
        runs = statistics.mean(len(c.decision.models_run) for c in res)
        changed = sum(a.decision.top[0] != b.decision.top[0] for a, b in zip(res, ref, strict=True))
        print(f"| {k} | {m:.2f} | {m / single_ms:.2f}x | {runs:.2f} | {recall(res):.4f} | "
              f"{100 * (recall(res) - recall(ref)):+.2f} pp | {changed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
