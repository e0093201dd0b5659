-- Relay view event store, PostgreSQL flavour. Keep in step with sqlite/0001_initial.sql: the
-- two schemas must give the same answers to the same statements.
-- Text columns use COLLATE "C" so that "lowest id wins" and ORDER BY id compare bytes, exactly
-- like SQLite and Python, whatever the database's default collation is.

CREATE TABLE relays (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text COLLATE "C" NOT NULL UNIQUE,
    name text COLLATE "C" NOT NULL UNIQUE,
    description text NOT NULL,
    created_at bigint NOT NULL
);

-- seq comes from an identity sequence: never reused, increasing in commit order as long as a
-- single writer ingests at a time. d_tag is NULL for regular kinds, '' for replaceable kinds
-- and the (encoded) d tag for addressable kinds.
CREATE TABLE events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relay_id bigint NOT NULL REFERENCES relays (id),
    id text COLLATE "C" NOT NULL,
    pubkey text COLLATE "C" NOT NULL,
    kind integer NOT NULL,
    created_at bigint NOT NULL,
    expiration bigint,
    d_tag text COLLATE "C",
    raw text NOT NULL,
    UNIQUE (relay_id, id)
);

CREATE INDEX events_by_time ON events (relay_id, created_at DESC, id);
CREATE INDEX events_by_kind ON events (relay_id, kind, created_at DESC, id);
CREATE INDEX events_by_author ON events (relay_id, pubkey, created_at DESC, id);
CREATE UNIQUE INDEX events_by_address ON events (relay_id, pubkey, kind, d_tag)
    WHERE d_tag IS NOT NULL;
CREATE INDEX events_by_expiration ON events (expiration) WHERE expiration IS NOT NULL;

CREATE TABLE tags (
    relay_id bigint NOT NULL,
    name text COLLATE "C" NOT NULL,
    value text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    event_seq bigint NOT NULL REFERENCES events (seq) ON DELETE CASCADE
);
CREATE INDEX tags_by_value ON tags (relay_id, name, value, created_at DESC, event_seq);
CREATE INDEX tags_by_event ON tags (event_seq, name, value);

CREATE TABLE deleted_ids (
    relay_id bigint NOT NULL REFERENCES relays (id),
    event_id text COLLATE "C" NOT NULL,
    pubkey text COLLATE "C" NOT NULL,
    PRIMARY KEY (relay_id, event_id, pubkey)
);

CREATE TABLE deleted_addresses (
    relay_id bigint NOT NULL REFERENCES relays (id),
    kind integer NOT NULL,
    pubkey text COLLATE "C" NOT NULL,
    d_tag text COLLATE "C" NOT NULL,
    until_created_at bigint NOT NULL,
    PRIMARY KEY (relay_id, kind, pubkey, d_tag)
);
