"""Benchmark: does the two-stage cascade beat one detector on synthetic scenes? (not a CI test)

Run from the repository root with the workstation environment, e.g.::

    nice -n 10 .venv/bin/python benchmarks/cascade_vs_single.py --out /tmp/cascade-bench/report \\
        --record BENCHMARKS.md

What it does, per seed (the seed picks the scenes and the training seed):

1. Scenes with planted look-alike groups (export.synth), split by location: the test cameras
   are never seen in training (prepare --test-locations), as in the paper's out-of-sample test.
2. The MegaDetector role: a class-agnostic 'animal' detector trained from scratch on a larger,
   separate synthetic set (another synth seed, so other backgrounds; every species relabelled
   'animal'). Shared by all seeds unless --pretrain-per-seed (MegaDetector is one fixed model).
3. The global model: fine-tuned from (2) on all species with layers 0-9 frozen (freeze 10).
4. One expert per look-alike group (planted groups, or --groups auto: the paper's confusion
   clustering), fine-tuned from the global best.pt with the same frozen layers, E_expert epochs.
5. The control: the global model fine-tuned for the same E_expert extra epochs on all species.
   Without it a cascade "gain" could be nothing but extra training.
6. Two bundles (export.bundle.build_bundle: ONNX + parity check): global + experts, and
   control + the same experts. Every number is scored through the device code (edge.runner's
   CascadeRunner over ONNX Runtime): single stage = the bundle's global model alone, cascade =
   the full decision, control = the control bundle's global model alone. export.evaluate is
   also run on the main bundle and must agree (a cross-check that this loop scores like the
   product does).

Reported per seed and pooled over seeds: macro F1 (background included, image level, as the
paper's Table 3), the gain with a 95% bootstrap CI over test sequences, F1 per planted group,
model runs per image and route counts, animals the global model missed and how many the
all-experts pass recovered, and an error profile (same-group / other-group / missed / false
alarms) that says why the cascade wins or not. JSON + Markdown go to --out; --record appends the
Markdown with the exact command, machine and date to BENCHMARKS.md.

Everything heavy lives in --work (default /tmp); --resume reuses finished stages of an
identical configuration (stages are marked done only after their outputs are complete).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper, also when imported by path
import cascade_stats

REPO = Path(__file__).resolve().parents[1]
METHODS = ("single", "cascade", "control", "control_cascade")
METHOD_TITLES = {"single": "single stage", "cascade": "cascade", "control": "fine-tuned single (control)",
                 "control_cascade": "control + experts"}

# Full scale (hours to days on a CPU; see benchmarks/README.md) and the quick smoke preset.
FULL: dict[str, Any] = {
    "seeds": [0, 1, 2], "images": 20000, "pretrain_images": 32000, "size": "320x240", "imgsz": 320,
    "locations": 16, "test_locations": 4, "val_locations": 2, "rare_ratio": 4.0, "empty_frac": 0.5,
    "epochs_pretrain": 60, "epochs_global": 60, "epochs_experts": 40, "batch": 16, "bootstrap": 2000,
    "expert_empty_ratio": 1.0, "conf": 0.25,
}
QUICK: dict[str, Any] = {
    "seeds": [0], "images": 300, "pretrain_images": 300, "size": "192x144", "imgsz": 96,
    "locations": 6, "test_locations": 2, "val_locations": 1, "rare_ratio": 3.0,
    "epochs_pretrain": 1, "epochs_global": 1, "epochs_experts": 1, "bootstrap": 200,
}


# ---------------------------------------------------------------- config

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Defaults are the full scale; --quick is a few-minute smoke run. "
                                       "Explicit flags win over both.")
    p.add_argument("--out", type=Path, default=Path("/tmp/camtrap-cascade-bench/report"),
                   help="report folder (results.json, results.md, per-seed evaluate reports)")
    p.add_argument("--work", type=Path, default=Path("/tmp/camtrap-cascade-bench/work"),
                   help="scenes, datasets, runs and bundles (large; keep it out of the repo)")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (1 seed, 1 epoch each)")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {FULL['seeds']})")
    p.add_argument("--images", type=int, help=f"frames per seed in the species set (default {FULL['images']})")
    p.add_argument("--pretrain-images", type=int, help="frames in the class-agnostic pretraining set "
                   f"(default {FULL['pretrain_images']})")
    p.add_argument("--size", help=f"synthetic frame WIDTHxHEIGHT (default {FULL['size']})")
    p.add_argument("--imgsz", type=int, help=f"training and inference image size (default {FULL['imgsz']})")
    p.add_argument("--locations", type=int, help=f"camera locations (default {FULL['locations']})")
    p.add_argument("--test-locations", type=int, help="held-out test locations, the last ones "
                   f"(default {FULL['test_locations']})")
    p.add_argument("--val-locations", type=int, help=f"validation locations (default {FULL['val_locations']})")
    p.add_argument("--rare-ratio", type=float, help="frames of a common species per frame of a rare one "
                   f"(default {FULL['rare_ratio']})")
    p.add_argument("--empty-frac", type=float, help=f"share of empty frames (default {FULL['empty_frac']})")
    p.add_argument("--epochs-pretrain", type=int, help=f"default {FULL['epochs_pretrain']}")
    p.add_argument("--epochs-global", type=int, help=f"default {FULL['epochs_global']}")
    p.add_argument("--epochs-experts", type=int, help="expert epochs, also the control's extra epochs "
                   f"(default {FULL['epochs_experts']})")
    p.add_argument("--batch", type=int, help=f"default {FULL['batch']}")
    p.add_argument("--bootstrap", type=int, help=f"bootstrap resamples (default {FULL['bootstrap']})")
    p.add_argument("--expert-empty-ratio", type=float, help="empty frames per own-group frame in an expert's "
                   f"training set (default {FULL['expert_empty_ratio']}; -1 = all empty frames)")
    p.add_argument("--conf", type=float, help="the bundles' per-class thresholds and route threshold, the same for "
                   f"every model (default {FULL['conf']}, the bundle default; not tuned on test data)")
    p.add_argument("--negatives", action="store_true", help="experts also see other groups' animals as background")
    p.add_argument("--groups", choices=["planted", "auto"], default="planted",
                   help="expert groups: the planted ones (default) or the paper's confusion clustering (K=auto)")
    p.add_argument("--device", default="cpu", help="training device: cpu (default), 0 for the first GPU")
    p.add_argument("--model", default="camtrap-tiny.yaml", help="model yaml the animal detector starts from")
    p.add_argument("--pretrain-per-seed", action="store_true", help="a new animal detector for every seed")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in --work (same configuration)")
    p.add_argument("--record", type=Path, help="append the Markdown result with command, machine and date here")
    p.add_argument("--label", default="", help="a title for this run in the record (e.g. 'reduced')")
    p.add_argument("--note", default="", help="free text added to the record (limits, context)")
    args = p.parse_args(argv)
    for k, v in FULL.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK.get(k, v) if args.quick else v)
    if args.expert_empty_ratio is not None and args.expert_empty_ratio < 0:
        args.expert_empty_ratio = None
    if args.test_locations + args.val_locations >= args.locations:
        p.error("--test-locations + --val-locations must leave training locations")
    return args


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that decide the work's content (not where the report goes)."""
    keys = [*FULL, "negatives", "groups", "model", "pretrain_per_seed"]
    return {k: getattr(args, k) for k in keys if k != "seeds"}


