-- Relay view event store, SQLite flavour. Keep in step with postgres/0001_initial.sql: the two
-- schemas must give the same answers to the same statements.

CREATE TABLE relays (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- seq is AUTOINCREMENT so that a seq is never handed out twice, even after the newest row is
-- deleted: live subscriptions use it as a high-water mark.
-- d_tag is NULL for regular kinds, '' for replaceable kinds and the (encoded) d tag for
-- addressable kinds, so one partial unique index guards "one version per address".
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    relay_id INTEGER NOT NULL REFERENCES relays (id),
    id TEXT NOT NULL,
    pubkey TEXT NOT NULL,
    kind INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expiration INTEGER,
    d_tag TEXT,
    raw TEXT NOT NULL,
    UNIQUE (relay_id, id)
);

-- Every index ends in (created_at DESC, id) so that "newest first, lowest id on ties, LIMIT n"
-- is read straight off the index for one value of the driving column.
CREATE INDEX events_by_time ON events (relay_id, created_at DESC, id);
CREATE INDEX events_by_kind ON events (relay_id, kind, created_at DESC, id);
CREATE INDEX events_by_author ON events (relay_id, pubkey, created_at DESC, id);
CREATE UNIQUE INDEX events_by_address ON events (relay_id, pubkey, kind, d_tag)
    WHERE d_tag IS NOT NULL;
CREATE INDEX events_by_expiration ON events (expiration) WHERE expiration IS NOT NULL;

-- One row per distinct (letter, value) of an event. WITHOUT ROWID: the primary key is the
-- lookup index, so a tag costs one b-tree insert instead of two.
CREATE TABLE tags (
    relay_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    event_seq INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    PRIMARY KEY (relay_id, name, value, created_at DESC, event_seq)
) WITHOUT ROWID;
CREATE INDEX tags_by_event ON tags (event_seq, name, value);

-- NIP-09 tombstones: an id deleted by a pubkey, and an address deleted up to a created_at.
CREATE TABLE deleted_ids (
    relay_id INTEGER NOT NULL REFERENCES relays (id),
    event_id TEXT NOT NULL,
    pubkey TEXT NOT NULL,
    PRIMARY KEY (relay_id, event_id, pubkey)
) WITHOUT ROWID;

CREATE TABLE deleted_addresses (
    relay_id INTEGER NOT NULL REFERENCES relays (id),
    kind INTEGER NOT NULL,
    pubkey TEXT NOT NULL,
    d_tag TEXT NOT NULL,
    until_created_at INTEGER NOT NULL,
    PRIMARY KEY (relay_id, kind, pubkey, d_tag)
) WITHOUT ROWID;
