"""`camtrap-export update` against boxes over a real Mosquitto: the signed command goes out, each
box's retained ``update`` topic is followed to its end, and the table says what happened. The
boxes here are real Updaters (real http fetch, real engines and self-test) behind a small MQTT
wiring of the kind the daemon uses."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_updates_flow import G2, KEY, OTHER, Box
from update_helpers import Server, relabel_onnx

from edge.messages import topics
from export.update import Fleet, Row, apply_message, run_update, table


class MqttBox:
    """Commands in on ``camtrap/<id>/cmd/+``, replies to the response topic, update records retained;
    a ticker feeds probation as the daemon's loop would (frames, or just time passing)."""

    def __init__(self, broker, box: Box, device: str) -> None:
        self.box, self.device = box, device
        self.prefix = f"camtrap/{device}/"
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"box-{device}",
                                  protocol=mqtt.MQTTv5)
        self.client.will_set(self.prefix + "status", b'{"v":1,"state":"offline"}', qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: threading.Thread(target=self._command, args=(m,)).start()
        self._ready = threading.Event()
        self.client.on_subscribe = lambda *a: self._ready.set()
        box.host.publish = lambda rec: self.client.publish(topics(None, device).update, rec.topic_payload(), qos=1,
                                                           retain=True)
        box.upd.device_id = device
        self._stop = threading.Event()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._ready.wait(10)
        threading.Thread(target=self._tick, daemon=True).start()

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        client.publish(self.prefix + "status", b'{"v":1,"state":"online"}', qos=1, retain=True)
        client.subscribe(self.prefix + "cmd/+", qos=1)

    def _command(self, msg) -> None:
        name = msg.topic.rsplit("/", 1)[1]
        reply = json.dumps(self.box.upd.handle(name, msg.payload)).encode()
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        self.client.publish(msg.properties.ResponseTopic, reply, qos=1, properties=props)

    def _tick(self) -> None:
        while not self._stop.is_set():
            self.box.upd.observe(frames=1, ms_total=5.0)
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_of_two(tmp_path, mosquitto):
    www = tmp_path / "www"
    www.mkdir()
    with Server(www) as srv:
        boxes = []
        for dev in ("trap-a", "trap-b"):
            (tmp_path / dev).mkdir()
            boxes.append(MqttBox(mosquitto, Box(tmp_path / dev, srv), dev))
        fleet = Fleet(mosquitto.host, mosquitto.port)
        yield fleet, boxes, srv
        fleet.close()
        for b in boxes:
            b.close()


def test_update_all_follows_every_box_to_committed(fleet_of_two):
    fleet, boxes, _ = fleet_of_two
    boxes[0].box.publish("demo-2", replace={"group2": relabel_onnx(G2, "fleet")})
    seen = fleet.online_devices(wait_s=0.5)
    assert seen == {"trap-a": "online", "trap-b": "online"}
    rows = run_update(fleet, sorted(seen), command="update", args={"version": "demo-2"}, key_pem=KEY,
                      timeout_s=120)
    assert [(r.device, r.state, r.from_version, r.to_version) for r in rows] == [
        ("trap-a", "committed", "demo-1", "demo-2"), ("trap-b", "committed", "demo-1", "demo-2")]
    assert all(r.bytes == len(G2) + len(b"fleet") + 2 for r in rows)  # one expert each
    assert "probation" in rows[0].seen and rows[0].seen[-1] == "committed"
    out = table(rows)
    assert out.splitlines()[0].split() == ["device", "from", "to", "state", "bytes", "reason"]
    assert "trap-b  demo-1  demo-2  committed" in out.replace("   ", "  ")


def test_a_refusal_comes_back_with_its_reason(fleet_of_two):
    fleet, _, _ = fleet_of_two
    rows = run_update(fleet, ["trap-a"], command="update", args={"version": "demo-0"}, key_pem=KEY, timeout_s=30)
    assert rows[0].state == "refused" and "not newer than the running demo-1" in rows[0].reason
    rows = run_update(fleet, ["trap-b"], command="update", args={"version": "demo-9"}, key_pem=OTHER, timeout_s=30)
    assert rows[0].state == "refused" and "bad signature" in rows[0].reason


def test_a_box_that_never_answers_times_out(fleet_of_two):
    fleet, _, _ = fleet_of_two
    rows = run_update(fleet, ["trap-zz"], command="update", args={"version": "demo-2"}, key_pem=KEY, timeout_s=1)
    assert rows[0].state == "timed out" and "no final state" in rows[0].reason


def test_an_older_retained_record_is_not_taken_for_this_runs_outcome():
    row = Row("trap-a", nonce="ab" * 16)
    apply_message(row, "update", {"id": "ffffffffffff", "state": "committed", "to": "demo-1"})
    assert row.state == "sent"
    apply_message(row, "update", {"id": "ab" * 6, "state": "fetching", "from": "demo-1", "to": "demo-2"})
    assert row.state == "fetching" and row.to_version == "demo-2"


def test_the_command_line_updates_all_and_prints_the_table(fleet_of_two, tmp_path, capsys):
    from export.cli import main

    _, boxes, _ = fleet_of_two
    boxes[0].box.publish("demo-2", replace={"group2": relabel_onnx(G2, "cli")})
    key = tmp_path / "ops.key"
    key.write_bytes(KEY)
    broker = f"{boxes[0].client.host}:{boxes[0].client.port}"
    assert main(["update", "--broker", broker, "--all", "--version", "demo-2", "--sign", str(key),
                 "--timeout", "120"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["device", "from", "to", "state", "bytes", "reason"]
    assert [ln.split()[:4] for ln in out[1:]] == [["trap-a", "demo-1", "demo-2", "committed"],
                                                  ["trap-b", "demo-1", "demo-2", "committed"]]
    assert main(["update", "--broker", broker, "--device", "trap-a", "--version", "demo-1", "--sign", str(key),
                 "--timeout", "30"]) == 1  # refused: not newer
    assert "not newer than the running demo-2" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["many", 1e999, [1], {"a": 1}, -5])
def test_a_hostile_bytes_field_does_not_end_the_follow(bad):
    """Whoever can publish on a box's update topic could end `camtrap-export update` with a
    ValueError or OverflowError (int("many"), int(inf)): a bad count reads as 0."""
    from export.update import Row, apply_message

    row = Row("trap-1")
    row.nonce = "abcdefabcdef0011"
    apply_message(row, "update", {"id": row.nonce[:12], "state": "fetching", "bytes": bad})
    assert row.state == "fetching" and row.bytes == 0
