"""sd_notify against a real AF_UNIX datagram socket (what systemd listens on)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from edge.sdnotify import Notifier, watchdog_interval


def _listener(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


@pytest.fixture
def path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = _listener(path)
    yield path, s
    s.close()


def test_ready_watchdog_status_stopping_reach_the_socket(path_socket, monkeypatch):
    path, listener = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as n:
        assert n.enabled
        assert n.ready("engines loaded")
        assert listener.recv(4096) == b"READY=1\nSTATUS=engines loaded"
        assert n.watchdog()
        assert listener.recv(4096) == b"WATCHDOG=1"
        assert n.status("processing\n3 queued")
        assert listener.recv(4096) == b"STATUS=processing 3 queued"
        assert n.extend_timeout(90)
        assert listener.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
        assert n.stopping()
        assert listener.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket():
    name = f"camtrap-test-{uuid.uuid4().hex}"
    listener = _listener(b"\0" + name.encode())
    try:
        n = Notifier("@" + name)
        assert n.ready()
        assert listener.recv(4096) == b"READY=1"
        n.close()
    finally:
        listener.close()


def test_noop_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False


def test_missing_socket_does_not_raise(tmp_path):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.watchdog() is False  # logged, not raised: the daemon keeps running


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
