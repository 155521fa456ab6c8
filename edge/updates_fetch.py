"""Fetch one file over http(s): resumable, capped, timed out, verified, counted.

Boxes sit on cellular or satellite links that drop mid-transfer, so a download is written to
``<dest>.part`` and a later attempt (in this process or after a restart) asks for the rest with
``Range: bytes=<have>-``. A server that ignores the range answers 200 and the file starts over.

Invariants:
- ``dest`` appears only complete and verified: the ``.part`` file is fsync'd and renamed into
  place after its sha256 matched (or, with no expected hash, after the size cap was respected).
- Never more than ``max_bytes`` are written: a larger Content-Length is refused before reading,
  and a body that runs over is cut off and its part file removed.
- A sha256 mismatch removes the part file: resuming a corrupt prefix would never succeed.
- Only http and https URLs are followed (no file:, ftp: or data: tricks from a command), redirects
  included: a redirect elsewhere is refused, not followed.
- A transfer ends: ``timeout_s`` bounds each read, and each ``timeout_s`` window must bring at
  least ``MIN_BYTES_PER_WINDOW`` (a server dripping a byte every few seconds would otherwise hold
  the update in 'fetching' for days). A stalled transfer keeps its part file, like a broken one.
- Whatever a server answers (not HTTP, endless headers, a garbage Content-Length), the caller gets
  a ``FetchError`` naming the URL, never http.client's own exceptions.
- ``bytes`` in the result counts what came over the wire in this call, for the update report.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 16
MIN_BYTES_PER_WINDOW = 1024  # each timeout_s must bring this much, or the transfer is stalled
RESUMES = "it resumes on the next attempt"  # a file: its part file keeps what came
REFETCHED = "it is fetched again, whole, by the next update command"  # a manifest or signature: nothing kept
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class FetchError(RuntimeError):
    """A download that failed; ``retry`` says whether trying again may help (network) or not (hash)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Fetched:
    path: Path
    bytes: int  # fetched over the wire in this call
    resumed_from: int  # bytes already on disk when this call began (0: a fresh download)


