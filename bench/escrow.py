"""How fast the escrow stores deposits and issues leases, on SQLite and on PostgreSQL.

    .venv/bin/python bench/escrow.py [--quick] [--backends sqlite,postgresql] [--pg-url URL]

Measured at the service level: :class:`hypertuna.escrow.service.EscrowService` in this process,
on a real database (a fresh SQLite file with ``synchronous=FULL``; a fresh PostgreSQL database
created on the server at ``--pg-url`` and dropped afterwards, ``synchronous_commit=on``) with real
keys and real crypto. That is what an escrow request's latency is made of; HTTP and signature
checks at the edge come on top. Per backend:

- **deposits**: N distinct relays (5,000; quick: 1,000), each with its own owner key and writer
  key, deposit one sealed package each. The packages are sealed before the clock starts (sealing
  is the worker's work, not the escrow's); opening and checking them is the escrow's and is
  measured. ``--concurrency`` depositors (16) take the next request as soon as their previous
  one is answered: ``deposits_per_s`` is the deposits accepted over the wall time of the phase,
  ``deposit_p50_ms`` / ``deposit_p99_ms`` the time of one deposit call (queueing included);
- **unlocks**: ``--concurrency`` requesters (16), each with a relay of its own, loop: unlock its
  relay (evidence that passes the policy, a fresh session key), then release the lease so that
  the next unlock can succeed. Only the unlock call is timed (it waits behind the other
  requesters' unlocks and releases: every write transaction is serialized by the audit chain):
  ``unlock_p50_ms`` / ``unlock_p99_ms`` over U unlocks (4,000; quick: 640) after 2 untimed
  rounds per requester; ``unlocks_per_s`` counts unlocks and releases together as transactions;
- **single unlock**: the same loop with one requester (300; quick: 100): ``unlock_single_p50_ms``
  / ``unlock_single_p99_ms`` is the time of one unlock transaction with nobody else queued.

The policy is the default one except ``max_unlocks``, raised so that one deposit can be unlocked
as often as the benchmark needs. At the end the audit chain is verified (``audit_chain_valid``).

Progress goes to stderr; the last stdout line is one JSON object: ``sqlite`` and ``postgresql``,
each with ``deposits_per_s``, ``unlock_p50_ms``, ``unlock_p99_ms`` and the counts and ``backend``
details. Targets (issue 6) on PostgreSQL: unlock p99 <= 25 ms, >= 500 deposits/s.
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nacl.public
import psycopg
import psycopg.conninfo
import trio
from relay_load import log, percentile, rounded

from hypertuna.escrow.keys import AuditKey, EscrowKey, create_audit_key, create_escrow_key
from hypertuna.escrow.package import seal_deposit
from hypertuna.escrow.policy import Evidence, Policy
from hypertuna.escrow.service import (
    Actor,
    ActorKind,
    DepositReceipt,
    DepositRequest,
    EscrowService,
    LeaseGrant,
    UnlockRequest,
    open_escrow_service,
)
from hypertuna.storage.cores.crypto import KeyPair

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")
#: Targets of issue 6 (PostgreSQL).
TARGET_UNLOCK_P99_MS = 25.0
TARGET_DEPOSITS_PER_S = 500.0
#: Untimed unlock/release rounds per requester before the timed ones.
WARMUP_ROUNDS = 2
GATEWAY = Actor(ActorKind.GATEWAY, "bench")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def good_evidence(at_ms: int) -> Evidence:
    """Evidence that passes every rule of the default policy at ``at_ms``."""
    return Evidence(
        relay_registered=True,
        escrow_enabled=True,
        healthy_peers=0,
        last_peer_seen_ms=at_ms - 60_000,
        mirror_lag_ms=1_000,
        mirror_updated_ms=at_ms - 5_000,
    )


def sealed_deposits(escrow_key: EscrowKey, count: int) -> list[DepositRequest]:
    """``count`` deposit requests for distinct relays, each with its own owner and writer."""
    created = now_ms()
    requests = []
    for _ in range(count):
        owner = KeyPair.from_seed(secrets.token_bytes(32)).public_key.hex()
        relay_key = secrets.token_hex(32)
        package = seal_deposit(
            escrow_key.public_key,
            relay_key=relay_key,
            writer=KeyPair.from_seed(secrets.token_bytes(32)),
            owner_key=owner,
            created_at_ms=created,
            rotation=1,
        )
        requests.append(DepositRequest(owner_key=owner, relay_key=relay_key, package=package))
    return requests


async def deposit_phase(
    service: EscrowService, requests: Sequence[DepositRequest], concurrency: int
) -> tuple[float, list[float], int]:
    """(wall seconds, sorted latencies in ms, refusals) of depositing every request."""
    latencies: list[float] = []
    refused = 0
    pending = iter(requests)

    async def depositor() -> None:
        nonlocal refused
        for request in pending:
            started = time.perf_counter()
            outcome = await service.deposit(request, now_ms=now_ms())
            latencies.append((time.perf_counter() - started) * 1000.0)
            if not isinstance(outcome, DepositReceipt):
                refused += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(depositor)
    return time.perf_counter() - started, sorted(latencies), refused


async def unlock_phase(
    service: EscrowService, relay_keys: Sequence[str], rounds: int
) -> tuple[float, list[float], int]:
    """Each relay's requester unlocks and releases ``rounds`` times (after the warm-up):
    (wall seconds of the timed rounds, sorted unlock latencies in ms, rejected unlocks)."""
    latencies: list[float] = []
    rejected = 0
    sessions = [
        [bytes(nacl.public.PrivateKey.generate().public_key) for _ in range(rounds + WARMUP_ROUNDS)]
        for _ in relay_keys
    ]
    warm = trio.Event()
    warmed = 0

    async def requester(index: int, relay_key: str) -> None:
        nonlocal rejected, warmed
        for round_ in range(rounds + WARMUP_ROUNDS):
            if round_ == WARMUP_ROUNDS:
                warmed += 1
                if warmed == len(relay_keys):
                    warm.set()
                await warm.wait()
            request = UnlockRequest(
                relay_key=relay_key,
                session_public_key=sessions[index][round_],
                requester_id=f"requester-{index}",
            )
            at = now_ms()
            evidence = good_evidence(at)
            started = time.perf_counter()
            outcome = await service.unlock(request, evidence, now_ms=at)
            elapsed = (time.perf_counter() - started) * 1000.0
            if not isinstance(outcome, LeaseGrant):
                rejected += 1
                log(f"unlock rejected: {[r.value for r in outcome.reasons]}")
                continue
            if round_ >= WARMUP_ROUNDS:
                latencies.append(elapsed)
            await service.release(
                outcome.lease.lease_id, reason="bench", actor=GATEWAY, now_ms=now_ms()
            )

    async with trio.open_nursery() as nursery:
        for index, relay_key in enumerate(relay_keys):
            nursery.start_soon(requester, index, relay_key)
        await warm.wait()
        started = time.perf_counter()
    return time.perf_counter() - started, sorted(latencies), rejected


def pg_details(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method")
        }
    return settings


async def run_backend(
    name: str,
    *,
    escrow_key: EscrowKey,
    audit_key: AuditKey,
    database_url: str | None,
    sqlite_path: Path,
    deposits: int,
    rounds: int,
    single: int,
    concurrency: int,
) -> dict[str, Any]:
    policy = Policy(max_unlocks=2**31)
    log(f"{name}: sealing {deposits} deposit packages")
    requests = sealed_deposits(escrow_key, deposits)
    figures: dict[str, Any] = {}
    async with open_escrow_service(
        escrow_key=escrow_key,
        audit_key=audit_key,
        policy=policy,
        database_url=database_url,
        sqlite_path=sqlite_path,
    ) as service:
        wall, latencies, refused = await deposit_phase(service, requests, concurrency)
        accepted = len(requests) - refused
        figures["deposits_per_s"] = round(accepted / wall, 1)
        figures["deposit_p50_ms"] = rounded(percentile(latencies, 50))
        figures["deposit_p99_ms"] = rounded(percentile(latencies, 99))
        figures["deposits"] = accepted
        figures["deposits_refused"] = refused
        log(f"{name}: {accepted} deposits in {wall:.2f} s = {figures['deposits_per_s']}/s")

        relays = [r.relay_key for r in requests[:concurrency]]
        wall, latencies, rejected = await unlock_phase(service, relays, rounds)
        figures["unlock_p50_ms"] = rounded(percentile(latencies, 50))
        figures["unlock_p99_ms"] = rounded(percentile(latencies, 99))
        figures["unlock_max_ms"] = rounded(latencies[-1] if latencies else None)
        figures["unlocks"] = len(latencies)
        figures["unlocks_rejected"] = rejected
        figures["unlocks_per_s"] = round(len(latencies) / wall, 1)
        figures["requesters"] = len(relays)
        log(
            f"{name}: {len(latencies)} unlocks by {len(relays)} requesters in {wall:.2f} s:"
            f" p50 {figures['unlock_p50_ms']} ms, p99 {figures['unlock_p99_ms']} ms"
        )

        _, latencies, rejected = await unlock_phase(service, relays[:1], single)
        figures["unlock_single_p50_ms"] = rounded(percentile(latencies, 50))
        figures["unlock_single_p99_ms"] = rounded(percentile(latencies, 99))
        figures["unlocks_rejected"] += rejected
        log(f"{name}: one requester: p50 {figures['unlock_single_p50_ms']} ms")

        verified = await service.audit_verify()
        figures["audit_chain_valid"] = verified.valid
        health = await service.health()
        figures["audit_entries"] = health.audit_entries
        figures["concurrency"] = concurrency
        figures["backend"] = {"name": service.db.backend}
    return figures


def run(settings: argparse.Namespace) -> dict[str, Any]:
    quick: bool = settings.quick
    deposits = settings.deposits or (1_000 if quick else 5_000)
    rounds = settings.rounds or (40 if quick else 250)
    single = 100 if quick else 300
    concurrency: int = settings.concurrency
    figures: dict[str, Any] = {"quick": quick}
    with tempfile.TemporaryDirectory(prefix="escrow-bench-") as tmp:
        root = Path(tmp)
        escrow_key = create_escrow_key(root / "keys" / "escrow.key")
        audit_key = create_audit_key(root / "keys" / "audit.key")
        common: dict[str, Any] = {
            "escrow_key": escrow_key,
            "audit_key": audit_key,
            "deposits": deposits,
            "rounds": rounds,
            "single": single,
            "concurrency": concurrency,
        }
        for backend in settings.backends:
            if backend == "sqlite":
                path = root / "escrow.db"
                result = trio.run(
                    functools.partial(
                        run_backend, backend, database_url=None, sqlite_path=path, **common
                    )
                )
                result["backend"].update(
                    {"path": "tmp", "journal_mode": "wal", "synchronous": "FULL"}
                )
            else:
                name = f"escrow_bench_{secrets.token_hex(4)}"
                admin = settings.pg_url
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}")
                try:
                    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
                    result = trio.run(
                        functools.partial(
                            run_backend,
                            backend,
                            database_url=url,
                            sqlite_path=root / "unused.db",
                            **common,
                        )
                    )
                    result["backend"].update(pg_details(url))
                    result["backend"]["database"] = "fresh (dropped afterwards)"
                finally:
                    with psycopg.connect(admin, autocommit=True) as conn:
                        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                pg = result
                pg["targets_met"] = {
                    "unlock_p99_ms": pg["unlock_p99_ms"] is not None
                    and pg["unlock_p99_ms"] <= TARGET_UNLOCK_P99_MS,
                    "deposits_per_s": pg["deposits_per_s"] >= TARGET_DEPOSITS_PER_S,
                }
            figures[backend] = result
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 deposits, 640 unlocks")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        type=lambda text: [b for b in text.split(",") if b],
        help="comma-separated: sqlite, postgresql",
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="server to create a DB on")
    parser.add_argument("--concurrency", type=int, default=16, help="depositors and requesters")
    parser.add_argument("--deposits", type=int, default=None, help="deposits (distinct relays)")
    parser.add_argument("--rounds", type=int, default=None, help="unlocks per requester")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backends: {', '.join(unknown)}")
    try:
        figures = run(args)
        ok = all(
            figures[b]["unlocks_rejected"] == 0
            and figures[b]["deposits_refused"] == 0
            and figures[b]["audit_chain_valid"]
            for b in args.backends
        )
    except (OSError, psycopg.Error, RuntimeError) as exc:
        log(f"escrow benchmark failed: {exc}")
        figures = {"quick": args.quick, "error": str(exc)}
        ok = False
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
