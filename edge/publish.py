"""The MQTT session: availability (retained status + last will), the outbox drained in order and
removed only on PUBACK, and commands in.

Three threads. The network thread (``_network``, ours, driving paho's ``loop``) owns the socket:
it connects, and after a failure waits a jittered, capped backoff (``edge.mqtt_link.Backoff``)
and says why the attempt failed in one line, once per outage and again when the reason changes
(``describe_failure``); paho's callbacks run on it and only record events. The publisher thread
owns the outbox window: it reads rows from the ledger, hands them to paho, and deletes a row
(``ledger.ack``) when the PUBACK for its packet id arrives (QoS 0 rows: when written to the
socket). It is woken by the ledger when rows are added, by paho events, and every ``poll_s`` as
a safety net. The command thread (``edge.mqtt_commands.CommandWorker``) runs commands, so no
command, whatever its payload or properties, can stall the outbox. Every topic comes from one
``edge.messages.Topics``.

Delivery guarantee: at least once, in order. A message stays in the ledger until the broker
acknowledged it, across reconnects (paho resends the unacknowledged packets, with DUP, right
after the CONNACK) and across restarts (a new Publisher starts again at the lowest seq). With
``max_inflight=1`` (the default) at most one message is unacknowledged at any time, so the
broker sees a non-decreasing seq stream with at most one duplicate per outage or restart; a
larger window is faster on a high-latency link but may resend up to ``max_inflight`` messages
per outage and, after a resend, the raw stream steps back. Each message carries its ledger seq
(MQTT 5 user property ``seq``; never reused), so a consumer can drop duplicates exactly.
"""

from __future__ import annotations

import logging
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from . import __version__
from .ledger import Ledger, OutMsg
from .messages import status_payload
from .mqtt_commands import MAX_PACKET, RECEIVE_MAX, CommandRegistry, CommandWorker
from .mqtt_config import MqttConfig
from .mqtt_link import Backoff, TakeoverWatch, describe_failure

log = logging.getLogger(__name__)

# PUBACK reason codes that will not get better by resending: drop the row (counted) instead
# of blocking the queue behind it forever. Anything else (quota, server busy) is retried.
_PERMANENT = {0x87: "not authorized", 0x90: "topic name invalid", 0x95: "packet too large",
              0x99: "payload format invalid"}
_CLOSE_GRACE_S = 2.0  # after stop(): how long the network thread may take to write the DISCONNECT


