"""The device config: one YAML file, typed, documented by its own fields.

Why pydantic with ``extra="forbid"`` and a title + description on every field: an unknown or
misspelt key is an error, not a silent default, and docs/config.md is generated from this
module (``config_reference_markdown()``), so the reference cannot drift from the code.

Secrets never live in the file in clear if you do not want them to: any string may use
``${ENV_VAR}`` (or ``${ENV_VAR:-default}``; ``$${`` is a literal ``${``), and secret fields
have ``*_env`` / ``*_file`` siblings. Secrets are ``SecretStr`` and are never printed.

Relative paths are resolved against the config file's folder. Paths left unset derive from
``paths.state_dir`` (default /var/lib/camtrap-edge).
"""

from __future__ import annotations

import argparse
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from edge.configpath import ConfigPath
from edge.engines import EngineSettings
from edge.engines.onnxruntime import OnnxRuntimeConfig
from edge.imageio import DEFAULT_MAX_MEGAPIXELS, PILLOW_MAX_MEGAPIXELS
from edge.keys import SYSTEM_KEYS_DIR
from edge.manifest import CascadeSettings
from edge.numbers import NoBoolNumbers
from edge.updates_config import UpdatesSection

DEFAULT_CONFIG_PATH = Path("/etc/camtrap-edge/config.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/camtrap-edge")


# --- building blocks -------------------------------------------------------------------------
class Section(NoBoolNumbers):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# --- sections --------------------------------------------------------------------------------
class DeviceSection(Section):
    """Who this device is and where it stands (used in MQTT topics and Camtrap DP deployments)."""

    id: str = Field(
        title="Device id",
        description="Unique name of this device; part of MQTT topics (camtrap/<id>/...), so letters, "
        "digits, '-' and '_' only.",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
    )
    deployment_id: str | None = Field(
        default=None,
        title="Deployment id",
        description="Camtrap DP deploymentID of the current placement; change it when the camera moves. "
        "Default: the device id.",
        min_length=1,
    )
    location_id: str | None = Field(default=None, title="Location id", description="Camtrap DP locationID.")
    location_name: str | None = Field(
        default=None, title="Location name", description="Camtrap DP locationName, human-readable."
    )
    latitude: float | None = Field(
        default=None, ge=-90, le=90, title="Latitude", description="WGS84 decimal degrees (Camtrap DP needs it)."
    )
    longitude: float | None = Field(
        default=None, ge=-180, le=180, title="Longitude", description="WGS84 decimal degrees (Camtrap DP needs it)."
    )
    coordinate_uncertainty_m: int | None = Field(
        default=None, ge=1, title="Coordinate uncertainty", description="Metres (Camtrap DP coordinateUncertainty)."
    )
    camera_model: str | None = Field(
        default=None, title="Camera model", description="Make-model of the trap, e.g. Reconyx-HF2X."
    )
    camera_height_m: float | None = Field(
        default=None, ge=0, title="Camera height", description="Metres above ground (Camtrap DP cameraHeight)."
    )
    timezone: str = Field(
        default="UTC",
        title="Camera clock time zone",
        description="IANA zone of the camera clock; EXIF DateTimeOriginal carries no zone, so it is read "
        "in this one (e.g. Europe/Madrid).",
    )

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, v: str) -> str:
        if v != "UTC":
            import zoneinfo

            try:
                zoneinfo.ZoneInfo(v)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r} (e.g. Europe/Madrid)") from None
        return v