# ---------------------------------------------------------------- stages

class Stages:
    """Runs named stages once; with resume, a stage whose done-marker matches is skipped."""

    def __init__(self, work: Path, config: dict, resume: bool, say: Callable[[str], None]) -> None:
        self.work, self.resume, self.say = work, resume, say
        self.seconds: dict[str, float] = {}
        work.mkdir(parents=True, exist_ok=True)
        cfg_file = work / "config.json"
        if resume and cfg_file.is_file() and json.loads(cfg_file.read_text()) != config:
            raise ValueError(f"{cfg_file}: --resume with a different configuration; use another --work")
        if any(work.iterdir()) and not cfg_file.is_file():
            raise ValueError(f"{work}: not empty and not a benchmark work folder (no config.json); "
                             "refusing to use it")
        if not resume:
            for child in work.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        cfg_file.write_text(json.dumps(config, indent=1))

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        marker = self.work / "done" / f"{name.replace('/', '_')}.json"
        if self.resume and marker.is_file():
            self.say(f"[bench] {name}: reused")
            return json.loads(marker.read_text()).get("value")
        self.say(f"[bench] {name} ...")
        t0 = time.monotonic()
        value = fn()
        self.seconds[name] = round(time.monotonic() - t0, 1)
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps({"value": value, "seconds": self.seconds[name]}, default=str))
        self.say(f"[bench] {name}: {self.seconds[name]:.0f} s")
        return value


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def make_scenes(out: Path, seed: int, args: argparse.Namespace, n_images: int, rare_ratio: float) -> Path:
    from export.synth import synthesize

    return synthesize(out, seed=seed, n_images=n_images, size=_size(args.size), n_locations=args.locations,
                      rare_ratio=rare_ratio, empty_frac=args.empty_frac, overwrite=True)


