"""`camtrap-export calibrate`: pick the background gate (and cap) of a bundle on labelled frames.

Most frames of a camera trap are empty, and on a frame where the global model saw nothing at
the route threshold the cascade runs every expert (the ``background`` route): 1 + K model runs
for what is nearly always nothing. Two settings make that pass cheaper
(``CascadeSettings``): the gate (``gate_threshold``) skips it when the global model's best score
is below it, and the cap (``background_max_experts``) runs only the N experts of the groups the
global model scored highest. Both can lose animals only the experts would have found, so they are
chosen on labelled frames, for a target animal recall:

1. run the bundle, through the device's own code, with gate, cap and early stop off (every
   background frame gets its all-experts pass), recording per frame whether it holds an animal
   (labels), the route, the global model's best score, whether the answer is an animal, the
   model runs and, on background frames, each expert's best score in the order the device
   would run them;
2. every (gate, cap, stop) is then exact without running anything again: a gated frame is empty
   at one model run (``edge.cascade.gated``, the rule the device applies); a capped pass finds an
   animal iff one of its first N experts reaches ``expert_floor`` (the rule of ``decide``), and a
   stop ends it at the first expert that reaches the stop;
3. for each cap (K, K-1, ..., 1) the highest gate whose animal recall stays within
   ``max_recall_drop`` (default 0.5 percentage points) of the all-experts recall, and of those
   the pair with the fewest model runs per frame, is written to the manifest, which is re-signed.

Honest about what it promises: the recall drop is measured on a sample, so the report gives the
frames and animal frames behind it and a one-sided Clopper-Pearson upper bound on the drop (the
share of animal frames the settings lose; frames of a burst are correlated, so read it as a
floor on the uncertainty). With ``confidence`` set the choice itself uses that bound: a setting
is taken only if the bound stays within the budget, so too few animal frames keep every expert
(no animal frame lost out of 88 still allows a 3.3% drop at 95%; ~600 are needed for 0.5 pp).

Burst route reuse (``route_reuse``) needs no calibration for animal recall: a reused frame keeps
its answer only when its expert is confident (an animal), and otherwise runs the whole cascade;
it can change which species is answered (``camtrap-export evaluate`` reports how often).

Animal recall is the share of labelled animal frames whose answer is an animal (any species):
gate and cap only ever turn answers into "empty", so this is what they can cost. Steps 2-3 are
pure (``gate_outcome``, ``choose_gate``, ``choose_settings``) and tested on hand-made frames.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_RECALL_DROP = 0.005  # 0.5 percentage points of animal recall
REPORT_CONFIDENCE = 0.95  # the level of the bound reported when the choice does not use one


@dataclass(frozen=True)
class FrameOutcome:
    """One validation frame as the all-experts cascade (gate, cap and stop off) saw it."""

    animal: bool  # labels: the frame holds an animal
    found: bool  # the cascade's answer is an animal (any species)
    background: bool  # took the background route (the only frames gate and cap can touch)
    global_best: float  # the global model's best score at the decode floor (0 if nothing)
    runs: int  # model runs the cascade spent on it
    experts: tuple[float, ...] = ()  # background: each expert's best (at its thresholds), likeliest first


def drop_bound(lost: int, animals: int, confidence: float = REPORT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on the share of animal frames lost, having seen
    ``lost`` of ``animals`` lost: the recall drop the sample cannot rule out at ``confidence``."""
    from scipy.stats import beta

    if animals <= 0:
        return 1.0
    return 1.0 if lost >= animals else float(beta.ppf(confidence, lost + 1, animals - lost))


