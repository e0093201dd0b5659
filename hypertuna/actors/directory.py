"""RelayDirectory: which relays this gateway hosts, by key or alias.

Owns a cache in front of the store's relay table. Misses go to the store, so a relay created by
``hypertuna relay create`` while the gateway runs is found on its first request.
"""

from __future__ import annotations

import attrs
import trio

from hypertuna.actors.runtime import ActorStatistics, Inbox, Reply
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import EventStore, RelayRecord
from hypertuna.storage.hosted import create_hosted_relay

__all__ = ["CreateRelay", "ListRelays", "LookupRelay", "RelayDirectory"]


@attrs.frozen
class LookupRelay:
    key_or_name: str
    reply: Reply[RelayRecord | None]


@attrs.frozen
class ListRelays:
    reply: Reply[list[RelayRecord]]


@attrs.frozen
class CreateRelay:
    """Create a hosted relay (its key is the key of its new owner core)."""

    name: str
    description: str
    created_at: int
    reply: Reply[RelayRecord]


DirectoryMessage = LookupRelay | ListRelays | CreateRelay


class RelayDirectory:
    """Actor answering relay lookups from a cache, falling back to the store."""

    def __init__(self, store: EventStore, cores: CoreStore, *, inbox_capacity: int = 1024) -> None:
        self.inbox: Inbox[DirectoryMessage] = Inbox("relay-directory", inbox_capacity)
        self._store = store
        self._cores = cores
        self._cache: dict[str, RelayRecord] = {}
        self._hits = 0

    def statistics(self) -> ActorStatistics:
        return self.inbox.statistics(cached=len(self._cache), hits=self._hits)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for record in await self._store.list_relays():
            self._remember(record)
        task_status.started()
        try:
            while True:
                try:
                    message = await self.inbox.receive()
                except trio.EndOfChannel:
                    return
                await self._handle(message)
        finally:
            for pending in self.inbox.drain():
                pending.reply.fail_if_pending(RuntimeError("relay directory stopped"))

    def _remember(self, record: RelayRecord) -> None:
        self._cache[record.key] = record
        self._cache[record.name] = record

    async def _handle(self, message: DirectoryMessage) -> None:
        try:
            match message:
                case LookupRelay(key_or_name=ident, reply=reply):
                    if (record := self._cache.get(ident)) is not None:
                        self._hits += 1
                        reply.send(record)
                        return
                    found = await self._store.get_relay(ident)
                    if found is not None:
                        self._remember(found)
                    reply.send(found)
                case ListRelays(reply=reply):
                    records = await self._store.list_relays()
                    for record in records:
                        self._remember(record)
                    reply.send(records)
                case CreateRelay(reply=reply):
                    created = await create_hosted_relay(
                        self._store,
                        self._cores,
                        name=message.name,
                        description=message.description,
                        created_at=message.created_at,
                    )
                    self._remember(created)
                    reply.send(created)
        except Exception as exc:
            # Storage failures go back to the requester, who turns them into a wire error.
            message.reply.fail_if_pending(exc)