def check_url(url: str) -> str:
    """``url`` if it is http(s) with a host, else ValueError naming it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r}: only http:// and https:// URLs are fetched")
    return url


def join_url(base: str, *parts: str) -> str:
    """``base`` + path parts, each quoted (a version or hash never turns into a query or ../)."""
    check_url(base)
    return base.rstrip("/") + "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp: as well; a redirect must stay on http(s) like the URL itself."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(newurl)
        except ValueError as e:
            raise FetchError(f"{req.full_url}: redirect refused, {e}", retry=False) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _open(url: str, req: urllib.request.Request, timeout_s: float) -> http.client.HTTPResponse:
    """``req`` opened, or FetchError naming ``url`` for anything but an HTTP error status (raised as is)."""
    try:
        return _OPENER.open(req, timeout=timeout_s)  # scheme checked by the caller and on each redirect
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{url}: {getattr(e, 'reason', e)}", retry=True) from None
    except http.client.HTTPException as e:  # not HTTP, a header line over 64 KiB, over 100 headers
        raise FetchError(f"{url}: the server's answer is not valid HTTP ({type(e).__name__}: "
                         f"{str(e)[:80]!r})", retry=True) from None


def _one_line(text: object) -> str:
    """The first line of a reason (urllib's redirect-loop reason spans two)."""
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


class _Pace:
    """The stall rule: at least MIN_BYTES_PER_WINDOW in every ``timeout_s`` window. ``then`` ends
    the message with what happens next, which differs: a file resumes from its part file, a
    small document (:func:`read_small`) is read into memory and fetched again whole."""

    def __init__(self, url: str, timeout_s: float, then: str = RESUMES) -> None:
        self.url, self.timeout_s, self.then = url, timeout_s, then
        self.since, self.got = time.monotonic(), 0

    def add(self, n: int, total: int) -> None:
        self.got += n
        if time.monotonic() - self.since >= self.timeout_s:
            if self.got < MIN_BYTES_PER_WINDOW:
                raise FetchError(f"{self.url}: transfer stalled after {total} bytes (under {MIN_BYTES_PER_WINDOW} "
                                 f"bytes in {self.timeout_s:g} s); {self.then}", retry=True)
            self.since, self.got = time.monotonic(), 0


def fetch(url: str, dest: Path, *, max_bytes: int, timeout_s: float, sha256: str | None = None) -> Fetched:
    """Download ``url`` to ``dest`` (see the module invariants). Raises FetchError."""
    check_url(url)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > max_bytes:
        part.unlink()
        have = 0
    req = urllib.request.Request(url, headers={"User-Agent": "camtrap-edge", "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = _open(url, req, timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our part is already whole (or longer than the file): start over
            part.unlink(missing_ok=True)
            return fetch(url, dest, max_bytes=max_bytes, timeout_s=timeout_s, sha256=sha256)
        raise FetchError(f"{url}: HTTP {e.code} {_one_line(e.reason)}", retry=e.code >= 500 or e.code == 429) from None
    with resp:
        start = 0
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                got_range = resp.headers.get("Content-Range")
                raise FetchError(f"{url}: the server answered a range request with {got_range!r}", retry=False)
            start = have
        length = resp.headers.get("Content-Length")
        if length is not None and not length.strip().isdigit():
            raise FetchError(f"{url}: the server sent Content-Length {length[:40]!r}, not a number", retry=True)
        if length is not None and start + int(length) > max_bytes:
            part.unlink(missing_ok=True)
            raise FetchError(f"{url}: {start + int(length)} bytes is more than the {max_bytes}-byte cap", retry=False)
        got = 0
        try:
            with open(part, "r+b" if start else "wb") as f:
                f.seek(start)
                f.truncate()
                pace = _Pace(url, timeout_s)
                while True:
                    block = resp.read1(CHUNK)  # what has come, not a full CHUNK: the pace is checked
                    if not block:
                        break
                    got += len(block)
                    if start + got > max_bytes:
                        f.close()
                        part.unlink(missing_ok=True)
                        raise FetchError(f"{url}: more than the {max_bytes}-byte cap; download stopped", retry=False)
                    f.write(block)
                    pace.add(len(block), start + got)  # a stall keeps what came (flushed as the file closes)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:  # a dropped link: the part file keeps what came
            raise FetchError(f"{url}: transfer broke after {start + got} bytes ({e}); {RESUMES}", retry=True) \
                from None
        if length is not None and got < int(length):
            raise FetchError(f"{url}: transfer broke after {start + got} of {start + int(length)} bytes; {RESUMES}",
                             retry=True)
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256:
            part.unlink(missing_ok=True)
            raise FetchError(f"{url}: sha256 mismatch (expected {sha256[:12]}..., got {digest[:12]}...)", retry=False)
    os.replace(part, dest)
    return Fetched(dest, got, start)


def _sha256(path: Path) -> str:
    from edge.hashing import sha256_file

    return sha256_file(path)


def fetch_with_retries(url: str, dest: Path, *, max_bytes: int, timeout_s: float, sha256: str | None = None,
                       attempts: int = 3, wait_s: float = 1.0) -> Fetched:
    """``fetch`` again after a retryable failure (each attempt resumes where the last one broke),
    waiting ``wait_s``, then twice that, and so on (capped at a minute) between attempts."""
    part = dest.with_name(dest.name + ".part")
    size = lambda: part.stat().st_size if part.exists() else 0  # noqa: E731
    total, first = 0, size()
    for i in range(attempts):
        before = size()
        try:
            r = fetch(url, dest, max_bytes=max_bytes, timeout_s=timeout_s, sha256=sha256)
        except FetchError as e:
            total += max(0, size() - before)
            if not e.retry or i == attempts - 1:
                raise
            time.sleep(min(wait_s * 2**i, 60.0))
            continue
        return Fetched(r.path, total + r.bytes, first)
    raise AssertionError("unreachable")


def read_small(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """A small document (a manifest, its signature) into memory, under a cap."""
    check_url(url)
    req = urllib.request.Request(url, headers={"User-Agent": "camtrap-edge"})
    try:
        with _open(url, req, timeout_s) as resp:
            pace, parts, size = _Pace(url, timeout_s, REFETCHED), [], 0
            while size <= max_bytes:
                block = resp.read1(CHUNK)
                if not block:
                    break
                parts.append(block)
                size += len(block)
                pace.add(len(block), size)
            data = b"".join(parts)
    except urllib.error.HTTPError as e:
        raise FetchError(f"{url}: HTTP {e.code} {_one_line(e.reason)}", retry=e.code >= 500) from None
    except (OSError, http.client.HTTPException) as e:  # the body broke off
        raise FetchError(f"{url}: transfer broke ({type(e).__name__}: {str(e)[:80]}); {REFETCHED}", retry=True) \
            from None
    if len(data) > max_bytes:
        raise FetchError(f"{url}: more than the {max_bytes}-byte cap", retry=False)
    return data