class WatchSection(Section):
    """Where trigger images land (camera SD sync, FTP upload, rsync)."""

    folders: list[ConfigPath] = Field(
        min_length=1, title="Watched folders", description="Folders the cameras write into."
    )
    recursive: bool = Field(default=True, title="Recursive", description="Also watch sub-folders.")
    polling: bool = Field(
        default=False,
        title="Polling observer",
        description="Poll instead of inotify; needed for network mounts (NFS, SMB) where inotify sees "
        "nothing.",
    )
    poll_interval_s: float = Field(
        default=5.0, gt=0, title="Poll interval", description="Seconds between polls when polling is on."
    )
    reconcile_every_s: float = Field(
        default=300.0,
        gt=0,
        title="Reconcile interval",
        description="Seconds between full folder scans that catch files inotify missed (queue overflow, "
        "files written while the daemon was down).",
    )
    settle_s: float = Field(
        default=2.0,
        ge=0,
        title="Settle time",
        description="A file that merely appears (polling, start-up scan, a creation not yet closed) must "
        "stay unchanged this long before it is read (half-written uploads). Files closed after writing, "
        "renamed or moved in are read at once.",
    )
    patterns: list[str] = Field(
        default_factory=lambda: ["*.jpg", "*.jpeg", "*.png"],
        min_length=1,
        title="File patterns",
        description="Glob patterns of image names, matched case-insensitively.",
    )
    max_megapixels: float = Field(
        default=DEFAULT_MAX_MEGAPIXELS,
        gt=0,
        le=PILLOW_MAX_MEGAPIXELS,
        title="Largest image",
        description="Images (any format) above this many megapixels, read from the header, are "
        "quarantined without being decoded (memory bombs); decoded memory stays below 3 bytes a pixel "
        f"of it. At most {PILLOW_MAX_MEGAPIXELS} (Pillow refuses larger images outright).",
    )


class BundleSection(Section):
    """The model bundle the device runs."""

    path: ConfigPath | None = Field(
        default=None,
        title="Bundle path",
        description="Bundle folder or .tar. Default: <state_dir>/models/current.",
    )
    public_keys_dir: ConfigPath | None = Field(
        default=SYSTEM_KEYS_DIR,
        title="Public keys folder",
        description="Folder of trusted Ed25519 public keys (*.pub, PEM) for bundle signatures.",
    )
    require_signature: bool = Field(
        default=True,
        title="Require signature",
        description="Refuse bundles without a valid signature from a trusted key (turn off only for "
        "development).",
    )

    @model_validator(mode="after")
    def _keys_when_required(self) -> BundleSection:
        if self.require_signature and self.public_keys_dir is None:
            raise ValueError("public_keys_dir: must be set when require_signature is true")
        return self


def overrides_of(model: type[BaseModel], name: str) -> type[Section]:
    """A config section with every field of ``model``, optional: unset (null) keeps the model's own value.

    Each field keeps its title, description and bounds, so the section refuses exactly what
    ``model`` refuses, and a field added to ``model`` is overridable without another edit here.
    """
    fields: dict[str, Any] = {}
    for n, f in model.model_fields.items():
        annotation: Any = f.annotation
        fields[n] = (annotation | None, FieldInfo.merge_field_infos(f, default=None))
    return create_model(name, __base__=Section, __module__=__name__, **fields)


_CascadeOverrides = overrides_of(CascadeSettings, "_CascadeOverrides")


def _has_off_state(annotation: Any) -> bool:
    """Whether a setting's type takes None (its off state, e.g. ``gate_threshold: null``)."""
    return type(None) in typing.get_args(annotation)


class CascadeSection(_CascadeOverrides):  # type: ignore[misc,valid-type]  # fields made from CascadeSettings
    """Overrides of the bundle's cascade settings: a key left out keeps the bundle's value; null
    turns off a setting that has an off state (gate_threshold, background_stop,
    background_max_experts, route_reuse) and keeps the bundle's value for one that has none."""

    disable_gate: bool = Field(
        default=False,
        title="Disable gate",
        description="Always run the all-experts pass on empty frames, whatever the bundle says.",
    )

    @model_validator(mode="after")
    def _gate(self) -> CascadeSection:
        if self.disable_gate and self.gate_threshold is not None:
            raise ValueError("gate_threshold: set gate_threshold or disable_gate, not both")
        return self

    def apply(self, settings: CascadeSettings) -> CascadeSettings:
        """The bundle's settings with the fields set here replacing theirs, validated again as a whole:
        each field's bounds were checked with the config, but a rule between fields (background_stop
        at least expert_floor) can only be checked against the bundle's values, here; it fails as
        one line naming the section, not a pydantic dump."""
        given = self.model_dump(include=self.model_fields_set - {"disable_gate"})  # the keys the file has
        off = {n for n, f in CascadeSettings.model_fields.items() if _has_off_state(f.annotation)}
        values = settings.model_dump() | {k: v for k, v in given.items() if v is not None or k in off}
        if self.disable_gate:
            values["gate_threshold"] = None
        try:
            return CascadeSettings.model_validate(values)
        except ValidationError as e:
            err = e.errors(include_url=False, include_input=False)[0]
            where = ".".join(map(str, err["loc"]))
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ValueError(f"cascade{'.' + where if where else ''}: {msg} (the config's overrides on the "
                             "bundle's cascade settings)") from None


