"""edge.messages: topics, compact JSON within budget, the LoRa binary form, and `camtrap-edge decode`."""

from __future__ import annotations

import json
import random
import tarfile

import pytest

from edge import cli
from edge.cascade import Decision, Route, event_decision
from edge.commands.messages import payload_bytes
from edge.detection import Detection
from edge.manifest import Manifest
from edge.messages import (
    BINARY_MAX,
    DEFAULT_PREFIX,
    JSON_BUDGET,
    PREFIX_MAX,
    ROUTE_CODES,
    DetectionMessage,
    Topics,
    command_name_problem,
    crc16,
    decode_detection_binary,
    decode_detection_json,
    encode_detection_binary,
    encode_detection_json,
    message_from_decision,
    model_tag,
    prefix_problem,
    short_name,
    status_payload,
    telemetry_payload,
    topics,
    wire_lists,
)

SPECIES = ["lyn", "fel", "vul", "dam", "cer", "ory"]
GROUPS = ["large", "medium", "micro"]


def msg(**kw) -> DetectionMessage:
    base = dict(seq=42, time=1764201600, species="lyn", score=0.93, count=1, route="routed",
                model="2026.11.1", group="medium", event=17, file="IMG_0042.JPG", image_id="7f3a09c1")
    base.update(kw)
    return DetectionMessage(**base)  # type: ignore[arg-type]


# --- topics ------------------------------------------------------------------------------------
def test_topics_default_and_custom_prefix():
    t = topics(None, "trap-07")
    assert t.status == "camtrap/trap-07/status" and t.detections == "camtrap/trap-07/detections"
    assert t.alerts == "camtrap/trap-07/alerts" and t.telemetry == "camtrap/trap-07/telemetry"
    assert t.events == "camtrap/trap-07/events" and t.update == "camtrap/trap-07/update"
    assert t.command_filter == "camtrap/trap-07/cmd/+" and t.command("update") == "camtrap/trap-07/cmd/update"
    assert t.reply("ping") == "camtrap/trap-07/cmd/ping/reply"
    assert t.full(Topics.DETECTIONS) == t.detections  # what an outbox row stores, made full
    assert [t.full(r) for r in Topics.PUBLISHED] == [t.status, t.detections, t.alerts, t.events, t.telemetry,
                                                     t.update]
    assert t.command_name("camtrap/trap-07/cmd/ping") == "ping"
    assert t.command_name("camtrap/trap-07/cmd/ping/reply") is None
    assert t.command_name("camtrap/trap-08/cmd/ping") is None
    assert topics("parks/donana/{device_id}/", "t1").status == "parks/donana/t1/status"
    assert topics("", "t1") == topics(None, "t1") == topics(DEFAULT_PREFIX, "t1")
    for bad in ("", "a/b", "a+", "#", "a\x00", "$x", "x" * 65):
        with pytest.raises(ValueError, match="device_id"):
            topics(None, bad)
    with pytest.raises(ValueError, match="prefix"):
        topics("a/#/{device_id}/", "t1")


@pytest.mark.parametrize("prefix, why", [
    ("camtrap/{device_id}", "end with '/'"),
    ("a/#/{device_id}/", "wildcards"),
    ("a/+/{device_id}/", "wildcards"),
    ("a/{site}/{device_id}/", "unknown placeholder"),
    ("camtrap/\x00{device_id}/", "control character"),
    ("camtrap/\n{device_id}/", "control character"),
    ("$SYS/{device_id}/", "'$'"),
    ("/camtrap/{device_id}/", "start with '/'"),
    ("camtrap/", "must contain {device_id}"),
    ("x/", "must contain {device_id}"),
    ("p" * 70_000 + "/{device_id}/", "longer than 128 bytes"),
])
def test_prefix_rule_refuses_each_bad_prefix_with_its_reason(prefix: str, why: str) -> None:
    assert why in (prefix_problem(prefix) or "")


def test_prefix_rule_accepts_good_prefixes() -> None:
    for good in (DEFAULT_PREFIX, "parks/doñana/{device_id}/", "{device_id}/", "a/{device_id}/b/",
                 "p" * (PREFIX_MAX - len("/{device_id}/")) + "/{device_id}/"):
        assert prefix_problem(good) is None, good


