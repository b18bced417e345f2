"""A fresh SQLite ledger per test (test_metering.py has its own, on a fake clock)."""

import pytest

from engine.metering import Ledger


@pytest.fixture
def ledger(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as opened:
        yield opened
