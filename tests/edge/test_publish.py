"""The MQTT publisher against a real Mosquitto and a real paho subscriber: order, integrity,
broker outages, publisher crashes and restarts, availability (status / last will), auth, TLS,
MQTT 3.1.1, commands; and the MqttConfig model.

Delivery is at least once: the guarantee checked is that the de-duplicated stream of ledger seqs
is exactly the enqueued seqs in order, the raw stream never steps back (max_inflight=1), and
duplicates number at most one per outage or publisher restart.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, Received, Subscriber, make_pki
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edge.ledger import Ledger, OutMsg
from edge.messages import Topics, topics
from edge.mqtt_commands import CommandRegistry, Request
from edge.mqtt_config import MqttConfig
from edge.publish import Publisher

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cam1"
PREFIX = f"camtrap/{DEVICE}/"


def config(broker: Mosquitto, **kw: object) -> MqttConfig:
    base: dict[str, object] = {"host": broker.host, "port": broker.port, "keepalive": 5,
                               "reconnect_min_s": 0.05, "reconnect_max_s": 0.25}
    return MqttConfig(**{**base, **kw})


def fill(ledger: Ledger, n: int, kind: str = "detection") -> list[int]:
    """Enqueue n messages whose JSON payload names their own ledger seq (checked here)."""
    first = _last_seq(ledger) + 1
    topic = "telemetry" if kind == "telemetry" else kind + "s"
    seqs = ledger.enqueue([OutMsg(kind, topic, json.dumps({"seq": first + i}).encode())  # type: ignore[arg-type]
                           for i in range(n)])
    assert seqs == list(range(first, first + n))
    return seqs


def _last_seq(ledger: Ledger) -> int:
    rows = ledger._read("SELECT seq FROM sqlite_sequence WHERE name='outbox'")
    return int(rows[0][0]) if rows else 0


def check_stream(received: list[Received], expected: list[int], outages: int,
                 heads: list[int] | None = None) -> tuple[int, int, list[int]]:
    """The at-least-once-in-order contract. Returns (publisher resends, broker redeliveries,
    missing). ``heads``: for a broker that was SIGKILLed, the lowest unacknowledged seq at each
    kill; a message may then be missing only if that broker had acknowledged it (seq < head)
    and lost it from memory, and such losses form one run ending right before the head."""
    for m in received:
        assert m.seq is None or m.seq == m.body_seq  # MQTT 5 user property = ledger seq
    raw = [m.body_seq for m in received]
    assert raw == sorted(raw), "the raw stream stepped back"
    got = list(dict.fromkeys(raw))
    missing = [s for s in expected if s not in set(got)]
    assert got == [s for s in expected if s not in set(missing)]
    lo = 0
    for head in heads or []:
        lost = [s for s in missing if lo <= s < head]
        assert lost == list(range(head - len(lost), head)), f"lost {lost} is not the run just before {head}"
        lo = head
    assert all(s < lo for s in missing), f"unacknowledged messages lost: {[s for s in missing if s >= lo]}"
    again = [m for i, m in enumerate(received) if i and raw[i] == raw[i - 1]]
    resent = sum(not m.dup for m in again)  # the publisher sent it twice (PUBACK lost in the outage)
    assert resent <= outages, f"{resent} publisher resends for {outages} outage(s) (max_inflight=1)"
    return resent, len(again) - resent, missing


def have(sub: Subscriber, suffix: str, seqs: list[int]) -> Callable[[list[Received]], bool]:
    want = set(seqs)
    return lambda msgs: want <= {m.body_seq for m in msgs if m.topic.endswith(suffix)}


def count(suffix: str, n: int) -> Callable[[list[Received]], bool]:
    return lambda msgs: sum(m.topic.endswith(suffix) for m in msgs) >= n


def status_of(sub: Subscriber) -> list[dict]:
    return [m.json() for m in sub.on("/status")]


@pytest.fixture
def stop_later() -> Callable[[Publisher], Publisher]:
    started: list[Publisher] = []

    def keep(p: Publisher) -> Publisher:
        started.append(p)
        return p

    yield keep
    for p in started:
        p.stop(timeout=2)


# -- the happy path -------------------------------------------------------------------------------
def test_outbox_drains_in_order_intact_and_empties(mosquitto: Mosquitto, ledger: Ledger,
                                                   stop_later: Callable[[Publisher], Publisher]) -> None:
    sub = Subscriber(mosquitto, PREFIX + "#").start()
    seqs = fill(ledger, 60)
    tele = fill(ledger, 5, kind="telemetry")  # QoS 0: gone from the outbox once written
    binary = bytes(range(256))
    [bseq] = ledger.enqueue([OutMsg("alert", "alerts", binary)])
    # poll_s=1 h: rows are picked up only because the ledger wakes the publisher
    pub = stop_later(Publisher(config(mosquitto), ledger, DEVICE, model="2026.11.1", boot_id="boot-1",
                               poll_s=3600))
    pub.start()
    assert pub.wait_drained(20)
    assert sub.wait_for(have(sub, "/detections", seqs))
    assert sub.wait_for(have(sub, "/telemetry", tele))  # QoS 0: no loss expected on loopback
    assert sub.wait_for(lambda msgs: any(m.topic.endswith("/alerts") for m in msgs))
    check_stream(sub.on("/detections"), seqs, outages=0)
    assert [m.body_seq for m in sub.on("/telemetry")] == tele
    [alert] = sub.on("/alerts")
    assert alert.payload == binary and alert.seq == bseq
    assert ledger.outbox_depth() == 0 and ledger.counters() == {}
    [online] = status_of(sub)
    assert online["state"] == "online" and online["boot"] == "boot-1" and online["m"] == "2026.11.1"
    # the status is retained: a late subscriber learns it at once
    late = Subscriber(mosquitto, PREFIX + "status").start()
    assert late.wait_for(lambda msgs: len(msgs) == 1)
    assert late.messages[0].retain and late.messages[0].json()["state"] == "online"
    more = fill(ledger, 3)  # written while the publisher idles: the ledger's listener wakes it
    assert sub.wait_for(have(sub, "/detections", more))
    sub.stop()
    late.stop()


def test_publisher_waits_for_a_broker_that_is_not_up_yet(tmp_path: Path, ledger: Ledger,
                                                         stop_later: Callable[[Publisher], Publisher]) -> None:
    broker = Mosquitto(tmp_path)  # port reserved, not started
    try:
        seqs = fill(ledger, 10)
        pub = stop_later(Publisher(config(broker), ledger, DEVICE))
        pub.start()
        time.sleep(0.5)  # several refused attempts
        assert not pub.connected and ledger.outbox_depth() == 10
        broker.start()
        sub = Subscriber(broker, PREFIX + "#").start()  # may miss some: only the outbox is checked
        assert pub.wait_drained(20)
        sub.stop()
        assert seqs and ledger.outbox_depth() == 0
    finally:
        broker.close()


def test_every_topic_on_the_wire_is_named_by_topics(mosquitto: Mosquitto, ledger: Ledger,
                                                     stop_later: Callable[[Publisher], Publisher]) -> None:
    """Issue 7 item 16: with a custom prefix, each outbox kind, the status and a command reply
    arrive on exactly the names edge.messages.Topics gives, and on nothing else."""
    cfg = config(mosquitto, prefix="parks/donana/{device_id}/traps/")
    t = topics(cfg.prefix, DEVICE)
    assert cfg.topics(DEVICE) == t and t.prefix == "parks/donana/cam1/traps/"
    sub = Subscriber(mosquitto, "#").start()
    rows = [OutMsg("detection", Topics.DETECTIONS, b"d"), OutMsg("alert", Topics.ALERTS, b"a"),
            OutMsg("detection", Topics.EVENTS, b"e"), OutMsg("telemetry", Topics.TELEMETRY, b"t"),
            OutMsg("status", Topics.UPDATE, b"u", retain=True)]
    ledger.enqueue(rows)
    registry = CommandRegistry()
    registry.register("ping", lambda req: {"pong": 1})
    pub = stop_later(Publisher(cfg, ledger, DEVICE, commands=registry))
    pub.start()
    assert pub.wait_drained(10) and pub.wait_commands_ready(10)
    ctl = _controller(mosquitto)
    ctl.publish(t.command("ping"), b"{}", qos=1).wait_for_publish(5)
    wanted = {t.detections: b"d", t.alerts: b"a", t.events: b"e", t.telemetry: b"t", t.update: b"u"}
    assert sub.wait_for(lambda ms: set(wanted) | {t.status, t.reply("ping")} <= {m.topic for m in ms})
    time.sleep(0.2)
    got = {m.topic: m.payload for m in sub.snapshot()}
    assert set(got) == set(wanted) | {t.status, t.reply("ping"), t.command("ping")}
    assert all(got[k] == v for k, v in wanted.items())
    ctl.loop_stop()
    ctl.disconnect()
    sub.stop()


# -- outages --------------------------------------------------------------------------------------
def test_rows_leave_the_outbox_only_on_puback(mosquitto: Mosquitto, ledger: Ledger,
                                              stop_later: Callable[[Publisher], Publisher]) -> None:
    """Freeze the broker (SIGSTOP): one message is on the wire, no PUBACK comes, every row stays
    in the ledger; thaw it and they all go. Freeze it again and kill it frozen: the message on
    the wire never reached it, so paho resends it after the reconnect, and it arrives once."""
    sub = Subscriber(mosquitto, PREFIX + "detections", persistent=True).start()
    mosquitto.save()
    first = fill(ledger, 5)
    pub = stop_later(Publisher(config(mosquitto), ledger, DEVICE))
    pub.start()
    assert sub.wait_for(have(sub, "detections", first)) and pub.wait_drained(5)
    for hard in (False, True):
        mosquitto.proc.send_signal(signal.SIGSTOP)
        try:
            more = fill(ledger, 5)
            time.sleep(0.5)
            assert pub.connected and pub.inflight == 1  # window of one: sent, not acknowledged
            assert [m.seq for m in ledger.pending()] == more
        finally:
            if hard:
                mosquitto.kill()
            mosquitto.proc.send_signal(signal.SIGCONT)
        if hard:
            mosquitto.start()
        first += more
        assert sub.wait_for(have(sub, "detections", first)) and pub.wait_drained(5)
    check_stream(sub.snapshot(), first, outages=1)
    assert pub.stats["connects"] == 2
    sub.stop()


def _outages(broker: Mosquitto, sub: Subscriber, pub: Publisher, ledger: Ledger, hard: bool) -> list[int]:
    """Take the broker down twice mid-stream and bring it back on the same port. Returns the
    lowest unacknowledged seq at each outage, once the publisher has seen the link drop."""
    heads = []
    for at in (300, 900):
        assert sub.wait_for(count("detections", at))
        broker.kill() if hard else broker.stop()
        deadline = time.monotonic() + 5
        while pub.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # PUBACKs that arrived before the drop are processed; retries hit a closed port
        assert not pub.connected
        assert ledger.outbox_depth() > 0, "the stream had ended before the outage: test proves nothing"
        heads.append(ledger.pending(1)[0].seq)
        broker.start()
    return heads


def test_broker_stopped_mid_stream_twice_nothing_lost_in_order(mosquitto: Mosquitto, ledger: Ledger,
                                                               stop_later: Callable[[Publisher], Publisher],
                                                               record_property: Callable[[str, object], None]) -> None:
    """Stop the broker (SIGTERM: it saves its queues) twice while 1500 messages stream out:
    the subscriber gets every one, in order; duplicates: at most one publisher resend and one
    broker redelivery per outage (max_inflight=1 here, receive maximum 1 there)."""
    sub = Subscriber(mosquitto, PREFIX + "detections", persistent=True, receive_maximum=1).start()
    seqs = fill(ledger, 1500)
    pub = stop_later(Publisher(config(mosquitto), ledger, DEVICE))
    pub.start()
    _outages(mosquitto, sub, pub, ledger, hard=False)
    assert sub.wait_for(have(sub, "detections", seqs), timeout=30)
    resent, redelivered, missing = check_stream(sub.snapshot(), seqs, outages=2)
    assert missing == [] and redelivered <= 2
    record_property("duplicates", resent + redelivered)
    print(f"broker stopped twice: {len(seqs)} messages, {resent} publisher resend(s), "
          f"{redelivered} broker redelivery(ies)")
    assert pub.wait_drained(10)
    assert pub.stats["disconnects"] == 2 and pub.stats["connects"] == 3
    sub.stop()


def test_broker_killed_mid_stream_twice_publisher_loses_nothing(mosquitto: Mosquitto, ledger: Ledger,
                                                                stop_later: Callable[[Publisher], Publisher],
                                                                record_property: Callable[[str, object], None]) -> None:
    """SIGKILL the broker twice mid-stream (a power cut: Mosquitto keeps undelivered messages in
    memory). Everything the broker had not acknowledged arrives, in order, after the restart;
    the only messages that may be missing are ones the dead broker had acknowledged and not yet
    delivered (counted, and checked to be exactly the run before each kill's head)."""
    sub = Subscriber(mosquitto, PREFIX + "detections", persistent=True).start()
    mosquitto.save()  # the subscriber's session survives the kills; nothing later is saved
    seqs = fill(ledger, 1500)
    pub = stop_later(Publisher(config(mosquitto), ledger, DEVICE))
    pub.start()
    heads = _outages(mosquitto, sub, pub, ledger, hard=True)
    assert sub.wait_for(lambda msgs: seqs[-1] in {m.body_seq for m in msgs}, timeout=30)
    time.sleep(0.2)
    resent, redelivered, missing = check_stream(sub.snapshot(), seqs, outages=2, heads=heads)
    record_property("duplicates", resent + redelivered)
    record_property("lost_by_broker", len(missing))
    print(f"broker killed twice: {len(seqs)} messages, {resent} publisher resend(s), {redelivered} broker "
          f"redelivery(ies), {len(missing)} acknowledged by the broker and lost with it")
    assert pub.wait_drained(10) and pub.stats["connects"] == 3
    sub.stop()


PUBLISHER_CHILD = textwrap.dedent("""
    import sys, time
    from edge.ledger import Ledger
    from edge.mqtt_config import MqttConfig
    from edge.publish import Publisher
    cfg = MqttConfig.model_validate_json(sys.argv[2])
    Publisher(cfg, Ledger(sys.argv[1]), "cam1", boot_id="child", model="m1").start()
    while True:
        time.sleep(1)
""")


def test_publisher_killed_last_will_then_a_new_publisher_finishes(mosquitto: Mosquitto, tmp_path: Path,
                                                                  stop_later: Callable[[Publisher], Publisher]) -> None:
    """A publisher process is SIGKILLed mid-stream: the broker publishes its last will
    (retained offline); a new Publisher over the same ledger sends the rest, in order."""
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as led:
        seqs = fill(led, 1500)
    sub = Subscriber(mosquitto, PREFIX + "#").start()
    cfg = config(mosquitto)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", PUBLISHER_CHILD, str(path), cfg.model_dump_json()], env=env)
    try:
        assert sub.wait_for(count("/detections", 200))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert sub.wait_for(lambda msgs: any(m.topic.endswith("/status") and m.json()["state"] == "offline"
                                         for m in msgs))
    states = [(s["state"], s["boot"]) for s in status_of(sub)]
    assert states == [("online", "child"), ("offline", "child")]
    led = Ledger(path)
    assert 0 < led.outbox_depth() < 1500
    pub = stop_later(Publisher(cfg, led, DEVICE, boot_id="second"))
    pub.start()
    assert sub.wait_for(have(sub, "/detections", seqs))
    resent, _, _ = check_stream(sub.on("/detections"), seqs, outages=1)
    print(f"publisher killed once: {resent} duplicate(s) seen")
    assert pub.wait_drained(10)
    pub.stop()
    assert sub.wait_for(lambda msgs: status_of(sub)[-1]["state"] == "stopped")
    assert [(s["state"], s["boot"]) for s in status_of(sub)][2:] == [("online", "second"), ("stopped", "second")]
    sub.stop()
    # clean stop: the broker keeps "stopped" (no last will), and a new subscriber is told so
    late = Subscriber(mosquitto, PREFIX + "status").start()
    assert late.wait_for(lambda msgs: len(msgs) >= 1)
    time.sleep(0.2)
    assert [m.json()["state"] for m in late.messages] == ["stopped"]
    late.stop()
    led.close()


def test_stop_then_new_publisher_sends_what_was_added_meanwhile(mosquitto: Mosquitto, ledger: Ledger,
                                                                stop_later: Callable[[Publisher], Publisher]) -> None:
    sub = Subscriber(mosquitto, PREFIX + "detections").start()
    first = fill(ledger, 20)
    a = Publisher(config(mosquitto), ledger, DEVICE, boot_id="a")
    a.start()
    assert a.wait_drained(10)
    a.stop()
    second = fill(ledger, 20)  # written while no publisher runs: they wait in the ledger
    assert ledger.outbox_depth() == 20
    b = stop_later(Publisher(config(mosquitto), ledger, DEVICE, boot_id="b"))
    b.start()
    assert sub.wait_for(have(sub, "detections", first + second))
    check_stream(sub.messages, first + second, outages=0)  # a clean stop leaves nothing in flight
    assert b.wait_drained(10)
    sub.stop()


# -- auth, TLS, protocol --------------------------------------------------------------------------
def test_password_from_env_works_and_a_wrong_one_is_a_clear_error(mosquitto_factory: Callable[..., Mosquitto],
                                                                  ledger: Ledger, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  stop_later: Callable[[Publisher], Publisher]) -> None:
    broker = mosquitto_factory(passwords={"cam1": "right-horse-battery", "reader": "r"})
    sub = Subscriber(broker, PREFIX + "#", username="reader", password="r").start()
    seqs = fill(ledger, 5)
    monkeypatch.setenv("CAMTRAP_MQTT_PW", "wrong-staple-4711")
    caplog.set_level(logging.DEBUG)
    bad = stop_later(Publisher(config(broker, username="cam1", password_env="CAMTRAP_MQTT_PW"), ledger, DEVICE))
    bad.start()
    deadline = time.monotonic() + 10
    while bad.stats["refused"] < 2 and time.monotonic() < deadline:  # refused, retried, refused again
        time.sleep(0.02)
    assert bad.stats["refused"] >= 2 and not bad.connected
    assert "refused the connection" in bad.last_error and "password" in bad.last_error
    assert any(r.levelno == logging.ERROR and "refused the connection" in r.getMessage() for r in caplog.records)
    assert bad._thread is not None and bad._thread.is_alive()  # no crash
    assert ledger.outbox_depth() == 5
    bad.stop()
    assert "wrong-staple-4711" not in caplog.text and "wrong-staple-4711" not in repr(bad.cfg)

    monkeypatch.setenv("CAMTRAP_MQTT_PW", "right-horse-battery")
    good = stop_later(Publisher(config(broker, username="cam1", password_env="CAMTRAP_MQTT_PW"), ledger, DEVICE))
    good.start()
    assert sub.wait_for(have(sub, "/detections", seqs))
    assert good.wait_drained(10) and good.last_error is None
    assert "right-horse-battery" not in caplog.text
    sub.stop()


def test_password_file_and_mutual_tls(mosquitto_factory: Callable[..., Mosquitto], ledger: Ledger, tmp_path: Path,
                                      stop_later: Callable[[Publisher], Publisher]) -> None:
    pki = make_pki(tmp_path / "pki")
    broker = mosquitto_factory(pki=pki, require_cert=True, passwords={"cam1": "pw-from-file"})
    sub = Subscriber(broker, PREFIX + "#", pki=pki, username="cam1", password="pw-from-file").start()
    (tmp_path / "pw").write_text("pw-from-file\n")
    (tmp_path / "pw").chmod(0o600)
    cfg = config(broker, username="cam1", password_file=tmp_path / "pw",
                 tls={"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key})
    seqs = fill(ledger, 5)
    pub = stop_later(Publisher(cfg, ledger, DEVICE))
    pub.start()
    assert sub.wait_for(have(sub, "/detections", seqs))
    assert pub.wait_drained(10)
    sub.stop()


def test_mqtt_311_also_works(mosquitto: Mosquitto, ledger: Ledger,
                             stop_later: Callable[[Publisher], Publisher]) -> None:
    sub = Subscriber(mosquitto, PREFIX + "#").start()
    seqs = fill(ledger, 10)
    pub = stop_later(Publisher(config(mosquitto, protocol="3.1.1"), ledger, DEVICE))
    pub.start()
    assert sub.wait_for(have(sub, "/detections", seqs))
    assert all(m.seq is None for m in sub.on("/detections"))  # no user properties in 3.1.1
    check_stream(sub.on("/detections"), seqs, outages=0)
    assert status_of(sub)[0]["state"] == "online"
    sub.stop()


# -- commands -------------------------------------------------------------------------------------
def _controller(broker: Mosquitto) -> mqtt.Client:
    ctl = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    ctl.connect(broker.host, broker.port)
    ctl.loop_start()
    return ctl


def _request(ctl: mqtt.Client, name: str, payload: bytes = b"{}", response: str | None = None,
             correlation: bytes | None = None) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if response is not None:
        props.ResponseTopic = response
    if correlation is not None:
        props.CorrelationData = correlation
    ctl.publish(PREFIX + "cmd/" + name, payload, qos=1, properties=props).wait_for_publish(5)


def test_commands_reply_on_response_topic_or_reply_topic(mosquitto: Mosquitto, ledger: Ledger,
                                                         stop_later: Callable[[Publisher], Publisher]) -> None:
    calls: list[tuple[str, bytes]] = []
    registry = CommandRegistry()

    def handle(req: Request) -> dict | None:
        calls.append((req.name, req.payload))
        if req.name == "boom":
            raise RuntimeError("no such thing")
        return None if req.name == "quiet" else {"ok": True, "cmd": req.name}

    for name in ("ping", "boom", "quiet"):
        registry.register(name, handle)
    sub = Subscriber(mosquitto, "#").start()
    pub = stop_later(Publisher(config(mosquitto), ledger, DEVICE, commands=registry))
    pub.start()
    assert pub.wait_connected(10) and pub.wait_commands_ready(10)
    ctl = _controller(mosquitto)
    own = PREFIX + "cmd/ping/reply/ops-7"
    _request(ctl, "ping", response=own, correlation=b"req-42")
    _request(ctl, "boom", payload=b"")
    _request(ctl, "quiet", payload=b"x")
    _request(ctl, "nosuch")
    assert sub.wait_for(lambda msgs: {own, PREFIX + "cmd/boom/reply", PREFIX + "cmd/nosuch/reply"}
                        <= {m.topic for m in msgs})
    [ping] = [m for m in sub.messages if m.topic == own]
    assert ping.json() == {"ok": True, "cmd": "ping"}
    [boom] = [m for m in sub.messages if m.topic == PREFIX + "cmd/boom/reply"]
    assert boom.json() == {"ok": False, "error": "RuntimeError: no such thing"}
    [unknown] = [m for m in sub.messages if m.topic == PREFIX + "cmd/nosuch/reply"]
    assert unknown.json() == {"ok": False, "error": "unknown command 'nosuch'", "known": ["boom", "ping", "quiet"]}
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [c[0] for c in calls] == ["ping", "boom", "quiet"]
    assert not [m for m in sub.messages if "quiet/" in m.topic]
    ctl.loop_stop()
    ctl.disconnect()
    sub.stop()


def test_a_retained_command_is_refused_once_not_at_every_reconnect(mosquitto: Mosquitto, ledger: Ledger,
                                                                   stop_later: Callable[[Publisher], Publisher],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Retained messages on cmd/* come back with every subscription: they were refused (or, for
    an unsigned command such as ping, run) again at each reconnect. Now never run, said once per
    message with how to clear it, counted each time; a live command still runs."""
    caplog.set_level(logging.INFO, logger="edge.mqtt_commands")
    calls: list[str] = []
    registry = CommandRegistry()
    registry.register("ping", lambda r: (calls.append(r.name), {"pong": 1})[1])
    ctl = _controller(mosquitto)
    for name, body in (("ping", b"{}"), ("update", b'{"stale": "signed command, long expired"}')):
        ctl.publish(PREFIX + "cmd/" + name, body, qos=1, retain=True).wait_for_publish(5)
    pub = stop_later(Publisher(config(mosquitto), ledger, DEVICE, commands=registry))
    pub.start()
    assert pub.wait_connected(10) and pub.wait_commands_ready(10)
    for _ in range(3):  # three reconnects: a client with our id takes the session, then leaves
        thief = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"camtrap-{DEVICE}",
                            protocol=mqtt.MQTTv5)
        thief.connect(mosquitto.host, mosquitto.port)
        thief.disconnect()
        deadline = time.monotonic() + 10
        before = pub.stats["connects"]
        while pub.stats["connects"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pub.wait_commands_ready(10)
    worker = pub._worker
    assert worker is not None
    deadline = time.monotonic() + 10
    while worker.stats["refused_retained"] < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.stats["refused_retained"] == 8  # 2 messages x 4 subscriptions, each refused
    _request(ctl, "ping")  # a live command: runs
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert calls == ["ping"]  # the live one only, never the retained one
    lines = [r.getMessage() for r in caplog.records if "retained" in r.getMessage()]
    assert len(lines) == 2, lines  # once per message, not once per reconnect
    assert all("mosquitto_pub -t 'camtrap/cam1/cmd/" in x and "-r -n" in x for x in lines), lines
    for name in ("ping", "update"):  # clean up as the line says
        ctl.publish(PREFIX + "cmd/" + name, b"", qos=1, retain=True).wait_for_publish(5)
    ctl.loop_stop()
    ctl.disconnect()


# -- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = MqttConfig()
    assert (c.port, c.protocol, c.max_inflight) == (1883, "5", 1)
    assert (c.qos.detection, c.qos.alert, c.qos.telemetry, c.qos.status) == (1, 1, 0, 1)
    assert c.topic_prefix("cam7") == "camtrap/cam7/" and c.client_id_for("cam7") == "camtrap-cam7"
    for bad in ({"prefix": "camtrap/{device_id}"}, {"prefix": "a/#/"}, {"prefix": "a/{site}/{device_id}/"},
                {"port": 0}, {"protocol": "4"}, {"hots": "x"}, {"password_env": "X"},
                {"username": "u", "password_env": "X", "password_file": "/f"},
                {"tls": {"cert_file": "/c.pem"}}, {"qos": {"detection": 3}},
                {"reconnect_min_s": 5, "reconnect_max_s": 1}):
        with pytest.raises(ValidationError):
            MqttConfig.model_validate(bad)
    with pytest.raises(ValueError):
        c.topic_prefix("a/b")

    secret = "hunter2-do-not-print"
    inline = MqttConfig(username="u", password=secret)
    assert secret not in repr(inline) and secret not in str(inline) and secret not in inline.model_dump_json()
    assert inline.resolve_password() == secret

    env = MqttConfig(username="u", password_env="CAMTRAP_TEST_PW")
    monkeypatch.delenv("CAMTRAP_TEST_PW", raising=False)
    assert env.runtime_problems() == ["mqtt.password_env: environment variable CAMTRAP_TEST_PW is not set"]
    monkeypatch.setenv("CAMTRAP_TEST_PW", secret)
    assert env.resolve_password() == secret and env.runtime_problems() == []

    f = tmp_path / "pw"
    filecfg = MqttConfig(username="u", password_file=f, tls={"ca_file": tmp_path / "nope.pem"})
    problems = filecfg.runtime_problems()
    assert any("password_file" in p for p in problems) and any("tls.ca_file" in p for p in problems)
    f.write_text(secret + "\n")
    f.chmod(0o600)
    assert filecfg.resolve_password() == secret


def test_password_file_permissions_follow_one_rule(tmp_path: Path) -> None:
    """Issue 7 item 13: 0600, or 0640 for root:camtrap; group-writable or world-readable is refused,
    when the password is read and by check-config, with the mode and the fix, never the secret."""
    f = tmp_path / "pw"
    f.write_text("s3cret-horse\n")
    cfg = MqttConfig(username="u", password_file=f)
    for mode, ok in ((0o600, True), (0o640, True), (0o400, True), (0o644, False), (0o660, False),
                     (0o604, False), (0o666, False)):
        f.chmod(mode)
        if ok:
            assert cfg.resolve_password() == "s3cret-horse" and cfg.runtime_problems() == []
        else:
            with pytest.raises(ValueError, match=f"mode {mode:04o}.*chmod 600") as e:
                cfg.resolve_password()
            assert "s3cret" not in str(e.value)
            [line] = cfg.runtime_problems()
            assert line.startswith("mqtt.password_file:") and f"{mode:04o}" in line


def test_prefix_and_client_id_are_validated_without_echoing_them() -> None:
    """Issue 7 item 13: NUL, $SYS, no {device_id}, 70,000 characters; a client id with NUL."""
    for bad in ("camtrap/\x00{device_id}/", "$SYS/{device_id}/", "camtrap/all/", "c/" * 35_000 + "{device_id}/"):
        with pytest.raises(ValidationError) as e:
            MqttConfig(prefix=bad)
        [err] = e.value.errors(include_input=False)
        assert err["loc"] == ("prefix",) and bad not in err["msg"]
    for bad in ("cam\x00era", "", "x" * 200, "line\nbreak"):
        with pytest.raises(ValidationError, match="client_id"):
            MqttConfig(client_id=bad)
    assert MqttConfig(client_id="trap-07_ü").client_id_for("x") == "trap-07_ü"
    assert MqttConfig(prefix="parks/{device_id}/").topic_prefix("t1") == "parks/t1/"
