"""TLS contexts that follow their certificate, key and CA files on disk.

A standalone escrow serves HTTPS with mandatory client certificates (mutual TLS), and the
gateway's escrow client presents its own certificate. Both sides rotate their files without a
restart: :class:`ReloadingServerContext` and :class:`ReloadingClientContext` hand out an
:class:`ssl.SSLContext` through :meth:`~ReloadingContext.context`, and build a new one when one of
the files changed. Callers fetch the context once per *new connection*, so:

- new connections present the new certificate, and a CA removed from the bundle stops being
  accepted for them (established connections keep the context they were made with);
- a file that is broken (half-written, mismatched key, empty bundle) leaves the previous context
  in service and is logged once as an error; the next change of the files is tried again.

A change is seen through ``os.stat`` of the three files (device, inode, size, mtime, ctime),
looked at no more often than every ``check_interval_s``. Replacing a file by renaming a new one
over it (what most rotation tools and Kubernetes secret volumes do) is always noticed; a file
rewritten in place within the filesystem's timestamp granularity keeping the same size may be
noticed only at its next change.

The files are small and read synchronously by OpenSSL when a context is (re)built; that is
microseconds on a local disk and happens only after a change.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Final, TypeAlias

import attrs

__all__ = [
    "DEFAULT_CHECK_INTERVAL_S",
    "ReloadingClientContext",
    "ReloadingContext",
    "ReloadingServerContext",
    "TlsContextError",
    "TlsContextStatistics",
    "describe_tls_error",
]

log = logging.getLogger(__name__)

#: How often, at most, the files are stat-ed for a change.
DEFAULT_CHECK_INTERVAL_S: Final = 1.0

StrPath: TypeAlias = str | os.PathLike[str]
# What identifies one version of a file: device, inode, size, mtime and ctime (ns); None when
# the file is missing.
_FileSignature: TypeAlias = tuple[int, int, int, int, int] | None


class TlsContextError(Exception):
    """The initial TLS files cannot be loaded (missing, unreadable or inconsistent)."""


@attrs.frozen
class TlsContextStatistics:
    """What a reloading context has done so far.

    ``generation`` counts the contexts built (1 after construction); ``failed_reloads`` counts
    changes of the files that could not be loaded; ``last_error`` describes the latest of them
    (None once a later reload succeeded).
    """

    generation: int
    failed_reloads: int
    last_error: str | None


def _signature(path: str) -> _FileSignature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a TLS failure found in ``exc`` or its causes (OpenSSL's reason and,
    for certificate checks, the verification message), else ``str(exc)``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            reason = current.reason or current.strerror or str(current)
            return str(reason).lower().replace("_", " ")
        current = current.__cause__ or current.__context__
    return str(exc) or type(exc).__name__


class ReloadingContext:
    """An :class:`ssl.SSLContext` rebuilt from its files when they change.

    Subclasses say how to build a context from the files. Construction builds the first context
    and raises :class:`TlsContextError` if that fails: a process must not start with TLS files it
    cannot use. Later failures keep the previous context (see the module docstring).
    """

    def __init__(
        self,
        paths: tuple[str, ...],
        *,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if check_interval_s < 0:
            raise ValueError("check_interval_s must not be negative")
        self._paths = paths
        self._check_interval_s = check_interval_s
        self._clock = clock
        signatures = self._signatures()
        try:
            self._context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TlsContextError(
                f"cannot load TLS files {', '.join(paths)}: {describe_tls_error(exc)}"
            ) from exc
        self._loaded = signatures
        # The signatures of a set of files that failed to load: not retried (nor logged again)
        # until one of the files changes once more.
        self._failed: tuple[_FileSignature, ...] | None = None
        self._next_check = clock() + check_interval_s
        self._generation = 1
        self._failed_reloads = 0
        self._last_error: str | None = None

    def context(self) -> ssl.SSLContext:
        """The context to use for a new connection: the current one, rebuilt first if the files
        changed since it was built. Never raises because of the files."""
        now = self._clock()
        if now < self._next_check:
            return self._context
        self._next_check = now + self._check_interval_s
        signatures = self._signatures()
        if signatures == self._loaded or signatures == self._failed:
            return self._context
        try:
            context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._failed = signatures
            self._failed_reloads += 1
            self._last_error = describe_tls_error(exc)
            log.error(
                "cannot reload TLS files %s (keeping the previous ones): %s",
                ", ".join(self._paths),
                self._last_error,
            )
            return self._context
        self._context = context
        self._loaded = signatures
        self._failed = None
        self._generation += 1
        self._last_error = None
        log.info("reloaded TLS files %s", ", ".join(self._paths))
        return context

    def statistics(self) -> TlsContextStatistics:
        """Reload counters (see :class:`TlsContextStatistics`)."""
        return TlsContextStatistics(
            generation=self._generation,
            failed_reloads=self._failed_reloads,
            last_error=self._last_error,
        )

    def _signatures(self) -> tuple[_FileSignature, ...]:
        return tuple(_signature(path) for path in self._paths)

    def _build(self) -> ssl.SSLContext:
        raise NotImplementedError


class ReloadingServerContext(ReloadingContext):
    """Server side of mutual TLS: presents ``cert_path``/``key_path`` (PEM; the certificate file
    may carry the chain) and accepts only clients whose certificate chains to a CA in the PEM
    bundle ``ca_path``. TLS 1.2 or later, HTTP/1.1 by ALPN."""

    def __init__(
        self,
        cert_path: StrPath,
        key_path: StrPath,
        ca_path: StrPath,
        *,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cert_path = os.fspath(cert_path)
        self.key_path = os.fspath(key_path)
        self.ca_path = os.fspath(ca_path)
        super().__init__(
            (self.cert_path, self.key_path, self.ca_path),
            check_interval_s=check_interval_s,
            clock=clock,
        )

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(self.cert_path, self.key_path)
        context.load_verify_locations(cafile=self.ca_path)
        # An empty bundle would refuse every client; treat it as a broken file instead.
        if not context.get_ca_certs():
            raise ValueError(f"{self.ca_path} holds no CA certificate")
        context.set_alpn_protocols(["http/1.1"])
        return context


class ReloadingClientContext(ReloadingContext):
    """Client side of mutual TLS: trusts only the CAs of the PEM bundle ``ca_path`` (with host
    name checking) and presents ``cert_path``/``key_path`` when given (both or neither).
    TLS 1.2 or later."""

    def __init__(
        self,
        ca_path: StrPath,
        cert_path: StrPath | None = None,
        key_path: StrPath | None = None,
        *,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (cert_path is None) != (key_path is None):
            raise ValueError("give both the client certificate and its key, or neither")
        self.ca_path = os.fspath(ca_path)
        self.cert_path = None if cert_path is None else os.fspath(cert_path)
        self.key_path = None if key_path is None else os.fspath(key_path)
        paths: tuple[str, ...] = (self.ca_path,)
        if self.cert_path is not None and self.key_path is not None:
            paths += (self.cert_path, self.key_path)
        super().__init__(paths, check_interval_s=check_interval_s, clock=clock)

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_path)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_path is not None:
            context.load_cert_chain(self.cert_path, self.key_path)
        context.set_alpn_protocols(["http/1.1"])
        return context
