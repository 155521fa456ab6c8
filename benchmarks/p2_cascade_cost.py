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
- + cap N: ``background_max_experts`` = N < K (the N likeliest experts on background frames);
- + route reuse: ``route_reuse`` on, each frame's event its sequence (the synthetic bursts: the mix
  runs in sequence order for every policy), so later frames of a confident burst skip the global model;
- + gate (calibrated): the bundle's own ``gate_threshold`` (``--gate`` to try another), chosen by
  ``camtrap-export calibrate`` on thousands of frames of another seed, alone and with route reuse;
- the bundle's own settings, as shipped;
- the shared-backbone version of the bundle (layers 0-9 run once per batch, then only the routed
  heads), with every expert, with gate + stop and with the calibrated gate + route reuse. The
  other rows run the whole models: the demo bundle ships shared, so they are made with
  ``export.backbone.join_backbone`` (a bundle of whole models is split with ``share_backbone``).

Two tables: a backlog (``--batch`` frames per call, every policy) and a live trap (one frame
per call, as the daemon sees a burst whose frames come a second apart: route reuse learns an
event's route from earlier batches only, so it pays off here), with the cascade, the calibrated
rows and the bundle's own settings. Every policy sees the same prepared batches, interleaved
batch by batch, so machine load hits them alike, and the fastest of the rounds is reported per
policy (the least disturbed one); printed: ms per frame and its ratio to single, model runs per
frame, animal recall
(labelled animal frames answered with an animal) and its change against the cascade, how
often the species answer changed, and how many frames reused their burst's route. Not a test.
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
from edge.cascade import RouteMemory  # noqa: E402
from edge.engines import load_engines  # noqa: E402
from edge.imageio import read_image  # noqa: E402
from edge.runner import CascadeRunner  # noqa: E402
from export.calibrate import choose_gate, run_outcomes  # noqa: E402
from export.evaluate import split_images  # noqa: E402
from export.evidence import sequence_of  # noqa: E402
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
    ap.add_argument("--gate", type=float, help="the calibrated gate of the 'calibrated' rows (default: the bundle's "
                    "cascade.gate_threshold, from `camtrap-export calibrate` on enough frames)")
    ap.add_argument("--reuse", type=float, default=0.4, help="route_reuse of the burst rows (default 0.4: on the "
                    "demo's test split 0.3 carried look-alike answers into bursts, 0.4 changed none, 0.6 reused "
                    "almost nothing; BENCHMARKS.md)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="p2-"))
    data = args.data or demo_data(work)
    # the bundle's whole models and its shared-backbone form, side by side, whichever it ships as
    from export.backbone import join_backbone, share_backbone

    given = load_bundle(args.bundle)
    if given.manifest.backbone is not None:
        join_backbone(args.bundle, work / "whole")
        bundle, shared = load_bundle(work / "whole"), given
    else:
        share_backbone(args.bundle, work / "shared")
        bundle, shared = given, load_bundle(work / "shared")
    man = bundle.manifest
    engines = load_engines(bundle, "onnxruntime", providers=["cpu"], intra_op_threads=args.threads)

    # the gate, calibrated on validation frames as `camtrap-export calibrate` does
    v_imgs, v_truths, _, _ = split_images(data, "val")
    gate, _, _ = choose_gate(run_outcomes(bundle, v_imgs, v_truths, BACKGROUND), ceiling=man.cascade.route_threshold)
    calibrated = args.gate if args.gate is not None else man.cascade.gate_threshold

    imgs, truths, _, meta = split_images(data, "test")
    empties = [i for i, t in enumerate(truths) if t == BACKGROUND]
    animals = [i for i, t in enumerate(truths) if t != BACKGROUND]
    n_animals = min(len(animals), round(len(empties) * (1 - args.empty) / args.empty))
    # frames in sequence order (bursts together, as a trap writes them), for every policy alike
    pick = sorted(empties + random.Random(0).sample(animals, n_animals),
                  key=lambda i: (sequence_of(meta, imgs[i], "test"), i))
    events = [sequence_of(meta, imgs[i], "test") for i in pick]
    off = {"gate_threshold": None, "background_stop": None, "background_max_experts": None, "route_reuse": None}
    base = man.cascade.model_copy(update=off)
    stop = man.cascade.expert_floor
    k = len(man.experts)
    reuse = {"route_reuse": args.reuse}
    policies: dict[str, tuple] = {  # name -> (policy, runs with the frames' events)
        "cascade (every expert on background)": (base, False),
        f"+ gate {gate:.4f} (val, {len(v_imgs)} frames)": (base.model_copy(update={"gate_threshold": gate}), False),
        f"+ stop {stop}": (base.model_copy(update={"background_stop": stop}), False),
        "+ gate (val) + stop": (base.model_copy(update={"gate_threshold": gate, "background_stop": stop}), False),
        **{f"+ cap {n} of {k} experts": (base.model_copy(update={"background_max_experts": n}), False)
           for n in range(1, k)},
        f"+ route reuse {args.reuse} (bursts)": (base.model_copy(update=reuse), True),
    }
    if calibrated is not None:
        cal = base.model_copy(update={"gate_threshold": calibrated})
        policies[f"+ gate {calibrated:.4f} (calibrated)"] = (cal, False)
        policies["+ gate (calibrated) + route reuse"] = (cal.model_copy(update=reuse), True)
    deployed = man.cascade  # what the bundle ships: its calibrated settings
    policies["bundle's own settings"] = (deployed, deployed.route_reuse is not None)
    runners = {name: (CascadeRunner(man, engines, p), ev) for name, (p, ev) in policies.items()}
    # the same bundle with its frozen layers stored and run once
    s_engines = load_engines(shared, "onnxruntime", providers=["cpu"], intra_op_threads=args.threads)
    best = ["cascade (every expert on background)", "+ gate (val) + stop",
            *(["+ gate (calibrated) + route reuse"] if calibrated is not None else [])]
    for name in best:
        p, ev = policies[name]
        runners[f"shared backbone: {name}"] = (CascadeRunner(shared.manifest, s_engines, p), ev)
    first = next(iter(runners.values()))[0]
    arrays = [read_image(imgs[i], max_side=first.input_side).bgr for i in pick]
    labels = [truths[i] for i in pick]
    n_anim = sum(t != BACKGROUND for t in labels)
    print(f"bundle {man.bundle_version} ({k} experts; whole models, the shared backbone where a row says so), "
          f"{len(arrays)} test frames ({len(arrays) - n_anim} empty, {100 * (1 - n_anim / len(arrays)):.0f}%) "
          f"in {len(set(events))} sequences (in sequence order), fastest of {args.rounds} rounds per policy; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"bundle settings {deployed.model_dump(exclude_defaults=True)}")
    print(f"\nA backlog (batch {args.batch}):\n")
    table(runners, first, arrays, labels, events, args.batch, args.rounds)
    # a live trap: a burst's frames come a second apart, so the daemon classifies them one by one and
    # an event's route is known from its earlier frames (route reuse learns from earlier batches only)
    live = [name for name in runners if "calibrated" in name or name.startswith("cascade") or "own" in name]
    print("\nA live trap (batch 1, frames as they come):\n")
    table({name: runners[name] for name in live}, first, arrays, labels, events, 1, args.rounds)
    return 0


def table(runners: dict, first: CascadeRunner, arrays: list, labels: list[str], events: list, batch: int,
          rounds: int) -> None:
    """Every policy on the same prepared batches, interleaved batch by batch; one markdown table."""
    spans = range(0, len(arrays), batch)
    batches = [(first.prepare(arrays[j:j + batch]), events[j:j + batch]) for j in spans]
    ms: dict[str, list[float]] = {"single": [], **{name: [] for name in runners}}
    answers: dict[str, list] = {}
    g = first.global_runner
    for _ in range(rounds):
        per = {name: 0.0 for name in ms}
        outs: dict[str, list] = {name: [] for name in runners}
        for runner, _ev in runners.values():
            runner.routes = RouteMemory()  # each round starts with no burst seen
        for prep, evs in batches:  # policies interleaved batch by batch
            t = time.perf_counter()
            g.detect_inputs(*prep.inputs[g.entry.imgsz])
            per["single"] += time.perf_counter() - t
            for name, (runner, ev) in runners.items():
                t = time.perf_counter()
                outs[name] += runner.classify_prepared(prep, events=evs if ev else None)
                per[name] += time.perf_counter() - t
        for name in ms:
            ms[name].append(per[name] * 1000.0 / len(arrays))
        answers = outs

    ref = answers[next(iter(runners))]
    n_anim = sum(t != BACKGROUND for t in labels)

    def recall(res) -> float:
        return sum(1 for c, t in zip(res, labels, strict=True) if t != BACKGROUND and not c.decision.empty) / n_anim

    single_ms = min(ms["single"])
    print("| policy | ms/frame | vs single [<= 1.35x] | model runs/frame | animal recall | vs cascade [within 0.5 pp] "
          "| species answers changed | frames reusing a route |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| single (global model only) | {single_ms:.2f} | 1.00x | 1.00 | | | | |")
    for name, res in answers.items():
        m = min(ms[name])
        runs = statistics.mean(len(c.decision.models_run) for c in res)
        changed = sum(a.decision.top[0] != b.decision.top[0] for a, b in zip(res, ref, strict=True))
        reused = sum(c.decision.route.reused for c in res)
        print(f"| {name} | {m:.2f} | {m / single_ms:.2f}x | {runs:.2f} | {recall(res):.4f} | "
              f"{100 * (recall(res) - recall(ref)):+.2f} pp | {changed} | {reused} |")


if __name__ == "__main__":
    raise SystemExit(main())
