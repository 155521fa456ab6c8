"""Result records in two public formats: MegaDetector batch output 1.6 and Camtrap DP 1.0.2.

Why both: MegaDetector's JSON is what Timelapse, AddaxAI and the MD post-processing tools
read, image by image; Camtrap DP (TDWG) is what biologists publish and analyse, with the
deployment's effort kept complete: an empty frame that the device deleted still appears, as a
media row plus a ``blank`` observation, so detection rates per trap-day stay right.

The mapping functions are pure (hand-made inputs in, dicts and rows out); the writers do the
file work: ``MdBatchWriter`` keeps a JSON-lines journal (one fsync per result) and rewrites
the JSON atomically (tmp + fsync + rename) every few results, so the JSON on disk is valid
after any crash and the journal replays what the last rewrite missed.

Format documents: MegaDetector ``megadetector-output-format.md`` (agentmorris/MegaDetector),
Camtrap DP 1.0.2 (https://camtrap-dp.tdwg.org, profile and table schemas).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge.detection import Detection

# --- MegaDetector batch output format ---------------------------------------------------------
MD_FORMAT_VERSION = "1.6"
DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
_PERSON = {"person", "human", "homo sapiens", "people"}
_VEHICLE = {"vehicle", "car", "truck"}
_VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".wmv", ".m4v", ".mpg", ".mpeg", ".asf", ".3gp"}
MD_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def md_category(species: str) -> str:
    """MegaDetector detection category of a model class: '2' person, '3' vehicle, else '1' animal."""
    s = species.strip().lower()
    return "2" if s in _PERSON else "3" if s in _VEHICLE else "1"


def normalise_box(
    box: Sequence[float], width: int, height: int
) -> tuple[float, float, float, float] | None:
    """Pixel x1,y1,x2,y2 -> [x_min, y_min, w, h] relative to the image, top-left origin, clipped.

    None when nothing of the box is inside the image (a degenerate box has no place in either
    format: Camtrap DP requires width and height > 0).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    x, y = round(x1 / width, 4), round(y1 / height, 4)
    w, h = round((x2 - x1) / width, 4), round((y2 - y1) / height, 4)
    w, h = min(w, round(1.0 - x, 4)), min(h, round(1.0 - y, 4))  # rounding must not push past the edge
    if w <= 0 or h <= 0:
        return None
    return (x, y, w, h)


def _classifications(
    det: Detection, ids: Mapping[str, str], model_classes: Mapping[str, Sequence[str]] | None, top_k: int
) -> list[list]:
    """[[class_id, conf], ...] sorted by conf, descending; the detection's own species always in."""
    scores: dict[str, float] = {}
    classes = (model_classes or {}).get(det.model)
    if classes is not None and len(det.scores) == len(classes):
        for name, s in zip(classes, det.scores, strict=True):
            if name in ids and s > 0:
                scores[name] = float(s)
    scores[det.species] = max(scores.get(det.species, 0.0), float(det.score))
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], ids[kv[0]]))[:top_k]
    return [[ids[name], round(min(max(s, 0.0), 1.0), 3)] for name, s in ranked
            if round(s, 3) > 0 or name == det.species]


def md_image_entry(
    file: str,
    detections: Sequence[Detection] | None,
    species: Sequence[str],
    *,
    image_size: tuple[int, int] | None = None,
    failure: str | None = None,
    model_classes: Mapping[str, Sequence[str]] | None = None,
    top_k: int = 5,
) -> dict:
    """One ``images[]`` entry of the MegaDetector format.

    ``species`` is the classification category list (id = index, as in
    ``md_classification_categories``); ``image_size`` is (width, height) of the original image,
    needed to normalise boxes. A ``failure`` string records an unreadable image: the format
    wants ``detections`` null then, never an empty list (which means "processed, nothing seen").
    ``model_classes`` (model name -> class list) turns each box's per-class score vector into
    the ranked ``classifications`` list; without it, the box's own species alone is listed.
    """
    if failure is not None:
        if detections:
            raise ValueError(f"{file}: an image with a failure cannot have detections")
        return {"file": file, "failure": str(failure), "detections": None}
    ids = {name: str(i) for i, name in enumerate(species)}
    out = []
    for det in detections or ():
        if det.species not in ids:
            raise ValueError(f"{file}: species {det.species!r} is not in the classification categories")
        if image_size is None:
            raise ValueError(f"{file}: image_size is needed to normalise boxes")
        bbox = normalise_box(det.box, *image_size)
        if bbox is None:
            continue
        cat = md_category(det.species)
        d: dict[str, Any] = {"category": cat, "conf": round(float(det.score), 3), "bbox": list(bbox)}
        if cat == "1":
            d["classifications"] = _classifications(det, ids, model_classes, top_k)
        out.append(d)
    out.sort(key=lambda d: -d["conf"])
    return {"file": file, "detections": out}