def test_reply_topics_stay_in_the_commands_own_reply_subtree() -> None:
    """Issue 7 item 10: a response topic elsewhere (another device, the detection streams,
    Home Assistant discovery, another command's replies, a wildcard) is not a reply topic."""
    t = topics(None, "trap-01")
    assert t.is_reply_topic("ping", "camtrap/trap-01/cmd/ping/reply")
    assert t.is_reply_topic("ping", "camtrap/trap-01/cmd/ping/reply/ops-7/42")
    for bad in ("camtrap/trap-02/alerts", "camtrap/trap-02/cmd/ping/reply", "camtrap/trap-01/status",
                "camtrap/trap-01/detections", "homeassistant/sensor/x/config", "camtrap/trap-01/cmd/update/reply",
                "camtrap/trap-01/cmd/ping/replyX", "camtrap/trap-01/cmd/ping/reply/#",
                "camtrap/trap-01/cmd/ping/reply/+/x", "camtrap/#", "camtrap/trap-01/cmd/ping/reply/\x00",
                "camtrap/trap-01/cmd/ping/reply/" + "x" * 70_000, ""):
        assert not t.is_reply_topic("ping", bad), bad


def test_command_names_are_short_lowercase_words() -> None:
    for good in ("ping", "status", "update", "rollback", "models", "a-b_2"):
        assert command_name_problem(good) is None
    for bad in ("", "Ping", "ping\nFAKE", "1up", "x" * 33, "a b", "ping/reply", "\u202eevil"):
        assert command_name_problem(bad) is not None, bad


# --- compact JSON ------------------------------------------------------------------------------
def test_json_example_shape_and_round_trip():
    b = encode_detection_json(msg())
    assert b == (b'{"v":1,"s":42,"t":1764201600,"id":"7f3a09c1","ev":17,"f":"IMG_0042.JPG","sp":"lyn",'
                 b'"p":0.93,"n":1,"g":"medium","r":"exp","m":"2026.11.1"}')
    d = decode_detection_json(b)
    assert d == json.loads(b)


def test_json_one_animal_stays_within_200_bytes_at_the_worst():
    worst = msg(seq=2**32 - 1, time=2**32 - 1, event=2**32 - 1, image_id="x" * 10, species="abcdefgh",
                score=0.123456, count=2**32 - 1, frames=2**32 - 1, group="a-very-long-group-name-indeed",
                model="2026.11.1-rc.7+build.123456", route="gated",
                file="/data/camera/2021-05-31_Doñana_station-12_fox_and_friends_RCNX0031.JPG")
    b = encode_detection_json(worst)
    assert len(b) <= JSON_BUDGET, (len(b), b)
    d = decode_detection_json(b)
    assert d["f"].endswith("RCNX0031.JPG") and d["g"] == "a-very-long-" and d["m"] == "2026.11.1-rc"
    assert d["n"] == 999 and d["nf"] == 999  # saturated
    # three more species add at most 72 bytes
    extra = tuple(("abcdefg" + str(i), 0.12, 2**20) for i in range(5))
    assert len(encode_detection_json(worst)) + 72 >= len(encode_detection_json(
        DetectionMessage(**{**worst.__dict__, "extra": extra})))
    # the realistic case is well inside: a Reconyx name is kept whole
    b = encode_detection_json(msg(file="20210531082538-RCNX0031.JPG"))
    assert len(b) <= 160 and b"20210531082538-RCNX0031.JPG" in b


def test_short_name_keeps_short_names_and_shortens_long_ones_distinctly():
    assert short_name("/srv/ftp/cam1/IMG_0042.JPG") == "IMG_0042.JPG"
    assert short_name("C:\\DCIM\\100RECNX\\RCNX0031.JPG") == "RCNX0031.JPG"
    assert short_name("20210531082538-RCNX0031.JPG") == "20210531082538-RCNX0031.JPG"  # 27 bytes: kept
    a = short_name("station-12_" + "x" * 40 + "_RCNX0031.JPG")
    b = short_name("station-13_" + "x" * 40 + "_RCNX0031.JPG")
    assert a != b and len(a.encode()) <= 28 and a.endswith("RCNX0031.JPG") and a.startswith("stat")
    # quotes, backslashes and controls would be escaped (and cost bytes): replaced
    assert short_name('we"ird\nname.jpg') == "we_ird_name.jpg"
    # multibyte characters are never cut in half
    name = short_name("é" * 40 + ".jpg")
    name.encode()  # valid UTF-8 by construction
    assert len(name.encode()) <= 28


