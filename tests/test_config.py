"""Configuration: file, environment and flags, later wins; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypertuna.config import Config, ConfigError, LimitsConfig, load_config, redacted

REPO = Path(__file__).resolve().parent.parent


def test_committed_example_is_valid_and_matches_defaults() -> None:
    assert load_config(REPO / "config" / "gateway.toml", environ={}) == Config()


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\n[limits]\nmax_limit = 7\n')
    config = load_config(
        path,
        environ={"HYPERTUNA_SERVER_PORT": "9002", "HYPERTUNA_LIMITS_MAX_FILTERS": "3"},
        overrides={"server.port": "9003"},
    )
    assert config.server.port == 9003
    assert config.server.host == "0.0.0.0"
    assert config.limits.max_limit == 7
    assert config.limits.max_filters == 3


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"server.port": "70000"}, "server.port"),
        ({"server.port": "eighty"}, "server.port"),
        ({"limits.max_frame_bytes": "0"}, "limits.max_frame_bytes"),
        ({"limits.events_per_second": "-1"}, "limits.events_per_second"),
        ({"server.log_level": "loud"}, "server.log_level"),
        ({"server.nope": "1"}, "server.nope"),
        ({"bogus.key": "1"}, "bogus"),
        ({"relay_info.pubkey": "XYZ"}, "relay_info.pubkey"),
        ({"storage.database_url": "mysql://x"}, "storage.database_url"),
        ({"operators.keys": "zz"}, "operators.keys"),
        ({"operators.keys": ["ab" * 31]}, "operators.keys"),
        ({"operators.max_skew_s": "0"}, "operators.max_skew_s"),
        ({"blind_peer.max_open_replicas": "0"}, "blind_peer.max_open_replicas"),
    ],
)
def test_invalid_values_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, environ={}, overrides=overrides)
    assert str(error.value).startswith(key)


def test_invalid_file_value_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[limits]\nmax_subscriptions = true\n")
    with pytest.raises(ConfigError, match=r"^limits\.max_subscriptions"):
        load_config(path, environ={})


def test_missing_explicit_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


def test_secrets_are_redacted() -> None:
    config = load_config(
        None,
        environ={"HYPERTUNA_STORAGE_DATABASE_URL": "postgresql://app:s3cret@db:5432/hyper"},
    )
    shown = redacted(config)
    assert shown["storage"]["database_url"] == "postgresql://app:***@db:5432/hyper"
    assert "s3cret" not in repr(shown)


def test_relay_urls() -> None:
    config = load_config(
        None, environ={}, overrides={"server.public_url": "https://relay.example/"}
    )
    assert config.relay_ws_url("ab" * 32) == f"wss://relay.example/relay/{'ab' * 32}"


def test_without_default_file_only_the_environment_and_overrides_count(tmp_path: Path) -> None:
    # The worker's stack: the gateway's config file (even one named by HYPERTUNA_CONFIG) is not
    # read, while HYPERTUNA_* settings and overrides still apply.
    gateway_file = tmp_path / "gateway.toml"
    gateway_file.write_text("[limits]\nmax_limit = 7\n")
    config = load_config(
        default_file=False,
        environ={"HYPERTUNA_CONFIG": str(gateway_file), "HYPERTUNA_LIMITS_MAX_FILTERS": "3"},
        overrides={"server.port": 9001},
    )
    assert config.limits.max_limit == LimitsConfig().max_limit
    assert (config.limits.max_filters, config.server.port) == (3, 9001)
    assert load_config(gateway_file, default_file=False).limits.max_limit == 7
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", default_file=False)


def test_operator_keys_from_file_and_environment(tmp_path: Path) -> None:
    first, second = "ab" * 32, "CD" * 32
    path = tmp_path / "g.toml"
    path.write_text(f'[operators]\nkeys = ["{first}"]\n')
    assert load_config(path, environ={}).operators.keys == (first,)
    # A comma-separated list from the environment replaces the file's; keys are lower-cased.
    environ = {"HYPERTUNA_OPERATORS_KEYS": f"{first}, {second}"}
    assert load_config(path, environ=environ).operators.keys == (first, second.lower())


REMOTE_ESCROW = {
    "ESCROW_URL": "https://escrow.internal:8443",
    "ESCROW_TLS_CA": "/etc/hypertuna/escrow-ca.pem",
    "ESCROW_TLS_CLIENT_CERT": "/etc/hypertuna/gateway.pem",
    "ESCROW_TLS_CLIENT_KEY": "/etc/hypertuna/gateway.key",
    "ESCROW_HMAC_CLIENT_ID": "gateway-1",
    "ESCROW_HMAC_SECRET": "ab" * 32,
}


def test_a_remote_escrow_from_the_escrow_environment() -> None:
    config = load_config(None, environ=REMOTE_ESCROW, overrides={"escrow.enabled": True})
    escrow = config.escrow
    assert escrow.remote and escrow.url == "https://escrow.internal:8443"
    assert (escrow.tls_ca, escrow.tls_client_cert, escrow.tls_client_key) == (
        "/etc/hypertuna/escrow-ca.pem",
        "/etc/hypertuna/gateway.pem",
        "/etc/hypertuna/gateway.key",
    )
    assert escrow.hmac_client_id == "gateway-1"
    assert escrow.read_hmac_secret() == bytes.fromhex("ab" * 32)
    assert (escrow.poll_wait_s, escrow.request_timeout_s) == (20, 5.0)
    # HYPERTUNA_ESCROW_* wins over ESCROW_*; the secret never shows.
    environ = {**REMOTE_ESCROW, "HYPERTUNA_ESCROW_HMAC_CLIENT_ID": "gateway-2"}
    config = load_config(None, environ=environ, overrides={"escrow.enabled": True})
    assert config.escrow.hmac_client_id == "gateway-2"
    assert redacted(config)["escrow"]["hmac_secret"] == "***"
    assert "ab" * 32 not in repr(redacted(config)) and "ab" * 32 not in repr(config)
    # Without url the embedded escrow is used.
    assert not load_config(None, environ={}, overrides={"escrow.enabled": True}).escrow.remote


@pytest.mark.parametrize(
    ("environ", "overrides", "message"),
    [
        (REMOTE_ESCROW, {}, "escrow.url: set, but escrow.enabled is false"),
        (
            REMOTE_ESCROW,
            {"escrow.enabled": True, "escrow.key_dir": "/keys"},
            "escrow.key_dir: only for the embedded escrow",
        ),
        (
            REMOTE_ESCROW,
            {"escrow.enabled": True, "escrow.database_url": "postgresql://db/escrow"},
            "escrow.database_url: only for the embedded escrow",
        ),
        (
            {**REMOTE_ESCROW, "ESCROW_URL": "http://escrow:8443"},
            {"escrow.enabled": True},
            "escrow.url: must be https://host:port",
        ),
        (
            {**REMOTE_ESCROW, "ESCROW_URL": "https://escrow:8443/escrow"},
            {"escrow.enabled": True},
            "without a path",
        ),
        (
            {k: v for k, v in REMOTE_ESCROW.items() if k != "ESCROW_TLS_CLIENT_KEY"},
            {"escrow.enabled": True},
            "escrow.tls_client_key: required with escrow.url",
        ),
        (
            {k: v for k, v in REMOTE_ESCROW.items() if k != "ESCROW_HMAC_SECRET"},
            {"escrow.enabled": True},
            "escrow.hmac_secret: required with escrow.url",
        ),
        (
            {**REMOTE_ESCROW, "ESCROW_HMAC_SECRET": "abcd"},
            {"escrow.enabled": True},
            "escrow.hmac_secret: must be at least 32 bytes",
        ),
        (
            {**REMOTE_ESCROW, "ESCROW_HMAC_CLIENT_ID": "gate:way"},
            {"escrow.enabled": True},
            "escrow.hmac_client_id",
        ),
        (
            {"ESCROW_TLS_CA": "/ca.pem"},
            {"escrow.enabled": True},
            "escrow.tls_ca: only used with escrow.url",
        ),
        (REMOTE_ESCROW, {"escrow.enabled": True, "escrow.poll_wait_s": 30}, "poll_wait_s"),
    ],
)
def test_bad_escrow_combinations_are_named(
    environ: dict[str, str], overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ=environ, overrides=overrides)


def test_an_hmac_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "escrow-secret"
    secret.write_text("cd" * 32 + "\n")
    environ = {**REMOTE_ESCROW, "ESCROW_HMAC_SECRET": f"@{secret}"}
    config = load_config(None, environ=environ, overrides={"escrow.enabled": True})
    assert config.escrow.read_hmac_secret() == bytes.fromhex("cd" * 32)
    assert redacted(config)["escrow"]["hmac_secret"] == f"@{secret}"
    secret.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        config.escrow.read_hmac_secret()
