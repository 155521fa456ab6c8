"""Remote updates through the real daemon: `camtrap-edge run` as a subprocess over a real Mosquitto,
bundles served by a real http server on 127.0.0.1, commands sent by `camtrap-export update`'s
own code. The old model serves throughout; SIGKILL at the update's steps leaves a box that
restarts on one whole bundle, with one result per frame."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml
from broker import Subscriber
from test_daemon import Device
from update_helpers import DEMO, Server, demo_file, relabel_onnx, variant, wrong_answers

from edge.bundle import load_bundle
from edge.signing import generate_keypair
from export.release import publish
from export.update import Fleet, run_update

KEY, PUB = generate_keypair()
G2 = (DEMO / demo_file("group2")).read_bytes()
FRAMES = sorted((DEMO.parent / "frames").glob("*.JPG"))
DEV = "trap-u"


class Box(Device):
    """A daemon subprocess whose state dir holds demo-1 at models/current, as an installer leaves it."""

    def __init__(self, root: Path, broker, url: str, *, probation: dict | None = None) -> None:
        super().__init__(root, broker, policy="keep", gap_s=1.0)  # then this box's own state and config
        variant(DEMO, self.state / "models" / "current", version="demo-1", key=KEY)
        keys = root / "keys"
        keys.mkdir()
        (keys / "ops.pub").write_bytes(PUB)
        cfg = {
            "device": {"id": DEV},
            "watch": {"folders": [str(self.watch)], "settle_s": 0.2, "reconcile_every_s": 2},
            "bundle": {"public_keys_dir": str(keys), "require_signature": True},
            "engine": {"type": "onnxruntime", "max_batch": 2},
            "events": {"gap_s": 1},
            "telemetry": {"every_s": 30},
            "disposal": {"policy": "keep"},
            "paths": {"state_dir": str(self.state)},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "reconnect_min_s": 0.1,
                     "reconnect_max_s": 0.5},
            "updates": {"base_url": url, "timeout_s": 5,
                        "probation": probation or {"frames": 4, "min_frames": 100, "minutes": 60}},
        }
        self.config.write_text(yaml.safe_dump(cfg))
        self.n = 0

    def drop(self, k: int = 1) -> None:
        for _ in range(k):
            src = FRAMES[self.n % len(FRAMES)]
            tmp = self.watch / f".{self.n}.part"
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, self.watch / f"F{self.n:04d}_{src.name}")
            self.n += 1

    def results(self) -> list[dict]:
        db = sqlite3.connect(self.state / "ledger.sqlite3", timeout=10)
        try:
            rows = db.execute("SELECT path, result FROM images WHERE result IS NOT NULL ORDER BY id").fetchall()
        finally:
            db.close()
        return [{"path": p, **json.loads(r)} for p, r in rows]

    def wait_results(self, n: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                res = self.results()
            except sqlite3.OperationalError:
                res = []
            if len(res) >= n:
                return res
            time.sleep(0.1)
        raise AssertionError(f"{len(res)} results of {n}\n" + self.log.read_text()[-4000:])

    def record(self) -> dict:
        p = self.state / "updates" / "state.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def current_version(self) -> str:
        return load_bundle(self.state / "models" / "current", public_keys=[PUB], require_signature=True).version


@pytest.fixture
def env(tmp_path, mosquitto):
    www = tmp_path / "www"
    www.mkdir()
    with Server(www) as srv:
        boxes: list[Box] = []

        def make(**kw) -> Box:
            b = Box(tmp_path / f"box{len(boxes)}", mosquitto, srv.url, **kw)
            boxes.append(b)
            return b

        yield make, srv, mosquitto
        for b in boxes:
            if b.alive():
                b.kill()


def _publish(srv: Server, tmp: Path, version: str, **kw) -> Path:
    b = variant(DEMO, tmp / f"pub-{version}", version=version, key=KEY, **kw)
    publish(b, srv.folder)
    return b


def _send(broker, command: str = "update", timeout: float = 120, **args):
    fleet = Fleet(broker.host, broker.port)
    try:
        return run_update(fleet, [DEV], command=command, args=args, key_pem=KEY, timeout_s=timeout)[0]
    finally:
        fleet.close()


def test_a_good_update_while_frames_keep_coming(env, tmp_path):
    make, srv, broker = env
    box = make().start()
    sub = Subscriber(broker, f"camtrap/{DEV}/#").start()
    box.drop(4)
    box.wait_results(4)
    _publish(srv, tmp_path, "demo-2", replace={"group2": relabel_onnx(G2, "daemon")})
    srv.delay_s = 0.05  # ~1.3 s for the one 4 MB expert: frames arrive during the download
    feeding = threading.Event()

    def feed() -> None:
        while not feeding.is_set():
            box.drop(1)
            time.sleep(0.3)

    t = threading.Thread(target=feed)
    t.start()
    try:
        row = _send(broker, version="demo-2")
    finally:
        feeding.set()
        t.join()
    assert row.state == "committed", (row, box.log.read_text()[-3000:])
    assert row.from_version == "demo-1" and row.to_version == "demo-2"
    assert row.bytes == len(G2) + len(b"daemon") + 2  # one expert of a 16 MB bundle
    assert {"fetching", "building", "selftest", "probation", "committed"} <= set(row.seen)
    res = box.wait_results(box.n)
    assert len({r["path"] for r in res}) == len(res) == box.n  # every frame, once
    models = [r["model"] for r in res]
    first_new = models.index("demo-2")
    assert set(models[:first_new]) == {"demo-1"} and set(models[first_new:]) == {"demo-2"}
    during = [r for r in res[4:first_new]]
    assert during, "no frame got a result while the update ran"
    assert len({r["bundle"] for r in res}) == 2  # the bundle's identity travels with each result
    assert box.current_version() == "demo-2"
    status = [m.json() for m in sub.on("/status") if m.json().get("state") == "online"]
    assert status[-1]["m"] == "demo-2"
    update = [m.json() for m in sub.on("/update")]
    assert update[-1]["state"] == "committed"
    assert box.terminate() == 0
    sub.stop()


def test_a_self_test_failure_leaves_the_old_model_serving(env, tmp_path):
    make, srv, broker = env
    box = make().start()
    _publish(srv, tmp_path, "demo-2", replace={"group2": wrong_answers("group2")})
    row = _send(broker, version="demo-2")
    assert row.state == "failed" and "self-test failed: group2" in row.reason
    box.drop(2)
    res = box.wait_results(2)
    assert {r["model"] for r in res} == {"demo-1"}
    assert box.current_version() == "demo-1"
    row = _send(broker, version="demo-0")
    assert row.state == "refused" and "not newer" in row.reason
    assert box.terminate() == 0


def test_a_crash_loop_on_probation_rolls_back_before_the_new_model_loads(env, tmp_path):
    make, srv, broker = env
    box = make(probation={"frames": 1000, "minutes": 60, "max_crashes": 2}).start()
    _publish(srv, tmp_path, "demo-2", replace={"group2": relabel_onnx(G2, "crashy")})
    fleet = Fleet(broker.host, broker.port)
    try:
        row = run_update(fleet, [DEV], command="update", args={"version": "demo-2"}, key_pem=KEY, timeout_s=15)[0]
    finally:
        fleet.close()
    assert row.state == "timed out" and "probation" in row.seen  # probation lasts 1000 frames
    for _ in range(2):  # a model that takes the daemon down, twice
        box.kill()
        box.start()
    rec = box.record()
    assert rec["state"] == "rolled_back" and "crash loop: 2 unclean restarts" in rec["reason"]
    assert box.current_version() == "demo-1"
    readies = [ln for ln in box.log.read_text().splitlines() if " ready: model " in ln]
    assert [ln.split(" ready: model ")[1].split()[0] for ln in readies] == ["demo-1", "demo-2", "demo-1"]
    box.drop(2)
    assert {r["model"] for r in box.wait_results(2)} == {"demo-1"}
    assert box.terminate() == 0


def test_an_explicit_rollback_on_probation_and_after_a_commit(env, tmp_path):
    make, srv, broker = env
    box = make(probation={"frames": 1000, "minutes": 60}).start()
    _publish(srv, tmp_path, "demo-2", replace={"group2": relabel_onnx(G2, "rb")})
    fleet = Fleet(broker.host, broker.port)
    try:
        row = run_update(fleet, [DEV], command="update", args={"version": "demo-2"}, key_pem=KEY, timeout_s=15)[0]
        assert "probation" in row.seen
        box.drop(2)
        box.wait_results(2)
        row = run_update(fleet, [DEV], command="rollback", args={}, key_pem=KEY, timeout_s=60)[0]
        assert row.state == "rolled_back" and "rollback requested" in row.reason, (row, box.log.read_text()[-3000:])
        box.drop(2)
        res = box.wait_results(4)
        assert [r["model"] for r in res] == ["demo-2", "demo-2", "demo-1", "demo-1"]
        assert box.current_version() == "demo-1"
        row = run_update(fleet, [DEV], command="rollback", args={"version": "demo-0"}, key_pem=KEY, timeout_s=30)[0]
        assert row.state == "refused" and "no kept version demo-0" in row.reason
    finally:
        fleet.close()
    assert box.terminate() == 0


def test_sigkill_at_each_step_then_restart_is_consistent(env, tmp_path):
    make, srv, broker = env
    # Four kills; when a step is over before its kill lands (a fast build), two of them land in
    # probation, which the crash-loop rule (tested above with max_crashes 2) would roll back.
    box = make(probation={"frames": 3, "min_frames": 100, "minutes": 60, "max_crashes": 5}).start()
    _publish(srv, tmp_path, "demo-2", replace={"group2": relabel_onnx(G2, "kill")})
    srv.delay_s = 0.2  # ~13 s for the expert: time to kill mid-transfer
    killed_at = []
    fleet = Fleet(broker.host, broker.port)
    try:
        threading.Thread(target=run_update, args=(fleet, [DEV]), kwargs=dict(
            command="update", args={"version": "demo-2"}, key_pem=KEY, timeout_s=5), daemon=True).start()
        for step in ("fetching", "building", "selftest", "probation"):
            deadline = time.monotonic() + 60
            while box.record().get("state") not in (step, *_after(step)) and time.monotonic() < deadline:
                if step == "fetching" and (box.record().get("step") or "").startswith("file"):
                    break
                time.sleep(0.01)
            if step == "fetching":
                time.sleep(1.0)  # some bytes are on disk
            box.kill()
            killed_at.append(box.record().get("state"))
            part = list((box.state / "models" / "downloads").glob("*.part"))
            if step == "fetching":
                assert part and part[0].stat().st_size > 0  # a half-fetched file to resume
                srv.delay_s = 0.0
            box.start()  # starts on one whole bundle (load_bundle verifies it)
            assert box.current_version() in ("demo-1", "demo-2")
            box.drop(1)
            box.wait_results(box.n)
    finally:
        fleet.close()
    deadline = time.monotonic() + 60
    while box.record().get("state") != "committed" and time.monotonic() < deadline:
        box.drop(1)
        time.sleep(0.3)
    assert box.record()["state"] == "committed", (killed_at, box.record(), box.log.read_text()[-3000:])
    assert killed_at[0] == "fetching"
    print("killed at", killed_at)
    resumed = [r for r in srv.requests if r[1] and r[1].startswith("bytes=")]
    assert resumed, "the half-fetched file was not resumed"
    res = box.wait_results(box.n)
    assert len({r["path"] for r in res}) == len(res) == box.n  # no frame skipped or done twice
    assert box.current_version() == "demo-2"
    assert box.terminate() == 0


def _after(step: str) -> tuple[str, ...]:
    order = ("fetching", "verifying", "building", "selftest", "switching", "probation", "committed")
    return order[order.index(step) + 1:]
