"""What the MQTT link does when it fails (pure): how long to wait before the next attempt, and
one line that says why the attempt failed.

- ``Backoff``: exponential from ``min_s`` to ``max_s``, each delay cut by a random fraction up
  to ``jitter`` (0.5: between half and all of it). Boxes that lost the broker together (a
  broker restart, a mast losing power) spread their reconnects instead of arriving in step, and
  none waits longer than ``max_s`` after the broker is back. Each Publisher draws from its own
  randomly seeded generator.
- ``describe_failure``: the reason of a failed connection attempt as a ``Failure`` (a stable
  ``kind`` and a line a ranger can act on): DNS, refused, unreachable, timeout, the broker's
  certificate (unknown CA, wrong host name, expired), a client certificate required or refused,
  a plain port spoken to in TLS, not authorised, or refused by the broker with its reason code.
  The publisher logs it once per outage and again when the kind changes.
- ``TakeoverWatch``: two clients with the same client id (two boxes given the same
  ``device.id``, or a second daemon on one box) take the session from each other in a loop:
  each connects, the broker drops the other. The broker says little (MQTT 5 may send
  DISCONNECT "Session taken over", 142; Mosquitto's drop reaches paho as "Unspecified error"),
  so the pattern is what tells: ``TAKEOVER_STREAK`` accepted connections in a row that the
  broker dropped (142, or without a reason) before the link held (``short_s``: the
  publisher passes its reconnect_max_s, the other client's longest wait). Then one line names
  the likely cause, at most once every ``say_every_s`` (with the drops since); a reason the
  broker gave that is not a takeover, or a link that held, ends the streak.
"""

from __future__ import annotations

import errno
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass


class Backoff:
    """Delays for successive failed attempts; ``reset()`` after a connection that held."""

    def __init__(self, min_s: float, max_s: float, jitter: float, rng: random.Random | None = None) -> None:
        if not (0 < min_s <= max_s) or not (0 <= jitter <= 1):
            raise ValueError("backoff needs 0 < min_s <= max_s and 0 <= jitter <= 1")
        self.min_s, self.max_s, self.jitter = min_s, max_s, jitter
        self._rng = rng or random.Random()  # seeded from the OS: two boxes never share a sequence
        self.failures = 0

    def ceiling(self) -> float:
        """The delay before jitter for the next attempt: min_s doubled per failure, capped."""
        return min(self.max_s, self.min_s * 2 ** min(self.failures, 64))

    def next(self) -> float:
        delay = self.ceiling() * (1.0 - self.jitter * self._rng.random())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Failure:
    kind: str  # stable across attempts with the same cause: the publisher logs again on a change
    reason: str  # what went wrong and what to check, without the host (the caller adds it)


_AUTH = {134: "bad user name or password (check mqtt.username and the password)",
         # Mosquitto answers a wrong password with this one too
         135: "not authorised (check mqtt.username and the password, and the broker's ACL for this client)"}
_CONNACK_HINT = {132: "; the broker does not speak this MQTT version: set mqtt.protocol to 3.1.1",
                 133: "; check mqtt.client_id",
                 138: "; this client is banned by the broker"}
_SSL_NOISE = re.compile(r"\s*\(_ssl\.c:\d+\)")


