"""SignatureVerifier: BIP-340 checks in batches on a worker thread.

Verifying a signature is the largest single cost of accepting an event. The edge parses events
without it and sends them here; whatever is queued is checked together in one worker-thread
call, where the curve arithmetic runs without the GIL, so verification uses the second core
while the event loop keeps reading frames. Events bound for storage
(:class:`VerifyThenIngest`) go on to the :class:`~hypertuna.actors.writer.EventWriter` as one
message per batch; a bad signature is answered at once with ``OK false "invalid: ..."``.
"""

from __future__ import annotations

import attrs
import trio

from hypertuna.actors.runtime import ActorGone, ActorStatistics, Inbox, ReplyPath
from hypertuna.actors.writer import Ingest, IngestBatch, WriterMessage
from hypertuna.protocol.nostr import Event, Prefix, reason, verify_signatures
from hypertuna.storage.events import IngestResult

__all__ = ["BAD_SIGNATURE", "SignatureVerifier", "Verify", "VerifyThenIngest"]

BAD_SIGNATURE = reason(Prefix.INVALID, "bad signature")


@attrs.frozen
class Verify:
    """Is ``event``'s signature valid? (Its id already matches its content.)"""

    event: Event
    reply: ReplyPath[bool]


@attrs.frozen
class VerifyThenIngest:
    """Check ``event``'s signature, then store it in relay ``relay_id``; the reply is the
    store's verdict, or a refusal for a bad signature."""

    relay_id: int
    event: Event
    reply: ReplyPath[IngestResult]


VerifierMessage = Verify | VerifyThenIngest


class SignatureVerifier:
    """Actor checking event signatures in batches off the event loop."""

    def __init__(
        self, writer: Inbox[WriterMessage], *, max_batch: int = 512, inbox_capacity: int = 8192
    ) -> None:
        self.inbox: Inbox[VerifierMessage] = Inbox("signature-verifier", inbox_capacity)
        self._writer = writer
        self._max_batch = max_batch
        self._batches = 0
        self._verified = 0
        self._rejected = 0

    def statistics(self) -> ActorStatistics:
        return self.inbox.statistics(
            batches=self._batches, verified=self._verified, rejected=self._rejected
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        batch: list[VerifierMessage] = []
        try:
            while True:
                try:
                    batch = [await self.inbox.receive()]
                except trio.EndOfChannel:
                    return
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self.inbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                events = [message.event for message in batch]
                results = await trio.to_thread.run_sync(verify_signatures, events)
                self._batches += 1
                onward: list[Ingest] = []
                for message, ok in zip(batch, results, strict=True):
                    self._verified += 1
                    self._rejected += not ok
                    if isinstance(message, Verify):
                        message.reply.send(ok)
                    elif not ok:
                        message.reply.send(IngestResult(False, BAD_SIGNATURE, None))
                    else:
                        onward.append(Ingest(message.relay_id, message.event, message.reply))
                batch = []
                if onward:
                    try:
                        await self._writer.send(IngestBatch(tuple(onward)))
                    except ActorGone as gone:
                        for item in onward:
                            item.reply.fail_if_pending(gone)
        finally:
            for message in batch + self.inbox.drain():
                message.reply.fail_if_pending(ActorGone("signature verifier stopped"))