class EventsSection(Section):
    """Grouping of burst frames into events (one answer per event)."""

    gap_s: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        title="Event gap",
        description="Frames of the same folder at most this many seconds apart belong to one event.",
    )
    clock: Literal["exif", "mtime"] = Field(
        default="exif",
        title="Clock",
        description="exif: EXIF DateTimeOriginal when plausible (not before 2001, not after the file was "
        "written), else the file mtime; mtime: always the file mtime (for cameras whose clock is not trusted).",
    )


from edge.mqtt_config import MqttConfig as MqttSection  # noqa: E402 - the mqtt: section has its own module


class AlertsSection(Section):
    """Watch-list species published on the alerts topic."""

    species: list[str] = Field(
        default_factory=list,
        title="Watch-list species",
        description="Species that raise an alert: class names, short codes (e.g. lypa), or scientific or "
        "vernacular names from the bundle's taxonomy, in any case; a name the model lacks is logged at start.",
    )
    min_score: float = Field(
        default=0.5, ge=0, le=1, title="Alert score", description="Least confidence that raises an alert."
    )


class TelemetrySection(Section):
    """Periodic health counters on the telemetry topic."""

    every_s: float = Field(
        default=300.0, ge=5, title="Telemetry interval", description="Seconds between telemetry messages."
    )


class DisposalSection(Section):
    """What happens to empty frames once their result is committed."""

    policy: Literal["keep", "move", "delete"] = Field(
        default="keep",
        title="Policy",
        description="keep, move (to move_to) or delete empty frames; frames with any animal above floor "
        "are always kept.",
    )
    move_to: ConfigPath | None = Field(
        default=None,
        title="Move target",
        description="Folder for moved empties (policy: move); must not be inside a watched folder.",
    )
    audit_rate: float = Field(
        default=0.01,
        ge=0,
        le=1,
        title="Audit rate",
        description="Fraction of empties kept in audit_dir for a person to check the model.",
    )
    audit_dir: ConfigPath | None = Field(
        default=None, title="Audit folder", description="Where audit samples go. Default: <state_dir>/audit."
    )
    floor: float = Field(
        default=0.1,
        ge=0,
        le=1,
        title="Animal floor",
        description="A frame in which any model saw an animal at or above this score is never disposed.",
    )
    min_free_mb: int = Field(
        default=512,
        ge=0,
        title="Least free space",
        description="Below this many MB free on the fullest filesystem involved (the watch folder's, the "
        "state folder's, move_to's and audit_dir's), disposal pauses with an alarm: empties stay pending "
        "and are disposed of when space returns (a ledger that cannot commit cannot record a disposal).",
    )

    @model_validator(mode="after")
    def _move_target(self) -> DisposalSection:
        if self.policy == "move" and self.move_to is None:
            raise ValueError("move_to: must be set when policy is move")
        return self


class LedgerSection(Section):
    """The SQLite ledger: every image's state, its result, the message outbox (bound: mqtt.max_outbox)."""

    path: ConfigPath | None = Field(
        default=None, title="Ledger file", description="SQLite file. Default: <state_dir>/ledger.sqlite3."
    )


class Contributor(Section):
    """A person or organisation credited in the Camtrap DP package."""

    title: str = Field(min_length=1, title="Name", description="Person or organisation name.")
    email: str | None = Field(default=None, title="E-mail", description="Contact address.")
    role: Literal["contact", "principalInvestigator", "rightsHolder", "publisher", "contributor"] = Field(
        default="contributor", title="Role", description="Camtrap DP contributor role."
    )
    organization: str | None = Field(default=None, title="Organisation", description="Affiliation.")