def md_classification_categories(species: Sequence[str]) -> dict[str, str]:
    return {str(i): name for i, name in enumerate(species)}


def md_info(
    detector: str,
    classifier: str | None = None,
    *,
    typical_threshold: float = 0.25,
    conservative_threshold: float = 0.1,
    typical_classification_threshold: float | None = None,
    completion_time: datetime | None = None,
    extra_detector_metadata: Mapping[str, Any] | None = None,
) -> dict:
    """The ``info`` block. The thresholds are advice to downstream tools (Timelapse defaults)."""
    when = (completion_time or datetime.now()).strftime(MD_TIME_FORMAT)
    info: dict[str, Any] = {
        "format_version": MD_FORMAT_VERSION,
        "detector": detector,
        "detection_completion_time": when,
        "detector_metadata": {
            **(extra_detector_metadata or {}),
            "typical_detection_threshold": float(typical_threshold),
            "conservative_detection_threshold": float(conservative_threshold),
        },
    }
    if classifier:
        info["classifier"] = classifier
        info["classification_completion_time"] = when
        if typical_classification_threshold is not None:
            info["classifier_metadata"] = {"typical_classification_threshold": float(typical_classification_threshold)}
    return info


def md_document(info: Mapping[str, Any], species: Sequence[str], images: Iterable[Mapping]) -> dict:
    return {
        "info": dict(info),
        "detection_categories": dict(DETECTION_CATEGORIES),
        "classification_categories": md_classification_categories(species),
        "images": list(images),
    }


def _is_id(key: Any) -> bool:
    return isinstance(key, str) and key.isdigit()


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_categories(doc: Mapping, key: str, errors: list[str]) -> dict:
    cats = doc.get(key)
    if not isinstance(cats, dict):
        errors.append(f"{key}: must be an object of id -> name")
        return {}
    for k, v in cats.items():
        if not _is_id(k):
            errors.append(f"{key}: id {k!r} is not a non-negative string-formatted int")
        if not isinstance(v, str) or not v.strip():
            errors.append(f"{key}[{k}]: name must be a non-blank string")
    return cats


