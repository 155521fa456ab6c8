"""Turn what users have into a YOLO dataset: `camtrap-export prepare`.

Inputs: an existing YOLO data.yaml; a COCO Camera Traps JSON; or image-level labels (CSV
`file,species`) plus a MegaDetector batch output JSON, whose animal boxes above a threshold
get the image's species - the semi-automatic boxing the paper used. COCO images labelled with
a species but no box can take MegaDetector boxes the same way.

Splits go by location (cameras never seen in training, as in the paper's test) or else by
sequence, never cutting a burst: frames of one burst are near-duplicates, and letting them
straddle train and test inflates every score. The whole input is read and checked before
anything is written; the output is built in ``OUT.tmp-<pid>`` and renamed into place, so a bad
record leaves no half-written dataset.

Output layout (OUT/):
  images/{train,val,test}/<location>__<file>   hard links to the originals (copy if that fails)
  labels/{train,val,test}/<location>__<stem>.txt   YOLO `cls cx cy w h`, empty file = empty image
  data.yaml        path (absolute), train/val/test, names {index: name} (sorted species names)
  meta.json        per image: split, original, location, seq_id, datetime, species, boxes
  split_report.md  images/boxes per species per split, empty fraction, locations per split
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from edge.atomic import building

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EMPTY_NAMES = {"empty", "blank", "none", "nothing"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
BOX_TOLERANCE = 0.02  # a box may overhang the image by this fraction of its side (then it is clipped)
SEQ_GAP_S = 30.0  # frames of one camera closer than this form a burst when no seq_id is given
LINK_MODES = ("hardlink", "copy", "symlink")


@dataclass(frozen=True)
class Box:
    """One labelled box, YOLO-normalised (centre x, centre y, width, height in [0, 1])."""

    species: str
    cx: float
    cy: float
    w: float
    h: float


@dataclass
class Item:
    """One image on its way into the dataset."""

    src: Path  # the original image file
    original: str  # as named in the input (record key for messages and meta.json)
    width: int
    height: int
    location: str | None = None
    seq_id: str | None = None
    datetime: str | None = None  # "YYYY-MM-DD HH:MM:SS", camera local time
    boxes: list[Box] = field(default_factory=list)
    split: str | None = None  # preset (YOLO pass-through) or assigned
    name: str = ""  # output file name

    @property
    def species(self) -> list[str]:
        return sorted({b.species for b in self.boxes})


# ----------------------------------------------------------------------------- small checks
def _read_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def _parse_datetime(text: object, where: str) -> str | None:
    """Normalise the date formats camera-trap data uses to 'YYYY-MM-DD HH:MM:SS' (local time kept)."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ValueError(f"{where}: datetime {text!r} is not a string")
    s = text.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M:%S", "%Y/%m/%d %H:%M:%S", "%d/%m/%Y %H:%M:%S",
                "%Y-%m-%d %H:%M"):
        try:
            return datetime.strptime(s, fmt).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            pass
    try:
        iso = s[:-1] + "+00:00" if s.endswith("Z") else s
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise ValueError(f"{where}: datetime {text!r} not understood (use 'YYYY-MM-DD HH:MM:SS')") from None


