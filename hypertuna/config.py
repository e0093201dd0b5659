"""Gateway configuration: one frozen object built at the entry point and passed down.

Sources, later wins: built-in defaults, the TOML file (``config/gateway.toml`` by default),
environment variables (``HYPERTUNA_<SECTION>_<KEY>``, e.g. ``HYPERTUNA_SERVER_PORT=9000``), then
command-line overrides (``section.key=value`` pairs). Every value is checked when the config is
built; an invalid one raises :class:`ConfigError` naming the key, so the gateway fails at start,
never later.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ESCROW_ENV_NAMES",
    "BlindPeerConfig",
    "Config",
    "ConfigError",
    "EscrowConfig",
    "LimitsConfig",
    "OperatorsConfig",
    "RelayInfoConfig",
    "ServerConfig",
    "StorageConfig",
    "WorkersConfig",
    "load_config",
    "redacted",
]

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")
ENV_PREFIX = "HYPERTUNA_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def _poll_wait(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= 25:
        raise ValueError(
            f"must be 1-25 seconds (the escrow answers a poll within 25), got {value!r}"
        )


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port 0-65535, got {value!r}")


@attrs.frozen
class ServerConfig:
    """Where the edge listens and how it shuts down."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080, validator=_port)
    #: URL that clients use to reach this gateway (behind a proxy); derived from host/port if "".
    public_url: str = ""
    #: Seconds that open connections get to finish after a shutdown signal.
    graceful_timeout_s: float = attrs.field(default=5.0, validator=_non_negative)
    log_level: str = attrs.field(
        default="info",
        validator=attrs.validators.in_(["debug", "info", "warning", "error"]),
    )


@attrs.frozen
class StorageConfig:
    """Where data lives: files under ``data_dir``; SQLite there unless a PostgreSQL URL is set."""

    data_dir: Path = Path("var")
    #: "" means the embedded default (SQLite under data_dir); else a postgresql:// URL.
    database_url: str = ""
    #: Largest number of events written in one durable transaction (group commit).
    max_batch: int = attrs.field(default=256, validator=_positive)

    @property
    def cores_dir(self) -> Path:
        """Where the signed logs (cores) live: ``<data_dir>/cores``."""
        return self.data_dir / "cores"


@attrs.frozen
class LimitsConfig:
    """Protection limits applied per connection; exceeding one gets a standard error text."""

    max_frame_bytes: int = attrs.field(default=128 * 1024, validator=_positive)
    max_subscriptions: int = attrs.field(default=32, validator=_positive)
    max_filters: int = attrs.field(default=10, validator=_positive)
    max_limit: int = attrs.field(default=500, validator=_positive)
    max_sub_id_length: int = attrs.field(default=64, validator=_positive)
    max_filter_values: int = attrs.field(default=1000, validator=_positive)
    #: Sustained EVENT rate per connection, and the burst allowed above it.
    events_per_second: float = attrs.field(default=50.0, validator=_positive)
    events_burst: int = attrs.field(default=100, validator=_positive)
    #: EVENTs of one connection awaiting their OK at once; more wait for a slot.
    max_in_flight_events: int = attrs.field(default=64, validator=_positive)
    #: Events more than this many seconds ahead of the gateway clock are refused.
    max_future_s: int = attrs.field(default=900, validator=_non_negative)
    #: Live events buffered for one connection before it is closed as too slow.
    outbox_frames: int = attrs.field(default=1024, validator=_positive)


