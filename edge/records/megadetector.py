"""MegaDetector batch output format 1.6: the entries, the document, its validator, and a
crash-safe appending writer.

Why this format: it is what Timelapse, AddaxAI and the MegaDetector post-processing tools read,
image by image. Format document: ``megadetector-output-format.md`` (agentmorris/MegaDetector).

Invariants:
- The mapping functions are pure (hand-made inputs in, dicts out); only ``MdBatchWriter`` does
  file work.
- ``MdBatchWriter`` keeps a JSON-lines journal and rewrites the JSON atomically
  (edge/atomic.py) every few results, so the JSON on disk is valid after any crash and the
  journal replays what the last rewrite missed. A result is durable when ``add``/``add_many``
  returns (``add_many(sync=False)``: when this process dies, at once; against a power cut, at
  the next ``sync()``). Cost: one fsync per call (``add_many``: a whole batch, one write and one
  fsync; the daemon writes a batch with ``sync=False`` before its ledger commit and calls
  ``sync()`` after it), or, when the rewrite is due, the rewrite's two (file and folder)
  instead of the journal's. The rewrite interval grows with the file (at least
  ``flush_every`` results, at least ``REWRITE_SHARE`` of the images held), so the cost per
  result stays constant: a rewrite of 50,000 images took 72 ms, and rewriting it every 50
  results made each result pay 1.4 ms.
- Classification category ids only grow: a new bundle never renumbers old results.
- One file is listed once; a redone image replaces its old entry.
- Every string is valid UTF-8 text (strict JSON readers refuse lone surrogates): ``file`` is the
  device name written by edge/records/common.py ``safe_name``, the rule Camtrap DP's
  ``filePath`` follows (bytes that are not UTF-8, control characters and '%' percent-encoded;
  ``urllib.parse.unquote_to_bytes`` gives the exact name back); a ``failure`` text escapes
  such bytes as ``\\xNN``. Entries an older writer stored with lone surrogates are re-encoded
  by this rule when the file is opened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeGuard

from edge.atomic import atomic_write_bytes
from edge.detection import Detection
from edge.records.common import has_surrogates, normalise_box, safe_name, species_kind

MD_FORMAT_VERSION = "1.6"
DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
_VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".wmv", ".m4v", ".mpg", ".mpeg", ".asf", ".3gp"}
MD_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def md_category(species: str) -> str:
    """MegaDetector detection category of a model class: '2' person, '3' vehicle, else '1' animal."""
    return {"human": "2", "vehicle": "3"}.get(species_kind(species), "1")


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
    for name, s in det.also:  # species of boxes merged into this animal (edge.cascade.one_box_per_animal)
        if name in ids:
            scores[name] = max(scores.get(name, 0.0), float(s))
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
    file = safe_name(file)
    if failure is not None:
        if detections:
            raise ValueError(f"{file}: an image with a failure cannot have detections")
        return {"file": file, "failure": _text(str(failure)), "detections": None}
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


def _text(text: str) -> str:
    """A message as valid UTF-8 text: an undecodable byte (lone surrogate) becomes ``\\xNN``."""
    if not has_surrogates(text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("unicode_escape").decode("ascii") if 0xD800 <= ord(c) <= 0xDFFF else c
                   for c in text)


def _upgraded(entry: dict) -> dict:
    """An entry an older writer stored with lone surrogates, in today's encoding (else as it is)."""
    f, failure = entry.get("file"), entry.get("failure")
    if isinstance(f, str) and has_surrogates(f):
        entry = {**entry, "file": safe_name(f)}
    if isinstance(failure, str) and has_surrogates(failure):
        entry = {**entry, "failure": _text(failure)}
    return entry


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


