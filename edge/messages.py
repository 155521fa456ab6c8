"""Wire formats (pure): MQTT topic names and the payloads sent on them.

One place for every byte that leaves the device, so the daemon, the demo and ``camtrap-edge
decode`` cannot disagree.

Topics (``Topics``; the only place their names are spelt), under a prefix (default
``camtrap/<device_id>/``): ``status`` (retained, last will), ``detections``, ``events``, ``alerts``
(same schema as detections), ``telemetry``, ``update`` (retained), ``cmd/<name>`` in and
``cmd/<name>/reply[/...]`` out.

Compact JSON detection (schema v1, keys in this order, absent keys mean "none")::

    {"v":1,"s":42,"t":1764201600,"id":"7f3a09c1","ev":17,"f":"IMG_0042.JPG","sp":"lyn","p":0.93,
     "n":1,"g":"medium","r":"exp","m":"2026.11.1"}

    v   schema version (1)             s   sequence number, per device, for order and dedup
    t   capture time, unix seconds     id  image key (<= 10 chars, the ledger's id for the frame)
    ev  event (burst) id               f   display file name (shortened, see ``short_name``)
    nf  frames in the event (event-level messages only; saturates at 999)
    sp  species code (absent: empty)   p   its score (2 decimals)   n  its count (saturates at 999)
    g   group of the species           r   route: exp (routed to expert), all (background, all
                                           experts), glb (no expert, global answer), gate (gated)
    m   model (bundle) version         x   other species: [[code, p, n], ...] (at most 3)

Without ``x`` (one species) it stays within 200 bytes whatever the inputs: the file name is cut
to 28 bytes (see ``short_name``), group and model version to 12, species codes and ids are
refused above 8 and 10 characters; ``x`` adds at most 72 bytes.

Binary detection (LoRa; EU868 DR0 carries 51 bytes), big-endian, 25 + 4k bytes (k <= 6, so
<= 49)::

    offset size field
    0      1    version (1)
    1      1    flags: bit0 event-level, bit1 alert (watch-list), bit2 empty, bit3 extras cut
                (more species than fit), bits 4-7 reserved (0)
    2      4    seq (uint32), the same number as the JSON message's "s"
    6      4    capture time, unix seconds (uint32)
    10     4    event id (uint32; 0xFFFFFFFF = none)
    14     2    species index into the bundle's species list (0xFFFF = none, 0xFFFE = not in list)
    16     1    confidence, round(p * 255)
    17     1    count (saturates at 255)
    18     1    group index into the bundle's sorted group names (0xFF = none)
    19     1    route: 0 exp, 1 all, 2 glb, 3 gate
    20     2    model tag: first 2 bytes of sha256(model version)
    22     1    k, number of extra species
    23     4k   per extra species: index (uint16), confidence (uint8), count (uint8)
    23+4k  2    CRC-16/CCITT-FALSE of all bytes before it

docs/binary-format.md holds the same table for the README.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

VERSION = 1
JSON_BUDGET = 200  # bytes, one animal
BINARY_MAX = 51  # LoRa EU868 DR0 payload ceiling
MAX_EXTRA_JSON = 3
MAX_EXTRA_BINARY = 6
FILE_MAX, GROUP_MAX, MODEL_MAX, ID_MAX = 28, 12, 12, 10
COUNT_MAX = 999  # n and nf saturate here in JSON (255 in binary)
ROUTES = {"routed": "exp", "background": "all", "no-expert": "glb", "gated": "gate"}
ROUTE_CODES = ("exp", "all", "glb", "gate")  # binary route byte -> JSON route code
STATES = ("online", "degraded", "offline", "stopped")  # degraded: up, but its state disk cannot be written
U32 = 0xFFFFFFFF
NO_SPECIES, OTHER_SPECIES, NO_GROUP, NO_EVENT = 0xFFFF, 0xFFFE, 0xFF, 0xFFFFFFFF
F_EVENT, F_ALERT, F_EMPTY, F_CUT = 1, 2, 4, 8
_HEAD = struct.Struct(">BBIIIHBBBBHB")  # 23 bytes
_EXTRA = struct.Struct(">HBB")
_CRC = struct.Struct(">H")


# --- topics ------------------------------------------------------------------------------------
DEFAULT_PREFIX = "camtrap/{device_id}/"
PREFIX_MAX = 128  # UTF-8 bytes of the prefix as written in the config (before {device_id})
DEVICE_ID_MAX = 64
NAME_MAX = 32  # a command name
TOPIC_MAX = 65535  # MQTT's limit on a topic name, UTF-8 bytes
_COMMAND_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Topics:
    """Every topic the device publishes on or listens to, under one prefix.

    The class constants are the names relative to the prefix (what the outbox stores, so that a
    prefix change in the config does not strand queued rows); an instance, made by ``topics``,
    gives the full names. The publisher, the daemon, the demo and the tests all take topic names
    from here and nowhere else.
    """

    STATUS: ClassVar[str] = "status"  # retained availability; the last will says "offline"
    DETECTIONS: ClassVar[str] = "detections"
    ALERTS: ClassVar[str] = "alerts"  # watch-list species, once per event
    EVENTS: ClassVar[str] = "events"  # one event-level answer per burst
    TELEMETRY: ClassVar[str] = "telemetry"
    UPDATE: ClassVar[str] = "update"  # retained state of a model update (issue 8)
    CMD: ClassVar[str] = "cmd/"  # cmd/<name> in, cmd/<name>/reply[/...] out
    REPLY: ClassVar[str] = "/reply"
    PUBLISHED: ClassVar[tuple[str, ...]] = (STATUS, DETECTIONS, ALERTS, EVENTS, TELEMETRY, UPDATE)

    prefix: str

    def full(self, relative: str) -> str:
        """The full topic of a name relative to the prefix (an outbox row's ``topic``)."""
        return self.prefix + relative

    @property
    def status(self) -> str:
        return self.prefix + self.STATUS

    @property
    def detections(self) -> str:
        return self.prefix + self.DETECTIONS

    @property
    def alerts(self) -> str:
        return self.prefix + self.ALERTS

    @property
    def events(self) -> str:
        return self.prefix + self.EVENTS

    @property
    def telemetry(self) -> str:
        return self.prefix + self.TELEMETRY

    @property
    def update(self) -> str:
        return self.prefix + self.UPDATE

    @property
    def command_filter(self) -> str:
        """The subscription that receives every command: ``<prefix>cmd/+``."""
        return self.prefix + self.CMD + "+"

    def command(self, name: str) -> str:
        return self.prefix + self.CMD + name

    def reply(self, name: str) -> str:
        """The default reply topic (MQTT 3.1.1 clients, or no valid response topic)."""
        return self.prefix + self.CMD + name + self.REPLY

    def command_name(self, topic: str) -> str | None:
        """``name`` for ``<prefix>cmd/<name>``, else None."""
        head = self.prefix + self.CMD
        if not topic.startswith(head):
            return None
        name = topic[len(head):]
        return name if name and "/" not in name else None

    def is_reply_topic(self, name: str, topic: str) -> bool:
        """May a reply to command ``name`` go to ``topic``? Only inside the command's own reply
        subtree, ``<prefix>cmd/<name>/reply`` or below it, and only a valid topic name: a
        requester must not make the device publish on another device's topics, on its own
        detection streams or on anything outside its prefix."""
        own = self.reply(name)
        return (topic == own or topic.startswith(own + "/")) and topic_name_problem(topic) is None


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to (wildcards, NUL, empty, too long), or None."""
    if not topic:
        return "empty"
    if "+" in topic or "#" in topic:
        return "holds a wildcard (+ or #)"
    if "\x00" in topic:
        return "holds NUL"
    if len(topic.encode("utf-8", "surrogatepass")) > TOPIC_MAX:
        return f"longer than {TOPIC_MAX} bytes"
    return None


def _controls(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def prefix_problem(prefix: str) -> str | None:
    """Why a configured topic prefix is refused, or None. One rule, checked by the config and by
    ``topics``: it holds ``{device_id}`` (each device its own subtree, and the reply rule above
    relies on it) and no other placeholder, ends in '/', starts with neither '/' nor '$' (the
    broker's own ``$SYS`` topics), holds no wildcard and no control character, and is at most
    ``PREFIX_MAX`` bytes."""
    if len(prefix.encode("utf-8", "surrogatepass")) > PREFIX_MAX:
        return f"is longer than {PREFIX_MAX} bytes"
    if _controls(prefix):
        return "holds a control character (NUL, newline, ...)"
    if "+" in prefix or "#" in prefix:
        return "must not contain the wildcards + or #"
    if prefix.startswith("$"):
        return "must not start with '$' (reserved for the broker, as in $SYS)"
    if prefix.startswith("/"):
        return "must not start with '/'"
    if not prefix.endswith("/"):
        return "must end with '/'"
    unknown = sorted({m for m in re.findall(r"\{([^{}]*)\}", prefix) if m != "device_id"})
    if unknown:
        return f"has unknown placeholder(s) {unknown}; only {{device_id}}"
    if "{device_id}" not in prefix:
        return "must contain {device_id}, so that each device has its own topics"
    return None


def device_id_problem(device_id: str) -> str | None:
    if not device_id or len(device_id.encode("utf-8", "surrogatepass")) > DEVICE_ID_MAX:
        return f"must be 1 to {DEVICE_ID_MAX} bytes"
    if any(c in device_id for c in "/+#$") or _controls(device_id):
        return "must not contain '/', '+', '#', '$' or control characters"
    return None


def command_name_problem(name: str) -> str | None:
    """Command names are short lowercase words (``ping``, ``update``): anything else is refused
    before a handler is looked up or a line is logged with it."""
    if len(name) > NAME_MAX or not _COMMAND_NAME.fullmatch(name):
        return f"is not a command name (a-z, 0-9, '-', '_', starting with a letter, at most {NAME_MAX})"
    return None


def topics(prefix: str | None, device_id: str) -> Topics:
    """Topic names for a device. ``prefix`` holds ``{device_id}`` (see ``prefix_problem``);
    None or "" means the default ``camtrap/{device_id}/``. Raises ValueError naming the problem."""
    template = prefix or DEFAULT_PREFIX
    why = device_id_problem(device_id)
    if why:
        raise ValueError(f"device_id {device_id!r} {why}")
    why = prefix_problem(template)
    if why:
        raise ValueError(f"topic prefix {template!r} {why}")
    return Topics(template.replace("{device_id}", device_id))


# --- helpers -----------------------------------------------------------------------------------
def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _cut(text: str, limit: int) -> str:
    """Longest prefix of ``text`` whose UTF-8 form fits ``limit`` bytes."""
    b = text.encode()[:limit]
    return b.decode(errors="ignore")


def _clean(text: str) -> str:
    # characters JSON would escape (quotes, backslash, controls) would blow the byte budget
    return "".join("_" if c in '"\\' or unicodedata.category(c)[0] == "C" else c for c in text)


def short_name(name: str, limit: int = FILE_MAX) -> str:
    """Display form of a file name within ``limit`` UTF-8 bytes.

    Only the base name travels. A longer one keeps its start and its end (where cameras put the
    frame number and extension) around a 6-hex hash of the whole name, so distinct long names
    stay distinct: ``2021-05-31_fox_cam…`` -> ``2021-0~1a2b3c~_RCNX0031.JPG``. The file is
    identified by ``id``, never by this.
    """
    base = _clean(re.split(r"[\\/]", name)[-1])
    if len(base.encode()) <= limit:
        return base
    h = hashlib.sha1(name.encode(errors="surrogatepass")).hexdigest()[:6]
    room = limit - len(h) - 2
    tail_room = room * 2 // 3
    tail = base.encode()[-tail_room:].decode(errors="ignore")
    head = _cut(base, room - len(tail.encode()))
    return f"{head}~{h}~{tail}"


def model_tag(version: str) -> str:
    """The 2-byte model tag of the binary form, as 4 hex digits."""
    return hashlib.sha256(version.encode()).hexdigest()[:4]


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF; check value of b"123456789" is 0x29B1)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _uint(name: str, value: int, bits: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an integer in [0, {(1 << bits) - 1}], got {value!r}")
    return value


def _code(code: str) -> str:
    if not code or len(code) > 8 or _clean(code) != code:
        raise ValueError(f"species code {code!r} must be 1-8 printable characters (Manifest.code)")
    return code


def _score(name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


# --- the message -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionMessage:
    """What one detection message says, before it is put on the wire.

    ``species`` is the species *code* (Manifest.code), ``route`` a cascade reason or its wire code.
    """

    seq: int
    time: int
    species: str | None
    score: float
    count: int
    route: str
    model: str
    group: str | None = None
    event: int | None = None
    file: str | None = None
    image_id: str | None = None
    frames: int | None = None  # set for an event-level message
    extra: tuple[tuple[str, float, int], ...] = field(default=())  # (code, score, count)
    alert: bool = False

    @property
    def route_code(self) -> str:
        code = ROUTES.get(self.route, self.route)
        if code not in ROUTE_CODES:
            raise ValueError(f"route {self.route!r} is not one of {sorted(ROUTES)} or {list(ROUTE_CODES)}")
        return code


def message_from_decision(
    decision: object,
    *,
    seq: int,
    time: int,
    codes: Mapping[str, str],
    group_of: Mapping[str, str] | None = None,
    model: str,
    event: int | None = None,
    file: str | None = None,
    image_id: str | None = None,
    alert: bool = False,
) -> DetectionMessage:
    """A ``cascade.Decision`` (one frame) or ``cascade.EventDecision`` (a burst) -> message.

    ``codes`` maps species name to short code (Manifest.codes; unknown names fall back to the
    first 8 characters); ``group_of`` maps species name to group.
    """
    groups = group_of or {}

    def code(sp: str) -> str:
        return codes.get(sp) or re.sub(r"[^a-z0-9]", "", sp.lower())[:8] or "sp"

    counts: dict[str, int] = dict(decision.counts)  # type: ignore[attr-defined]
    if hasattr(decision, "votes"):  # EventDecision
        sp, score = decision.species, float(decision.score)  # type: ignore[attr-defined]
        frames = int(decision.frames)  # type: ignore[attr-defined]
        route = decision.route  # type: ignore[attr-defined]
        best_scores = dict(decision.scores)  # type: ignore[attr-defined]
        others = [s for s in counts if s != sp]  # already in vote order
    else:
        sp, score = decision.top  # type: ignore[attr-defined]
        frames = None
        route = decision.route.reason  # type: ignore[attr-defined]
        best_scores = {}
        for d in decision.detections:  # type: ignore[attr-defined]
            best_scores[d.species] = max(best_scores.get(d.species, 0.0), float(d.score))
        others = sorted((s for s in counts if s != sp), key=lambda s: -best_scores[s])
    return DetectionMessage(
        seq=seq, time=time, species=code(sp) if sp else None, score=score, count=counts.get(sp, 0) if sp else 0,
        route=route, model=model, group=groups.get(sp) if sp else None, event=event, file=file,
        image_id=image_id, frames=frames,
        extra=tuple((code(s), best_scores.get(s, 0.0), counts[s]) for s in others), alert=alert,
    )


# --- compact JSON ------------------------------------------------------------------------------
def encode_detection_json(msg: DetectionMessage) -> bytes:
    """Compact JSON (schema above); long names are shortened so one animal fits 200 bytes."""
    d: dict[str, object] = {"v": VERSION, "s": _uint("seq", msg.seq, 32), "t": _uint("time", msg.time, 32)}
    if msg.image_id is not None:
        if not msg.image_id or len(msg.image_id) > ID_MAX or _clean(msg.image_id) != msg.image_id:
            raise ValueError(f"image_id {msg.image_id!r} must be 1-{ID_MAX} printable characters")
        d["id"] = msg.image_id
    if msg.event is not None:
        d["ev"] = _uint("event", msg.event, 32)
    if msg.file:
        d["f"] = short_name(msg.file)
    if msg.frames is not None:
        d["nf"] = min(_uint("frames", msg.frames, 32), COUNT_MAX)
    if msg.species:
        d["sp"] = _code(msg.species)
        d["p"] = round(_score("score", msg.score), 2)
        d["n"] = min(_uint("count", msg.count, 32), COUNT_MAX)
        if msg.group:
            d["g"] = _cut(_clean(msg.group), GROUP_MAX)
    else:
        d["n"] = 0
    d["r"] = msg.route_code
    d["m"] = _cut(_clean(msg.model), MODEL_MAX)
    if msg.extra:
        d["x"] = [[_code(c), round(_score("extra score", p), 2),
                   min(_uint("extra count", n, 32), COUNT_MAX)]
                  for c, p, n in msg.extra[:MAX_EXTRA_JSON]]
    return _compact(d)


def _field(d: Mapping, key: str, kind: type | tuple[type, ...], required: bool = True) -> object:
    if key not in d:
        if required:
            raise ValueError(f"detection JSON: missing field {key!r}")
        return None
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ValueError(f"detection JSON: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def decode_detection_json(data: bytes | str) -> dict:
    """Parse and check a compact JSON detection; returns its fields (unknown keys are ignored so
    that newer devices can add fields)."""
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"detection JSON: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError("detection JSON: not an object")
    if d.get("v") != VERSION:
        raise ValueError(f"detection JSON: unsupported version {d.get('v')!r} (this decoder reads {VERSION})")
    out: dict[str, object] = {"v": VERSION}
    for key in ("s", "t"):
        out[key] = _field(d, key, int)
    for key, kind in (("id", str), ("ev", int), ("f", str), ("nf", int), ("sp", str), ("p", (int, float)),
                      ("n", int), ("g", str)):
        v = _field(d, key, kind, required=key == "n")
        if v is not None:
            out[key] = v
    if "sp" in out and "p" not in out:
        raise ValueError("detection JSON: species without score 'p'")
    if "p" in out and not 0 <= float(out["p"]) <= 1:  # type: ignore[arg-type]
        raise ValueError(f"detection JSON: score {out['p']!r} outside [0, 1]")
    r = _field(d, "r", str)
    if r not in ROUTE_CODES:
        raise ValueError(f"detection JSON: unknown route {r!r}")
    out["r"] = r
    out["m"] = _field(d, "m", str)
    if "x" in d:
        x = d["x"]
        ok = isinstance(x, list) and all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
            and isinstance(e[1], (int, float)) and isinstance(e[2], int) for e in x)
        if not ok:
            raise ValueError("detection JSON: 'x' must be a list of [code, score, count]")
        out["x"] = x
    return out


# --- binary (LoRa) -----------------------------------------------------------------------------
def encode_detection_binary(
    msg: DetectionMessage, species: Sequence[str], groups: Sequence[str] = ()
) -> bytes:
    """The <= 51-byte form (layout in the module docstring).

    ``species`` is the list the index points into (the bundle's species codes in the global
    model's class order, see ``wire_lists``); ``groups`` the bundle's sorted group names.
    """
    index = {s: i for i, s in enumerate(species)}
    if len(species) >= OTHER_SPECIES:
        raise ValueError(f"binary form: at most {OTHER_SPECIES} species, got {len(species)}")

    def sp_index(code: str | None) -> int:
        if not code:
            return NO_SPECIES
        return index.get(code, OTHER_SPECIES)

    g = NO_GROUP
    if msg.group is not None and msg.group in groups:
        g = list(groups).index(msg.group)
        if g >= NO_GROUP:
            g = NO_GROUP
    flags = (F_EVENT if msg.frames is not None else 0) | (F_ALERT if msg.alert else 0)
    flags |= 0 if msg.species else F_EMPTY
    extra = list(msg.extra)
    if len(extra) > MAX_EXTRA_BINARY:
        flags |= F_CUT
        extra = extra[:MAX_EXTRA_BINARY]
    event = NO_EVENT if msg.event is None else _uint("event", msg.event, 32)
    if event == NO_EVENT and msg.event is not None:
        raise ValueError(f"event id {NO_EVENT} is reserved for 'none'")
    head = _HEAD.pack(
        VERSION, flags, _uint("seq", msg.seq, 32), _uint("time", msg.time, 32), event,
        sp_index(msg.species), round(_score("score", msg.score) * 255) if msg.species else 0,
        min(_uint("count", msg.count, 32), 255) if msg.species else 0, g,
        ROUTE_CODES.index(msg.route_code), int(model_tag(msg.model), 16), len(extra),
    )
    body = head + b"".join(
        _EXTRA.pack(sp_index(c), round(_score("extra score", p) * 255), min(_uint("extra count", n, 32), 255))
        for c, p, n in extra
    )
    return body + _CRC.pack(crc16(body))


def decode_detection_binary(data: bytes, species: Sequence[str], groups: Sequence[str] = ()) -> dict:
    """Parse the binary form into the JSON form's keys (``mh`` replaces ``m``: the model tag).

    Raises ValueError naming what is wrong: too short, length not matching the extras count,
    checksum mismatch (garbled), unknown version or route.
    """
    n = len(data)
    if n < _HEAD.size + _CRC.size:
        raise ValueError(f"binary detection: {n} bytes, need at least {_HEAD.size + _CRC.size}")
    (ver, flags, seq, t, event, sp, conf, count, g, route, tag, k) = _HEAD.unpack_from(data)
    want = _HEAD.size + _EXTRA.size * k + _CRC.size
    if n != want:
        raise ValueError(f"binary detection: {n} bytes, but its header announces {k} extra species "
                         f"({want} bytes)")
    (crc,) = _CRC.unpack_from(data, n - _CRC.size)
    if crc != crc16(data[: n - _CRC.size]):
        raise ValueError("binary detection: checksum mismatch (garbled payload)")
    if ver != VERSION:
        raise ValueError(f"binary detection: unsupported version {ver} (this decoder reads {VERSION})")
    if route >= len(ROUTE_CODES):
        raise ValueError(f"binary detection: unknown route {route}")

    def name(i: int) -> str | None:
        if i == NO_SPECIES:
            return None
        if i == OTHER_SPECIES:
            return "?"
        if i >= len(species):
            raise ValueError(f"binary detection: species index {i} but the list has {len(species)} species")
        return species[i]

    out: dict[str, object] = {"v": ver, "s": seq, "t": t}
    if event != NO_EVENT:
        out["ev"] = event
    sp_name = name(sp)
    if sp_name is not None:
        out["sp"] = sp_name
        out["p"] = round(conf / 255, 3)
    out["n"] = count
    if g != NO_GROUP:
        out["g"] = groups[g] if g < len(groups) else g
    out["r"] = ROUTE_CODES[route]
    out["mh"] = f"{tag:04x}"
    if k:
        out["x"] = []
        for i in range(k):
            xi, xc, xn = _EXTRA.unpack_from(data, _HEAD.size + i * _EXTRA.size)
            out["x"].append([name(xi), round(xc / 255, 3), xn])  # type: ignore[attr-defined]
    out["event"] = bool(flags & F_EVENT)
    out["alert"] = bool(flags & F_ALERT)
    if flags & F_CUT:
        out["extras_cut"] = True
    return out


def wire_lists(manifest: object) -> tuple[list[str], list[str]]:
    """(species codes in the global model's class order, sorted group names) of a Manifest:
    the lists the binary form's indices point into."""
    classes = manifest.global_model.classes  # type: ignore[attr-defined]
    return [manifest.code(c) for c in classes], sorted(manifest.groups)  # type: ignore[attr-defined]


# --- status and telemetry ----------------------------------------------------------------------
def status_payload(state: str, *, time: int, model: str | None, boot_id: str, version: str = "",
                   extra: Mapping[str, object] | None = None) -> bytes:
    """Retained ``status``: online / stopped, or offline (the last will, built at connect)."""
    if state not in STATES:
        raise ValueError(f"status state {state!r} must be one of {STATES}")
    d: dict[str, object] = {"v": VERSION, "state": state, "t": _uint("time", time, 32), "boot": boot_id}
    if model:
        d["m"] = model
    if version:
        d["sw"] = version
    d.update(extra or {})
    return _compact(d)


TELEMETRY_COUNTS = ("processed", "empty", "discarded", "quarantined", "gone", "dropped", "rejected")


def telemetry_counts(states: Mapping[str, int], counters: Mapping[str, int]) -> dict[str, int]:
    """The telemetry ``c`` counts (``TELEMETRY_COUNTS``, in that order) from the ledger's image
    states and counters: the one place they are derived, so telemetry and ``camtrap-edge status``
    agree. Frames (processed, quarantined, gone) are counted from their rows, not from counters of
    events: a frame quarantined, requeued and quarantined again is one quarantined frame."""
    derived = {"processed": states.get("done", 0) + states.get("disposed", 0),
               "empty": counters.get("empty", 0), "discarded": counters.get("discarded", 0),
               "quarantined": states.get("quarantined", 0), "gone": states.get("gone", 0),
               "dropped": sum(v for k, v in counters.items() if k.startswith("dropped_")),
               "rejected": counters.get("rejected", 0)}
    return {k: derived[k] for k in TELEMETRY_COUNTS}


def telemetry_payload(*, time: int, counts: Mapping[str, int], queue: int, outbox: int,
                      infer_ms: float | None = None, disk_free_mb: float | None = None,
                      temp_c: float | None = None, extra: Mapping[str, object] | None = None) -> bytes:
    """Periodic ``telemetry``: counters since start, queue and outbox depth, mean inference ms,
    free disk and temperature where readable (None values are left out)."""
    c = {k: _uint(f"count {k}", int(v), 63) for k, v in counts.items()}
    d: dict[str, object] = {"v": VERSION, "t": _uint("time", time, 32), "c": c,
                            "q": _uint("queue", queue, 32), "ob": _uint("outbox", outbox, 32)}
    if infer_ms is not None:
        d["ms"] = round(float(infer_ms), 1)
    if disk_free_mb is not None:
        d["disk_mb"] = round(float(disk_free_mb))
    if temp_c is not None:
        d["temp_c"] = round(float(temp_c), 1)
    d.update(extra or {})
    return _compact(d)
