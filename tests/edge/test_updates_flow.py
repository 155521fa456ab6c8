"""Remote updates end to end below the daemon: signed commands into the Updater, bundles published
by `camtrap-export publish` and served by a real http server on 127.0.0.1, real ONNX Runtime
engines and the real self-test. Every refusal or failure must leave ``current`` on the old
bundle with a clear reason; a good update must fetch only what changed."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from update_helpers import DEMO, EngineHost, Server, demo_file, relabel_onnx, variant, wrong_answers

from edge.bundle import load_bundle
from edge.signing import generate_keypair, sign
from edge.updates import Updater
from edge.updates_command import make_command
from edge.updates_config import ProbationSection, UpdatesSection
from edge.updates_store import ModelStore
from export.release import publish

KEY, PUB = generate_keypair()
OTHER, _ = generate_keypair()
G2 = (DEMO / demo_file("group2")).read_bytes()


class Box:
    """A state dir holding demo-1 as current, an http server with it published, an Updater."""

    def __init__(self, tmp: Path, srv: Server, **cfg) -> None:
        self.tmp, self.srv = tmp, srv
        self.state = tmp / "state"
        self.store = ModelStore(self.state / "models")
        v1 = variant(DEMO, tmp / "v1", version="demo-1", key=KEY)
        self.store.activate(self.store.import_bundle(v1))
        publish(v1, srv.folder)
        old = load_bundle(self.store.current())
        self.host = EngineHost()
        self.host.serving = (old, self.host.build(old))
        cfg.setdefault("probation", ProbationSection(frames=5, min_frames=2, max_errors=2))
        self.cfg = UpdatesSection(base_url=srv.url, **cfg)
        self.upd = self.new_updater()

    def new_updater(self) -> Updater:
        return Updater(self.cfg, device_id="cam-1", state_dir=self.state, public_keys=[PUB], host=self.host,
                       engines_dir=self.state / "engines")

    def publish(self, version: str, *, key: bytes | None = KEY, **kw) -> Path:
        b = variant(DEMO, self.tmp / version, version=version, key=key or KEY, **kw)
        publish(b, self.srv.folder)
        return b

    def command(self, name: str = "update", *, key: bytes = KEY, **args) -> dict:
        return self.upd.handle(name, make_command(name, device="cam-1", args=args, private_pem=key))

    def update(self, version: str, **args) -> dict:
        reply = self.command("update", version=version, **args)
        self.upd.wait(120)
        return reply

    @property
    def current_version(self) -> str:
        return self.store.manifest_of(self.store.current()).bundle_version


@pytest.fixture
def box(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    with Server(www) as srv:
        yield Box(tmp_path, srv)


def test_a_one_expert_update_fetches_one_file_switches_and_commits_after_probation(box):
    from edge.updates_probation import Baseline

    box.host.old_model = Baseline(frames=50, empty_rate=0.5, mean_ms=10.0)
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "retrained")})
    box.srv.served = 0
    reply = box.update("demo-2")
    assert reply["ok"] and reply["to"] == "demo-2"
    rec = box.upd.record
    assert rec.state == "probation", rec.reason
    bundle_bytes = sum(p.stat().st_size for p in (box.tmp / "demo-2").rglob("*") if p.is_file())
    assert rec.bytes == len(G2) + len(b"retrained") + 2  # one expert file, nothing else
    assert rec.bytes < bundle_bytes / 3
    assert box.srv.served < len(G2) + 20_000  # manifest + signature + one file over the wire
    assert box.current_version == "demo-2" and box.host.swaps == ["demo-2"]
    states = box.host.states()
    for s in ("fetching", "verifying", "building", "selftest", "switching", "probation"):
        assert s in states
    assert states.index("building") < states.index("switching")
    for i in range(5):
        box.upd.observe(frames=1, empty=i % 2, ms_total=9.0)
    assert box.upd.record.state == "committed"
    assert [k.version for k in box.store.kept() if k.previous] == ["demo-1"]  # kept for rollback
    assert json.loads(box.upd.record.topic_payload()) | {"t": 0} == {
        "v": 1, "id": rec.id[:12], "state": "committed", "step": "pruning", "from": "demo-1", "to": "demo-2",
        "bytes": rec.bytes, "reason": "5 frames on probation without a fault", "t": 0}


def _failed(box: Box, words: str) -> None:
    rec = box.upd.record
    assert rec.state in ("failed", "refused"), rec
    assert words in (rec.reason or ""), rec.reason
    assert box.current_version == "demo-1"  # the old model stays
    assert box.host.swaps == []
    assert not (box.store.root / "downloads").exists()


def test_a_file_whose_hash_does_not_match_is_refused(box):
    b = box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    sha = hashlib.sha256((b / demo_file("group2")).read_bytes()).hexdigest()
    (box.srv.folder / "files" / sha).write_bytes(relabel_onnx(G2, "tampered"))
    box.update("demo-2")
    _failed(box, "sha256 mismatch")


def test_a_bad_manifest_signature_is_refused(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    sig = box.srv.folder / "manifests" / "demo-2.sig"
    sig.write_bytes(bytes(64))
    box.update("demo-2")
    _failed(box, "signature does not match")


def test_an_unsigned_bundle_is_refused(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    (box.srv.folder / "manifests" / "demo-2.sig").unlink()
    box.update("demo-2")
    _failed(box, "unsigned bundle refused")


def test_a_bundle_signed_by_an_unknown_key_is_refused(box):
    box.publish("demo-2", key=OTHER, replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")
    _failed(box, "signature does not match the manifest under any trusted key")


def test_unsigned_replayed_and_unknown_key_commands_are_refused_with_a_reason(box):
    r = box.upd.handle("update", b'{"version": "demo-2"}')
    assert not r["ok"] and "unsigned command refused" in r["reason"]
    assert box.upd.record.state == "refused" and "unsigned" in box.upd.record.reason
    r = box.command("update", key=OTHER, version="demo-2")
    assert not r["ok"] and "bad signature" in r["reason"]
    payload = make_command("models", device="cam-1", args={}, private_pem=KEY)
    assert box.upd.handle("models", payload)["ok"]
    r = box.upd.handle("models", payload)
    assert not r["ok"] and "replayed" in r["reason"]


def test_a_downgrade_or_the_same_version_is_refused(box):
    r = box.command("update", version="demo-0")
    assert not r["ok"] and "not newer than the running demo-1" in r["reason"]
    r = box.command("update", version="demo-1")
    assert not r["ok"] and "not newer" in r["reason"]
    assert box.host.swaps == []


def test_a_manifest_path_that_escapes_the_bundle_is_refused(box):
    b = box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    raw = json.loads((b / "manifest.json").read_text())
    raw["models"][2]["file"] = "../../../etc/cron.d/evil"
    data = json.dumps(raw).encode()
    (box.srv.folder / "manifests" / "demo-2.json").write_bytes(data)
    (box.srv.folder / "manifests" / "demo-2.sig").write_bytes(sign(data, KEY))  # even signed by a trusted key
    box.update("demo-2")
    _failed(box, "must be a relative path inside the bundle")


def _tar(box: Box, src: Path, extra: tarfile.TarInfo, data: bytes = b"") -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    (box.srv.folder / "bundle.tar").write_bytes(buf.getvalue())
    return box.srv.url + "/bundle.tar"


def test_an_archive_with_a_path_traversal_is_refused(box):
    b = variant(DEMO, box.tmp / "arch", version="demo-2", key=KEY, replace={"group2": relabel_onnx(G2, "a")})
    evil = tarfile.TarInfo("../../evil.txt")
    evil.size = 4
    url = _tar(box, b, evil, b"evil")
    box.update("demo-2", url=url)
    _failed(box, "path escapes the bundle")
    assert not (box.state / "evil.txt").exists() and not (box.tmp / "evil.txt").exists()


def test_an_archive_with_a_symlink_is_refused(box):
    b = variant(DEMO, box.tmp / "arch", version="demo-2", key=KEY, replace={"group2": relabel_onnx(G2, "a")})
    link = tarfile.TarInfo("models/link.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    box.update("demo-2", url=_tar(box, b, link))
    _failed(box, "links are not allowed")


def test_a_good_archive_update_works_too(box):
    b = variant(DEMO, box.tmp / "arch", version="demo-2", key=KEY, replace={"group2": relabel_onnx(G2, "a")})
    info = tarfile.TarInfo("README")
    info.size = 2
    box.update("demo-2", url=_tar(box, b, info, b"hi"))
    assert box.upd.record.state == "probation", box.upd.record.reason
    assert box.current_version == "demo-2"


def test_a_truncated_download_resumes_and_the_update_goes_through(box):
    b = box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    sha = hashlib.sha256((b / demo_file("group2")).read_bytes()).hexdigest()
    box.srv.cut[f"/files/{sha}"] = 1_000_000
    box.srv.served = 0
    box.update("demo-2")
    assert box.upd.record.state == "probation", box.upd.record.reason
    assert (f"/files/{sha}", "bytes=1000000-") in box.srv.requests
    assert box.upd.record.bytes == len(G2) + 3  # the first million bytes were not fetched twice


def test_a_download_that_keeps_breaking_fails_and_the_next_command_resumes_it(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    with Server(www) as srv:
        box = Box(tmp_path, srv, attempts=1)
        b = box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
        sha = hashlib.sha256((b / demo_file("group2")).read_bytes()).hexdigest()
        srv.cut[f"/files/{sha}"] = 2_000_000
        box.update("demo-2")
        rec = box.upd.record
        assert rec.state == "failed" and "resumes on the next attempt" in rec.reason
        assert box.current_version == "demo-1"
        box.update("demo-2")
        assert box.upd.record.state == "probation", box.upd.record.reason
        assert (f"/files/{sha}", "bytes=2000000-") in srv.requests
        assert box.upd.record.bytes == len(G2) + 3 - 2_000_000  # this command fetched only the rest


def test_an_oversize_update_is_refused(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    with Server(www) as srv:
        box = Box(tmp_path, srv, max_bundle_mb=1)
        box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
        box.update("demo-2")
        _failed(box, "cap")


def test_a_self_test_failure_is_refused_and_the_old_model_stays(box):
    box.publish("demo-2", replace={"group2": wrong_answers("group2")})
    box.update("demo-2")
    _failed(box, "self-test failed: group2")


def test_an_engine_build_failure_is_refused(box):
    box.publish("demo-2", replace={"group2": b"this is not an ONNX model" * 100})
    box.update("demo-2")
    _failed(box, "engine build failed")


def test_a_bad_probation_rolls_back_by_itself(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")
    box.upd.observe(frames=1, errors=1)
    assert box.upd.record.state == "probation"
    box.upd.observe(frames=1, errors=1)
    assert box.upd.record.state == "rolled_back"
    assert "2 inference errors" in box.upd.record.reason
    assert box.current_version == "demo-1" and box.host.swaps == ["demo-2", "demo-1"]
    assert box.host.serving[0].version == "demo-1"
    assert len(box.host.closed) == 1  # the failed model's engines, once


def test_an_empty_rate_far_from_the_old_models_rolls_back(box):
    from edge.updates_probation import Baseline

    box.host.old_model = Baseline(frames=50, empty_rate=0.5, mean_ms=10.0)
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")
    box.upd.observe(frames=2, empty=2, ms_total=20.0)  # min_frames=2: everything empty now
    assert box.upd.record.state == "rolled_back"
    assert "empty-frame rate 1.00 is far from the old model's 0.50" in box.upd.record.reason


def test_a_crash_loop_during_probation_rolls_back_before_the_new_model_loads(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")
    assert box.current_version == "demo-2"
    # two unclean restarts (no clean_stop): each new daemon calls resume_on_start first
    assert box.new_updater().resume_on_start() == "probation"
    upd = box.new_updater()
    assert upd.resume_on_start() == "rollback"
    assert upd.record.state == "rolled_back" and "crash loop: 2 unclean restarts" in upd.record.reason
    assert box.current_version == "demo-1"
    assert box.new_updater().resume_on_start() == "none"


def test_explicit_rollback_to_a_kept_version_and_nothing_else(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")
    for _ in range(5):
        box.upd.observe(frames=1, ms_total=5.0)
    assert box.upd.record.state == "committed"
    r = box.command("rollback", version="demo-0")
    assert not r["ok"] and "no kept version demo-0" in r["reason"]
    r = box.command("rollback")
    assert r["ok"] and r["to"] == "demo-1"
    assert box.current_version == "demo-1" and box.upd.record.state == "rolled_back"
    models = box.command("models")
    assert models["current"] == "demo-1" and {k["version"] for k in models["kept"]} == {"demo-1", "demo-2"}


def test_a_second_update_while_one_runs_is_refused(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")  # now on probation
    box.publish("demo-3", replace={"group2": relabel_onnx(G2, "y")})
    r = box.command("update", version="demo-3")
    assert not r["ok"] and "in progress (probation)" in r["reason"]
    assert box.upd.record.state == "probation"  # a refusal does not hide the running update


def test_a_restart_before_the_switch_resumes_the_update(box):
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.host.fail_build = "power cut"  # stands in for a kill during the build: the state file says 'building'
    box.update("demo-2")
    rec = box.upd.record
    assert rec.state == "failed"
    # what a kill leaves: the record still says 'building'
    box.upd.state.save(rec.to("building", "engines", reason=None))
    box.host.fail_build = None
    upd = box.new_updater()
    assert upd.resume_on_start() == "resume"
    assert box.current_version == "demo-1"
    upd.after_start()
    upd.wait(120)
    assert upd.record.state == "probation", upd.record.reason
    assert upd.record.bytes == 0 or upd.record.bytes == rec.bytes  # the file was held: nothing fetched again
    assert box.current_version == "demo-2"


def test_an_update_that_did_not_go_through_is_logged_as_a_problem_with_its_reason(box, caplog):
    """A failed update is an ERROR and a rollback a WARNING, each with the reason (all of them
    were INFO, lost among routine lines); the routine steps stay INFO."""
    import logging

    caplog.set_level(logging.INFO, logger="camtrap.updates")
    box.publish("demo-2", replace={"group2": b"this is not an ONNX model" * 100})
    box.update("demo-2")
    _failed(box, "engine build failed")
    box.publish("demo-3", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-3")
    box.upd.observe(frames=1, errors=1)
    box.upd.observe(frames=1, errors=1)
    assert box.upd.record.state == "rolled_back"
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "camtrap.updates"]
    by_state = {}
    for level, msg in lines:
        for state in ("fetching", "failed", "rolling_back", "rolled_back"):
            if msg.startswith("update ") and f": {state}" in msg:
                by_state.setdefault(state, set()).add(level)
    assert by_state["failed"] == {logging.ERROR}
    assert by_state["rolling_back"] == by_state["rolled_back"] == {logging.WARNING}
    assert by_state["fetching"] == {logging.INFO}
    assert any(level == logging.ERROR and "update demo-2: failed" in msg and "engine build failed" in msg
               for level, msg in lines), lines
    assert any(level == logging.WARNING and "update demo-3: rolled_back" in msg and "2 inference errors" in msg
               for level, msg in lines), lines


def test_probation_time_is_time_run_not_what_the_wall_clock_says(box, monkeypatch):
    """A box without a battery-backed clock jumps a day (or years) when NTP first answers, and back
    when an operator fixes a bad zone: neither may commit a model on probation or hold it there."""
    box.publish("demo-2", replace={"group2": relabel_onnx(G2, "x")})
    box.update("demo-2")
    box.upd.observe(frames=1)
    wall, mono = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: wall() + 86_400)  # forward a day
    box.upd.observe(frames=1)
    assert box.upd.record.state == "probation"
    monkeypatch.setattr(time, "time", lambda: wall() - 2 * 86_400)  # back two days
    box.upd.observe(frames=1)
    assert box.upd.record.state == "probation"
    # the minutes still run: an hour (and a second) of running commits it, whatever the wall clock
    minutes = box.cfg.probation.minutes
    monkeypatch.setattr(time, "monotonic", lambda: mono() + minutes * 60 + 1)
    box.upd.observe(frames=0)
    monkeypatch.setattr(time, "monotonic", mono)
    assert box.upd.record.state == "committed", box.upd.record
    assert f"{minutes:g} minutes on probation" in box.upd.record.reason
