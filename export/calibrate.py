"""`camtrap-export calibrate`: pick the background gate of a bundle on validation frames.

Most frames of a camera trap are empty, and on a frame where the global model saw nothing at
the route threshold the cascade runs every expert (the ``background`` route): 1 + K model runs
for what is nearly always nothing. The gate (``CascadeSettings.gate_threshold``) skips that pass
when the global model's best score is below it. Too high a gate loses animals only the experts
would have found; so it is chosen on validation frames, for a target animal recall:

1. run the bundle, through the device's own code, with the gate off (every background frame
   gets its all-experts pass), recording per frame whether it holds an animal (labels), the
   route, the global model's best score, whether the answer is an animal, and the model runs;
2. the gate's effect is then exact without running anything again: at gate ``t`` a background
   frame whose global best is below ``t`` becomes empty at one model run
   (``edge.cascade.gated``, the rule the device applies);
3. the highest ``t`` whose animal recall stays within ``max_recall_drop`` (default 0.5
   percentage points) of the gate-off recall is written to the manifest, which is re-signed.

Animal recall is the share of labelled animal frames whose answer is an animal (any species):
the gate only ever turns answers into "empty", so this is what it can cost. Steps 2-3 are pure
(``gate_outcome``, ``choose_gate``) and tested on hand-made frames.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_RECALL_DROP = 0.005  # 0.5 percentage points of animal recall


@dataclass(frozen=True)
class FrameOutcome:
    """One validation frame as the gate-off cascade saw it."""

    animal: bool  # labels: the frame holds an animal
    found: bool  # the cascade's answer is an animal (any species)
    background: bool  # took the background route (the only frames a gate can touch)
    global_best: float  # the global model's best score at the decode floor (0 if nothing)
    runs: int  # model runs the cascade spent on it


def gate_outcome(frames: Sequence[FrameOutcome], gate: float | None) -> dict:
    """Animal recall, model runs per frame and frames gated, had ``gate`` been set."""
    from edge.cascade import gated

    animals = sum(f.animal for f in frames)
    found = runs = n_gated = 0
    for f in frames:
        if f.background and gated(f.global_best, gate):
            runs += 1
            n_gated += 1
            continue
        runs += f.runs
        found += f.animal and f.found
    return {"gate": gate, "animal_recall": found / animals if animals else 1.0,
            "runs_per_frame": runs / len(frames) if frames else 0.0, "gated": n_gated,
            "frames": len(frames), "animal_frames": animals}


def choose_gate(frames: Sequence[FrameOutcome], max_recall_drop: float = DEFAULT_MAX_RECALL_DROP,
                ceiling: float = 1.0) -> tuple[float | None, dict, dict]:
    """The highest gate whose animal recall is within ``max_recall_drop`` of the gate-off recall.

    A gate ``t`` gates the background frames scoring below ``t``, so the candidates are the
    background frames' own global scores (the highest gate that still lets a frame through is
    its score) and ``ceiling`` (the route threshold: no background frame scores at or above
    it). Recall can only fall as the gate rises, so the answer is the last candidate that keeps
    it. Returns (gate, or None when no gate above 0 keeps the recall; the outcome with it;
    the outcome without a gate).
    """
    off = gate_outcome(frames, None)
    floor = off["animal_recall"] - max_recall_drop
    candidates = sorted({f.global_best for f in frames if f.background and 0 < f.global_best < ceiling} | {ceiling})
    best: float | None = None
    for t in candidates:
        if gate_outcome(frames, t)["animal_recall"] + 1e-12 >= floor:
            best = t
        else:
            break
    return best, gate_outcome(frames, best), off


def run_outcomes(bundle, images: Sequence[Path], truths: Sequence[str], background: str,
                 backend: str = "onnxruntime", batch: int = 8) -> list[FrameOutcome]:
    """Step 1: the bundle's cascade with the gate off, on ``images`` read as the device reads them."""
    from edge.cascade import CascadePolicy
    from edge.engines import load_engines
    from edge.imageio import read_image
    from edge.runner import CascadeRunner

    man = bundle.manifest
    policy = CascadePolicy(**{**man.cascade.model_dump(), "gate_threshold": None})
    runner = CascadeRunner(man, load_engines(bundle, backend), policy)
    out: list[FrameOutcome] = []
    for k in range(0, len(images), batch):
        arrays = [read_image(p, max_side=runner.input_side).bgr for p in images[k:k + batch]]
        for res, truth in zip(runner.classify(arrays), truths[k:k + batch], strict=True):
            d = res.decision
            out.append(FrameOutcome(animal=truth != background, found=not d.empty,
                                    background=d.route.reason == "background",
                                    global_best=float(d.route.global_best), runs=len(d.models_run)))
    return out


