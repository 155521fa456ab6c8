"""The model bundle's manifest: one schema shared by the writer (export/) and the device (pure).

A bundle is a folder (or a .tar of it)::

    manifest.json      this schema, canonical JSON (sorted keys, UTF-8)
    manifest.sig       Ed25519 signature over the exact bytes of manifest.json (optional)
    models/<name>.onnx one file per model, sha256 in the manifest
    samples/<file>     a few images; their expected outputs live in the manifest

The model is described by data so the code stays generic: layout, thresholds, classes and
short codes come from here, never from model-specific branches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from edge.detection import SAME_ANIMAL_IOU
from edge.numbers import NoBoolNumbers

SCHEMA_VERSION: Literal[1] = 1
Layout = Literal["yolov5", "yolov8", "end2end"]

MAX_INPUT_SIDE = 4096
"""The largest input side a manifest may ask for (MegaDetector v5 runs at 1280). A graph with a
dynamic input would otherwise be warmed up at whatever a manifest says: a batch at 60000 px is
tens of GB, the out-of-memory killer on a Jetson in the middle of an update's build."""
InputSide = Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)]
InputSize = Union[InputSide, tuple[InputSide, InputSide]]  # noqa: UP007 - pydantic evaluates it at run time
"""A model's letterboxed input in pixels: a square's side (640), or [height, width] ([480, 640]) for a
model exported at the camera's aspect: a 2048x1440 frame fills 640x450 of a 640 px square, so a
[480, 640] input gives the same answer on 0.75x the pixels (ultralytics' predict uses that rectangle)."""
IMGSZ_DESCRIPTION = "letterboxed input in pixels: a square's side, or [height, width]"


