"""The `mqtt:` section of the device config (imported by edge/config.py).

The password is best given as ``password_env`` or ``password_file`` and read at connect time
(``resolve_password``), so a rotated secret is picked up on restart; an inline ``password`` is
accepted for demos and is a ``SecretStr``, so printing, logging or dumping the config shows
``**********``, never the secret.

Rules kept here (each has one definition and a test):

- The password file must not be writable by its group nor readable by others: mode 0600, or
  0640 owned root:camtrap as ``systemd/install.sh`` sets it (``PASSWORD_FILE_FORBIDDEN``).
  Anything looser is refused when the password is read, and ``check-config`` says so.
- The topic prefix follows ``edge.messages.prefix_problem`` (holds ``{device_id}``, no
  wildcard, no ``$`` start, no control character, bounded length).
- The client id is 1 to ``CLIENT_ID_MAX`` bytes without control characters.
- Reconnects back off exponentially from ``reconnect_min_s`` to ``reconnect_max_s`` (30 s by
  default, so a box is back within about 30 s of its broker) with ``reconnect_jitter``, so a
  fleet that lost its broker together does not reconnect in step (``edge.mqtt_link.Backoff``).
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.numbers import NoBoolNumbers

from .messages import Topics, prefix_problem, topics

PASSWORD_FILE_FORBIDDEN = 0o037  # group write, and any access by others
CLIENT_ID_MAX = 128  # bytes; brokers must accept 23, Mosquitto accepts 65535


class TlsConfig(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(None, description="CA bundle (PEM) that signed the broker's certificate; "
                                                   "empty = the system's trust store")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(None, description="private key (PEM) of the client certificate")
    insecure: bool = Field(False, description="skip the broker host name check (testing only; the chain "
                                              "is still verified)")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together (give both or neither)")
        return self


class QosConfig(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid")

    detection: Literal[0, 1, 2] = Field(1, description="QoS of detection messages")
    alert: Literal[0, 1, 2] = Field(1, description="QoS of watch-list alerts")
    telemetry: Literal[0, 1, 2] = Field(0, description="QoS of telemetry (0: a lost sample is replaced by the "
                                                       "next one; the row leaves the outbox once written)")
    status: Literal[0, 1, 2] = Field(1, description="QoS of the retained status and of the last will")


class MqttConfig(NoBoolNumbers):
    """Broker connection, topics and the outbox policy."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("localhost", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (usually 1883, 8883 with TLS)")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent = plain TCP")
    username: str | None = Field(None, description="user name for the broker")
    password: SecretStr | None = Field(None, description="inline password (demos; prefer password_env or "
                                                        "password_file); never printed")
    password_env: str | None = Field(None, description="name of the environment variable holding the password")
    password_file: Path | None = Field(None, description="file holding the password (first line); mode 0600, or "
                                      "0640 owned root:camtrap: refused if its group may write it or others may "
                                      "read it")
    client_id: str | None = Field(None, description="MQTT client id (1-128 bytes, no control characters); default "
                                  "camtrap-<device_id>")
    prefix: str = Field("camtrap/{device_id}/", description="topic prefix; must hold {device_id} (replaced by the "
                        "device id) and end in /; no wildcard, no leading $ or /, no control character, at most "
                        "128 bytes")
    keepalive: int = Field(60, ge=2, le=65535, description="seconds between pings when idle; a dead link is "
                                                            "noticed after about 1.5 x this")
    connect_timeout_s: float = Field(10.0, gt=0, description="give up a connection attempt after this long")
    reconnect_min_s: float = Field(1.0, gt=0, description="first reconnect delay; doubles after each failure")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="longest reconnect delay: a box is back within "
                                   "about this long after its broker returns")
    reconnect_jitter: float = Field(0.5, ge=0, le=1, description="each delay is cut by a random fraction up to "
                                    "this (0.5: between half and all of it), so boxes that lost the broker "
                                    "together do not reconnect in step")
    max_inflight: int = Field(1, ge=1, le=1000, description="messages published but not yet acknowledged. 1 keeps "
                              "the broker's stream in strict order with at most one duplicate per outage; more "
                              "is faster on slow links but a reconnect may resend up to this many")
    max_outbox: int = Field(10_000, ge=1, description="outbox bound in rows; when full, the oldest telemetry, "
                            "then the oldest detections are dropped (counted); alerts are never dropped")
    qos: QosConfig = Field(default_factory=QosConfig, description="QoS per message kind")

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        given = [k for k in ("password", "password_env", "password_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of mqtt.{', mqtt.'.join(given)}")
        if given and not self.username:
            raise ValueError(f"mqtt.{given[0]} needs mqtt.username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        why = prefix_problem(v)
        if why:
            raise ValueError(why)  # the value is not echoed: it may be 70,000 bytes
        return v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or len(v.encode("utf-8", "surrogatepass")) > CLIENT_ID_MAX
                              or any(unicodedata.category(c) == "Cc" for c in v)):
            raise ValueError(f"must be 1 to {CLIENT_ID_MAX} bytes without control characters")
        return v

    def topics(self, device_id: str) -> Topics:
        """Every topic of this device (raises ValueError for a device id unfit for a topic)."""
        return topics(self.prefix, device_id)

    def topic_prefix(self, device_id: str) -> str:
        return self.topics(device_id).prefix

    def client_id_for(self, device_id: str) -> str:
        return self.client_id or f"camtrap-{device_id}"

    def resolve_password(self) -> str | None:
        """Read the password now (at connect time, so a rotated secret is picked up on restart).
        Raises ValueError / FileNotFoundError naming the setting, never the secret."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return value
        if self.password_file:
            if not self.password_file.is_file():
                raise FileNotFoundError(f"mqtt.password_file: {self.password_file} does not exist")
            mode = stat.S_IMODE(self.password_file.stat().st_mode)
            if mode & PASSWORD_FILE_FORBIDDEN:
                raise ValueError(f"mqtt.password_file: {self.password_file} has mode {mode:04o}; others must not "
                                 "read it nor its group write it (chmod 600, or 640 with group camtrap)")
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
            if not lines or not lines[0]:
                raise ValueError(f"mqtt.password_file: {self.password_file} is empty")
            return lines[0]
        return None

    def runtime_problems(self) -> list[str]:
        """What would stop a connection on this machine (missing files or variables), one line
        each, for `check-config`; the model itself is already valid."""
        problems: list[str] = []
        try:
            self.resolve_password()
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
        if self.tls is not None:
            for name in ("ca_file", "cert_file", "key_file"):
                p = getattr(self.tls, name)
                if p is not None and not Path(p).is_file():
                    problems.append(f"mqtt.tls.{name}: {p} does not exist")
        return problems

