"""Rate-limited, escaped log lines for what a stranger can trigger at will (MQTT commands,
refused response topics): a flood must not flood the journal, and no text from the wire may
forge a log line.

Invariants: at most ``burst`` lines, then ``rate`` lines per second, per ``ThrottledLog``; what
is held back is counted and reported in the next line that passes ("... 9,981 similar lines
suppressed"), so nothing is hidden, only summarised. ``printable`` escapes every control and
non-printing character and cuts the text, so one wire value is one short line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


def printable(text: str | bytes, limit: int = 64) -> str:
    """``text`` as one safe line: non-printable characters escaped (``\\n``, ``\\x00``), bytes
    that are not UTF-8 shown as ``\\xNN``, cut to about ``limit`` characters with '...'."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = []
    size = 0
    for c in text:
        piece = c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        if size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


class TokenBucket:
    """``burst`` events at once, refilled at ``rate`` per second (pure given ``clock``)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class ThrottledLog:
    """A logger for one kind of line, held to a token bucket; thread-safe."""

    def __init__(self, logger: logging.Logger, *, rate: float = 1.0, burst: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self._bucket = TokenBucket(rate, burst, clock)
        self._held = 0
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` (with the current exception's traceback when ``exc_info``) if the bucket
        allows; returns whether it was written."""
        if not self._bucket.take():
            with self._lock:
                self._held += 1
            return False
        with self._lock:
            held, self._held = self._held, 0
        if held:
            msg += f" ({held:,} similar line(s) suppressed before this one)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    @property
    def suppressed(self) -> int:
        """Lines held back since the last one written."""
        with self._lock:
            return self._held