def write_gate(bundle_dir: Path, gate: float | None, sign_key: Path | None, note: dict) -> None:
    """Set ``cascade.gate_threshold`` in the bundle folder's manifest and re-sign it (atomic writes).

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
    cascade = man.cascade.model_copy(update={"gate_threshold": gate})
    provenance = {**man.provenance, "gate_calibration": note}
    data = man.model_copy(update={"cascade": cascade, "provenance": provenance}).to_bytes()
    Manifest.model_validate_json(data)  # the bounds of CascadeSettings hold
    atomic_write_bytes(man_path, data)
    if sign_key is not None:
        atomic_write_bytes(sig_path, sign(data, Path(sign_key).read_bytes()))


def calibrate(bundle_dir: Path, data_yaml: Path, split: str = "val",
              max_recall_drop: float = DEFAULT_MAX_RECALL_DROP, sign_key: Path | None = None,
              backend: str = "onnxruntime", public_keys: list[Path] | None = None,
              require_signature: bool = False, write: bool = True) -> dict:
    from edge.bundle import load_bundle
    from export.evaluate import split_images
    from export.metrics import BACKGROUND

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
    gate, with_gate, without = choose_gate(frames, max_recall_drop, ceiling=man.cascade.route_threshold)
    report = {"bundle": str(bundle_dir), "data": str(data_yaml), "split": split,
              "max_recall_drop": max_recall_drop, "gate_threshold": gate, "with_gate": with_gate,
              "without_gate": without, "previous_gate": man.cascade.gate_threshold}
    if write:
        write_gate(bundle_dir, gate, sign_key, {k: report[k] for k in ("data", "split", "max_recall_drop")}
                   | {"animal_recall": with_gate["animal_recall"], "animal_recall_without": without["animal_recall"],
                      "runs_per_frame": with_gate["runs_per_frame"], "runs_per_frame_without":
                      without["runs_per_frame"], "frames": len(frames)})
    return report


def _cmd(args: argparse.Namespace) -> int:
    from edge.keys import trust_from_args

    t = trust_from_args(args)
    r = calibrate(Path(args.bundle), Path(args.data), split=args.split,
                  max_recall_drop=args.max_recall_drop_pp / 100.0,
                  sign_key=Path(args.sign) if args.sign else None, backend=args.backend,
                  public_keys=t.public_keys, require_signature=t.require_signature, write=not args.dry_run)
    w, o = r["with_gate"], r["without_gate"]
    gate = "none (no gate keeps the recall)" if r["gate_threshold"] is None else f"{r['gate_threshold']:.4f}"
    print(f"gate {gate}: animal recall {w['animal_recall']:.4f} (without {o['animal_recall']:.4f}), "
          f"model runs per frame {w['runs_per_frame']:.2f} (without {o['runs_per_frame']:.2f}), "
          f"{w['gated']} of {w['frames']} {r['split']} frames gated"
          + ("" if args.dry_run else f"; written to {Path(args.bundle) / 'manifest.json'}"))
    if args.report:
        Path(args.report).write_text(json.dumps(r, indent=1))
    return 0


def add_cli(sub) -> None:
    from edge.keys import add_trust_options

    p = sub.add_parser("calibrate", help="pick the background gate on validation frames; write it to the manifest")
    p.add_argument("--bundle", required=True, help="bundle folder (its manifest is rewritten)")
    p.add_argument("--data", required=True, help="data.yaml from `prepare`")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="split to calibrate on (default: val)")
    p.add_argument("--max-recall-drop-pp", type=float, default=DEFAULT_MAX_RECALL_DROP * 100,
                   help="animal recall the gate may cost, in percentage points of the gate-off recall (default 0.5)")
    p.add_argument("--sign", help="Ed25519 private key (PEM) to re-sign the manifest (required for a signed bundle)")
    p.add_argument("--backend", default="onnxruntime", help="inference backend (default: onnxruntime)")
    p.add_argument("--dry-run", action="store_true", help="report the gate, do not write it")
    p.add_argument("--report", help="write the full report (JSON) here")
    add_trust_options(p)  # the bundle is verified before it is calibrated and re-signed
    p.set_defaults(func=_cmd)
