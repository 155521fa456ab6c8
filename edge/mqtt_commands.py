"""The MQTT command surface: a registry of named handlers, and the worker thread that runs them.

A command is a message on ``<prefix>cmd/<name>``. The daemon registers ``ping`` and ``status``;
later features (remote updates: ``update``, ``rollback``, ``models``) register their own
handlers on the same ``CommandRegistry`` without touching the publisher. A handler takes a
``Request`` and returns the reply: a mapping (sent as compact JSON), text, bytes, or None for
no reply. Signatures, expiry and nonces are the handler's business: it gets the raw payload.

Invariants (tests/edge/test_mqtt_commands.py tests each):

- No command can stall or delay the outbox. paho's network thread only drops the message into
  a bounded queue (full: dropped and counted); one worker thread runs the handlers, never the
  publisher thread. With MQTT 5 the publisher tells the broker not to send packets above
  ``MAX_PACKET`` nor more than ``RECEIVE_MAX`` unacknowledged commands, so a flood waits (or is
  dropped) at the broker instead of queueing in front of our PUBACKs. Handlers run at most
  ``RATE`` per second (``BURST`` at once); the rest are dropped and counted, so a flood costs
  neither the CPU nor the ledger. Every exception, from a
  handler or from paho (a bad topic, a payload too large), is caught and answered or counted.
- A reply goes to the request's MQTT 5 response topic only when that topic lies in the
  command's own reply subtree, ``<prefix>cmd/<name>/reply[/...]`` (``Topics.is_reply_topic``);
  any other response topic (another device, the detection streams, a wildcard, Home Assistant's
  discovery topics) is refused with a log line and the reply goes to ``<prefix>cmd/<name>/reply``.
  The correlation data comes back in either case.
- At most ``MAX_REPLIES_INFLIGHT`` replies wait for their PUBACK at any time; the worker waits up
  to ``REPLY_WAIT_S`` for a slot, then drops the reply (counted), so replies never take the
  outbox's place in paho's window.
- Every line about a command is escaped (``printable``) and rate limited (``ThrottledLog``): a
  name or payload cannot forge a log line, and 10,000 commands do not write 10,000 lines.
- A retained message is never a command (commands are signed, expire and are single use; a
  retained one would come back at every reconnect and run again): it is refused, said once
  per message (topic and payload) however often the broker hands it back, and counted. The box
  does not clear it at the broker (an empty retained publish on the command topic): that needs
  publish rights on command topics, which a box's ACL should not grant, and the empty message
  would reach every subscriber as a command of its own; the line says how to clear it.
- A handler should return within a second or so (it holds up the next command, never the
  outbox); long work (an update) starts its own thread and reports on its own topic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .messages import Topics, command_name_problem
from .throttle import ThrottledLog, TokenBucket, printable

log = logging.getLogger(__name__)

QUEUE_MAX = 64  # commands waiting for the worker
MAX_PACKET = 128 * 1024  # largest packet the broker may send us (MQTT 5 CONNECT; bigger ones it drops)
RECEIVE_MAX = 16  # QoS 1 commands the broker may have in flight to us (MQTT 5 CONNECT)
RATE, BURST = 10.0, 20  # handler runs per second, and at once
MAX_REPLIES_INFLIGHT = 8
REPLY_WAIT_S = 1.0  # how long the worker waits for a reply slot before dropping the reply
SLOW_S = 2.0  # a handler slower than this is logged
RETAINED_REMEMBERED = 256  # retained messages already refused (said once each)


@dataclass(frozen=True)
class Request:
    """One command as received. ``response_topic`` and ``correlation`` are the MQTT 5
    properties as sent (None in MQTT 3.1.1); where the reply goes is decided by ``reply_route``."""

    name: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    received_at: float = 0.0  # unix time


Reply = Mapping[str, Any] | str | bytes | None
Handler = Callable[[Request], Reply]


class CommandRegistry:
    """Command name -> handler. Registering is thread-safe and may happen while the publisher
    runs (a feature that starts later registers then)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()

    def register(self, name: str, handler: Handler, *, replace: bool = False) -> None:
        why = command_name_problem(name)
        if why:
            raise ValueError(f"command {name!r} {why}")
        with self._lock:
            if name in self._handlers and not replace:
                raise ValueError(f"command {name!r} is already registered")
            self._handlers[name] = handler

    def unregister(self, name: str) -> None:
        with self._lock:
            self._handlers.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    def dispatch(self, req: Request) -> Reply:
        """The handler's reply; an unknown name or a handler that raises gets an error reply."""
        with self._lock:
            handler = self._handlers.get(req.name)
        if handler is None:
            return {"ok": False, "error": f"unknown command {req.name!r}", "known": self.names()}
        try:
            return handler(req)
        except Exception as e:  # a handler bug answers the requester; the worker goes on
            log.debug("command %s failed", req.name, exc_info=True)
            return {"ok": False, "error": f"{type(e).__name__}: {printable(str(e), 200)}"}


def encode_reply(reply: Mapping[str, Any] | str | bytes) -> bytes:
    if isinstance(reply, bytes):
        return reply
    if isinstance(reply, str):
        return reply.encode()
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def reply_route(topics: Topics, req: Request) -> tuple[str, str | None]:
    """(topic for the reply, why the requested response topic was refused or None)."""
    default = topics.reply(req.name)
    if req.response_topic is None:
        return default, None
    if topics.is_reply_topic(req.name, req.response_topic):
        return req.response_topic, None
    return default, f"response topic {printable(req.response_topic)!s} is outside {default}[/...]"


class _Info(Protocol):
    @property
    def rc(self) -> int: ...

    def is_published(self) -> bool: ...

    def wait_for_publish(self, timeout: float | None = None) -> None: ...


