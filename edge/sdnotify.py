"""A tiny sd_notify client: tell systemd we are ready, alive, busy or stopping.

Why our own: the protocol is one datagram per message to $NOTIFY_SOCKET, and the device
should not depend on libsystemd bindings. Outside systemd (NOTIFY_SOCKET unset: tests, a
shell, the demo) every call is a harmless no-op, so callers never branch on it.

The daemon sends WATCHDOG=1 from its inference loop (not from a timer thread), and only while
its writer thread makes progress, so a wedged loop or a stuck writer stops the pings and
systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes:
    """'@name' is Linux's abstract namespace: a leading NUL byte on the wire."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    """Sends state strings to systemd; a no-op when not started by systemd."""

    def __init__(self, socket_path: str | None = None) -> None:
        raw = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr = _address(raw) if raw else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. Returns True when sent.

        Never raises: losing a status line must not take the daemon down (a missed
        WATCHDOG=1 is what systemd is there to notice).
        """
        if self._addr is None or not lines:
            return False
        msg = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self._addr)
            return True
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self._addr, e)
            self.close()
            return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1: engines loaded and a warm-up image passed (Type=notify start-up ends here)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Free-text state shown by `systemctl status` (one line)."""
        return self.notify("STATUS=" + text.replace("\n", " "))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more start-up time (e.g. during a TensorRT engine build)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """The systemd watchdog timeout in seconds, or None when no watchdog is armed for us.

    Ping at about half this interval. WATCHDOG_PID, when set, must be our pid (systemd sets
    it so a forked child does not mistake the parent's watchdog for its own).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
