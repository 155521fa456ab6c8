"""The MQTT link when it fails (issue 7 items 5 and 12): the reconnect backoff is capped near
30 s with jitter, and every failure to connect says why in one line, once per outage and again
when the reason changes; against a real Mosquitto with TLS (a CA and certificates made here with
`cryptography`) and with password authentication."""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker import Mosquitto, make_pki
from test_publish import config

from edge.ledger import Ledger
from edge.mqtt_config import MqttConfig
from edge.mqtt_link import TAKEOVER_STREAK, Backoff, TakeoverWatch, describe_failure
from edge.publish import Publisher

DEVICE = "cam1"


# -- backoff ---------------------------------------------------------------------------------------
def test_default_backoff_is_capped_near_30_s_with_jitter() -> None:
    c = MqttConfig()
    assert c.reconnect_max_s <= 30 and c.reconnect_min_s <= 1 and 0 < c.reconnect_jitter <= 1
    b = Backoff(c.reconnect_min_s, c.reconnect_max_s, c.reconnect_jitter, random.Random(1))
    ceilings = []
    for _ in range(12):
        ceilings.append(b.ceiling())
        d = b.next()
        assert ceilings[-1] * (1 - c.reconnect_jitter) <= d <= ceilings[-1] <= 30
    assert ceilings[:7] == [1, 2, 4, 8, 16, 30, 30] and set(ceilings[5:]) == {30}
    b.reset()
    assert b.ceiling() == 1 and b.next() <= 1


def test_jitter_spreads_a_fleet_that_lost_its_broker_together() -> None:
    """100 boxes, each with its own generator, all at the cap: their next attempts spread over
    the jitter window instead of arriving in step; without jitter they would all coincide."""
    fleet = [Backoff(1, 30, 0.5, random.Random(seed)) for seed in range(100)]
    for b in fleet:
        b.failures = 10
    delays = sorted(b.next() for b in fleet)
    assert 15 <= delays[0] and delays[-1] <= 30
    assert delays[-1] - delays[0] > 10  # spread over most of the 15 s window
    assert len({round(d, 1) for d in delays}) > 50  # hardly two boxes in the same 100 ms
    steady = [Backoff(1, 30, 0.0, random.Random(seed)) for seed in range(10)]
    for b in steady:
        b.failures = 10
    assert {b.next() for b in steady} == {30}
    with pytest.raises(ValueError):
        Backoff(5, 1, 0.5)
    with pytest.raises(ValueError):
        Backoff(1, 30, 1.5)


# -- describing a failure (pure) ----------------------------------------------------------------------
def _kind(error: object, **kw: object) -> str:
    args: dict = {"port": 8883, "tls": True, "client_cert": False, **kw}
    return describe_failure(error, **args).kind  # type: ignore[arg-type]


def test_each_cause_has_its_own_reason() -> None:
    assert _kind(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) == "dns"
    assert _kind(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == "refused"
    assert _kind(TimeoutError("timed out"), timeout_s=10) == "timeout"
    assert _kind(OSError(errno.ENETUNREACH, "Network is unreachable")) == "unreachable"
    verify = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
    assert _kind(verify + "unable to get local issuer certificate (_ssl.c:1000)") == "tls-ca"
    assert _kind(verify + "certificate signature failure (_ssl.c:1000)") == "tls-ca"
    assert _kind(verify + "Hostname mismatch, certificate is not valid for 'x'.") == "tls-host"
    assert _kind(verify + "IP address mismatch, certificate is not valid for '127.0.0.1'.") == "tls-host"
    assert _kind(verify + "certificate has expired (_ssl.c:1000)") == "tls-expired"
    assert _kind("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required") == "tls-cert-required"
    assert _kind("[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate", client_cert=True) == \
        "tls-cert-refused"
    assert _kind("[SSL: WRONG_VERSION_NUMBER] wrong version number") == "tls-plain-port"
    assert _kind(None, connack=134) == _kind(None, connack=135) == "auth"
    assert _kind(None, connack=132, connack_text="Unsupported protocol version") == "connack-132"
    assert "3.1.1" in describe_failure(None, port=1883, tls=False, client_cert=False, connack=132).reason
    assert _kind(None, no_answer_s=60) == "no-connack"
    closed = describe_failure(None, port=8883, tls=False, client_cert=False)
    assert closed.kind == "closed" and "TLS port" in closed.reason
    reset = describe_failure(ConnectionResetError(104, "Connection reset by peer"), port=1883, tls=True,
                             client_cert=False)
    assert reset.kind == "reset" and "plain MQTT port" in reset.reason


# -- against a real broker ------------------------------------------------------------------------
@pytest.fixture
def pub_factory(ledger: Ledger) -> Iterator[Callable[[MqttConfig], Publisher]]:
    made: list[Publisher] = []

    def make(cfg: MqttConfig) -> Publisher:
        p = Publisher(cfg, ledger, DEVICE)
        made.append(p)
        p.start()
        return p

    yield make
    for p in made:
        p.stop(timeout=1)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "edge.publish" and r.levelno >= logging.WARNING and "cannot connect" in r.getMessage()]