def _open_image(path: Path, where: str, want_exif_time: bool) -> tuple[int, int, str | None]:
    """Size (EXIF orientation applied) and, if asked, the EXIF capture time; reads the header only."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{where}: '{path}' is not a supported image type ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file '{path}' not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            exif = im.getexif()
            if exif.get(0x0112) in (5, 6, 7, 8):  # rotated 90 degrees: readers (cv2, ultralytics) swap
                w, h = h, w
            when = None
            if want_exif_time:
                raw = exif.get_ifd(0x8769).get(36867) or exif.get(306)
                if isinstance(raw, str):
                    try:
                        when = _parse_datetime(raw.strip("\x00 "), where)
                    except ValueError:
                        when = None  # a broken EXIF clock is not the user's input error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as e:
        # ImportError: once ultralytics is imported it patches Image.open to try pi_heif on unknown files
        raise ValueError(f"{where}: image '{path}' is unreadable ({e})") from None
    if w < 1 or h < 1:
        raise ValueError(f"{where}: image '{path}' has no pixels")
    return w, h, when


def _four_numbers(box: object, where: str) -> tuple[float, float, float, float]:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise ValueError(f"{where}: bbox {box!r} must be 4 finite numbers [x, y, width, height]")
    x, y, bw, bh = (float(v) for v in box)
    return x, y, bw, bh


def _norm_box(box: object, relative: bool, w: int, h: int, where: str, image: str) -> tuple[float, ...]:
    """[x, y, w, h] top-left (pixels or relative) -> clipped YOLO (cx, cy, w, h); error beyond the tolerance."""
    x, y, bw, bh = _four_numbers(box, where)
    shown = list(cast("Iterable[object]", box))  # as given, for the messages (_four_numbers checked it)
    if relative:
        x, y, bw, bh = x * w, y * h, bw * w, bh * h
    if bw <= 0 or bh <= 0:
        raise ValueError(f"{where}: bbox {shown} has no area")
    tx, ty = max(2.0, BOX_TOLERANCE * w), max(2.0, BOX_TOLERANCE * h)
    if x < -tx or y < -ty or x + bw > w + tx or y + bh > h + ty:
        raise ValueError(f"{where}: bbox {shown} outside image '{image}' ({w}x{h})")
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
    if x1 - x0 < 1e-6 or y1 - y0 < 1e-6:
        raise ValueError(f"{where}: bbox {shown} outside image '{image}' ({w}x{h})")
    return ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)


def _rel(name: str) -> str:
    """Normalise a relative file name for matching (posix, no leading ./)."""
    s = name.replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


def _location_from_path(rel: str) -> str | None:
    parts = _rel(rel).split("/")
    return parts[-2] if len(parts) > 1 else None


# ----------------------------------------------------------------------------- MegaDetector batch output
def _load_md(path: Path, threshold: float) -> dict[str, list[tuple[float, ...]] | None]:
    """file -> animal boxes (relative [x, y, w, h], conf >= threshold), or None where MD failed on it."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a MegaDetector batch output (needs an 'images' list)")
    version = str((data.get("info") or {}).get("format_version", "1.0"))
    if not version.startswith("1."):
        raise ValueError(f"{path}: MegaDetector format_version {version!r} not supported (1.x expected)")
    cats = data.get("detection_categories") or {"1": "animal"}
    animal = {str(k) for k, v in cats.items() if str(v).lower() == "animal"} or {"1"}
    out: dict[str, list[tuple[float, ...]] | None] = {}
    for i, rec in enumerate(data["images"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            raise ValueError(f"{path}: image {i}: needs a 'file' string")
        f = _rel(rec["file"])
        where = f"{path}: image {i} ('{f}')"
        if f in out:
            raise ValueError(f"{where}: duplicate file")
        if rec.get("failure") is not None:
            out[f] = None
            continue
        dets = rec.get("detections")
        if not isinstance(dets, list):
            raise ValueError(f"{where}: 'detections' must be a list")
        boxes: list[tuple[float, ...]] = []
        for j, d in enumerate(dets):
            if not isinstance(d, dict) or "bbox" not in d or "conf" not in d or "category" not in d:
                raise ValueError(f"{where}: detection {j}: needs category, conf and bbox")
            conf = d["conf"]
            if not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
                raise ValueError(f"{where}: detection {j}: conf {conf!r} not in [0, 1]")
            if str(d["category"]) in animal and conf >= threshold:
                boxes.append(_four_numbers(d["bbox"], f"{where}: detection {j}"))  # range checked per image
        out[f] = boxes
    return out


# ----------------------------------------------------------------------------- COCO Camera Traps
def image_root(source: Path, given: Path | None, files: Sequence[str]) -> Path:
    """Where a label file's images live: ``given`` (--images), else beside the file or in an
    ``images/`` folder beside it (the two usual layouts), judged by the first listed files."""
    if given is not None:
        return Path(given)
    probe = list(files)[:20]
    places = [source.parent, source.parent / "images"]
    for place in places:
        if not probe or any((place / f).is_file() for f in probe):
            return place
    raise FileNotFoundError(f"{source}: images such as '{probe[0]}' are neither beside it nor in {places[1]}/; "
                            "give their folder with --images FOLDER")


def _load_coco(path: Path, root: Path | None, md: dict | None, skipped: Counter) -> list[Item]:
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("images", "annotations", "categories")):
        raise ValueError(f"{path}: not a COCO Camera Traps file (needs images, annotations, categories lists)")
    cats: dict[object, str | None] = {}  # id -> species name, None = empty
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise ValueError(f"{path}: category {i}: needs id and name")
        if c["id"] in cats:
            raise ValueError(f"{path}: category {c['id']!r}: duplicate id")
        name = c["name"].strip()
        cats[c["id"]] = None if c["id"] == 0 or name.lower() in EMPTY_NAMES else name
    images: dict[object, dict] = {}
    files: set[str] = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: image {i}: needs id and file_name")
        if im["id"] in images:
            raise ValueError(f"{path}: image {im['id']!r}: duplicate id")
        f = _rel(im["file_name"])
        if f in files:
            raise ValueError(f"{path}: image {im['id']!r}: file_name '{f}' used twice")
        files.add(f)
        images[im["id"]] = im
    root = image_root(path, root, [_rel(im["file_name"]) for im in images.values()])
    anns: dict[object, list[dict]] = defaultdict(list)
    ann_ids: set = set()
    for i, a in enumerate(data["annotations"]):
        aid = a.get("id", i) if isinstance(a, dict) else i
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise ValueError(f"{path}: annotation {aid}: needs image_id and category_id")
        if "id" in a:
            if a["id"] in ann_ids:
                raise ValueError(f"{path}: annotation {a['id']!r}: duplicate id")
            ann_ids.add(a["id"])
        if a["image_id"] not in images:
            raise ValueError(f"{path}: annotation {aid}: image_id {a['image_id']!r} not among the images")
        if a["category_id"] not in cats:
            raise ValueError(f"{path}: annotation {aid}: unknown category_id {a['category_id']!r}")
        anns[a["image_id"]].append(a)

    items: list[Item] = []
    for iid, im in images.items():
        mine = anns.get(iid)
        if not mine:
            skipped["no annotation (unlabelled)"] += 1
            continue
        rel = _rel(im["file_name"])
        where = f"{path}: image {iid!r}"
        dt = _parse_datetime(im.get("datetime"), where)
        w, h, exif_dt = _open_image(root / rel, where, want_exif_time=dt is None)
        if isinstance(im.get("width"), int) and isinstance(im.get("height"), int) and \
                (im["width"], im["height"]) != (w, h):
            raise ValueError(f"{where}: '{rel}' is {w}x{h} but the JSON says {im['width']}x{im['height']}")
        loc = im.get("location")
        seq = im.get("seq_id")
        item = Item(root / rel, rel, w, h, None if loc is None else str(loc), None if seq is None else str(seq),
                    dt or exif_dt)
        unboxed: set[str] = set()
        for a in mine:
            sp = cats[a["category_id"]]
            if sp is None:
                continue
            aw = f"{path}: annotation {a.get('id', '?')}"
            if a.get("bbox") is not None:
                item.boxes.append(Box(sp, *_norm_box(a["bbox"], False, w, h, aw, rel)))
            elif a.get("bbox_relative") is not None:
                item.boxes.append(Box(sp, *_norm_box(a["bbox_relative"], True, w, h, aw, rel)))
            else:
                unboxed.add(sp)
        unboxed -= {b.species for b in item.boxes}
        if unboxed:
            if item.boxes:
                skipped["species without a box beside boxed ones"] += 1
                continue
            if not _md_boxes(item, unboxed, md, skipped):
                continue
        items.append(item)
    return items


def _md_boxes(item: Item, species: set[str], md: dict | None, skipped: Counter) -> bool:
    """Give an image-labelled item MegaDetector's animal boxes; False (and a skip count) if impossible."""
    if md is None:
        skipped["species label without box (give a MegaDetector JSON)"] += 1
        return False
    if len(species) > 1:
        skipped["several species, boxes cannot be assigned"] += 1
        return False
    boxes = md.get(item.original, [])
    if boxes is None:
        skipped["MegaDetector failed on the image"] += 1
        return False
    if not boxes:
        skipped["no MegaDetector animal box above threshold"] += 1
        return False
    (sp,) = species
    for b in boxes:
        item.boxes.append(Box(sp, *_norm_box(b, True, item.width, item.height, "MegaDetector", item.original)))
    return True


# ----------------------------------------------------------------------------- labels CSV + MegaDetector
def _load_labels(csv_path: Path, md_path: Path, root: Path, threshold: float, skipped: Counter) -> list[Item]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such file")
    md = _load_md(md_path, threshold)
    rows: dict[str, dict] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "file" not in cols or "species" not in cols:
            raise ValueError(f"{csv_path}: header must have columns file,species (got {','.join(cols) or 'nothing'})")
        for n, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            f, sp = _rel(row["file"]), row["species"]
            where = f"{csv_path}: row {n}"
            if not f:
                raise ValueError(f"{where}: empty file name")
            if f not in md:
                raise ValueError(f"{where}: file '{f}' is not in the MegaDetector output {md_path}")
            r = rows.setdefault(f, {"species": set(), "row": n, "extra": row})
            key = "" if sp.lower() in EMPTY_NAMES or not sp else sp
            if key in r["species"]:
                raise ValueError(f"{where}: duplicate row for '{f}' ({sp or 'empty'})")
            r["species"].add(key)
    items = []
    for f, r in rows.items():
        where = f"{csv_path}: row {r['row']}"
        extra = r["extra"]
        dt = _parse_datetime(extra.get("datetime"), where)
        w, h, exif_dt = _open_image(root / f, where, want_exif_time=dt is None)
        item = Item(root / f, f, w, h, extra.get("location") or _location_from_path(f),
                    extra.get("seq_id") or None, dt or exif_dt)
        species = r["species"] - {""}
        if species and "" in r["species"]:
            raise ValueError(f"{where}: '{f}' is labelled both empty and {sorted(species)}")
        if species and not _md_boxes(item, species, md, skipped):
            continue
        items.append(item)
    skipped["in MegaDetector output, not in the labels"] += len(set(md) - set(rows))
    return items


# ----------------------------------------------------------------------------- YOLO data.yaml
def _yolo_config(data_yaml: Path) -> tuple[dict, Path]:
    import yaml

    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: no such file")
    try:
        cfg = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{data_yaml}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "train" not in cfg or "names" not in cfg:
        raise ValueError(f"{data_yaml}: a YOLO data.yaml needs at least 'train' and 'names'")
    root = Path(cfg.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = data_yaml.parent / root
    return cfg, root


def class_names(names: object, where: Path | str) -> list[str]:
    """A data.yaml ``names`` (a list, or an {index: name} mapping with indices 0..n-1) as the class
    list, index order. The one reader of that field: a dataset without classes, gaps in the
    indices or a name given twice is refused with one line naming the file."""
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'names' keys must be class indices 0..n-1") from None
        if keys != list(range(len(keys))):
            raise ValueError(f"{where}: 'names' keys must be 0..{len(keys) - 1} without gaps, got {keys}")
        out = [str(names[k] if k in names else names[str(k)]) for k in keys]
    elif isinstance(names, list):
        out = [str(n) for n in names]
    else:
        raise ValueError(f"{where}: 'names' must be a list or an {{index: name}} mapping")
    if not out:
        raise ValueError(f"{where}: 'names' is empty (a dataset needs at least one class)")
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: duplicate class names in 'names'")
    return out


def _yolo_split_images(cfg: dict, root: Path, data_yaml: Path) -> dict[str, list[Path]]:
    """Image files per split, resolved the way ultralytics does (folders, list files, lists of either)."""
    out: dict[str, list[Path]] = {}
    for split in SPLITS:
        spec = cfg.get(split)
        if not spec:
            continue
        files: list[Path] = []
        for entry in spec if isinstance(spec, list) else [spec]:
            p = Path(str(entry))
            p = p if p.is_absolute() else root / p
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            elif p.is_file() and p.suffix == ".txt":
                for line in p.read_text(encoding="utf-8").splitlines():
                    line = line.strip()
                    if line:
                        q = Path(line)
                        files.append(q if q.is_absolute() else (p.parent / line if line.startswith("./") else root / q))
            else:
                raise FileNotFoundError(f"{data_yaml}: {split} path '{p}' not found")
        out[split] = files
    return out


def _label_path(img: Path) -> Path:
    parts = list(img.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _load_yolo(data_yaml: Path, skipped: Counter) -> list[Item]:
    cfg, root = _yolo_config(data_yaml)
    names = class_names(cfg["names"], data_yaml)
    meta_path = data_yaml.parent / "meta.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():  # our own earlier output: keep locations, sequences and times
        m = _read_json(meta_path)
        meta = m.get("images", {}) if isinstance(m, dict) else {}
    items: list[Item] = []
    seen: dict[Path, str] = {}
    for split, files in _yolo_split_images(cfg, root, data_yaml).items():
        for img in files:
            key = img.resolve()
            if key in seen:
                raise ValueError(f"{data_yaml}: image '{img}' is in both {seen[key]} and {split}")
            seen[key] = split
            try:
                rel = img.relative_to(root).as_posix()
            except ValueError:
                rel = str(img)
            m = meta.get(rel, {})
            dt = m.get("datetime")
            w, h, exif_dt = _open_image(img, f"{data_yaml}: {split} image '{rel}'", want_exif_time=dt is None)
            item = Item(img, m.get("original", rel), w, h, m.get("location"), m.get("seq_id"), dt or exif_dt,
                        split=split)
            lab = _label_path(img)
            if lab.is_file():
                for n, line in enumerate(lab.read_text(encoding="utf-8").splitlines(), start=1):
                    vals = line.split()
                    if not vals:
                        continue
                    where = f"{lab}: line {n}"
                    try:
                        cls, nums = int(vals[0]), [float(v) for v in vals[1:]]
                    except ValueError:
                        raise ValueError(f"{where}: not 'class cx cy w h' numbers") from None
                    if not 0 <= cls < len(names):
                        raise ValueError(f"{where}: class {cls} not in names (0..{len(names) - 1})")
                    if len(nums) == 4:
                        cx, cy, bw, bh = nums
                        box = [cx - bw / 2, cy - bh / 2, bw, bh]
                    elif len(nums) >= 6 and len(nums) % 2 == 0:  # segment polygon -> its bounding box
                        xs, ys = nums[0::2], nums[1::2]
                        box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                    else:
                        raise ValueError(f"{where}: expected 'class cx cy w h' (got {len(vals)} values)")
                    norm = _norm_box(box, True, w, h, where, rel)
                    eps = 1e-5  # rounding of 6-decimal labels
                    if len(nums) == 4 and min(box[0], box[1]) >= -eps and max(cx + bw / 2, cy + bh / 2) <= 1 + eps:
                        norm = (cx, cy, bw, bh)  # inside: keep the numbers as written (re-prepare is exact)
                    item.boxes.append(Box(names[cls], *norm))
            items.append(item)
    if not items:
        raise ValueError(f"{data_yaml}: no images found")
    return items


# ----------------------------------------------------------------------------- sequences and splits
def _derive_sequences(items: list[Item], gap_s: float = SEQ_GAP_S) -> None:
    """Give items without seq_id a burst id: same camera (location, else folder), frames < gap_s apart."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if it.seq_id is None:
            if it.datetime is None:
                it.seq_id = f"img:{it.original}"
            else:
                groups[it.location if it.location is not None else f"dir:{it.src.parent}"].append(it)
    for cam, its in groups.items():
        its.sort(key=lambda i: (i.datetime, i.original))
        n, last = 0, None
        for it in its:
            t = datetime.strptime(it.datetime, "%Y-%m-%d %H:%M:%S")  # type: ignore[arg-type]
            if last is None or (t - last).total_seconds() > gap_s:
                n += 1
            it.seq_id = f"{cam}#burst{n:05d}"
            last = t


def _seq_key(it: Item) -> str:
    return f"{it.location}|{it.seq_id}"


def split_sequences(seqs: dict[str, tuple[int, list[str]]], fracs: dict[str, float], seed: int) -> dict[str, str]:
    """Assign whole sequences to splits, stratified by each sequence's rarest species.

    ``seqs``: key -> (number of images, species in it). Within a stratum sequences go, in a
    seeded random order, to the split furthest below its share; a stratum of >= 3 sequences
    first puts one in each split, so a rare species is seen in validation and test too (with
    fewer, training gets them all).
    """
    import numpy as np

    freq: Counter = Counter()
    for n, sps in seqs.values():
        for s in set(sps):
            freq[s] += n
    strata: dict[str, list[str]] = defaultdict(list)
    for key in sorted(seqs):
        present = set(seqs[key][1])
        strata[min(present, key=lambda s: (freq[s], s)) if present else ""].append(key)
    active = [s for s in ("test", "val", "train") if fracs.get(s, 0) > 0]
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for stratum in sorted(strata):
        keys = [strata[stratum][i] for i in rng.permutation(len(strata[stratum]))]
        total = sum(seqs[k][0] for k in keys)
        got = dict.fromkeys(active, 0)
        if len(keys) >= max(3, len(active)) and len(active) >= 2:
            for s in active:
                k = keys.pop(0)
                out[k] = s
                got[s] += seqs[k][0]
        for k in keys:
            s = max(active, key=lambda s: (fracs[s] * total - got[s], s == "train"))
            out[k] = s
            got[s] += seqs[k][0]
    return out


def _assign_splits(items: list[Item], test_locations: list[str] | None, val_locations: list[str] | None,
                   val_frac: float, test_frac: float, seed: int) -> str:
    """Set every item's split; returns how ('location' or 'sequence')."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"prepare: val_frac {val_frac} and test_frac {test_frac} must be in [0, 1) with sum < 1")
    by_location = bool(test_locations or val_locations)
    fixed: dict[str, str] = {}
    if by_location:
        known = {it.location for it in items}
        for split, locs in (("test", test_locations or []), ("val", val_locations or [])):
            for loc in locs:
                if loc not in known:
                    have = ", ".join(sorted(str(k) for k in known if k is not None)) or "none"
                    raise ValueError(f"prepare: {split} location '{loc}' not in the data (locations: {have})")
                if loc in fixed:
                    raise ValueError(f"prepare: location '{loc}' given for both test and val")
                fixed[loc] = split
        missing = [it.original for it in items if it.location is None]
        if missing:
            raise ValueError(f"prepare: image '{missing[0]}' has no location; "
                             "a split by location needs one for every image")
    rest = [it for it in items if it.location not in fixed]
    for it in items:
        if it.location in fixed:
            it.split = fixed[it.location]
    if by_location:
        fracs = {"train": 1.0, "val": 0.0 if val_locations else val_frac, "test": 0.0}
        fracs["train"] -= fracs["val"]
    else:
        fracs = {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac}
    seqs: dict[str, tuple[int, list[str]]] = {}
    for it in rest:
        n, sps = seqs.get(_seq_key(it), (0, []))
        seqs[_seq_key(it)] = (n + 1, sps + it.species)
    chosen = split_sequences(seqs, fracs, seed)
    for it in rest:
        it.split = chosen[_seq_key(it)]
    return "location" if by_location else "sequence"


# ----------------------------------------------------------------------------- naming and writing
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _assign_names(items: list[Item]) -> None:
    """Unique output names: '<location>__<file>' (cameras reuse IMG_0001.JPG); the path if still taken."""
    used: set[str] = set()  # lower-case stems: label files pair by stem, and some file systems fold case
    for it in sorted(items, key=lambda i: (str(i.location), i.original)):
        p = Path(it.original)
        prefix = f"{_SAFE.sub('_', it.location)}__" if it.location else ""
        short = prefix + _SAFE.sub("_", p.stem)
        long = prefix + _SAFE.sub("_", p.with_suffix("").as_posix().replace("/", "__"))
        name, k = short, 2
        if name.lower() in used:
            name = long
        while name.lower() in used:
            name, k = f"{long}_{k}", k + 1
        used.add(name.lower())
        it.name = name + p.suffix


def _place(src: Path, dst: Path, mode: str) -> str:
    """Put an image in the dataset; returns how it got there."""
    if mode == "symlink":
        dst.symlink_to(src.resolve())
        return "symlink"
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass  # other file system, or links not allowed: copy
    shutil.copy2(src, dst)
    return "copy"


def _fmt(v: float) -> str:
    return f"{min(1.0, max(0.0, v)):.6f}"


def _write(tmp: Path, final: Path, items: list[Item], names: list[str], link: str) -> Counter:
    import yaml

    idx = {n: i for i, n in enumerate(names)}
    how: Counter = Counter()
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
    for it in items:
        how[_place(it.src, tmp / "images" / it.split / it.name, link)] += 1  # type: ignore[operator]
        lines = [f"{idx[b.species]} {_fmt(b.cx)} {_fmt(b.cy)} {_fmt(b.w)} {_fmt(b.h)}" for b in it.boxes]
        (tmp / "labels" / it.split / Path(it.name).with_suffix(".txt")).write_text(  # type: ignore[operator]
            "".join(line + "\n" for line in lines))
    data = {"path": str(final.resolve()), "train": "images/train", "val": "images/val", "test": "images/test",
            "names": dict(enumerate(names))}
    (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return how


def _split_report(items: list[Item], names: list[str]) -> dict:
    rep: dict[str, dict] = {}
    for split in SPLITS:
        mine = [it for it in items if it.split == split]
        boxes: Counter = Counter(b.species for it in mine for b in it.boxes)
        imgs: Counter = Counter(s for it in mine for s in it.species)
        empty = sum(1 for it in mine if not it.boxes)
        rep[split] = {
            "images": len(mine), "empty": empty, "empty_frac": round(empty / len(mine), 4) if mine else 0.0,
            "boxes": {n: boxes.get(n, 0) for n in names}, "images_per_species": {n: imgs.get(n, 0) for n in names},
            "locations": sorted({str(it.location) for it in mine if it.location is not None}),
            "sequences": len({_seq_key(it) for it in mine}),
        }
    return rep


def _report_md(report: dict) -> str:
    names = report["names"]
    sp = report["splits"]
    lines = [f"# Split report ({report['source']}, split by {report['split_by']})", "",
             "| | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    for label, key in (("images", "images"), ("sequences", "sequences"), ("empty images", "empty")):
        lines.append(f"| {label} | " + " | ".join(str(sp[s][key]) for s in SPLITS) + " |")
    lines.append("| empty fraction | " + " | ".join(f"{sp[s]['empty_frac']:.2f}" for s in SPLITS) + " |")
    for n in names:
        lines.append(f"| {n} (images / boxes) | " + " | ".join(
            f"{sp[s]['images_per_species'][n]} / {sp[s]['boxes'][n]}" for s in SPLITS) + " |")
    lines.append("| locations | " + " | ".join(", ".join(sp[s]["locations"]) or "-" for s in SPLITS) + " |")
    if report["skipped"]:
        lines += ["", "Skipped images:"] + [f"- {k}: {v}" for k, v in sorted(report["skipped"].items())]
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in report["warnings"]]
    lines += ["", f"dataset hash: `{report['dataset_hash']}`", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- hashing
def _hash_tree(root: Path, files: dict[str, list[Path]], names: list[str]) -> str:
    h = hashlib.sha256(json.dumps(names).encode())
    for split in sorted(files):
        for img in sorted(files[split]):
            try:
                rel = img.relative_to(root).as_posix()
            except ValueError:
                rel = img.as_posix()
            lab = _label_path(img)
            h.update(f"{split}\0{rel}\0{img.stat().st_size}\0".encode())
            h.update(lab.read_bytes() if lab.is_file() else b"\0none")
    return h.hexdigest()


DATASET_HASH_KEY = "dataset_hash"  # the key under which meta.json and run.json record dataset_hash()
_OLD_DATASET_HASH_KEYS = ("dataset_sha256",)  # run.json files written before the key was unified


def recorded_dataset_hash(record: dict) -> str | None:
    """The dataset hash a meta.json, run.json or expert.json records (old run.json: dataset_sha256)."""
    for key in (DATASET_HASH_KEY, *_OLD_DATASET_HASH_KEYS):
        if record.get(key):
            return str(record[key])
    return None


def dataset_hash(data_yaml: Path | str) -> str:
    """sha256 over class names, image names and sizes and label file bytes (cheap provenance).

    Independent of where the dataset lives: a moved or copied dataset hashes the same.
    """
    data_yaml = Path(data_yaml)
    cfg, root = _yolo_config(data_yaml)
    if not root.is_dir():  # dataset moved with its yaml: fall back to the yaml's folder
        root = data_yaml.parent
    return _hash_tree(root, _yolo_split_images(cfg, root, data_yaml), class_names(cfg["names"], data_yaml))


# ----------------------------------------------------------------------------- public API
def prepare(out: Path, *, coco: Path | None = None, yolo: Path | None = None, labels_csv: Path | None = None,
            md_json: Path | None = None, images: Path | None = None, md_threshold: float = 0.2,
            test_locations: Iterable[str] | None = None, val_locations: Iterable[str] | None = None,
            val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0, resplit: bool = False,
            link: str = "hardlink", overwrite: bool = False, taxonomy: Path | None = None) -> dict:
    """Build a YOLO dataset in ``out`` from exactly one source; returns the split report.

    Sources: ``coco`` (optionally with ``md_json`` for species-labelled images without boxes),
    ``labels_csv`` + ``md_json``, or ``yolo`` (a data.yaml: its splits are kept unless
    ``resplit`` or locations are given). ``images`` is the image root for COCO (default: the
    JSON's folder) and the labels CSV (default: the CSV's folder). ``taxonomy`` is a taxonomy CSV
    (export/taxonomy.py) with a row for every class; a ``yolo`` source's own stored taxonomy is
    kept when none is given. It goes into meta.json, where `bundle` finds it.
    """
    from export import taxonomy as tx

    out = Path(out)
    sources = [s for s in (coco, yolo, labels_csv) if s is not None]
    if len(sources) != 1:
        raise ValueError("prepare: give exactly one of --coco, --yolo, --labels (with --md-json)")
    if labels_csv is not None and md_json is None:
        raise ValueError("prepare: --labels needs --md-json (MegaDetector batch output supplies the boxes)")
    if yolo is not None and md_json is not None:
        raise ValueError("prepare: --md-json goes with --coco or --labels, not --yolo")
    if link not in LINK_MODES:
        raise ValueError(f"prepare: link must be one of {', '.join(LINK_MODES)} (got {link!r})")
    if not 0 <= md_threshold <= 1:
        raise ValueError(f"prepare: md_threshold {md_threshold} not in [0, 1]")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder (e.g. made by a caller) is as good as none
    if out.exists() and not overwrite:
        raise ValueError(f"prepare: {out} exists (pass --overwrite to replace it)")
    if out.exists() and not (out / "data.yaml").is_file():
        raise ValueError(f"prepare: refusing to replace {out}: it holds no data.yaml, so it is not a prepared dataset")
    taxa = tx.read_taxonomy_csv(taxonomy) if taxonomy is not None else tx.dataset_taxonomy(yolo)
    test_locations = [str(s) for s in test_locations] if test_locations else None
    val_locations = [str(s) for s in val_locations] if val_locations else None

    skipped: Counter = Counter()
    if coco is not None:
        coco = Path(coco)
        md = _load_md(Path(md_json), md_threshold) if md_json is not None else None
        items = _load_coco(coco, Path(images) if images else None, md, skipped)
        source = "coco"
    elif labels_csv is not None:
        labels_csv = Path(labels_csv)
        items = _load_labels(labels_csv, Path(md_json), Path(images) if images else labels_csv.parent,  # type: ignore[arg-type]
                             md_threshold, skipped)
        source = "labels+megadetector"
    else:
        items = _load_yolo(Path(yolo), skipped)  # type: ignore[arg-type]
        source = "yolo"
    if not items:
        raise ValueError(f"prepare: {sources[0]}: no usable images ({dict(skipped) or 'empty input'})")

    _derive_sequences(items)
    if source == "yolo" and not (resplit or test_locations or val_locations):
        split_by = "given"
    else:
        split_by = _assign_splits(items, test_locations, val_locations, val_frac, test_frac, seed)
    for split in ("train", "val"):
        if not any(it.split == split for it in items):
            raise ValueError(f"prepare: the {split} split would be empty ({len(items)} usable images); "
                             "add data or change the split options")
    names = sorted({b.species for it in items for b in it.boxes})
    if taxa:
        taxa = tx.for_classes(taxa, names, taxonomy or yolo)  # type: ignore[arg-type]
    _assign_names(items)
    warnings = []
    if not any(it.split == "test" for it in items):
        warnings.append("test split is empty")
    rep_splits = _split_report(items, names)
    for n in names:
        for split in SPLITS:
            if rep_splits[split]["images"] and not rep_splits[split]["boxes"][n]:
                warnings.append(f"'{n}' has no boxes in {split}")

    with building(out) as tmp:
        how = _write(tmp, out, items, names, link)
        files = {s: sorted((tmp / "images" / s).iterdir()) for s in SPLITS}
        digest = _hash_tree(tmp, files, names)
        report = {"source": source, "input": str(sources[0]), "out": str(out.resolve()), "split_by": split_by,
                  "seed": seed, "names": names, "splits": rep_splits, "skipped": dict(skipped),
                  "warnings": warnings, "placed": dict(how), DATASET_HASH_KEY: digest}
        meta = {"version": 1, "names": names, DATASET_HASH_KEY: digest, "source": source,
                "input": str(Path(sources[0]).resolve()), "split_by": split_by,
                **({tx.META_KEY: tx.to_json(taxa)} if taxa else {}), "images": {
                    f"images/{it.split}/{it.name}": {
                        "split": it.split, "original": it.original, "src": str(it.src.resolve()),
                        "location": it.location, "seq_id": it.seq_id, "datetime": it.datetime,
                        "width": it.width, "height": it.height, "species": it.species,
                        "boxes": len(it.boxes)}
                    for it in sorted(items, key=lambda i: (SPLITS.index(i.split), i.name))}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "split_report.md").write_text(_report_md(report))
    return report


def summary(report: dict) -> str:
    """A few printable lines: images, empty fraction, locations and boxes per species per split."""
    sp = report["splits"]
    lines = [f"{report['out']}: {sum(sp[s]['images'] for s in SPLITS)} images from {report['source']}, "
             f"split by {report['split_by']}, {len(report['names'])} species"]
    for s in SPLITS:
        r = sp[s]
        boxes = ", ".join(f"{n} {r['boxes'][n]}" for n in report["names"])
        lines.append(f"  {s:5s} {r['images']:6d} images ({r['empty_frac']:.0%} empty), {r['sequences']} sequences, "
                     f"locations [{', '.join(r['locations'])}]; boxes: {boxes}")
    for k, v in sorted(report["skipped"].items()):
        lines.append(f"  skipped {v}: {k}")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _csv_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_cli(sub) -> None:
    from edge.cli import number_in

    p = sub.add_parser("prepare", help="COCO Camera Traps / labels CSV + MegaDetector / YOLO -> a split YOLO dataset",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output dataset folder (must not exist unless --overwrite)")
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--coco", type=Path, help="COCO Camera Traps JSON")
    src.add_argument("--labels", type=Path, help="image-level labels CSV with header file,species (needs --md-json)")
    src.add_argument("--yolo", type=Path, help="an existing YOLO data.yaml (splits kept unless --resplit)")
    p.add_argument("--md-json", type=Path, help="MegaDetector batch output (format 1.x) supplying animal boxes")
    p.add_argument("--md-threshold", type=number_in(0, 1), default=0.2,
                   help="MegaDetector animal confidence (default 0.2)")
    p.add_argument("--images", type=Path, help="image root (default: the JSON's folder or an images/ folder beside "
                   "it, whichever holds the listed files; the CSV's folder for --labels)")
    p.add_argument("--test-locations", type=_csv_list, help="comma-separated locations held out as test")
    p.add_argument("--val-locations", type=_csv_list, help="comma-separated locations for validation "
                   "(default: --val-frac of the other images, by sequence)")
    p.add_argument("--val-frac", type=number_in(0, 1), default=0.15,
                   help="validation share, by sequence (default 0.15)")
    p.add_argument("--test-frac", type=number_in(0, 1), default=0.15, help="test share, by sequence (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--resplit", action="store_true", help="re-split a --yolo dataset instead of keeping its splits")
    p.add_argument("--link", choices=LINK_MODES, default="hardlink",
                   help="how images enter the dataset: hardlink (default; copies across file systems), "
                        "copy, or symlink")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepared dataset in OUT")
    p.add_argument("--taxonomy", type=Path, help="taxonomy CSV: class,scientific_name,vernacular_name"
                   "[,language,rank,taxon_id] (docs/taxonomy.md); stored in meta.json for `bundle`")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = prepare(args.out, coco=args.coco, yolo=args.yolo, labels_csv=args.labels, md_json=args.md_json,
                     images=args.images, md_threshold=args.md_threshold, test_locations=args.test_locations,
                     val_locations=args.val_locations, val_frac=args.val_frac, test_frac=args.test_frac,
                     seed=args.seed, resplit=args.resplit, link=args.link, overwrite=args.overwrite,
                     taxonomy=args.taxonomy)
    print(summary(report))
    print(f"  report: {Path(report['out']) / 'split_report.md'}")
    return 0
