"""Fixtures for tests that boot the ublk test guest; every test under tests/vm is marked ``vm`` and ``slow``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.guest import Guest, guest_or_skip

_HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by marker (-m "not vm")
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.vm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The guest (built once, then cached on disk); the test is skipped, with the reason, where it cannot be had."""
    return guest_or_skip()
