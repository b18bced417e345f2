"""A fresh ledger per test, on SQLite and on a real PostgreSQL server (tests/postgres.py),
for the tests that take `empty_db_url` or `ledger` (test_metering.py has its own `ledger`, on
a fake clock)."""

import pytest

from engine.metering import Ledger
from tests.postgres import postgres  # noqa: F401 - a fixture

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def empty_db_url(request, tmp_path) -> str:
    """The URL of an empty database, on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def ledger(empty_db_url):
    with Ledger(empty_db_url) as opened:
        yield opened
