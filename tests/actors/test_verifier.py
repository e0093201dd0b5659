from __future__ import annotations

import json

import pytest
import trio

from hypertuna.actors.runtime import ActorGone, Callback, Inbox, ReplyAlreadySent
from hypertuna.actors.verifier import SignatureVerifier, Verify, VerifyThenIngest
from hypertuna.actors.writer import IngestBatch, WriterMessage
from hypertuna.protocol.nostr import Event, parse_event
from hypertuna.storage.events import IngestResult
from tests.support import TIMEOUT, Signer


def _with_signature_of(event: Event, other: Event) -> Event:
    # Same id and content, someone else's signature: only the signature check can tell.
    data = json.loads(event.raw)
    data["sig"] = other.sig
    return parse_event(data, verify_signature=False)


async def test_batches_of_good_and_bad_signatures() -> None:
    alice, bob = Signer(), Signer()
    good = [alice.event(content=str(i)) for i in range(20)]
    bad = [_with_signature_of(alice.event(content=f"x{i}"), bob.event()) for i in range(5)]
    verifier = SignatureVerifier(Inbox("writer", 1), max_batch=8)
    results: dict[str, bool] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(verifier.run)

            async def check(event: Event) -> None:
                results[event.id] = await verifier.inbox.request(lambda r: Verify(event, r))

            async with trio.open_nursery() as requests:
                for event in good + bad:
                    requests.start_soon(check, event)
            verifier.inbox.close()
    assert all(results[e.id] for e in good)
    assert not any(results[e.id] for e in bad)
    stats = dict(verifier.statistics().extra)
    assert stats["verified"] == 25 and stats["rejected"] == 5
    assert 4 <= stats["batches"] < 25  # requests queued together were checked together


async def test_stopped_verifier_fails_requests() -> None:
    verifier = SignatureVerifier(Inbox("writer", 1))
    verifier.inbox.close()
    with pytest.raises(ActorGone):
        await verifier.inbox.request(lambda r: Verify(Signer().event(), r))


async def test_verified_events_go_on_to_the_writer_as_one_batch() -> None:
    """Good signatures are forwarded as one IngestBatch; bad ones are answered at once."""
    alice, bob = Signer(), Signer()
    good = [alice.event(content=str(i)) for i in range(3)]
    bad = _with_signature_of(alice.event(content="forged"), bob.event())
    writer: Inbox[WriterMessage] = Inbox("writer", 4)
    verifier = SignatureVerifier(writer)
    answers: dict[str, IngestResult | BaseException] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(verifier.run)
            for event in [*good, bad]:
                verifier.inbox.send_nowait(
                    VerifyThenIngest(
                        7, event, Callback(lambda r, i=event.id: answers.__setitem__(i, r))
                    )
                )
            forwarded = await writer.receive()
            verifier.inbox.close()
    assert isinstance(forwarded, IngestBatch)
    assert [item.event.id for item in forwarded.items] == [e.id for e in good]
    assert {item.relay_id for item in forwarded.items} == {7}
    assert answers == {bad.id: IngestResult(False, "invalid: bad signature", None)}
    forwarded.items[0].reply.send(IngestResult(True, "", 1))
    assert answers[good[0].id] == IngestResult(True, "", 1)
    with pytest.raises(ReplyAlreadySent):
        forwarded.items[0].reply.send(IngestResult(True, "", 1))


async def test_writer_gone_fails_forwarded_requests() -> None:
    writer: Inbox[WriterMessage] = Inbox("writer", 1)
    writer.close()
    verifier = SignatureVerifier(writer)
    answers: list[IngestResult | BaseException] = []
    answered = trio.Event()

    def record(answer: IngestResult | BaseException) -> None:
        answers.append(answer)
        answered.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(verifier.run)
            await verifier.inbox.send(VerifyThenIngest(1, Signer().event(), Callback(record)))
            await answered.wait()
            verifier.inbox.close()
    assert isinstance(answers[0], ActorGone)
