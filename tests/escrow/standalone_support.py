"""``hypertuna escrow serve`` as a real process for tests: keys made with ``hypertuna escrow
init``, trustme certificates (:class:`tests.escrow_transport.Pki`), HMAC client ``gateway-1``,
port 0 at the first start and the same port when started again (a new epoch, the same
database)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import nacl.signing

from hypertuna.escrow.keys import EscrowKey, load_escrow_key
from hypertuna.escrow_client import EscrowTransport
from hypertuna.worker.backoff import BackoffPolicy
from tests.escrow_transport import CLIENT_ID, SECRET, Pki

_LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")


class Server:
    """A standalone escrow process in ``directory``; :meth:`stop` and :meth:`start` it at will.
    ``output`` collects everything it printed, over all its runs."""

    def __init__(self, directory: Path, pki: Pki, env: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.pki = pki
        init = subprocess.run(
            [sys.executable, "-m", "hypertuna.cli", "escrow", "init", "--dir", "keys"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        self.escrow_key: EscrowKey = load_escrow_key(directory / "keys" / "escrow.key")
        self.operator = nacl.signing.SigningKey.generate()
        self.port = 0
        self.output: list[str] = []
        self._env = dict(env or {})
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self._process is None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESCROW_")}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "ESCROW_KEY_DIR": "keys",
                "ESCROW_SQLITE_PATH": "var/escrow.db",
                "ESCROW_HOST": "127.0.0.1",
                "ESCROW_PORT": str(self.port),
                "ESCROW_TLS_CERT": str(self.pki.server_cert),
                "ESCROW_TLS_KEY": str(self.pki.server_key),
                "ESCROW_TLS_CA": str(self.pki.ca_bundle),
                "ESCROW_HMAC_CLIENTS": f"{CLIENT_ID}:{SECRET.hex()}",
                "ESCROW_OPERATOR_KEYS": self.operator.verify_key.encode().hex(),
                "ESCROW_LOG_LEVEL": "debug",
                **self._env,
            }
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "hypertuna.cli", "escrow", "serve"],
            cwd=self.directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        found = threading.Event()
        port: list[int] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.output.append(line)
                match = _LISTENING.search(line)
                if match and not port:
                    port.append(int(match.group(1)))
                    found.set()
            found.set()

        self._process = process
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not (found.wait(60) and port):
            self.stop()
            raise AssertionError("the escrow did not start:\n" + "".join(self.output))
        self.port = port[0]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(5)

    def transport(self, name: str = CLIENT_ID, **options: Any) -> EscrowTransport:
        """A client of the escrow with a certificate ``CN=name`` (of ``ca`` when given)."""
        return EscrowTransport(
            self.url,
            client_id=CLIENT_ID,
            secret=SECRET,
            ssl_context_holder=self.pki.client_holder(name, options.pop("ca", None)),
            wall_clock=time.time,
            retries=options.pop("retries", 1),
            backoff=BackoffPolicy(base_s=0.01, cap_s=0.05),
            **options,
        )


@contextlib.contextmanager
def running_escrow(
    directory: Path, pki: Pki, env: Mapping[str, str] | None = None
) -> Iterator[Server]:
    """A started :class:`Server`, stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    server = Server(directory, pki, env)
    server.start()
    try:
        yield server
    finally:
        server.stop()
