"""edge.disposal: every rule of the plan, and real moves/deletes (including crash leftovers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.disposal import (
    PARTIAL_SUFFIX,
    Action,
    DisposalPolicy,
    apply,
    audit_fraction,
    free_mb,
    lowest_free_mb,
    move_file,
    plan_disposal,
)

MOVE = DisposalPolicy(policy="move", move_to=Path("/srv/empties"), audit_rate=0.0, floor=0.2, min_free_mb=100)
DELETE = DisposalPolicy(policy="delete", audit_rate=0.0, floor=0.2, min_free_mb=100)


def plan(policy=DELETE, **kw):
    args = {"rel_path": "cam1/IMG_0001.JPG", "empty": True, "max_animal_score": 0.05, "committed": True,
            "disk_free_mb": 5000.0}
    args.update(kw)
    return plan_disposal(policy, **args)


def test_plan_rules_in_order():
    assert plan() == Action("delete", "empty: deleted")
    mv = plan(MOVE)
    assert mv.kind == "move" and mv.dest_dir == Path("/srv/empties") and not mv.alarm
    # 1. uncommitted result: never dispose, alarm (even for an animal frame or a keep policy)
    for p in (DELETE, MOVE, DisposalPolicy()):
        a = plan(p, committed=False)
        assert a.kind == "keep" and a.alarm and "ledger" in a.reason
    # 2. not empty
    assert plan(empty=False).kind == "keep" and not plan(empty=False).alarm
    # 3. some model saw an animal at or above the floor (any model: the caller passes the max)
    for s in (0.2, 0.95, float("nan")):
        a = plan(max_animal_score=s)
        assert a.kind == "keep" and not a.alarm, s
    assert plan(max_animal_score=0.1999).kind == "delete"
    # 4. policy keep
    keep = plan(DisposalPolicy(policy="keep", audit_rate=0.0))
    assert keep.kind == "keep" and keep.reason == "policy keep"
    # 5. disk nearly full: wait (the frame stays pending, disposed of when space returns), alarm
    for p in (DELETE, MOVE):
        a = plan(p, disk_free_mb=99.0)
        assert a.kind == "wait" and a.alarm and "disk" in a.reason
        assert apply(a, "/nonexistent/x.jpg").kind == "wait"  # nothing done, nothing to record
    assert plan(disk_free_mb=100.0).kind == "delete"
    assert plan(disk_free_mb=float("nan")).alarm


def test_audit_sample_is_deterministic_and_near_rate():
    pol = DisposalPolicy(policy="delete", audit_rate=0.01)
    names = [f"cam{i % 7}/IMG_{i:05d}.JPG" for i in range(20000)]
    audited = [n for n in names if plan(pol, rel_path=n).audit]
    assert 0.007 * len(names) < len(audited) < 0.013 * len(names)
    assert audited == [n for n in names if plan(pol, rel_path=n).audit]  # same answer on a redo
    a = plan(pol, rel_path=audited[0])
    assert a.kind == "keep" and a.audit
    to_dir = plan(DisposalPolicy(policy="delete", audit_rate=0.01, audit_dir=Path("/a")), rel_path=audited[0])
    assert to_dir.kind == "move" and to_dir.dest_dir == Path("/a") and to_dir.audit
    assert all(0.0 <= audit_fraction(n) < 1.0 for n in names[:100])
    assert plan(DisposalPolicy(policy="delete", audit_rate=1.0)).audit
    # the audit never overrides an animal, a failed commit or a full disk
    assert not plan(pol, rel_path=audited[0], max_animal_score=0.5).audit


def test_policy_validation():
    with pytest.raises(ValueError, match="move_to"):
        DisposalPolicy(policy="move")
    with pytest.raises(ValueError, match="keep, move or delete"):
        DisposalPolicy(policy="shred")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="audit_rate"):
        DisposalPolicy(audit_rate=1.5)
    with pytest.raises(ValueError, match="floor"):
        DisposalPolicy(floor=-0.1)


def _frame(root: Path, rel: str, data: bytes = b"\xff\xd8 empty frame \xff\xd9") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_apply_delete_and_redo(tmp_path):
    p = _frame(tmp_path, "cam/IMG_1.JPG")
    r = apply(Action("delete", "empty"), p)
    assert r.ok and not p.exists()
    r2 = apply(Action("delete", "empty"), p)  # redo after a crash before the ledger said so
    assert r2.ok and r2.note == "already gone"


def test_apply_keep_touches_nothing(tmp_path):
    p = _frame(tmp_path, "IMG.JPG")
    assert apply(Action("keep", "policy keep"), p).ok and p.exists()


def test_apply_move_keeps_relative_path_and_never_overwrites(tmp_path):
    root, dest = tmp_path / "watch", tmp_path / "empties"
    a = Action("move", "empty", dest_dir=dest)
    p1 = _frame(root, "cam 7/2021/IMG_1.JPG", b"first")
    r1 = apply(a, p1, root=root)
    assert r1.ok and r1.dest == dest / "cam 7/2021/IMG_1.JPG" and r1.dest.read_bytes() == b"first"
    assert not p1.exists()
    p2 = _frame(root, "cam 7/2021/IMG_1.JPG", b"second, a different frame under the same name")
    r2 = apply(a, p2, root=root)
    assert r2.dest == dest / "cam 7/2021/IMG_1-1.JPG"
    assert r1.dest.read_bytes() == b"first" and r2.dest.read_bytes().startswith(b"second")
    p3 = _frame(root, "cam 7/2021/IMG_1.JPG", b"third")
    assert apply(a, p3, root=root).dest == dest / "cam 7/2021/IMG_1-2.JPG"
    assert apply(a, p3, root=root).note == "already gone"
    p4 = _frame(tmp_path / "elsewhere", "x.jpg")
    assert apply(a, p4, root=root).dest == dest / "x.jpg"  # not under root: name only


def _other_filesystem(tmp_path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        return shm
    return None


def test_move_across_filesystems(tmp_path):
    """EXDEV path: copy + fsync + rename + unlink. Forced with copy=True where no second fs exists."""
    other = _other_filesystem(tmp_path)
    src = _frame(tmp_path / "watch", "cam/IMG_9.JPG", os.urandom(300_000))
    data = src.read_bytes()
    if other is not None:
        import tempfile

        with tempfile.TemporaryDirectory(dir=other) as d:
            out = move_file(src, Path(d) / "cam/IMG_9.JPG")
            assert out.read_bytes() == data and not src.exists()
            assert not list(Path(d).rglob(f"*{PARTIAL_SUFFIX}"))
    else:
        out = move_file(src, tmp_path / "empties/cam/IMG_9.JPG", copy=True)
        assert out.read_bytes() == data and not src.exists()


def test_move_redo_after_crash_with_complete_copy(tmp_path):
    """Crash after the copy landed but before the source was unlinked: the redo must not make a
    '-1' duplicate; it recognises the copy and only unlinks the source."""
    src = _frame(tmp_path / "watch", "IMG_5.JPG", b"frame five" * 1000)
    dest = tmp_path / "empties" / "IMG_5.JPG"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(src.read_bytes())  # state the crash left behind
    for copy in (False, True):
        if not src.exists():
            src = _frame(tmp_path / "watch", "IMG_5.JPG", b"frame five" * 1000)
        out = move_file(src, dest, copy=copy)
        assert out == dest and not src.exists()
        assert sorted(p.name for p in dest.parent.iterdir()) == ["IMG_5.JPG"]


def test_move_redo_after_crash_mid_copy(tmp_path):
    """Crash while copying: a partial hidden temp file and the source remain; the redo finishes."""
    src = _frame(tmp_path / "watch", "IMG_6.JPG", b"frame six" * 5000)
    dest = tmp_path / "empties" / "IMG_6.JPG"
    dest.parent.mkdir(parents=True)
    partial = dest.with_name(f".IMG_6.JPG{PARTIAL_SUFFIX}")
    partial.write_bytes(b"frame six" * 100)  # half-written copy
    out = move_file(src, dest, copy=True)
    assert out == dest and dest.read_bytes() == b"frame six" * 5000 and not src.exists()
    assert not partial.exists()


def test_move_failure_reported_not_raised(tmp_path):
    src = _frame(tmp_path / "watch", "IMG_7.JPG")
    blocker = tmp_path / "empties"
    blocker.write_bytes(b"a file where the folder should be")
    r = apply(Action("move", "empty", dest_dir=blocker), src, root=tmp_path / "watch")
    assert not r.ok and "cannot move" in r.note and src.exists()


def test_free_mb(tmp_path):
    assert free_mb(tmp_path) > 0
    assert free_mb(tmp_path / "not" / "yet" / "made") == pytest.approx(free_mb(tmp_path), rel=0.01)


def test_lowest_free_mb_is_the_fullest_filesystem(tmp_path):
    """Rule 5 compares the lowest free space of every filesystem involved (a small tmpfs as
    the full one where the test may mount it; else /dev/shm, another filesystem on Linux)."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = os.geteuid() == 0 and os.system(f"mount -t tmpfs -o size=4m tmpfs {small} 2>/dev/null") == 0
    try:
        other = small if mounted else Path("/dev/shm")
        if not other.is_dir():
            pytest.skip("no second filesystem to compare with")
        low = lowest_free_mb([tmp_path, other, tmp_path / "not-made-yet"])
        assert low == pytest.approx(min(free_mb(tmp_path), free_mb(other)), rel=0.01)
        if mounted:
            assert low <= 4.2
        assert lowest_free_mb([]) == float("inf")
    finally:
        if mounted:
            os.system(f"umount {small}")


@pytest.mark.parametrize("copy", [False, True])
def test_moved_and_audit_copies_keep_the_camera_files_mode(tmp_path, copy):
    """The daemon runs with umask 027; a moved or copied frame keeps the mode the camera (or
    the FTP server) gave it, it does not take the daemon's."""
    src = tmp_path / "in" / "IMG_1.JPG"
    src.parent.mkdir()
    src.write_bytes(b"\xff\xd8 jpeg \xff\xd9")
    os.chmod(src, 0o664)
    old = os.umask(0o077)
    try:
        dest = move_file(src, tmp_path / "audit" / "IMG_1.JPG", copy=copy)
    finally:
        os.umask(old)
    assert dest.read_bytes() == b"\xff\xd8 jpeg \xff\xd9" and not src.exists()
    assert dest.stat().st_mode & 0o777 == 0o664
