"""The ``hypertuna`` command.

    hypertuna gateway [--demo]            run the gateway until SIGINT/SIGTERM
    hypertuna config check                print the effective config, secrets redacted
    hypertuna relay create NAME           create a hosted relay and print its URL
    hypertuna relay list                  list hosted relays
    hypertuna worker --gateway URL --data DIR [--host H --port P] [--escrow-fingerprint HEX]
                                          run a reference worker until SIGINT/SIGTERM
    hypertuna worker relay create NAME --data DIR
    hypertuna worker relay list --data DIR
    hypertuna worker status --data DIR [--json]
                                          the running worker's mirror and escrow status
    hypertuna admin keygen --out FILE     make an operator key (prints its public key)
    hypertuna admin call METHOD PATH [--body JSON] [--key FILE] [--url BASE]
                                          a signed operator API call (prints the JSON answer)
    hypertuna escrow init [--dir DIR]     create the escrow's key files once (0600)
    hypertuna escrow migrate [--database-url URL | --sqlite PATH]
                                          apply the escrow database migrations
    hypertuna escrow [serve]              the standalone escrow (HTTPS, mutual TLS, HMAC)
    hypertuna audit verify [--database-url URL | --sqlite PATH] [--key-dir DIR]
                                          verify the escrow audit chain (exit 1 when broken)

Every gateway command takes ``--config PATH``, ``--host``, ``--port``, ``--data-dir``,
``--database-url`` and ``--set section.key=value`` (repeatable); they override the config file
and the environment. Worker commands take only their own flags: a worker keeps everything in
its ``--data`` directory. Admin commands need no config: ``--key`` defaults to
``$HYPERTUNA_ADMIN_KEY``, ``--url`` to ``$HYPERTUNA_ADMIN_URL`` or ``http://127.0.0.1:8080``.
Escrow and audit commands read the ``ESCROW_*`` environment (:mod:`hypertuna.escrow.settings`);
their flags override it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from hypertuna import __version__
from hypertuna.config import Config, ConfigError, load_config, redacted
from hypertuna.escrow.keys import EscrowKeyError
from hypertuna.storage.cores import CoreError
from hypertuna.storage.corestore import CoreStore, CoreStoreError
from hypertuna.storage.events import (
    RelayExistsError,
    RelayRecord,
    RelayRegisteredError,
    StorageError,
    open_event_store,
)
from hypertuna.storage.hosted import create_hosted_relay

if TYPE_CHECKING:
    from hypertuna.escrow.settings import EscrowSettings

__all__ = ["main", "validate_relay_name"]

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def validate_relay_name(name: str) -> str:
    """Relay aliases are lowercase slugs of 1-64 characters (letters, digits, inner dashes)
    that cannot be mistaken for a relay key."""
    if not _NAME.fullmatch(name) or _HEX64.fullmatch(name):
        raise CliError(
            f"invalid relay name {name!r}: use 1-64 lowercase letters, digits and inner dashes"
        )
    return name


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="TOML config file (default config/gateway.toml)"
    )
    common.add_argument("--host", help="listen address (server.host)")
    common.add_argument("--port", help="listen port (server.port)")
    common.add_argument("--data-dir", help="data directory (storage.data_dir)")
    common.add_argument("--database-url", help="postgresql:// URL (storage.database_url)")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting",
    )

    parser = argparse.ArgumentParser(prog="hypertuna", description="Hypertuna public gateway")
    parser.add_argument("--version", action="version", version=f"hypertuna {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", parents=[common], help="run the gateway")
    gateway.add_argument(
        "--demo", action="store_true", help="create a relay named 'demo' if no relay exists"
    )

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser(
        "check", parents=[common], help="print the effective config (secrets redacted)"
    )

    relay = commands.add_parser("relay", help="manage hosted relays")
    relay_commands = relay.add_subparsers(dest="relay_command", required=True)
    create = relay_commands.add_parser("create", parents=[common], help="create a hosted relay")
    create.add_argument("name", help="alias: lowercase letters, digits, dashes")
    create.add_argument("--description", default="", help="NIP-11 description")
    relay_commands.add_parser("list", parents=[common], help="list hosted relays")
    _add_worker_parser(commands)
    _add_admin_parser(commands)
    _add_escrow_parsers(commands)
    return parser


def _add_database_flags(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--database-url", metavar="URL", help="PostgreSQL URL (default $ESCROW_DATABASE_URL)"
    )
    where.add_argument(
        "--sqlite", type=Path, metavar="PATH", help="SQLite file (default $ESCROW_SQLITE_PATH)"
    )


def _add_escrow_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    escrow = commands.add_parser(
        "escrow",
        help="the key escrow: keys, migrations, standalone server",
        description="Without a sub-command: serve the standalone escrow (like `escrow serve`).",
    )
    escrow_commands = escrow.add_subparsers(dest="escrow_command")
    init = escrow_commands.add_parser(
        "init", help="create escrow.key and audit.key once (never overwritten)"
    )
    init.add_argument(
        "--dir", type=Path, metavar="DIR", help="key directory (default $ESCROW_KEY_DIR)"
    )
    migrate = escrow_commands.add_parser("migrate", help="apply the escrow database migrations")
    _add_database_flags(migrate)
    escrow_commands.add_parser(
        "serve", help="serve the standalone escrow over HTTPS with client certificates"
    )
    audit = commands.add_parser("audit", help="the escrow audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="recompute the hash chain and check the signed checkpoints"
    )
    _add_database_flags(verify)
    verify.add_argument(
        "--key-dir", type=Path, metavar="DIR", help="key directory (default $ESCROW_KEY_DIR)"
    )


def _escrow_settings(args: argparse.Namespace) -> EscrowSettings:
    from hypertuna.escrow.settings import EscrowSettings, EscrowSettingsError

    try:
        settings = EscrowSettings.from_env(os.environ)
    except EscrowSettingsError as exc:
        raise CliError(str(exc)) from None
    if getattr(args, "database_url", None):
        settings = attrs.evolve(settings, database_url=args.database_url)
    if getattr(args, "sqlite", None) is not None:
        settings = attrs.evolve(settings, sqlite_path=args.sqlite, database_url=None)
    for flag in ("dir", "key_dir"):
        if getattr(args, flag, None) is not None:
            settings = attrs.evolve(settings, key_dir=getattr(args, flag))
    return settings


def _escrow_main(args: argparse.Namespace) -> int:
    from hypertuna.escrow.keys import EscrowKeyError

    settings = _escrow_settings(args)
    try:
        if args.escrow_command == "init":
            return _escrow_init(settings)
        if args.escrow_command == "migrate":
            return trio.run(_escrow_migrate, settings)
        return _escrow_serve(settings)
    except EscrowKeyError as exc:
        raise CliError(f"escrow: {exc}") from None


def _escrow_init(settings: EscrowSettings) -> int:
    from hypertuna.escrow.keys import EscrowKeyError, create_audit_key, create_escrow_key

    for path in (settings.escrow_key_path, settings.audit_key_path):
        if path.exists() or path.is_symlink():
            raise EscrowKeyError(
                f"{path} already exists; escrow keys are created once and never regenerated"
            )
    escrow_key = create_escrow_key(settings.escrow_key_path)
    audit_key = create_audit_key(settings.audit_key_path)
    print(f"escrow key:  {settings.escrow_key_path}")
    print(f"  public key:  {escrow_key.public_key.hex()}")
    print(f"  fingerprint: {escrow_key.fingerprint}")
    print(f"audit key:   {settings.audit_key_path}")
    print(f"  public key:  {audit_key.public_key.hex()}")
    print(f"  fingerprint: {audit_key.fingerprint}")
    return 0


async def _escrow_migrate(settings: EscrowSettings) -> int:
    from hypertuna.escrow.store import load_escrow_migrations, open_escrow_database

    async with open_escrow_database(settings.database_url, settings.sqlite_path) as db:
        applied = list(db.applied_migrations)
        flavour = "sqlite" if db.backend == "sqlite" else "postgres"
    known = [migration.version for migration in load_escrow_migrations(flavour)]
    where = "PostgreSQL" if settings.database_url else str(settings.sqlite_path)
    if applied:
        print(f"applied escrow migrations {', '.join(map(str, applied))} on {where}")
    else:
        print(f"escrow database {where} is up to date")
    print(f"schema versions: {', '.join(map(str, known))}")
    return 0


def _escrow_serve(settings: EscrowSettings) -> int:
    from hypertuna.edge.tls import TlsContextError
    from hypertuna.escrow.keys import EscrowKeyError
    from hypertuna.escrow.settings import EscrowSettingsError

    logging.basicConfig(
        level=os.environ.get("ESCROW_LOG_LEVEL", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trio.run(_run_escrow, settings)
    except* EscrowKeyError as group:
        raise CliError(f"escrow: {group.exceptions[0]}") from None
    except* (EscrowSettingsError, TlsContextError) as group:
        raise CliError(f"escrow: {group.exceptions[0]}") from None
    except* (ValueError, OSError) as group:
        # ESCROW_HMAC_CLIENTS that cannot be used (a bad entry, an unreadable file).
        raise CliError(f"escrow: {group.exceptions[0]}") from None
    return 0


async def _run_escrow(settings: EscrowSettings) -> None:
    from hypertuna.escrow.standalone import serve_escrow

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stop = trio.Event()

        async def shutdown_trigger() -> None:
            await stop.wait()

        async with trio.open_nursery() as nursery:
            started = await nursery.start(
                lambda task_status: serve_escrow(
                    settings, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
            )
            fingerprint = started.actor.service.escrow_key.fingerprint
            print(
                f"Hypertuna escrow listening on https://{settings.host}:{started.port}"
                f" (key fingerprint {fingerprint})",
                flush=True,
            )
            async for signum in signals:
                logging.getLogger("hypertuna").info(
                    "received %s, shutting down", signal.Signals(signum).name
                )
                break
            stop.set()
    print("Hypertuna escrow stopped", flush=True)


def _audit_main(args: argparse.Namespace) -> int:
    from hypertuna.escrow.keys import EscrowKeyError

    settings = _escrow_settings(args)
    try:
        return trio.run(_audit_verify, settings)
    except EscrowKeyError as exc:
        raise CliError(f"audit verify: {exc}") from None


async def _audit_verify(settings: EscrowSettings) -> int:
    from hypertuna.escrow import store
    from hypertuna.escrow.audit import verify_chain
    from hypertuna.escrow.keys import load_audit_key

    audit_key = load_audit_key(settings.audit_key_path)
    async with store.open_escrow_database(settings.database_url, settings.sqlite_path) as db:
        entries, marks = await db.read(lambda r: (store.audit_entries(r), store.checkpoints(r)))
    result = await trio.to_thread.run_sync(verify_chain, entries, marks, audit_key.public_key)
    if result.valid:
        print(f"OK: {result.entries} entries and {result.checkpoints} checkpoints verified")
        return 0
    print(
        f"BROKEN: first broken entry {result.first_broken_seq}: {result.message}"
        f" ({result.entries} entries, {result.checkpoints} checkpoints)"
    )
    return 1


def _add_admin_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = commands.add_parser("admin", help="the signed operator API")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    keygen = admin_commands.add_parser(
        "keygen", help="make an operator key file; prints the public key for operators.keys"
    )
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="new key file")
    call = admin_commands.add_parser("call", help="make a signed call, print the JSON answer")
    call.add_argument("method", help="GET, POST, DELETE, ...")
    call.add_argument("path", help="e.g. /api/blind-peer")
    call.add_argument("--body", metavar="JSON", help="JSON request body")
    call.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        default=os.environ.get("HYPERTUNA_ADMIN_KEY"),
        help="key file from `admin keygen` (default $HYPERTUNA_ADMIN_KEY)",
    )
    call.add_argument(
        "--url",
        metavar="BASE",
        default=os.environ.get("HYPERTUNA_ADMIN_URL", "http://127.0.0.1:8080"),
        help="the gateway's base URL (default $HYPERTUNA_ADMIN_URL or http://127.0.0.1:8080)",
    )


def _admin_main(args: argparse.Namespace) -> int:
    from hypertuna.admin_client import AdminError, call, describe_failure, generate_key, load_key

    try:
        if args.admin_command == "keygen":
            public_key = generate_key(args.out)
            print(public_key)
            print(
                f'wrote {args.out}; allow it with operators.keys = ["{public_key}"]',
                file=sys.stderr,
            )
            return 0
        if args.key is None:
            raise CliError("admin call: --key FILE (or $HYPERTUNA_ADMIN_KEY) is required")
        body = b""
        if args.body is not None:
            try:
                json.loads(args.body)
            except ValueError as exc:
                raise CliError(f"admin call: --body is not JSON: {exc}") from None
            body = args.body.encode("utf-8")
        response = call(load_key(Path(args.key)), args.method, args.url, args.path, body)
    except AdminError as exc:
        if args.admin_command == "keygen":
            raise CliError(f"admin keygen: {exc}") from None
        print(f"hypertuna: admin call: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(response.body, indent=2, sort_keys=True, ensure_ascii=False))
    if not response.ok:
        print(f"hypertuna: admin call: {describe_failure(response)}", file=sys.stderr)
        return 1
    return 0


def _add_worker_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a reference worker that hosts relays for a gateway",
        description="Host relays in DIR, serve them on a local endpoint, and through a gateway.",
    )
    worker.add_argument("--gateway", metavar="URL", help="the gateway's base URL (http://...)")
    worker.add_argument("--data", type=Path, metavar="DIR", help="the worker's data directory")
    worker.add_argument("--host", default="127.0.0.1", help="local endpoint address")
    worker.add_argument("--port", type=int, default=0, help="local endpoint port (0 = any)")
    worker.add_argument(
        "--escrow-fingerprint",
        metavar="HEX",
        default=os.environ.get("HYPERTUNA_WORKER_ESCROW_FINGERPRINT") or None,
        help="the gateway escrow's fingerprint to trust (default"
        " $HYPERTUNA_WORKER_ESCROW_FINGERPRINT; unset: pinned on first use)",
    )
    worker.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    worker_commands = worker.add_subparsers(dest="worker_command")
    relay = worker_commands.add_parser("relay", help="manage the worker's relays")
    relay_commands = relay.add_subparsers(dest="worker_relay_command", required=True)
    # SUPPRESS: a sub-command's default must not erase a --data given before it.
    data = {"type": Path, "metavar": "DIR", "default": argparse.SUPPRESS}
    create = relay_commands.add_parser("create", help="create a relay hosted by this worker")
    create.add_argument("name", help="alias: lowercase letters, digits, dashes")
    create.add_argument("--description", default="", help="NIP-11 description")
    create.add_argument("--data", help="the worker's data directory", **data)  # type: ignore[arg-type]
    listing = relay_commands.add_parser("list", help="list the worker's relays")
    listing.add_argument("--data", help="the worker's data directory", **data)  # type: ignore[arg-type]
    status = worker_commands.add_parser(
        "status", help="the mirror status the worker last wrote (mirror-status.json)"
    )
    status.add_argument("--data", help="the worker's data directory", **data)  # type: ignore[arg-type]
    status.add_argument("--json", action="store_true", help="print the status file as JSON")


def _worker_main(args: argparse.Namespace) -> int:
    from hypertuna.worker.identity import IdentityError
    from hypertuna.worker.runner import (
        create_worker_relay,
        list_worker_relays,
        run_worker,
        worker_config,
    )
    from hypertuna.worker.settings import WorkerSettings

    data_dir: Path | None = args.data
    if data_dir is None:
        raise CliError("worker: --data DIR is required")
    if args.worker_command == "status":
        return _worker_status(data_dir, as_json=args.json)
    try:
        config = worker_config(data_dir, host=args.host, port=args.port, log_level=args.log_level)
    except ValueError as exc:
        raise CliError(f"worker: {exc}") from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.worker_command == "relay" and args.worker_relay_command == "create":
        name = validate_relay_name(args.name)
        try:
            record = trio.run(create_worker_relay, data_dir, name, args.description)
        except RelayExistsError:
            raise CliError(f"a relay named {name!r} already exists") from None
        print(f"created relay {record.name}")
        print(f"  key: {record.key}")
        return 0
    if args.worker_command == "relay":
        for record in trio.run(list_worker_relays, data_dir):
            print(f"{record.name}\t{record.key}")
        return 0
    if not args.gateway:
        raise CliError("worker: --gateway URL is required")
    try:
        settings = WorkerSettings(
            gateway_url=args.gateway, escrow_fingerprint=args.escrow_fingerprint
        )
    except ValueError as exc:
        raise CliError(f"worker: {exc}") from None
    try:
        trio.run(run_worker, settings, config)
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    return 0


def _worker_status(data_dir: Path, *, as_json: bool) -> int:
    from hypertuna.worker.status import STATUS_FILE, format_status, read_status

    try:
        document = read_status(data_dir)
    except (OSError, ValueError) as exc:
        raise CliError(f"worker status: {exc}") from None
    if document is None:
        raise CliError(
            f"worker status: no {STATUS_FILE} in {data_dir}: "
            "the worker has not run with this data directory"
        )
    if as_json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(format_status(document))
    return 0


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    for flag, key in (
        ("host", "server.host"),
        ("port", "server.port"),
        ("data_dir", "storage.data_dir"),
        ("database_url", "storage.database_url"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: --set takes SECTION.KEY=VALUE")
        overrides[key.strip()] = value
    return load_config(args.config, overrides=overrides)


async def _relay_create(config: Config, name: str, description: str) -> RelayRecord:
    async with open_event_store(
        config.storage.database_url or None, config.storage.data_dir
    ) as store:
        try:
            cores = await trio.to_thread.run_sync(CoreStore.open, config.storage.cores_dir)
        except CoreStoreError as exc:
            raise CliError(str(exc)) from None
        try:
            return await create_hosted_relay(
                store,
                cores,
                name=validate_relay_name(name),
                description=description,
                created_at=int(time.time()),
            )
        except RelayRegisteredError:
            raise CliError(
                f"a relay named {name!r} already exists: workers registered it at this gateway"
            ) from None
        except RelayExistsError:
            raise CliError(f"a relay named {name!r} already exists") from None
        finally:
            cores.close()


async def _relay_list(config: Config) -> list[RelayRecord]:
    async with open_event_store(
        config.storage.database_url or None, config.storage.data_dir
    ) as store:
        return await store.list_relays()


async def _run_gateway(config: Config, demo: bool) -> None:
    from hypertuna.system import open_system

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_system(config) as system:
            relays = await system.list_relays()
            if demo and not relays:
                relays = [await system.create_relay("demo", "Demo relay of this gateway")]
            print(f"Hypertuna gateway {__version__} listening on {system.base_url}", flush=True)
            for relay in relays:
                print(f"  relay {relay.name}: {system.relay_url(relay)}", flush=True)
            print(f"  health:  {system.base_url}/health", flush=True)
            print(f"  metrics: {system.base_url}/metrics", flush=True)
            # Everything allocated so far (modules, app, actors) lives as long as the process:
            # keep it out of the collector's full passes, which otherwise took ~60 ms each.
            gc.collect()
            gc.freeze()
            async for signum in signals:
                logging.getLogger("hypertuna").info(
                    "received %s, shutting down", signal.Signals(signum).name
                )
                break
    print("Hypertuna gateway stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "worker":
            return _worker_main(args)
        if args.command == "admin":
            return _admin_main(args)
        if args.command == "escrow":
            return _escrow_main(args)
        if args.command == "audit":
            return _audit_main(args)
        config = _config_from(args)
        logging.basicConfig(
            level=config.server.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if args.command == "config":
            print(json.dumps(redacted(config), indent=2))
            return 0
        if args.command == "relay" and args.relay_command == "create":
            record = trio.run(_relay_create, config, args.name, args.description)
            print(f"created relay {record.name}")
            print(f"  key: {record.key}")
            print(f"  url: {config.relay_ws_url(record.key)}")
            return 0
        if args.command == "relay" and args.relay_command == "list":
            for record in trio.run(_relay_list, config):
                print(f"{record.name}\t{record.key}\t{config.relay_ws_url(record.key)}")
            return 0
        if args.command == "gateway":
            try:
                trio.run(_run_gateway, config, args.demo)
            except BaseException as exc:
                # A missing escrow key, unusable TLS files or secret, or a standalone escrow
                # that refuses this gateway: an operator's fix, not a crash.
                fix = _operator_fix(exc)
                if fix is None:
                    raise
                raise CliError(fix) from None
            return 0
    except (ConfigError, CliError) as exc:
        print(f"hypertuna: {exc}", file=sys.stderr)
        return 2
    except (StorageError, CoreStoreError, CoreError, OSError) as exc:
        print(f"hypertuna: {exc}", file=sys.stderr)
        return 1
    raise AssertionError("unreachable: argparse requires a command")  # pragma: no cover


def _operator_fix(exc: BaseException) -> str | None:
    """What to tell the operator when ``exc`` (or an exception in its group) is a start
    failure they must fix — a missing escrow key, unusable escrow client files or secret, a
    standalone escrow refusing this gateway — else None."""
    from hypertuna.edge.tls import TlsContextError
    from hypertuna.escrow_client.remote import EscrowClientRefusedError
    from hypertuna.escrow_client.transport import EscrowRefusedTlsError

    kinds: tuple[type[Exception], ...] = (
        EscrowKeyError,
        ConfigError,
        TlsContextError,
        EscrowRefusedTlsError,
        EscrowClientRefusedError,
    )
    for kind in kinds:
        found = _first_leaf(exc, kind)
        if isinstance(found, TlsContextError):
            return f"escrow client TLS files: {found}"
        if isinstance(found, EscrowRefusedTlsError):
            return f"the escrow at escrow.url refused TLS with this gateway: {found.reason}"
        if found is not None:
            return str(found)
    return None


def _first_leaf(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` or, for a group, anywhere inside it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_leaf(inner, kind)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
