"""Score exactly what will be deployed: the bundle, run through the device's own code.

Single stage (the global model alone, at its thresholds) and the cascade are scored side by
side on the same images, image by image: the image's true class is its most frequent
labelled species (``background`` when it has none), the prediction the top species of the
answer. The report has the paper's Table 3 form (per-class precision, recall, F1 and
support, background included), macro F1, both confusion matrices and the route counts.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import yaml

from edge.keys import add_trust_options, describe, trust_from_args
from export.datasets import class_names
from export.metrics import BACKGROUND, bootstrap_macro_f1_gain, confusion, macro_f1, per_class

log = logging.getLogger(__name__)


def _truth(label_file: Path, names: list[str]) -> str:
    if not label_file.is_file():
        return BACKGROUND
    ids = [int(line.split()[0]) for line in label_file.read_text().splitlines() if line.strip()]
    return names[Counter(ids).most_common(1)[0][0]] if ids else BACKGROUND


def _split_images(data_yaml: Path, split: str) -> tuple[list[Path], list[str], list[str], dict]:
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: data.yaml not found (run `camtrap-export prepare` first)")
    d = yaml.safe_load(data_yaml.read_text())
    if not d.get(split):
        raise ValueError(f"{data_yaml}: no '{split}' split")
    root = Path(d.get("path") or data_yaml.parent)
    names = class_names(d.get("names"), data_yaml)
    imgs = sorted(p for p in (root / d[split]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    truths = [_truth(root / "labels" / split / (p.stem + ".txt"), names) for p in imgs]
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return imgs, truths, names, meta


def _seq_of(meta: dict, img: Path, split: str) -> str:
    """The image's burst (sequence) id from prepare's meta.json, keyed images/<split>/<name>."""
    images = meta.get("images", meta) if isinstance(meta, dict) else {}
    rec = images.get(f"images/{split}/{img.name}") or images.get(img.name)
    return str(rec.get("seq_id", img.stem)) if isinstance(rec, dict) else img.stem


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


def evaluate(bundle_path: Path, data_yaml: Path, split: str, out: Path, backend: str = "onnxruntime",
             batch: int = 8, n_boot: int = 1000, public_keys: list[Path] | None = None,
             require_signature: bool = False) -> dict:
    from edge.bundle import load_bundle
    from edge.engines import load_engines
    from edge.runner import CascadeRunner

    imgs, truths, names, meta = _split_images(data_yaml, split)  # bad input fails before models load
    bundle = load_bundle(bundle_path, public_keys=public_keys or None, require_signature=require_signature)
    man = bundle.manifest
    runner = CascadeRunner(man, load_engines(bundle, backend))
    g = man.global_model
    if set(names) != set(g.classes):
        raise ValueError(f"{data_yaml}: classes {sorted(names)} differ from the bundle's {sorted(g.classes)}")
    single, cascade, routes, runs = [], [], Counter(), []
    for k in range(0, len(imgs), batch):
        chunk = imgs[k:k + batch]
        arrays = []
        for p in chunk:
            a = cv2.imread(str(p))
            if a is None:
                raise ValueError(f"{p}: unreadable image")
            arrays.append(a)
        for res in runner.classify(arrays):
            d = res.decision
            routes[d.route.reason] += 1
            runs.append(len(d.models_run))
            cascade.append(d.top[0] or BACKGROUND)
            single.append(res.single_stage or BACKGROUND)  # same global run, its own thresholds
    labels = [*g.classes, BACKGROUND]
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"bundle": str(bundle_path), "bundle_version": man.bundle_version, "key_id": bundle.key_id,
                    "data": str(data_yaml),
                    "split": split, "images": len(imgs), "backend": backend, "groups": man.groups}
    for name, pred in (("single_stage", single), ("cascade", cascade)):
        m = confusion(truths, pred, labels)
        report[name] = {"macro_f1": macro_f1(m, labels), "per_class": per_class(m, labels),
                        "confusion": m.tolist()}
        _plot_confusion(m, labels, f"{name.replace('_', ' ')} (macro F1 {report[name]['macro_f1']:.3f})",
                        out / f"confusion_{name}.png")
    report["labels"] = labels
    report["routes"] = dict(routes)
    report["model_runs_per_image"] = float(np.mean(runs)) if runs else 0.0
    seqs = [_seq_of(meta, p, split) for p in imgs]
    if n_boot > 0 and len(set(seqs)) > 1:
        report["gain_bootstrap"] = bootstrap_macro_f1_gain(truths, single, cascade, seqs, labels, n=n_boot)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(r: dict) -> str:
    lines = [f"# Cascade evaluation: {r['bundle_version']} on {r['split']} ({r['images']} images)", "",
             f"Macro F1: single stage **{r['single_stage']['macro_f1']:.3f}**, "
             f"cascade **{r['cascade']['macro_f1']:.3f}**; "
             f"model runs per image {r['model_runs_per_image']:.2f}; routes {r['routes']}.", ""]
    if "gain_bootstrap" in r:
        b = r["gain_bootstrap"]
        lines += [f"Gain {b['gain']:+.3f} (95% CI {b['ci95'][0]:+.3f} to {b['ci95'][1]:+.3f}, "
                  f"bootstrap over {b['clusters']} sequences).", ""]
    lines += ["| class | support | P single | R single | F1 single | P cascade | R cascade | F1 cascade |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(r["single_stage"]["per_class"], r["cascade"]["per_class"], strict=True):
        lines.append(f"| {a['class']} | {a['support']} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} "
                     f"| {b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} |")
    lines += ["", "Groups: " + "; ".join(f"{g}: {', '.join(s)}" for g, s in r["groups"].items()), ""]
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    t = trust_from_args(args)
    r = evaluate(Path(args.bundle), Path(args.data), args.split, Path(args.out), backend=args.backend,
                 n_boot=args.bootstrap, public_keys=t.public_keys, require_signature=t.require_signature)
    print(f"bundle {r['bundle_version']}: {describe(r['key_id'])}")
    print(f"macro F1 single {r['single_stage']['macro_f1']:.3f} cascade {r['cascade']['macro_f1']:.3f} "
          f"({r['images']} images, {r['model_runs_per_image']:.2f} model runs/image); report in {args.out}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("evaluate", help="single stage vs cascade on a split, through the device code")
    p.add_argument("--bundle", required=True, help="bundle folder or .tar/.tar.gz")
    p.add_argument("--data", required=True, help="data.yaml from `prepare`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--backend", default="onnxruntime", help="engine the device code runs the models on")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0 = none)")
    add_trust_options(p)
    p.set_defaults(func=_cmd)