def animals_needed(max_drop: float, confidence: float = REPORT_CONFIDENCE) -> int:
    """Animal frames needed before zero losses bound the drop within ``max_drop`` at ``confidence``."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - max_drop)) if 0 < max_drop < 1 else 1


def _frame(f: FrameOutcome, gate: float | None, cap: int | None, stop: float | None,
           floor: float) -> tuple[bool, int, bool]:
    """(found, model runs, gated) of one frame under the settings."""
    from edge.cascade import gated

    if f.background and gated(f.global_best, gate):
        return False, 1, True
    if not f.background or not f.experts:  # not a background frame, or its experts not recorded
        return f.found, f.runs, False
    run = f.experts[:cap] if cap is not None else f.experts
    if stop is not None:
        run = run[:next((k + 1 for k, b in enumerate(run) if b >= stop), len(run))]
    return max(run, default=0.0) >= floor, 1 + len(run), False


def gate_outcome(frames: Sequence[FrameOutcome], gate: float | None, *, cap: int | None = None,
                 stop: float | None = None, floor: float = 0.3,
                 confidence: float = REPORT_CONFIDENCE) -> dict:
    """Animal recall, model runs per frame, frames gated and animal frames lost (against the
    all-experts pass, with the upper bound of the drop at ``confidence``), had ``gate``, ``cap``
    and ``stop`` been set (``floor``: the bundle's expert_floor)."""
    animals = sum(f.animal for f in frames)
    found = runs = n_gated = lost = 0
    for f in frames:
        hit, n, shut = _frame(f, gate, cap, stop, floor)
        runs += n
        n_gated += shut
        found += f.animal and hit
        lost += f.animal and f.found and not hit
    return {"gate": gate, "cap": cap, "stop": stop, "animal_recall": found / animals if animals else 1.0,
            "runs_per_frame": runs / len(frames) if frames else 0.0, "gated": n_gated,
            "frames": len(frames), "animal_frames": animals, "lost": lost,
            "drop": lost / animals if animals else 0.0, "drop_upper": drop_bound(lost, animals, confidence),
            "confidence": confidence}


def _keeps(o: dict, off: dict, max_recall_drop: float, confidence: float | None) -> bool:
    """Whether an outcome keeps the recall target: by the point estimate, or (``confidence``)
    by the upper bound of its drop; losing nothing always keeps it."""
    if confidence is not None:
        return o["lost"] == 0 or o["drop_upper"] <= max_recall_drop + 1e-12
    return o["animal_recall"] + 1e-12 >= off["animal_recall"] - max_recall_drop


def choose_gate(frames: Sequence[FrameOutcome], max_recall_drop: float = DEFAULT_MAX_RECALL_DROP,
                ceiling: float = 1.0, *, cap: int | None = None, stop: float | None = None,
                floor: float = 0.3, confidence: float | None = None) -> tuple[float | None, dict, dict]:
    """The highest gate whose animal recall is within ``max_recall_drop`` of the all-experts
    recall (with ``cap`` and ``stop`` applied; by the bound at ``confidence`` when given).

    A gate ``t`` gates the background frames scoring below ``t``, so the candidates are the
    background frames' own global scores (the highest gate that still lets a frame through is
    its score) and ``ceiling`` (the route threshold: no background frame scores at or above
    it). Recall can only fall as the gate rises, so the answer is the last candidate that keeps
    it. Returns (gate, or None when no gate above 0 keeps the recall; the outcome with it;
    the all-experts outcome without a gate).
    """
    level = confidence or REPORT_CONFIDENCE
    off = gate_outcome(frames, None, floor=floor, confidence=level)

    def at(t: float | None) -> dict:
        return gate_outcome(frames, t, cap=cap, stop=stop, floor=floor, confidence=level)

    candidates = sorted({f.global_best for f in frames if f.background and 0 < f.global_best < ceiling} | {ceiling})
    best: float | None = None
    for t in candidates:
        if _keeps(at(t), off, max_recall_drop, confidence):
            best = t
        else:
            break
    return best, at(best), off


def choose_settings(frames: Sequence[FrameOutcome], n_experts: int,
                    max_recall_drop: float = DEFAULT_MAX_RECALL_DROP, ceiling: float = 1.0, *,
                    stop: float | None = None, floor: float = 0.3, confidence: float | None = None,
                    caps: Sequence[int | None] | None = None) -> tuple[dict, list[dict], dict]:
    """Gate and cap chosen jointly: for each cap (None = every expert, then K-1 .. 1) its highest
    gate within the budget (``choose_gate``), if the cap alone keeps it; the pair with the fewest
    model runs per frame wins (ties: more experts). Returns (the winner's outcome, every cap's
    row, the all-experts outcome)."""
    rows = []
    off: dict = {}
    for cap in caps if caps is not None else [None, *range(n_experts - 1, 0, -1)]:
        gate, with_, off = choose_gate(frames, max_recall_drop, ceiling, cap=cap, stop=stop, floor=floor,
                                       confidence=confidence)
        feasible = gate is not None or _keeps(with_, off, max_recall_drop, confidence)
        rows.append({**with_, "feasible": feasible})
    best = min((r for r in rows if r["feasible"]),
               key=lambda r: (round(r["runs_per_frame"], 6), -(r["cap"] or n_experts)), default=rows[0])
    return best, rows, off


def run_outcomes(bundle, images: Sequence[Path], truths: Sequence[str], background: str,
                 backend: str = "onnxruntime", batch: int = 8) -> list[FrameOutcome]:
    """Step 1: the bundle's cascade with gate, cap and stop off (reuse too: every frame runs the
    whole cascade), on ``images`` read as the device reads them."""
    from edge.cascade import CascadePolicy
    from edge.engines import load_engines
    from edge.imageio import read_image
    from edge.runner import CascadeRunner

    man = bundle.manifest
    policy = CascadePolicy(**{**man.cascade.model_dump(), "gate_threshold": None, "background_max_experts": None,
                              "background_stop": None, "route_reuse": None})
    runner = CascadeRunner(man, load_engines(bundle, backend), policy)
    out: list[FrameOutcome] = []
    for k in range(0, len(images), batch):
        arrays = [read_image(p, max_side=runner.input_side).bgr for p in images[k:k + batch]]
        for res, truth in zip(runner.classify(arrays), truths[k:k + batch], strict=True):
            d = res.decision
            bg = d.route.reason == "background"
            out.append(FrameOutcome(animal=truth != background, found=not d.empty, background=bg,
                                    global_best=float(d.route.global_best), runs=len(d.models_run),
                                    experts=tuple(d.model_best[g] for g in d.route.groups) if bg else ()))
    return out


def write_settings(bundle_dir: Path, settings: dict, sign_key: Path | None, note: dict) -> None:
    """Set ``settings`` (CascadeSettings fields) in the bundle folder's manifest, record ``note`` in
    its provenance and re-sign it (atomic writes).

    A signed bundle must be re-signed: without ``sign_key`` its signature would no longer
    verify, so that is refused rather than leaving a bundle the device rejects.
    """
    from edge.atomic import atomic_write_bytes
    from edge.manifest import Manifest
    from edge.signing import sign

    man_path = bundle_dir / "manifest.json"
    sig_path = bundle_dir / "manifest.sig"
    if sig_path.exists() and sign_key is None:
        raise ValueError(f"{bundle_dir}: the bundle is signed; pass --sign KEY to re-sign it with the gate")
    man = Manifest.model_validate_json(man_path.read_bytes())
    cascade = man.cascade.model_validate({**man.cascade.model_dump(), **settings})  # the bounds hold
    provenance = {**man.provenance, "gate_calibration": note}
    data = man.model_copy(update={"cascade": cascade, "provenance": provenance}).to_bytes()
    Manifest.model_validate_json(data)
    atomic_write_bytes(man_path, data)
    if sign_key is not None:
        atomic_write_bytes(sig_path, sign(data, Path(sign_key).read_bytes()))


def calibrate(bundle_dir: Path, data_yaml: Path, split: str = "val",
              max_recall_drop: float = DEFAULT_MAX_RECALL_DROP, sign_key: Path | None = None,
              backend: str = "onnxruntime", public_keys: list[Path] | None = None,
              require_signature: bool = False, write: bool = True, confidence: float | None = None,
              cap: bool = True) -> dict:
    """Choose gate (and, with ``cap``, background_max_experts) on ``split`` of ``data_yaml`` and
    write them into the bundle; returns the report (see the module doc)."""
    from edge.bundle import load_bundle
    from export.evaluate import split_images
    from export.metrics import BACKGROUND

    if confidence is not None and not 0.5 <= confidence < 1:
        raise ValueError(f"calibrate: confidence {confidence} must be in [0.5, 1)")
    imgs, truths, names, _meta = split_images(data_yaml, split)  # bad input fails before models load
    if not bundle_dir.is_dir():
        raise ValueError(f"{bundle_dir}: calibrate writes into a bundle folder (unpack a .tar first)")
    bundle = load_bundle(bundle_dir, public_keys=public_keys or None, require_signature=require_signature)
    man = bundle.manifest
    if set(names) != set(man.global_model.classes):
        raise ValueError(f"{data_yaml}: classes {sorted(names)} differ from the bundle's "
                         f"{sorted(man.global_model.classes)}")
    frames = run_outcomes(bundle, imgs, truths, BACKGROUND, backend=backend)
    if not any(f.animal for f in frames):
        raise ValueError(f"{data_yaml}: the {split} split has no labelled animal frames to calibrate on")
    c = man.cascade
    best, rows, without = choose_settings(frames, len(man.experts), max_recall_drop, c.route_threshold,
                                          stop=c.background_stop, floor=c.expert_floor, confidence=confidence,
                                          caps=None if cap else [None])
    level = confidence or REPORT_CONFIDENCE
    report = {"bundle": str(bundle_dir), "data": str(data_yaml), "split": split,
              "max_recall_drop": max_recall_drop, "confidence": confidence, "gate_threshold": best["gate"],
              "background_max_experts": best["cap"], "experts": len(man.experts), "with_gate": best,
              "without_gate": without, "caps": rows,
              "previous": {"gate_threshold": c.gate_threshold, "background_max_experts": c.background_max_experts},
              "animals_needed": animals_needed(max_recall_drop, level)}
    if write:
        write_settings(bundle_dir, {"gate_threshold": best["gate"], "background_max_experts": best["cap"]}, sign_key,
                       {k: report[k] for k in ("data", "split", "max_recall_drop", "confidence")}
                       | {"gate_threshold": best["gate"], "background_max_experts": best["cap"],
                          "animal_recall": best["animal_recall"], "animal_recall_without": without["animal_recall"],
                          "runs_per_frame": best["runs_per_frame"], "runs_per_frame_without":
                          without["runs_per_frame"], "frames": len(frames), "animal_frames": best["animal_frames"],
                          "lost": best["lost"], "drop_upper": round(best["drop_upper"], 6),
                          "drop_upper_confidence": level})
    return report


def describe(r: dict) -> list[str]:
    """The report for people: what was chosen, what it costs, and how sure that is."""
    w, o = r["with_gate"], r["without_gate"]
    level = w["confidence"]
    gate = "none" if r["gate_threshold"] is None else f"{r['gate_threshold']:.4f}"
    cap = r["background_max_experts"]
    n = r["experts"]
    lines = [f"gate {gate}, {'all' if cap is None else cap} of {n} experts on background frames: "
             f"animal recall {w['animal_recall']:.4f} "
             f"(all experts {o['animal_recall']:.4f}), model runs per frame {w['runs_per_frame']:.2f} "
             f"(without {o['runs_per_frame']:.2f}), {w['gated']} of {w['frames']} {r['split']} frames gated",
             f"behind it: {w['frames']} frames, {w['animal_frames']} animal frames, {w['lost']} lost; recall drop "
             f"{100 * w['drop']:.2f} pp, at most {100 * w['drop_upper']:.2f} pp at {100 * level:.0f}% confidence "
             f"(budget {100 * r['max_recall_drop']:.2f} pp; "
             + ("chosen by the bound)" if r["confidence"]
                else "chosen by the point estimate: --confidence uses the bound)")]
    if w["animal_frames"] < r["animals_needed"]:
        lines.append(f"warning: {w['animal_frames']} animal frames cannot show a drop within "
                     f"{100 * r['max_recall_drop']:.2f} pp at {100 * level:.0f}% confidence even with none lost "
                     f"(that needs {r['animals_needed']}): calibrate on more labelled frames")
    lines.append("| background experts | gate | animal recall | lost | drop upper bound | model runs/frame "
                 "| keeps target |")
    for x in r["caps"]:
        lines.append(f"| {x['cap'] or 'all'} | {'none' if x['gate'] is None else format(x['gate'], '.4f')} | "
                     f"{x['animal_recall']:.4f} | {x['lost']} | {100 * x['drop_upper']:.2f} pp | "
                     f"{x['runs_per_frame']:.2f} | {'yes' if x['feasible'] else 'no'} |")
    return lines


def _cmd(args: argparse.Namespace) -> int:
    from edge.keys import trust_from_args

    t = trust_from_args(args)
    r = calibrate(Path(args.bundle), Path(args.data), split=args.split,
                  max_recall_drop=args.max_recall_drop_pp / 100.0,
                  sign_key=Path(args.sign) if args.sign else None, backend=args.backend,
                  public_keys=t.public_keys, require_signature=t.require_signature, write=not args.dry_run,
                  confidence=args.confidence, cap=not args.gate_only)
    lines = describe(r)
    lines[0] += "" if args.dry_run else f"; written to {Path(args.bundle) / 'manifest.json'}"
    print("\n".join(lines))
    if args.report:
        Path(args.report).write_text(json.dumps(r, indent=1))
    return 0


def add_cli(sub) -> None:
    from edge.cli import number_in
    from edge.keys import add_trust_options

    p = sub.add_parser("calibrate", help="pick the background gate and expert cap on labelled frames; "
                       "write them to the manifest")
    p.add_argument("--bundle", required=True, help="bundle folder (its manifest is rewritten)")
    p.add_argument("--data", required=True, help="data.yaml from `prepare` (frames the bundle was not trained on)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="split to calibrate on (default: val)")
    p.add_argument("--max-recall-drop-pp", type=number_in(0, 100), default=DEFAULT_MAX_RECALL_DROP * 100,
                   help="animal recall the settings may cost, in percentage points of the all-experts recall "
                   "(default 0.5)")
    p.add_argument("--confidence", type=float, default=None,
                   help="choose by the one-sided upper bound of the recall drop at this confidence (e.g. 0.95) "
                   "instead of the point estimate: a margin for the sample's size (default: point estimate; "
                   "the 95%% bound is reported either way)")
    p.add_argument("--gate-only", action="store_true",
                   help="choose the gate alone (every expert on background frames); default: gate and "
                   "background_max_experts jointly")
    p.add_argument("--sign", help="Ed25519 private key (PEM) to re-sign the manifest (required for a signed bundle)")
    p.add_argument("--backend", default="onnxruntime", help="inference backend (default: onnxruntime)")
    p.add_argument("--dry-run", action="store_true", help="report the settings, do not write them")
    p.add_argument("--report", help="write the full report (JSON) here")
    add_trust_options(p)  # the bundle is verified before it is calibrated and re-signed
    p.set_defaults(func=_cmd)
