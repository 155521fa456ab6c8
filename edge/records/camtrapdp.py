"""Camtrap DP 1.0.2 packages (TDWG): what biologists publish and analyse.

Why: the deployment's effort stays complete. An empty frame that the device deleted still
appears, as a media row plus a ``blank`` observation, so detection rates per trap-day stay right.
Format: https://camtrap-dp.tdwg.org (the 1.0.2 profile and table schemas; a test validates what
is written here against the official files with frictionless).

Invariants:
- Pure mapping (ledger rows or hand-made ``MediaResult`` in, rows and the descriptor out); only
  ``write_camtrapdp`` touches files, each written atomically (edge/atomic.py).
- Every value written fits the schema whatever the camera named its files: ``filePath`` and
  ``fileName`` are percent-encoded where the schema or CSV cannot carry a character (control
  characters such as a newline, bytes that are not UTF-8, '%' itself: edge/records/common.py
  ``safe_name``, the rule the MegaDetector file shares; plus a leading '.', '/' or '~', and
  '..'), so the name is still exact and reversible (``urllib.parse.unquote``).
- No absolute device path leaves the device: comments name files relative to the watch folder.
- One capture, one media row: a quarantined row whose file was later replaced at the same path
  (the camera was still writing it) is left out; the replacement is the capture. Earlier files
  at a reused path that were classified are real captures and stay.
- A media ``timestamp`` that is not the camera's (an implausible EXIF time refused by
  edge/events.py ``frame_time``) says so in ``mediaComments``, and its deployment gets
  ``timestampIssues`` true.
- ``fileMediatype`` is the format read from the file's bytes (the daemon stores it in the
  result), not its name: a PNG named .jpg is image/png.
- One observation row per animal (count 1): when the cascade merged boxes of one animal that
  claimed different species, the kept species is the row and the others (``Detection.also``)
  stay on it as ``alternative:<class>=<score>`` tags and a comment, never as extra rows.
- ``scientificName`` is a scientific name or empty, never a model class name: it comes from the
  bundle manifest's ``taxonomy`` (``ProjectMeta.taxa``); the class name travels in
  ``observationTags`` as ``class:<name>`` so nothing is lost when a class has no taxon.
"""

from __future__ import annotations

import csv
import io
import json
import mimetypes
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from edge.atomic import atomic_write_bytes
from edge.ledger import GONE
from edge.manifest import Taxon
from edge.records.common import MEDIA_TYPES, BoxNorm, escape_char, normalise_box, safe_name, species_kind

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


Alternatives = tuple[tuple[str, float], ...]  # (model class, score): other species of the same animal
# (model class, score, bbox_norm or None[, alternatives]): one animal, one box
MediaDetection = tuple[str, float, BoxNorm | None] | tuple[str, float, BoxNorm | None, Alternatives]


@dataclass(frozen=True)
class MediaResult:
    """One image as the device saw it: where, when, what the cascade found, what became of it.

    ``detections`` are (model class, score, bbox_norm or None), optionally with the other
    species claimed for the same animal by boxes the cascade merged into it (``Detection.also``).
    ``disposed`` is None while the file is still where the camera put it, else 'deleted' or
    'moved' (the media row stays, so the effort of the deployment stays complete). ``failure``
    marks an image that could not be read. ``file_path`` and ``file_name`` are already
    schema-safe (see :func:`media_path`).
    """

    media_id: str
    deployment_id: str
    timestamp: datetime  # tz-aware
    file_path: str  # relative to the watch folder, forward slashes
    file_name: str
    media_type: str = "image/jpeg"
    detections: tuple[MediaDetection, ...] = ()
    disposed: str | None = None
    event_id: str | None = None
    failure: str | None = None
    classified_at: datetime | None = None
    timestamp_issue: str | None = None  # the camera's time was refused (edge/events.py frame_time)
    gone: bool = False  # the file went away before the device read it: not classified, not unreadable


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
    """Package-level metadata (datapackage.json) and the taxa of the model's classes."""

    title: str = "camtrap cascade edge deployment"
    sampling_design: str = "opportunistic"
    contributors: tuple[Mapping[str, str], ...] = ()
    data_license: str = "CC0-1.0"
    media_license: str = "CC-BY-4.0"
    name: str = "camtrap-edge"
    description: str | None = None
    classified_by: str = "camtrap-cascade"
    taxa: Mapping[str, Taxon] = field(default_factory=dict)  # model class -> taxon (manifest.taxonomy)