def test_json_empty_message_and_extras():
    d = decode_detection_json(encode_detection_json(msg(species=None, score=0.0, count=0, group=None,
                                                        route="background")))
    assert "sp" not in d and "p" not in d and d["n"] == 0 and d["r"] == "all"
    m = msg(extra=(("fel", 0.61, 2), ("vul", 0.4, 1), ("dam", 0.3, 1), ("cer", 0.3, 1)))
    d = decode_detection_json(encode_detection_json(m))
    assert d["x"] == [["fel", 0.61, 2], ["vul", 0.4, 1], ["dam", 0.3, 1]]  # at most 3 in JSON


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not an object"),
        (b'{"v":2}', "unsupported version"),
        (b'{"v":1,"t":1,"n":0,"r":"exp","m":"x"}', "missing field 's'"),
        (b'{"v":1,"s":"1","t":1,"n":0,"r":"exp","m":"x"}', "'s' has the wrong type"),
        (b'{"v":1,"s":1,"t":1,"n":0,"r":"zzz","m":"x"}', "unknown route"),
        (b'{"v":1,"s":1,"t":1,"sp":"lyn","n":1,"r":"exp","m":"x"}', "without score"),
        (b'{"v":1,"s":1,"t":1,"sp":"lyn","p":1.5,"n":1,"r":"exp","m":"x"}', "outside"),
        (b'{"v":1,"s":1,"t":1,"n":0,"r":"exp","m":"x","x":[["a",1]]}', "'x'"),
        (b'\xff\xfe', "not JSON"),
    ],
)
def test_json_decoder_names_what_is_wrong(payload, match):
    with pytest.raises(ValueError, match=match):
        decode_detection_json(payload)


def test_json_decoder_ignores_unknown_fields_from_newer_devices():
    d = decode_detection_json(b'{"v":1,"s":1,"t":1,"n":0,"r":"gate","m":"x","future":true}')
    assert "future" not in d and d["r"] == "gate"


def test_encoder_refuses_bad_values():
    for bad, match in [(dict(seq=-1), "seq"), (dict(seq=2**32), "seq"), (dict(score=1.2), "score"),
                       (dict(route="sideways"), "route"), (dict(image_id="x" * 11), "image_id"),
                       (dict(species="toolongcode"), "species code"), (dict(time=1.5), "time")]:
        with pytest.raises(ValueError, match=match):
            encode_detection_json(msg(**bad))


# --- binary ------------------------------------------------------------------------------------
def test_crc16_check_value():
    assert crc16(b"123456789") == 0x29B1


def test_binary_layout_byte_by_byte():
    b = encode_detection_binary(msg(), SPECIES, GROUPS)
    assert len(b) == 25
    assert b[0] == 1 and b[1] == 0
    assert b[2:6] == (42).to_bytes(4, "big") and b[6:10] == (1764201600).to_bytes(4, "big")
    assert b[10:14] == (17).to_bytes(4, "big")
    assert b[14:16] == (0).to_bytes(2, "big")  # "lyn" is species 0
    assert b[16] == round(0.93 * 255) and b[17] == 1 and b[18] == 1 and b[19] == 0
    assert b[20:22].hex() == model_tag("2026.11.1") and b[22] == 0
    assert int.from_bytes(b[23:25], "big") == crc16(b[:23])


def test_binary_round_trip_and_flags():
    m = msg(extra=(("fel", 0.61, 2),), alert=True, frames=10)
    d = decode_detection_binary(encode_detection_binary(m, SPECIES, GROUPS), SPECIES, GROUPS)
    assert d == {"v": 1, "s": 42, "t": 1764201600, "ev": 17, "sp": "lyn", "p": round(237 / 255, 3), "n": 1,
                 "g": "medium", "r": "exp", "mh": model_tag("2026.11.1"), "x": [["fel", round(156 / 255, 3), 2]],
                 "event": True, "alert": True}
    empty = decode_detection_binary(
        encode_detection_binary(msg(species=None, group=None, event=None, route="gated"), SPECIES), SPECIES)
    assert "sp" not in empty and "g" not in empty and "ev" not in empty and empty["r"] == "gate"
    # a species outside the list, a group index the decoder cannot name
    d = decode_detection_binary(encode_detection_binary(msg(species="wolf"), SPECIES, GROUPS), SPECIES)
    assert d["sp"] == "?" and d["g"] == 1