def input_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an input size given as a square's side or as [height, width]."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _one_size(v: object) -> object:
    """[s, s] is the square s, so a manifest has one spelling for each size (and the backbone's
    and a head's sizes compare equal however they were written)."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        return v[0]
    return v
_CODE = re.compile(r"^[a-z0-9]{1,8}$")


class _Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SizedInput(_Strict):
    """An entry with an ``imgsz`` (a model, the shared backbone): one spelling per size, and its
    (height, width)."""

    @field_validator("imgsz", mode="before", check_fields=False)
    @classmethod
    def _one_spelling(cls, v: object) -> object:
        return _one_size(v)

    @property
    def input_hw(self) -> tuple[int, int]:
        return input_hw(self.imgsz)  # type: ignore[attr-defined]


class ModelEntry(_SizedInput):
    """One ONNX model of the bundle."""

    name: str = Field(description="unique key: 'global' or the expert's group name")
    file: str = Field(description="path inside the bundle, e.g. models/global.onnx")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal["global", "expert"]
    group: str | None = Field(default=None, description="the expert's group; None for global")
    classes: list[str] = Field(min_length=1, description="class names in output index order")
    imgsz: InputSize = Field(description=IMGSZ_DESCRIPTION)
    layout: Layout = Field(description="yolov5 (objectness, as MegaDetector v5), yolov8 (v8/11), end2end")
    input_name: str = "images"
    conf_threshold: float = Field(default=0.25, ge=0, le=1, description="default per-box floor")
    class_thresholds: dict[str, float] = Field(default_factory=dict, description="per-class overrides")
    iou_threshold: float = Field(default=0.45, gt=0, le=1)
    frozen_layers: int = Field(default=0, ge=0, description="layers identical to the global backbone")
    backbone_sha256: str | None = Field(default=None, description="hash of the frozen tensors, if shared")
    head_inputs: list[str] = Field(
        default_factory=list,
        description="set when ``file`` is a head graph (neck + detect head after the frozen layers): the "
        "shared backbone's outputs it takes, instead of the image; empty = a whole model",
    )

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"model file must be a relative path inside the bundle, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if self.role == "expert" and not self.group:
            raise ValueError(f"expert model {self.name!r} needs a group")
        unknown = set(self.class_thresholds) - set(self.classes)
        if unknown:
            raise ValueError(f"model {self.name!r}: thresholds for unknown classes {sorted(unknown)}")
        return self

    def threshold(self, species: str) -> float:
        return self.class_thresholds.get(species, self.conf_threshold)


class BackboneEntry(_SizedInput):
    """The frozen layers shared by the global model and the experts, stored once: one graph from
    the letterboxed image to the tensors the heads read (``Manifest.backbone``)."""

    file: str = Field(description="path inside the bundle, e.g. models/backbone.onnx")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    imgsz: InputSize = Field(description=IMGSZ_DESCRIPTION)
    input_name: str = "images"
    outputs: list[str] = Field(min_length=1, description="the tensors the heads take, by name")
    frozen_layers: int = Field(gt=0, description="layers 0..frozen_layers-1 of every model that uses it")

    _relative = field_validator("file")(ModelEntry._relative.__func__)  # type: ignore[attr-defined]


class SampleEntry(_Strict):
    """A sample image with what each model is expected to output on it (self-test)."""

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        return ModelEntry._relative(v)

    file: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="checked on load")
    expected: dict[str, list[dict]] = Field(
        description="model name -> detections (Detection.to_dict form) at the model's thresholds"
    )


TaxonRank = Literal["kingdom", "phylum", "class", "order", "family", "genus", "species", "subspecies"]
_TAXON_ID = re.compile(r"^(?:(?:gbif|itis):\d+|https?://\S+)$")
_TAXON_URL = {"gbif": "https://www.gbif.org/species/{}",
              "itis": "https://www.itis.gov/servlet/SingleRpt/SingleRpt?search_topic=TSN&search_value={}"}


class Taxon(_Strict):
    """What a model class is, for people and for Camtrap DP (``scientificName``, ``taxonomic``).

    Model classes are short training labels ("red_deer"); records and displays need the taxon.
    Written by `camtrap-export prepare`/`bundle` from a taxonomy CSV (docs/taxonomy.md).
    """

    scientific_name: str = Field(min_length=1, max_length=200, description="e.g. Cervus elaphus")
    vernacular_name: str = Field(min_length=1, max_length=200, description="e.g. red deer")
    language: str = Field(default="eng", pattern=r"^[a-z]{3}$",
                          description="ISO 639-3 code of the vernacular name (Camtrap DP vernacularNames)")
    rank: TaxonRank | None = Field(default=None, description="Camtrap DP taxonRank, e.g. species")
    taxon_id: str | None = Field(default=None, description="gbif:<key>, itis:<TSN> or a URL of the taxon")

    @field_validator("scientific_name", "vernacular_name")
    @classmethod
    def _one_line(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c in v for c in "\r\n\t"):
            raise ValueError("must be one non-blank line")
        return v

    @field_validator("taxon_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not _TAXON_ID.match(v.strip()):
            raise ValueError(f"{v!r} is not gbif:<number>, itis:<number> or an http(s) URL")
        return None if v is None else v.strip()

    @property
    def taxon_url(self) -> str | None:
        """The identifier as a URL (Camtrap DP taxonID prefers a resolvable global identifier)."""
        if not self.taxon_id:
            return None
        scheme, _, key = self.taxon_id.partition(":")
        return _TAXON_URL[scheme].format(key) if scheme in _TAXON_URL else self.taxon_id


def species_label(species: str, taxonomy: dict[str, Taxon] | None) -> str:
    """How a model class is shown to people: 'red_deer (red deer, Cervus elaphus)', or the class
    name alone when the taxonomy does not know it."""
    t = (taxonomy or {}).get(species)
    return species if t is None else f"{species} ({t.vernacular_name}, {t.scientific_name})"


class CascadeSettings(_Strict):
    """The cascade's thresholds: the one definition (bounds included) of every cascade setting.

    The bundle carries them (``Manifest.cascade``), ``edge.cascade`` decides with them (its
    ``CascadePolicy`` is this class), and the device config's ``cascade:`` section is derived
    from these fields (``edge.config.CascadeSection``), so a value refused here is refused in
    a manifest, in a policy and in a config file alike, with the same bound.
    """

    route_threshold: float = Field(
        default=0.25, ge=0, le=1, title="Route threshold", description="Global-model score that routes to an expert."
    )
    expert_floor: float = Field(
        default=0.3, ge=0, le=1, title="Expert floor", description="Weakest expert vote accepted in the "
        "all-experts pass."
    )
    gate_threshold: float | None = Field(
        default=None, ge=0, le=1, title="Background gate",
        description="Global best-animal score below which an empty frame skips the all-experts pass "
        "(calibrated on validation data; null = never skip).",
    )
    merge_iou: float = Field(
        default=SAME_ANIMAL_IOU, gt=0, le=1, title="Same-animal IoU",
        description="IoU above which boxes (of any species or model) are one animal: the most confident "
        "one stays and the other species become its ranked alternatives.",
    )
    keep_unmatched_global: bool = Field(
        default=False, title="Keep unmatched global boxes",
        description="Keep a routed global box that no expert box overlaps (the paper drops it).",
    )
    background_stop: float | None = Field(
        default=None, ge=0, le=1, title="Background early stop",
        description="In the all-experts pass, run the experts one at a time, the group the global model "
        "scored highest (below the route threshold) first, and stop once an expert's best reaches this "
        "score (at least expert_floor); null = every expert runs (the paper's rule).",
    )

    background_max_experts: int | None = Field(
        default=None, ge=1, title="Background expert cap",
        description="In the all-experts pass, run at most this many experts: those of the groups the global "
        "model scored highest below the route threshold (its best score per group; ties in bundle order); "
        "null = every expert.",
    )
    route_reuse: float | None = Field(
        default=None, ge=0, le=1, title="Burst route reuse",
        description="Within an event (a burst), once a frame is routed with the global model's best and every "
        "routed expert's best at least this score, later frames of the event run only those experts, "
        "skipping the global model; a reused frame whose expert falls below it runs the whole cascade; "
        "null = off (every frame runs the whole cascade).",
    )
    route_reuse_frames: int = Field(
        default=3, ge=1, le=1000, title="Route reuse run",
        description="At most this many frames in a row reuse an event's route; the next one runs the whole "
        "cascade again (and renews the route), so a species entering the burst later is still found.",
    )

    @model_validator(mode="after")
    def _stop_above_floor(self) -> CascadeSettings:
        if self.background_stop is not None and self.background_stop < self.expert_floor:
            raise ValueError(f"background_stop {self.background_stop} is below expert_floor {self.expert_floor}: "
                             "the pass would stop on an answer it then drops")
        return self


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    bundle_version: str = Field(min_length=1, description="e.g. 2026.11.1; shown in status messages")
    created: str = Field(description="ISO 8601 UTC")
    models: list[ModelEntry] = Field(min_length=1)
    groups: dict[str, list[str]] = Field(description="group name -> species")
    codes: dict[str, str] = Field(description="species -> short code for compact messages, e.g. lyn")
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)
    backbone: BackboneEntry | None = Field(
        default=None, description="shared frozen layers; models with head_inputs run on its outputs")
    samples: list[SampleEntry] = Field(default_factory=list)
    provenance: dict = Field(default_factory=dict, description="dataset hash, training args, metrics")
    taxonomy: dict[str, Taxon] = Field(
        default_factory=dict,
        description="model class -> taxon, for every class of the global model (empty in bundles made "
        "before taxonomy was carried; records then leave scientificName empty)",
    )

    @model_validator(mode="after")
    def _check_taxonomy(self) -> Manifest:
        globals_ = [m for m in self.models if m.role == "global"]
        if not self.taxonomy or len(globals_) != 1:  # no global model: _check says so
            return self
        classes = globals_[0].classes
        unknown = sorted(set(self.taxonomy) - set(classes))
        if unknown:
            raise ValueError(f"taxonomy names classes the global model does not have: {unknown}")
        missing = [c for c in classes if c not in self.taxonomy]
        if missing:
            raise ValueError(f"taxonomy lacks classes of the global model: {missing}")
        return self

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names: {names}")
        globals_ = [m for m in self.models if m.role == "global"]
        if len(globals_) != 1:
            raise ValueError(f"a bundle needs exactly one global model, found {len(globals_)}")
        seen: dict[str, str] = {}
        for g, species in self.groups.items():
            for s in species:
                if s in seen:
                    raise ValueError(f"species {s!r} is in groups {seen[s]!r} and {g!r}")
                seen[s] = g
        for m in self.models:
            if m.role == "expert":
                if m.group not in self.groups:
                    raise ValueError(f"expert {m.name!r} names unknown group {m.group!r}")
                missing = set(self.groups[m.group]) - set(m.classes)
                if missing:
                    raise ValueError(f"expert {m.name!r} lacks classes of its group: {sorted(missing)}")
        for m in self.models:
            if m.head_inputs and self.backbone is None:
                raise ValueError(f"model {m.name!r} is a head graph but the bundle has no backbone")
            if m.head_inputs and self.backbone is not None:
                unknown = set(m.head_inputs) - set(self.backbone.outputs)
                if unknown or m.imgsz != self.backbone.imgsz:
                    raise ValueError(f"model {m.name!r}: head inputs {sorted(unknown)} / imgsz {m.imgsz} do not "
                                     f"match the backbone's outputs / imgsz {self.backbone.imgsz}")
        known = set(globals_[0].classes)
        if set(seen) - known:
            raise ValueError(f"grouped species not in the global model: {sorted(set(seen) - known)}")
        for s, c in self.codes.items():
            if not _CODE.match(c):
                raise ValueError(f"code {c!r} for {s!r} must be 1-8 lowercase letters or digits")
        if len(set(self.codes.values())) != len(self.codes):
            raise ValueError("species codes must be unique")
        return self

    # --- lookups -------------------------------------------------------------------------
    @property
    def global_model(self) -> ModelEntry:
        return next(m for m in self.models if m.role == "global")

    @property
    def experts(self) -> dict[str, ModelEntry]:
        """group name -> expert model."""
        return {m.group: m for m in self.models if m.role == "expert" and m.group}

    def model_files(self) -> list[tuple[str, str, str]]:
        """(path inside the bundle, sha256, what) of every graph file: the models and the shared
        backbone. The one list that verification, the update store and release walk."""
        out = [(m.file, m.sha256, f"model {m.name!r}") for m in self.models]
        if self.backbone is not None:
            out.append((self.backbone.file, self.backbone.sha256, "shared backbone"))
        return out

    def group_of(self, species: str) -> str | None:
        for g, members in self.groups.items():
            if species in members:
                return g
        return None

    def code(self, species: str) -> str:
        return self.codes.get(species, species[:8].lower())

    def pick_classes(self, names: list[str]) -> tuple[set[str], list[str]]:
        """The global model's classes that ``names`` pick, and the names that pick none. A name is
        a class name, its short code, or its taxonomy's scientific or vernacular name, in any case
        (a config written from a species list says "Lynx pardinus", not the class "lynx")."""
        aliases: dict[str, set[str]] = {}
        for c in self.global_model.classes:
            t = self.taxonomy.get(c)
            for alias in (c, self.code(c), *((t.scientific_name, t.vernacular_name) if t else ())):
                if alias:
                    aliases.setdefault(alias.lower(), set()).add(c)
        picked = {c for n in names for c in aliases.get(n.lower(), ())}
        return picked, [n for n in names if n.lower() not in aliases]

    # --- bytes ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Canonical bytes: what is hashed and signed."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not JSON ({e})") from None
        return cls.model_validate(raw)


def species_codes(species: list[str], known: dict[str, str] | None = None) -> dict[str, str]:
    """Short unique codes for species names (e.g. 'Lynx pardinus' -> 'lypa'), stable for a list.

    ``known`` codes (e.g. the paper's table codes) win; others derive from the name.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for s in species:
        if known and s in known:
            code = known[s]
        else:
            words = re.findall(r"[a-z0-9]+", s.lower()) or ["sp"]
            code = (words[0][:2] + words[1][:2]) if len(words) > 1 else words[0][:4]
            base, i = code, 2
            while code in used:
                code = f"{base[:6]}{i}"
                i += 1
        used.add(code)
        out[s] = code
    return out