# --- names the schema can carry ------------------------------------------------------------------
def media_path(path: str | bytes, roots: Sequence[str | os.PathLike[str]] = ()) -> str:
    """A Camtrap DP ``filePath`` for a device file: relative to the first watch folder that holds
    it (else the path without its root), forward slashes, and matching the schema's pattern
    (no leading '.', '/' or '~'; no '..' anywhere): see :func:`safe_name`."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    p = PurePosixPath(text)
    rel: str | None = None
    for r in roots:
        try:
            rel = p.relative_to(PurePosixPath(os.fsdecode(os.fspath(r)))).as_posix()
            break
        except ValueError:
            continue
    if rel is None:
        rel = "/".join(part for part in p.parts if part not in ("/", "", ".", ".."))
    out = safe_name(rel) or "file"
    out = out.replace("..", ".%2E")  # the pattern refuses '..' even inside a name ("IMG..JPG")
    if out[0] in "./~":
        out = f"%{ord(out[0]):02X}{out[1:]}"
    return out


_ABS_PATH = re.compile(r"(?<![\w.~%-])/(?:[^\s/:;,'\"()]+/)*([^\s/:;,'\"()]+)")


def _scrub(text: str, own_path: str, rel: str, roots: Sequence[str]) -> str:
    """A comment without absolute device paths: the image's own path becomes its filePath, a
    watch folder is dropped, any other absolute path keeps only its last component; control
    characters are escaped so the comment stays one line."""
    if own_path:
        text = text.replace(own_path, rel)
    for r in roots:
        if r and r != "/":
            text = text.replace(r.rstrip("/") + "/", "")
    text = _ABS_PATH.sub(lambda m: m.group(1), text)
    return "".join(escape_char(c) if c != "%" else c for c in text)


# --- rows ---------------------------------------------------------------------------------------
def _ts(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError(f"timestamp {t.isoformat()} has no time zone (Camtrap DP needs one)")
    return t.isoformat(timespec="seconds")


def _num(v: float | None, nd: int = 4) -> str:
    return "" if v is None else f"{round(float(v), nd):g}"


def observation_type(species: str) -> str:
    return species_kind(species)


def camtrapdp_media_row(m: MediaResult) -> dict[str, str]:
    comments = []
    if m.disposed:
        comments.append(f"file {m.disposed} on the device after it was classified blank")
    if m.gone:
        comments.append(f"not classified: {GONE}")
    elif m.failure:
        comments.append(f"not classified: {m.failure}")
    if m.timestamp_issue:
        comments.append(f"timestamp not from the camera: {m.timestamp_issue}")
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
    if m.gone or m.failure:
        why = f"not classified: {GONE}" if m.gone else f"image could not be read: {m.failure}"
        return [{**base, "observationID": f"{m.media_id}_0", "observationType": "unclassified",
                 "observationComments": why}]  # fmt: skip
    if not m.detections:
        return [{**base, "observationID": f"{m.media_id}_0", "observationType": "blank",
                 "classificationMethod": "machine", "classifiedBy": meta.classified_by,
                 "classificationTimestamp": when}]  # fmt: skip
    rows = []
    for k, (species, score, bbox, *more) in enumerate(sorted(m.detections, key=lambda d: -d[1]), start=1):
        otype = observation_type(species)
        taxon = meta.taxa.get(species)
        also: Alternatives = more[0] if more else ()
        row = {
            **base,
            "observationID": f"{m.media_id}_{k}",
            "observationType": otype,
            "scientificName": taxon.scientific_name if taxon is not None and otype == "animal" else "",
            "count": "1",
            "classificationMethod": "machine",
            "classifiedBy": meta.classified_by,
            "classificationTimestamp": when,
            "classificationProbability": _num(min(max(score, 0.0), 1.0)),
            "observationTags": "|".join([f"class:{_tag(species)}",
                                         *(f"alternative:{_tag(sp)}={_num(p, 3)}" for sp, p in also)]),
            "observationComments": _alternatives_comment(also, meta.taxa),
        }
        if bbox is not None and bbox[2] > 0 and bbox[3] > 0:
            row.update(bboxX=_num(bbox[0]), bboxY=_num(bbox[1]), bboxWidth=_num(bbox[2]), bboxHeight=_num(bbox[3]))
        rows.append(row)
    return rows


def _tag(name: str) -> str:
    """A model class name as an observationTags value (pipe-separated list: '|' encoded)."""
    return safe_name(name).replace("|", "%7C")


def _alternatives_comment(also: Alternatives, taxa: Mapping[str, Taxon]) -> str:
    """The other species the cascade saw in the same animal's box, for a reader of the table:
    an observation is one animal (a second row would count it twice), so its runner-up
    classifications travel here and in ``alternative:`` tags rather than as rows."""
    if not also:
        return ""

    def name(sp: str) -> str:
        t = taxa.get(sp)
        return f"{t.scientific_name} ({safe_name(sp)})" if t is not None and t.scientific_name else safe_name(sp)

    return "same box also classified as " + ", ".join(f"{name(sp)} {p:.2f}" for sp, p in also)


def camtrapdp_deployment_rows(deployments: Sequence[DeploymentInfo], media: Sequence[MediaResult]) -> list[dict]:
    times: dict[str, list[datetime]] = {}
    issues: set[str] = set()  # deployments with a media timestamp that is not the camera's
    for m in media:
        times.setdefault(m.deployment_id, []).append(m.timestamp)
        if m.timestamp_issue:
            issues.add(m.deployment_id)
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
            "timestampIssues": "true" if d.deployment_id in issues else "",
            "deploymentComments": d.comments or "",
        })  # fmt: skip
    return rows


def _package_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "camtrap-edge"


def taxonomic_coverage(observation_rows: Iterable[Mapping[str, str]], taxa: Mapping[str, Taxon]) -> list[dict]:
    """The descriptor's ``taxonomic`` list: one entry per scientificName observed, with its
    rank, identifier and vernacular name when the taxonomy gives them."""
    by_name = {t.scientific_name: t for t in taxa.values()}
    out = []
    for name in sorted({r["scientificName"] for r in observation_rows if r.get("scientificName")}):
        entry: dict[str, Any] = {"scientificName": name}
        t = by_name.get(name)
        if t is not None:
            if t.taxon_id:
                entry["taxonID"] = t.taxon_url
            if t.rank:
                entry["taxonRank"] = t.rank
            entry["vernacularNames"] = {t.language: t.vernacular_name}
        out.append(entry)
    return out


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
        "taxonomic": taxonomic_coverage(observation_rows, meta.taxa),
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


# --- from ledger rows (edge/ledger.py ImageRow; read by edge/commands/records.py) ---------------
def _detections_from_result(result: Mapping[str, Any]) -> tuple[MediaDetection, ...]:
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
        also = tuple((str(sp), float(p)) for sp, p in d.get("also") or ())
        out.append((str(d["species"]), float(d["score"]), tuple(bbox) if bbox else None, also))
    return tuple(out)


def media_result_from_row(row: Any, *, deployment_id: str, tz: Any = timezone.utc,
                          roots: Sequence[str | os.PathLike[str]] = ()) -> MediaResult | None:
    """One ledger ``ImageRow`` -> MediaResult; None for images that are not a capture to report:
    not classified yet (seen, processing: not effort yet), or quarantined (or gone) and since
    replaced by a new file at the same path (the same capture, rewritten: the replacement row
    reports it). Quarantined images become unclassified media with the reason; images whose file
    went away before they were read (``gone``) unclassified media that say so."""
    if row.state not in ("done", "disposed", "quarantined", "gone"):
        return None
    if row.state in ("quarantined", "gone") and getattr(row, "superseded", None) is not None:
        return None
    result = row.result or {}
    gone = row.state == "gone"
    failure = (row.error or "quarantined") if row.state == "quarantined" else result.get("failure")
    disposed = None
    if row.state == "disposed" and row.disposal and row.disposal != "kept":
        disposed = "moved" if row.disposal.startswith("moved") else "deleted" if row.disposal == "deleted" \
            else row.disposal
    when = datetime.fromtimestamp(row.taken_at if row.taken_at is not None else row.mtime, tz=timezone.utc)
    rel = media_path(row.path, roots)
    name = rel.rsplit("/", 1)[-1]
    root_texts = [os.fsdecode(os.fspath(r)) for r in roots]
    return MediaResult(
        media_id=str(row.id),
        deployment_id=deployment_id,
        timestamp=when.astimezone(tz),
        file_path=rel,
        file_name=name,
        media_type=media_type(result.get("format"), os.fsdecode(row.path)),
        detections=() if failure or gone else _detections_from_result(result),
        disposed=disposed,
        event_id=None if row.event_id is None else str(row.event_id),
        failure=_scrub(str(failure), os.fsdecode(row.path), rel, root_texts) if failure else None,
        gone=gone,
        classified_at=datetime.fromtimestamp(row.updated, tz=timezone.utc).astimezone(tz) if row.updated else None,
        timestamp_issue=_scrub(str(result["time_issue"]), "", rel, root_texts) if result.get("time_issue") else None,
    )


def media_type(fmt: object, path: str) -> str:
    """The ``fileMediatype`` of an image: from the format the reader sniffed from its bytes
    (``format`` of a stored result: a PNG named .jpg is image/png), else (unreadable images,
    results stored before the format was) from the file name's extension, else image/jpeg."""
    if isinstance(fmt, str) and fmt in MEDIA_TYPES:
        return MEDIA_TYPES[fmt]
    guess = mimetypes.guess_type(path, strict=False)[0]
    return guess if guess and guess.startswith(("image/", "video/", "audio/")) else MEDIA_TYPES["JPEG"]


def media_results(rows: Iterable[Any], *, deployment_id: str, tz: Any = timezone.utc,
                  roots: Sequence[str | os.PathLike[str]] = ()) -> list[MediaResult]:
    """Every capture to report among ledger rows (see :func:`media_result_from_row`), in order."""
    out = []
    for row in rows:
        m = media_result_from_row(row, deployment_id=deployment_id, tz=tz, roots=roots)
        if m is not None:
            out.append(m)
    return out