def relabel_animal(coco_json: Path) -> Path:
    """A copy of a COCO CT file with every species named 'animal' (the MegaDetector task)."""
    d = json.loads(coco_json.read_text())
    d["categories"] = [{"id": 0, "name": "empty"}, {"id": 1, "name": "animal"}]
    for a in d["annotations"]:
        a["category_id"] = 1 if a["category_id"] else 0
    out = coco_json.with_name("coco_animal.json")
    out.write_text(json.dumps(d))
    return out


def prepare_species(coco_json: Path, out: Path, args: argparse.Namespace, seed: int) -> dict:
    from export.datasets import prepare

    locs = [f"L{i}" for i in range(args.locations)]
    test = locs[len(locs) - args.test_locations:]
    val = locs[len(locs) - args.test_locations - args.val_locations:len(locs) - args.test_locations]
    return prepare(out, coco=coco_json, test_locations=test, val_locations=val, seed=seed, overwrite=True)


def train_run(data: Path, model: Path | str, out: Path, args: argparse.Namespace, seed: int, epochs: int,
              freeze: int, say: Callable[[str], None], prefix: str) -> dict:
    from export.train import train

    rec = train(data, model, out, epochs=epochs, imgsz=args.imgsz, batch=args.batch, freeze=freeze, seed=seed,
                device=args.device, plots=False, prefix=prefix, say=say)
    return {"mAP50": rec["metrics"]["mAP50"], "mAP50-95": rec["metrics"]["mAP50-95"],
            "epochs_run": rec["metrics"]["epochs_run"], "seconds": rec["seconds"],
            "instances_per_class": rec["oversampling"]["instances_per_class_before"]}


def write_planted_groups(path: Path, names: list[str]) -> dict[str, list[str]]:
    from export.grouping import write_groups
    from export.synth import PLANTED_GROUPS

    groups = {g: [s for s in ss if s in names] for g, ss in PLANTED_GROUPS.items()}
    groups = {g: ss for g, ss in groups.items() if ss}
    write_groups(path, groups, {"species": names, "source": "planted groups of export.synth"})
    return groups


# ---------------------------------------------------------------- scoring through the device code

def test_images(data_yaml: Path) -> list[tuple[Path, str, str]]:
    """(image, truth, sequence) of the test split; truth as export.evaluate: the most frequent box class."""
    from collections import Counter

    from export.metrics import BACKGROUND

    d = yaml.safe_load(data_yaml.read_text())
    root = Path(d["path"])
    names = d["names"]
    names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    meta = json.loads((root / "meta.json").read_text())["images"]
    out = []
    for img in sorted((root / d["test"]).iterdir()):
        if img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        lbl = root / "labels" / "test" / f"{img.stem}.txt"
        ids = [int(x.split()[0]) for x in lbl.read_text().splitlines() if x.strip()] if lbl.is_file() else []
        truth = names[Counter(ids).most_common(1)[0][0]] if ids else BACKGROUND
        rec = meta.get(f"images/test/{img.name}") or {}
        out.append((img, truth, str(rec.get("seq_id") or img.stem)))
    return out


