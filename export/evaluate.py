"""Score exactly what will be deployed: the bundle, run through the device's own code.

Single stage (the global model alone, at its thresholds), the fair control (``--control``: the
global model fine-tuned for the experts' extra epochs on all species, same frozen layers, run
as a single stage) and the cascade are scored side by side on the same images, image by
image: the image's true class is its most frequent labelled species (``background`` when it
has none), the prediction the top species of the answer. The report has the paper's Table 3
form (per-class precision, recall, F1 and support, background included) and for each model:
macro F1 with and without background, per-species F1 with 95% intervals from a bootstrap over
sequences, the number of sequences behind each species, model runs per frame; and the
differences cascade - single, cascade - control and control - single with their intervals.

Read it this way: the cascade's gain over the single stage mixes two things, the experts and
the extra training they got; the gain over the control is what the experts add. An interval
that spans 0 is no evidence either way, and a species seen in two sequences is an anecdote.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from edge.keys import add_trust_options, describe, trust_from_args
from edge.manifest import species_label
from export.datasets import class_names
from export.evidence import read_meta, sequence_of
from export.metrics import BACKGROUND, bootstrap_models, confusion, macro_f1, per_class, sequences_per_label
from export.taxonomy import dataset_taxonomy

SINGLE, CONTROL, CASCADE = "single_stage", "control", "cascade"
PAIRS = ((CASCADE, SINGLE), (CASCADE, CONTROL), (CONTROL, SINGLE))  # (b, a): b - a

log = logging.getLogger(__name__)


def _truth(label_file: Path, names: list[str]) -> str:
    if not label_file.is_file():
        return BACKGROUND
    ids = [int(line.split()[0]) for line in label_file.read_text().splitlines() if line.strip()]
    return names[Counter(ids).most_common(1)[0][0]] if ids else BACKGROUND


def split_images(data_yaml: Path, split: str) -> tuple[list[Path], list[str], list[str], dict]:
    """A split's images, each one's true species (or background), the class names and meta.json.

    Shared by evaluate, calibrate and the P2 benchmark, so all score the same frames the same way."""
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: data.yaml not found (run `camtrap-export prepare` first)")
    d = yaml.safe_load(data_yaml.read_text())
    if not d.get(split):
        raise ValueError(f"{data_yaml}: no '{split}' split")
    root = Path(d.get("path") or data_yaml.parent)
    names = class_names(d.get("names"), data_yaml)
    imgs = sorted(p for p in (root / d[split]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    truths = [_truth(root / "labels" / split / (p.stem + ".txt"), names) for p in imgs]
    return imgs, truths, names, read_meta(root)


def _plot_confusion(m: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _top_above(dets, entry) -> str | None:
    """The single-stage answer: the most confident species at or above the model's thresholds."""
    above = [d for d in dets if d.score >= entry.threshold(d.species)]
    return max(above, key=lambda d: d.score).species if above else None


def control_runner(control: Path, like, out: Path):
    """The control model (a training run folder or .pt) as a device ModelRunner with the global's settings.

    It is exported to ONNX first (out/control.onnx, at the global's image size), so the control is
    scored through the same engine, letterbox, decoder and thresholds as the bundle's global model.
    """
    from edge.engines import create_engine
    from edge.hashing import sha256_file
    from edge.runner import ModelRunner
    from export.evidence import resolve_weights
    from export.onnx import export_onnx

    exp = export_onnx(resolve_weights(control), out / "control.onnx", imgsz=like.imgsz)
    if exp.classes != like.classes:
        raise ValueError(f"{control}: control classes {exp.classes} differ from the global model's {like.classes}")
    entry = like.model_copy(update={"name": CONTROL, "file": exp.onnx_path.name, "layout": exp.layout,
                                    "sha256": sha256_file(exp.onnx_path), "backbone_sha256": None})
    return ModelRunner(entry, create_engine("onnxruntime", exp.onnx_path, entry))