def _failures(pub: Publisher, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while pub.stats["connect_failures"] < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pub.stats["connect_failures"] >= n, f"only {pub.stats['connect_failures']} attempts: {pub.last_error}"


SCENARIOS = {
    # name: (broker kwargs, config kwargs (PKI files filled in), expected words in the one line)
    "client certificate required": ({"require_cert": True}, {"tls": {"ca_file": "ca"}},
                                    "requires a client certificate"),
    "bad CA": ({}, {"tls": {"ca_file": "other-ca"}}, "not signed by a trusted CA"),
    "wrong host name": ({"pki": "wrong-host"}, {"tls": {"ca_file": "wrong-host-ca"}},
                        "not valid for this host name"),
    "not authorised": ({"passwords": {"cam1": "right"}}, {"username": "cam1", "password": "wrong"},
                       "not authorised"),
    "TLS port spoken to in plain MQTT": ({}, {}, "TLS port"),
    "plain port spoken to in TLS": ({"pki": None}, {"tls": {"ca_file": "ca"}}, "plain MQTT port"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_failing_connection_says_why_once(scenario: str, mosquitto_factory: Callable[..., Mosquitto],
                                            pub_factory: Callable[[MqttConfig], Publisher], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Issue 7 item 12: before, a broker requiring a client certificate got no line at INFO or
    above for 75 s. Each cause now gets one line at WARNING or ERROR on the first attempt, and
    no more while the cause stays the same (several retries here)."""
    broker_kw, cfg_kw, words = SCENARIOS[scenario]
    pki = make_pki(tmp_path / "pki")
    files = {"ca": pki.ca, "other-ca": make_pki(tmp_path / "other").ca}
    broker_kw = dict(broker_kw)
    if broker_kw.get("pki") == "wrong-host":
        wrong = make_pki(tmp_path / "wrong", host="127.0.0.2")  # a certificate for another address
        broker_kw["pki"] = wrong
        files["wrong-host-ca"] = wrong.ca
    elif "pki" not in broker_kw and ("tls" in cfg_kw or scenario.startswith("TLS port")):
        broker_kw["pki"] = pki
    cfg_kw = dict(cfg_kw)
    if "tls" in cfg_kw:
        cfg_kw["tls"] = {k: files[v] for k, v in cfg_kw["tls"].items()}
    broker = mosquitto_factory(**broker_kw)
    caplog.set_level(logging.INFO)
    pub = pub_factory(config(broker, **cfg_kw))
    _failures(pub, 4)
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    assert words in lines[0] and f"{broker.host}:{broker.port}" in lines[0], lines[0]
    assert pub.last_error is not None and words in pub.last_error and not pub.connected


def test_reason_logged_again_when_it_changes_and_once_per_outage(tmp_path: Path, ledger: Ledger,
                                                                 pub_factory: Callable[[MqttConfig], Publisher],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pki = make_pki(tmp_path / "pki")
    tls_broker = Mosquitto(tmp_path, pki=pki, require_cert=True)  # port reserved, not started
    plain = None
    try:
        pub = pub_factory(config(tls_broker, tls={"ca_file": pki.ca}))
        _failures(pub, 3)
        assert [("refused" in x) for x in _lines(caplog)] == [True]
        tls_broker.start()  # same port, now a broker that wants a client certificate
        _failures(pub, pub.stats["connect_failures"] + 3)
        lines = _lines(caplog)
        assert len(lines) == 2 and "requires a client certificate" in lines[1], lines
        tls_broker.kill()
        _failures(pub, pub.stats["connect_failures"] + 3)
        assert len(_lines(caplog)) == 3 and "refused" in _lines(caplog)[2]
    finally:
        tls_broker.close()
    # a new outage after a good connection is reported again
    plain = Mosquitto(tmp_path)
    try:
        caplog.clear()
        pub2 = pub_factory(config(plain))
        _failures(pub2, 2)
        plain.start()
        assert pub2.wait_connected(10)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        plain.kill()
        _failures(pub2, pub2.stats["connect_failures"] + 3)
        lines = _lines(caplog)
        assert len(lines) == 2 and all("refused" in x for x in lines), lines
        assert any("lost the MQTT broker" in r.getMessage() for r in caplog.records)
    finally:
        plain.close()


def test_back_within_the_cap_after_a_long_outage(mosquitto: Mosquitto,
                                                 pub_factory: Callable[[MqttConfig], Publisher]) -> None:
    """Issue 7 item 5: the box reconnected 88 s after the broker was back (backoff up to 120 s).
    After an outage long enough to reach the cap, it is back within about reconnect_max_s."""
    cap = 1.0
    pub = pub_factory(config(mosquitto, reconnect_min_s=0.1, reconnect_max_s=cap))
    assert pub.wait_connected(10)
    mosquitto.kill()
    _failures(pub, 6)  # 0.1, 0.2, 0.4, 0.8, then the cap
    assert pub._backoff.ceiling() == cap
    mosquitto.start()
    back = time.monotonic()
    assert pub.wait_connected(cap + 5)
    took = time.monotonic() - back
    assert took <= cap + 2, f"reconnected {took:.1f} s after the broker returned (cap {cap} s)"


# -- two clients, one client id ----------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_session_taken_over_again_and_again_is_named_once_in_a_while() -> None:
    """The pattern, not one drop: connections the broker drops (without a reason, or 142) before
    the link held, several in a row; then one line, again only after say_every_s with the count."""
    clock = _Clock()
    w = TakeoverWatch("camtrap-trap-07", short_s=60.0, say_every_s=600.0, clock=clock)
    said = []
    for _ in range(TAKEOVER_STREAK + 4):
        w.connected()
        clock.t += 20.0  # the other box reconnects within its backoff and takes the session
        said.append(w.lost(128))
    assert [x is not None for x in said] == [False] * (TAKEOVER_STREAK - 1) + [True] + [False] * 4
    line = said[TAKEOVER_STREAK - 1]
    assert "same client id 'camtrap-trap-07'" in line and "device.id" in line and "within 20 s" in line
    assert w.suspected
    clock.t += 600.0
    w.connected()
    clock.t += 5.0
    again = w.lost(None)
    assert again is not None and "5 time(s)" in again  # the drops held back since the last line


@pytest.mark.parametrize("lived, reason", [(120.0, 128), (5.0, 149), (5.0, 135)])
def test_a_link_that_held_or_a_drop_with_another_reason_is_not_a_takeover(lived: float, reason: int) -> None:
    """A broker restart after a good while, 'packet too large', 'not authorised': each ends the
    streak, so a mix of ordinary outages never adds up to the claim."""
    clock = _Clock()
    w = TakeoverWatch("c", short_s=60.0, clock=clock)
    for k in range(3 * TAKEOVER_STREAK):
        w.connected()
        quick = k % TAKEOVER_STREAK != TAKEOVER_STREAK - 1
        clock.t += 5.0 if quick else lived
        assert w.lost(128 if quick else reason) is None, k
    assert not w.suspected


def test_the_broker_saying_session_taken_over_is_named_at_once() -> None:
    clock = _Clock()
    w = TakeoverWatch("c", short_s=60.0, clock=clock)
    w.connected()
    clock.t += 1.0
    line = w.lost(142)
    assert line is not None and "session was taken over" in line


def test_two_boxes_with_one_device_id_are_told_apart_on_a_real_broker(mosquitto: Mosquitto, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Two publishers with the same device id (two boxes given the same device.id): Mosquitto
    drops each as the other connects, again and again. Each says the likely cause in one ERROR
    line, and the per-connection lines go quiet once it has (they were a WARNING a cycle
    saying 'Unspecified error')."""
    caplog.set_level(logging.DEBUG, logger="edge.publish")
    pubs = []
    try:
        for k in range(2):
            led = Ledger(tmp_path / f"l{k}.db")
            p = Publisher(config(mosquitto), led, DEVICE)
            p.start()
            pubs.append((p, led))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(p.stats["disconnects"] for p, _ in pubs) < 6 * TAKEOVER_STREAK:
            time.sleep(0.1)
    finally:
        for p, led in pubs:
            p.stop(timeout=1)
            led.close()
    records = [r for r in caplog.records if r.name == "edge.publish"]
    takeover = [r for r in records if "same client id" in r.getMessage()]
    assert 1 <= len(takeover) <= 2 and all(r.levelno == logging.ERROR for r in takeover), takeover
    assert f"'camtrap-{DEVICE}'" in takeover[0].getMessage()
    loud_lost = [r for r in records if "lost the MQTT broker" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(loud_lost) <= 2 * TAKEOVER_STREAK, len(loud_lost)  # then quiet: the ERROR line said it
    assert sum(p.stats["disconnects"] for p, _ in pubs) >= 6 * TAKEOVER_STREAK