def run_bundle(bundle_dir: Path, items: list[tuple[Path, str, str]], batch: int = 8) -> list[dict]:
    """Single-stage and cascade answers per image, through edge.runner over ONNX Runtime."""
    import cv2

    from edge.bundle import load_bundle
    from edge.engines import load_engines
    from edge.runner import CascadeRunner
    from export.metrics import BACKGROUND

    bundle = load_bundle(bundle_dir)
    runner = CascadeRunner(bundle.manifest, load_engines(bundle, "onnxruntime"))
    rows = []
    for k in range(0, len(items), batch):
        chunk = items[k:k + batch]
        arrays = []
        for p, _, _ in chunk:
            a = cv2.imread(str(p))
            if a is None:
                raise ValueError(f"{p}: unreadable image")
            arrays.append(a)
        for res in runner.classify(arrays):
            d = res.decision
            rows.append({"single": res.single_stage or BACKGROUND,
                         "cascade": d.top[0] or BACKGROUND, "route": d.route.reason, "runs": len(d.models_run)})
    return rows


def score_seed(seed: int, data_yaml: Path, bundle: Path, control_bundle: Path,
               report_dir: Path) -> tuple[list[dict], dict]:
    from export.evaluate import evaluate

    items = test_images(data_yaml)
    main = run_bundle(bundle, items)
    ctrl = run_bundle(control_bundle, items)
    records = [{"seed": seed, "image": p.name, "seq": f"s{seed}:{seq}", "truth": t,
                "single": m["single"], "cascade": m["cascade"], "route": m["route"], "runs": m["runs"],
                "control": c["single"], "control_cascade": c["cascade"]}
               for (p, t, seq), m, c in zip(items, main, ctrl, strict=True)]
    # the product's own evaluation on the same bundle must agree with this loop
    ev = evaluate(bundle, data_yaml, "test", report_dir / f"seed{seed}" / "evaluate", n_boot=0)
    return records, {"single_macro_f1": ev["single_stage"]["macro_f1"], "cascade_macro_f1": ev["cascade"]["macro_f1"],
                     "model_runs_per_image": ev["model_runs_per_image"], "routes": ev["routes"]}


# ---------------------------------------------------------------- one seed

def run_seed(seed: int, args: argparse.Namespace, st: Stages, pretrain_best: Path,
             say: Callable[[str], None]) -> dict:
    from export.experts import train_experts
    from export.grouping import read_groups
    from export.train import read_data_yaml

    w = args.work / f"seed{seed}"
    scenes, data = w / "scenes", w / "data"
    st.run(f"seed{seed}/synth", lambda: str(make_scenes(scenes, seed, args, args.images, args.rare_ratio)))
    split = st.run(f"seed{seed}/prepare", lambda: _split_summary(prepare_species(scenes / "coco.json", data,
                                                                                 args, seed)))
    data_yaml = data / "data.yaml"
    names = read_data_yaml(data_yaml).names
    glob = st.run(f"seed{seed}/global", lambda: train_run(
        data_yaml, pretrain_best, w / "global", args, seed, args.epochs_global, 10, say, f"[s{seed} global]"))
    groups_file = w / "groups.yaml"
    if args.groups == "planted":
        st.run(f"seed{seed}/groups", lambda: write_planted_groups(groups_file, names))
    else:
        from export.grouping import run_grouping

        st.run(f"seed{seed}/groups", lambda: run_grouping(out=groups_file, k="auto", run=w / "global",
                                                          data=data_yaml, imgsz=args.imgsz))
    groups = read_groups(groups_file, names)
    experts = st.run(f"seed{seed}/experts", lambda: {
        g: {"mAP50": e["mAP50"], "identical_backbone": e["identical"]}
        for g, e in train_experts(data_yaml, groups_file, w / "global", w / "experts", negatives=args.negatives,
                                  empty_ratio=args.expert_empty_ratio, say=say, epochs=args.epochs_experts,
                                  imgsz=args.imgsz, batch=args.batch, seed=seed, device=args.device,
                                  plots=False)["experts"].items()})
    control = st.run(f"seed{seed}/control", lambda: train_run(
        data_yaml, w / "global" / "weights" / "best.pt", w / "control", args, seed, args.epochs_experts, 10, say,
        f"[s{seed} control]"))
    from export.bundle import build_bundle

    for tag, run in (("bundle", w / "global"), ("bundle_control", w / "control")):
        st.run(f"seed{seed}/{tag}", lambda run=run, tag=tag: build_bundle(
            global_run=run, experts_dir=w / "experts", groups_file=groups_file, out=w / tag, data=data_yaml,
            version=f"bench-s{seed}-{tag}", n_samples=2, conf=args.conf).bundle_version)
    records, crosscheck = score_seed(seed, data_yaml, w / "bundle", w / "bundle_control", args.out)
    return {"seed": seed, "split": split, "groups": groups, "global": glob, "experts": experts,
            "control": control, "records": records, "crosscheck": crosscheck}