def validate_md_output(doc: Any) -> list[str]:
    """Every rule of megadetector-output-format.md (1.6) we can check; [] means valid.

    Besides the document's rules, a file listed twice is an error (downstream tools key on
    ``file``; the device promises one result per image).
    """
    errors: list[str] = []
    if not isinstance(doc, dict):
        return ["document: must be a JSON object"]
    for key in ("info", "detection_categories", "images"):
        if key not in doc:
            errors.append(f"{key}: required")
    info = doc.get("info")
    if isinstance(info, dict):
        fv = info.get("format_version")
        if not isinstance(fv, str):
            errors.append("info.format_version: required, a string-formatted float")
        else:
            try:
                if float(fv) < 1.3:
                    errors.append(f"info.format_version: {fv} predates the rules checked here (1.3+)")
            except ValueError:
                errors.append(f"info.format_version: {fv!r} is not a string-formatted float")
        for k in ("detector", "classifier", "summary_report"):
            if k in info and not isinstance(info[k], str):
                errors.append(f"info.{k}: must be a string")
        for k in ("detection_completion_time", "classification_completion_time"):
            if k in info:
                try:
                    datetime.strptime(info[k], MD_TIME_FORMAT)
                except (TypeError, ValueError):
                    errors.append(f"info.{k}: {info[k]!r} is not 'YYYY-MM-DD HH:MM:SS'")
        for block, keys in (
            ("detector_metadata", ("typical_detection_threshold", "conservative_detection_threshold")),
            ("classifier_metadata", ("typical_classification_threshold",)),
        ):
            if block in info:
                meta = info[block]
                if not isinstance(meta, dict):
                    errors.append(f"info.{block}: must be an object")
                    continue
                for k in keys:
                    if k in meta and not (_is_num(meta[k]) and 0 <= meta[k] <= 1):
                        errors.append(f"info.{block}.{k}: must be a number in [0, 1]")
    elif "info" in doc:
        errors.append("info: must be an object")
    det_cats = _check_categories(doc, "detection_categories", errors) if "detection_categories" in doc else {}
    cls_cats: dict = {}
    if "classification_categories" in doc:
        cls_cats = _check_categories(doc, "classification_categories", errors)
    if "classification_category_descriptions" in doc:
        desc = _check_categories(doc, "classification_category_descriptions", errors)
        if set(desc) != set(cls_cats):
            errors.append("classification_category_descriptions: ids differ from classification_categories")
    images = doc.get("images")
    if "images" in doc and not isinstance(images, list):
        errors.append("images: must be an array")
        images = []
    seen: set[str] = set()
    for i, im in enumerate(images or []):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            errors.append(f"{where}: must be an object")
            continue
        f = im.get("file")
        if not isinstance(f, str) or not f:
            errors.append(f"{where}.file: required, a non-empty string")
        else:
            where = f"images[{i}] ({f})"
            if f in seen:
                errors.append(f"{where}: file listed more than once")
            seen.add(f)
        failure = im.get("failure")
        dets = im.get("detections")
        if failure is not None:
            if not isinstance(failure, str):
                errors.append(f"{where}.failure: must be a string or null")
            if dets is not None:
                errors.append(f"{where}.detections: must be null or absent when failure is set")
            continue
        if not isinstance(dets, list):
            errors.append(f"{where}.detections: required list for a processed image (empty if nothing seen)")
            continue
        video = isinstance(f, str) and os.path.splitext(f)[1].lower() in _VIDEO_EXT
        if video:
            fr = im.get("frame_rate")
            if not (_is_num(fr) and fr > 0):
                errors.append(f"{where}.frame_rate: required for videos, > 0")
            fp = im.get("frames_processed")
            if not (isinstance(fp, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in fp)):
                errors.append(f"{where}.frames_processed: required for videos, a list of ints")
        for j, d in enumerate(dets):
            dw = f"{where}.detections[{j}]"
            if not isinstance(d, dict):
                errors.append(f"{dw}: must be an object")
                continue
            if d.get("category") not in det_cats:
                errors.append(f"{dw}.category: {d.get('category')!r} is not in detection_categories")
            conf = d.get("conf")
            if not (isinstance(conf, float) and 0 <= conf <= 1):
                errors.append(f"{dw}.conf: must be a float in [0, 1]")
            bbox = d.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
                errors.append(f"{dw}.bbox: must be [x_min, y_min, width, height]")
            else:
                x, y, w, h = bbox
                if not (0 <= x <= 1 and 0 <= y <= 1 and 0 <= w <= 1 and 0 <= h <= 1):
                    errors.append(f"{dw}.bbox: values must be relative (0..1)")
                elif x + w > 1.0001 or y + h > 1.0001:
                    errors.append(f"{dw}.bbox: box extends past the image (x+w or y+h > 1)")
            if video and not (isinstance(d.get("frame_number"), int) and d["frame_number"] >= 0):
                errors.append(f"{dw}.frame_number: required for videos, an int >= 0")
            cl = d.get("classifications")
            if cl is None:
                continue
            if not isinstance(cl, list):
                errors.append(f"{dw}.classifications: must be a list of [class_id, conf]")
                continue
            confs = []
            for k, pair in enumerate(cl):
                if not (isinstance(pair, list) and len(pair) == 2):
                    errors.append(f"{dw}.classifications[{k}]: must be [class_id, conf]")
                    continue
                cid, c = pair
                if not _is_id(cid):
                    errors.append(f"{dw}.classifications[{k}]: id {cid!r} is not a string-formatted int")
                elif cid not in cls_cats:
                    errors.append(f"{dw}.classifications[{k}]: id {cid!r} is not in classification_categories")
                if not (_is_num(c) and 0 <= c <= 1):
                    errors.append(f"{dw}.classifications[{k}]: confidence must be a number in [0, 1]")
                else:
                    confs.append(c)
            if confs != sorted(confs, reverse=True):
                errors.append(f"{dw}.classifications: must be sorted by confidence, descending")
    return errors


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write-then-rename: readers and crashes see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class MdBatchWriter:
    """Appends results to a MegaDetector batch JSON that stays valid through any crash.

    Each ``add`` is one fsynced line in ``<path>.journal``; every ``flush_every`` results (and
    on ``flush``/``close``) the whole JSON is rewritten atomically and the journal emptied.
    Opening an existing file resumes it: its images are kept, the journal is replayed, and a
    result for a file already present replaces the old one (redoing an image is harmless).
    Category ids only ever grow, so a new bundle with new species never renumbers old results.
    One process at a time (the journal is locked); threads may share a writer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        detector: str,
        classifier: str | None,
        species: Sequence[str],
        *,
        typical_threshold: float = 0.25,
        conservative_threshold: float = 0.1,
        typical_classification_threshold: float | None = None,
        model_classes: Mapping[str, Sequence[str]] | None = None,
        flush_every: int = 20,
    ) -> None:
        import fcntl

        self.path = Path(path)
        self.journal_path = self.path.with_name(self.path.name + ".journal")
        self.detector, self.classifier = detector, classifier
        self._info_args = {
            "typical_threshold": typical_threshold,
            "conservative_threshold": conservative_threshold,
            "typical_classification_threshold": typical_classification_threshold,
        }
        self.model_classes = dict(model_classes or {})
        self.flush_every = max(1, int(flush_every))
        self.species: list[str] = []
        self._images: dict[str, dict] = {}
        self._pending = 0
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_path, "a+b")  # held for the writer's life
        try:
            fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._journal.close()
            raise ValueError(f"{self.journal_path}: another process is writing {self.path}") from None
        self._load_existing()
        self._replay_journal()
        self._extend_species(species)
        if self._pending or not self.path.exists():
            self.flush()

    # -- recovery ---------------------------------------------------------------------------
    def _load_existing(self) -> None:
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_bytes())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: not valid JSON ({e}); move it away to start a new file") from None
        problems = validate_md_output(doc)
        if problems:
            raise ValueError(f"{self.path}: not a MegaDetector results file: {problems[0]}")
        cats = doc.get("classification_categories", {})
        self.species = [cats[k] for k in sorted(cats, key=int)]
        if [int(k) for k in sorted(cats, key=int)] != list(range(len(cats))):
            raise ValueError(f"{self.path}: classification ids are not 0..n-1; cannot append to it")
        for im in doc["images"]:
            self._images[im["file"]] = im

    def _replay_journal(self) -> None:
        self._journal.seek(0)
        data = self._journal.read()
        good = data.rfind(b"\n") + 1  # a torn last line (crash mid-write) is dropped
        for line in data[:good].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "species" in rec:
                self._extend_species(rec["species"], journal=False)
            elif "image" in rec:
                self._images.pop(rec["image"]["file"], None)
                self._images[rec["image"]["file"]] = rec["image"]
                self._pending += 1
        if good != len(data):
            self._journal.truncate(good)
            os.fsync(self._journal.fileno())

    # -- writing ----------------------------------------------------------------------------
    def _append_journal(self, rec: dict) -> None:
        self._journal.seek(0, os.SEEK_END)
        self._journal.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _extend_species(self, species: Iterable[str], journal: bool = True) -> None:
        new = [s for s in dict.fromkeys(species) if s not in self.species]
        if new:
            self.species.extend(new)
            if journal:
                self._append_journal({"species": list(self.species)})

    def add(
        self,
        file: str,
        detections: Sequence[Detection] | None = None,
        *,
        image_size: tuple[int, int] | None = None,
        failure: str | None = None,
    ) -> dict:
        """Record one image's result (durable when this returns); returns the entry written."""
        with self._lock:
            self._extend_species(d.species for d in detections or ())
            entry = md_image_entry(file, detections, self.species, image_size=image_size, failure=failure,
                                   model_classes=self.model_classes)  # fmt: skip
            self.add_entry(entry)
            return entry

    def add_entry(self, entry: Mapping) -> None:
        """Record a ready-made ``images[]`` entry (its class ids must be this writer's)."""
        entry = dict(entry)
        with self._lock:
            self._append_journal({"image": entry})
            self._images.pop(entry["file"], None)  # re-added at the end: newest result last
            self._images[entry["file"]] = entry
            self._pending += 1
            if self._pending >= self.flush_every:
                self.flush()

    def document(self) -> dict:
        info = md_info(self.detector, self.classifier, **self._info_args)  # type: ignore[arg-type]
        return md_document(info, self.species, self._images.values())

    def flush(self) -> None:
        """Rewrite the JSON atomically, then empty the journal (its lines are now in the JSON)."""
        with self._lock:
            data = json.dumps(self.document(), separators=(",", ":")).encode() + b"\n"
            atomic_write_bytes(self.path, data)
            self._journal.truncate(0)
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._pending = 0

    def close(self) -> None:
        if self._journal.closed:
            return
        try:
            self.flush()
        finally:
            self._journal.close()

    def __enter__(self) -> MdBatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._images)


