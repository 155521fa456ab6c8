"""Test helpers: a real Mosquitto on a free loopback port, and a real paho subscriber.

The broker runs from its own temp dir (config, persistence, log), can be killed (SIGKILL, like a
power cut), stopped (SIGTERM, saves its database) and restarted on the same port, and is always
killed at the end (fixture finaliser, plus an atexit guard for a crashed test run).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE: weakref.WeakSet[Mosquitto] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_LIVE):
        broker.kill()


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path, host: str = "127.0.0.1") -> Pki:
    """A throwaway CA, a server certificate for ``host`` (IP SAN) and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: Any, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("camtrap test CA")).issuer_name(name("camtrap test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: Any, san: x509.SubjectAlternativeName | None) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san is not None:
            b = b.add_extension(san, critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    s_key, s_cert = leaf(host, ExtendedKeyUsageOID.SERVER_AUTH,
                         x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]))
    c_key, c_cert = leaf("camtrap-device", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    return Pki(ca=write_cert(ca, folder / "ca.pem"), server_cert=write_cert(s_cert, folder / "server.pem"),
               server_key=write_key(s_key, folder / "server.key"),
               client_cert=write_cert(c_cert, folder / "client.pem"),
               client_key=write_key(c_key, folder / "client.key"))


class Mosquitto:
    """One mosquitto process. ``passwords`` turns on password_file auth (no anonymous clients);
    ``pki`` makes the listener TLS-only (client certificates required when ``require_cert``)."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, port: int | None = None, passwords: dict[str, str] | None = None,
                 pki: Pki | None = None, require_cert: bool = False, persistence: bool = True) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.binary = binary
        self.dir = Path(workdir) / f"mosquitto-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.passwords = passwords
        self.pki = pki
        self.require_cert = require_cert
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.db_path = self.dir / "mosquitto.db"
        _LIVE.add(self)

    def _write_config(self) -> Path:
        lines = [f"listener {self.port} {self.host}", "log_dest file " + str(self.log_path),
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true", "log_timestamp true"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to user mosquitto and cannot write our dir
        if self.persistence:
            # saved on SIGTERM, on save() (SIGUSR1) and never on a timer: a SIGKILL loses exactly
            # what happened since the last explicit save, which the tests rely on
            lines += ["persistence true", f"persistence_location {self.dir}/", "persistence_file mosquitto.db",
                      "autosave_interval 0"]
        if self.passwords is not None:
            pw = self.dir / "passwd"
            pw.write_text("")
            for user, secret in self.passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, secret], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.pki is not None:
            lines += [f"cafile {self.pki.ca}", f"certfile {self.pki.server_cert}", f"keyfile {self.pki.server_key}",
                      f"require_certificate {'true' if self.require_cert else 'false'}"]
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start (or restart on the same port) and return once the port accepts connections."""
        for _attempt in range(5):
            conf = self._write_config()
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_ready(timeout):
                return self
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.kill()
            if self._fixed_port or "in use" not in (err + self.log_text()):
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {err.strip()}\n{self.log_text()}")
            self.port = free_port()  # lost a race for the port: try another one
        raise RuntimeError("mosquitto could not find a free port")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, like a power cut: nothing is saved, sockets are reset by the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: mosquitto saves its database and closes client connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self, hard: bool = True) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def save(self, timeout: float = 5.0) -> None:
        """Write the persistence database now (SIGUSR1) and wait until it is on disk."""
        assert self.persistence and self.proc is not None
        before = self.db_path.stat().st_mtime_ns if self.db_path.exists() else -1
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.db_path.exists() and self.db_path.stat().st_mtime_ns != before:
                time.sleep(0.05)  # let the rename land
                return
            time.sleep(0.01)
        raise TimeoutError("mosquitto did not save its database")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.kill()
        _LIVE.discard(self)


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    dup: bool  # the broker resent it (DUP flag): a redelivery on the broker -> subscriber hop
    seq: int | None  # the MQTT 5 user property "seq", when present
    body_seq: int | None  # "seq" inside a JSON payload, when present
    correlation: bytes | None = None  # the MQTT 5 correlation data, when present

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A real paho client collecting everything under ``topic``. ``persistent=True`` keeps an
    MQTT 5 session on the broker (clean_start False, 1 h expiry), so messages published while it
    is reconnecting are queued for it rather than lost; ``receive_maximum=1`` makes the broker send
    it one message at a time (strict order, at most one redelivery after a broker restart)."""

    def __init__(self, broker: Mosquitto, topic: str, *, persistent: bool = False, receive_maximum: int | None = None,
                 client_id: str | None = None,
                 username: str | None = None, password: str | None = None, pki: Pki | None = None) -> None:
        self.topic = topic
        self.persistent = persistent
        self.receive_maximum = receive_maximum
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if pki is not None:
            self.client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.broker = broker

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        seq = None
        correlation = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        for key, value in getattr(getattr(msg, "properties", None), "UserProperty", None) or []:
            if key == "seq":
                seq = int(value)
        try:
            body = json.loads(msg.payload)
            body_seq = body.get("seq") if isinstance(body, dict) else None
        except ValueError:
            body_seq = None
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), bool(msg.dup), seq,
                                          body_seq, correlation))

    def start(self, timeout: float = 10.0) -> Subscriber:
        props = Properties(PacketTypes.CONNECT)
        if self.persistent:
            props.SessionExpiryInterval = 3600
        if self.receive_maximum:
            props.ReceiveMaximum = self.receive_maximum
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=5,
                                  clean_start=not self.persistent, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("test subscriber did not get its SUBACK")
        return self

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 15.0) -> bool:
        """Poll (every 10 ms, on a snapshot) until ``predicate(messages)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.snapshot()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def on(self, suffix: str) -> list[Received]:
        return [m for m in self.snapshot() if m.topic.endswith(suffix)]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