def _split_summary(report: dict) -> dict:
    return {s: {"images": r["images"], "empty_frac": r["empty_frac"], "sequences": r["sequences"],
                "locations": r["locations"], "boxes": r["boxes"]} for s, r in report["splits"].items()}


def pretrain(args: argparse.Namespace, st: Stages, tag: str, synth_seed: int, train_seed: int,
             say: Callable[[str], None]) -> Path:
    from export.datasets import prepare

    w = args.work / tag
    st.run(f"{tag}/synth", lambda: str(make_scenes(w / "scenes", synth_seed, args, args.pretrain_images, 1.0)))
    st.run(f"{tag}/prepare", lambda: _split_summary(prepare(
        w / "data", coco=relabel_animal(w / "scenes" / "coco.json"), val_frac=0.1, test_frac=0.0,
        seed=synth_seed, overwrite=True)))
    st.run(f"{tag}/train", lambda: train_run(w / "data" / "data.yaml", args.model, w / "run", args, train_seed,
                                             args.epochs_pretrain, 0, say, f"[{tag}]"))
    return w / "run" / "weights" / "best.pt"


# ---------------------------------------------------------------- report

def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _gain(g: dict | None) -> str:
    if not g:
        return "-"
    return f"{g['gain']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"


def verdict(pooled: dict) -> list[str]:
    """Plain sentences from the pooled numbers: the outcome, then the evidence for why."""
    m, gns = pooled["methods"], pooled["gains"]
    cs, cc = gns.get("cascade-single"), gns.get("cascade-control")
    lines = []
    if cs and cc and cs["ci95"][0] > 0 and cc["ci95"][0] > 0:
        lines.append("The cascade beats both the single model and the fine-tuned control (95% CIs above 0).")
    elif cs and cs["ci95"][0] > 0:
        lines.append("The cascade beats the single model, but not demonstrably the fine-tuned control: "
                     "the gain may be extra training rather than the experts.")
    else:
        lines.append("No demonstrated cascade gain: the 95% CI of cascade - single includes 0 or lies below it.")
    e_s, e_c = m["single"]["errors"], m["cascade"]["errors"]
    n = max(e_s["animal_frames"], 1)
    rt, mr = pooled["routing"], pooled["miss_recovery"]
    lines.append(
        f"Single model on {e_s['animal_frames']} animal frames: {e_s['correct']} right, {e_s['same_group']} named "
        f"as a look-alike of the same group ({e_s['same_group'] / n:.0%}, the only errors experts can fix), "
        f"{e_s['other_group']} as another group, {e_s['missed']} missed ({e_s['missed'] / n:.0%}); "
        f"{e_s['false_alarm']} false alarms on {e_s['empty_frames']} empty frames.")
    lines.append(
        f"Cascade: {e_c['correct']} right, {e_c['same_group']} same-group, {e_c['other_group']} other-group, "
        f"{e_c['missed']} missed; {e_c['false_alarm']} false alarms. Against the single model it fixed "
        f"{pooled['fixes']['cascade_vs_single']['fixed']} frames and broke "
        f"{pooled['fixes']['cascade_vs_single']['broken']}.")
    lines.append(
        f"Routing: the global model sent {rt['right_group']} of {rt['animal_frames']} animal frames to the right "
        f"expert ({rt['right_group_wrong_species']} of them with the wrong species, the cascade's room to help). "
        f"It missed {mr['global_missed']}; the all-experts pass recovered {mr['recovered_any']} "
        f"({mr['recovered_correct']} with the right species) and added {mr['false_alarms_added']} false alarms "
        f"on empty frames.")
    return lines


