"""Fixtures shared by the whole suite.

PostgreSQL
    The server is ``$HYPERTUNA_TEST_DATABASE_URL`` (default
    ``postgresql://postgres@127.0.0.1:5432/test``). If it cannot be reached, tests that need it
    fail when ``HYPERTUNA_REQUIRE_PG=1`` (CI) and are skipped, with a warning, otherwise.

    - ``pg_url``: a URL whose connections use a fresh, empty schema (dropped after the test).
    - ``store_url``: ``(database_url, data_dir)`` for ``open_event_store(*store_url)``,
      parametrized over the backends (ids ``sqlite`` and ``postgres``), so one test body checks
      both. The postgres case carries the ``postgres`` marker.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the test PostgreSQL server, once checked to be reachable (the outcome, skip or
    failure included, is cached for the session)."""
    url = os.environ.get("HYPERTUNA_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = f"PostgreSQL test server {url} is unreachable: {exc}".strip()
        if os.environ.get("HYPERTUNA_REQUIRE_PG") == "1":
            pytest.fail(f"{reason} (HYPERTUNA_REQUIRE_PG=1)")
        warnings.warn(f"SKIPPING ALL POSTGRESQL TESTS: {reason}", stacklevel=1)
        pytest.skip(f"SKIPPING ALL POSTGRESQL TESTS: {reason}")
    return url


def url_with_search_path(url: str, schema: str) -> str:
    """``url`` with ``options=-csearch_path=<schema>`` added to its query string."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query.append(("options", f"-csearch_path={schema}"))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A URL selecting a fresh schema of the test server; the schema is dropped afterwards."""
    schema = f"test_{secrets.token_hex(8)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield url_with_search_path(pg_server_url, schema)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | None, Path]:
    """``(database_url, data_dir)`` for each backend: ``None`` (the default SQLite file in
    ``data_dir``) or a PostgreSQL URL from ``pg_url``."""
    if request.param == "sqlite":
        return None, tmp_path
    url: str = request.getfixturevalue("pg_url")
    return url, tmp_path