def test_binary_never_exceeds_51_bytes():
    many = tuple((s, 0.5, 300) for s in SPECIES * 3)
    b = encode_detection_binary(msg(extra=many, count=1000), SPECIES, GROUPS)
    assert len(b) <= BINARY_MAX
    d = decode_detection_binary(b, SPECIES, GROUPS)
    assert len(d["x"]) == 6 and d["extras_cut"] is True and d["n"] == 255 and d["x"][0][2] == 255


def test_binary_random_round_trips():
    rng = random.Random(7)
    for _ in range(500):
        extra = tuple((rng.choice(SPECIES), rng.random(), rng.randint(1, 255)) for _ in range(rng.randint(0, 6)))
        m = msg(seq=rng.randrange(2**32), time=rng.randrange(2**32), event=rng.choice([None, rng.randrange(2**32 - 1)]),
                species=rng.choice([*SPECIES, None]), score=rng.random(), count=rng.randint(0, 255),
                group=rng.choice([*GROUPS, None]), route=rng.choice(ROUTE_CODES), extra=extra,
                alert=rng.random() < 0.5, frames=rng.choice([None, 5]))
        b = encode_detection_binary(m, SPECIES, GROUPS)
        assert len(b) <= BINARY_MAX
        d = decode_detection_binary(b, SPECIES, GROUPS)
        assert (d["s"], d["t"], d.get("ev"), d["r"]) == (m.seq, m.time, m.event, m.route)
        assert d.get("sp") == m.species and d.get("g") == m.group and d["alert"] == m.alert
        if m.species:
            assert abs(d["p"] - m.score) <= 0.5 / 255 + 5e-4 and d["n"] == m.count
        assert [e[0] for e in d.get("x", [])] == [e[0] for e in extra]
        # and the JSON form agrees on the shared fields
        j = decode_detection_json(encode_detection_json(m))
        assert (j["s"], j["t"], j.get("sp"), j["r"]) == (d["s"], d["t"], d.get("sp"), d["r"])


def test_binary_decoder_rejects_short_and_garbled_payloads():
    b = encode_detection_binary(msg(extra=(("fel", 0.6, 1),)), SPECIES, GROUPS)
    with pytest.raises(ValueError, match="need at least 25"):
        decode_detection_binary(b[:10], SPECIES)
    with pytest.raises(ValueError, match="announces 1 extra"):
        decode_detection_binary(b[:-1], SPECIES)
    for i in range(len(b) - 2):  # any single flipped bit is caught
        bad = bytearray(b)
        bad[i] ^= 0x10
        with pytest.raises(ValueError):
            decode_detection_binary(bytes(bad), SPECIES)
    with pytest.raises(ValueError, match="checksum"):
        decode_detection_binary(b[:-1] + bytes([b[-1] ^ 1]), SPECIES)
    # a valid checksum over a future version
    body = bytes([2]) + b[1:-2]
    with pytest.raises(ValueError, match="unsupported version 2"):
        decode_detection_binary(body + crc16(body).to_bytes(2, "big"), SPECIES)
    with pytest.raises(ValueError, match="species index 0 but the list has 0"):
        decode_detection_binary(b, [])


# --- from cascade decisions --------------------------------------------------------------------
def _det(sp, s, box=(0, 0, 10, 10)):
    return Detection(sp, s, box)