@attrs.frozen
class RelayInfoConfig:
    """Operator details served in every hosted relay's NIP-11 document."""

    contact: str = ""
    #: Operator's Nostr public key (64 hex), or "".
    pubkey: str = attrs.field(default="")
    software: str = "https://hypertuna.org/gateway"

    @pubkey.validator
    def _check_pubkey(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError("must be 64 lowercase hex characters or empty")


@attrs.frozen
class WorkersConfig:
    """Worker connections (``/gateway/worker``) and the peer sweep."""

    #: Seconds between heartbeats, each way.
    heartbeat_interval_s: float = attrs.field(default=5.0, validator=_positive)
    #: A worker silent this long is dead: its client sessions fail over to another worker.
    liveness_timeout_s: float = attrs.field(default=15.0, validator=_positive)
    #: Seconds one worker gets to accept a forwarded client session before the sweep moves on.
    sweep_timeout_s: float = attrs.field(default=1.0, validator=_positive)
    #: Seconds a new worker connection has to complete the challenge/hello handshake.
    handshake_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    #: Largest control message in bytes; a larger one closes the connection with 1009.
    max_message_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    #: Relay-frames messages buffered for one forwarded client before it is closed as too slow.
    session_buffer_messages: int = attrs.field(default=256, validator=_positive)


@attrs.frozen
class BlindPeerConfig:
    """The blind-peer store: verified mirrors of the cores of worker-registered relays."""

    #: Bytes of mirrored blocks the gateway holds in all (default 25 GiB).
    max_bytes: int = attrs.field(default=25 * 1024**3, validator=_positive)
    #: Bytes of mirrored blocks per relay owner key; 0 means only the total limit applies.
    max_bytes_per_owner: int = attrs.field(default=0, validator=_non_negative)
    #: Largest single block accepted in a mirror update.
    max_block_bytes: int = attrs.field(default=512 * 1024, validator=_positive)
    #: A mirror behind its worker's announced length for this long is ``stale``, not ``syncing``.
    stale_after_s: float = attrs.field(default=60.0, validator=_positive)
    #: A mirror without a stored update for this long (default 7 days) is garbage collected,
    #: unless its relay is held (pending writes, an active lease, an open replica).
    mirror_ttl_s: float = attrs.field(default=7 * 24 * 3600.0, validator=_positive)
    #: How often garbage collection runs (it also runs on demand).
    gc_interval_s: float = attrs.field(default=3600.0, validator=_positive)
    #: Replicas open at once (relays served from their mirrors); opening one more closes the
    #: least recently used, whose clients sweep again.
    max_open_replicas: int = attrs.field(default=64, validator=_positive)


def _operator_keys(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of Ed25519 public keys, got {value!r}")
    return tuple(key.strip().lower() if isinstance(key, str) else key for key in value)


def _check_operator_keys(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    for key in value:
        if not isinstance(key, str) or len(key) != 64 or any(c not in _HEX for c in key):
            raise ValueError(f"{key!r} is not an Ed25519 public key (64 hex characters)")


_HEX = frozenset("0123456789abcdef")


@attrs.frozen
class OperatorsConfig:
    """Who may call the signed operator API (``/api/...``, DESIGN §5)."""

    #: Ed25519 public keys (64 hex) whose signed requests the operator API accepts; empty means
    #: every operator call is refused with 401.
    keys: tuple[str, ...] = attrs.field(
        default=(), converter=_operator_keys, validator=_check_operator_keys
    )
    #: Largest difference, either way, between a request's timestamp and the gateway's clock.
    max_skew_s: int = attrs.field(default=60, validator=_positive)


@attrs.frozen
class EscrowConfig:
    """The gateway's escrow: embedded (``enabled`` without ``url``: the EscrowActor runs in this
    process, its policy from the ``ESCROW_*`` environment variables of
    :mod:`hypertuna.escrow.policy`) or remote (``enabled`` with ``url``: a standalone
    ``hypertuna escrow`` reached over mutual TLS with HMAC-signed requests). The remote settings
    may also come from ``ESCROW_URL``, ``ESCROW_TLS_CA``, ``ESCROW_TLS_CLIENT_CERT``,
    ``ESCROW_TLS_CLIENT_KEY``, ``ESCROW_HMAC_CLIENT_ID`` and ``ESCROW_HMAC_SECRET``
    (:data:`ESCROW_ENV_NAMES`)."""

    #: Use an escrow and serve ``/api/escrow/...``. Embedded, its keys must exist
    #: (``hypertuna escrow init --dir <key_dir>``): a missing key is a fatal error at start.
    enabled: bool = False
    #: Embedded: where ``escrow.key`` and ``audit.key`` live; "" means ``<data_dir>/escrow-keys``.
    key_dir: str = ""
    #: Embedded: PostgreSQL URL of the escrow's database; "" means SQLite at
    #: ``<data_dir>/escrow.db``.
    database_url: str = ""
    #: Remote: ``https://host:port`` of the standalone escrow (no path); "" means embedded.
    url: str = ""
    #: Remote: the CA bundle (PEM) the escrow's server certificate must chain to.
    tls_ca: str = ""
    #: Remote: this gateway's client certificate and its key (PEM), reloaded on change.
    tls_client_cert: str = ""
    tls_client_key: str = ""
    #: Remote: this gateway's client id in the escrow's ``ESCROW_HMAC_CLIENTS``.
    hmac_client_id: str = ""
    #: Remote: its shared secret, hex (32 bytes or more), or ``@/path/to/file`` holding it.
    hmac_secret: str = attrs.field(default="", repr=False)
    #: Remote: seconds each lease-event long poll waits at the escrow (1-25).
    poll_wait_s: int = attrs.field(default=20, validator=_poll_wait)
    #: Remote: seconds to connect, and seconds for an answer, per request attempt.
    request_timeout_s: float = attrs.field(default=5.0, validator=_positive)

    @property
    def remote(self) -> bool:
        """A standalone escrow is used (``enabled`` with ``url``)."""
        return self.enabled and bool(self.url)

    def read_hmac_secret(self) -> bytes:
        """The HMAC secret's bytes (read from its file for ``@path``); :class:`ConfigError`
        naming ``escrow.hmac_secret`` when it cannot be used."""
        value = self.hmac_secret.strip()
        if value.startswith("@"):
            try:
                value = Path(value[1:]).expanduser().read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"escrow.hmac_secret: cannot read {value[1:]}: {exc.strerror or exc}"
                ) from None
        if len(value) < 64 or len(value) % 2 or any(c not in _HEX_ANY for c in value):
            raise ConfigError(
                "escrow.hmac_secret: must be at least 32 bytes as hex (64 hex digits), "
                "or @file holding them"
            )
        return bytes.fromhex(value)


#: The ``ESCROW_*`` variables that set the remote escrow settings (between the file and the
#: ``HYPERTUNA_ESCROW_*`` variables in precedence).
ESCROW_ENV_NAMES: Mapping[str, str] = {
    "ESCROW_URL": "url",
    "ESCROW_TLS_CA": "tls_ca",
    "ESCROW_TLS_CLIENT_CERT": "tls_client_cert",
    "ESCROW_TLS_CLIENT_KEY": "tls_client_key",
    "ESCROW_HMAC_CLIENT_ID": "hmac_client_id",
    "ESCROW_HMAC_SECRET": "hmac_secret",
}
_REMOTE_ONLY = ("tls_ca", "tls_client_cert", "tls_client_key", "hmac_client_id", "hmac_secret")
_HEX_ANY = frozenset("0123456789abcdefABCDEF")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _check_escrow(escrow: EscrowConfig) -> None:
    """The combinations of escrow settings that make sense; :class:`ConfigError` otherwise."""
    if not escrow.url:
        if escrow.enabled:
            for name in _REMOTE_ONLY:
                if getattr(escrow, name):
                    raise ConfigError(
                        f"escrow.{name}: only used with escrow.url (a standalone escrow); "
                        "the embedded escrow needs no client settings"
                    )
        return
    if not escrow.enabled:
        raise ConfigError(
            "escrow.url: set, but escrow.enabled is false (enable the escrow to use the "
            "standalone one at escrow.url)"
        )
    for name in ("key_dir", "database_url"):
        if getattr(escrow, name):
            raise ConfigError(
                f"escrow.{name}: only for the embedded escrow; with escrow.url the standalone "
                "escrow has its own (ESCROW_KEY_DIR, ESCROW_DATABASE_URL where it runs)"
            )
    parts = urlsplit(escrow.url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme != "https"
        or not parts.hostname
        or port is None
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"escrow.url: must be https://host:port without a path, got {escrow.url!r} (the "
            "escrow is only served over mutual TLS, and a signed request names the same path "
            "on both sides)"
        )
    for name, env in (
        ("tls_ca", "ESCROW_TLS_CA"),
        ("tls_client_cert", "ESCROW_TLS_CLIENT_CERT"),
        ("tls_client_key", "ESCROW_TLS_CLIENT_KEY"),
        ("hmac_client_id", "ESCROW_HMAC_CLIENT_ID"),
        ("hmac_secret", "ESCROW_HMAC_SECRET"),
    ):
        if not getattr(escrow, name):
            raise ConfigError(f"escrow.{name}: required with escrow.url (or {env})")
    if _CLIENT_ID.fullmatch(escrow.hmac_client_id) is None:
        raise ConfigError("escrow.hmac_client_id: 1-128 characters of [A-Za-z0-9_.-]")
    if not escrow.hmac_secret.strip().startswith("@"):
        escrow.read_hmac_secret()


@attrs.frozen
class Config:
    """The effective gateway configuration."""

    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    limits: LimitsConfig = LimitsConfig()
    relay_info: RelayInfoConfig = RelayInfoConfig()
    workers: WorkersConfig = WorkersConfig()
    blind_peer: BlindPeerConfig = BlindPeerConfig()
    operators: OperatorsConfig = OperatorsConfig()
    escrow: EscrowConfig = EscrowConfig()

    @property
    def base_http_url(self) -> str:
        """The public http(s) base URL without a trailing slash."""
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"

    def relay_ws_url(self, relay_key: str, base_http_url: str | None = None) -> str:
        """The ws(s):// URL of a hosted relay."""
        base = base_http_url or self.base_http_url
        scheme, _, rest = base.partition("://")
        ws_scheme = "wss" if scheme == "https" else "ws"
        return f"{ws_scheme}://{rest}/relay/{relay_key}"


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "limits": LimitsConfig,
    "relay_info": RelayInfoConfig,
    "workers": WorkersConfig,
    "blind_peer": BlindPeerConfig,
    "operators": OperatorsConfig,
    "escrow": EscrowConfig,
}


def _coerce(key: str, field: attrs.Attribute[Any], raw: object) -> object:
    """Convert a TOML/env/CLI value to the field's type, or raise ConfigError naming ``key``."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false"):
                return raw.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, int):
                return raw
            if isinstance(raw, str):
                return int(raw.strip())
            raise ValueError
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, int | float):
                return float(raw)
            if isinstance(raw, str):
                return float(raw.strip())
            raise ValueError
        if kind == "Path":
            if isinstance(raw, str | Path):
                return Path(raw)
            raise ValueError
        if kind == "str":
            if isinstance(raw, str):
                return raw
            raise ValueError
        if kind == "tuple[str, ...]":
            # A TOML array, or (from the environment and the command line) a comma-separated
            # string.
            if isinstance(raw, str):
                return tuple(item.strip() for item in raw.split(",") if item.strip())
            if isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
                return tuple(raw)
            raise ConfigError(f"{key}: expected a list of strings, got {raw!r}")
    except ValueError:
        raise ConfigError(f"{key}: expected {kind}, got {raw!r}") from None
    raise ConfigError(f"{key}: unsupported field type {kind}")  # pragma: no cover


def _merge(layers: list[tuple[str, Mapping[str, Mapping[str, object]]]]) -> Config:
    values: dict[str, dict[str, object]] = {name: {} for name in _SECTIONS}
    for source, layer in layers:
        for section, entries in layer.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{section}: unknown section (from {source})")
            if not isinstance(entries, Mapping):
                raise ConfigError(f"{section}: must be a table (from {source})")
            fields = {f.name: f for f in attrs.fields(_SECTIONS[section])}
            for name, raw in entries.items():
                key = f"{section}.{name}"
                if name not in fields:
                    raise ConfigError(f"{key}: unknown setting (from {source})")
                values[section][name] = _coerce(key, fields[name], raw)
    built: dict[str, object] = {}
    for section, cls in _SECTIONS.items():
        try:
            built[section] = cls(**values[section])
        except (ValueError, TypeError) as exc:
            # attrs validators raise ValueError("must be ...") without the field name; find it.
            raise ConfigError(_name_failure(section, cls, values[section], exc)) from None
    workers = built["workers"]
    assert isinstance(workers, WorkersConfig)
    if workers.liveness_timeout_s <= workers.heartbeat_interval_s:
        raise ConfigError("workers.liveness_timeout_s: must be longer than heartbeat_interval_s")
    storage = built["storage"]
    assert isinstance(storage, StorageConfig)
    if storage.database_url and urlsplit(storage.database_url).scheme not in (
        "postgresql",
        "postgres",
        "sqlite",
    ):
        raise ConfigError("storage.database_url: must be a postgresql:// or sqlite: URL")
    escrow = built["escrow"]
    assert isinstance(escrow, EscrowConfig)
    _check_escrow(escrow)
    return Config(**built)  # type: ignore[arg-type]


def _name_failure(section: str, cls: type[Any], given: Mapping[str, object], exc: Exception) -> str:
    for name, value in given.items():
        try:
            cls(**{name: value})
        except (ValueError, TypeError) as single:
            return f"{section}.{name}: {single}"
    return f"{section}: {exc}"


def _escrow_env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, object]]:
    entries: dict[str, object] = {
        field: environ[name]
        for name, field in ESCROW_ENV_NAMES.items()
        if environ.get(name, "").strip()
    }
    return {"escrow": entries} if entries else {}


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, object]]:
    layer: dict[str, dict[str, object]] = {}
    for section, cls in _SECTIONS.items():
        for field in attrs.fields(cls):
            env_name = f"{ENV_PREFIX}{section.upper()}_{field.name.upper()}"
            if env_name in environ:
                layer.setdefault(section, {})[field.name] = environ[env_name]
    return layer


def _overrides_layer(overrides: Mapping[str, object]) -> dict[str, dict[str, object]]:
    layer: dict[str, dict[str, object]] = {}
    for dotted, value in overrides.items():
        section, sep, name = dotted.partition(".")
        if not sep or not name:
            raise ConfigError(f"{dotted}: overrides are written section.key")
        layer.setdefault(section, {})[name] = value
    return layer


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    default_file: bool = True,
) -> Config:
    """Build the effective config from ``path`` (else, when ``default_file`` is true, the file
    named by ``HYPERTUNA_CONFIG``, or ``config/gateway.toml`` when it exists; a file that was
    named must exist), ``environ`` (default ``os.environ``) and ``overrides``
    (``{"server.port": 9000}``), later sources winning."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, Mapping[str, object]]]] = []
    env_path = environ.get(f"{ENV_PREFIX}CONFIG")
    chosen: Path | None = path
    if chosen is None and default_file:
        chosen = Path(env_path) if env_path else DEFAULT_CONFIG_PATH
    # Only the implicit default may be missing; a file someone named must exist.
    required = path is not None or (default_file and env_path is not None)
    if chosen is not None and (required or chosen.exists()):
        try:
            with chosen.open("rb") as handle:
                layers.append((str(chosen), tomllib.load(handle)))
        except FileNotFoundError:
            raise ConfigError(f"config file {chosen} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
    layers.append(("environment (ESCROW_*)", _escrow_env_layer(environ)))
    layers.append(("environment", _env_layer(environ)))
    layers.append(("command line", _overrides_layer(overrides or {})))
    return _merge(layers)


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redacted(config: Config) -> dict[str, dict[str, object]]:
    """The config as plain data for display, with secrets (passwords in URLs) masked."""
    out: dict[str, dict[str, object]] = {}
    for section in _SECTIONS:
        data = attrs.asdict(getattr(config, section))
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif "secret" in key and isinstance(value, str) and value:
                # A file name is no secret; the secret itself is.
                data[key] = value if value.startswith("@") else "***"
            elif isinstance(value, str) and "://" in value:
                data[key] = _redact_url(value)
        out[section] = data
    return out
