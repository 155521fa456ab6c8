"""Freeing the card of empty frames, without ever losing an animal.

Split in two so the rules can be tested without files: :func:`plan_disposal` (pure) decides,
:func:`apply` acts. The caller (the daemon) must call them only after the frame's result is
committed to the ledger, and record the outcome afterwards; both steps are safe to redo after a
crash (see :func:`move_file`).

The rules, in the order they are checked (the first that matches decides):
1. the ledger commit failed (``committed=False``)       -> keep, ALARM (we could not redo it)
2. the frame is not empty                               -> keep
3. any model saw an animal scoring >= ``floor``         -> keep (cheap insurance: the cascade's
   thresholds decide "empty", the floor is a lower bar no disposed frame may cross; NaN keeps)
4. policy ``keep``                                      -> keep
5. free space below ``min_free_mb``                     -> wait, ALARM: nothing is done and
   nothing is recorded, so the frame stays pending (``done``, not disposed) and is disposed of
   when space returns (moving needs space on the target, and a full state disk means the ledger
   may not be able to record the disposal). Free space is the LOWEST of every filesystem
   involved: the frame's watch folder, the state folder (the ledger), and the move or audit
   target; see :func:`lowest_free_mb`.
6. in the audit sample (hash of the relative path < ``audit_rate``, so a restart or a redo
   picks the same frames)                               -> keep in place, or move to ``audit_dir``
7. policy ``move`` -> move to ``move_to`` keeping the relative path; ``delete`` -> delete.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.atomic import fsync_dir
from edge.hashing import sha256_file

log = logging.getLogger(__name__)

Policy = Literal["keep", "move", "delete"]
ActionKind = Literal["keep", "move", "delete", "wait"]  # wait: not now; the frame stays pending
PARTIAL_SUFFIX = ".camtrap-partial"


@dataclass(frozen=True)
class DisposalPolicy:
    """What to do with empty frames (the daemon builds it from the typed config)."""

    policy: Policy = "keep"
    move_to: Path | None = None
    audit_rate: float = 0.01
    audit_dir: Path | None = None  # None: audit frames stay where they are (and are marked)
    floor: float = 0.1
    min_free_mb: float = 500.0

    def __post_init__(self) -> None:
        if self.policy not in ("keep", "move", "delete"):
            raise ValueError(f"disposal policy must be keep, move or delete, got {self.policy!r}")
        if self.policy == "move" and self.move_to is None:
            raise ValueError("disposal policy 'move' needs move_to (a folder)")
        if not 0.0 <= self.audit_rate <= 1.0:
            raise ValueError(f"audit_rate must be in [0, 1], got {self.audit_rate}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}")
        if self.min_free_mb < 0:
            raise ValueError(f"min_free_mb must be >= 0, got {self.min_free_mb}")


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    dest_dir: Path | None = None  # root the relative path is re-created under (kind == "move")
    audit: bool = False  # kept (or moved to audit_dir) as part of the audit sample of empties
    alarm: bool = False  # disposal must stop: tell the operator (telemetry/alert + log)


@dataclass(frozen=True)
class Result:
    kind: ActionKind
    ok: bool
    path: Path
    dest: Path | None = None
    note: str = ""


def audit_fraction(rel_path: str) -> float:
    """A stable number in [0, 1) for a file: the audit sample survives restarts and redos."""
    digest = hashlib.sha256(os.fsencode(rel_path)).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def plan_disposal(
    policy: DisposalPolicy,
    *,
    rel_path: str,
    empty: bool,
    max_animal_score: float,
    committed: bool,
    disk_free_mb: float,
) -> Action:
    """Decide what to do with one frame (pure; see the module docstring for the rule order).

    ``max_animal_score``: the highest animal score ANY model gave the frame (global and every
    expert run), not just the winner's. ``disk_free_mb``: the lowest free space among the
    filesystems involved (watch folder, state folder, move/audit target); see
    :func:`lowest_free_mb`.
    """
    if not committed:
        return Action("keep", "ledger commit failed: not disposing until the result is recorded",
                      alarm=True)
    if not empty:
        return Action("keep", "not empty")
    if not (max_animal_score < policy.floor):  # also catches NaN
        return Action("keep", f"an animal scored {max_animal_score:.3f} >= floor {policy.floor}")
    if policy.policy == "keep":
        return Action("keep", "policy keep")
    if not (disk_free_mb >= policy.min_free_mb):
        return Action("wait", f"disk nearly full: {disk_free_mb:.0f} MB free < {policy.min_free_mb:.0f} MB; "
                      "disposal paused until space returns", alarm=True)
    if audit_fraction(rel_path) < policy.audit_rate:
        if policy.audit_dir is not None:
            return Action("move", "audit sample of empties", dest_dir=policy.audit_dir, audit=True)
        return Action("keep", "audit sample of empties", audit=True)
    if policy.policy == "move":
        return Action("move", "empty: moved", dest_dir=policy.move_to)
    return Action("delete", "empty: deleted")


def free_mb(path: str | os.PathLike) -> float:
    """Free space (MB) on the filesystem holding ``path`` (the nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 1e6


def lowest_free_mb(paths: Iterable[str | os.PathLike]) -> float:
    """The lowest free space (MB) among the filesystems holding ``paths``: the figure rule 5
    compares with ``min_free_mb`` (any of them full is reason enough to stop)."""
    return min((free_mb(p) for p in paths), default=float("inf"))


def apply(action: Action, path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Result:
    """Carry out ``action`` on ``path``. ``root`` is the watch folder: a move re-creates the
    path relative to it under ``action.dest_dir`` (default: just the file name).

    Safe to redo: a source that is already gone is reported ``ok`` with a note, since a crash
    between acting and recording the outcome leaves exactly that state.
    """
    src = Path(path)
    if action.kind in ("keep", "wait"):
        return Result(action.kind, True, src, note=action.reason)
    if action.kind == "delete":
        try:
            os.unlink(src)
        except FileNotFoundError:
            return Result("delete", True, src, note="already gone")
        except OSError as e:
            log.warning("disposal: cannot delete %s: %s", src, e)
            return Result("delete", False, src, note=f"cannot delete: {e.strerror or e}")
        fsync_dir(src.parent)
        return Result("delete", True, src, note=action.reason)
    if action.kind == "move":
        if action.dest_dir is None:
            raise ValueError(f"move action for {src} has no dest_dir")
        rel = Path(src.name)
        if root is not None:
            try:
                rel = src.relative_to(root)
            except ValueError:
                pass
        try:
            dest = move_file(src, Path(action.dest_dir) / rel)
        except FileNotFoundError:
            if src.exists():
                raise
            return Result("move", True, src, note="already gone")
        except OSError as e:
            log.warning("disposal: cannot move %s: %s", src, e)
            return Result("move", False, src, note=f"cannot move: {e.strerror or e}")
        return Result("move", True, src, dest=dest, note=action.reason)
    raise ValueError(f"unknown disposal action {action.kind!r}")


def move_file(src: Path, dest: Path, *, copy: bool | None = None) -> Path:
    """Move ``src`` to ``dest`` without ever overwriting (``name-1.jpg``, ``name-2.jpg``, ...)
    and without a crash window that loses the file. Returns where it landed.

    Same filesystem: one ``os.rename`` (atomic: after a crash the file is at the source or at
    the target, never both or neither). Across filesystems (``EXDEV``, or ``copy=True``): copy
    to ``.<name>.camtrap-partial`` beside the target, fsync it, rename it into place, fsync the
    directory, and only then unlink the source. A crash leaves at worst a partial temp file
    (hidden, so ingest ignores it; overwritten by the redo) or a complete copy next to a
    still-present source, which the redo recognises (same size and sha256) and just finishes by
    unlinking the source, so no ``-1`` duplicate appears. Assumes a single writer in the target
    folder (the check-then-rename has no O_EXCL on FAT-formatted cards).
    """
    st = os.stat(src)  # FileNotFoundError: the caller treats it as "already gone"
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = _existing_copy(src, st, dest)
    if done is not None:  # a previous, interrupted attempt got this far
        os.unlink(src)
        fsync_dir(src.parent)
        return done
    target = _free_name(dest)
    if not copy:
        try:
            os.rename(src, target)
            fsync_dir(target.parent)
            fsync_dir(src.parent)
            return target
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
    tmp = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, tmp)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    os.unlink(src)
    fsync_dir(src.parent)
    return target


def _candidates(dest: Path) -> Iterator[Path]:
    yield dest
    n = 1
    while True:
        yield dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
        n += 1


def _free_name(dest: Path) -> Path:
    for c in _candidates(dest):
        if not os.path.lexists(c):
            return c
    raise AssertionError("unreachable")


def _existing_copy(src: Path, st: os.stat_result, dest: Path) -> Path | None:
    """A target (dest, dest-1, ...) that already holds src's bytes, or None."""
    src_hash = None
    for c in _candidates(dest):
        try:
            cst = os.stat(c)
        except FileNotFoundError:
            return None
        if os.path.samestat(cst, st):
            return c
        if cst.st_size == st.st_size:
            if src_hash is None:
                src_hash = sha256_file(src)
            if sha256_file(c) == src_hash:
                return c
    raise AssertionError("unreachable: the candidate names never run out")
