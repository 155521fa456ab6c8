"""The MQTT command surface (issue 7 items 10, 11 and the logging part of 13): the registry,
where replies may go, the worker that keeps commands away from the outbox, escaped and
throttled log lines; and a flood of hostile commands during a burst of detections against a
real Mosquitto, which must not delay the detections."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from broker import Mosquitto, Subscriber
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_publish import PREFIX, _controller, check_stream, config, fill, have

from edge.ledger import Ledger
from edge.messages import topics
from edge.mqtt_commands import MAX_REPLIES_INFLIGHT, CommandRegistry, CommandWorker, Request, reply_route
from edge.publish import Publisher
from edge.throttle import ThrottledLog, printable

DEVICE = "cam1"
T = topics(None, DEVICE)


# -- pure parts --------------------------------------------------------------------------------------
def test_registry_names_duplicates_unknown_and_failing_handlers() -> None:
    reg = CommandRegistry()
    reg.register("ping", lambda r: {"pong": 1})
    with pytest.raises(ValueError, match="already registered"):
        reg.register("ping", lambda r: None)
    reg.register("ping", lambda r: {"pong": 2}, replace=True)
    for bad in ("Ping", "a/b", "", "x" * 40, "ping\n"):
        with pytest.raises(ValueError, match="not a command name"):
            reg.register(bad, lambda r: None)

    def boom(req: Request) -> dict:
        raise RuntimeError("line one\nFAKE LOG LINE")

    reg.register("boom", boom)
    assert reg.dispatch(Request("ping", b"")) == {"pong": 2}
    assert reg.dispatch(Request("nope", b"")) == {"ok": False, "error": "unknown command 'nope'",
                                                  "known": ["boom", "ping"]}
    assert reg.dispatch(Request("boom", b"")) == {"ok": False, "error": "RuntimeError: line one\\nFAKE LOG LINE"}
    reg.unregister("boom")
    assert reg.names() == ["ping"]


def test_reply_route_keeps_replies_in_the_commands_own_subtree() -> None:
    assert reply_route(T, Request("ping", b"")) == (T.reply("ping"), None)
    own = T.reply("ping") + "/ops/42"
    assert reply_route(T, Request("ping", b"", own)) == (own, None)
    for hostile in ("camtrap/trap-02/alerts", T.status, T.detections, "homeassistant/sensor/x/config", "camtrap/#",
                    T.reply("update"), T.reply("ping") + "/#"):
        topic, why = reply_route(T, Request("ping", b"", hostile))
        assert topic == T.reply("ping") and why and "outside" in why


def test_printable_escapes_control_characters_and_cuts() -> None:
    assert printable("ping\nFAKE: root logged in") == "ping\\nFAKE: root logged in"
    assert printable(b"\x00\xff ok") == "\\x00\\xff ok"
    assert printable("\u202eevil") == "\\u202eevil"
    long = printable("x" * 10_000, limit=64)
    assert len(long) <= 67 and long.endswith("...")


def test_throttled_log_holds_back_a_flood_and_counts_it(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    tl = ThrottledLog(logging.getLogger("t.throttle"), rate=1.0, burst=3, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="t.throttle")
    written = sum(tl.log(logging.INFO, "command %s", i) for i in range(10_000))
    assert written == 3 and tl.suppressed == 9_997
    now[0] += 1.0
    assert tl.log(logging.INFO, "command %s", "last")
    assert [r.getMessage() for r in caplog.records][-1] == \
        "command last (9,997 similar line(s) suppressed before this one)"
    assert tl.suppressed == 0


class _Info:
    def __init__(self, published: bool = False) -> None:
        self.rc = 0
        self.published = published

    def is_published(self) -> bool:
        return self.published

    def wait_for_publish(self, timeout: float | None = None) -> None:
        time.sleep(min(timeout or 0, 0.01))


def _worker(publish: Callable[..., Any], **kw: Any) -> tuple[CommandWorker, list[str]]:
    calls: list[str] = []
    reg = CommandRegistry()
    reg.register("ping", lambda r: (calls.append(r.name), {"pong": 1})[1])
    return CommandWorker(reg, T, publish, **kw), calls


def _settle(worker: CommandWorker, n: int, key: Callable[[CommandWorker], int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while key(worker) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_worker_queue_is_bounded_and_submit_never_raises() -> None:
    worker, calls = _worker(lambda *a: _Info(True), queue_max=16)
    for _ in range(100):  # the worker is not started: the queue fills
        worker.submit(T.command("ping"), b"{}")
    assert worker.stats["dropped_queue"] == 84

    class Hostile:
        @property
        def ResponseTopic(self) -> str:  # paho's property name
            raise RuntimeError("a property that explodes")

    worker.submit(T.command("ping"), b"", Hostile())  # caught, counted
    worker.submit("camtrap/other/cmd/ping", b"")
    worker.submit(T.command("ping\nFAKE"), b"")
    assert worker.stats["errors"] == 1 and worker.stats["refused_name"] == 2
    worker.start()
    _settle(worker, 16, lambda w: w.stats["received"])
    worker.stop()
    assert len(calls) == 16


def test_worker_survives_an_unexpected_error_and_logs_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """An error outside the handler (here: paho's info object raising a TypeError once) is counted and
    logged with its traceback, and later commands are still answered (the worker's own log call once
    raised a TypeError on exc_info, which ended the worker thread)."""

    class Flaky(_Info):
        raised = False

        def is_published(self) -> bool:
            if not Flaky.raised:
                Flaky.raised = True
                raise TypeError("an info object gone wrong")
            return True

    worker, calls = _worker(lambda *a: Flaky())
    caplog.set_level(logging.ERROR, logger="edge.mqtt_commands")
    worker.start()
    for _ in range(3):
        worker.submit(T.command("ping"), b"{}")
    _settle(worker, 2, lambda w: w.stats["replied"])
    worker.stop()
    assert worker.stats["errors"] == 1 and worker.stats["replied"] == 2 and len(calls) == 3, worker.stats
    err = next(r for r in caplog.records if "command ping: unexpected error" in r.getMessage())
    assert err.exc_info is not None and "an info object gone wrong" in str(err.exc_info[1])


def test_worker_rate_limits_handlers() -> None:
    worker, calls = _worker(lambda *a: _Info(True), rate=1.0, burst=5)
    worker.start()
    for _ in range(50):
        worker.submit(T.command("ping"), b"{}")
    _settle(worker, 50, lambda w: w.stats["received"] + w.stats["dropped_rate"])
    worker.stop()
    assert 5 <= len(calls) <= 7 and worker.stats["dropped_rate"] >= 43


def test_worker_bounds_unacknowledged_replies_and_survives_paho_errors() -> None:
    sent: list[tuple[str, bytes, bytes | None]] = []

    def never_acked(topic: str, body: bytes, corr: bytes | None) -> _Info:
        sent.append((topic, body, corr))
        return _Info(False)

    worker, _ = _worker(never_acked)
    worker.start()
    for _ in range(12):
        worker.submit(T.command("ping"), b"{}")
    _settle(worker, 12 - MAX_REPLIES_INFLIGHT, lambda w: w.stats["dropped_reply"])
    assert len(sent) == MAX_REPLIES_INFLIGHT and worker.stats["dropped_reply"] == 12 - MAX_REPLIES_INFLIGHT
    worker.stop()

    def raising(topic: str, body: bytes, corr: bytes | None) -> _Info:
        raise ValueError("Publish topic cannot contain wildcards.")

    worker, _ = _worker(raising)
    worker.start()
    for _ in range(3):
        worker.submit(T.command("ping"), b"{}")
    _settle(worker, 3, lambda w: w.stats["reply_errors"])
    assert worker.stats["reply_errors"] == 3 and worker.alive
    worker.stop()


# -- against a real broker --------------------------------------------------------------------------
def _props(response: str | None = None, correlation: bytes | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if response is not None:
        props.ResponseTopic = response
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def _registry() -> CommandRegistry:
    reg = CommandRegistry()
    reg.register("ping", lambda r: {"pong": 1})
    return reg


HOSTILE_RESPONSE_TOPICS = ["camtrap/trap-02/alerts", "camtrap/trap-02/status", "homeassistant/sensor/x/config",
                           PREFIX + "alerts", PREFIX + "status", PREFIX + "detections", PREFIX + "cmd/update/reply",
                           "camtrap/#", "camtrap/+/alerts"]


def test_response_topic_injection_is_refused(mosquitto: Mosquitto, ledger: Ledger,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Issue 7 item 10: a response topic outside <prefix>cmd/ping/reply[/...] is not honoured;
    the reply goes to the default reply topic with the correlation data, and the refusal is
    logged. A response topic inside the subtree is honoured."""
    caplog.set_level(logging.INFO)
    sub = Subscriber(mosquitto, "#").start()
    pub = Publisher(config(mosquitto), ledger, DEVICE, commands=_registry())
    pub.start()
    try:
        assert pub.wait_commands_ready(10)
        ctl = _controller(mosquitto)
        for i, hostile in enumerate(HOSTILE_RESPONSE_TOPICS):
            ctl.publish(T.command("ping"), b"{}", qos=1, properties=_props(hostile, b"c%d" % i)).wait_for_publish(5)
        own = T.reply("ping") + "/ops-7"
        ctl.publish(T.command("ping"), b"{}", qos=1, properties=_props(own, b"mine")).wait_for_publish(5)
        n = len(HOSTILE_RESPONSE_TOPICS)
        assert sub.wait_for(lambda ms: len([m for m in ms if m.topic == T.reply("ping")]) >= n
                            and any(m.topic == own for m in ms))
        time.sleep(0.3)
        msgs = sub.snapshot()
        replies = [m for m in msgs if m.topic == T.reply("ping")]
        assert sorted(m.correlation for m in replies) == sorted(b"c%d" % i for i in range(n))
        assert all(m.json() == {"pong": 1} for m in replies)
        [mine] = [m for m in msgs if m.topic == own]
        assert mine.correlation == b"mine"
        sent_by_us = {T.command("ping")}
        assert {m.topic for m in msgs} == sent_by_us | {T.status, T.reply("ping"), own}
        refused = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
        assert refused and "camtrap/trap-02/alerts" in refused[0]
        ctl.loop_stop()
        ctl.disconnect()
    finally:
        pub.stop(timeout=2)
        sub.stop()


FLOOD_RATE = 2000  # commands per second, twice the security run's 10,000 in 10 s


def _flood(broker: Mosquitto, stop: threading.Event, sent: list[int]) -> None:
    """Hostile commands at about FLOOD_RATE per second from one client: wildcard and foreign
    response topics, names our rule refuses, huge and non-UTF-8 payloads, 64 KiB correlation
    data, unknown names, a handler that raises and one that is slow; QoS 0 and 1 mixed."""
    ctl = _controller(broker)
    big = os.urandom(256 * 1024)
    kinds: list[tuple[str, bytes, Properties | None]] = [
        (T.command("ping"), b"{}", _props("camtrap/#", b"x")),
        (T.command("ping"), b"{}", _props("camtrap/+/alerts")),
        (T.command("ping"), b"{}", _props(PREFIX + "detections", b"y")),
        (T.command("ping"), b"{}", _props("camtrap/trap-02/alerts")),
        (T.command("status"), b"\xff\xfe\x00", _props("homeassistant/sensor/x/config")),
        # names our rule refuses (Mosquitto itself drops a client whose topic holds a control character)
        (T.command("Ping me"), b"{}", None),
        (T.command("\u202eevil" + "x" * 40), b"{}", None),
        (T.command("ping"), b"{}", _props(correlation=os.urandom(65_535))),
        (T.command("nosuch"), b"{}", None),
        (T.command("boom"), b"{}", _props(T.reply("boom") + "/+")),
        (T.command("slow"), b"{}", None),
    ]
    try:
        i = 0
        t0 = time.monotonic()
        while not stop.is_set():
            if i % 50 == 49:
                topic, payload, props = T.command("ping"), big, None  # 256 KiB, now and then
            else:
                topic, payload, props = kinds[i % len(kinds)]
            ctl.publish(topic, payload, qos=i % 2, properties=props)
            i += 1
            ahead = i / FLOOD_RATE - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        sent.append(i)
    finally:
        ctl.loop_stop()
        ctl.disconnect()


def test_a_flood_of_hostile_commands_does_not_delay_detections(mosquitto: Mosquitto, ledger: Ledger,
                                                               caplog: pytest.LogCaptureFixture,
                                                               record_property: Callable[[str, object], None]) -> None:
    """Issue 7 item 11: 60 pings with a wildcard response topic held every detection back for
    about 110 s. Here hostile commands arrive at 2,000 per second while 300 detections are
    written in a burst: every detection arrives, in order, complete, within a generous bound,
    no reply lands outside the device's reply subtree, and the log stays short and escaped."""
    caplog.set_level(logging.INFO)
    reg = _registry()
    reg.register("status", lambda r: {"outbox": ledger.outbox_depth()})

    def boom(req: Request) -> dict:
        raise RuntimeError("handler bug")

    reg.register("boom", boom)
    reg.register("slow", lambda r: (time.sleep(0.2), {"ok": True})[1])
    # what the device publishes, watched without receiving the flood itself
    streams = Subscriber(mosquitto, PREFIX + "+").start()  # detections, alerts, status, ...
    replies = Subscriber(mosquitto, PREFIX + "cmd/+/reply/#").start()  # cmd/<name>/reply and below
    foreign = [Subscriber(mosquitto, t).start() for t in ("camtrap/trap-02/#", "homeassistant/#")]
    pub = Publisher(config(mosquitto), ledger, DEVICE, commands=reg)
    pub.start()
    stop, sent = threading.Event(), []
    flood = threading.Thread(target=_flood, args=(mosquitto, stop, sent), daemon=True)
    try:
        assert pub.wait_commands_ready(10)
        flood.start()
        time.sleep(1.0)  # the flood is under way before the burst starts
        seqs: list[int] = []
        for _ in range(30):  # a burst: 10 frames every 50 ms
            seqs += fill(ledger, 10)
            time.sleep(0.05)
        written = time.monotonic()
        assert streams.wait_for(have(streams, "/detections", seqs), timeout=60), \
            f"{len(streams.on('/detections'))} of {len(seqs)} detections 60 s after the burst"
        took = time.monotonic() - written
        stop.set()
        flood.join(10)
        assert pub._worker is not None
        stats = dict(pub._worker.stats)
        record_property("detections_after_burst_s", round(took, 2))
        print(f"flood: {sent[0] if sent else '?'} hostile commands sent; the last of {len(seqs)} detections "
              f"arrived {took:.2f} s after the burst ended; worker stats {stats}")
        check_stream(streams.on("/detections"), seqs, outages=0)
        assert pub.connected and pub._worker.alive
        assert pub.wait_drained(10)
        time.sleep(0.5)
        assert [m.topic for f in foreign for m in f.snapshot()] == []  # nothing on others' topics
        assert {m.topic for m in streams.snapshot()} == {T.status, T.detections}
        assert all(m.body_seq is not None for m in streams.on("/detections"))  # outbox rows only, no reply
        reply_topics = {m.topic for m in replies.snapshot()}
        assert reply_topics and reply_topics <= {T.reply(n) for n in ("ping", "status", "nosuch", "boom", "slow")}
        assert stats["refused_response_topic"] > 0 and stats["refused_name"] > 0
        lines = [r.getMessage() for r in caplog.records if r.name == "edge.mqtt_commands"]
        assert all("\n" not in x for x in lines)
        assert len(lines) < 200, f"{len(lines)} log lines for the flood"
    finally:
        stop.set()
        pub.stop(timeout=2)
        for s in [streams, replies, *foreign]:
            s.stop()