def burst_reuse(runner, arrays: list, truths: list[str], seqs: list[str], per_frame: list[str],
                per_frame_runs: list[int], batch: int = 1) -> dict:
    """Burst route reuse simulated with the dataset's sequences as events: ``runner`` (whose policy
    sets ``route_reuse``) runs the frames in sequence order, each frame's event its sequence, one
    frame per batch by default (a live trap: a burst's frames come a second apart, so the daemon
    classifies them one by one; routes are learnt from earlier batches only); compared with the
    per-frame answers and runs of the same policy without reuse.
    Returns model runs per frame, animal recall, per-species recall and how many species answers
    changed, with reuse and without."""
    order = sorted(range(len(arrays)), key=lambda i: (seqs[i], i))
    answers: dict[int, object] = {}
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        for i, res in zip(idx, runner.classify_prepared(runner.prepare([arrays[i] for i in idx]),
                                                        events=[seqs[i] for i in idx]), strict=True):
            answers[i] = res.decision
    with_ = [answers[i].top[0] or BACKGROUND for i in range(len(arrays))]  # type: ignore[attr-defined]
    runs = [len(answers[i].models_run) for i in range(len(arrays))]  # type: ignore[attr-defined]

    def recall(pred: list[str], sp: str | None = None) -> float | None:
        rows = [i for i, t in enumerate(truths) if t != BACKGROUND and (sp is None or t == sp)]
        return sum(pred[i] != BACKGROUND for i in rows) / len(rows) if rows else None

    def species_recall(pred: list[str]) -> dict[str, float]:
        rows: dict[str, list[int]] = {}
        for i, t in enumerate(truths):
            if t != BACKGROUND:
                rows.setdefault(t, []).append(i)
        return {sp: sum(pred[i] == sp for i in ix) / len(ix) for sp, ix in sorted(rows.items())}

    return {"route_reuse": runner.policy.route_reuse, "route_reuse_frames": runner.policy.route_reuse_frames,
            "frames": len(arrays), "sequences": len(set(seqs)),
            "reused": sum(bool(answers[i].route.reused) for i in answers),  # type: ignore[attr-defined]
            "runs_per_frame": float(np.mean(runs)), "runs_per_frame_without": float(np.mean(per_frame_runs)),
            "animal_recall": recall(with_), "animal_recall_without": recall(per_frame),
            "species_recall": species_recall(with_), "species_recall_without": species_recall(per_frame),
            "answers_changed": sum(a != b for a, b in zip(with_, per_frame, strict=True))}


def evaluate(bundle_path: Path, data_yaml: Path, split: str, out: Path, backend: str = "onnxruntime",
             batch: int = 8, n_boot: int = 1000, public_keys: list[Path] | None = None,
             require_signature: bool = False, control: Path | None = None,
             route_reuse: float | None = None) -> dict:
    """Single stage (and control) vs cascade on ``split``, with the bundle's gate applied from a
    gate-off run, and burst route reuse simulated on the sequences when the bundle sets it (or
    ``route_reuse`` is given)."""
    from edge.bundle import load_bundle
    from edge.cascade import gated
    from edge.engines import load_engines
    from edge.imageio import ImageError, read_image
    from edge.runner import CascadeRunner
    from export.calibrate import FrameOutcome, gate_outcome

    imgs, truths, names, meta = split_images(data_yaml, split)  # bad input fails before models load
    bundle = load_bundle(bundle_path, public_keys=public_keys or None, require_signature=require_signature)
    man = bundle.manifest
    gate = man.cascade.gate_threshold  # applied below from the gate-off run, so both can be reported
    engines = load_engines(bundle, backend)
    runner = CascadeRunner(man, engines, man.cascade.model_copy(update={"gate_threshold": None, "route_reuse": None}))
    reuse = route_reuse if route_reuse is not None else man.cascade.route_reuse
    kept: list = []  # the frames, for the route reuse pass
    g = man.global_model
    if set(names) != set(g.classes):
        raise ValueError(f"{data_yaml}: classes {sorted(names)} differ from the bundle's {sorted(g.classes)}")
    out.mkdir(parents=True, exist_ok=True)
    ctrl = control_runner(Path(control), g, out) if control is not None else None
    preds: dict[str, list[str]] = {SINGLE: [], CASCADE: []}
    if ctrl:
        preds[CONTROL] = []
    routes: Counter = Counter()
    runs: list[int] = []
    outcomes: list[FrameOutcome] = []
    for k in range(0, len(imgs), batch):
        chunk = imgs[k:k + batch]
        try:  # read as the device's reader does (reduced JPEG decode to the models' input size)
            arrays = [read_image(p, max_side=runner.input_side).bgr for p in chunk]
        except ImageError as e:
            raise ValueError(str(e)) from None
        if reuse is not None:
            kept += arrays
        for res, truth in zip(runner.classify(arrays), truths[k:k + batch], strict=True):
            d = res.decision
            o = FrameOutcome(animal=truth != BACKGROUND, found=not d.empty, background=d.route.reason == "background",
                             global_best=d.route.global_best, runs=len(d.models_run))
            outcomes.append(o)
            shut = o.background and gated(o.global_best, gate)  # what the device does with the bundle's gate
            routes["gated" if shut else d.route.reason] += 1
            runs.append(1 if shut else o.runs)
            preds[CASCADE].append(BACKGROUND if shut else d.top[0] or BACKGROUND)
            preds[SINGLE].append(res.single_stage or BACKGROUND)  # same global run, its own thresholds
        if ctrl is not None:
            preds[CONTROL] += [_top_above(dets, ctrl.entry) or BACKGROUND for dets in ctrl.detect(arrays)]
    if ctrl is not None:
        ctrl.engine.close()
    labels = [*g.classes, BACKGROUND]
    seqs = [sequence_of(meta, p, split) for p in imgs]
    report: dict = {"bundle": str(bundle_path), "bundle_version": man.bundle_version, "key_id": bundle.key_id,
                    "data": str(data_yaml), "split": split, "images": len(imgs), "backend": backend,
                    "groups": man.groups, "labels": labels, "control": None,
                    "sequences": len(set(seqs)), "sequences_per_class": sequences_per_label(truths, seqs, labels)}
    per_frame = {SINGLE: 1.0, CONTROL: 1.0, CASCADE: float(np.mean(runs)) if runs else 0.0}
    boot = None
    if n_boot > 0 and len(set(seqs)) > 1:
        boot = bootstrap_models(truths, preds, seqs, labels, [pr for pr in PAIRS if set(pr) <= set(preds)], n=n_boot)
    for name, pred in preds.items():
        m = confusion(truths, pred, labels)
        rows = per_class(m, labels)
        for r in rows:
            r["sequences"] = report["sequences_per_class"][r["class"]]
            r["f1_ci95"] = boot["models"][name]["f1"].get(r["class"]) if boot else None
        report[name] = {"macro_f1": macro_f1(m, labels), "macro_f1_species": macro_f1(m, labels, species_only=True),
                        "macro_f1_ci95": boot["models"][name]["macro_f1"] if boot else None,
                        "macro_f1_species_ci95": boot["models"][name]["macro_f1_species"] if boot else None,
                        "model_runs_per_frame": per_frame[name], "per_class": rows, "confusion": m.tolist()}
        _plot_confusion(m, labels, f"{name.replace('_', ' ')} (macro F1 {report[name]['macro_f1']:.3f})",
                        out / f"confusion_{name}.png")
    report["control_model"] = str(control) if control is not None else None
    taxa = man.taxonomy or dataset_taxonomy(data_yaml)
    report["class_names"] = {c: species_label(c, taxa) for c in g.classes}  # for people: class (taxon)
    report["routes"] = dict(routes)
    report["model_runs_per_image"] = per_frame[CASCADE]
    report["gate"] = {"threshold": gate, "with": gate_outcome(outcomes, gate), "without": gate_outcome(outcomes, None),
                      "background_max_experts": man.cascade.background_max_experts}
    report["route_reuse"] = None
    if reuse is not None:  # the deployed policy (gate included) with reuse, against it without
        reusing = CascadeRunner(man, engines, man.cascade.model_copy(update={"route_reuse": reuse}))
        report["route_reuse"] = burst_reuse(reusing, kept, truths, seqs, preds[CASCADE], runs)
    if boot:
        report["differences"] = boot["differences"]
        report["n_boot"] = boot["n_boot"]
        d = boot["differences"][f"{CASCADE} - {SINGLE}"]["macro_f1"]
        report["gain_bootstrap"] = {"gain": d["point"], "ci95": d["ci95"], "n_boot": n_boot,
                                    "clusters": boot["clusters"]}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
    return report


