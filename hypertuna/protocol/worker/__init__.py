"""The worker control protocol: what a worker and the gateway say over ``/gateway/worker``.

Every message is one WebSocket text frame holding one JSON object with ``"v": 1`` and a
``"type"``; :func:`decode` turns a frame into one of the frozen message classes below or raises
:class:`ProtocolError` (with the :class:`ErrorCode` to answer), and :func:`encode` is its
inverse. Pure: no I/O.

Connection (gateway speaks first)::

    gateway -> worker   challenge   {gateway_id, nonce}
    worker  -> gateway  hello       {worker_key, nonce, sig, agent}
    gateway -> worker   welcome     {worker_id, heartbeat_interval_ms, liveness_timeout_ms,
                                     max_message_bytes}

``sig`` is the worker's Ed25519 signature of :func:`hello_signable` (a fixed context, the
gateway id, the nonce and the worker key), so a hello is bound to one gateway and one
connection: replaying it on another connection fails, because every connection gets a fresh
nonce.

Relay registration (worker -> gateway, answered by ``ack`` or ``error`` with the same ``id``)::

    relay-register  {id, statement, sig}     statement.action = "register" | "update" | "remove"

The :class:`RelayStatement` names the relay key, the owner's Ed25519 public key (the relay key
must be the key of the owner core that public key signs: ``manifest_hash`` of its default
manifest), the gateway id and the worker key it is for, a ``seq`` that must grow for each
(relay, worker) pair, and the relay's public name and description. ``sig`` is the owner key's
signature of :func:`statement_signable`. So only the owner key can register, change or remove
its relay, a statement cannot be used at another gateway or by another worker, and an old
statement cannot be replayed.

Liveness: each side sends ``heartbeat {t}`` every ``heartbeat_interval_ms``; a side that hears
nothing for ``liveness_timeout_ms`` treats the other as gone.

Forwarded client traffic, multiplexed by ``session`` (an integer the gateway picks)::

    gateway -> worker   session-open     {session, relay_key}
    worker  -> gateway  session-ready    {session}            | session-refused {session, reason}
    gateway -> worker   client-frames    {session, frames: [NIP-01 client texts]}
    worker  -> gateway  relay-frames     {session, frames: [NIP-01 relay texts]}
    either              session-close    {session, reason}

``client-frames`` and ``relay-frames`` also have a binary form (:func:`encode_binary`, sent as a
WebSocket binary message: ``u8 kind ‖ u64 session ‖ u32 count`` then ``u32 length ‖ UTF-8``
per frame), which both sides send on the hot path because it needs no JSON escaping; every
receiver accepts both forms.

Mirroring and pushes (used by the blind-peer and escrow features)::

    worker  -> gateway  mirror-request   {core_key}
    worker  -> gateway  mirror-update    {core_key, manifest, start, fork, blocks, signature, meta}
    gateway -> worker   mirror-status    {core_key, length, fork}
    gateway -> worker   pending-writes   {relay_key, kinds, drive_key, drive_version, lease_version}
    worker  -> gateway  pending-writes-ack {relay_key, lease_version}

Blind-peer mirroring: a worker asks ``mirror-request`` for each core it mirrors and learns the
gateway's length (0 for a core the gateway does not hold) from ``mirror-status``; it then sends
``mirror-update``s from that length, each ending at a length it signed, and every accepted
update is answered with the new ``mirror-status``. ``blocks`` are base64 (stored form),
``manifest`` and ``signature`` hex. ``meta`` must hold ``relay_key`` (a relay this worker
registered), ``type`` (``owner`` — then ``core_key`` is the relay key —, ``writer``,
``drive-entries`` or ``drive-blobs``) and ``length`` (the worker's length of the core, for lag),
and may hold ``announce`` (bool), ``priority`` (int) and ``relay_id`` (the public name). A refused
update is answered ``error {id: null, code, message}`` whose message starts with
``mirror <core_key>:``; codes: ``malformed`` (meta of the wrong type), ``unauthorized`` (a
relay the sender did not register), ``verification-failed``, ``too-large`` (a block over the
gateway's limit), ``quota-exceeded``. Nothing is stored and the connection continues. A gateway
without mirroring answers ``unknown-type`` or ``not-implemented``; a worker then stops mirroring
on that connection.

Errors: ``error {id, code, message}`` (``id`` of the request it answers, or null). A message that
is malformed, of an unknown type, or not allowed yet gets an ``error`` and changes nothing; a
message larger than ``max_message_bytes`` closes the connection (1009) with a reason.
"""

from __future__ import annotations

from hypertuna.protocol.worker.messages import (
    AGENT_MAX,
    HELLO_CONTEXT,
    MAX_FRAMES_PER_MESSAGE,
    PROTOCOL_VERSION,
    STATEMENT_CONTEXT,
    Ack,
    Challenge,
    ClientFrames,
    ErrorCode,
    ErrorMessage,
    Heartbeat,
    Hello,
    Message,
    MirrorRequest,
    MirrorStatus,
    MirrorUpdate,
    PendingWrites,
    PendingWritesAck,
    ProtocolError,
    RelayAction,
    RelayFrames,
    RelayRegister,
    RelayStatement,
    SessionClose,
    SessionOpen,
    SessionReady,
    SessionRefused,
    Welcome,
    binary_size,
    decode,
    encode,
    encode_binary,
    hello_signable,
    owner_relay_key,
    sign_hello,
    sign_statement,
    statement_signable,
    verify_hello,
    verify_statement,
)

__all__ = [
    "AGENT_MAX",
    "HELLO_CONTEXT",
    "MAX_FRAMES_PER_MESSAGE",
    "PROTOCOL_VERSION",
    "STATEMENT_CONTEXT",
    "Ack",
    "Challenge",
    "ClientFrames",
    "ErrorCode",
    "ErrorMessage",
    "Heartbeat",
    "Hello",
    "Message",
    "MirrorRequest",
    "MirrorStatus",
    "MirrorUpdate",
    "PendingWrites",
    "PendingWritesAck",
    "ProtocolError",
    "RelayAction",
    "RelayFrames",
    "RelayRegister",
    "RelayStatement",
    "SessionClose",
    "SessionOpen",
    "SessionReady",
    "SessionRefused",
    "Welcome",
    "binary_size",
    "decode",
    "encode",
    "encode_binary",
    "hello_signable",
    "owner_relay_key",
    "sign_hello",
    "sign_statement",
    "statement_signable",
    "verify_hello",
    "verify_statement",
]
