"""Load a model bundle safely: unpack, check the signature and every file's sha256.

A bundle (layout in edge/manifest.py) is immutable and content-addressed: its identity is
the sha256 of manifest.json, which lists the sha256 of every model (and sample, where the
manifest records one). An archive is unpacked into ``<extract_to>/<manifest sha256>/``, so a
remote update can stage a new bundle beside the running one and switch by name; loading
only reads. Everything a bundle contains is checked before anything uses it, and every
refusal is one line naming the bundle and the file or field.

No pickle, ever: files with pickle-format suffixes (.pt, .pkl, ...) make the bundle invalid,
and models must be .onnx.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from edge.hashing import sha256_file
from edge.manifest import Manifest, ModelEntry, SampleEntry
from edge.signing import KeySource, SignatureError, verify

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt"})
MAX_MEMBER_BYTES = 2 << 30  # one file; the largest YOLO ONNX models are a few hundred MB
MAX_TOTAL_BYTES = 8 << 30
MAX_MEMBERS = 10_000


class BundleError(ValueError):
    """A bundle that must not be used; the message names the bundle and the file or field."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Treat ``root`` as read-only."""

    root: Path
    manifest: Manifest
    manifest_sha256: str  # the bundle's identity
    key_id: str | None  # id of the key whose signature was verified; None when unverified
    source: Path  # what was loaded: the folder or the archive

    @property
    def version(self) -> str:
        return self.manifest.bundle_version

    def model_entry(self, name: str) -> ModelEntry:
        for m in self.manifest.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.manifest.models)
        raise BundleError(f"{self.source}: no model named {name!r} (models: {known})")

    def model_path(self, name: str) -> Path:
        return self.root / self.model_entry(name).file

    def sample_path(self, sample: SampleEntry) -> Path:
        return self.root / sample.file

    def sample_paths(self) -> list[Path]:
        return [self.sample_path(s) for s in self.manifest.samples]


def load_bundle(path: str | Path, *, public_keys: Iterable[KeySource] | None = None,
                require_signature: bool = False, extract_to: str | Path | None = None) -> Bundle:
    """Verify and return the bundle at ``path`` (a folder, or a .tar / .tar.gz of one).

    ``public_keys``: trusted Ed25519 public keys (PEM bytes/str, or Paths to PEM files). With
    keys, a present signature must verify; ``require_signature`` also refuses unsigned bundles.
    ``extract_to``: parent folder for unpacked archives (default: a new temporary folder).
    """
    src = Path(path)
    if src.is_dir():
        root = src
    elif src.is_file():
        parent = Path(extract_to) if extract_to else Path(tempfile.mkdtemp(prefix="camtrap-bundle-"))
        root = unpack_archive(src, parent)
    else:
        raise FileNotFoundError(f"{src}: no such bundle (expected a folder or a .tar/.tar.gz)")
    return verify_dir(root, source=src, public_keys=public_keys, require_signature=require_signature)


# --- folder checks ------------------------------------------------------------------------------


def _inside(root: Path, rel: str, source: Path, what: str) -> Path:
    """``root/rel`` as a regular file that really lies inside ``root`` (no symlink games)."""
    p = root / rel
    if p.is_symlink():
        raise BundleError(f"{source}: {rel}: {what} is a symlink; bundles hold plain files only")
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"{source}: {rel}: {what} lies outside the bundle") from None
    if not p.is_file():
        raise BundleError(f"{source}: {rel}: {what} is missing")
    return p