# --- Camtrap DP 1.0.2 --------------------------------------------------------------------------
CAMTRAP_DP_VERSION = "1.0.2"
_BASE_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_DP_VERSION}"
CAMTRAP_DP_PROFILE = f"{_BASE_URL}/camtrap-dp-profile.json"
TABLE_SCHEMAS = {name: f"{_BASE_URL}/{name}-table-schema.json" for name in ("deployments", "media", "observations")}

# column order of the 1.0.2 table schemas (a test checks them against the official files)
DEPLOYMENT_COLUMNS = [
    "deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
    "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay", "cameraHeight",
    "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues", "baitUse",
    "featureType", "habitat", "deploymentGroups", "deploymentTags", "deploymentComments",
]  # fmt: skip
MEDIA_COLUMNS = [
    "mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
    "fileMediatype", "exifData", "favorite", "mediaComments",
]  # fmt: skip
OBSERVATION_COLUMNS = [
    "observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
    "observationType", "cameraSetupType", "scientificName", "count", "lifeStage", "sex", "behavior",
    "individualID", "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX", "bboxY",
    "bboxWidth", "bboxHeight", "classificationMethod", "classifiedBy", "classificationTimestamp",
    "classificationProbability", "observationTags", "observationComments",
]  # fmt: skip