class Publisher:
    """Publishes the ledger's outbox to the broker; see the module docstring.

    ``model`` (the bundle version) and ``status_extra`` go into the retained status; ``boot_id``
    identifies this run of the daemon (random by default) so subscribers can tell a restart from
    a reconnect. ``commands`` (a ``CommandRegistry``) answers ``<prefix>cmd/<name>`` on the
    command thread; see ``edge.mqtt_commands`` for where replies may go. ``rng`` seeds the
    reconnect jitter (tests).
    """

    def __init__(self, config: MqttConfig, ledger: Ledger, device_id: str, *,
                 model: str | None = None, commands: CommandRegistry | None = None,
                 status_extra: Mapping[str, Any] | None = None, boot_id: str | None = None,
                 poll_s: float = 1.0, rng: random.Random | None = None) -> None:
        self.cfg = config
        self.ledger = ledger
        self.device_id = device_id
        self.topics = config.topics(device_id)
        self.prefix = self.topics.prefix
        self.status_topic = self.topics.status
        self.commands = commands
        self.boot_id = boot_id or uuid.uuid4().hex[:12]
        self.poll_s = poll_s
        self.model = model
        self._status_extra: dict[str, Any] = dict(status_extra or {})
        self._state = "online"  # or "degraded" (see set_state); what a (re)connect announces
        self._v5 = config.protocol == "5"
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._commands_ready = threading.Event()
        self._no_new = False
        self._inflight: dict[int, OutMsg] = {}  # paho mid -> row; publisher thread only
        self._after = 0  # highest seq handed to paho; publisher thread only
        self._retry_at = 0.0
        self._store_error: str | None = None
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._net_thread: threading.Thread | None = None
        self._closing = threading.Event()  # the network thread ends once the DISCONNECT is out
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s, config.reconnect_jitter, rng)
        # a second client with our client id waits at most reconnect_max_s before it takes the
        # session back: a link dropped sooner (twice that, for margin) did not hold
        self._takeover = TakeoverWatch(config.client_id_for(device_id), short_s=2 * config.reconnect_max_s)
        # one connection attempt, seen from the network thread
        self._attempt_connack: ReasonCode | None = None
        self._attempt_sock_error: str | None = None
        self._up_since: float | None = None  # CONNACK accepted (monotonic)
        self._outage_kind: str | None = None  # the reason already logged for this outage
        self._outage_since = 0.0
        self._worker: CommandWorker | None = None
        self.last_error: str | None = None
        self.stats: Counter[str] = Counter()

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (retrying with backoff until the broker answers) and start
        draining. Raises ValueError/FileNotFoundError for a missing password or TLS file."""
        if self._thread is not None or self._stopping.is_set():
            raise RuntimeError("a Publisher starts once; make a new one after stop()")
        self._client = self._make_client()
        self.ledger.add_outbox_listener(self.notify)
        if self.commands is not None:
            self._worker = CommandWorker(self.commands, self.topics, self._publish_reply)
            self._worker.start()
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()
        kwargs: dict[str, Any] = {}
        if self._v5:
            # a flood of commands waits at the broker, not in front of our PUBACKs (edge.mqtt_commands)
            props = Properties(PacketTypes.CONNECT)
            props.ReceiveMaximum = RECEIVE_MAX
            props.MaximumPacketSize = MAX_PACKET
            kwargs = {"clean_start": True, "properties": props}
        self._client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, **kwargs)
        log.info("MQTT publisher for %s -> %s:%d (MQTT %s%s), prefix %s", self.device_id, self.cfg.host,
                 self.cfg.port, self.cfg.protocol, ", TLS" if self.cfg.tls else "", self.prefix)
        self._net_thread = threading.Thread(target=self._network, name="mqtt-network", daemon=True)
        self._net_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let in-flight messages be acknowledged (up to about half of ``timeout``), publish the
        retained status "stopped", then disconnect cleanly (so the broker does not send the
        last will). Rows not yet published stay in the ledger for the next start."""
        if self._thread is None or self._client is None:
            return
        deadline = time.monotonic() + timeout
        self._no_new = True
        self.notify()
        while self._inflight and self._connected.is_set() and time.monotonic() < deadline - timeout / 2:
            time.sleep(0.01)
        self._stopping.set()
        self.notify()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        client = self._client
        if self._connected.is_set():
            info = client.publish(self.status_topic, self._status_payload("stopped"), qos=self.cfg.qos.status,
                                  retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                log.warning("could not publish the stopped status: %s", e)
        self._closing.set()
        client.disconnect()
        if self._net_thread is not None:
            self._net_thread.join(max(0.1, deadline - time.monotonic()) + _CLOSE_GRACE_S)
        if self._worker is not None:
            self._worker.stop()
        self.ledger.remove_outbox_listener(self.notify)
        self._connected.clear()
        self._thread = None
        log.info("MQTT publisher stopped; %d message(s) left in the outbox", self.ledger.outbox_depth())

    def notify(self) -> None:
        """New outbox rows exist (called by the ledger after a commit)."""
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_commands_ready(self, timeout: float) -> bool:
        """True once the broker confirmed the command subscription (SUBACK)."""
        return self._commands_ready.wait(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """True once the outbox is empty and nothing is in flight (tests, demo, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._inflight and self.ledger.outbox_depth() == 0:
                return True
            time.sleep(0.02)
        return False

    def update_status(self, model: str | None = None, **extra: Any) -> None:
        """Change the retained status (e.g. the model version after an update) and republish."""
        if model is not None:
            self.model = model
        self._status_extra.update(extra)
        if self._client is not None and self._connected.is_set():
            self._client.publish(self.status_topic, self._status_payload(self._state), qos=self.cfg.qos.status,
                                 retain=True)

    def set_state(self, state: str, reason: str | None = None) -> bool:
        """Announce ``online`` or ``degraded`` (with the reason) in the retained status, sent
        at once and directly, not through the outbox: a full state disk, the usual reason,
        is exactly what keeps the outbox from taking it. Reconnects repeat it. True when sent now."""
        self._state = state
        self._status_extra.pop("reason", None)
        if reason:
            self._status_extra["reason"] = reason[:200]
        if self._client is None or not self._connected.is_set():
            return False
        info = self._client.publish(self.status_topic, self._status_payload(state), qos=self.cfg.qos.status,
                                    retain=True)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- paho client ------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        password = cfg.resolve_password()  # raises with the setting's name, never the value
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=cfg.client_id_for(self.device_id),
                             protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
                             clean_session=None if self._v5 else True)
        client.on_log = self._on_log
        client.suppress_exceptions = True  # a bug in a callback is logged; it must not end the network loop
        # room beyond our window: the status, and at most MAX_REPLIES_INFLIGHT command replies
        client.max_inflight_messages_set(cfg.max_inflight + 16)
        client.max_queued_messages_set(0)
        client.connect_timeout = cfg.connect_timeout_s
        # our own thread drives the loop; without this hook paho would write to the socket from
        # whichever thread calls publish(), racing the network thread
        client.on_socket_register_write = _no_op
        if cfg.tls is not None:
            import ssl

            client.tls_set(ca_certs=_str(cfg.tls.ca_file), certfile=_str(cfg.tls.cert_file),
                           keyfile=_str(cfg.tls.key_file), cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if cfg.tls.insecure:
                client.tls_insecure_set(True)
        if cfg.username:
            client.username_pw_set(cfg.username, password)
        # the will's "t" is when this session began; the broker publishes it when the socket dies
        client.will_set(self.status_topic, self._status_payload("offline"),
                        qos=cfg.qos.status, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _status_payload(self, state: str) -> bytes:
        return status_payload(state, time=int(time.time()), model=self.model, boot_id=self.boot_id,
                              version=__version__, extra=self._status_extra)

    # -- network thread ---------------------------------------------------------------------
    def _network(self) -> None:
        """Connect, serve the link until it ends, wait a jittered backoff, again; until stop()."""
        client = self._client
        assert client is not None
        while not self._closing.is_set():
            self._attempt_connack = None
            self._attempt_sock_error = None
            try:
                client.reconnect()
            except Exception as e:  # DNS, refused, TLS (ssl.SSLError is an OSError), a bad CA file
                self._failed(e)
            else:
                self._serve(client)
            if self._closing.is_set():
                return
            self._closing.wait(self._backoff.next())

    def _serve(self, client: mqtt.Client) -> None:
        began = time.monotonic()
        closing_at: float | None = None
        while True:
            try:
                rc = client.loop(timeout=1.0)
            except Exception as e:  # paho should not raise here; if it does, treat the link as lost
                self._attempt_sock_error = self._attempt_sock_error or f"{type(e).__name__}: {e}"
                rc = MQTTErrorCode.MQTT_ERR_UNKNOWN
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if self._closing.is_set():
                closing_at = closing_at or time.monotonic()
                if time.monotonic() - closing_at > _CLOSE_GRACE_S:
                    break
        if self._up_since is not None:
            if time.monotonic() - self._up_since >= self.cfg.reconnect_max_s:
                self._backoff.reset()  # the link held: the next outage starts from reconnect_min_s
            self._up_since = None
        elif not self._closing.is_set():
            waited = time.monotonic() - began
            self._failed(None, no_answer_s=float(self.cfg.keepalive) if waited >= self.cfg.keepalive
                         and self._attempt_connack is None and self._attempt_sock_error is None else None)

    def _failed(self, error: BaseException | None, no_answer_s: float | None = None) -> None:
        """One failed attempt: say why, once per outage and again when the reason changes."""
        connack = self._attempt_connack
        tls = self.cfg.tls
        f = describe_failure(error if error is not None else self._attempt_sock_error, port=self.cfg.port,
                             tls=tls is not None, client_cert=tls is not None and tls.cert_file is not None,
                             connack=connack.value if connack is not None else None,
                             connack_text=str(connack) if connack is not None else "",
                             timeout_s=self.cfg.connect_timeout_s, no_answer_s=no_answer_s)
        self.stats["connect_failures"] += 1
        self.last_error = f"cannot connect to MQTT broker {self.cfg.host}:{self.cfg.port}: {f.reason}"
        if f.kind == self._outage_kind:
            return
        if self._outage_kind is None:
            self._outage_since = time.monotonic()
        self._outage_kind = f.kind
        level = logging.ERROR if f.kind == "auth" or f.kind.startswith(("tls", "connack")) else logging.WARNING
        log.log(level, "%s; retrying every %g s at most (outbox: %d message(s))", self.last_error,
                self.cfg.reconnect_max_s, self._depth())

    # callbacks: the network thread; they only record events and publish the status
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            self._attempt_connack = reason  # reported by _failed once the broker closes the link
            self.stats["refused"] += 1
            return
        quiet = logging.DEBUG if self._takeover.suspected else logging.INFO  # said by the takeover line
        if self._outage_kind is not None:
            log.log(quiet, "MQTT broker %s:%d reachable again after %.0f s", self.cfg.host, self.cfg.port,
                    time.monotonic() - self._outage_since)
        self._outage_kind = None
        self._up_since = time.monotonic()
        self._takeover.connected()
        self.last_error = None
        self.stats["connects"] += 1
        log.log(quiet, "connected to MQTT broker %s:%d as %s", self.cfg.host, self.cfg.port,
                self.cfg.client_id_for(self.device_id))
        # availability first; paho resends unacknowledged outbox packets right after this returns
        client.publish(self.status_topic, self._status_payload(self._state), qos=self.cfg.qos.status, retain=True)
        if self.commands is not None:
            client.subscribe(self.topics.command_filter, qos=1)
        self._connected.set()
        self._events.put(("connected",))
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._commands_ready.clear()
        if was and not self._stopping.is_set():
            self.stats["disconnects"] += 1
            self._outage_kind = "lost"
            self._outage_since = time.monotonic()
            takeover = self._takeover.lost(getattr(reason, "value", None))
            if takeover:
                log.error("%s", takeover)
            log.log(logging.DEBUG if self._takeover.suspected else logging.WARNING,
                    "lost the MQTT broker (%s); %d message(s) wait in the outbox", reason, self._depth())
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._events.put(("ack", mid, reason))
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._commands_ready.set()
        else:
            log.error("the broker refused the command subscription %s: %s", self.topics.command_filter, reasons)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._worker is None:
            return
        try:
            self._worker.submit(msg.topic, bytes(msg.payload), getattr(msg, "properties", None),
                                retained=bool(msg.retain))
        except Exception:  # msg.topic may not decode; nothing from the wire may end the network loop
            self.stats["bad_messages"] += 1

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        # paho reports a socket error only here; a TLS 1.3 alert (client certificate required or
        # refused) arrives on the first read after the handshake, so this is how _failed learns it
        for head in ("failed to receive on socket: ", "timeout on socket: "):
            if buf.startswith(head):
                self._attempt_sock_error = buf[len(head):]
        _paho_log(client, userdata, level, buf)

    def _publish_reply(self, topic: str, body: bytes, correlation: bytes | None) -> mqtt.MQTTMessageInfo:
        """Send a command reply (the command thread); the topic is already checked."""
        assert self._client is not None
        props = None
        if self._v5 and correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        return self._client.publish(topic, body, qos=1, properties=props)

    def _depth(self) -> int:
        """Outbox depth for a log line from paho's thread, which must never raise (an exception
        in a callback would end paho's network loop)."""
        try:
            return self.ledger.outbox_depth()
        except Exception:
            return -1

    # -- publisher thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                self._drain_events()
                if self._stopping.is_set():
                    return
                if self._connected.is_set() and not self._no_new:
                    self._fill()
            except (sqlite3.Error, OSError) as e:  # a full or failing state disk: one line, keep going
                if str(e) != self._store_error:
                    log.error("MQTT publisher: the ledger cannot be written (%s); retrying every second", e)
                    self._store_error = str(e)
                time.sleep(1.0)
            except Exception:
                log.exception("MQTT publisher error; retrying in 1 s")
                time.sleep(1.0)
            else:
                self._store_error = None

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "ack":
                self._acked(event[1], event[2])

    def _acked(self, mid: int, reason: ReasonCode) -> None:
        row = self._inflight.pop(mid, None)
        if row is None or row.seq is None:
            return  # the status message or a command reply
        if not reason.is_failure:
            try:
                self.ledger.ack(row.seq)
            except (sqlite3.Error, OSError):  # the disk is full: try this ack again later
                self._inflight[mid] = row
                self._events.put(("ack", mid, reason))
                raise
            self.stats["acked"] += 1
            return
        if reason.value in _PERMANENT:
            self.ledger.ack(row.seq)
            self.ledger.bump(f"rejected_{row.kind}")
            self.stats["rejected"] += 1
            log.error("broker rejected %s message seq %d on %s%s: %s; dropped", row.kind, row.seq, self.prefix,
                      row.topic, reason)
            return
        log.warning("broker refused %s message seq %d for now (%s); retrying", row.kind, row.seq, reason)
        self._after = min(self._after, row.seq - 1)
        self._retry_at = time.monotonic() + self.cfg.reconnect_min_s

    def _fill(self) -> None:
        room = self.cfg.max_inflight - len(self._inflight)
        if room <= 0 or time.monotonic() < self._retry_at:
            return
        busy = {r.seq for r in self._inflight.values()}
        assert self._client is not None
        for row in self.ledger.pending(limit=room + len(busy), after=self._after):
            if room <= 0:
                break
            if row.seq in busy:
                continue
            assert row.seq is not None
            qos = row.qos if row.qos is not None else getattr(self.cfg.qos, row.kind)
            props = None
            if self._v5:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = ("seq", str(row.seq))
            try:
                info = self._client.publish(self.topics.full(row.topic), row.payload, qos=qos, retain=row.retain,
                                            properties=props)
            except ValueError as e:  # bad topic or payload: it will never go out
                self.ledger.ack(row.seq)
                self.ledger.bump(f"rejected_{row.kind}")
                log.error("outbox row seq %d (%s) cannot be published: %s; dropped", row.seq, row.kind, e)
                continue
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("paho did not take outbox row seq %d: %s", row.seq, mqtt.error_string(info.rc))
                return
            # NO_CONN: paho keeps the packet and sends it after the next CONNACK, so it is in flight
            self._inflight[info.mid] = row
            self._after = max(self._after, row.seq)
            self.stats["published"] += 1
            room -= 1


_PAHO_LOG = logging.getLogger(__name__ + ".paho")
# paho reports every failed attempt's socket error at ERROR; the publisher already says why the
# link failed, once per outage (_failed), so these become DEBUG instead of flooding the journal
_PAHO_NOISE = ("Client is not connected", "failed to receive on socket", "timeout on socket", "Connection failed")


def _paho_log(client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
    if level == mqtt.MQTT_LOG_ERR and not buf.startswith(_PAHO_NOISE):
        _PAHO_LOG.error("%s", buf)
    elif level == mqtt.MQTT_LOG_WARNING and not buf.startswith(_PAHO_NOISE):
        _PAHO_LOG.warning("%s", buf)
    else:
        _PAHO_LOG.debug("%s", buf)


def _str(p: object) -> str | None:
    return None if p is None else str(p)


def _no_op(*_: Any) -> None:
    return None
