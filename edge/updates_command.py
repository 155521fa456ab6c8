"""Signed remote commands (update, rollback, models): the envelope, its checks, the replay store.

Anyone who can publish to the broker could otherwise roll a box back to an old model or point
it at a hostile server, so a command that changes the model is obeyed only when it is signed
by a trusted key (the same Ed25519 trust as bundles, edge/signing.py), addressed to this box
(or to ``*``, the whole fleet), not expired, and not seen before.

Wire form (the MQTT payload; JSON)::

    {"v": 1, "cmd": "<the command, as JSON text>", "sig": "<base64 Ed25519 signature of cmd's UTF-8 bytes>"}

The command is carried as text, and the signature covers those exact bytes, so nothing has to
agree on a canonical JSON form. The command itself::

    {"name": "update", "device": "cam-01" | "*", "nonce": "<16-64 hex>", "issued": 1795743929,
     "expires": 1795747529, "args": {"version": "2026.11.2", "url": "https://..."}}

Invariants:
- ``name`` must equal the topic's command name: a signed ``models`` query cannot be replayed
  on ``cmd/rollback``.
- ``expires - issued`` is at most ``MAX_LIFETIME_S``; so the replay store only has to remember
  nonces for that long, and a leaked command is useless after a day at worst.
- A nonce is recorded (fsync'd) before the command acts; a replayed nonce is refused even
  after a restart. Expired nonces are pruned from the store.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.atomic import atomic_write_bytes
from edge.signing import KeySource, SignatureError, sign, verify

ENVELOPE_VERSION = 1
MAX_LIFETIME_S = 24 * 3600
DEFAULT_LIFETIME_S = 3600
CLOCK_SKEW_S = 300  # a command "issued" up to this far in the future is accepted (box clocks drift)
FLEET = "*"
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class CommandError(ValueError):
    """A command refused; the message is the reason sent back on the reply and update topics."""


@dataclass(frozen=True)
class Command:
    """A verified command: who signed it (``key_id``) and what it asks."""

    name: str
    device: str
    nonce: str
    issued: int
    expires: int
    args: dict[str, Any] = field(default_factory=dict)
    key_id: str = ""


def make_command(name: str, *, device: str, args: Mapping[str, Any] | None = None, private_pem: KeySource,
                 lifetime_s: int = DEFAULT_LIFETIME_S, now: float | None = None) -> bytes:
    """The signed payload for ``<prefix>cmd/<name>`` (workstation side)."""
    if not _NAME.match(name):
        raise ValueError(f"command name {name!r}: lowercase letters, digits, '-' and '_' only")
    if not 0 < lifetime_s <= MAX_LIFETIME_S:
        raise ValueError(f"lifetime {lifetime_s} s: must be between 1 and {MAX_LIFETIME_S}")
    t = int(time.time() if now is None else now)
    body = {"name": name, "device": device, "nonce": secrets.token_hex(16), "issued": t,
            "expires": t + int(lifetime_s), "args": dict(args or {})}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    sig = sign(text.encode(), private_pem)
    return json.dumps({"v": ENVELOPE_VERSION, "cmd": text, "sig": base64.b64encode(sig).decode()},
                      separators=(",", ":")).encode()


def parse_command(payload: bytes, *, name: str, device_id: str, public_keys: Iterable[KeySource],
                  now: float | None = None) -> Command:
    """Check the envelope, the signature, the address and the time window (pure: no replay check).

    Raises CommandError with a one-line reason.
    """
    try:
        env = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... 60,000 deep
        raise CommandError(f"cmd/{name}: not JSON; a signed command envelope is required") from None
    if not isinstance(env, dict) or "sig" not in env or "cmd" not in env:
        raise CommandError(f"cmd/{name}: unsigned command refused (expected {{\"v\":1,\"cmd\":...,\"sig\":...}})")
    if env.get("v") != ENVELOPE_VERSION:
        raise CommandError(f"cmd/{name}: envelope version {env.get('v')!r}, this box reads {ENVELOPE_VERSION}")
    text, sig_b64 = env["cmd"], env["sig"]
    if not isinstance(text, str) or not isinstance(sig_b64, str):
        raise CommandError(f"cmd/{name}: 'cmd' must be JSON text and 'sig' base64 text")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except ValueError:
        raise CommandError(f"cmd/{name}: 'sig' is not base64") from None
    keys = list(public_keys)
    if not keys:
        raise CommandError(f"cmd/{name}: no trusted public keys on this box; signed commands cannot be checked")
    try:
        key_id = verify(text.encode(), sig, keys)
    except SignatureError as e:
        raise CommandError(f"cmd/{name}: bad signature: {e}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise CommandError(f"cmd/{name}: the signed command is not JSON") from None
    if not isinstance(body, dict):
        raise CommandError(f"cmd/{name}: the signed command must be a JSON object")
    try:
        cmd = Command(name=str(body["name"]), device=str(body["device"]), nonce=str(body["nonce"]),
                      issued=int(body["issued"]), expires=int(body["expires"]), args=dict(body.get("args") or {}),
                      key_id=key_id)
    except (KeyError, TypeError, ValueError) as e:
        raise CommandError(f"cmd/{name}: the signed command lacks or mistypes a field ({e})") from None
    if cmd.name != name:
        raise CommandError(f"cmd/{name}: the signed command is for {cmd.name!r}, not {name!r}")
    if cmd.device not in (device_id, FLEET):
        raise CommandError(f"cmd/{name}: the signed command is addressed to {cmd.device!r}, not {device_id!r}")
    if not _NONCE.match(cmd.nonce):
        raise CommandError(f"cmd/{name}: nonce must be 16-64 lowercase hex digits")
    t = time.time() if now is None else now
    if cmd.expires - cmd.issued > MAX_LIFETIME_S or cmd.expires <= cmd.issued:
        raise CommandError(f"cmd/{name}: lifetime {cmd.expires - cmd.issued} s is outside 1..{MAX_LIFETIME_S} s")
    if cmd.issued > t + CLOCK_SKEW_S:
        raise CommandError(f"cmd/{name}: issued {int(cmd.issued - t)} s in the future (check the clocks)")
    if cmd.expires <= t:
        raise CommandError(f"cmd/{name}: expired {int(t - cmd.expires)} s ago")
    return cmd


class ReplayStore:
    """Nonces of accepted commands, kept until they expire, in one JSON file (atomic, fsync'd).

    ``claim`` records a nonce before the command acts, so a command is obeyed at most once even
    if the box loses power right after. An unreadable store (a torn write cannot happen, but a
    disk fault can) is treated as full: every command is refused until it is repaired, never as
    empty, which would reopen every old command to replay.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise CommandError(f"{self.path}: replay store unreadable ({e}); commands refused until it is "
                               "fixed or removed by hand") from None

    def claim(self, cmd: Command, now: float | None = None) -> None:
        """Record ``cmd.nonce``; raise CommandError if it was seen before."""
        t = time.time() if now is None else now
        with self._lock:
            seen = self._read()
            if cmd.nonce in seen:
                raise CommandError(f"cmd/{cmd.name}: replayed command refused (nonce {cmd.nonce[:12]}... seen before)")
            # forget a nonce only once its command expired by the box's clock AND by the signer's
            # (cmd.issued, a signed time): a box clock running ahead (NTP not yet answered) would
            # otherwise forget commands still valid, replayable once the clock comes back
            horizon = min(t, cmd.issued)
            seen = {k: v for k, v in seen.items() if v > horizon - CLOCK_SKEW_S}
            seen[cmd.nonce] = cmd.expires
            atomic_write_bytes(self.path, json.dumps(seen, sort_keys=True).encode())