class ProjectSection(Section):
    """Project metadata for the Camtrap DP package (datapackage.json)."""

    title: str = Field(
        default="camtrap cascade edge deployment", min_length=1, title="Project title", description="project.title."
    )
    sampling_design: Literal[
        "simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted", "opportunistic"
    ] = Field(default="opportunistic", title="Sampling design", description="project.samplingDesign.")
    contributors: list[Contributor] = Field(
        default_factory=list,
        title="Contributors",
        description="People and organisations; empty = the device itself as contributor.",
    )
    data_license: str = Field(
        default="CC0-1.0", title="Data licence", description="SPDX id of the licence of the data tables."
    )
    media_license: str = Field(
        default="CC-BY-4.0", title="Media licence", description="SPDX id of the licence of the images."
    )


class RecordsSection(Section):
    """Result files kept on the device besides the ledger."""

    md_json: ConfigPath | None = Field(
        default=None,
        title="MegaDetector JSON",
        description="MegaDetector batch output (format 1.6) appended with every result. "
        "Default: <state_dir>/records/md_results.json.",
    )
    md_flush_every: int = Field(
        default=50,
        ge=1,
        title="JSON rewrite interval",
        description="Results between atomic rewrites of md_json, at least (each result is journalled and "
        "fsynced at once, so none is lost in between); the interval also grows to a tenth of the images "
        "held, so a file of 50,000 images is rewritten every 5,000 results and each result's share stays small.",
    )
    camtrapdp_dir: ConfigPath | None = Field(
        default=None,
        title="Camtrap DP folder",
        description="Where export-camtrapdp writes by default. Default: <state_dir>/records/camtrapdp.",
    )
    project: ProjectSection = Field(
        default_factory=ProjectSection, title="Project", description="Camtrap DP project metadata."
    )


class PathsSection(Section):
    """Where the daemon keeps its state. Unreadable files are not moved: they stay where the camera
    wrote them, marked quarantined in the ledger (a file still being uploaded that was taken for
    truncated is picked up again, as a new image, when its writer finishes it)."""

    state_dir: ConfigPath = Field(
        default=DEFAULT_STATE_DIR,
        title="State folder",
        description="Ledger, models, engines, records (systemd StateDirectory).",
    )


class Config(Section):
    """camtrap-edge device configuration (/etc/camtrap-edge/config.yaml)."""

    device: DeviceSection = Field(title="Device", description="Identity and placement of this device.")
    watch: WatchSection = Field(title="Watch", description="Folders the cameras write into.")
    bundle: BundleSection = Field(
        default_factory=BundleSection, title="Bundle", description="The model bundle and its signature check."
    )
    engine: EngineSettings = Field(
        default_factory=OnnxRuntimeConfig,
        title="Engine",
        description="The inference backend and its settings: the backend's own config, chosen by type.",
    )
    cascade: CascadeSection = Field(
        default_factory=CascadeSection, title="Cascade", description="Overrides of the bundle's cascade settings."
    )
    events: EventsSection = Field(
        default_factory=EventsSection, title="Events", description="Grouping of bursts into events."
    )
    mqtt: MqttSection | None = Field(
        default=None,
        title="MQTT",
        description="Broker connection; absent or null = no publishing (records and ledger only).",
    )
    alerts: AlertsSection = Field(
        default_factory=AlertsSection, title="Alerts", description="Watch-list species."
    )
    telemetry: TelemetrySection = Field(
        default_factory=TelemetrySection, title="Telemetry", description="Health counters."
    )
    disposal: DisposalSection = Field(
        default_factory=DisposalSection, title="Disposal", description="Empty-frame policy."
    )
    ledger: LedgerSection = Field(
        default_factory=LedgerSection, title="Ledger", description="SQLite ledger and outbox."
    )
    records: RecordsSection = Field(
        default_factory=RecordsSection, title="Records", description="MegaDetector JSON and Camtrap DP."
    )
    paths: PathsSection = Field(default_factory=PathsSection, title="Paths", description="State folders.")
    updates: UpdatesSection = Field(
        default_factory=UpdatesSection, title="Updates", description="Remote model updates (docs/updates.md)."
    )

    @model_validator(mode="after")
    def _derive(self) -> Config:
        """Fill paths left unset from state_dir, and refuse folders that would feed back into watch."""
        s = self.paths.state_dir
        self.bundle.path = self.bundle.path or s / "models" / "current"
        self.engine.cache_dir = self.engine.cache_dir or s / "engines"
        self.ledger.path = self.ledger.path or s / "ledger.sqlite3"
        self.records.md_json = self.records.md_json or s / "records" / "md_results.json"
        self.records.camtrapdp_dir = self.records.camtrapdp_dir or s / "records" / "camtrapdp"
        self.disposal.audit_dir = self.disposal.audit_dir or s / "audit"
        self.device.deployment_id = self.device.deployment_id or self.device.id
        for name, p in (
            ("disposal.move_to", self.disposal.move_to),
            ("disposal.audit_dir", self.disposal.audit_dir),
        ):
            for w in self.watch.folders:
                if p is not None and _inside(p, w):
                    raise ValueError(f"{name}: {p} is inside watched folder {w} (its files would be read again)")
        return self