def render(report: dict) -> str:
    cfg, pooled = report["config"], report["pooled"]
    planted = report["planted_groups"]
    out = [f"### Cascade vs single stage{' (' + report['label'] + ')' if report['label'] else ''}", "",
           f"- date: {report['date']}", f"- command: `{report['command']}`",
           f"- machine: {report['machine']['summary']}",
           f"- wall time: {report['wall_seconds'] / 60:.1f} min",
           "- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) + f", seeds={report['seeds']}", ""]
    if report.get("note"):
        out += [report["note"], ""]
    out += ["| seed | test frames (animal/empty) | sequences | single | cascade | control | control+experts "
            "| cascade-single [95% CI] | cascade-control [95% CI] | runs/img | global missed | recovered |",
            "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    rows = [(str(s["seed"]), s["summary"]) for s in report["per_seed"]] + [("pooled", pooled)]
    for name, sm in rows:
        m, e = sm["methods"], sm["methods"]["single"]["errors"]
        out.append(
            f"| {name} | {sm['images']} ({e['animal_frames']}/{e['empty_frames']}) | {sm['sequences']} "
            f"| {_fmt(m['single']['macro_f1'])} | {_fmt(m['cascade']['macro_f1'])} | {_fmt(m['control']['macro_f1'])} "
            f"| {_fmt(m['control_cascade']['macro_f1'])} | {_gain(sm['gains'].get('cascade-single'))} "
            f"| {_gain(sm['gains'].get('cascade-control'))} | {sm['cost']['runs_per_image']:.2f} "
            f"| {sm['miss_recovery']['global_missed']}/{sm['miss_recovery']['animal_frames']} "
            f"| {sm['miss_recovery']['recovered_any']} ({sm['miss_recovery']['recovered_correct']} right) |")
    if len(report["per_seed"]) > 1:
        ms = report["seed_mean_sd"]
        out.append("")
        out.append("Mean (sd) over seeds: " + ", ".join(
            f"{METHOD_TITLES[k]} {ms[k]['mean']:.3f} ({ms[k]['sd']:.3f})" for k in METHODS) + ".")
    out += ["", "F1 per planted look-alike group (mean F1 of its species with test support):", "",
            "| seed | group | single | cascade | control | control+experts |", "|---|---|---:|---:|---:|---:|"]
    for name, sm in rows:
        for g in planted:
            out.append(f"| {name} | {g} | " + " | ".join(_fmt(sm["methods"][k]["group_f1"][g]) for k in METHODS) + " |")
    out += ["", "Per class, pooled (F1 single / cascade / control; support):", "",
            "| class | support | single | cascade | control |", "|---|---:|---:|---:|---:|"]
    for a, b, c in zip(*(pooled["methods"][k]["per_class"] for k in ("single", "cascade", "control")), strict=True):
        out.append(f"| {a['class']} | {a['support']} | {a['f1']:.3f} | {b['f1']:.3f} | {c['f1']:.3f} |")
    cost = pooled["cost"]
    out += ["", f"Cost: {cost['runs_per_image']:.2f} model runs per image ({cost['runs_per_empty_image']:.2f} on "
            f"empty frames, {cost['runs_per_animal_image']:.2f} on animal frames); routes {cost['routes']}.", "",
            "Error profile, pooled (animal frames: right / same group / other group / missed; empty frames: "
            "false alarms):", "",
            "| method | right | same group | other group | missed | false alarms |", "|---|---:|---:|---:|---:|---:|"]
    for k in METHODS:
        e = pooled["methods"][k]["errors"]
        out.append(f"| {METHOD_TITLES[k]} | {e['correct']} | {e['same_group']} | {e['other_group']} | {e['missed']} "
                   f"| {e['false_alarm']}/{e['empty_frames']} |")
    out += ["", "Training (per seed): " + "; ".join(
        f"seed {s['seed']}: global mAP50 {_fmt(s['global']['mAP50'])}, control {_fmt(s['control']['mAP50'])}, "
        "experts " + ", ".join(f"{g} {_fmt(e['mAP50'])}" for g, e in s["experts"].items())
        for s in report["per_seed"]) + f"; animal detector mAP50 {_fmt(report['pretrain'].get('mAP50'))}.", ""]
    out += ["Reading (generated from the pooled numbers):", ""] + [f"- {x}" for x in verdict(pooled)] + [""]
    return "\n".join(out)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    from export.yolo_env import ultralytics

    info = {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.is_available(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "ultralytics": ultralytics().__version__,
            "onnxruntime": onnxruntime.__version__}
    info["summary"] = (f"{info['cores']} cores ({cpu or 'unknown CPU'}), {'GPU' if info['gpu'] else 'no GPU'}, "
                       f"{platform.system()} {platform.release()}, Python {info['python']}, torch {info['torch']}, "
                       f"ultralytics {info['ultralytics']}, onnxruntime {info['onnxruntime']}")
    return info


def command_line() -> str:
    nice = os.nice(0)
    exe = os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(Path.cwd())) else "python"
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    return ((f"nice -n {nice} " if nice else "") + shlex.join([exe, script, *sys.argv[1:]]))


def append_record(path: Path, markdown: str) -> None:
    if not path.is_file():
        path.write_text(HEADER)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + markdown)


HEADER = """# Benchmarks

Every entry records its exact command, the machine it ran on and the date. Entries are appended,
never edited, whatever they show; a later entry may supersede an earlier one but says so.
"""


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    args.work, args.out = args.work.resolve(), args.out.resolve()
    if args.work.is_relative_to(REPO):
        print(f"[bench] warning: --work {args.work} is inside the repository", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, flush=True)

    from export.yolo_env import prepare_offline

    prepare_offline()
    st = Stages(args.work, config_of(args), args.resume, say)
    shared = None if args.pretrain_per_seed else pretrain(args, st, "pretrain", 1000, 1000, say)
    per_seed = []
    for seed in args.seeds:
        best = shared or pretrain(args, st, f"pretrain_s{seed}", 1000 + seed, seed, say)
        res = run_seed(seed, args, st, best, say)
        per_seed.append(res)
        (args.out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        (args.out / f"seed{seed}" / "records.json").write_text(json.dumps(res["records"], indent=0))
    from export.metrics import BACKGROUND
    from export.synth import PLANTED_GROUPS

    names = sorted({s for r in per_seed for g in r["groups"].values() for s in g})
    labels = [*names, BACKGROUND]
    for r in per_seed:
        r["summary"] = cascade_stats.summarise(r["records"], labels, PLANTED_GROUPS, METHODS, args.bootstrap)
        cc, sm = r["crosscheck"], r["summary"]["methods"]
        for mine, theirs in ((sm["single"]["macro_f1"], cc["single_macro_f1"]),
                             (sm["cascade"]["macro_f1"], cc["cascade_macro_f1"])):
            if abs(mine - theirs) > 1e-9:
                raise RuntimeError(f"seed {r['seed']}: this loop ({mine:.6f}) and export.evaluate ({theirs:.6f}) "
                                   "disagree; the benchmark would not score what the product scores")
    all_records = [x for r in per_seed for x in r["records"]]
    pooled = cascade_stats.summarise(all_records, labels, PLANTED_GROUPS, METHODS, args.bootstrap)
    import numpy as np

    pretrain_meta = json.loads((args.work / "done" / ("pretrain_train.json" if shared else
                                                      f"pretrain_s{args.seeds[0]}_train.json")).read_text())["value"]
    report = {
        "label": args.label, "note": args.note,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command_line(),
        "machine": machine(), "config": config_of(args), "seeds": args.seeds, "planted_groups": PLANTED_GROUPS,
        "labels": labels, "pretrain": pretrain_meta,
        "per_seed": [{k: v for k, v in r.items() if k != "records"} for r in per_seed],
        "pooled": pooled,
        "seed_mean_sd": {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                         for k in METHODS
                         for v in [[r["summary"]["methods"][k]["macro_f1"] for r in per_seed]]},
        "stage_seconds": st.seconds,
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    report["verdict"] = verdict(pooled)
    md = render(report)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "results.md").write_text(md)
    if args.record:
        append_record(args.record, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
