"""Fixtures for both wings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge.keys import USER_KEYS_ENV


@pytest.fixture(scope="session", autouse=True)
def user_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never read or fill the real user keys folder (`keygen` installs public keys there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(USER_KEYS_ENV, str(tmp_path_factory.mktemp("user-keys")))
        yield
