"""`camtrap-export publish`: lay a signed bundle out for boxes to fetch over http(s), by content.

Layout of the published folder (serve it with any http server that honours Range requests,
e.g. nginx or caddy; or ``--serve`` for a small one)::

    manifests/<version>.json   the bundle's manifest.json, byte for byte
    manifests/<version>.sig    its Ed25519 signature
    files/<sha256>             every model and sample file, named by its hash
    index.json                 versions published so far (for people and fleet tools)

A box fetches the manifest and signature first, then only the files whose sha256 it does not
hold: a bundle that changes one expert costs one file. Published versions are immutable:
publishing a version again with other bytes is refused (a box may already hold the first).
Files are written under a temporary name and renamed, so a server never hands out half a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge.atomic import atomic_write_bytes
from edge.bundle import MANIFEST, SIGNATURE, verify_dir
from edge.updates import file_path, manifest_path, valid_version
from edge.updates_store import bundle_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    version: str
    manifest_sha256: str
    files: int  # in the bundle
    new_files: int  # copied now (the others were already published)
    new_bytes: int
    bundle_bytes: int


def _copy_in(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name[:12]}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(bundle_dir: Path, out: Path, *, sign_key: Path | None = None,
            public_keys: list[Path] | None = None) -> Published:
    """Check the bundle, sign it if a key is given, and add it to ``out`` (see the module doc)."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    data = (bundle_dir / MANIFEST).read_bytes() if (bundle_dir / MANIFEST).is_file() else None
    if data is None:
        raise FileNotFoundError(f"{bundle_dir}: no {MANIFEST} (is this a bundle folder?)")
    if sign_key is not None:
        from edge.signing import public_pem_of, sign

        key_pem = Path(sign_key).read_bytes()
        sig = sign(data, key_pem)
        keys: list = [public_pem_of(key_pem)]
    else:
        if not (bundle_dir / SIGNATURE).is_file():
            raise ValueError(f"{bundle_dir}: unsigned bundle; boxes refuse it (give --sign KEY)")
        sig = (bundle_dir / SIGNATURE).read_bytes()
        keys = list(public_keys or [])
    # every file's sha256, and the bundle's own signature unless --sign replaces it (a bundle the
    # builder signed with another key may be re-signed by the publisher)
    bundle = verify_dir(bundle_dir, public_keys=None if sign_key is not None else keys or None)
    if keys:
        from edge.signing import verify

        verify(data, sig, keys)
    version = bundle.version
    if not valid_version(version):
        raise ValueError(f"{bundle_dir}: bundle version {version!r} cannot be published (letters, digits, . _ + -)")
    man_path = out.joinpath(*manifest_path(version))
    if man_path.is_file() and man_path.read_bytes() != data:
        raise ValueError(f"{man_path}: version {version} is already published with other contents; versions are "
                         "immutable (bump the bundle version)")
    new_files = new_bytes = total = 0
    entries = bundle_files(bundle.manifest)
    for sha, rel in {sha: rel for rel, sha in entries}.items():  # each file once
        size = (bundle_dir / rel).stat().st_size
        total += size
        dest = out.joinpath(*file_path(sha))
        if dest.is_file() and dest.stat().st_size == size:
            continue
        _copy_in(bundle_dir / rel, dest)
        new_files += 1
        new_bytes += size
    # the signature before the manifest: a box that sees the manifest finds its signature
    sig_path = man_path.with_suffix(".sig")
    for path, blob in ((sig_path, sig), (man_path, data)):
        atomic_write_bytes(path, blob)
        path.chmod(0o644)  # an http server runs as another user
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"versions": {}}
    index["versions"][version] = {"manifest_sha256": bundle.manifest_sha256, "files": len(entries),
                                  "bytes": total, "created": bundle.manifest.created}
    atomic_write_bytes(index_path, json.dumps(index, indent=1, sort_keys=True).encode())
    index_path.chmod(0o644)
    return Published(version, bundle.manifest_sha256, len(entries), new_files, new_bytes, total)


# --- a small http server that honours Range (resumable downloads) ---------------------------------

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single ``Range: bytes=a-[b]`` requests (206 / 416), which the
    stdlib server lacks and a box needs to resume a broken download."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_head(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        m = _RANGE.match(rng or "")
        if not m or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or end < start:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")  # closed by the caller, as in the stdlib
        f.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            block = source.read(min(1 << 16, remaining))
            if not block:
                break
            outputfile.write(block)
            remaining -= len(block)
        self._remaining = None


def serve(folder: Path, host: str, port: int) -> ThreadingHTTPServer:
    """A threaded server for ``folder`` (call ``serve_forever``; ``shutdown`` to stop)."""
    handler = lambda *a, **k: RangeRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
    return ThreadingHTTPServer((host, port), handler)


# --- CLI --------------------------------------------------------------------------------------------


def _cmd_publish(args: argparse.Namespace) -> int:
    from export.update import host_port

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    if args.serve:
        host_port(args.serve, option="--serve")  # before publishing anything
    for b in args.bundle:
        p = publish(Path(b), out, sign_key=Path(args.sign) if args.sign else None,
                    public_keys=[Path(k) for k in args.public_key or []])
        print(f"published {p.version} ({p.manifest_sha256[:12]}): {p.files} files, {p.new_files} new "
              f"({p.new_bytes / 1e6:.2f} of {p.bundle_bytes / 1e6:.2f} MB) in {out}")
    if args.serve:
        host, port = host_port(args.serve, option="--serve")
        host = host or "127.0.0.1"
        try:
            server = serve(out, host, port)
        except OSError as e:  # in use, not ours to bind
            raise ValueError(f"--serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
        print(f"serving {out} on http://{host or '127.0.0.1'}:{port}/ (Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("publish", help="lay signed bundles out by content for boxes to fetch over http(s)")
    p.add_argument("bundle", nargs="+", help="bundle folder(s)")
    p.add_argument("--out", required=True, help="folder an http server serves (created)")
    p.add_argument("--sign", help="Ed25519 private key (PEM): sign the manifest now")
    p.add_argument("--public-key", action="append", help="check the bundle's own signature with this key")
    p.add_argument("--serve", metavar="HOST:PORT", help="then serve the folder (with Range support)")
    p.set_defaults(func=_cmd_publish)