PublishFn = Callable[[str, bytes, "bytes | None"], _Info]  # (topic, body, correlation data) -> paho's info


class CommandWorker:
    """Receives commands from paho's network thread (``submit``) and runs them on its own
    thread; see the module docstring. ``publish(topic, body, correlation)`` sends a reply and
    returns paho's MQTTMessageInfo."""

    def __init__(self, registry: CommandRegistry, topics: Topics, publish: PublishFn, *,
                 queue_max: int = QUEUE_MAX, rate: float = RATE, burst: int = BURST) -> None:
        self.registry = registry
        self.topics = topics
        self._publish = publish
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=queue_max)
        self._bucket = TokenBucket(rate, burst)
        self._replies: list[_Info] = []  # replies awaiting their PUBACK; worker thread only
        self._thread: threading.Thread | None = None
        self.stats: Counter[str] = Counter()
        self._log_received = ThrottledLog(log, rate=1.0, burst=10)
        self._log_refused = ThrottledLog(log, rate=0.2, burst=5)
        self._retained_seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()  # paho's network thread only

    # -- paho's network thread: never blocks, never raises ------------------------------------
    def submit(self, topic: str, payload: bytes, properties: Any = None, *, retained: bool = False) -> None:
        """Take a message from paho (``retained``: the broker's retain flag, set on a message it
        kept and hands to every new subscription)."""
        try:
            if retained:
                self._refuse_retained(topic, payload)
                return
            name = self.topics.command_name(topic)
            if len(payload) > MAX_PACKET:
                self.stats["refused_size"] += 1
                self._log_refused.log(logging.WARNING, "ignored a command of %d bytes (at most %d)", len(payload),
                                      MAX_PACKET)
                return
            if name is None or command_name_problem(name):
                self.stats["refused_name"] += 1
                self._log_refused.log(logging.WARNING, "ignored a message on %s: not a command name",
                                      printable(topic))
                return
            response = getattr(properties, "ResponseTopic", None) if properties is not None else None
            correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
            req = Request(name, bytes(payload), response if isinstance(response, str) else None,
                          bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None, time.time())
            self._queue.put_nowait(req)
        except queue.Full:
            self.stats["dropped_queue"] += 1
            self._log_refused.log(logging.WARNING, "command queue full (%d); command dropped", self._queue.maxsize)
        except Exception:  # nothing from the wire may end paho's network loop
            self.stats["errors"] += 1
            self._log_refused.log(logging.ERROR, "could not take a command from %s", printable(topic))

    def _refuse_retained(self, topic: str, payload: bytes) -> None:
        """A retained message: refused; said the first time the broker hands this one over."""
        self.stats["refused_retained"] += 1
        key = (topic, hashlib.sha256(payload).digest())
        if key in self._retained_seen:
            self._retained_seen.move_to_end(key)
            return
        self._retained_seen[key] = None
        if len(self._retained_seen) > RETAINED_REMEMBERED:
            self._retained_seen.popitem(last=False)
        self._log_refused.log(logging.WARNING, "ignored a retained message on %s: a command is never retained "
                              "(commands expire and are single use); clear it at the broker with: "
                              "mosquitto_pub -t '%s' -r -n", printable(topic), printable(topic, 200))

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the worker is busy with a backlog: it sees the flag below
            pass
        self._stopping = True
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- worker thread ----------------------------------------------------------------------
    _stopping = False

    def _run(self) -> None:
        while not self._stopping:
            req = self._queue.get()
            if req is None:
                return
            try:
                self._handle(req)
            except Exception:  # the worker never dies of one command
                self.stats["errors"] += 1
                self._log_refused.log(logging.ERROR, "command %s: unexpected error", req.name, exc_info=True)

    def _handle(self, req: Request) -> None:
        if not self._bucket.take():
            self.stats["dropped_rate"] += 1
            self._log_refused.log(logging.WARNING, "command %s dropped: more than %g commands per second",
                                  req.name, self._bucket.rate)
            return
        self.stats["received"] += 1
        self._log_received.log(logging.INFO, "command %s received (%d bytes)", req.name, len(req.payload))
        started = time.monotonic()
        reply = self.registry.dispatch(req)
        took = time.monotonic() - started
        if took > SLOW_S:
            self._log_refused.log(logging.WARNING, "command %s took %.1f s; long work belongs on its own thread",
                                  req.name, took)
        if reply is None:
            return
        topic, refused = reply_route(self.topics, req)
        if refused:
            self.stats["refused_response_topic"] += 1
            self._log_refused.log(logging.WARNING, "command %s: %s; replying there instead", req.name, refused)
        self._replies = [i for i in self._replies if not _done(i)]
        if len(self._replies) >= MAX_REPLIES_INFLIGHT:  # wait a little for the oldest (this thread only)
            _wait(self._replies[0], REPLY_WAIT_S)
            self._replies = [i for i in self._replies if not _done(i)]
        if len(self._replies) >= MAX_REPLIES_INFLIGHT:
            self.stats["dropped_reply"] += 1
            self._log_refused.log(logging.WARNING, "command %s: reply dropped, %d replies await their PUBACK",
                                  req.name, len(self._replies))
            return
        try:
            info = self._publish(topic, encode_reply(reply), req.correlation)
        except Exception as e:  # paho refuses a topic or a payload: count it, go on
            self.stats["reply_errors"] += 1
            self._log_refused.log(logging.WARNING, "command %s: reply not sent: %s", req.name,
                                  printable(str(e), 120))
            return
        self._replies.append(info)
        self.stats["replied"] += 1


def _wait(info: _Info, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        pass


def _done(info: _Info) -> bool:
    """Acknowledged, or failed (paho raises for a failed publish): no longer holds a slot."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True