def _inside(p: Path, folder: Path) -> bool:
    p, folder = Path(os.path.abspath(p)), Path(os.path.abspath(folder))
    return p == folder or folder in p.parents


# --- loading ---------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config that cannot be used; ``lines`` holds one line per bad field."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, where: str, problems: list[str]) -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string; collect unset variables as problems."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{where}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "$" in node:

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problems.append(f"{where}: environment variable {name} is not set")
            return ""

        return _ENV.sub(sub, node)
    return node


_UNION_TAG = re.compile(r"^[a-z][a-z0-9-]*(\[.*\])?$")


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    """('mqtt', 'port') -> 'mqtt.port'; list indices as [i]; pydantic's union/type tags dropped."""
    out = ""
    model: type[BaseModel] | None = Config
    tags: dict[str, type[BaseModel]] = {}
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if part in tags:  # the backend's tag in engine.<tag>.field: the field is engine.field
            model, tags = tags[part], {}
            continue
        fields = model.model_fields if model is not None else {}
        if part in fields:
            out += f".{part}" if out else part
            model, tags = _model_of(fields[part].annotation), _tagged_models(fields[part].annotation)
        elif model is not None or not _UNION_TAG.match(part):
            out += f".{part}" if out else part  # an unknown key: keep it, it is the error's subject
            model = None
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside X, X | None, list[X] (the first one, for a union of models)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _tagged_models(annotation: Any) -> dict[str, type[BaseModel]]:
    """A union of models told apart by ``type`` (the engine section): tag -> model; {} otherwise."""
    out: dict[str, type[BaseModel]] = {}
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "type" in arg.model_fields:
            out[str(arg.model_fields["type"].default)] = arg
        else:
            out.update(_tagged_models(arg))
    return out


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] | None = Config
    tags: dict[str, type[BaseModel]] = {}
    for part in loc[:-1]:
        if isinstance(part, str) and part in tags:
            model, tags = tags[part], {}
        elif isinstance(part, str) and model is not None and part in model.model_fields:
            ann = model.model_fields[part].annotation
            model, tags = _model_of(ann), _tagged_models(ann)
    return list(model.model_fields) if model is not None else []


