-- Relays hosted by workers and which workers registered them (hypertuna.storage.registrations).
-- Keep in step with postgres/0004_worker_registrations.sql.

-- A relay key is bound to its owner key for good: rows are never deleted, only their name and
-- description change (by statements the owner signed).
CREATE TABLE worker_relays (
    relay_key TEXT PRIMARY KEY,
    owner_key TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

-- The last accepted statement seq of each (relay, worker) pair, kept after a removal too, so a
-- replayed statement stays refused across restarts. active = 0 once the worker was removed.
CREATE TABLE worker_registrations (
    relay_key TEXT NOT NULL REFERENCES worker_relays (relay_key),
    worker_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    active INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (relay_key, worker_key)
) WITHOUT ROWID;