def test_one_animal_claimed_by_two_species_is_one_animal_in_the_message():
    # species 4 at 0.84 and species 7 at 0.27 on nearly the same box: one animal, not two
    from edge.cascade import decide, plan

    codes = {"Lynx pardinus": "lyn", "Felis silvestris": "fel"}
    groups = {"Lynx pardinus": "medium", "Felis silvestris": "medium"}
    glob = [_det("Lynx pardinus", 0.7)]
    route = plan(glob, groups, ["medium"])
    frame = decide(glob, {"medium": [_det("Lynx pardinus", 0.84), _det("Felis silvestris", 0.27, (0, 0, 10, 11))]},
                   route)
    m = message_from_decision(frame, seq=1, time=100, codes=codes, group_of=groups, model="v1", file="a.jpg")
    assert (m.species, m.count, m.extra) == ("lyn", 1, ())
    assert event_decision([frame, frame]).counts == {"Lynx pardinus": 1}


def test_message_from_frame_and_event_decisions():
    codes = {"Lynx pardinus": "lyn", "Felis silvestris": "fel"}
    groups = {"Lynx pardinus": "medium", "Felis silvestris": "medium"}
    route = Route("routed", ("medium",), 0.7)
    frame = Decision((_det("Lynx pardinus", 0.91), _det("Lynx pardinus", 0.8, (20, 0, 30, 10)),
                      _det("Felis silvestris", 0.5, (50, 0, 60, 10))), route, ("global", "medium"), {})
    m = message_from_decision(frame, seq=3, time=100, codes=codes, group_of=groups, model="v1",
                              file="a.jpg", image_id="abc")
    assert (m.species, m.score, m.count, m.group, m.route, m.frames) == ("lyn", 0.91, 2, "medium", "routed", None)
    assert m.extra == (("fel", 0.5, 1),)
    d = decode_detection_json(encode_detection_json(m))
    assert d["sp"] == "lyn" and d["n"] == 2 and d["x"] == [["fel", 0.5, 1]] and d["r"] == "exp"

    empty = Decision((), Route("gated", (), 0.01), ("global",), {})
    ev = event_decision([empty, frame, frame])
    m = message_from_decision(ev, seq=4, time=100, codes=codes, group_of=groups, model="v1", event=9)
    assert (m.species, m.count, m.frames, m.route, m.event) == ("lyn", 2, 3, "routed", 9)
    assert m.extra == (("fel", 0.5, 1),)
    m = message_from_decision(event_decision([empty]), seq=5, time=1, codes=codes, model="v1")
    assert m.species is None and m.route == "gated"
    assert decode_detection_json(encode_detection_json(m))["n"] == 0


# --- status / telemetry ------------------------------------------------------------------------
def test_status_and_telemetry_payloads():
    s = json.loads(status_payload("online", time=5, model="2026.11.1", boot_id="b1", version="0.1.0"))
    assert s == {"v": 1, "state": "online", "t": 5, "boot": "b1", "m": "2026.11.1", "sw": "0.1.0"}
    assert json.loads(status_payload("offline", time=5, model=None, boot_id="b1"))["state"] == "offline"
    with pytest.raises(ValueError, match="state"):
        status_payload("sleeping", time=5, model=None, boot_id="b1")
    raw = telemetry_payload(time=9, counts={"processed": 10, "empty": 7, "discarded": 6, "quarantined": 1,
                                            "dropped": 0}, queue=2, outbox=3, infer_ms=41.234,
                            disk_free_mb=1234.6, temp_c=None)
    assert b" " not in raw
    t = json.loads(raw)
    assert t["c"]["processed"] == 10 and t["q"] == 2 and t["ob"] == 3 and t["ms"] == 41.2
    assert t["disk_mb"] == 1235 and "temp_c" not in t
    with pytest.raises(ValueError, match="queue"):
        telemetry_payload(time=9, counts={}, queue=-1, outbox=0)


# --- camtrap-edge decode -----------------------------------------------------------------------
def _manifest() -> Manifest:
    return Manifest(
        bundle_version="2026.11.1", created="2026-11-01T00:00:00Z",
        models=[{"name": "global", "file": "models/global.onnx", "sha256": "0" * 64, "role": "global",
                 "classes": ["Lynx pardinus", "Felis silvestris", "Vulpes vulpes", "Dama dama"], "imgsz": 160,
                 "layout": "yolov8"}],
        groups={"medium": ["Lynx pardinus", "Felis silvestris", "Vulpes vulpes"], "large": ["Dama dama"]},
        codes={"Lynx pardinus": "lyn", "Felis silvestris": "fel", "Vulpes vulpes": "vul", "Dama dama": "dam"},
    )


