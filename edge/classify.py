"""`camtrap-edge classify`: batch mode over files and folders -> MegaDetector batch output 1.6.

The same bundle, engines, decoder and cascade as the daemon, without the watch folder: for
a card carried home, or to check a bundle on a workstation. Unreadable images are recorded
as ``failure`` entries, never dropped, so the output accounts for every input file.

File names in the output are relative to an image root, as MegaDetector and Timelapse expect
(Timelapse opens the results file from the root folder): ``--relative-to`` when given, else the
deepest folder that holds every input (``image_root``). The command prints the root.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge.cli import int_at_least
from edge.keys import add_trust_options, describe, trust_from_args

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def iter_images(paths: Iterable[str | Path], recursive: bool = True) -> Iterator[Path]:
    """Image files named directly, or found in the folders named (sorted, hidden files skipped)."""
    for p in map(Path, paths):
        if p.is_dir():
            found = p.rglob("*") if recursive else p.glob("*")
            for f in sorted(found):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    yield f
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")


def image_root(paths: Iterable[str | Path]) -> Path:
    """The deepest folder holding every input: a folder argument counts as itself, a file as its folder."""
    dirs = [str(p.resolve() if p.is_dir() else p.absolute().parent.resolve()) for p in map(Path, paths)]
    if not dirs:
        raise ValueError("classify: no input paths")
    return Path(os.path.commonpath(dirs))


def relative_name(f: Path, root: Path) -> str:
    """``f`` as a forward-slash path under ``root``; one clear error when it lies outside."""
    try:  # where the file sits, not where a symlink leads (a link to elsewhere keeps its own name)
        return (f.parent.resolve() / f.name).relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"{f}: not under the image root {root} (--relative-to)") from None


def classify_paths(paths: Iterable[str | Path], bundle_path: str | Path, out: str | Path, *,
                   backend: str = "onnxruntime", batch: int = 4, public_keys=None,
                   require_signature: bool = False, relative_to: str | Path | None = None) -> dict:
    """Classify every image under ``paths`` into the MD batch file ``out``; returns counts.

    Files are named relative to ``relative_to`` (default: ``image_root(paths)``)."""
    from edge.bundle import load_bundle
    from edge.engines import load_engines
    from edge.imageio import ImageError, read_image
    from edge.records.megadetector import MdBatchWriter
    from edge.runner import CascadeRunner

    paths = list(paths)
    files = list(iter_images(paths))
    root = Path(relative_to).resolve() if relative_to is not None else image_root(paths)
    names = {f: relative_name(f, root) for f in files}  # every file checked before any work
    out = Path(out)
    if batch < 1:
        raise ValueError(f"batch: {batch} images per batch; give 1 or more")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; --out names the results JSON file to write")
    with tempfile.TemporaryDirectory(prefix="camtrap-bundle-") as tmp:
        bundle = load_bundle(bundle_path, public_keys=public_keys, require_signature=require_signature,
                             extract_to=tmp)
        man = bundle.manifest
        engines = load_engines(bundle, backend)
        # a fresh run (MdBatchWriter would otherwise resume the old file), and only once the bundle
        # and its engines loaded: a bad bundle or backend leaves the previous results in place
        MdBatchWriter.discard(out)
        runner = CascadeRunner(man, engines)
        writer = MdBatchWriter(out, detector=f"{man.global_model.name}@{man.bundle_version}",
                               classifier=f"cascade@{man.bundle_version}", species=man.global_model.classes,
                               typical_threshold=man.cascade.route_threshold,
                               model_classes={m.name: m.classes for m in man.models},
                               flush_every=max(20, batch))
        counts: dict[str, Any] = {"images": 0, "animals": 0, "empty": 0, "failed": 0, "bundle": man.bundle_version,
                  "key_id": bundle.key_id, "image_root": str(root)}
        t = time.monotonic()
        try:
            for k in range(0, len(files), batch):
                chunk, loaded = [], []
                for f in files[k:k + batch]:
                    try:
                        loaded.append(read_image(f, max_side=runner.input_side))
                        chunk.append(f)
                    except ImageError as e:
                        log.warning("%s", e)
                        writer.add(names[f], failure=e.reason)
                        counts["failed"] += 1
                for f, img, res in zip(chunk, loaded, runner.classify([i.bgr for i in loaded]), strict=True):
                    s = img.scale or 1.0
                    dets = [replace(d, box=(d.box[0] / s, d.box[1] / s, d.box[2] / s, d.box[3] / s))
                            for d in res.decision.detections]
                    writer.add(names[f], dets, image_size=img.orig_size)
                    counts["animals" if dets else "empty"] += 1
                counts["images"] += len(files[k:k + batch])
        finally:
            writer.close()
            for engine in engines.values():
                engine.close()
    counts["seconds"] = round(time.monotonic() - t, 2)
    return counts


def _cmd(args: argparse.Namespace) -> int:
    t = trust_from_args(args)
    c = classify_paths(args.paths, args.bundle, args.out, backend=args.backend, batch=args.batch,
                       public_keys=t.public_keys, require_signature=t.require_signature,
                       relative_to=args.relative_to)
    print(f"bundle {c['bundle']}: {describe(c['key_id'])}; file names relative to {c['image_root']}")
    print(f"{c['images']} images: {c['animals']} with animals, {c['empty']} empty, {c['failed']} unreadable "
          f"({c['seconds']} s) -> {args.out}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("classify", help="classify image files/folders into a MegaDetector 1.6 results file")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--bundle", required=True, help="bundle folder or .tar/.tar.gz")
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="engine the models run on")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="images per inference batch")
    p.add_argument("--relative-to", metavar="ROOT",
                   help="image root the output's file names are relative to (default: the deepest folder "
                   "holding every input)")
    add_trust_options(p)
    p.set_defaults(func=_cmd)
