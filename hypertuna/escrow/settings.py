"""The standalone escrow's settings, read once from the environment at the entry point.

- ``ESCROW_KEY_DIR``: directory of ``escrow.key`` and ``audit.key`` (``./var/escrow-keys``)
- ``ESCROW_DATABASE_URL``: PostgreSQL URL; when empty, the SQLite file below
- ``ESCROW_SQLITE_PATH``: the embedded SQLite database (``./var/escrow.db``)
- ``ESCROW_HOST`` / ``ESCROW_PORT``: where ``hypertuna escrow serve`` listens
  (``127.0.0.1``, ``8443``)
- ``ESCROW_TLS_CERT``, ``ESCROW_TLS_KEY``: the server certificate chain and key (PEM),
  reloaded on change; ``ESCROW_TLS_CA``: the CA bundle client certificates must chain to
  (all three required to serve)
- ``ESCROW_HMAC_CLIENTS``: ``client_id:hexsecret,...`` or ``@file`` (required to serve; see
  :mod:`hypertuna.edge.hmac_auth`)
- ``ESCROW_OPERATOR_KEYS``: comma-separated Ed25519 public keys (hex) of operators (none)
- ``ESCROW_MAX_SKEW_S``: accepted clock skew of signed requests, seconds (60)
- ``ESCROW_CHECKPOINT_EVERY``: sign an audit checkpoint every N entries (100)
- ``ESCROW_EXPIRY_INTERVAL_S``: how often due leases are expired, seconds (5)
- ``ESCROW_AUDIT_INTERVAL_S``: how often the audit chain is verified, seconds (300)
- ``ESCROW_LOG_LEVEL``: log level of ``hypertuna escrow serve`` (info)

plus the policy variables of :mod:`hypertuna.escrow.policy` (``ESCROW_LEASE_TTL_MS``, ...).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final

import attrs

from hypertuna.escrow.keys import load_audit_key, load_escrow_key
from hypertuna.escrow.policy import Policy, PolicyConfigError
from hypertuna.escrow.service import DEFAULT_CHECKPOINT_EVERY, EscrowService, open_escrow_service

__all__ = [
    "AUDIT_KEY_FILE",
    "DEFAULT_KEY_DIR",
    "DEFAULT_PORT",
    "DEFAULT_SQLITE_PATH",
    "ESCROW_KEY_FILE",
    "EscrowSettings",
    "EscrowSettingsError",
    "open_service",
]

DEFAULT_KEY_DIR: Final = Path("var/escrow-keys")
DEFAULT_SQLITE_PATH: Final = Path("var/escrow.db")
DEFAULT_PORT: Final = 8443
ESCROW_KEY_FILE: Final = "escrow.key"
AUDIT_KEY_FILE: Final = "audit.key"
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


class EscrowSettingsError(ValueError):
    """An ``ESCROW_*`` variable has a value that cannot be used (the message names it)."""


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise EscrowSettingsError(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise EscrowSettingsError(f"{name} must be in {low}..{high}, not {value}")
    return value


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw) if raw else None


@attrs.frozen
class EscrowSettings:
    """Everything the standalone escrow and its CLI commands need (see the module docstring)."""

    key_dir: Path = DEFAULT_KEY_DIR
    database_url: str | None = None
    sqlite_path: Path = DEFAULT_SQLITE_PATH
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: The raw ``ESCROW_HMAC_CLIENTS`` value (parsed when serving; it may name a file).
    hmac_clients: str | None = attrs.field(default=None, repr=False)
    operator_keys: frozenset[str] = frozenset()
    max_skew_s: int = 60
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    expiry_interval_s: int = 5
    audit_interval_s: int = 300
    policy: Policy = attrs.Factory(Policy)

    @property
    def escrow_key_path(self) -> Path:
        return self.key_dir / ESCROW_KEY_FILE

    @property
    def audit_key_path(self) -> Path:
        return self.key_dir / AUDIT_KEY_FILE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EscrowSettings:
        """The settings of ``env`` (usually ``os.environ``); raises
        :class:`EscrowSettingsError` naming the faulty variable."""
        operators: set[str] = set()
        for entry in env.get("ESCROW_OPERATOR_KEYS", "").split(","):
            key = entry.strip().lower()
            if not key:
                continue
            if _HEX64.fullmatch(key) is None:
                raise EscrowSettingsError(
                    "ESCROW_OPERATOR_KEYS must list Ed25519 public keys as 64 hex characters"
                )
            operators.add(key)
        try:
            policy = Policy.from_env(env)
        except PolicyConfigError as exc:
            raise EscrowSettingsError(str(exc)) from None
        hmac_clients = env.get("ESCROW_HMAC_CLIENTS", "").strip() or None
        return cls(
            key_dir=_path(env, "ESCROW_KEY_DIR") or DEFAULT_KEY_DIR,
            database_url=env.get("ESCROW_DATABASE_URL", "").strip() or None,
            sqlite_path=_path(env, "ESCROW_SQLITE_PATH") or DEFAULT_SQLITE_PATH,
            host=env.get("ESCROW_HOST", "").strip() or "127.0.0.1",
            port=_int(env, "ESCROW_PORT", DEFAULT_PORT, 0, 65535),
            tls_cert=_path(env, "ESCROW_TLS_CERT"),
            tls_key=_path(env, "ESCROW_TLS_KEY"),
            tls_ca=_path(env, "ESCROW_TLS_CA"),
            hmac_clients=hmac_clients,
            operator_keys=frozenset(operators),
            max_skew_s=_int(env, "ESCROW_MAX_SKEW_S", 60, 1, 3600),
            checkpoint_every=_int(
                env, "ESCROW_CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY, 1, 1_000_000
            ),
            expiry_interval_s=_int(env, "ESCROW_EXPIRY_INTERVAL_S", 5, 1, 3600),
            audit_interval_s=_int(env, "ESCROW_AUDIT_INTERVAL_S", 300, 1, 86_400),
            policy=policy,
        )


@contextlib.asynccontextmanager
async def open_service(settings: EscrowSettings) -> AsyncIterator[EscrowService]:
    """Load the key files (raising :class:`~hypertuna.escrow.keys.EscrowKeyError`, which is
    fatal: keys are never created at start), open and migrate the database, and yield the
    service. Pass ``lambda: open_service(settings)`` to
    :class:`~hypertuna.actors.escrow.EscrowActor`.
    """
    escrow_key = load_escrow_key(settings.escrow_key_path)
    audit_key = load_audit_key(settings.audit_key_path)
    async with open_escrow_service(
        escrow_key=escrow_key,
        audit_key=audit_key,
        policy=settings.policy,
        database_url=settings.database_url,
        sqlite_path=settings.sqlite_path,
        checkpoint_every=settings.checkpoint_every,
    ) as service:
        yield service
