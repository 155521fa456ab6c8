"""Write (and sign) the model bundle the device runs: ONNX models, manifest, samples.

`camtrap-export bundle` exports every model to ONNX, checks each against PyTorch, picks a
few sample images from the dataset and records what every model outputs on them (the
device's self-test compares against these), then writes manifest.json and, with --sign,
an Ed25519 signature over its exact bytes. No pickle enters a bundle.
`camtrap-export keygen` makes the key pair.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from edge.atomic import building
from edge.hashing import sha256_file
from edge.manifest import CascadeSettings, Manifest, ModelEntry, SampleEntry, species_codes
from export.backbone import NoBackbone
from export.datasets import DATASET_HASH_KEY, class_names, recorded_dataset_hash

log = logging.getLogger(__name__)
PARITY_IMAGES = 8  # images holding the model's species, beside the samples, for the ONNX-vs-PyTorch check

# The paper's species codes (Table 3) win where a species name matches.
PAPER_CODES = {
    "Bos taurus": "bos", "Capra pyrenaica": "capi", "Cervus elaphus": "cer", "Dama dama": "dam",
    "Equus caballus": "equ", "Felis silvestris": "fsi", "Genetta genetta": "gen",
    "Herpestes ichneumon": "her",
    "Lepus granatensis": "lep", "Lynx pardinus": "lyn", "Martes foina": "mafo", "Meles meles": "mel",
    "Oryctolagus cuniculus": "ory", "Ovis aries": "ovar", "Ovis orientalis": "ovor", "Rattus rattus": "rara",
    "Sus scrofa": "sus", "Vulpes vulpes": "vul", "Capreolus capreolus": "caca", "Canis familiaris": "can",
    "Canis lupus": "can", "Felis catus": "fel", "Mustela": "mus", "Lutra lutra": "lut",
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _imread(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise ValueError(f"{path}: unreadable image")
    return img


def _weights(run: Path) -> Path:
    for p in (run / "weights" / "best.pt", run / "weights" / "last.pt", run):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{run}: no weights/best.pt (is this a training run folder?)")


def _images_for_samples(data_yaml: Path | None, n: int) -> list[Path]:
    """A few val/test images for the self-test: animals first, at least one empty."""
    if data_yaml is None:
        return []
    d = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(d.get("path") or Path(data_yaml).parent)
    picked: list[Path] = []
    empties: list[Path] = []
    for split in ("test", "val"):
        if not d.get(split):
            continue
        img_dir = root / d[split]
        for img in sorted(img_dir.glob("*")):
            lbl = root / "labels" / split / (img.stem + ".txt")
            has = lbl.is_file() and lbl.read_text().strip() != ""
            (picked if has else empties).append(img)
        if len(picked) >= n:
            break
    return picked[: max(n - 1, 1)] + empties[:1]


def _images_of(data_yaml: Path | None, classes: list[str], n: int) -> list[Path]:
    """Up to ``n`` val/test (then train) images holding any of ``classes``: the parity check's images
    for a model (an expert's group species), so that it compares detections, not empty outputs."""
    if data_yaml is None:
        return []
    d = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(d.get("path") or Path(data_yaml).parent)
    names = class_names(d.get("names"), data_yaml)
    wanted = {i for i, name in enumerate(names) if name in set(classes)}
    found: list[Path] = []
    for split in ("test", "val", "train"):
        if not isinstance(d.get(split), str) or not (root / d[split]).is_dir():
            continue
        for img in sorted((root / d[split]).glob("*")):
            lbl = root / "labels" / split / (img.stem + ".txt")
            if lbl.is_file() and any(int(line.split()[0]) in wanted for line in lbl.read_text().splitlines()
                                     if line.strip()):
                found.append(img)
                if len(found) >= n:
                    return found
    return found


def _run_onnx(path: Path, entry: ModelEntry, images: list[np.ndarray]) -> list[list[dict]]:
    """Reference outputs with ONNX Runtime on the CPU and the device's own decoder."""
    import onnxruntime as ort

    from edge.vision import decode, letterbox

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    thresholds = {c: entry.threshold(c) for c in entry.classes}
    for img in images:
        x, lb = letterbox(img, entry.imgsz)
        raw = sess.run(None, {name: x[None]})[0][0]
        dets = decode(raw, entry.layout, entry.classes, lb, conf=thresholds, iou=entry.iou_threshold,
                      model=entry.name)
        out.append([d.to_dict() for d in dets])
    return out


def _frozen_layers(meta: dict) -> int:
    """Layers shared with the global backbone: run.json's freeze, expert.json's frozen.freeze, or the
    freeze the experts used on a global model trained whole."""
    for v in (meta.get("shared_freeze"), (meta.get("frozen") or {}).get("freeze"), meta.get("freeze"),
              meta.get("frozen_layers")):
        if v:
            return int(v)
    return 0


def build_bundle(*, global_run: Path, experts_dir: Path, groups_file: Path, out: Path,
                 data: Path | None = None, sign_key: Path | None = None, version: str | None = None,
                 n_samples: int = 4, conf: float = 0.25, parity: bool = True,
                 taxonomy: Path | None = None, imgsz: int | tuple[int, int] | None = None,
                 whole_models: bool = False) -> Manifest:
    """``taxonomy``: a taxonomy CSV (export/taxonomy.py); default: the one `prepare` stored with
    the dataset. The manifest then names the taxon of every class (records, displays).
    ``imgsz``: every model's input, a side or (height, width) (default: each run's training size);
    (480, 640) fits 4:3 and 3:2 cameras on 0.75x the pixels of the 640 px square, same answers.

    By default the bundle shares the backbone (export/backbone.py): the whole models are exported
    and checked first, then split into one backbone and a head per model whose frozen layers are
    the global model's; a model whose frozen layers differ stays whole. When nothing can be shared
    (no frozen layers, or no expert with the global's) the bundle is the whole models.
    ``whole_models=True`` opts out: whole models only, as before.
    """
    if whole_models:
        return _build_whole(global_run=global_run, experts_dir=experts_dir, groups_file=groups_file, out=out,
                            data=data, sign_key=sign_key, version=version, n_samples=n_samples, conf=conf,
                            parity=parity, taxonomy=taxonomy, imgsz=imgsz)
    from export.backbone import share_backbone

    whole = out.parent / f"{out.name}.whole-{os.getpid()}"
    try:
        _build_whole(global_run=global_run, experts_dir=experts_dir, groups_file=groups_file, out=whole,
                     data=data, sign_key=None, version=version, n_samples=n_samples, conf=conf, parity=parity,
                     taxonomy=taxonomy, imgsz=imgsz)
        why = None
        try:
            report = share_backbone(whole, out, sign_key)
            if len(report["shared"]) < 2:
                why = f"no expert shares the global model's frozen layers ({report['whole']})"
        except NoBackbone as e:
            why = str(e)
        if why is not None:
            log.warning("bundle %s: whole models (%s)", out, why)
            with building(out) as tmp:
                shutil.copytree(whole, tmp, dirs_exist_ok=True)
                if sign_key is not None:
                    from edge.signing import sign

                    (tmp / "manifest.sig").write_bytes(sign((tmp / "manifest.json").read_bytes(),
                                                           Path(sign_key).read_bytes()))
    finally:
        shutil.rmtree(whole, ignore_errors=True)
    return Manifest.from_bytes((out / "manifest.json").read_bytes())


def _build_whole(*, global_run: Path, experts_dir: Path, groups_file: Path, out: Path,
                 data: Path | None, sign_key: Path | None, version: str | None,
                 n_samples: int, conf: float, parity: bool, taxonomy: Path | None,
                 imgsz: int | tuple[int, int] | None) -> Manifest:
    """The bundle of whole models: export, parity against PyTorch, samples, manifest, signature."""
    from export import taxonomy as tx
    from export.grouping import read_groups
    from export.onnx import export_onnx, parity_check

    groups = read_groups(groups_file)
    run_meta = _read_json(global_run / "run.json")
    if data is None and run_meta.get("args", {}).get("data"):
        data = Path(run_meta["args"]["data"])
    taxa = tx.read_taxonomy_csv(taxonomy) if taxonomy is not None else tx.dataset_taxonomy(data)
    with building(out) as tmp:
        (tmp / "models").mkdir()
        (tmp / "samples").mkdir()
        sample_paths = _images_for_samples(data, n_samples)
        sample_imgs = [_imread(p) for p in sample_paths]
        # the experts' summary knows the global backbone's hash and frozen depth (shared-backbone runtime)
        shared = _read_json(experts_dir / "experts.json").get("global", {})
        global_meta = {**run_meta, "shared_freeze": shared.get("freeze"),
                       "backbone_sha256": run_meta.get("backbone_sha256") or shared.get("backbone_sha256")}
        plan: list[tuple[str, str, str | None, Path, dict]] = [
            ("global", "global", None, global_run, global_meta)]
        for g in groups:
            edir = experts_dir / g
            if not edir.is_dir():
                raise FileNotFoundError(f"{experts_dir}: no expert for group {g!r} (expected {edir})")
            # export.experts writes <group>/expert.json beside the training run <group>/run/
            erun = edir / "run" if (edir / "run" / "weights").is_dir() else edir
            plan.append((g, "expert", g, erun, _read_json(edir / "expert.json")))
        entries: list[ModelEntry] = []
        provenance: dict = {"models": {}}
        for name, role, group, run, meta in plan:
            w = _weights(run)
            exp = export_onnx(w, tmp / "models" / f"{name}.onnx", imgsz=imgsz)
            if parity:
                own = [_imread(p) for p in _images_of(data, exp.classes, PARITY_IMAGES)]
                parity_check(w, exp, sample_imgs + own, conf=conf)
            entries.append(ModelEntry(
                name=name, file=f"models/{name}.onnx", sha256=sha256_file(exp.onnx_path), role=role,
                group=group, classes=exp.classes, imgsz=exp.imgsz, layout=exp.layout, conf_threshold=conf,
                frozen_layers=_frozen_layers(meta),
                backbone_sha256=meta.get("backbone_sha256"),
            ))
            kept = {k: meta[k] for k in ("args", "metrics") if k in meta}
            if recorded_dataset_hash(meta):
                kept[DATASET_HASH_KEY] = recorded_dataset_hash(meta)
            provenance["models"][name] = {"weights": str(w), "parity": exp.parity, **kept}
        species = entries[0].classes
        if taxa:
            taxa = tx.for_classes(taxa, species, taxonomy or data or "taxonomy")
        else:
            log.warning("bundle %s: no taxonomy (give --taxonomy CSV, or prepare --taxonomy): the manifest "
                        "names no taxa, so Camtrap DP records leave scientificName empty", out)
        samples: list[dict[str, Any]] = []
        for p in sample_paths:
            shutil.copyfile(p, tmp / "samples" / p.name)
            samples.append({"file": f"samples/{p.name}", "sha256": sha256_file(tmp / "samples" / p.name),
                            "expected": {}})
        for e in entries:
            for s, dets in zip(samples, _run_onnx(tmp / e.file, e, sample_imgs), strict=True):
                s["expected"][e.name] = dets
        manifest = Manifest(
            bundle_version=version or dt.datetime.now(dt.timezone.utc).strftime("%Y.%m.%d.%H%M"),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            models=entries, groups=groups, codes=species_codes(species, PAPER_CODES),
            cascade=CascadeSettings(route_threshold=conf),
            samples=[SampleEntry(**s) for s in samples],
            provenance={**provenance, DATASET_HASH_KEY: recorded_dataset_hash(run_meta),
                        "data": str(data or "")},
            taxonomy=taxa,
        )
        (tmp / "manifest.json").write_bytes(manifest.to_bytes())
        if sign_key is not None:
            from edge.signing import sign

            (tmp / "manifest.sig").write_bytes(sign(manifest.to_bytes(), Path(sign_key).read_bytes()))
    log.info("bundle %s written: %d models, %d samples%s", out, len(entries), len(samples),
             ", signed" if sign_key else "")
    return manifest


def _cmd_bundle(args: argparse.Namespace) -> int:
    m = build_bundle(global_run=Path(args.global_run), experts_dir=Path(args.experts),
                     groups_file=Path(args.groups), out=Path(args.out),
                     data=Path(args.data) if args.data else None,
                     sign_key=Path(args.sign) if args.sign else None, version=args.version,
                     n_samples=args.samples, conf=args.conf, parity=not args.no_parity,
                     taxonomy=Path(args.taxonomy) if args.taxonomy else None, imgsz=args.imgsz,
                     whole_models=args.whole_models)
    heads = [e.name for e in m.models if e.head_inputs]
    how = (f"shared backbone (layers 0-{m.backbone.frozen_layers - 1}) + heads {heads}" if m.backbone is not None
           else "whole models")
    whole = [e.name for e in m.models if not e.head_inputs]
    print(f"bundle {args.out}: version {m.bundle_version}, {how}"
          f"{f', whole {whole}' if m.backbone is not None and whole else ''}; models {[e.name for e in m.models]}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from edge.keys import KEY_SUFFIX, SYSTEM_KEYS_DIR, user_keys_dir
    from edge.signing import generate_keypair, key_id

    priv, pub = generate_keypair()
    base = Path(args.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    key, pubf = base.with_suffix(".key"), base.with_suffix(".pub")
    if key.exists() and not args.force:
        raise ValueError(f"{key}: exists (use --force to replace a signing key)")
    key.write_bytes(priv)
    key.chmod(0o600)
    pubf.write_bytes(pub)
    print(f"private key {key} (keep it off the devices), public key {pubf} (install on devices, in {SYSTEM_KEYS_DIR})")
    if not args.no_trust:
        trusted = user_keys_dir() / f"{key_id(pub)}{KEY_SUFFIX}"
        trusted.parent.mkdir(parents=True, exist_ok=True)
        trusted.write_bytes(pub)
        print(f"trusted here: {trusted} (evaluate, classify and selftest check bundles against it)")
    return 0


def _input_size_arg(text: str) -> int | tuple[int, int]:
    """``640`` or ``480,640`` (height, width) for --imgsz."""
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0 or any(v % 32 for v in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give a side (640) or HEIGHT,WIDTH (480,640), multiples of 32")
    return parts[0] if len(parts) == 1 or parts[0] == parts[1] else (parts[0], parts[1])


def add_cli(sub) -> None:
    from edge.cli import number_in

    p = sub.add_parser("bundle", help="export models to ONNX and write a (signed) bundle")
    p.add_argument("--global", dest="global_run", required=True, help="global model run folder")
    p.add_argument("--experts", required=True, help="folder with one expert run per group")
    p.add_argument("--groups", required=True, help="groups.yaml")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--data", help="data.yaml to take sample images from (default: the global run's)")
    p.add_argument("--sign", help="Ed25519 private key (PEM) from `camtrap-export keygen`")
    p.add_argument("--version", help="bundle version (default: UTC date)")
    p.add_argument("--samples", type=int, default=4, help="sample images for the device self-test")
    p.add_argument("--conf", type=number_in(0, 1), default=0.25, help="default per-class threshold")
    p.add_argument("--no-parity", action="store_true", help="skip the PyTorch/ONNX parity check")
    p.add_argument("--imgsz", type=_input_size_arg, help="every model's input: a side (640) or HEIGHT,WIDTH "
                   "(480,640: a 4:3 or 3:2 camera's frame on 0.75x the pixels of the square; multiples of 32). "
                   "Default: each model's training size")
    p.add_argument("--whole-models", action="store_true",
                   help="store every model whole (default: the frozen layers the models share are stored and "
                   "run once, as `share-backbone` does; a model whose frozen layers differ stays whole)")
    p.add_argument("--taxonomy", help="taxonomy CSV (docs/taxonomy.md; default: the one prepare stored "
                   "with the dataset)")
    p.set_defaults(func=_cmd_bundle)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    k.add_argument("--out", required=True, help="path prefix: writes PREFIX.key and PREFIX.pub")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    k.add_argument("--no-trust", action="store_true",
                   help="do not copy the public key into the user keys folder (trusted by default on this machine)")
    k.set_defaults(func=_cmd_keygen)