def describe_failure(error: BaseException | str | None, *, port: int, tls: bool, client_cert: bool,
                     connack: int | None = None, connack_text: str = "", timeout_s: float | None = None,
                     no_answer_s: float | None = None) -> Failure:
    """Why a connection attempt failed. ``error`` is the exception ``connect`` raised or the text
    of the socket error paho reported while reading (a TLS 1.3 alert arrives only then);
    ``connack`` the reason code of a refusing CONNACK; ``no_answer_s`` set when the broker never
    answered the CONNECT. With none of them, the broker closed the connection without a word."""
    if connack is not None:
        if connack in _AUTH:
            return Failure("auth", f"the broker refused the connection: {_AUTH[connack]}")
        return Failure(f"connack-{connack}", f"the broker refused the connection: {connack_text or connack}"
                                              f"{_CONNACK_HINT.get(connack, '')}")
    if no_answer_s is not None:
        return Failure("no-connack", f"the broker took the connection but did not answer the MQTT CONNECT "
                                     f"within {no_answer_s:g} s")
    if error is None:
        hint = f" (is {port} a TLS port? then set mqtt.tls)" if not tls else ""
        return Failure("closed", f"the broker closed the connection before accepting it{hint}")
    if isinstance(error, socket.gaierror):
        return Failure("dns", f"the host name does not resolve (DNS): {error.strerror or error}")
    if isinstance(error, ConnectionRefusedError):
        return Failure("refused", "connection refused: no broker listens there (broker down, or wrong mqtt.port)")
    if isinstance(error, (TimeoutError, socket.timeout)):
        after = f" within {timeout_s:g} s" if timeout_s else ""
        return Failure("timeout", f"no answer{after} (network down, a firewall, or a wrong mqtt.host)")
    if isinstance(error, OSError) and error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
        return Failure("unreachable", f"network or host unreachable ({error.strerror})")
    text = _SSL_NOISE.sub("", str(error)).strip()
    low = text.lower()
    if "mismatch" in low and ("hostname" in low or "ip address" in low):
        return Failure("tls-host", f"the broker's certificate is not valid for this host name (wrong host name: "
                                   f"set mqtt.host to a name the certificate holds): {text}")
    if any(k in low for k in ("local issuer", "self-signed", "self signed", "unable to get issuer",
                              "signature failure")):
        return Failure("tls-ca", f"the broker's certificate is not signed by a trusted CA (bad CA: check "
                                 f"mqtt.tls.ca_file): {text}")
    if "certificate has expired" in low or "not yet valid" in low:
        return Failure("tls-expired", f"the broker's certificate has expired or is not valid yet (check it, and "
                                      f"this box's clock): {text}")
    if "certificate_required" in low or "certificate required" in low or (
            not client_cert and tls and "handshake failure" in low):
        return Failure("tls-cert-required", "the broker requires a client certificate and none is configured "
                                            "(set mqtt.tls.cert_file and mqtt.tls.key_file)")
    if client_cert and any(k in low for k in ("bad certificate", "unknown ca", "certificate unknown",
                                              "unsupported certificate", "certificate revoked",
                                              "certificate expired", "handshake failure")):
        return Failure("tls-cert-refused", f"the broker refused this box's client certificate: {text}")
    if "wrong version number" in low or "record layer failure" in low or "packet length too long" in low:
        return Failure("tls-plain-port", "the broker did not answer in TLS (a plain MQTT port? use its TLS port, "
                                         "usually 8883, or remove mqtt.tls)")
    if "certificate verify failed" in low:
        return Failure("tls-verify", f"the broker's certificate was refused: {text}")
    if "ssl" in low or "tls" in low:
        return Failure("tls", f"TLS failed: {text}")
    if isinstance(error, ConnectionResetError) or "reset by peer" in low or "broken pipe" in low or "eof" in low:
        hint = (f" (is {port} a plain MQTT port? use its TLS port, usually 8883, or remove mqtt.tls)" if tls
                else f" (is {port} a TLS port? then set mqtt.tls)")
        return Failure("reset", f"the broker dropped the connection{hint}: {text}")
    name = type(error).__name__ if isinstance(error, BaseException) else "error"
    return Failure(f"other-{name}", f"{name}: {text}")


SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code
UNSPECIFIED = 128  # what paho reports for a connection the broker closed without a reason
TAKEOVER_STREAK = 3  # accepted connections dropped in a row before the pattern is named
TAKEOVER_SAY_EVERY_S = 600.0


class TakeoverWatch:
    """Is another client with our client id taking the session from us? (pure given ``clock``)"""

    def __init__(self, client_id: str, short_s: float, *, streak: int = TAKEOVER_STREAK,
                 say_every_s: float = TAKEOVER_SAY_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.client_id, self.short_s, self.streak, self.say_every_s = client_id, short_s, streak, say_every_s
        self._clock = clock
        self._up: float | None = None
        self.drops = 0  # in the current streak
        self._lived: list[float] = []
        self._said_at: float | None = None
        self._unsaid = 0  # drops since the last line

    @property
    def suspected(self) -> bool:
        """The pattern holds now: the caller may quiet its per-connection lines."""
        return self.drops >= self.streak

    def connected(self) -> None:
        self._up = self._clock()

    def lost(self, reason: int | None) -> str | None:
        """The broker dropped a connection it had accepted (``reason``: the DISCONNECT reason
        code, None or 128 when it gave none). Returns the line to log, or None."""
        now = self._clock()
        lived = now - self._up if self._up is not None else float("inf")
        self._up = None
        if reason not in (None, UNSPECIFIED, SESSION_TAKEN_OVER) or lived >= self.short_s:
            self.drops, self._lived = 0, []  # the broker said why, or the link held: not this
            return None
        self.drops += 1
        self._lived.append(lived)
        self._unsaid += 1
        if self.drops < self.streak and reason != SESSION_TAKEN_OVER:
            return None
        if self._said_at is not None and now - self._said_at < self.say_every_s:
            return None
        self._said_at, n = now, self._unsaid
        self._unsaid = 0
        how = "said the session was taken over" if reason == SESSION_TAKEN_OVER else \
            f"dropped this client {n} time(s) within {max(self._lived[-self.streak:]):.0f} s of connecting"
        return (f"the MQTT broker {how}: another client is probably connected with the same client id "
                f"{self.client_id!r} (two boxes with the same device.id, or a second daemon on this box); "
                "give each box its own device.id (or mqtt.client_id)")
