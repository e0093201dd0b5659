"""``mirror-status.json``: the running worker's mirror status, for ``hypertuna worker status``.

The worker (another process than the one asking) writes the file in its data directory whenever
the status changes, at most once per ``interval_s``, atomically (temporary file, then rename), so
a reader never sees half a file. Content::

    {"version": 1, "gateway_url": ..., "connected": bool, "gateway_id": str | null,
     "updated_at": wall-clock seconds,
     "relays": [{"relay_key": ..., "cores": [{"core_key", "type", "local_length",
                 "gateway_length" (null until the gateway answered), "lag" (blocks, null
                 likewise), "last_sent" (wall-clock seconds or null), "refused"}],
                 "escrow": null | {"state", "rotation", "writer_public_key",
                 "writer_core_key", "escrow_fingerprint", "deposit_id", "expires_at_ms",
                 "admitted", "last_error"}}]}

``escrow`` is the relay's gateway-writer deposit (:class:`~hypertuna.worker.escrow.EscrowState`
values for ``state``: ``pending``, ``retrying``, ``deposited``, ``refused``, ``unavailable``,
``fingerprint-mismatch``), null until the worker handled it since it started.

No file means the worker never ran with this data directory; ``connected`` false with no relays
means it never got through to its gateway (or is not connected now).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from hypertuna.worker.escrow import EscrowRelayStatus
from hypertuna.worker.mirror import MirrorCoreStatus

__all__ = [
    "STATUS_FILE",
    "format_status",
    "read_status",
    "status_document",
    "write_status",
    "write_status_periodically",
]

STATUS_FILE: Final = "mirror-status.json"
_VERSION: Final = 1

StatusDocument = dict[str, object]


def status_document(
    gateway_url: str,
    connected: bool,
    gateway_id: str | None,
    mirrors: Sequence[MirrorCoreStatus],
    escrow: Sequence[EscrowRelayStatus] = (),
) -> StatusDocument:
    """The file's content (without ``updated_at``) for the given worker state."""
    relays: dict[str, list[dict[str, object]]] = {}
    deposits = {status.relay_key: status.to_json() for status in escrow}
    for core in sorted(mirrors, key=lambda m: (m.relay_key, m.core_type, m.core_key)):
        gateway = core.gateway_length
        relays.setdefault(core.relay_key, []).append(
            {
                "core_key": core.core_key,
                "type": core.core_type,
                "local_length": core.local_length,
                "gateway_length": gateway,
                "lag": None if gateway is None else max(core.local_length - gateway, 0),
                "last_sent": core.last_sent,
                "refused": core.refused,
            }
        )
    return {
        "version": _VERSION,
        "gateway_url": gateway_url,
        "connected": connected,
        "gateway_id": gateway_id,
        "relays": [
            {"relay_key": key, "cores": relays.get(key, []), "escrow": deposits.get(key)}
            for key in sorted(relays.keys() | deposits.keys())
        ],
    }


def write_status(data_dir: Path, document: StatusDocument) -> None:
    """Write ``document`` to ``data_dir/mirror-status.json`` atomically."""
    path = data_dir / STATUS_FILE
    temp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(document, sort_keys=True, indent=1) + "\n")
    os.replace(temp, path)


def read_status(data_dir: Path) -> StatusDocument | None:
    """The last status written in ``data_dir``; None when there is none. ``ValueError`` for a
    file that is not a status document."""
    try:
        text = (data_dir / STATUS_FILE).read_text()
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise ValueError(f"{data_dir / STATUS_FILE} is not a mirror status file")
    return data


def _when(seconds: object, now: float) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    ago = max(now - seconds, 0.0)
    return f"{ago:.0f}s ago"


def format_status(document: StatusDocument, *, now: float | None = None) -> str:
    """A readable table of ``document``."""
    now = time.time() if now is None else now
    state = "connected" if document.get("connected") else "not connected"
    lines = [
        f"gateway: {document.get('gateway_url')} ({state})",
        f"updated: {_when(document.get('updated_at'), now)}",
    ]
    relays = document.get("relays")
    if not isinstance(relays, list) or not relays:
        lines.append(
            "no mirrored cores"
            + ("" if document.get("connected") else ": the worker has not connected (yet)")
        )
        return "\n".join(lines)
    header = ("core", "type", "local", "gateway", "lag", "last sent", "")
    rows: list[tuple[str, ...]] = []
    for relay in relays:
        for core in relay.get("cores", []):
            gateway = core.get("gateway_length")
            lag = core.get("lag")
            rows.append(
                (
                    str(core.get("core_key", ""))[:16],
                    str(core.get("type", "")),
                    str(core.get("local_length", "")),
                    "?" if gateway is None else str(gateway),
                    "?" if lag is None else str(lag),
                    _when(core.get("last_sent"), now),
                    f"refused: {core['refused']}" if core.get("refused") else "",
                )
            )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))

    index = 0
    for relay in relays:
        cores = relay.get("cores", [])
        lines.append("")
        lines.append(f"relay {relay.get('relay_key')}")
        if cores:
            lines.append("  " + line(header).rstrip())
        for row in rows[index : index + len(cores)]:
            lines.append("  " + line(row).rstrip())
        index += len(cores)
        escrow = relay.get("escrow")
        if isinstance(escrow, dict):
            lines.append("  " + _escrow_line(escrow))
    return "\n".join(lines)


def _escrow_line(escrow: dict[str, object]) -> str:
    text = f"escrow: {escrow.get('state')}, rotation {escrow.get('rotation')}"
    if escrow.get("deposit_id"):
        text += f", deposit {escrow['deposit_id']}"
    if escrow.get("writer_public_key"):
        text += f", gateway writer {str(escrow['writer_public_key'])[:16]}"
    if escrow.get("last_error"):
        text += f": {escrow['last_error']}"
    return text


async def write_status_periodically(
    data_dir: Path,
    snapshot: Callable[[], StatusDocument],
    *,
    interval_s: float = 1.0,
    wall_clock: Callable[[], float] = time.time,
) -> None:
    """Write ``snapshot()`` whenever it differs from the last written one, checking every
    ``interval_s`` (so at most once per interval). Runs until cancelled."""
    last: StatusDocument | None = None
    while True:
        document = snapshot()
        if document != last:
            await trio.to_thread.run_sync(
                write_status, data_dir, {**document, "updated_at": wall_clock()}
            )
            last = document
        await trio.sleep(interval_s)