def _ci_text(ci) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "n/a"


def render_markdown(r: dict) -> str:
    models = [m for m in (SINGLE, CONTROL, CASCADE) if isinstance(r.get(m), dict)]
    title = {SINGLE: "single stage", CONTROL: "control (single stage, same extra training)", CASCADE: "cascade"}
    lines = [f"# Cascade evaluation: {r['bundle_version']} on {r['split']} ({r['images']} images, "
             f"{r['sequences']} sequences)", "",
             "| model | macro F1 (95% CI) | species-only macro F1 (95% CI) | model runs per frame |",
             "|---|---|---|---:|"]
    for m in models:
        x = r[m]
        lines.append(f"| {title[m]} | {x['macro_f1']:.3f} ({_ci_text(x['macro_f1_ci95'])}) | "
                     f"{x['macro_f1_species']:.3f} ({_ci_text(x['macro_f1_species_ci95'])}) | "
                     f"{x['model_runs_per_frame']:.2f} |")
    lines.append("")
    if r.get("differences"):
        lines += ["| difference | macro F1 (95% CI) | species-only (95% CI) |", "|---|---|---|"]
        for name, d in r["differences"].items():
            a, b = d["macro_f1"], d["macro_f1_species"]
            lines.append(f"| {name} | {a['point']:+.3f} ({a['ci95'][0]:+.3f} to {a['ci95'][1]:+.3f}) | "
                         f"{b['point']:+.3f} ({b['ci95'][0]:+.3f} to {b['ci95'][1]:+.3f}) |")
        lines += ["", f"Intervals: bootstrap over {r['sequences']} sequences ({r['n_boot']} resamples). "
                  "An interval spanning 0 is no evidence either way.", ""]
    if CONTROL not in models:
        lines += ["No control was given (`--control`): the gain over the single stage mixes the experts with "
                  "their extra training, so it is not the experts' effect.", ""]
    if r.get("gate"):
        w, o = r["gate"]["with"], r["gate"]["without"]
        cap = r["gate"].get("background_max_experts")
        lines += [f"Background gate {r['gate']['threshold']}"
                  + (f" (at most {cap} experts on background frames)" if cap else "")
                  + f": animal recall {w['animal_recall']:.3f} "
                  f"(without it {o['animal_recall']:.3f}), model runs per frame {w['runs_per_frame']:.2f} "
                  f"(without it {o['runs_per_frame']:.2f}), {w['gated']} frames gated.", ""]
    if r.get("route_reuse"):
        x = r["route_reuse"]
        lines += [f"Burst route reuse {x['route_reuse']} (at most {x['route_reuse_frames']} frames in a row), "
                  f"the {x['sequences']} sequences as events, frames one by one: model runs per frame "
                  f"{x['runs_per_frame']:.2f} "
                  f"(without {x['runs_per_frame_without']:.2f}), {x['reused']} of {x['frames']} frames reused a "
                  f"route, animal recall {x['animal_recall']:.3f} (without {x['animal_recall_without']:.3f}), "
                  f"{x['answers_changed']} species answers changed.", ""]
        moved = {sp: (x["species_recall_without"][sp], v) for sp, v in x["species_recall"].items()
                 if v != x["species_recall_without"][sp]}
        if moved:
            lines += ["Species recall changed by reuse: " + ", ".join(
                f"{sp} {a:.3f} -> {b:.3f}" for sp, (a, b) in moved.items()), ""]
    lines += [f"Routes {r['routes']}.", "",
              "| class | sequences | support | " + " | ".join(f"F1 {m.split('_')[0]} (95% CI)" for m in models) + " |",
              "|---|---:|---:|" + "---|" * len(models)]
    shown = r.get("class_names", {})
    for i, lab in enumerate(r["labels"]):
        rows = [r[m]["per_class"][i] for m in models]
        cells = " | ".join(f"{x['f1']:.3f} ({_ci_text(x['f1_ci95'])})" for x in rows)
        lines.append(f"| {shown.get(lab, lab)} | {rows[0]['sequences']} | {rows[0]['support']} | {cells} |")
    thin = [lab for lab in r["labels"] if 0 < r["sequences_per_class"][lab] < 5]
    if thin:
        lines += ["", "Fewer than 5 sequences behind " + ", ".join(
            f"{lab} ({r['sequences_per_class'][lab]})" for lab in thin) + ": read their F1 as anecdotes."]
    lines += ["", "Groups: " + "; ".join(f"{g}: {', '.join(s)}" for g, s in r["groups"].items()), ""]
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    t = trust_from_args(args)
    r = evaluate(Path(args.bundle), Path(args.data), args.split, Path(args.out), backend=args.backend,
                 n_boot=args.bootstrap, public_keys=t.public_keys, require_signature=t.require_signature,
                 control=Path(args.control) if args.control else None, route_reuse=args.route_reuse)
    print(f"bundle {r['bundle_version']}: {describe(r['key_id'])}")
    for m in (SINGLE, CONTROL, CASCADE):
        if isinstance(r.get(m), dict):
            x = r[m]
            print(f"{m:<13} macro F1 {x['macro_f1']:.3f}, species only {x['macro_f1_species']:.3f}, "
                  f"{x['model_runs_per_frame']:.2f} model runs/frame")
    for name, d in (r.get("differences") or {}).items():
        a = d["macro_f1"]
        print(f"{name}: {a['point']:+.3f} (95% CI {a['ci95'][0]:+.3f} to {a['ci95'][1]:+.3f})")
    print(f"{r['images']} images, {r['sequences']} sequences; report in {args.out}/report.md")
    return 0


def add_cli(sub) -> None:
    from edge.cli import number_in

    p = sub.add_parser("evaluate", help="single stage vs cascade on a split, through the device code")
    p.add_argument("--bundle", required=True, help="bundle folder or .tar/.tar.gz")
    p.add_argument("--data", required=True, help="data.yaml from `prepare`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--backend", default="onnxruntime", help="engine the device code runs the models on")
    p.add_argument("--control", help="the fair control: a training run folder (or its .pt) of the global "
                   "model fine-tuned for the experts' extra epochs (`camtrap-export train --control-of`; "
                   "`pipeline` makes WORKDIR/control); scored as a single stage beside the cascade")
    p.add_argument("--route-reuse", type=number_in(0, 1), default=None,
                   help="simulate burst route reuse at this confidence on the split's sequences (default: the "
                   "bundle's cascade.route_reuse; off when it has none)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over sequences (0 = none)")
    add_trust_options(p)
    p.set_defaults(func=_cmd)
