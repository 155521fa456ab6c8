"""`camtrap-export update`: send a signed update (or rollback) command to boxes over MQTT and follow
their retained ``update`` topics until each has committed, rolled back, failed, been refused, or
timed out; print one row per box (device, from, to, state, bytes, reason).

Each box gets its own command (addressed to it, fresh nonce, expiring), signed with the same
Ed25519 key as the bundles. ``--all`` finds the boxes from their retained ``status`` topics and
sends only to those online; the others are listed as offline (an MQTT command is not retained,
so it would be lost). The box's answer is matched to this command by the command's nonce,
which the box puts (first 12 hex digits) in the ``id`` of its update record, so an older
retained record is never mistaken for this run's outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.cli import number_in
from edge.messages import DEFAULT_PREFIX, Topics, prefix_problem, topics
from edge.updates_command import DEFAULT_LIFETIME_S, make_command
from edge.updates_state import TERMINAL

FOLLOWED = ("fetching", "verifying", "building", "selftest", "switching", "probation", "rolling_back")


@dataclass
class Row:
    device: str
    nonce: str = ""
    state: str = "sent"
    from_version: str | None = None
    to_version: str | None = None
    bytes: int = 0
    reason: str = ""
    seen: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in (*TERMINAL, "offline", "timed out")


def apply_message(row: Row, kind: str, body: dict[str, Any]) -> None:
    """Fold one message from a box into its row (pure): an update record for this command, or the
    command's reply (a refusal says why)."""
    if kind == "reply":
        if not body.get("ok", True) and body.get("state") in (None, "refused"):
            row.state, row.reason = "refused", str(body.get("reason") or body.get("error") or "")
        elif body.get("state") in TERMINAL:  # a rollback answers with its outcome
            row.state, row.reason = str(body["state"]), str(body.get("reason") or "")
            row.to_version = body.get("to") or row.to_version
        return
    if body.get("id") not in (row.nonce[:12], "-") or (body.get("id") == "-" and row.state != "sent"):
        return  # an older update's record (retained), or another run's
    row.state = str(body.get("state") or row.state)
    row.from_version = body.get("from") or row.from_version
    row.to_version = body.get("to") or row.to_version
    n = body.get("bytes")
    row.bytes = int(n) if isinstance(n, int) and n >= 0 else 0  # the wire may say anything
    row.reason = str(body.get("reason") or "")
    if not row.seen or row.seen[-1] != row.state:
        row.seen.append(row.state)


def table(rows: list[Row]) -> str:
    head = ("device", "from", "to", "state", "bytes", "reason")
    lines = [(r.device, r.from_version or "-", r.to_version or "-", r.state, f"{r.bytes:,}", r.reason) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*x) for x in [head, *lines])


