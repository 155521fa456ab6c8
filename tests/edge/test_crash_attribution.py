"""Who is blamed when the daemon dies (edge/ledger.py, crash attribution), on the real daemon:
a real subprocess killed with SIGKILL, real inotify, real SQLite and ONNX Runtime.

- Random kills during bursts must quarantine no good frame (frames that sat in the read-ahead
  queue, or shared the engine with nothing bad, used to be blamed: 67 of 1,447 in a field run).
- A frame that crashes the decoder every time is still quarantined, and alone.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from make_onnx import IMGSZ, STRIDE, patch_image
from test_daemon import Device, drop, empty_frame, lynx_frame

from edge.ledger import MAX_CRASHES, Ledger

HERE = Path(__file__).parent
FINAL = ("done", "disposed", "quarantined")


def _big_frame(k: int, animal: bool) -> bytes:
    """A 1536 x 1536 camera-sized frame (decoding it takes a while, as on a real trap), with
    sensor noise; an animal is the same bright patch the small test frames carry."""
    rng = np.random.default_rng(k)
    img = patch_image(IMGSZ, STRIDE, (1 + k % 2, 1 + k % 3), 0, scale=24) if animal else \
        np.full((IMGSZ * 24, IMGSZ * 24, 3), 20, np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _in_flight(dev: Device) -> int:
    db = sqlite3.connect(dev.state / "ledger.sqlite3", timeout=10)
    try:
        return db.execute("SELECT count(*) FROM images WHERE in_flight IS NOT NULL").fetchone()[0]
    finally:
        db.close()


@pytest.mark.slow
def test_random_kills_during_bursts_quarantine_no_good_frame(tmp_path: Path) -> None:
    """50 SIGKILLs at random moments while bursts of camera-sized frames are processed (they
    keep arriving while the daemon restarts, as on a trap), then everything is finished.
    Under the old rule (every claimed frame blamed) this quarantined good frames that merely
    waited in the read-ahead: they are the oldest, so they were claimed again first after each
    restart, and killed again."""
    rng = random.Random(20261130)
    pool = {animal: [_big_frame(k, animal) for k in range(6)] for animal in (True, False)}
    dev = Device(tmp_path, policy="delete", program=[str(HERE / "patched_daemon.py")],
                 env={"CAMTRAP_TEST_DECODE_MS": "25", "CAMTRAP_TEST_INFER_MS": "60"})  # a Jetson's pace
    frames: dict[str, bool] = {}  # name -> animal
    kills = caught = 0
    try:
        while kills < 50:
            for _ in range(rng.randint(4, 16)):  # a burst arrives
                name = f"F{len(frames):04d}.JPG"
                animal = rng.random() < 0.5
                drop(dev.watch, name, rng.choice(pool[animal]))
                frames[name] = animal
            dev.start()
            time.sleep(rng.uniform(0.0, 2.0))  # a random moment
            dev.kill()
            kills += 1
            caught += _in_flight(dev) > 0
        dev.start()
        rows = dev.wait_done(len(frames), timeout=240)
        assert dev.terminate() == 0
    finally:
        if dev.alive():
            dev.kill()
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == set(frames)
    quarantined = sorted(n for n, r in by_name.items() if r["state"] == "quarantined")
    print(f"\nkill loop: {kills} kills ({caught} with frames inside the decoder/engine), "
          f"{len(frames)} frames, {len(quarantined)} good frames quarantined")
    assert quarantined == []
    assert caught >= 10  # the kills did land while frames were being decoded or run
    for name, animal in frames.items():
        assert by_name[name]["result"] is not None
        assert (dev.watch / name).exists() == animal, name  # animals kept, empties deleted


def test_a_frame_that_crashes_the_decoder_is_quarantined_alone(tmp_path: Path) -> None:
    """The poison frame dies in the decoder every time. The first death blames its whole batch
    (suspects, nothing counted); each suspect is then tried alone: only the poison is
    quarantined, after MAX_CRASHES deaths alone, and every good frame is done."""
    dev = Device(tmp_path, policy="keep", program=[str(HERE / "patched_daemon.py")],
                 env={"CAMTRAP_TEST_CRASH_ON": "POISON*", "CAMTRAP_TEST_OFFENDER_RETRY_AFTER_S": "1"})
    names = [f"G{k:02d}.JPG" for k in range(9)]
    names.insert(5, "POISON.JPG")  # in the second batch of 4, decoded while the first one runs
    with Ledger(dev.state / "ledger.sqlite3") as led:  # all waiting at the start: full batches
        for k, name in enumerate(names):
            st = drop(dev.watch, name, lynx_frame(k) if k % 2 else empty_frame(k)).stat()
            led.see(dev.watch / name, st.st_size, st.st_mtime)
    deaths = 0
    try:
        for _ in range(10):
            dev.start(wait=False)
            deadline = time.monotonic() + 60
            while dev.alive() and time.monotonic() < deadline:
                try:
                    rows = dev.rows()
                except sqlite3.OperationalError:
                    rows = []
                if len(rows) == len(names) and all(r["state"] in FINAL for r in rows):
                    break
                time.sleep(0.1)
            if dev.alive():
                assert dev.terminate() == 0
                break
            assert dev.proc is not None and dev.proc.returncode == 70, dev.run_log()[-3000:]
            deaths += 1
        else:
            raise AssertionError("the daemon kept dying\n" + dev.log.read_text()[-3000:])
    finally:
        if dev.alive():
            dev.kill()
    rows = {Path(r["path"]).name: r for r in dev.rows()}
    assert rows["POISON.JPG"]["state"] == "quarantined"
    assert "alone in the decoder" in rows["POISON.JPG"]["error"]
    assert all(r["state"] in ("done", "disposed") for n, r in rows.items() if n != "POISON.JPG")
    assert deaths == MAX_CRASHES + 1  # once with its batch, then alone each time

    # requeue gives it another try (alone again); FILE names it, --quarantined takes them all
    cli = [sys.executable, "-m", "edge.cli", "requeue", "--config", str(dev.config)]
    out = subprocess.run([*cli, str(dev.watch / "G00.JPG")], capture_output=True, text=True)
    assert out.returncode == 2 and "not quarantined" in out.stderr
    out = subprocess.run([*cli, "--quarantined"], capture_output=True, text=True)
    assert out.returncode == 0 and "1 quarantined frame(s) requeued" in out.stdout, out.stderr
    [again] = [r for r in dev.rows() if Path(r["path"]).name == "POISON.JPG"]
    assert again["state"] == "seen" and again["suspect"] == 1 and again["attempts"] == 0
