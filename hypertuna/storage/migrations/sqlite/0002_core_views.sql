-- Relays written through cores (hypertuna.storage.relay_view). Keep in step with
-- postgres/0003_core_views.sql.

-- 1 once a relay's events come from its cores: plain ingest is then refused for it.
ALTER TABLE relays ADD COLUMN core_backed INTEGER NOT NULL DEFAULT 0;

-- How far the view of a relay has applied each core, with the membership the owner core gave
-- it: role ('owner' for the owner core), end_length NULL while admitted, else the at_length of
-- its removal. Written in the same transaction as the events those blocks produced.
CREATE TABLE view_cores (
    relay_id INTEGER NOT NULL REFERENCES relays (id),
    core_key TEXT NOT NULL,
    role TEXT NOT NULL,
    length INTEGER NOT NULL,
    end_length INTEGER,
    PRIMARY KEY (relay_id, core_key)
) WITHOUT ROWID;

-- The newest version (created_at, then lowest id) of an address that is known but not stored:
-- deleted by id, or purged after it expired. It keeps shadowing older versions, so that which
-- version of an address survives does not depend on the order events arrived in.
CREATE TABLE address_floors (
    relay_id INTEGER NOT NULL REFERENCES relays (id),
    kind INTEGER NOT NULL,
    pubkey TEXT NOT NULL,
    d_tag TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (relay_id, kind, pubkey, d_tag)
) WITHOUT ROWID;