def _scan_tree(root: Path, source: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise BundleError(f"{source}: {rel}: symlinks are not allowed in a bundle")
            if p.suffix.lower() in PICKLE_SUFFIXES:
                raise BundleError(f"{source}: {rel}: pickle-format files are refused (export models to ONNX)")


def one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "manifest"
        parts.append(f"{loc}: {err.get('msg', '')}")
    more = f" (+{len(e.errors()) - 3} more)" if len(e.errors()) > 3 else ""
    return "; ".join(parts) + more


def _check_signature(root: Path, data: bytes, source: Path, public_keys: list[KeySource],
                     require_signature: bool) -> str | None:
    sig_path = root / SIGNATURE
    if require_signature and not public_keys:
        raise BundleError(f"{source}: a signature is required but no trusted public keys are configured")
    if not public_keys:
        if sig_path.exists():
            log.info("%s: signature present but not checked (no trusted keys configured)", source)
        return None
    if not sig_path.exists():
        if require_signature:
            raise BundleError(f"{source}: {SIGNATURE} is missing and a signed bundle is required")
        log.warning("%s: unsigned bundle accepted (require_signature is off)", source)
        return None
    sig = _inside(root, SIGNATURE, source, "signature").read_bytes()
    try:
        return verify(data, sig, public_keys)
    except SignatureError as e:
        raise BundleError(f"{source}: {MANIFEST}: {e}") from None


def verify_dir(root: Path, *, source: Path | None = None, public_keys: Iterable[KeySource] | None = None,
               require_signature: bool = False) -> Bundle:
    """Check an unpacked bundle folder: signature, schema, sha256 of models and samples."""
    source = source or root
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(f"{source}: no {MANIFEST} (is this a model bundle?)")
    _scan_tree(root, source)
    data = _inside(root, MANIFEST, source, "manifest").read_bytes()
    key = _check_signature(root, data, source, list(public_keys or []), require_signature)
    try:
        manifest = Manifest.from_bytes(data, source=f"{source}/{MANIFEST}")
    except ValidationError as e:
        raise BundleError(f"{source}: {MANIFEST}: {one_line(e)}") from None
    except ValueError as e:  # not JSON: the message already names the file
        raise BundleError(str(e)) from None
    for rel, sha, what in manifest.model_files():
        if PurePosixPath(rel).suffix.lower() != ".onnx":
            raise BundleError(f"{source}: {rel}: {what} must be an .onnx file")
        _check_sha(_inside(root, rel, source, what), rel, sha, source)
    for s in manifest.samples:
        p = _inside(root, s.file, source, "sample")
        expected = getattr(s, "sha256", None)  # recorded by manifests that carry sample hashes
        if expected:
            _check_sha(p, s.file, expected, source)
    return Bundle(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(data).hexdigest(),
                  key_id=key, source=source)


def _check_sha(path: Path, rel: str, expected: str, source: Path) -> None:
    got = sha256_file(path)
    if got != expected:
        raise BundleError(
            f"{source}: {rel}: sha256 mismatch (manifest {expected[:12]}..., file {got[:12]}...); "
            "the bundle is corrupt or was altered"
        )


# --- archives -----------------------------------------------------------------------------------


def _member_path(m: tarfile.TarInfo, source: Path) -> PurePosixPath:
    name = m.name
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{source}: {name}: absolute or non-POSIX path in archive")
    p = PurePosixPath(name)
    if ".." in p.parts:
        raise BundleError(f"{source}: {name}: path escapes the bundle ('..')")
    parts = [x for x in p.parts if x not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_member(m: tarfile.TarInfo, rel: PurePosixPath, source: Path, dest: Path) -> None:
    if m.issym() or m.islnk():
        raise BundleError(f"{source}: {m.name}: links are not allowed in a bundle")
    if not (m.isreg() or m.isdir()):
        raise BundleError(f"{source}: {m.name}: only regular files and folders are allowed (device/fifo?)")
    if m.isreg() and m.size > MAX_MEMBER_BYTES:
        raise BundleError(f"{source}: {m.name}: {m.size} bytes is larger than the {MAX_MEMBER_BYTES} limit")
    if rel.suffix.lower() in PICKLE_SUFFIXES:
        raise BundleError(f"{source}: {m.name}: pickle-format files are refused (export models to ONNX)")
    data_filter = getattr(tarfile, "data_filter", None)  # Python 3.12, 3.11.4+, 3.10.12+
    if data_filter is not None:
        try:
            data_filter(m, str(dest))
        except tarfile.TarError as e:
            raise BundleError(f"{source}: {m.name}: refused by tarfile's data filter ({e})") from None


def unpack_archive(archive: Path, parent: Path) -> Path:
    """Safely unpack ``archive`` into ``parent/<sha256 of its manifest.json>``; return that folder.

    Every member is checked before anything is written; files are copied by hand (never
    ``extractall``) so the checks above are the only way in. An existing folder for the same
    manifest is reused: same manifest, same bundle.
    """
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{archive}: not a readable tar archive ({e})") from None
    with tar:
        members = tar.getmembers()
        if len(members) > MAX_MEMBERS:
            raise BundleError(f"{archive}: {len(members)} members, more than {MAX_MEMBERS}")
        rels = [_member_path(m, archive) for m in members]
        names = {r.as_posix() for r, m in zip(rels, members, strict=True) if m.isreg()}
        tops = {r.parts[0] for r in rels if r.parts and r.as_posix() != "."}
        if MANIFEST in names:
            prefix: tuple[str, ...] = ()
        elif len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
            prefix = (next(iter(tops)),)
        else:
            raise BundleError(f"{archive}: no {MANIFEST} at the top of the archive (or in its one folder)")
        total = 0
        for m, r in zip(members, rels, strict=True):
            _check_member(m, r, archive, parent)
            total += m.size if m.isreg() else 0
        if total > MAX_TOTAL_BYTES:
            raise BundleError(f"{archive}: {total} bytes unpacked, more than the {MAX_TOTAL_BYTES} limit")
        man_member = members[[r.as_posix() for r in rels].index("/".join((*prefix, MANIFEST)))]
        fobj = tar.extractfile(man_member)
        assert fobj is not None
        digest = hashlib.sha256(fobj.read()).hexdigest()
        parent.mkdir(parents=True, exist_ok=True)
        final = parent / digest
        if (final / MANIFEST).is_file() and sha256_file(final / MANIFEST) == digest:
            return final  # already unpacked; verify_dir re-checks every file
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=parent))
        tmp.chmod(0o755)
        try:
            for m, r in zip(members, rels, strict=True):
                if not m.isreg():
                    continue
                if r.parts[: len(prefix)] != prefix:
                    raise BundleError(f"{archive}: {m.name}: outside the bundle's folder")
                dest = tmp.joinpath(*r.parts[len(prefix):])
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with open(dest, "xb") as out:  # "x": never through an existing path
                    shutil.copyfileobj(src, out, 1 << 20)
                    copied = out.tell()
                if copied != m.size:
                    raise BundleError(f"{archive}: {m.name}: truncated member")
                dest.chmod(0o444)
            try:
                tmp.rename(final)
            except OSError:  # another process unpacked the same bundle first
                if not (final / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a bundle folder, a manifest.json or a bundle archive, read without
    unpacking or verifying anything: for naming things (decode, records), never for running
    models (that is :func:`load_bundle`)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{path}: no bundle (a folder with {MANIFEST}, a {MANIFEST}, or a .tar)")
    if tarfile.is_tarfile(p):
        with tarfile.open(p) as tar:
            member = next((m for m in tar.getmembers()
                           if m.isfile() and m.name.lstrip("./") == MANIFEST), None)
            f = tar.extractfile(member) if member is not None else None
            if f is None:
                raise BundleError(f"{path}: no {MANIFEST} in the archive")
            data = f.read(MAX_MEMBER_BYTES)
    else:
        data = p.read_bytes()
    try:
        return Manifest.from_bytes(data, source=str(p))
    except ValidationError as e:
        raise BundleError(f"{p}: {one_line(e)}") from None
