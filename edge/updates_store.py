"""The box's model store: content-addressed files, bundles assembled from them, and the
``current``/``previous`` switch.

Layout under ``<state_dir>/models/``::

    files/<sha256><suffix>        every model and sample file once, read-only, named by its hash
    bundles/<manifest sha256>/    manifest.json, manifest.sig, and the bundle's files as hard
                                  links into files/ (a copy where links are not possible)
    current  -> bundles/<sha>     what the daemon loads (the config's default bundle.path)
    previous -> bundles/<sha>     what a rollback returns to

Why content-addressed: bundles that share files share them on disk, and an update whose only
change is one expert needs one download (``missing``). Why hard links: edge/bundle.py refuses
symlinks inside a bundle, and a link costs no space.

Invariants:
- A bundle folder appears whole or not at all (built under a temporary name, fsync'd, renamed).
- ``current`` and ``previous`` change by ``rename`` of a fresh symlink over the old one, then a
  fsync of the folder: a power cut leaves the old target or the new one, never none or a mix.
- ``switch`` moves ``previous`` first, then ``current``; a crash between the two leaves both
  pointing at the old bundle, which is consistent (the update is redone or reported failed).
- ``prune`` never removes what ``current`` or ``previous`` points to, nor a file they use.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edge.atomic import fsync_dir
from edge.manifest import Manifest

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CURRENT = "current"
PREVIOUS = "previous"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_PLAN = re.compile(r"^([0-9a-f]{12})-.+\.(plan|json)$")  # edge/engines/trt_cache.py's plan names


class StoreError(ValueError):
    """The store cannot do what was asked; the message names the file or the version."""


def bundle_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(path inside the bundle, sha256) of every model and sample; samples must carry a hash,
    since a file that cannot be checked must not come over the air."""
    out = [(rel, sha) for rel, sha, _ in manifest.model_files()]
    for s in manifest.samples:
        if not s.sha256:
            raise StoreError(f"sample {s.file}: no sha256 in the manifest; rebuild the bundle with a current "
                             "camtrap-export so that every file can be verified")
        out.append((s.file, s.sha256))
    for rel, _ in out:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or "\\" in rel or rel != p.as_posix() or rel in (MANIFEST, SIGNATURE):
            raise StoreError(f"{rel}: a bundle file must be a plain relative path inside the bundle")
    return out