BoxNorm = tuple[float, float, float, float]  # x_min, y_min, width, height (relative, top-left)


@dataclass(frozen=True)
class MediaResult:
    """One image as the device saw it: where, when, what the cascade found, what became of it.

    ``detections`` are (species, score, bbox_norm or None). ``disposed`` is None while the file
    is still where the camera put it, else 'deleted' or 'moved' (the media row stays, so the
    effort of the deployment stays complete). ``failure`` marks an image that could not be read.
    """

    media_id: str
    deployment_id: str
    timestamp: datetime  # tz-aware
    file_path: str  # relative to the watch folder, forward slashes
    file_name: str
    media_type: str = "image/jpeg"
    detections: tuple[tuple[str, float, BoxNorm | None], ...] = ()
    disposed: str | None = None
    event_id: str | None = None
    failure: str | None = None
    classified_at: datetime | None = None


@dataclass(frozen=True)
class DeploymentInfo:
    """One camera placement; start/end default to the first/last media timestamps."""

    deployment_id: str
    latitude: float
    longitude: float
    start: datetime | None = None
    end: datetime | None = None
    location_id: str | None = None
    location_name: str | None = None
    coordinate_uncertainty: int | None = None
    camera_id: str | None = None
    camera_model: str | None = None
    camera_height: float | None = None
    comments: str | None = None


@dataclass(frozen=True)
class ProjectMeta:
    """Package-level metadata (datapackage.json)."""

    title: str = "camtrap cascade edge deployment"
    sampling_design: str = "opportunistic"
    contributors: tuple[Mapping[str, str], ...] = ()
    data_license: str = "CC0-1.0"
    media_license: str = "CC-BY-4.0"
    name: str = "camtrap-edge"
    description: str | None = None
    classified_by: str = "camtrap-cascade"
    scientific_names: Mapping[str, str] = field(default_factory=dict)  # model class -> scientificName


