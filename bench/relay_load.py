"""Load benchmark for any NIP-01 Nostr relay: ingest rate, REQ latency, idle-connection memory.

    .venv/bin/python bench/relay_load.py ws://127.0.0.1:8080/relay/<key> [--server-pid PID]
    .venv/bin/python bench/relay_load.py --spawn [--quick]

Phases:

1. ingest: ``--connections`` sockets, spread over ``--procs`` client processes, publish pre-signed
   kind-1 events with at most ``--window`` EVENTs awaiting their OK per socket;
2. pre-fill and REQ: publish more events until this run has stored ``--prefill`` of them, then time
   ``["REQ", sub, {"kinds":[1],"limit":100}]`` until its EOSE, ``--req-samples`` times;
3. idle: open ``--idle`` sockets that each hold one subscription matching nothing, and compare the
   server's resident memory before and after.

Progress goes to stderr; the last stdout line is one JSON object with the figures (see
bench/README.md). Only the given URL (or, with ``--spawn``, 127.0.0.1) is ever contacted.

The WebSocket client is a small RFC 6455 implementation on trio rather than trio_websocket:
client and server share two cores here, and against our gateway trio_websocket spent 225-255 us of
client CPU per EVENT/OK pair where this client spends 85-105 us. It sends frames masked ahead of
time and classifies replies with one ``json.loads`` or one regex each.
"""

from __future__ import annotations

import argparse
import array
import base64
import gc
import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_FILE = RESULTS_DIR / "signed-events.jsonl"
CACHE_VERSION = 1

#: Spawn context everywhere: children never inherit a half-started trio run or pool threads.
MP = multiprocessing.get_context("spawn")

# One WebSocket frame may not exceed this (a REQ answer is a stream of small frames, so a larger
# one means a broken or hostile peer, not a big event).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: REQs sent before the timed ones: the first few fill caches and are not the steady state.
REQ_WARMUP = 5

#: Leading ``["TYPE","first-string"`` of a relay message, matched on raw bytes so that the 100
#: EVENTs of a REQ answer are classified without decoding JSON (that time would count as latency).
RELAY_HEAD = re.compile(rb'\s*\[\s*"([A-Z]+)"\s*,\s*"((?:[^"\\]|\\.)*)"')


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# WebSocket client


class ConnectionLost(Exception):
    """The relay closed the connection or it broke."""


class HandshakeFailed(Exception):
    """The HTTP upgrade to WebSocket was not accepted."""


def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A complete client frame (FIN set, masked with a fresh random key, as RFC 6455 requires of
    clients). Pure-Python XOR through one big integer costs a few microseconds per event, which is
    why hot paths call this before their timed phase."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    keystream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return header + key + masked


def text_frame(message: object) -> bytes:
    """A masked text frame holding ``message`` as compact JSON."""
    return mask_frame(json.dumps(message, separators=(",", ":")).encode())


def close_frame(code: int = 1000) -> bytes:
    return mask_frame(code.to_bytes(2, "big"), opcode=0x8)