@dataclass(frozen=True)
class Kept:
    """A bundle held by the store."""

    sha256: str  # of manifest.json: the bundle's identity
    version: str
    path: Path
    current: bool
    previous: bool


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.bundles = self.root / "bundles"

    # -- files ------------------------------------------------------------------------------
    def file_path(self, sha256: str, name: str) -> Path:
        if not _SHA.match(sha256):
            raise StoreError(f"{sha256!r}: not a sha256")
        return self.files / f"{sha256}{PurePosixPath(name).suffix.lower()}"

    def has(self, sha256: str, name: str) -> bool:
        return self.file_path(sha256, name).is_file()

    def missing(self, manifest: Manifest) -> list[tuple[str, str]]:
        """The bundle's files this box does not hold yet (each sha once)."""
        seen: set[str] = set()
        out = []
        for rel, sha in bundle_files(manifest):
            if sha not in seen and not self.has(sha, rel):
                out.append((rel, sha))
            seen.add(sha)
        return out

    def add_file(self, src: Path, sha256: str, name: str) -> Path:
        """Move a verified file (already named by its hash's check) into files/, read-only."""
        dest = self.file_path(sha256, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o444)
        os.replace(src, dest)
        fsync_dir(dest.parent)
        return dest

    def import_file(self, src: Path, sha256: str, name: str) -> Path:
        """Copy a local file (an already installed bundle's) into files/ if not there."""
        dest = self.file_path(sha256, name)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".import-")
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        return self.add_file(Path(tmp), sha256, name)

    # -- bundles ----------------------------------------------------------------------------
    def assemble(self, manifest_bytes: bytes, signature: bytes | None) -> Path:
        """bundles/<sha256 of manifest>/ from files/; every file must be held. Idempotent."""
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        final = self.bundles / digest
        if (final / MANIFEST).is_file():
            return final
        manifest = Manifest.from_bytes(manifest_bytes, source=f"bundle {digest[:12]}")
        self.bundles.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=self.bundles))
        try:
            for rel, sha in bundle_files(manifest):
                src = self.file_path(sha, rel)
                if not src.is_file():
                    raise StoreError(f"{rel}: file {sha[:12]}... is not in the store")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dest)
                except OSError:  # another filesystem or no hard links: a copy
                    shutil.copyfile(src, dest)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            if signature is not None:
                (tmp / SIGNATURE).write_bytes(signature)
            for p in (tmp / MANIFEST, *([tmp / SIGNATURE] if signature is not None else [])):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            for d in {tmp, *(p.parent for p in tmp.rglob("*") if p.is_file())}:
                fsync_dir(d)
            tmp.chmod(0o755)
            os.rename(tmp, final)
            fsync_dir(self.bundles)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def import_bundle(self, folder: Path) -> Path:
        """Take a verified bundle folder (the first install, an unpacked archive) into the store."""
        data = (folder / MANIFEST).read_bytes()
        manifest = Manifest.from_bytes(data, source=str(folder / MANIFEST))
        for rel, sha in bundle_files(manifest):
            self.import_file(folder / rel, sha, rel)
        sig = folder / SIGNATURE
        return self.assemble(data, sig.read_bytes() if sig.is_file() else None)

    def manifest_of(self, bundle: Path) -> Manifest:
        return Manifest.from_bytes((bundle / MANIFEST).read_bytes(), source=str(bundle / MANIFEST))

    # -- the switch -------------------------------------------------------------------------
    def _link(self, name: str) -> Path | None:
        p = self.root / name
        if not p.is_symlink():
            return None
        target = p.resolve()
        return target if (target / MANIFEST).is_file() else None

    def current(self) -> Path | None:
        return self._link(CURRENT)

    def previous(self) -> Path | None:
        return self._link(PREVIOUS)

    def _point(self, name: str, target: Path) -> None:
        """Atomically make ``root/name`` a relative symlink to ``target`` (a bundles/ folder)."""
        rel = os.path.relpath(target, self.root)
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(rel, tmp)
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)

    def switch(self, target: Path) -> None:
        """previous := current; current := target (each an atomic flip; see the invariants)."""
        cur = self.current()
        if cur is not None and cur != target.resolve():
            self._point(PREVIOUS, cur)
        self._point(CURRENT, target)

    def activate(self, target: Path) -> None:
        """current := target, leaving previous alone (a rollback or a first install)."""
        self._point(CURRENT, target)

    def kept(self) -> list[Kept]:
        cur, prev = self.current(), self.previous()
        out = []
        for d in sorted(self.bundles.glob("*")) if self.bundles.is_dir() else []:
            if not _SHA.match(d.name) or not (d / MANIFEST).is_file():
                continue
            try:
                version = self.manifest_of(d).bundle_version
            except ValueError:
                continue
            out.append(Kept(d.name, version, d, d == cur, d == prev))
        return out

    def find_version(self, version: str) -> Kept | None:
        return next((k for k in self.kept() if k.version == version), None)

    # -- pruning ----------------------------------------------------------------------------
    def prune(self, engines_dir: Path | None = None) -> list[str]:
        """Remove bundles other than current and previous, files none of those use, unfinished
        temporary folders, and cached engines (TensorRT plans) of models no kept bundle has.
        Returns what was removed (names), for the log."""
        keep = {p for p in (self.current(), self.previous()) if p is not None}
        if not keep:
            return []  # nothing is known to be in use: never empty the store
        removed: list[str] = []
        used: set[str] = set()
        for b in keep:
            used.update(sha for _, sha in bundle_files(self.manifest_of(b)))
        for d in list(self.bundles.glob("*")) if self.bundles.is_dir() else []:
            if d.resolve() not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"bundles/{d.name}")
        for f in list(self.files.iterdir()) if self.files.is_dir() else []:
            sha = f.name[:64]
            if sha not in used and not f.name.endswith(".part"):
                f.unlink(missing_ok=True)
                removed.append(f"files/{f.name}")
        if engines_dir is not None and Path(engines_dir).is_dir():
            short = {s[:12] for s in used}
            for f in Path(engines_dir).iterdir():
                m = _PLAN.match(f.name)
                if m and m.group(1) not in short:
                    f.unlink(missing_ok=True)
                    removed.append(f"engines/{f.name}")
        for d in (self.root, self.files, self.bundles):
            if d.is_dir():
                fsync_dir(d)
        return removed
