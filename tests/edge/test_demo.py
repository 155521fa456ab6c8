"""`camtrap-edge demo` as a user runs it: a subprocess, the shipped bundle and frames, a real broker.

The summary line and the messages the demo's subscriber printed are checked against the demo
frames' ground truth (edge/demo/frames/labels.json): one detection message per animal frame,
none for an empty frame.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge.demo import DEMO_FRAMES, parse_broker
from edge.messages import short_name

MSG = re.compile(r"^  <- (?P<topic>\S+?)(?: \(retained\))?: (?P<body>.*)$")
SUMMARY = re.compile(r"^summary: frames (\d+), results (\d+), animals (\d+), empties (\d+), unreadable (\d+), "
                     r"messages (\d+) \(detections (\d+)\), outbox (\d+)$")


def edge_cli() -> list[str]:
    exe = Path(sys.executable).with_name("camtrap-edge")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edge.cli"]


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*edge_cli(), "demo", "--interval", "0.5", *args], capture_output=True, text=True,
                          timeout=150)


def messages(stdout: str) -> list[tuple[str, object]]:
    out = []
    for line in stdout.splitlines():
        m = MSG.match(line)
        if m:
            body = m["body"]
            try:
                out.append((m["topic"], json.loads(body)))
            except json.JSONDecodeError:
                out.append((m["topic"], body))
    return out


def check_run(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    labels = json.loads((DEMO_FRAMES / "labels.json").read_text())
    animals = sorted(n for n, v in labels.items() if not v["empty"])
    empties = sorted(n for n, v in labels.items() if v["empty"])
    out = r.stdout
    assert "signature verified" in out and "demo: ok" in out
    s = next(SUMMARY.match(line) for line in out.splitlines() if line.startswith("summary:"))
    frames, results, n_animals, n_empty, unreadable, n_msgs, n_det, outbox = map(int, s.groups())
    assert (frames, results, n_animals, n_empty, unreadable, outbox) == (
        len(labels), len(labels), len(animals), len(empties), 0, 0)
    msgs = messages(out)
    assert len(msgs) == n_msgs
    status = [p for t, p in msgs if t == "camtrap/demo/status"]
    assert status and status[0]["state"] == "online"
    dets = [p for t, p in msgs if t == "camtrap/demo/detections"]
    assert len(dets) == n_det == len(animals)
    assert sorted(d["f"] for d in dets) == sorted(short_name(n) for n in animals)
    for d in dets:
        assert d["n"] >= 1 and 0 < d["p"] <= 1 and d["sp"] and d["m"]
    for n in empties:
        assert short_name(n) not in {d["f"] for d in dets}


def test_demo_with_embedded_broker():
    check_run(run_demo())


def test_demo_with_an_external_broker(mosquitto):
    r = run_demo("--broker", f"127.0.0.1:{mosquitto.port}")
    assert f"broker: 127.0.0.1:{mosquitto.port}" in r.stdout
    check_run(r)


def test_bad_broker_argument_is_one_clear_line():
    r = run_demo("--broker", "localhost:port")
    assert r.returncode == 2 and "port 'port' is not a number" in r.stderr
    with pytest.raises(ValueError, match=r"outside 1\.\.65535"):
        parse_broker("localhost:70000")
    assert parse_broker("broker.example") == ("broker.example", 1883)


def test_unreachable_broker_fails_clearly(tmp_path):
    from broker import free_port

    r = run_demo("--broker", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the MQTT broker" in r.stderr
