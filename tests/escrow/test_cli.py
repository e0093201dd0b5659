"""The escrow's commands as a user runs them: ``escrow init`` (once only), ``escrow migrate``
(idempotent), ``escrow serve`` without its keys (fatal), and ``audit verify`` before and after a
row of the audit log is edited in the SQLite database."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hypertuna.escrow.keys import load_audit_key, load_escrow_key
from hypertuna.escrow.policy import Policy
from hypertuna.escrow.service import open_escrow_service
from tests.escrow.conftest import NOW, deposit_request, new_owner, new_writer

pytestmark = pytest.mark.slow


def _cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ESCROW_")}
    return subprocess.run(
        [sys.executable, "-m", "hypertuna.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def test_init_creates_the_keys_once(tmp_path: Path) -> None:
    created = _cli("escrow", "init", "--dir", "keys", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    escrow_key = load_escrow_key(tmp_path / "keys" / "escrow.key")
    assert escrow_key.public_key.hex() in created.stdout
    assert escrow_key.fingerprint in created.stdout
    for name in ("escrow.key", "audit.key"):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    before = (tmp_path / "keys" / "escrow.key").read_bytes()
    again = _cli("escrow", "init", "--dir", "keys", cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert (tmp_path / "keys" / "escrow.key").read_bytes() == before
    # The default directory comes from ESCROW_KEY_DIR.
    by_env = _cli("escrow", "init", cwd=tmp_path, env={"ESCROW_KEY_DIR": str(tmp_path / "env")})
    assert by_env.returncode == 0, by_env.stderr
    assert (tmp_path / "env" / "audit.key").exists()


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    first = _cli("escrow", "migrate", "--sqlite", "var/escrow.db", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert re.search(r"applied escrow migrations 1\b", first.stdout)
    second = _cli("escrow", "migrate", cwd=tmp_path)  # the default file ./var/escrow.db
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_migrate_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    first = _cli("escrow", "migrate", "--database-url", pg_url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = _cli("escrow", "migrate", cwd=tmp_path, env={"ESCROW_DATABASE_URL": pg_url})
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_serve_without_keys_is_a_clear_fatal_error(tmp_path: Path) -> None:
    served = _cli("escrow", "serve", cwd=tmp_path, env={"ESCROW_KEY_DIR": "missing"})
    assert served.returncode == 2
    assert "missing/escrow.key is missing" in served.stderr
    assert "hypertuna escrow init" in served.stderr
    (tmp_path / "open").mkdir()
    assert _cli("escrow", "init", "--dir", "open", cwd=tmp_path).returncode == 0
    (tmp_path / "open" / "audit.key").chmod(0o644)
    loose = _cli("escrow", cwd=tmp_path, env={"ESCROW_KEY_DIR": "open"})
    assert loose.returncode == 2
    assert "chmod 600" in loose.stderr


async def test_audit_verify_finds_an_edited_row(tmp_path: Path) -> None:
    assert _cli("escrow", "init", "--dir", "keys", cwd=tmp_path).returncode == 0
    escrow_key = load_escrow_key(tmp_path / "keys" / "escrow.key")
    database = tmp_path / "escrow.db"
    async with open_escrow_service(
        escrow_key=escrow_key,
        audit_key=load_audit_key(tmp_path / "keys" / "audit.key"),
        policy=Policy(),
        sqlite_path=database,
        checkpoint_every=2,
    ) as service:
        for _ in range(3):
            await service.deposit(
                deposit_request(escrow_key, new_owner(), new_writer()), now_ms=NOW
            )
    args = ("audit", "verify", "--sqlite", str(database), "--key-dir", "keys")
    ok = _cli(*args, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 3 entries and 1 checkpoints verified" in ok.stdout
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE escrow_audit SET at_ms = at_ms + 1 WHERE seq = 2")
    broken = _cli(*args, cwd=tmp_path)
    assert broken.returncode == 1
    assert "first broken entry 2" in broken.stdout
    without_key = _cli(
        "audit", "verify", "--sqlite", str(database), "--key-dir", "none", cwd=tmp_path
    )
    assert without_key.returncode == 2
    assert "is missing" in without_key.stderr
