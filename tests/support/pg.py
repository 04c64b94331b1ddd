"""A real PostgreSQL for the tests: one database per test run, one schema per test.

The server is `METERPROXY_TEST_PG` (default postgresql://postgres@127.0.0.1:5432/postgres). The run
creates a database of its own (`meterproxy_test_<pid>_<random>`) and drops it at the end. Each test that
asks for `pg_url` gets a fresh schema in it, named in the URL's `options=-csearch_path=...`, so every
connection (the proxy's, a CLI's, a second replica's) sees only that test's tables; migrations run per
schema. Where no server answers the tests skip with the reason, except under `CI=true`, where that is a
failure: a green CI run always ran the PostgreSQL suite.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

SERVER = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_schemas = itertools.count(1)


def database_url(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def unreachable(reason: str) -> None:
    message = f"PostgreSQL at {SERVER} is not reachable ({reason}); set METERPROXY_TEST_PG"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: under CI the PostgreSQL suite must run")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of this run's own database (created now, dropped at the end of the run)."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        unreachable(f"psycopg is not installed: {exc}")
        raise
    name = f"meterproxy_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unreachable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(SERVER, name)
    finally:
        with psycopg.connect(SERVER, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema of their own (dropped after the test)."""
    import psycopg

    schema = f"t{next(_schemas)}_{secrets.token_hex(2)}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_schema(pg_database, schema)
    finally:
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """A `--db` value for each backend: a SQLite path, then a PostgreSQL URL (a fresh schema)."""
    if request.param == "sqlite":
        return os.path.join(str(tmp_path), "meterproxy.db")
    return str(request.getfixturevalue("pg_url"))
