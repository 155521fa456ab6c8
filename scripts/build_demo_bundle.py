#!/usr/bin/env python
"""Rebuild the demo bundle shipped in edge/demo/ (the `camtrap-edge demo` command and the tests use it).

Why a script: the shipped bundle must be reproducible from nothing but this repository, offline,
on a laptop CPU. It runs the whole workstation chain on synthetic scenes:

    synth (seed 0) -> prepare (2 locations held out as test) -> train the global model
    (camtrap-tiny.yaml, 160 px) -> group (k=3, hard counts + soft evidence; ARI against the planted
    groups) -> experts -> build_bundle (ONNX, parity check, samples, Ed25519-signed with a throwaway
    key) -> pick a few held-out test frames the bundle handles correctly -> edge/demo/.

Only the result lands in the output folder (default edge/demo/): bundle/, keys/demo.pub (the
private key is thrown away), frames/ (+ labels.json, the COCO truth of each frame), build.json
(every measured number) and README.md. Intermediate work goes to --work (default
/tmp/demo-build); ``--reuse`` keeps finished stages there, for iterating on the later ones.

    /work/main/.venv/bin/python scripts/build_demo_bundle.py            # ~20-25 min on 2 CPU cores
    /work/main/.venv/bin/python scripts/build_demo_bundle.py --retaxon  # taxonomy into the shipped
                                                                        # manifest, signed again
    /work/main/.venv/bin/python scripts/build_demo_bundle.py --share-backbone  # the shipped whole
                                            # models -> one backbone + heads (seconds), signed again
    /work/main/.venv/bin/python scripts/build_demo_bundle.py --cascade gate_threshold=0.11 [...]
                                            # cascade settings into the shipped manifest, signed again
    /work/main/.venv/bin/python scripts/build_demo_bundle.py --calibrate  # the gate from
                                            # `camtrap-export calibrate` on unseen frames, signed again

Every "signed again" uses a fresh throwaway key (only keys/demo.pub is kept). A full build makes
a shared-backbone bundle itself (`build_bundle`'s default), so --share-backbone is only for a
bundle of whole models, e.g. one made before that default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "/work/main/.venv/bin/python scripts/build_demo_bundle.py"
TEST_LOCATIONS = ["L6", "L7"]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# ---------------------------------------------------------------------------------- stages

def stage_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    from export.datasets import prepare, summary
    from export.synth import synthesize

    synth_dir, data_dir = work / "synth", work / "data"
    coco = synth_dir / "coco.json"
    if not (args.reuse and coco.is_file()):
        _say(f"[demo] synth: {args.images} images {args.size[0]}x{args.size[1]}, seed {args.seed}")
        synthesize(synth_dir, seed=args.seed, n_images=args.images, size=args.size, n_locations=8,
                   overwrite=True)
    if not (args.reuse and (data_dir / "data.yaml").is_file()):
        report = prepare(data_dir, coco=coco, test_locations=TEST_LOCATIONS, seed=args.seed, link="hardlink",
                         overwrite=True, taxonomy=synth_dir / "taxonomy.csv")
        (work / "prepare.json").write_text(json.dumps(report, indent=1))
        _say(summary(report))
    report = json.loads((work / "prepare.json").read_text())
    return coco, data_dir / "data.yaml", report


def stage_train(work: Path, data_yaml: Path, args: argparse.Namespace) -> dict:
    from export.train import TINY_YAML, train

    run = work / "global"
    if args.reuse and (run / "run.json").is_file():
        return json.loads((run / "run.json").read_text())
    return train(data_yaml, TINY_YAML, run, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                 seed=args.seed, device="cpu", patience=args.epochs, plots=False, prefix="[demo global]")


def stage_group(work: Path, data_yaml: Path) -> tuple[dict[str, list[str]], dict]:
    from export.evidence import compute_evidence
    from export.grouping import adjusted_rand_index, groups_to_labels, run_grouping
    from export.synth import PLANTED_GROUPS

    ev = compute_evidence(work / "global", data_yaml)
    out = {}
    result: dict[str, list[str]] = {}
    for k in (3, "auto"):
        path = work / ("groups.yaml" if k == 3 else "groups_auto.yaml")
        groups = run_grouping(out=path, k=k, evidence=ev)
        species = ev.species
        ari = adjusted_rand_index(groups_to_labels(groups, species), groups_to_labels(PLANTED_GROUPS, species))
        out[str(k)] = {"groups": groups, "ari": round(float(ari), 4)}
        _say(f"[demo] groups k={k}: ARI {ari:.3f} vs planted; " +
             "; ".join(f"{g}: {', '.join(m)}" for g, m in groups.items()))
        if k == 3:
            result = groups
    out["missed_at_conf"] = {s: int(ev.counts[i, -1]) for i, s in enumerate(ev.species)}
    out["support"] = {s: int(v) for s, v in zip(ev.species, ev.support.tolist(), strict=True)}
    return result, out


def stage_experts(work: Path, data_yaml: Path, args: argparse.Namespace) -> dict:
    from export.experts import train_experts

    out = work / "experts"
    if args.reuse and (out / "experts.json").is_file():
        return json.loads((out / "experts.json").read_text())
    return train_experts(data_yaml, work / "groups.yaml", work / "global", out, epochs=args.expert_epochs,
                         empty_ratio=args.expert_empty_ratio, imgsz=args.imgsz, batch=args.batch, seed=args.seed,
                         device="cpu", patience=args.expert_epochs, plots=False)


def _throwaway_key(keys: Path) -> Path:
    """A fresh Ed25519 pair in ``keys``; the caller signs with demo.key and then deletes it, so
    only the public half (demo.pub) survives."""
    from edge.signing import generate_keypair

    keys.mkdir(exist_ok=True)
    priv, pub = generate_keypair()
    (keys / "demo.key").write_bytes(priv)
    (keys / "demo.key").chmod(0o600)
    (keys / "demo.pub").write_bytes(pub)
    return keys / "demo.key"


def stage_bundle(work: Path, data_yaml: Path, version: str) -> tuple[Path, Path]:
    from export.bundle import build_bundle

    key = _throwaway_key(work / "keys")
    bundle = work / "bundle"
    build_bundle(global_run=work / "global", experts_dir=work / "experts", groups_file=work / "groups.yaml",
                 out=bundle, data=data_yaml, sign_key=key, version=version)  # taxonomy: from prepare's meta.json
    key.unlink()
    return bundle, key.with_name("demo.pub")


def retaxon_shipped(out: Path) -> None:
    """Give the shipped bundle's manifest the synthetic species' taxonomy and sign it again the way
    a build does (a fresh throwaway key; only demo.pub is kept), without the 22-minute rebuild.

    A full rebuild gives the same taxonomy: synth writes taxonomy.csv, prepare stores it, the bundle
    copies it. Nothing else in the manifest changes; models and samples are untouched."""
    import tempfile

    from edge.manifest import Manifest
    from edge.signing import sign
    from export import taxonomy as tx
    from export.synth import write_taxonomy

    bundle = out / "bundle"
    man = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        taxa = tx.for_classes(tx.read_taxonomy_csv(write_taxonomy(Path(tmp) / "taxonomy.csv")),
                              man.global_model.classes, "synth taxonomy")
        man = Manifest.model_validate({**man.model_dump(mode="json"), "taxonomy": tx.to_json(taxa)})
        key = _throwaway_key(Path(tmp))
        data = man.to_bytes()
        (bundle / "manifest.json").write_bytes(data)
        (bundle / "manifest.sig").write_bytes(sign(data, key.read_bytes()))
        shutil.copyfile(key.with_name("demo.pub"), out / "keys" / "demo.pub")
    build = json.loads((out / "build.json").read_text())
    build["bundle_mb"] = _size_mb(bundle)
    (out / "build.json").write_text(json.dumps(build, indent=1, sort_keys=True) + "\n")
    labels = json.loads((out / "frames" / "labels.json").read_text())
    (out / "README.md").write_text(readme(build, labels))
    _say(f"[demo] {bundle}: taxonomy for {len(taxa)} classes, signed again; {out / 'keys' / 'demo.pub'} replaced")


def _resign_shipped(out: Path, bundle: Path) -> None:
    """``bundle``'s manifest signed with a fresh throwaway key; the bundle replaces ``out``/bundle and
    its public key ``out``/keys/demo.pub (the private key never leaves a temporary folder)."""
    import tempfile

    from edge.signing import sign

    with tempfile.TemporaryDirectory() as tmp:
        key = _throwaway_key(Path(tmp))
        (bundle / "manifest.sig").write_bytes(sign((bundle / "manifest.json").read_bytes(), key.read_bytes()))
        if bundle != out / "bundle":
            shutil.rmtree(out / "bundle")
            shutil.copytree(bundle, out / "bundle")
        shutil.copyfile(key.with_name("demo.pub"), out / "keys" / "demo.pub")


def _refresh_docs(out: Path, command: str) -> None:
    """build.json's sizes and the README from the shipped bundle as it now is; ``command`` is what
    changed it (listed in the README after the build's own command)."""
    from edge.manifest import Manifest

    bundle = out / "bundle"
    man = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    build = json.loads((out / "build.json").read_text())
    build["bundle_mb"] = _size_mb(bundle)
    build["backbone_mb"] = (bundle / man.backbone.file).stat().st_size / 1e6 if man.backbone else None
    sizes = {m.name: (bundle / m.file).stat().st_size / 1e6 for m in man.models}
    for m in build["models"]:
        m["mb"] = sizes[m["name"]]
    build["cascade"] = man.cascade.model_dump(mode="json")
    build["changed_since"] = [*build.get("changed_since", []), command]
    (out / "build.json").write_text(json.dumps(build, indent=1, sort_keys=True) + "\n")
    labels = json.loads((out / "frames" / "labels.json").read_text())
    (out / "README.md").write_text(readme(build, labels))


def share_shipped(out: Path) -> None:
    """The shipped bundle of whole models -> one shared backbone + a head per model
    (``export.backbone.share_backbone``: checked against the whole models on the samples), signed
    again with a fresh throwaway key. Models, samples and expected outputs are otherwise the same."""
    import tempfile

    from export.backbone import share_backbone

    with tempfile.TemporaryDirectory() as tmp:
        report = share_backbone(out / "bundle", Path(tmp) / "bundle", public_keys=[out / "keys" / "demo.pub"],
                                require_signature=True)
        _resign_shipped(out, Path(tmp) / "bundle")
    _refresh_docs(out, f"{SCRIPT} --share-backbone")
    _say(f"[demo] {out / 'bundle'}: backbone shared by {', '.join(report['shared'])}, {report['mb_before']} MB -> "
         f"{report['mb_after']} MB, signed again; {out / 'keys' / 'demo.pub'} replaced")


def set_cascade_shipped(out: Path, settings: list[str]) -> None:
    """``KEY=VALUE`` cascade settings (edge/manifest.py CascadeSettings; ``none`` clears one) into the
    shipped manifest, validated, signed again with a fresh throwaway key."""
    import tempfile

    import yaml

    from edge.bundle import load_bundle
    from edge.manifest import Manifest

    bundle = out / "bundle"
    man = load_bundle(bundle, public_keys=[out / "keys" / "demo.pub"], require_signature=True).manifest
    cascade = man.cascade.model_dump(mode="json")
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in cascade:
            raise SystemExit(f"--cascade {item!r}: want KEY=VALUE with KEY one of {', '.join(sorted(cascade))}")
        cascade[key] = None if value.lower() in ("none", "null") else yaml.safe_load(value)
    man = Manifest.model_validate({**man.model_dump(mode="json"), "cascade": cascade})
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(bundle, Path(tmp) / "bundle")
        (Path(tmp) / "bundle" / "manifest.json").write_bytes(man.to_bytes())
        _resign_shipped(out, Path(tmp) / "bundle")
    _refresh_docs(out, f"{SCRIPT} --cascade {' '.join(settings)}")
    _say(f"[demo] {bundle}: cascade {cascade}, signed again; {out / 'keys' / 'demo.pub'} replaced")


CALIB_SEED, CALIB_IMAGES, CALIB_TEST, CALIB_VAL = 1, 4000, ["L2", "L3", "L4", "L5", "L6", "L7"], ["L1"]


def calibration_data(work: Path) -> Path:
    """Frames the demo models never saw, for `calibrate`: synth seed 1 (the build uses seed 0),
    4000 images, prepared with L2-L7 as test and L1 as val (about 3 minutes). Returns data.yaml."""
    from export.datasets import prepare
    from export.synth import synthesize

    coco = synthesize(work / "calib-synth", seed=CALIB_SEED, n_images=CALIB_IMAGES, size=(320, 240), n_locations=8,
                      overwrite=True)
    prepare(work / "calib-data", coco=coco, test_locations=CALIB_TEST, val_locations=CALIB_VAL, seed=CALIB_SEED,
            link="hardlink", overwrite=True)
    return work / "calib-data" / "data.yaml"


def calibrate_shipped(out: Path, data: Path, confidence: float = 0.95) -> None:
    """`camtrap-export calibrate` on the shipped bundle (test split of ``data``, within 0.5 points of
    animal recall at ``confidence``): the gate and its provenance into the manifest, which is then
    signed again with a fresh throwaway key."""
    import tempfile

    from edge.bundle import load_bundle
    from edge.manifest import Manifest
    from export.calibrate import calibrate, describe

    load_bundle(out / "bundle", public_keys=[out / "keys" / "demo.pub"], require_signature=True)  # verified first
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(out / "bundle", copy)
        (copy / "manifest.sig").unlink()  # signed again below, with the new key
        report = calibrate(copy, data, split="test", confidence=confidence)
        man = json.loads((copy / "manifest.json").read_text())  # what the data is, not where it lay
        man["provenance"]["gate_calibration"]["data"] = (
            f"export.synth seed {CALIB_SEED}, {CALIB_IMAGES} images 320x240, 8 locations; prepare test_locations "
            f"{CALIB_TEST[0]}-{CALIB_TEST[-1]}, val {CALIB_VAL[0]} (scripts/build_demo_bundle.py calibration_data)")
        (copy / "manifest.json").write_bytes(Manifest.model_validate(man).to_bytes())
        _resign_shipped(out, copy)
    _refresh_docs(out, f"{SCRIPT} --calibrate  # synth seed {CALIB_SEED}, {CALIB_IMAGES} images, test "
                  f"{CALIB_TEST[0]}-{CALIB_TEST[-1]}; confidence {confidence}")
    for line in describe(report):
        _say(f"[demo] {line}")


def _truth(coco: Path) -> dict[str, dict]:
    """COCO CT -> {file_name: {species, boxes, empty, ir, location, datetime, seq_id}} for test locations."""
    d = json.loads(coco.read_text())
    cats = {c["id"]: c["name"] for c in d["categories"]}
    out: dict[str, dict] = {}
    for im in d["images"]:
        if im["location"] in TEST_LOCATIONS:
            out[im["id"]] = {"file_name": im["file_name"], "location": im["location"], "seq_id": im["seq_id"],
                             "datetime": im["datetime"], "ir": bool(im.get("ir")), "width": im["width"],
                             "height": im["height"], "species": [], "boxes": []}
    for a in d["annotations"]:
        t = out.get(a["image_id"])
        if t is None or a["category_id"] == 0:
            continue
        t["species"].append(cats[a["category_id"]])
        t["boxes"].append([round(float(v), 2) for v in a["bbox"]])
    for t in out.values():
        t["empty"] = not t["species"]
    return out


def stage_frames(coco: Path, bundle_dir: Path, pub: Path, n_animals: int, n_empty: int) -> tuple[list[dict], dict]:
    """Run the signed bundle over every held-out test frame; pick frames it handles correctly.

    Picked: animals of as many species as possible (every group first, one IR frame among them),
    each a frame where the cascade names the true species; empties where it sees nothing. The
    cascade's test-split scores are returned too, so the README says how often it is right.
    """
    import cv2

    from edge.bundle import load_bundle
    from edge.engines import load_engines
    from edge.runner import CascadeRunner

    truth = _truth(coco)
    b = load_bundle(bundle_dir, public_keys=[pub], require_signature=True)
    engines = load_engines(b, "onnxruntime")
    runner = CascadeRunner(b.manifest, engines)
    rows = []
    try:
        keys = sorted(truth)
        for i in range(0, len(keys), 8):
            chunk = keys[i:i + 8]
            imgs = [cv2.imread(str(coco.parent / truth[k]["file_name"])) for k in chunk]
            for k, res in zip(chunk, runner.classify(imgs), strict=True):
                d = res.decision
                rows.append({"id": k, **truth[k], "pred_empty": d.empty, "pred_species": sorted(d.counts),
                             "route": d.route.reason, "top": d.top[0], "top_score": round(d.top[1], 4)})
    finally:
        for e in engines.values():
            e.close()
    animals = [r for r in rows if not r["empty"]]
    empties = [r for r in rows if r["empty"]]
    stats = {
        "test_frames": len(rows), "animal_frames": len(animals), "empty_frames": len(empties),
        "animal_frames_detected": sum(not r["pred_empty"] for r in animals),
        "animal_frames_species_right": sum(r["top"] in r["species"] for r in animals),
        "empty_frames_kept_empty": sum(r["pred_empty"] for r in empties),
        "routes": {k: sum(r["route"] == k for r in rows) for k in sorted({r["route"] for r in rows})},
    }
    # candidates: single-species frames named right, one per burst
    good = [r for r in animals if len(set(r["species"])) == 1 and r["pred_species"] == sorted(set(r["species"]))]
    from export.synth import GROUP_OF

    picked: list[dict] = []
    seqs: set[str] = set()

    def take(r: dict) -> None:
        picked.append(r)
        seqs.add(r["seq_id"])

    want_ir = [r for r in good if r["ir"]]
    if want_ir:
        take(max(want_ir, key=lambda r: r["top_score"]))
    by_species: dict[str, list[dict]] = {}
    for r in sorted(good, key=lambda r: -r["top_score"]):
        by_species.setdefault(r["species"][0], []).append(r)
    order = sorted(by_species, key=lambda s: (GROUP_OF[s], s))
    # round robin over groups so every group is shown before a second species of one group
    groups_seen = {GROUP_OF[r["species"][0]] for r in picked}
    for pass_ in (0, 1):
        for s in order:
            if len(picked) >= n_animals:
                break
            if any(p["species"][0] == s for p in picked):
                continue
            if pass_ == 0 and GROUP_OF[s] in groups_seen:
                continue
            cand = [r for r in by_species[s] if r["seq_id"] not in seqs]
            if cand:
                take(cand[0])
                groups_seen.add(GROUP_OF[s])
    good_empty = [r for r in empties if r["pred_empty"] and r["seq_id"] not in seqs]
    ir_empty = [r for r in good_empty if r["ir"]][:1]
    day_empty = [r for r in good_empty if not r["ir"]]
    chosen_empty: list[dict] = []
    for r in ir_empty + day_empty:
        if len(chosen_empty) < n_empty and r["seq_id"] not in {c["seq_id"] for c in chosen_empty}:
            chosen_empty.append(r)
    return picked + chosen_empty, stats


def write_output(out: Path, bundle: Path, pub: Path, coco: Path, frames: list[dict], build: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("bundle", "frames", "keys"):
        shutil.rmtree(out / sub, ignore_errors=True)
    shutil.copytree(bundle, out / "bundle")
    (out / "keys").mkdir()
    shutil.copyfile(pub, out / "keys" / "demo.pub")
    (out / "frames").mkdir()
    labels = {}
    for r in frames:
        name = f"{r['location']}_{Path(r['file_name']).name}"
        shutil.copyfile(coco.parent / r["file_name"], out / "frames" / name)
        labels[name] = {k: r[k] for k in ("species", "boxes", "empty", "ir", "location", "seq_id", "datetime",
                                          "width", "height")}
        labels[name]["source"] = r["file_name"]
        labels[name]["bbox_format"] = "COCO [x, y, width, height] in pixels"
    (out / "frames" / "labels.json").write_text(json.dumps(labels, indent=1, sort_keys=True) + "\n")
    (out / "build.json").write_text(json.dumps(build, indent=1, sort_keys=True) + "\n")
    (out / "README.md").write_text(readme(build, labels))


def _layout(b: dict) -> str:
    if not b.get("backbone_mb"):
        return "models/*.onnx (global + one expert per group, whole)"
    return (f"models/backbone.onnx\n  (layers 0-9, shared by every model and run once per batch, "
            f"{b['backbone_mb']:.2f} MB) + models/heads/*.onnx\n  (global + one expert per group: the layers "
            "after the backbone; `camtrap-export whole-models`\n  merges them back into whole models)")


def _later(b: dict) -> str:
    if not b.get("changed_since"):
        return ""
    cmds = "\n".join(f"    {c}" for c in b["changed_since"])
    return f"\nChanged since, each time signed again with a fresh throwaway key:\n\n{cmds}\n"


def readme(b: dict, labels: dict) -> str:
    g = b["grouping"]
    models = "\n".join(f"| {m['name']} | {m['role']} | {', '.join(m['classes'])} | {m['mAP50']:.3f} | {m['mb']:.2f} |"
                       for m in b["models"])
    frames = "\n".join(f"| {n} | {', '.join(v['species']) or 'empty'} | {'IR' if v['ir'] else 'day'} |"
                       for n, v in sorted(labels.items()))
    fs = b["frames_stats"]
    return f"""# The demo bundle

A small, signed model bundle shipped with the package so that `camtrap-edge demo`, `camtrap-edge
selftest --bundle edge/demo/bundle` and the tests run without any training or download. It is a
toy: tiny models (camtrap-tiny.yaml, ~0.9 M parameters each, {b['imgsz']} px) trained on synthetic
scenes (`camtrap-export synth`). Its accuracy says nothing about real camera-trap images.

- `bundle/`: manifest.json, manifest.sig (Ed25519), {_layout(b)}, samples/ for the self-test.
  Bundle version {b['bundle_version']}, {b['bundle_mb']:.2f} MB.
- `keys/demo.pub`: the public key that verifies manifest.sig. The private key was generated for
  this build and thrown away; never trust this key on a real device.
- `frames/`: {len(labels)} held-out test frames (locations {', '.join(b['test_locations'])}, never seen in
  training) and `labels.json`, their ground truth copied from the synthetic COCO JSON.
- `build.json`: every number below, machine-readable.

## How it was made

    {b['command']}

On 2 CPU cores (shared with other jobs) this took {b['minutes']:.1f} minutes. Steps: synth {b['images']} images
{b['size']} (seed {b['seed']}, 8 locations) -> prepare (test = {', '.join(b['test_locations'])}; val by sequence) ->
global model {b['epochs']} epochs -> grouping (k=3) -> experts ({b['expert_epochs']} epochs each, layers
0-9 frozen = the global backbone) -> `export.bundle.build_bundle` (ONNX opset 17, PyTorch parity
check, signed). The manifest names each class's taxon (scientific and vernacular name, rank),
from the taxonomy.csv synth writes and prepare stores with the dataset.
{_later(b)}
## Measured

| model | role | classes | val mAP50 | MB |
|---|---|---|---|---|
{models}

Grouping on the validation split (hard counts at conf 0.25 + soft class scores):
k=3 gives {'; '.join(f'{k}: {", ".join(v)}' for k, v in g['3']['groups'].items())}
(adjusted Rand index {g['3']['ari']} against the planted groups); k=auto gives
{len(g['auto']['groups'])} groups (ARI {g['auto']['ari']}).

The cascade over all {fs['test_frames']} held-out test frames: {fs['animal_frames_detected']} of
{fs['animal_frames']} animal frames detected, {fs['animal_frames_species_right']} with the right top
species; {fs['empty_frames_kept_empty']} of {fs['empty_frames']} empty frames left empty; routes
{', '.join(f'{k} {v}' for k, v in fs['routes'].items())}.

## The demo frames

Chosen by the script among the held-out frames the bundle handles correctly (species named
right, empties left empty), so the demo shows the mechanics rather than the error rate above:

| file | truth | light |
|---|---|---|
{frames}

## License

Synthetic images and models made by this project's own code from a fixed seed; no third-party
data. Same license as the project (AGPL-3.0-or-later).
"""


# ---------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/demo-build"), help="scratch folder (outside the repo)")
    p.add_argument("--out", type=Path, default=REPO / "edge" / "demo", help="where the result lands")
    p.add_argument("--images", type=int, default=1600)
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(320, 240))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=70, help="global model epochs")
    p.add_argument("--expert-epochs", type=int, default=15)
    p.add_argument("--expert-empty-ratio", type=float, default=1.0,
                   help="empty frames per group image in each expert's data (default 1.0: keeps experts fast)")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=5, help="animal frames to ship (plus 3 empty ones)")
    p.add_argument("--version", default="demo-1")
    p.add_argument("--reuse", action="store_true", help="keep finished stages found in --work")
    p.add_argument("--retaxon", action="store_true",
                   help="only put the synthetic taxonomy into the shipped manifest (--out) and sign it again")
    p.add_argument("--share-backbone", action="store_true",
                   help="only split the shipped bundle's whole models into a shared backbone + heads, signed again")
    p.add_argument("--calibrate", action="store_true",
                   help="only calibrate the shipped bundle's gate (camtrap-export calibrate on synth seed 1, made in "
                   "--work unless --calibrate-data) and sign it again")
    p.add_argument("--calibrate-data", type=Path, help="with --calibrate: a data.yaml made as calibration_data() does")
    p.add_argument("--cascade", nargs="+", metavar="KEY=VALUE",
                   help="only set these cascade settings in the shipped manifest and sign it again")
    args = p.parse_args(argv)
    if args.retaxon:
        retaxon_shipped(args.out)
        return 0
    if args.share_backbone:
        share_shipped(args.out)
        return 0
    if args.cascade:
        set_cascade_shipped(args.out, args.cascade)
        return 0
    if args.calibrate:
        args.work.mkdir(parents=True, exist_ok=True)
        calibrate_shipped(args.out, args.calibrate_data or calibration_data(args.work.resolve()))
        return 0
    work = args.work.resolve()
    if work.is_relative_to(REPO):
        raise SystemExit(f"--work {work} lies inside the repository; use a scratch folder")
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    coco, data_yaml, prep = stage_data(work, args)
    t_data = time.monotonic()
    run = stage_train(work, data_yaml, args)
    t_train = time.monotonic()
    _say(f"[demo] global: mAP50 {run['metrics']['mAP50']} after {run['metrics']['epochs_run']} epochs "
         f"({(t_train - t_data) / 60:.1f} min)")
    groups, grouping = stage_group(work, data_yaml)
    experts = stage_experts(work, data_yaml, args)
    t_exp = time.monotonic()
    bundle, pub = stage_bundle(work, data_yaml, args.version)
    frames, stats = stage_frames(coco, bundle, pub, args.frames, 3)
    minutes = (time.monotonic() - t0) / 60

    from edge.manifest import Manifest

    man = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    maps = {"global": run["metrics"]["mAP50"], **{g: e["mAP50"] for g, e in experts["experts"].items()}}
    cmd = "/work/main/.venv/bin/python scripts/build_demo_bundle.py" + (
        "" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        cmd += " " + " ".join(sys.argv[1:])
    build = {
        "command": cmd, "minutes": round(minutes, 1), "images": args.images,
        "size": f"{args.size[0]}x{args.size[1]}", "seed": args.seed, "epochs": args.epochs,
        "expert_epochs": args.expert_epochs, "imgsz": args.imgsz, "test_locations": TEST_LOCATIONS,
        "bundle_version": man.bundle_version,
        "minutes_by_stage": {"data": round((t_data - t0) / 60, 1), "global": round((t_train - t_data) / 60, 1),
                             "group+experts": round((t_exp - t_train) / 60, 1),
                             "bundle+frames": round((time.monotonic() - t_exp) / 60, 1)},
        "splits": {s: {k: prep["splits"][s][k] for k in ("images", "empty_frac", "locations")}
                   for s in prep["splits"]},
        "global_metrics": run["metrics"] | {"epoch_seconds": None},
        "experts": {g: {"species": e["species"], "mAP50": e["mAP50"], "backbone_identical": e["identical"]}
                    for g, e in experts["experts"].items()},
        "grouping": grouping,
        "models": [{"name": m.name, "role": m.role, "classes": m.classes, "mAP50": maps.get(m.name),
                    "mb": (bundle / m.file).stat().st_size / 1e6} for m in man.models],
        "bundle_mb": _size_mb(bundle),
        "backbone_mb": (bundle / man.backbone.file).stat().st_size / 1e6 if man.backbone else None,
        "frames_stats": stats,
        "frames": [{"file": f"{r['location']}_{Path(r['file_name']).name}", "species": r["species"],
                    "predicted": r["pred_species"], "route": r["route"], "ir": r["ir"]} for r in frames],
    }
    write_output(args.out, bundle, pub, coco, frames, build)
    _say(f"[demo] done in {minutes:.1f} min -> {args.out}")
    _say(f"  global mAP50 {run['metrics']['mAP50']}; experts " +
         ", ".join(f"{g} {e['mAP50']}" for g, e in experts["experts"].items()))
    _say(f"  groups (k=3, ARI {grouping['3']['ari']}): " + "; ".join(f"{g}: {', '.join(m)}" for g, m in groups.items()))
    _say(f"  k=auto: {len(grouping['auto']['groups'])} groups, ARI {grouping['auto']['ari']}")
    _say(f"  bundle {build['bundle_mb']:.2f} MB: " + ", ".join(f"{m['name']} {m['mb']:.2f}" for m in build["models"]))
    _say(f"  test frames: {stats}")
    _say(f"  shipped frames: {[(f['file'], f['species'], f['predicted']) for f in build['frames']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