class Fleet:
    """One MQTT connection to the broker the boxes use."""

    def __init__(self, host: str, port: int, *, prefix: str = DEFAULT_PREFIX, username: str | None = None,
                 password: str | None = None, ca_file: Path | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        why = prefix_problem(prefix)
        if why:
            raise ValueError(f"--prefix {prefix!r} {why}")
        self.prefix = prefix
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"camtrap-export-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            try:  # ssl's own errors do not name the file (a folder: "[Errno 21] Is a directory")
                self.client.tls_set(ca_certs=str(ca_file))
            except OSError as e:
                raise ValueError(f"--ca-file {ca_file}: not a readable PEM CA bundle ({e})") from None
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, bytes]] = []
        self._connected = threading.Event()
        self._subs: dict[int, threading.Event] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as e:  # refused, unknown host, unreachable: a line, not a traceback
            raise ValueError(f"MQTT broker {host}:{port}: cannot connect ({e.strerror or e})") from None
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise ValueError(f"MQTT broker {host}:{port}: no connection within 10 s")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self._inbox.append((msg.topic, bytes(msg.payload)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._lock:  # subscribe() stores the event under the same lock
            ev = self._subs.get(mid)
        if ev is not None:
            ev.set()

    def subscribe(self, topic: str) -> None:
        ev = threading.Event()
        with self._lock:
            rc, mid = self.client.subscribe(topic, qos=1)
            if mid is None:
                raise ValueError(f"MQTT: cannot subscribe to {topic} ({rc})")
            self._subs[mid] = ev
        ev.wait(10)

    def take(self) -> list[tuple[str, bytes]]:
        with self._lock:
            out, self._inbox = self._inbox, []
        return out

    def topics(self, device: str) -> Topics:
        return topics(self.prefix, device)

    def device_of(self, topic: str, rel: str) -> str | None:
        head, _, tail = self.prefix.partition("{device_id}")
        if not topic.startswith(head) or not topic.endswith(tail + rel):
            return None
        dev = topic[len(head): len(topic) - len(tail + rel)]
        return dev if dev and "/" not in dev else None

    def wildcard(self, rel: str) -> str:
        """``rel`` of every device (the prefix with ``+`` for the device id)."""
        return self.prefix.replace("{device_id}", "+") + rel

    def online_devices(self, wait_s: float = 2.0) -> dict[str, str]:
        """device -> state, from the retained status topics."""
        self.subscribe(self.wildcard(Topics.STATUS))
        time.sleep(wait_s)
        found: dict[str, str] = {}
        for topic, payload in self.take():
            dev = self.device_of(topic, Topics.STATUS)
            if dev is None:
                continue
            try:
                found[dev] = str(json.loads(payload).get("state"))
            except (ValueError, AttributeError):
                found[dev] = "?"
        return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_update(fleet: Fleet, devices: list[str], *, command: str, args: dict[str, Any], key_pem: bytes,
               timeout_s: float, offline: list[str] | None = None, lifetime_s: int = DEFAULT_LIFETIME_S,
               on_change: Any = None) -> list[Row]:
    """Send ``command`` to each device and follow until every row is done or the time is up."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    rows = {d: Row(d) for d in devices}
    for d in devices:
        fleet.subscribe(fleet.topics(d).update)
        fleet.subscribe(fleet.topics(d).reply(command))
    fleet.take()  # retained records of earlier updates: not this run's
    for d in devices:
        payload = make_command(command, device=d, args=args, private_pem=key_pem, lifetime_s=lifetime_s)
        rows[d].nonce = json.loads(json.loads(payload)["cmd"])["nonce"]
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = fleet.topics(d).reply(command)
        props.CorrelationData = rows[d].nonce.encode()
        fleet.client.publish(fleet.topics(d).command(command), payload, qos=1, properties=props)
    deadline = time.monotonic() + timeout_s
    while not all(r.done for r in rows.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        for topic, payload in fleet.take():
            try:
                body = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(body, dict):
                continue
            for dev in rows:
                kind = "update" if topic == fleet.topics(dev).update else \
                    "reply" if topic == fleet.topics(dev).reply(command) else None
                if kind is not None:
                    before = rows[dev].state
                    apply_message(rows[dev], kind, body)
                    if on_change and rows[dev].state != before:
                        on_change(rows[dev])
    for r in rows.values():
        if not r.done:
            r.reason = f"no final state after {timeout_s:g} s (last: {r.state})"
            r.state = "timed out"
    return [rows[d] for d in devices] + [Row(d, state="offline", reason="not online; command not sent")
                                         for d in offline or []]


def host_port(text: str, *, option: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[::1]:PORT`` for IPv6) of a command-line ``option``; ValueError naming it."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise ValueError(f"{option}: {text!r} has no port (HOST:PORT)")
        return host.strip("[]"), default_port
    if not port.isdigit():
        raise ValueError(f"{option}: {port!r} is not a port number")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{option}: port {port} is not 1-65535")
    return host.strip("[]"), int(port)


def _cmd_update(args: argparse.Namespace) -> int:
    host, port = host_port(args.broker, option="--broker", default_port=1883)
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    fleet = Fleet(host, port, prefix=args.prefix, username=args.username, password=password,
                  ca_file=Path(args.ca_file) if args.ca_file else None)
    try:
        offline: list[str] = []
        if args.all:
            seen = fleet.online_devices()
            devices = sorted(d for d, s in seen.items() if s == "online")
            offline = sorted(d for d, s in seen.items() if s != "online")
            if not devices and not offline:
                raise ValueError(f"--all: no box has a retained status under {fleet.wildcard(Topics.STATUS)}")
        else:
            devices = args.device
        cmd_args: dict[str, Any] = {}
        if args.version:
            cmd_args["version"] = args.version
        if args.url:
            cmd_args["url"] = args.url
        command = "rollback" if args.rollback else "update"
        if command == "update" and not args.version:
            raise ValueError("--version is required for an update")
        rows = run_update(fleet, devices, command=command, args=cmd_args, key_pem=Path(args.sign).read_bytes(),
                          timeout_s=args.timeout, offline=offline,
                          on_change=lambda r: print(f"  {r.device}: {r.state}", file=sys.stderr, flush=True))
    finally:
        fleet.close()
    print(table(rows))
    return 0 if all(r.state == ("rolled_back" if args.rollback else "committed") for r in rows) else 1


def add_cli(sub) -> None:
    p = sub.add_parser("update", help="send a signed update or rollback to boxes and follow them to the end")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", help="device id (repeatable)")
    who.add_argument("--all", action="store_true", help="every box with a retained status 'online'")
    p.add_argument("--version", help="bundle version to install (or, with --rollback, a kept version)")
    p.add_argument("--rollback", action="store_true", help="return to the previous (or --version) kept bundle")
    p.add_argument("--url", help="base URL of the published bundles (default: the box's updates.base_url)")
    p.add_argument("--sign", required=True, help="Ed25519 private key (PEM) the boxes trust")
    p.add_argument("--broker", required=True, help="HOST[:PORT] of the MQTT broker")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--username")
    p.add_argument("--password-file", help="file holding the MQTT password")
    p.add_argument("--ca-file", help="CA certificate for a TLS broker")
    p.add_argument("--timeout", type=number_in(0, 30 * 86_400), default=3600,
                   help="seconds to follow the boxes (default 3600)")
    p.set_defaults(func=_cmd_update)