def format_errors(source: str, exc: ValidationError) -> list[str]:
    """One line per bad field: '<file>: <field.path>: <message>' (input values are never echoed)."""
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        path = _loc_to_path(loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {', '.join(_allowed_keys(loc))})"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            # validators name their sub-field first ("timezone: ..."): fold it into the path
            token, _, tail = msg.partition(" ")
            if path and token.startswith(path + ".") and re.fullmatch(r"[a-z_.]+", token):
                msg = f"{token}: {tail}"  # "mqtt.prefix must end with '/'" -> path mqtt.prefix
            head, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[a-z_.]+", head):
                if not path or head == path or head.startswith(path + "."):
                    path, msg = head, rest  # the validator named the full path itself
                else:
                    path, msg = f"{path}.{head}", rest
        if path in seen:
            continue
        seen.add(path)
        lines.append(f"{source}: {path or '(top level)'}: {msg}")
    return lines


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate an already-parsed YAML document; ConfigError lists every bad field."""
    if data is None:
        raise ConfigError([f"{source}: empty config (expected a mapping with at least device and watch)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: top level must be a mapping, got {type(data).__name__}"])
    problems: list[str] = []
    data = _expand_env(data, "", problems)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(format_errors(source, e)) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config needs it: a key given twice is an error (YAML lets the later one win in
    silence), and anchors/aliases are refused (a dozen lines of them expand to billions of values,
    which hung check-config)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} refused (anchors and aliases are not allowed in the config)",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line
                if key_node.value in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} given twice (first on line {first[key_node.value] + 1}): "
                        "the later one would silently win", key_node.start_mark)
                first[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand ${ENV}, validate. Raises FileNotFoundError or ConfigError (a ValueError)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader (no python tags), stricter
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{p}: {where}not valid YAML: {problem}"]) from None
    return parse_config(data, str(p), base_dir=p.parent.absolute())


# --- summary and reference -------------------------------------------------------------------
def summary(cfg: Config) -> list[str]:
    """A few lines a person can check at a glance; secrets appear only as 'set'."""
    w = cfg.watch
    mode = f"polling every {w.poll_interval_s:g} s" if w.polling else "inotify"
    lines = [
        f"device: {cfg.device.id} (deployment {cfg.device.deployment_id}, clock {cfg.device.timezone})",
        f"watch: {', '.join(map(str, w.folders))} ({'recursive, ' if w.recursive else ''}{mode}, "
        f"reconcile every {w.reconcile_every_s:g} s, patterns {' '.join(w.patterns)})",
        f"bundle: {cfg.bundle.path} (signature "
        + (f"required, keys in {cfg.bundle.public_keys_dir})" if cfg.bundle.require_signature else "NOT required)"),
        f"engine: {cfg.engine.type} ("
        + ", ".join(f"{k} {v}" for k, v in cfg.engine.model_dump(exclude={"type"}).items()) + ")",
        f"events: gap {cfg.events.gap_s:g} s ({cfg.events.clock} clock)",
    ]
    m = cfg.mqtt
    if m is None:
        lines.append("mqtt: none (records and ledger only)")
    else:
        if m.password is not None:
            secret = " (password inline)"
        elif m.password_env:
            secret = f" (password from ${m.password_env})"
        elif m.password_file:
            secret = f" (password from {m.password_file})"
        else:
            secret = ""
        lines.append(
            f"mqtt: {m.host}:{m.port} MQTT {m.protocol}{' TLS' if m.tls is not None else ''}"
            + (f" as {m.username}" if m.username else "")
            + secret
            + f", topics {m.topic_prefix(cfg.device.id)}"
        )
    d = cfg.disposal
    target = f" to {d.move_to}" if d.policy == "move" else ""
    lines += [
        f"alerts: {', '.join(cfg.alerts.species) or 'none'} (score >= {cfg.alerts.min_score:g})",
        f"disposal: {d.policy}{target} (audit {d.audit_rate:.1%} to {d.audit_dir}, floor {d.floor:g}, "
        f"stop below {d.min_free_mb} MB free)",
        f"ledger: {cfg.ledger.path}",
        f"records: {cfg.records.md_json}; Camtrap DP in {cfg.records.camtrapdp_dir}",
    ]
    return lines


_RESERVED_DOMAINS = ("example", "example.com", "example.net", "example.org", "invalid", "test")
"""Names reserved for documentation (RFC 2606): a host under them is the example config's placeholder."""