def _is_num(v: Any) -> TypeGuard[int | float]:
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
            where = f"images[{i}] ({_text(f)})"
            if has_surrogates(f):
                errors.append(f"{where}.file: holds a byte that is not UTF-8 (a lone surrogate): not valid "
                              "JSON text for strict readers; percent-encode it")
            if f in seen:
                errors.append(f"{where}: file listed more than once")
            seen.add(f)
        failure = im.get("failure")
        dets = im.get("detections")
        if failure is not None:
            if not isinstance(failure, str):
                errors.append(f"{where}.failure: must be a string or null")
            elif has_surrogates(failure):
                errors.append(f"{where}.failure: holds a lone surrogate: not valid JSON text for strict readers")
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
            for n, pair in enumerate(cl):
                if not (isinstance(pair, list) and len(pair) == 2):
                    errors.append(f"{dw}.classifications[{n}]: must be [class_id, conf]")
                    continue
                cid, c = pair
                if not _is_id(cid):
                    errors.append(f"{dw}.classifications[{n}]: id {cid!r} is not a string-formatted int")
                elif cid not in cls_cats:
                    errors.append(f"{dw}.classifications[{n}]: id {cid!r} is not in classification_categories")
                if not (_is_num(c) and 0 <= c <= 1):
                    errors.append(f"{dw}.classifications[{n}]: confidence must be a number in [0, 1]")
                else:
                    confs.append(c)
            if confs != sorted(confs, reverse=True):
                errors.append(f"{dw}.classifications: must be sorted by confidence, descending")
    return errors


REWRITE_SHARE = 0.1  # rewrite the JSON after at least this share of its images arrived anew


@dataclass(frozen=True)
class MdResult:
    """One image's result for ``MdBatchWriter.add_many`` (the arguments of ``add``)."""

    file: str
    detections: Sequence[Detection] | None = None
    image_size: tuple[int, int] | None = None
    failure: str | None = None


