"""Fixtures shared by unit and end-to-end tests: a throwaway PostgreSQL server per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgserver import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session (unix socket in its own temp dir)."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        server.start()
    except PostgresUnavailable as e:
        server.close()
        pytest.fail(f"could not start a throwaway PostgreSQL server: {e}", pytrace=False)
    yield server
    server.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A server for one test module alone: its tests may stop, freeze or restart it without
    disturbing the session's."""
    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database on the session's server; its store URL."""
    url = pg_server.create_database()
    yield url
    if pg_server.started:
        pg_server.drop_database(url)