class ByteStream(Protocol):
    """What :class:`WsConn` needs from a transport (trio's streams and :class:`RawSocket`)."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def aclose(self) -> None: ...


class RawSocket:
    """A plain TCP transport on a non-blocking socket and trio's readiness waits.

    trio's SocketStream adds a checkpoint and conflict detection to every call, a visible share
    of the client's CPU on the ingest path. This transport only waits when the socket would
    block, and yields every few immediate reads so one busy connection cannot starve the others
    in its process.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._reads = 0

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            view = view[sent:]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._reads += 1
        if self._reads % 8 == 0:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return self._sock.recv(max_bytes or 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()


class WsConn:
    """A client WebSocket over a trio stream: whole frames out, whole messages (bytes) in.

    At most one task may send and one receive at a time (trio's stream rule). Pings are answered
    from inside :meth:`receive_batch`, so a connection only stays healthy while someone reads.
    """

    def __init__(self, stream: ByteStream, leftover: bytes) -> None:
        self._stream = stream
        self._buf = bytearray(leftover)
        self._fragments = bytearray()
        self._fragmenting = False
        self.closed = False
        self.close_reason = ""

    async def send_raw(self, data: bytes) -> None:
        """Send pre-built frame bytes (one or several frames)."""
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.closed = True
            raise ConnectionLost(f"send failed: {exc!r}") from exc

    async def receive_batch(self) -> list[bytes]:
        """Every complete data message now available (at least one); waits for the next read."""
        while True:
            messages, replies = self._parse()
            if replies:
                await self.send_raw(b"".join(replies))
            if messages:
                return messages
            if self.closed:
                raise ConnectionLost(self.close_reason or "connection closed by the relay")
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.closed = True
                raise ConnectionLost(f"receive failed: {exc!r}") from exc
            if not data:
                self.closed = True
                raise ConnectionLost(self.close_reason or "connection closed by the relay (EOF)")
            self._buf += data

    def _parse(self) -> tuple[list[bytes], list[bytes]]:
        buf = self._buf
        messages: list[bytes] = []
        replies: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            p = pos + 2
            if length == 126:
                if end - p < 2:
                    break
                length = int.from_bytes(buf[p : p + 2], "big")
                p += 2
            elif length == 127:
                if end - p < 8:
                    break
                length = int.from_bytes(buf[p : p + 8], "big")
                p += 8
            if length > MAX_MESSAGE_BYTES:
                self.closed = True
                self.close_reason = f"relay sent a {length}-byte frame"
                break
            key = b""
            if b1 & 0x80:
                # Servers must not mask, but unmasking costs little and tolerates odd relays.
                if end - p < 4:
                    break
                key = bytes(buf[p : p + 4])
                p += 4
            if end - p < length:
                break
            payload = bytes(buf[p : p + length])
            pos = p + length
            if key:
                stream = (key * (length // 4 + 1))[:length]
                payload = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(
                    length, "big"
                )
            fin = b0 & 0x80
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2):
                if fin:
                    messages.append(payload)
                else:
                    self._fragments = bytearray(payload)
                    self._fragmenting = True
            elif opcode == 0x0 and self._fragmenting:
                self._fragments += payload
                if len(self._fragments) > MAX_MESSAGE_BYTES:
                    self.closed = True
                    self.close_reason = "relay sent an oversized fragmented message"
                    break
                if fin:
                    messages.append(bytes(self._fragments))
                    self._fragments = bytearray()
                    self._fragmenting = False
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                text = payload[2:].decode("utf-8", "replace")
                self.close_reason = f"relay closed the connection: {code} {text}".rstrip()
                if not self.closed:
                    replies.append(close_frame(1000))
                self.closed = True
                break
            elif opcode == 0x9:
                replies.append(mask_frame(payload, opcode=0xA))
            # 0xA (pong) and unknown opcodes need nothing.
        del buf[:pos]
        return messages, replies

    async def aclose(self, *, polite: bool = True) -> None:
        """Send a close frame (when still open) and drop the socket, without waiting for the
        relay's reply: a benchmark has nothing left to learn from it."""
        if polite and not self.closed:
            with trio.move_on_after(1):
                try:
                    await self._stream.send_all(close_frame(1000))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        self.closed = True
        with trio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


async def ws_connect(url: str, wait_s: float) -> WsConn:
    """Open ``url`` (ws:// or wss://) and complete the WebSocket upgrade within ``wait_s``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = port == (443 if secure else 80)
    host_header = f"[{host}]" if ":" in host else host
    if not default_port:
        host_header += f":{port}"
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nUser-Agent: hypertuna-bench\r\n\r\n"
    ).encode()
    expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    with trio.fail_after(wait_s):
        tcp = await trio.open_tcp_stream(host, port)
        stream: ByteStream = tcp
        try:
            if secure:
                tls = trio.SSLStream(
                    tcp, ssl.create_default_context(), server_hostname=host, https_compatible=True
                )
                await tls.do_handshake()
                stream = tls
            await stream.send_all(request)
            head = bytearray()
            while b"\r\n\r\n" not in head:
                if len(head) > 65536:
                    raise HandshakeFailed("upgrade response headers too long")
                data = await stream.receive_some(65536)
                if not data:
                    raise HandshakeFailed("connection closed during the upgrade")
                head += data
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
    header_end = head.index(b"\r\n\r\n") + 4
    lines = bytes(head[:header_end]).decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    problem = ""
    if len(status) < 2 or status[1] != "101":
        problem = f"upgrade refused: {lines[0]!r}"
    elif headers.get("sec-websocket-accept", "").encode() != expected:
        problem = "bad Sec-WebSocket-Accept in the upgrade response"
    if problem:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise HandshakeFailed(problem)
    if not secure:
        # Past the handshake, plain TCP traffic moves to the cheaper transport.
        stream = RawSocket(socket.socket(fileno=tcp.socket.detach()))
    return WsConn(stream, bytes(head[header_end:]))


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class SignJob:
    run_id: str
    start: int
    count: int
    base_ts: int
    keys: tuple[bytes, ...]


def _filler(seq: int, size: int) -> str:
    # Varied text (not one repeated letter) so that compressing stores see realistic content.
    words = ("relay", "gateway", "nostr", "trio", "event", "peer", "index", "bench", "hyper")
    out: list[str] = []
    n = 0
    i = seq
    while n < size:
        word = words[i % len(words)]
        out.append(word)
        n += len(word) + 1
        i = (i * 1103515245 + 12345) & 0x7FFFFFFF  # LCG: cheap, deterministic word order
    return " ".join(out)[:size]


def sign_chunk(job: SignJob) -> list[str]:
    """Sign ``job.count`` kind-1 events (runs in a pool process); returns their JSON texts."""
    from hypertuna.protocol.nostr import sign_event

    out: list[str] = []
    for seq in range(job.start, job.start + job.count):
        prefix = f"hypertuna bench {job.run_id} #{seq}: "
        event = sign_event(
            job.keys[seq % len(job.keys)],
            # Spread over the recent past: in the store's time order, inside every relay's window.
            created_at=job.base_ts - seq // 50,
            kind=1,
            tags=(("t", "hypertuna-bench"), ("bench", f"{job.run_id}:{seq}")),
            content=prefix + _filler(seq, 200 - len(prefix)),
        )
        out.append(event.raw)
    return out


def sign_events(count: int, workers: int) -> list[str]:
    """``count`` freshly signed events, unique to this run, signed by ``workers`` processes."""
    from hypertuna.protocol.nostr import public_key_hex

    run_id = secrets.token_hex(6)
    keys = tuple(secrets.token_bytes(32) for _ in range(16))
    for key in keys:
        public_key_hex(key)  # fails early on the (astronomically rare) invalid scalar
    base_ts = int(time.time()) - 60
    chunk = 2000
    jobs = [
        SignJob(run_id, start, min(chunk, count - start), base_ts, keys)
        for start in range(0, count, chunk)
    ]
    raws: list[str] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=MP) as pool:
        for part in pool.map(sign_chunk, jobs):
            raws.extend(part)
    return raws


def load_events(count: int, workers: int, *, use_cache: bool) -> list[str]:
    """Events for this run. The cache is only offered for a freshly spawned (empty) relay, where
    reusing events from an earlier run cannot produce duplicates."""
    if use_cache and CACHE_FILE.exists():
        try:
            with CACHE_FILE.open(encoding="utf-8") as fh:
                header = json.loads(fh.readline())
                if header.get("version") == CACHE_VERSION and header.get("count", 0) >= count:
                    raws = [fh.readline().rstrip("\n") for _ in range(count)]
                    if all(raws):
                        log(f"loaded {count} signed events from {CACHE_FILE}")
                        return raws
        except (OSError, ValueError):
            pass
    started = time.monotonic()
    raws = sign_events(count, workers)
    log(f"signed {count} events in {time.monotonic() - started:.1f} s ({workers} processes)")
    if use_cache:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps({"version": CACHE_VERSION, "count": count}) + "\n")
            for raw in raws:
                fh.write(raw + "\n")
        tmp.replace(CACHE_FILE)
    return raws


def event_frames(raws: Sequence[str]) -> list[tuple[str, bytes]]:
    """(event id, masked ``["EVENT", event]`` frame) for each event JSON text."""
    out = []
    for raw in raws:
        # The id is the first field of a relay-produced event text; json is the fallback.
        event_id = raw[7:71] if raw.startswith('{"id":"') else json.loads(raw)["id"]
        out.append((event_id, mask_frame(('["EVENT",' + raw + "]").encode())))
    return out


# --------------------------------------------------------------------------------------------
# Server process helpers


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server may run worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out = [pid]
    i = 0
    while i < len(out):
        out.extend(children.get(out[i], ()))
        i += 1
    return out


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of ``pid`` and its descendants, or None when unknown."""
    if pid is None:
        return None
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for p in proc_tree(pid):
            try:
                with open(f"/proc/{p}/stat", encoding="ascii", errors="replace") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except OSError:
        return None
    return total / tick


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS of ``pid`` (that process only), or None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log(f"could not raise RLIMIT_NOFILE: {exc}")
    return soft


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SpawnedServer:
    process: subprocess.Popen[bytes]
    url: str
    tmpdir: Path
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log("gateway ignored SIGTERM for 20 s; killing it")
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.returncode not in (0, -signal.SIGTERM):
            log(f"gateway exited with status {self.process.returncode}; log tail:")
            print(tail(self.log_path), file=sys.stderr)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _runnable(script: Path) -> bool:
    """Whether the interpreter on the script's ``#!`` line exists (a copied virtualenv keeps
    scripts whose ``#!`` names the directory it was created in)."""
    try:
        with script.open("rb") as fh:
            first = fh.readline()
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return True
    interpreter = first[2:].split()
    return bool(interpreter) and Path(interpreter[0].decode(errors="replace")).exists()


def gateway_command() -> list[str]:
    script = Path(sys.executable).parent / "hypertuna"
    if script.exists() and _runnable(script):
        return [str(script)]
    found = shutil.which("hypertuna")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from hypertuna.cli import main; sys.exit(main())"]


RELAY_LINE = re.compile(r"\brelay\s+\S+:\s+(wss?://\S+)")


def spawn_gateway(database_url: str | None, wait_s: float = 30.0) -> SpawnedServer:
    """Start ``hypertuna gateway --demo`` on a free loopback port with a fresh data directory and
    per-connection rate limits lifted, and wait for it to print its relay URL."""
    tmpdir = Path(tempfile.mkdtemp(prefix="hypertuna-bench-"))
    port = free_port()
    cmd = [
        *gateway_command(),
        "gateway",
        "--demo",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmpdir / "data"),
    ]
    if database_url:
        cmd += ["--database-url", database_url]
    env = dict(os.environ)
    env.update(
        # The default 50 EVENT/s per connection protects a public relay; a benchmark measures the
        # store and the edge instead.
        HYPERTUNA_LIMITS_EVENTS_PER_SECOND="1000000",
        HYPERTUNA_LIMITS_EVENTS_BURST="1000000",
        HYPERTUNA_LIMITS_MAX_SUBSCRIPTIONS="64",
    )
    log_path = tmpdir / "gateway.log"
    log(f"spawning: {' '.join(cmd)}")
    with log_path.open("wb") as log_fh:
        # A file rather than a pipe: nobody has to keep draining it while the benchmark runs.
        process = subprocess.Popen(
            cmd, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    server = SpawnedServer(process, "", tmpdir, log_path)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        match = RELAY_LINE.search(log_path.read_text(errors="replace"))
        if match:
            server.url = match.group(1)
            log(f"gateway pid {process.pid} serves {server.url}")
            return server
        if process.poll() is not None:
            break
        time.sleep(0.05)
    state = "exited" if process.poll() is not None else f"printed no relay URL in {wait_s:.0f} s"
    message = f"spawned gateway {state}; log tail:\n{tail(log_path)}"
    server.stop()
    raise RuntimeError(message)


# --------------------------------------------------------------------------------------------
# Publishing (ingest and pre-fill), run in client processes


@dataclass
class Tally:
    """What one client process saw while publishing."""

    accepted: int = 0
    duplicate: int = 0
    refused: int = 0
    missing: int = 0
    unsent: int = 0
    notices: int = 0
    lost_connections: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    latencies_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    started: float = 0.0
    finished: float = 0.0
    cpu_s: float = 0.0
    error: str = ""

    def note(self, kind: str, text: object) -> None:
        # Distinct reasons only, capped: a relay refusing 100k events says the same thing.
        key = f"{kind}: {str(text)[:120]}"
        if key in self.reasons or len(self.reasons) < 20:
            self.reasons[key] = self.reasons.get(key, 0) + 1


@dataclass
class Watch:
    """Liveness of one publishing connection, checked by :func:`watchdog`. One long-lived cancel
    scope per connection costs far less client CPU than a ``move_on_after`` around every read."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_progress: float = field(default_factory=time.monotonic)
    why: str = ""


async def watchdog(watches: Sequence[Watch], wait_s: float, deadline: float) -> None:
    """Cancel each connection that got no OK for ``wait_s``, and all of them at ``deadline``."""
    while True:
        await trio.sleep(min(0.25, wait_s / 4))
        now = time.monotonic()
        for watch in watches:
            if watch.scope.cancel_called:
                continue
            if now >= deadline:
                watch.why = "phase time limit reached"
                watch.scope.cancel()
            elif now - watch.last_progress > wait_s:
                watch.why = f"no OK within {wait_s:g} s"
                watch.scope.cancel()


async def publish_on(
    conn: WsConn,
    frames: Sequence[tuple[str, bytes]],
    window: int,
    watch: Watch,
    tally: Tally,
) -> None:
    """Publish ``frames`` keeping up to ``window`` EVENTs without OK; one frame goes out per OK."""
    pending: dict[str, float] = {}
    total = len(frames)
    sent = min(window, total)
    now = time.monotonic()
    for event_id, _ in frames[:sent]:
        pending[event_id] = now
    with watch.scope:
        try:
            await conn.send_raw(b"".join(frame for _, frame in frames[:sent]))
            while pending:
                messages = await conn.receive_batch()
                now = time.monotonic()
                answered = 0
                for message in messages:
                    try:
                        obj = json.loads(message)
                    except ValueError:
                        tally.note("unparsable", message[:80])
                        continue
                    if not isinstance(obj, list) or not obj:
                        continue
                    tag = obj[0]
                    if tag == "OK" and len(obj) >= 3 and isinstance(obj[1], str):
                        t0 = pending.pop(obj[1], None)
                        if t0 is None:
                            continue
                        answered += 1
                        text = obj[3] if len(obj) > 3 and isinstance(obj[3], str) else ""
                        if obj[2] is True:
                            tally.latencies_ms.append((now - t0) * 1000.0)
                            # An OK for an event the relay already had stores nothing new.
                            if text.startswith("duplicate:"):
                                tally.duplicate += 1
                            else:
                                tally.accepted += 1
                        else:
                            tally.refused += 1
                            tally.note("refused", text)
                    elif tag == "NOTICE":
                        tally.notices += 1
                        tally.note("notice", obj[1] if len(obj) > 1 else "")
                    elif tag in ("AUTH", "CLOSED"):
                        tally.note(str(tag).lower(), obj[1:])
                if answered:
                    tally.finished = watch.last_progress = now
                    if sent < total:
                        batch = frames[sent : sent + answered]
                        sent += len(batch)
                        for event_id, _ in batch:
                            pending[event_id] = now
                        await conn.send_raw(b"".join(frame for _, frame in batch))
        except ConnectionLost as exc:
            tally.lost_connections += 1
            tally.note("lost", exc)
    if watch.scope.cancelled_caught:
        tally.note("stopped", watch.why)
    tally.missing += len(pending)
    tally.unsent += total - sent


async def _publisher_main(
    url: str,
    per_conn: list[list[tuple[str, bytes]]],
    window: int,
    wait_s: float,
    phase_limit: float,
    pipe: multiprocessing.connection.Connection,
) -> Tally:
    tally = Tally()
    conns: list[WsConn] = []
    try:
        for _ in per_conn:
            conns.append(await ws_connect(url, wait_s))
    except (OSError, trio.TooSlowError, HandshakeFailed, ValueError) as exc:
        for conn in conns:
            await conn.aclose()
        tally.error = f"could not connect to {url}: {exc!r}"
        pipe.send("failed")
        return tally
    pipe.send("ready")
    # The parent starts every process at once so that the phase's wall time is shared; it says
    # "stop" instead when another process could not connect.
    go = await trio.to_thread.run_sync(pipe.poll, wait_s + 60)
    if not go or pipe.recv() != "go":
        for conn in conns:
            await conn.aclose()
        tally.error = tally.error or "no start signal from the parent"
        return tally
    cpu0 = own_cpu_seconds()
    tally.started = time.monotonic()
    tally.finished = tally.started
    deadline = tally.started + phase_limit
    watches = [Watch() for _ in conns]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog, watches, wait_s, deadline)
        async with trio.open_nursery() as publishers:
            for conn, frames, watch in zip(conns, per_conn, watches, strict=True):
                publishers.start_soon(publish_on, conn, frames, window, watch, tally)
        nursery.cancel_scope.cancel()
    tally.cpu_s = own_cpu_seconds() - cpu0
    for conn in conns:
        await conn.aclose()
    return tally


def publisher_process(
    url: str,
    per_conn: list[list[tuple[str, bytes]]],
    window: int,
    wait_s: float,
    phase_limit: float,
    pipe: multiprocessing.connection.Connection,
) -> None:
    """Entry point of one client process: connect, report ready, publish on "go", send Tally."""
    try:
        tally = trio.run(_publisher_main, url, per_conn, window, wait_s, phase_limit, pipe)
    except BaseException as exc:  # reported to the parent rather than lost in a child's stderr
        tally = Tally(error=f"client process failed: {exc!r}")
    pipe.send(tally)


@dataclass
class PublishResult:
    sent: int
    accepted: int
    duplicate: int
    refused: int
    missing: int
    unsent: int
    notices: int
    lost_connections: int
    wall_s: float
    latencies_ms: list[float]
    client_cpu_s: float
    server_cpu_s: float | None
    reasons: dict[str, int]
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.accepted / self.wall_s if self.wall_s > 0 else 0.0


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``parts`` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    out = []
    start = 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def run_publish_phase(
    url: str,
    frames: Sequence[tuple[str, bytes]],
    *,
    connections: int,
    procs: int,
    window: int,
    wait_s: float,
    phase_limit: float,
    server_pid: int | None,
) -> PublishResult:
    """Publish ``frames`` over ``connections`` sockets spread across ``procs`` client processes."""
    connections = max(1, min(connections, len(frames)))
    procs = max(1, min(procs, connections))
    per_conn = split(frames, connections)
    groups = [per_conn[i::procs] for i in range(procs)]
    pipes: list[multiprocessing.connection.Connection] = []
    workers: list[multiprocessing.context.SpawnProcess] = []
    tallies: list[Tally] = []
    errors: list[str] = []
    try:
        for group in groups:
            parent_end, child_end = MP.Pipe()
            worker = MP.Process(
                target=publisher_process,
                args=(url, group, window, wait_s, phase_limit, child_end),
                daemon=True,
            )
            worker.start()
            child_end.close()
            pipes.append(parent_end)
            workers.append(worker)
        states = []
        for pipe in pipes:
            # Start-up includes a Python interpreter, trio and the connection handshakes.
            states.append(pipe.recv() if pipe.poll(wait_s + 60) else "late")
        if "late" in states:
            raise RuntimeError("a client process did not get ready in time")
        go = all(state == "ready" for state in states)
        server_cpu0 = cpu_seconds(server_pid)
        for pipe, state in zip(pipes, states, strict=True):
            if state == "ready":
                pipe.send("go" if go else "stop")
        give_up = time.monotonic() + phase_limit + wait_s + 60
        for pipe in pipes:
            if not pipe.poll(max(0.0, give_up - time.monotonic())):
                raise RuntimeError("a client process did not report in time")
            tallies.append(pipe.recv())
        server_cpu1 = cpu_seconds(server_pid)
        if not go:
            raise RuntimeError("; ".join(sorted({t.error for t in tallies if t.error})))
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
        for pipe in pipes:
            pipe.close()
    latencies: list[float] = []
    reasons: dict[str, int] = {}
    for tally in tallies:
        latencies.extend(tally.latencies_ms)
        for key, n in tally.reasons.items():
            reasons[key] = reasons.get(key, 0) + n
        if tally.error:
            errors.append(tally.error)
    started = [t.started for t in tallies if t.started]
    finished = [t.finished for t in tallies if t.started]
    return PublishResult(
        sent=len(frames) - sum(t.unsent for t in tallies),
        accepted=sum(t.accepted for t in tallies),
        duplicate=sum(t.duplicate for t in tallies),
        refused=sum(t.refused for t in tallies),
        missing=sum(t.missing for t in tallies),
        unsent=sum(t.unsent for t in tallies),
        notices=sum(t.notices for t in tallies),
        lost_connections=sum(t.lost_connections for t in tallies),
        wall_s=max(finished) - min(started) if started else 0.0,
        latencies_ms=latencies,
        client_cpu_s=sum(t.cpu_s for t in tallies),
        server_cpu_s=(
            server_cpu1 - server_cpu0
            if server_cpu0 is not None and server_cpu1 is not None
            else None
        ),
        reasons=reasons,
        errors=errors,
    )


# --------------------------------------------------------------------------------------------
# REQ latency and idle connections, run in the main process


@dataclass
class ReqResult:
    latencies_ms: list[float] = field(default_factory=list)
    events_min: int | None = None
    events_max: int | None = None
    error: str = ""


async def wait_for_end(conn: WsConn, sub_id: bytes) -> tuple[int, float]:
    """Read until the EOSE of ``sub_id``; returns (EVENTs seen for it, arrival time of EOSE).
    A CLOSED for the subscription raises RuntimeError with the relay's reason."""
    events = 0
    while True:
        messages = await conn.receive_batch()
        now = time.perf_counter()
        for message in messages:
            head = RELAY_HEAD.match(message)
            if head is None or head.group(2) != sub_id:
                continue
            kind = head.group(1)
            if kind == b"EVENT":
                events += 1
            elif kind == b"EOSE":
                return events, now
            elif kind == b"CLOSED":
                try:
                    why = json.loads(message)[2]
                except (ValueError, IndexError, TypeError):
                    why = message[:120].decode("utf-8", "replace")
                raise RuntimeError(f"relay closed the subscription: {why!r}")


async def measure_req(url: str, samples: int, warmup: int, wait_s: float) -> ReqResult:
    """Time ``["REQ", sub, {"kinds":[1],"limit":100}]`` to its EOSE, one sub id per sample."""
    result = ReqResult()
    frames = [
        (
            f"lat{i}".encode(),
            text_frame(["REQ", f"lat{i}", {"kinds": [1], "limit": 100}]),
            text_frame(["CLOSE", f"lat{i}"]),
        )
        for i in range(warmup + samples)
    ]
    try:
        conn = await ws_connect(url, wait_s)
    except (OSError, trio.TooSlowError, HandshakeFailed, ValueError) as exc:
        result.error = f"could not connect: {exc!r}"
        return result
    counts: list[int] = []
    # The client's own garbage collection (it holds every pre-signed event) must not be timed
    # as relay latency: collect once, then keep the collector off during the timed loop.
    gc.collect()
    gc.disable()
    try:
        for i, (sub_id, req, close) in enumerate(frames):
            t0 = time.perf_counter()
            await conn.send_raw(req)
            with trio.move_on_after(wait_s) as scope:
                events, t1 = await wait_for_end(conn, sub_id)
            if scope.cancelled_caught:
                result.error = (
                    f"no EOSE within {wait_s:g} s for REQ #{i}: the relay does not send EOSE "
                    "or is too slow; REQ figures are null"
                )
                break
            await conn.send_raw(close)
            if i >= warmup:
                result.latencies_ms.append((t1 - t0) * 1000.0)
                counts.append(events)
    except (ConnectionLost, RuntimeError) as exc:
        result.error = f"REQ phase stopped: {exc}"
    finally:
        gc.enable()
        await conn.aclose()
    if counts:
        result.events_min = min(counts)
        result.events_max = max(counts)
    return result


@dataclass
class IdleResult:
    open: int = 0
    failed: int = 0
    rss_before: int | None = None
    rss_after: int | None = None
    open_seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


async def hold_idle(
    url: str, count: int, concurrency: int, wait_s: float, pid: int | None
) -> IdleResult:
    """Open ``count`` subscribed idle connections, measure the server's RSS, close them all."""
    result = IdleResult()
    await trio.sleep(1.0)  # let the server settle after the REQ phase before the baseline
    result.rss_before = rss_bytes(pid)
    conns: list[WsConn] = []
    limiter = trio.CapacityLimiter(concurrency)
    # Enough failures to prove the relay refuses more connections; then stop trying.
    max_failures = max(50, count // 20)

    def fail(text: str) -> None:
        result.failed += 1
        key = text[:160]
        if key in result.errors or len(result.errors) < 10:
            result.errors[key] = result.errors.get(key, 0) + 1

    async def drain(conn: WsConn) -> None:
        # Keeps answering pings so the relay's keep-alive does not drop an idle client.
        try:
            while True:
                await conn.receive_batch()
        except ConnectionLost:
            pass

    async def open_one(i: int, readers: trio.Nursery) -> None:
        try:
            sub = f"idle{i}"
            req = text_frame(
                ["REQ", sub, {"kinds": [1], "authors": [secrets.token_hex(32)], "limit": 1}]
            )
            conn: WsConn | None = None
            stage = "connect and upgrade"
            try:
                with trio.fail_after(wait_s):
                    conn = await ws_connect(url, wait_s)
                    stage = "REQ until EOSE"
                    await conn.send_raw(req)
                    await wait_for_end(conn, sub.encode())
            except trio.TooSlowError:
                fail(f"{stage}: no answer within {wait_s:g} s")
            except (OSError, HandshakeFailed, ConnectionLost, RuntimeError) as exc:
                fail(f"{stage}: {type(exc).__name__}: {exc}")
            else:
                conns.append(conn)
                readers.start_soon(drain, conn)
                return
            if conn is not None:
                await conn.aclose(polite=False)
        finally:
            limiter.release_on_behalf_of(i)

    started = time.monotonic()
    async with trio.open_nursery() as readers:
        async with trio.open_nursery() as openers:
            for i in range(count):
                await limiter.acquire_on_behalf_of(i)
                if result.failed >= max_failures:
                    limiter.release_on_behalf_of(i)
                    log(f"idle: {result.failed} connections failed; opening no more")
                    break
                openers.start_soon(open_one, i, readers)
                if (i + 1) % 1000 == 0:
                    log(f"idle: {i + 1} connections started, {len(conns)} subscribed")
        result.open_seconds = time.monotonic() - started
        await trio.sleep(2.0)  # let the server finish per-connection work before measuring
        result.open = sum(1 for conn in conns if not conn.closed)
        result.rss_after = rss_bytes(pid)
        readers.cancel_scope.cancel()
    closing = trio.CapacityLimiter(concurrency)

    async def close_one(conn: WsConn) -> None:
        async with closing:
            await conn.aclose()

    with trio.move_on_after(wait_s + 30):
        async with trio.open_nursery() as closers:
            for conn in conns:
                closers.start_soon(close_one, conn)
    return result


# --------------------------------------------------------------------------------------------
# Reporting and the command line


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (in any order)."""
    if not values:
        return None
    values = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(values)))
    return values[min(rank, len(values)) - 1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def percent_of_core(cpu_s: float | None, wall_s: float) -> float | None:
    return None if cpu_s is None or wall_s <= 0 else round(cpu_s / wall_s * 100.0, 1)


#: The figures every report carries, null when a phase could not produce them.
HEADLINE = (
    "ingest_events_per_s",
    "ok_p50_ms",
    "ok_p99_ms",
    "req_p50_ms",
    "req_p99_ms",
    "idle_connections",
    "rss_bytes_per_connection",
)


@dataclass(frozen=True)
class Settings:
    url: str | None
    spawn: bool
    database_url: str | None
    quick: bool
    connections: int
    window: int
    events: int
    prefill: int
    req_samples: int
    idle: int
    procs: int
    server_pid: int | None
    timeout: float
    phase_limit: float
    handshakes: int
    use_cache: bool


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="relay_load.py",
        description="Load benchmark for a Nostr relay (NIP-01): ingest, REQ latency, idle memory.",
    )
    parser.add_argument("url", nargs="?", help="relay URL (ws:// or wss://); omit with --spawn")
    parser.add_argument(
        "--spawn", action="store_true", help="start our own gateway on a free port and bench it"
    )
    parser.add_argument("--database-url", help="with --spawn: postgresql:// URL for the gateway")
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--connections", type=int, default=8, help="ingest sockets (default 8)")
    parser.add_argument("--window", type=int, default=32, help="EVENTs in flight per socket")
    parser.add_argument("--events", type=int, help="ingest events (default 50000, quick 10000)")
    parser.add_argument(
        "--prefill", type=int, help="kind-1 events stored before REQ (default 100000, quick 20000)"
    )
    parser.add_argument("--req-samples", type=int, help="REQ samples (default 300, quick 100)")
    parser.add_argument("--idle", type=int, help="idle connections (default 10000, quick 1000)")
    parser.add_argument("--procs", type=int, default=2, help="client processes for publishing")
    parser.add_argument("--server-pid", type=int, help="pid of the relay (for RSS and CPU)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for any one wait")
    parser.add_argument(
        "--phase-limit", type=float, default=600.0, help="seconds a publish phase may take"
    )
    parser.add_argument(
        "--handshakes", type=int, default=200, help="idle connections being opened at once"
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="with --spawn: sign fresh events instead of reusing bench/results/signed-events.jsonl",
    )
    args = parser.parse_args(argv)
    if args.spawn == bool(args.url):
        parser.error("give either a relay URL or --spawn")
    if args.url and urlsplit(args.url).scheme not in ("ws", "wss"):
        parser.error("the URL must start with ws:// or wss://")
    if args.database_url and not args.spawn:
        parser.error("--database-url only applies with --spawn")

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    settings = Settings(
        url=args.url,
        spawn=args.spawn,
        database_url=args.database_url,
        quick=args.quick,
        connections=args.connections,
        window=args.window,
        events=pick(args.events, 50_000, 10_000),
        prefill=pick(args.prefill, 100_000, 20_000),
        req_samples=pick(args.req_samples, 300, 100),
        idle=pick(args.idle, 10_000, 1_000),
        procs=args.procs,
        server_pid=args.server_pid,
        timeout=args.timeout,
        phase_limit=args.phase_limit,
        handshakes=args.handshakes,
        use_cache=args.spawn and not args.no_cache,
    )
    for name in ("connections", "window", "procs", "handshakes"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("events", "prefill", "req_samples", "idle"):
        if getattr(settings, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if settings.timeout <= 0 or settings.phase_limit <= 0:
        parser.error("--timeout and --phase-limit must be positive")
    return settings


def describe_publish(name: str, res: PublishResult) -> None:
    log(
        f"{name}: {res.accepted} accepted, {res.refused} refused, {res.duplicate} duplicate, "
        f"{res.missing} without OK, {res.unsent} unsent in {res.wall_s:.2f} s "
        f"= {res.rate:.0f} events/s"
    )
    if res.server_cpu_s is not None and res.wall_s > 0:
        log(
            f"{name}: server CPU {res.server_cpu_s / res.wall_s * 100:.0f}% of a core, "
            f"client CPU {res.client_cpu_s / res.wall_s * 100:.0f}% (all client processes)"
        )
    for error in res.errors:
        log(f"{name}: {error}")
    for key, n in sorted(res.reasons.items(), key=lambda kv: -kv[1])[:8]:
        log(f"{name}: {n} x {key}")


async def probe(url: str, wait_s: float) -> None:
    """Fail fast (before minutes of signing) when the relay cannot be reached at all."""
    try:
        conn = await ws_connect(url, wait_s)
    except (OSError, trio.TooSlowError, HandshakeFailed, ValueError) as exc:
        raise RuntimeError(f"cannot open {url}: {exc!r}") from exc
    await conn.aclose()


def report_req(req: ReqResult, figures: dict[str, Any]) -> bool:
    """Log the REQ phase and add its figures; False when the phase did not complete."""
    lat = sorted(req.latencies_ms)
    figures.update(
        req_p50_ms=rounded(percentile(lat, 50)),
        req_p99_ms=rounded(percentile(lat, 99)),
        req_samples=len(lat),
        req_events_min=req.events_min,
    )
    if lat:
        log(f"req: p50 {percentile(lat, 50):.2f} ms, p99 {percentile(lat, 99):.2f} ms")
    if req.events_min is not None and req.events_min < 100:
        log(f"req: some answers held only {req.events_min} events, not 100")
    if req.error:
        log(f"req: {req.error}")
    return not req.error


def report_idle(idle: IdleResult, figures: dict[str, Any]) -> bool:
    """Log the idle phase and add its figures; False when no connection could be measured."""
    per_conn = None
    before, after = idle.rss_before, idle.rss_after
    if before is not None and after is not None and idle.open:
        per_conn = (after - before) / idle.open
    figures.update(
        idle_connections=idle.open,
        idle_failed=idle.failed,
        idle_open_seconds=rounded(idle.open_seconds),
        rss_before_bytes=before,
        rss_after_bytes=after,
        rss_bytes_per_connection=rounded(per_conn, 0),
    )
    log(
        f"idle: {idle.open} open and subscribed, {idle.failed} failed, "
        f"opened in {idle.open_seconds:.1f} s"
    )
    if per_conn is not None:
        log(f"idle: server RSS {before} -> {after} bytes = {per_conn:.0f} bytes per connection")
    for key, n in idle.errors.items():
        log(f"idle: {n} x {key}")
    return idle.open > 0


def run(settings: Settings) -> tuple[dict[str, Any], bool]:
    """Every phase against a relay; returns the figures and whether all phases produced them."""
    figures: dict[str, Any] = {}
    healthy = True
    nofile = raise_nofile()
    idle = settings.idle
    if idle + 200 > nofile:
        idle = max(0, nofile - 200)
        log(f"RLIMIT_NOFILE is {nofile}: opening {idle} idle connections, not {settings.idle}")
    server: SpawnedServer | None = None
    try:
        if settings.spawn:
            server = spawn_gateway(settings.database_url)
            url = server.url
            pid: int | None = server.process.pid
        else:
            assert settings.url is not None
            url = settings.url
            pid = settings.server_pid
        trio.run(probe, url, settings.timeout)
        if pid is None:
            log("server pid unknown (no --server-pid): RSS and server CPU figures are null")
        total = max(settings.events, settings.prefill)
        raws = load_events(total, os.cpu_count() or 2, use_cache=settings.use_cache)
        frames = event_frames(raws)
        del raws

        def publish(batch: Sequence[tuple[str, bytes]]) -> PublishResult:
            return run_publish_phase(
                url,
                batch,
                connections=settings.connections,
                procs=settings.procs,
                window=settings.window,
                wait_s=settings.timeout,
                phase_limit=settings.phase_limit,
                server_pid=pid,
            )

        log(
            f"ingest: {settings.events} events over {settings.connections} connections, "
            f"{settings.procs} client processes, window {settings.window}"
        )
        ingest = publish(frames[: settings.events])
        describe_publish("ingest", ingest)
        lat = sorted(ingest.latencies_ms)
        figures.update(
            ingest_events_per_s=rounded(ingest.rate, 1),
            ok_p50_ms=rounded(percentile(lat, 50)),
            ok_p99_ms=rounded(percentile(lat, 99)),
            ok_refused=ingest.refused,
            ok_duplicate=ingest.duplicate,
            ok_missing=ingest.missing + ingest.unsent,
            ingest_events=ingest.accepted,
            ingest_seconds=rounded(ingest.wall_s),
            # Percent of one core over the phase: which side of the socket ran out of CPU.
            ingest_server_cpu_pct=percent_of_core(ingest.server_cpu_s, ingest.wall_s),
            ingest_client_cpu_pct=percent_of_core(ingest.client_cpu_s, ingest.wall_s),
        )
        if ingest.accepted == 0 and settings.events:
            healthy = False
            log("ingest: the relay accepted no event")

        stored = ingest.accepted
        need = settings.prefill - stored
        extra = frames[settings.events : settings.events + max(0, need)]
        if need > 0 and extra and ingest.accepted:
            log(f"prefill: publishing {len(extra)} more events")
            prefill = publish(extra)
            describe_publish("prefill", prefill)
            stored += prefill.accepted
            figures["prefill_events_per_s"] = rounded(prefill.rate, 1)
        figures["events_prefilled"] = stored
        if stored < settings.prefill:
            log(f"prefill: only {stored} of {settings.prefill} events stored in this run")
        del frames

        if settings.req_samples:
            log(f"req: {settings.req_samples} samples of REQ kinds=[1] limit=100")
            server_cpu0, client_cpu0 = cpu_seconds(pid), own_cpu_seconds()
            req = trio.run(measure_req, url, settings.req_samples, REQ_WARMUP, settings.timeout)
            server_cpu1, client_cpu1 = cpu_seconds(pid), own_cpu_seconds()
            healthy = report_req(req, figures) and healthy
            # CPU per REQ on each side: says whether the latency is the relay's work or waiting.
            done = len(req.latencies_ms) + REQ_WARMUP
            if req.latencies_ms:
                figures["req_client_cpu_ms"] = rounded((client_cpu1 - client_cpu0) / done * 1000)
                if server_cpu0 is not None and server_cpu1 is not None:
                    figures["req_server_cpu_ms"] = rounded(
                        (server_cpu1 - server_cpu0) / done * 1000
                    )
        else:
            figures.update(req_p50_ms=None, req_p99_ms=None, req_samples=0)
        if idle:
            log(f"idle: opening {idle} subscribed connections ({settings.handshakes} at once)")
            idle_result = trio.run(hold_idle, url, idle, settings.handshakes, settings.timeout, pid)
            healthy = report_idle(idle_result, figures) and idle_result.open >= idle and healthy
        else:
            figures.update(idle_connections=0, rss_bytes_per_connection=None)
    finally:
        if server is not None:
            server.stop()
    figures.update(
        url=url,
        spawned=settings.spawn,
        quick=settings.quick,
        connections=settings.connections,
        window=settings.window,
        procs=settings.procs,
    )
    return figures, healthy


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        figures, healthy = run(settings)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, OSError, ImportError) as exc:
        log(f"failed: {exc}")
        # Still one JSON line, so that scripts comparing relays see which run failed and why.
        print(json.dumps({**dict.fromkeys(HEADLINE), "error": str(exc)}), flush=True)
        return 1
    print(json.dumps(figures), flush=True)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