class MdBatchWriter:
    """Appends results to a MegaDetector batch JSON that stays valid through any crash.

    Each ``add`` is one fsynced line in ``<path>.journal`` (``add_many``: a batch's lines, one
    fsync); every ``flush_every`` results, or
    every ``REWRITE_SHARE`` x the images held if that is more (and on ``flush``/``close``), the
    whole JSON is rewritten atomically and the journal emptied.
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
        self.journal_path = self.journal_of(self.path)
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
        self._unsynced = False  # journal lines written without their fsync (add_many(sync=False))
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_path, "a+b")  # held for the writer's life
        try:
            fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._journal.close()
            raise ValueError(f"{self.journal_path}: another process is writing {self.path}") from None
        try:
            self._load_existing()
            self._replay_journal()
            self._extend_species(species)
            if self._pending or not self.path.exists():
                self.flush()
        except BaseException:  # e.g. a full disk: release the lock now, so a retry can take it
            self._journal.close()
            raise

    @staticmethod
    def journal_of(path: Path) -> Path:
        return path.with_name(path.name + ".journal")

    @classmethod
    def discard(cls, path: str | os.PathLike[str]) -> None:
        """Remove a results file and its journal, for a fresh run: a journal left by a killed run
        would otherwise be replayed into the new file (results of images the new run never saw)."""
        for p in (Path(path), cls.journal_of(Path(path))):
            p.unlink(missing_ok=True)

    # -- recovery ---------------------------------------------------------------------------
    def _load_existing(self) -> None:
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_bytes())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: not valid JSON ({e}); move it away to start a new file") from None
        upgraded = 0
        if isinstance(doc, dict) and isinstance(doc.get("images"), list):
            images = [_upgraded(im) if isinstance(im, dict) else im for im in doc["images"]]
            upgraded = sum(a is not b for a, b in zip(images, doc["images"], strict=True))
            doc["images"] = images
        problems = validate_md_output(doc)
        if problems:
            raise ValueError(f"{self.path}: not a MegaDetector results file: {problems[0]}")
        self._pending += upgraded  # rewritten in today's encoding by the next flush
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
                image = _upgraded(rec["image"])
                self._images.pop(image["file"], None)
                self._images[image["file"]] = image
                self._pending += 1
        if good != len(data):
            self._journal.truncate(good)
            os.fsync(self._journal.fileno())

    # -- writing ----------------------------------------------------------------------------
    def _append_journal(self, *recs: dict, sync: bool = True) -> None:
        """Lines, all whole or none at all, with ONE fsync (``sync``): a failed write (a full
        disk) is cut back, so the next line does not join a torn one (written unbuffered, so
        nothing half-sent stays queued: what is written survives this process dying)."""
        data = memoryview(b"".join(json.dumps(rec, separators=(",", ":")).encode() + b"\n" for rec in recs))
        fd = self._journal.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise

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
        return self.add_many([MdResult(file, detections, image_size, failure)])[0]

    def add_many(self, results: Sequence[MdResult], *, sync: bool = True) -> list[dict]:
        """Record a batch of images' results with ONE fsync (durable when this returns, all or
        none); returns the entries written. ``sync=False``: written to the journal (they
        survive this process dying) but made durable against a power cut only by the next
        ``sync()`` (the daemon: after the batch's ledger commit, off the message's path)."""
        with self._lock:
            known = len(self.species)
            self.species.extend(s for s in dict.fromkeys(d.species for r in results for d in r.detections or ())
                                if s not in self.species)
            try:
                entries = [md_image_entry(r.file, r.detections, self.species, image_size=r.image_size,
                                          failure=r.failure, model_classes=self.model_classes) for r in results]
                lines = ([{"species": list(self.species)}] if len(self.species) > known else [])
                self._write(lines + [{"image": e} for e in entries], entries, sync)
            except BaseException:  # nothing of it on disk: the ids it would have added are not taken
                del self.species[known:]
                raise
            return entries

    def add_entry(self, entry: Mapping) -> None:
        """Record a ready-made ``images[]`` entry (its class ids must be this writer's)."""
        entry = dict(entry)
        with self._lock:
            self._write([{"image": entry}], [entry], True)

    def _write(self, lines: list[dict], entries: list[dict], sync: bool) -> None:
        """Journal ``lines`` (one fsync when ``sync``) and hold ``entries``; when a rewrite is due,
        the rewrite alone makes them durable (the journal lines would be emptied at once)."""
        due = sync and self._due(len(entries))
        if not due:
            self._append_journal(*lines, sync=sync)
            self._unsynced = self._unsynced or not sync
        for entry in entries:
            self._images.pop(entry["file"], None)  # re-added at the end: newest result last
            self._images[entry["file"]] = entry
        self._pending += len(entries)
        if due:  # a failure leaves them held for the next rewrite; the caller retries (a redo replaces)
            self.flush()

    def _due(self, more: int = 0) -> bool:
        """Is a rewrite due once ``more`` results are added?"""
        return self._pending + more >= max(self.flush_every, REWRITE_SHARE * (len(self._images) + more))

    def sync(self) -> None:
        """Make what ``add_many(sync=False)`` wrote durable: the rewrite when it is due, else one
        fsync of the journal; nothing when nothing waits."""
        with self._lock:
            if self._due():
                self.flush()
            elif self._unsynced:
                os.fsync(self._journal.fileno())
                self._unsynced = False

    def document(self) -> dict:
        info = md_info(self.detector, self.classifier, **self._info_args)  # type: ignore[arg-type]
        return md_document(info, self.species, self._images.values())

    def flush(self) -> None:
        """Rewrite the JSON atomically, then empty the journal (its lines are now in the JSON)."""
        with self._lock:
            data = json.dumps(self.document(), separators=(",", ":")).encode() + b"\n"
            atomic_write_bytes(self.path, data)
            # not fsynced: a power cut that undoes the truncation replays lines the JSON already
            # holds (a redo replaces, harmlessly), and the next journal fsync makes it durable
            self._journal.truncate(0)
            self._pending = 0
            self._unsynced = False

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


