"""Shared fixtures of the device-wing tests: a real Mosquitto broker and a ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto, mosquitto_binary

from edge.ledger import Ledger


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mosquitto]]:
    """``factory(**kwargs)`` starts a Mosquitto (see tests/edge/broker.py); all are killed at the end."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    brokers: list[Mosquitto] = []

    def factory(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path_factory.mktemp("mqtt"), **kwargs)
        brokers.append(broker)
        return broker.start()

    yield factory
    for b in brokers:
        b.close()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain broker (anonymous, persistence on) on a free loopback port."""
    return mosquitto_factory()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        yield led