def _ts(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError(f"timestamp {t.isoformat()} has no time zone (Camtrap DP needs one)")
    return t.isoformat(timespec="seconds")


def _num(v: float | None, nd: int = 4) -> str:
    return "" if v is None else f"{round(float(v), nd):g}"


def observation_type(species: str) -> str:
    s = species.strip().lower()
    return "human" if s in _PERSON else "vehicle" if s in _VEHICLE else "animal"


def camtrapdp_media_row(m: MediaResult) -> dict[str, str]:
    comments = []
    if m.disposed:
        comments.append(f"file {m.disposed} on the device after it was classified blank")
    if m.failure:
        comments.append(f"not classified: {m.failure}")
    return {
        "mediaID": m.media_id,
        "deploymentID": m.deployment_id,
        "captureMethod": "activityDetection",
        "timestamp": _ts(m.timestamp),
        "filePath": m.file_path,
        "filePublic": "false",  # the files stay on the device (or are gone): never public
        "fileName": m.file_name,
        "fileMediatype": m.media_type,
        "mediaComments": "; ".join(comments),
    }


def camtrapdp_observation_rows(m: MediaResult, meta: ProjectMeta) -> list[dict[str, str]]:
    """Media-level observations: one per detected animal, or one blank / unclassified row."""
    base = {
        "deploymentID": m.deployment_id,
        "mediaID": m.media_id,
        "eventID": m.event_id or "",
        "eventStart": _ts(m.timestamp),
        "eventEnd": _ts(m.timestamp),
        "observationLevel": "media",
    }
    when = _ts(m.classified_at) if m.classified_at else ""
    if m.failure:
        return [{**base, "observationID": f"{m.media_id}_0", "observationType": "unclassified",
                 "observationComments": f"image could not be read: {m.failure}"}]  # fmt: skip
    if not m.detections:
        return [{**base, "observationID": f"{m.media_id}_0", "observationType": "blank",
                 "classificationMethod": "machine", "classifiedBy": meta.classified_by,
                 "classificationTimestamp": when}]  # fmt: skip
    rows = []
    for k, (species, score, bbox) in enumerate(sorted(m.detections, key=lambda d: -d[1]), start=1):
        otype = observation_type(species)
        row = {
            **base,
            "observationID": f"{m.media_id}_{k}",
            "observationType": otype,
            "scientificName": meta.scientific_names.get(species, species) if otype == "animal" else "",
            "count": "1",
            "classificationMethod": "machine",
            "classifiedBy": meta.classified_by,
            "classificationTimestamp": when,
            "classificationProbability": _num(min(max(score, 0.0), 1.0)),
        }
        if bbox is not None and bbox[2] > 0 and bbox[3] > 0:
            row.update(bboxX=_num(bbox[0]), bboxY=_num(bbox[1]), bboxWidth=_num(bbox[2]), bboxHeight=_num(bbox[3]))
        rows.append(row)
    return rows


def camtrapdp_deployment_rows(deployments: Sequence[DeploymentInfo], media: Sequence[MediaResult]) -> list[dict]:
    times: dict[str, list[datetime]] = {}
    for m in media:
        times.setdefault(m.deployment_id, []).append(m.timestamp)
    known = {d.deployment_id for d in deployments}
    orphans = sorted(set(times) - known)
    if orphans:
        raise ValueError(f"media reference deployments with no deployment info: {', '.join(orphans)}")
    rows = []
    for d in deployments:
        ts = times.get(d.deployment_id, [])
        start = d.start or (min(ts) if ts else None)
        end = d.end or (max(ts) if ts else None)
        if start is None or end is None:
            raise ValueError(f"deployment {d.deployment_id}: no media and no start/end given")
        rows.append({
            "deploymentID": d.deployment_id,
            "locationID": d.location_id or "",
            "locationName": d.location_name or "",
            "latitude": _num(d.latitude, 6),
            "longitude": _num(d.longitude, 6),
            "coordinateUncertainty": "" if d.coordinate_uncertainty is None else str(int(d.coordinate_uncertainty)),
            "deploymentStart": _ts(start),
            "deploymentEnd": _ts(end),
            "cameraID": d.camera_id or "",
            "cameraModel": d.camera_model or "",
            "cameraHeight": _num(d.camera_height, 2),
            "deploymentComments": d.comments or "",
        })  # fmt: skip
    return rows


def _package_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "camtrap-edge"


def camtrapdp_descriptor(
    meta: ProjectMeta,
    deployments: Sequence[DeploymentInfo],
    deployment_rows: Sequence[Mapping[str, str]],
    observation_rows: Sequence[Mapping[str, str]],
    created: datetime | None = None,
) -> dict:
    """datapackage.json: resources point at the official 1.0.2 table schemas and profile."""
    lats = [d.latitude for d in deployments]
    lons = [d.longitude for d in deployments]
    if len(set(zip(lats, lons, strict=True))) == 1:
        spatial: dict = {"type": "Point", "coordinates": [lons[0], lats[0]]}
    else:
        w, e, s, n = min(lons), max(lons), min(lats), max(lats)
        spatial = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    starts = [r["deploymentStart"][:10] for r in deployment_rows]
    ends = [r["deploymentEnd"][:10] for r in deployment_rows]
    taxa = sorted({r["scientificName"] for r in observation_rows if r.get("scientificName")})
    contributors = [dict(c) for c in meta.contributors] or [{"title": meta.classified_by, "role": "contributor"}]
    created = created or datetime.now(timezone.utc)
    return {
        "name": _package_name(meta.name),
        "title": meta.title,
        **({"description": meta.description} if meta.description else {}),
        "profile": CAMTRAP_DP_PROFILE,
        "created": created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "contributors": contributors,
        "licenses": [{"name": meta.data_license, "scope": "data"}, {"name": meta.media_license, "scope": "media"}],
        "project": {
            "title": meta.title,
            "samplingDesign": meta.sampling_design,
            "captureMethod": ["activityDetection"],
            "individualAnimals": False,
            "observationLevel": ["media"],
        },
        "spatial": spatial,
        "temporal": {"start": min(starts), "end": max(ends)},
        "taxonomic": [{"scientificName": t} for t in taxa],
        "resources": [
            {
                "name": name,
                "path": f"{name}.csv",
                "profile": "tabular-data-resource",
                "format": "csv",
                "mediatype": "text/csv",
                "encoding": "utf-8",
                "schema": TABLE_SCHEMAS[name],
            }
            for name in ("deployments", "media", "observations")
        ],
    }


def _csv_bytes(columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode("utf-8")


def write_camtrapdp(
    out_dir: str | os.PathLike[str],
    deployments: Sequence[DeploymentInfo],
    media: Sequence[MediaResult],
    meta: ProjectMeta | None = None,
    *,
    created: datetime | None = None,
) -> Path:
    """Write deployments.csv, media.csv, observations.csv and datapackage.json; returns the latter."""
    meta = meta or ProjectMeta()
    if not deployments:
        raise ValueError("a Camtrap DP package needs at least one deployment")
    ids = [m.media_id for m in media]
    if len(set(ids)) != len(ids):
        raise ValueError("media ids must be unique")
    dep_rows = camtrapdp_deployment_rows(deployments, media)
    ordered = sorted(media, key=lambda m: (m.deployment_id, m.timestamp, m.file_path))
    media_rows = [camtrapdp_media_row(m) for m in ordered]
    obs_rows = [r for m in ordered for r in camtrapdp_observation_rows(m, meta)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "deployments.csv", _csv_bytes(DEPLOYMENT_COLUMNS, dep_rows))
    atomic_write_bytes(out / "media.csv", _csv_bytes(MEDIA_COLUMNS, media_rows))
    atomic_write_bytes(out / "observations.csv", _csv_bytes(OBSERVATION_COLUMNS, obs_rows))
    desc = camtrapdp_descriptor(meta, deployments, dep_rows, obs_rows, created)
    atomic_write_bytes(out / "datapackage.json", json.dumps(desc, indent=2).encode() + b"\n")
    return out / "datapackage.json"


# --- from the ledger ---------------------------------------------------------------------------
def _relative(path: str, roots: Sequence[Path]) -> str:
    """A Camtrap DP filePath: relative (no leading '/', '.', '~', no '..'), forward slashes."""
    p = Path(path)
    for r in roots:
        with contextlib.suppress(ValueError):
            return p.relative_to(r).as_posix()
    parts = [part for part in p.as_posix().split("/") if part not in ("", ".", "..")]
    rel = "/".join(parts) or p.name
    return rel.lstrip(".~") or "file"


def _detections_from_result(result: Mapping[str, Any]) -> tuple[tuple[str, float, BoxNorm | None], ...]:
    """Detections of a stored result (``Decision.to_dict()``: boxes in pixels, so the image size
    must be stored beside them as width/height or image_size for a bbox; else bbox is left out)."""
    size = None
    if "width" in result and "height" in result:
        size = (int(result["width"]), int(result["height"]))
    elif isinstance(result.get("image_size"), list | tuple):
        size = (int(result["image_size"][0]), int(result["image_size"][1]))
    out = []
    for d in result.get("detections") or []:
        bbox = d.get("bbox_norm")
        if bbox is None and size is not None and d.get("box") is not None:
            bbox = normalise_box(d["box"], *size)
        out.append((str(d["species"]), float(d["score"]), tuple(bbox) if bbox else None))
    return tuple(out)  # type: ignore[return-value]


def media_result_from_row(row: Any, *, deployment_id: str, tz: Any = timezone.utc,
                          roots: Sequence[Path] = ()) -> MediaResult | None:
    """One ledger ``ImageRow`` -> MediaResult; None for images not classified yet (seen,
    processing), which are not effort yet. Quarantined images become unclassified media."""
    if row.state not in ("done", "disposed", "quarantined"):
        return None
    result = row.result or {}
    failure = (row.error or "quarantined") if row.state == "quarantined" else result.get("failure")
    disposed = None
    if row.state == "disposed" and row.disposal and row.disposal != "kept":
        disposed = "moved" if row.disposal.startswith("moved") else "deleted" if row.disposal == "deleted" \
            else row.disposal
    when = datetime.fromtimestamp(row.taken_at if row.taken_at is not None else row.mtime, tz=timezone.utc)
    name = Path(row.path).name
    return MediaResult(
        media_id=str(row.id),
        deployment_id=deployment_id,
        timestamp=when.astimezone(tz),
        file_path=_relative(row.path, roots),
        file_name=name,
        media_type="image/png" if name.lower().endswith(".png") else "image/jpeg",
        detections=() if failure else _detections_from_result(result),
        disposed=disposed,
        event_id=None if row.event_id is None else str(row.event_id),
        failure=str(failure) if failure else None,
        classified_at=datetime.fromtimestamp(row.updated, tz=timezone.utc).astimezone(tz) if row.updated else None,
    )


def media_results_from_ledger(
    db_path: str | os.PathLike[str],
    *,
    deployment_id: str,
    tz: Any = timezone.utc,
    roots: Sequence[Path] = (),
) -> list[MediaResult]:
    """Every classified image of the device ledger (edge/ledger.py), oldest first.

    Safe while the daemon runs (WAL: readers never block it). Earlier files at a reused path
    (``superseded`` rows) are real captures and are included.
    """
    from edge.ledger import Ledger

    p = Path(db_path)
    if not p.is_file():
        raise FileNotFoundError(f"ledger not found: {p}")
    with Ledger(p) as ledger:
        rows = ledger.images()
    out = []
    for row in rows:
        m = media_result_from_row(row, deployment_id=deployment_id, tz=tz, roots=roots)
        if m is not None:
            out.append(m)
    return out


# --- CLI ---------------------------------------------------------------------------------------
def _export_camtrapdp(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        from edge.config import load_config

        cfg = load_config(args.config)
    ledger = args.ledger or (cfg.ledger.path if cfg else None)
    out = args.out or (cfg.records.camtrapdp_dir if cfg else None)
    if ledger is None or out is None:
        raise ValueError("give --ledger and --out, or --config to take them from the device config")
    dev = cfg.device if cfg else None
    deployment_id = args.deployment_id or (dev.deployment_id if dev else None) or "deployment-1"
    lat = args.latitude if args.latitude is not None else (dev.latitude if dev else None)
    lon = args.longitude if args.longitude is not None else (dev.longitude if dev else None)
    if lat is None or lon is None:
        raise ValueError("Camtrap DP needs the deployment's latitude and longitude: set device.latitude/"
                         "longitude in the config or pass --latitude/--longitude")  # fmt: skip
    tzname = args.timezone or (dev.timezone if dev else "UTC")
    if tzname == "UTC":
        tz: Any = timezone.utc
    else:
        import zoneinfo

        tz = zoneinfo.ZoneInfo(tzname)
    roots = [Path(r) for r in args.root] or (list(cfg.watch.folders) if cfg else [])
    media = media_results_from_ledger(ledger, deployment_id=deployment_id, tz=tz, roots=roots)
    dep = DeploymentInfo(
        deployment_id=deployment_id,
        latitude=lat,
        longitude=lon,
        location_id=dev.location_id if dev else None,
        location_name=dev.location_name if dev else None,
        coordinate_uncertainty=dev.coordinate_uncertainty_m if dev else None,
        camera_id=dev.id if dev else None,
        camera_model=dev.camera_model if dev else None,
        camera_height=dev.camera_height_m if dev else None,
        start=datetime.now(tz) if not media else None,
        end=datetime.now(tz) if not media else None,
    )
    meta = ProjectMeta(name=f"camtrap-edge-{deployment_id}")
    if cfg is not None:
        pr = cfg.records.project
        meta = ProjectMeta(
            title=pr.title,
            sampling_design=pr.sampling_design,
            contributors=tuple(c.model_dump(exclude_none=True) for c in pr.contributors),
            data_license=pr.data_license,
            media_license=pr.media_license,
            name=f"camtrap-edge-{deployment_id}",
            classified_by=args.classified_by,
        )
    elif args.classified_by:
        meta = ProjectMeta(name=meta.name, classified_by=args.classified_by)
    path = write_camtrapdp(out, [dep], media, meta)
    blanks = sum(1 for m in media if not m.detections and not m.failure)
    disposed = sum(1 for m in media if m.disposed)
    print(f"{path}: {len(media)} media ({blanks} blank, {disposed} disposed on the device, "
          f"{sum(1 for m in media if m.failure)} unreadable)")  # fmt: skip
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("export-camtrapdp", help="write a Camtrap DP 1.0.2 package from the device ledger")
    p.add_argument("--ledger", type=Path, help="ledger SQLite file (default: from --config)")
    p.add_argument("--out", type=Path, help="output folder (default: records.camtrapdp_dir from --config)")
    p.add_argument("--config", type=Path, help="device config: deployment, location, project metadata")
    p.add_argument("--deployment-id", help="Camtrap DP deploymentID (default: device.deployment_id)")
    p.add_argument("--latitude", type=float, help="deployment latitude (default: device.latitude)")
    p.add_argument("--longitude", type=float, help="deployment longitude (default: device.longitude)")
    p.add_argument("--timezone", help="zone of naive camera timestamps (default: device.timezone or UTC)")
    p.add_argument("--root", action="append", default=[], help="watch folder that file paths are relative to")
    p.add_argument("--classified-by", default="camtrap-cascade", help="classifiedBy value (e.g. bundle version)")
    p.set_defaults(func=_export_camtrapdp)