def test_wire_lists_from_manifest():
    assert wire_lists(_manifest()) == (["lyn", "fel", "vul", "dam"], ["large", "medium"])


def test_cli_decode_hex_file_json_and_bundle(tmp_path, capsys):
    man = _manifest()
    species, groups = wire_lists(man)
    b = encode_detection_binary(msg(species="vul", group="medium"), species, groups)
    assert cli.main(["decode", b.hex(), "--species", ",".join(species)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sp"] == "vul" and out["g"] == 1 and out["format"] == "binary (25 bytes)"

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_bytes(man.to_bytes())
    assert cli.main(["decode", " ".join(f"{x:02X}" for x in b), "--bundle", str(bundle)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sp"] == "vul" and out["g"] == "medium" and out["species"] == "Vulpes vulpes"

    tar = tmp_path / "bundle.tar"
    with tarfile.open(tar, "w") as t:
        t.add(bundle / "manifest.json", arcname="manifest.json")
    f = tmp_path / "uplink.bin"
    f.write_bytes(b)
    assert cli.main(["decode", str(f), "--bundle", str(tar)]) == 0
    assert json.loads(capsys.readouterr().out)["species"] == "Vulpes vulpes"

    j = encode_detection_json(msg())
    assert cli.main(["decode", j.decode()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "json" and out["sp"] == "lyn"


def test_cli_decode_errors_are_one_line(tmp_path, capsys):
    b = encode_detection_binary(msg(), SPECIES, GROUPS)
    assert cli.main(["decode", b.hex()]) == 2
    assert "needs --species" in capsys.readouterr().err
    assert cli.main(["decode", b[:-3].hex(), "--species", "a"]) == 2
    assert "binary detection" in capsys.readouterr().err
    assert cli.main(["decode", "zz-not-a-payload!"]) == 2
    assert "not a file, JSON, hex or base64" in capsys.readouterr().err
    assert cli.main(["decode", b.hex(), "--bundle", str(tmp_path / "nope")]) == 2
    assert "no bundle" in capsys.readouterr().err


def test_payload_bytes_accepts_base64_from_lora_servers():
    import base64

    b = encode_detection_binary(msg(), SPECIES, GROUPS)
    assert payload_bytes(base64.b64encode(b).decode()) == b
    assert payload_bytes("0x" + b.hex()) == b


def test_the_documented_example_decodes_as_documented():
    """docs/binary-format.md's example payload is what the encoder makes and decodes as shown."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "binary-format.md").read_text()
    shown = re.search(r"```\n([0-9a-f ]+)\n```", doc).group(1)  # type: ignore[union-attr]
    b = encode_detection_binary(msg(species="lyn", group="medium"), ["lyn", "fel", "vul"], ["large", "medium", "micro"])
    assert payload_bytes(shown) == b
    line = re.search(r"^\$ camtrap-edge decode .*\n(\{.*\})$", doc, re.M).group(1)  # type: ignore[union-attr]
    decoded = decode_detection_binary(b, ["lyn", "fel", "vul"], ["large", "medium", "micro"])
    assert json.loads(line) == {**decoded, "format": "binary (25 bytes)"}


def test_telemetry_counts_come_from_rows_and_counters_in_one_order():
    """Telemetry and `camtrap-edge status` derive their totals here: frames from their rows
    (a frame quarantined twice is one), events of the daemon from its counters."""
    from edge.messages import TELEMETRY_COUNTS, telemetry_counts

    states = {"seen": 4, "processing": 1, "done": 2, "disposed": 5, "quarantined": 1, "gone": 3}
    counters = {"empty": 6, "discarded": 4, "quarantined": 2, "dropped_detections": 2, "dropped_status": 1,
                "rejected": 7, "storage_retries": 9}
    c = telemetry_counts(states, counters)
    assert tuple(c) == TELEMETRY_COUNTS
    assert c == {"processed": 7, "empty": 6, "discarded": 4, "quarantined": 1, "gone": 3, "dropped": 3,
                 "rejected": 7}
    assert telemetry_counts({}, {}) == dict.fromkeys(TELEMETRY_COUNTS, 0)