def warnings(cfg: Config) -> list[str]:
    """Things that are valid but would stop the daemon on this machine (e.g. before the first install).

    ``check-config --strict`` (the unit's ExecStartPre, and install.sh before it enables the
    unit) fails on any of them; plain ``check-config`` prints them as warnings.
    """
    from edge.engines import engine_class

    out = [f"watch folder {f} does not exist (yet) or is not a folder" for f in cfg.watch.folders if not f.is_dir()]
    if cfg.bundle.path is not None and not cfg.bundle.path.exists():
        out.append(f"bundle {cfg.bundle.path} does not exist (yet)")
    if cfg.bundle.require_signature and cfg.bundle.public_keys_dir and not cfg.bundle.public_keys_dir.is_dir():
        out.append(f"public keys folder {cfg.bundle.public_keys_dir} does not exist")
    if cfg.mqtt is not None:
        host = cfg.mqtt.host.lower().rstrip(".")
        if any(host == d or host.endswith("." + d) for d in _RESERVED_DOMAINS):
            out.append(f"mqtt.host {cfg.mqtt.host} is a reserved example name that never resolves (RFC 2606): "
                       "set your broker")
    backend = engine_class(cfg.engine.type)
    if not backend.is_available():
        out.append(f"engine: the {cfg.engine.type} backend needs {', '.join(backend.requires)}, "
                   "not importable here")
    return out


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if _tagged_models(annotation):
        return "section, by `type`"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if annotation is SecretStr:
        return "secret"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return {"str": "string", "float": "number", "int": "integer", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__.lower().replace("posixpath", "path")
        )
    return str(annotation)


def _default_text(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value}`" if value != [] else "`[]`"
    if field.default is None:
        return "null"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    return f"`{field.default}`"


def _sections(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    yield prefix, model
    for name, f in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tagged = _tagged_models(f.annotation)
        if tagged:  # one table per backend: engine (type: onnxruntime), engine (type: tensorrt)
            for tag, backend in tagged.items():
                yield f"{key} (type: {tag})", backend
            continue
        sub = _model_of(f.annotation)
        if sub is not None:
            if typing.get_origin(f.annotation) is list:
                key += "[]"
            yield from _sections(sub, key)


def config_reference_markdown() -> str:
    """docs/config.md, generated from the model (a test keeps the file in step)."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by edge.config.config_reference_markdown(); do not edit by hand: run",
        "     python -m edge.config > docs/config.md -->",
        "",
        "One YAML file, by default `/etc/camtrap-edge/config.yaml`; check it with",
        "`camtrap-edge check-config FILE`. Unknown keys, keys given twice and YAML anchors/aliases are",
        "errors. Any string may use `${ENV_VAR}` or",
        "`${ENV_VAR:-default}` (`$$` is a literal `$`); secrets also have `*_env` and `*_file` forms and",
        "are never printed. Relative paths are relative to the config file's folder. See",
        "`systemd/config.example.yaml` for a commented example.",
        "",
    ]
    for key, model in _sections(Config, ""):
        if key:
            out += [f"## `{key}`", ""]
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            desc = (f"**{f.title}.** " if f.title else "") + (f.description or "")
            desc = desc.strip().replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")
            if desc and not desc.endswith((".", ".**")):
                desc += "."
            full = f"{key}.{name}" if key else name
            tagged = _tagged_models(f.annotation)
            if tagged:
                desc += " See " + ", ".join(f"[`{full} (type: {t})`](#{full.replace('.', '')}-type-{t})"
                                            for t in tagged) + "."
            elif _model_of(f.annotation) is not None:
                desc += f" See [`{full}`](#{full.replace('.', '').lower()})."
            out.append(f"| `{name}` | {_type_name(f.annotation)} | {_default_text(f)} | {desc} |")
        out.append("")
    return "\n".join(out)


# --- CLI -------------------------------------------------------------------------------------
def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        for line in e.lines:
            print(line)
        return 2
    # valid, but would not connect on this machine (missing variable or file); --strict adds
    # what would stop the daemon here. All of them at once, one line each.
    problems = cfg.mqtt.runtime_problems() if cfg.mqtt is not None else []
    notes = warnings(cfg)
    if args.strict:
        problems, notes = problems + notes, []
    if problems:
        for line in problems:
            print(f"{args.config}: {line}")
        return 2
    print(f"ok: {args.config}")
    for line in summary(cfg):
        print(f"  {line}")
    for line in notes:
        print(f"warning: {line}")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "check-config", help="validate a device config: 'ok' and a summary, or one line per bad field"
    )
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG_PATH), help="YAML config file")
    p.add_argument("--strict", action="store_true",
                   help="also fail (exit 2) on what would stop the daemon here: a missing watch folder, "
                   "bundle or keys folder, an engine backend whose runtime is not installed")
    p.set_defaults(func=_check_config)


if __name__ == "__main__":  # python -m edge.config > docs/config.md
    print(config_reference_markdown(), end="")
