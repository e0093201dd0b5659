-- Relays hosted by workers and which workers registered them (hypertuna.storage.registrations).
-- Keep in step with sqlite/0003_worker_registrations.sql.

-- A relay key is bound to its owner key for good: rows are never deleted, only their name and
-- description change (by statements the owner signed).
CREATE TABLE worker_relays (
    relay_key text COLLATE "C" PRIMARY KEY,
    owner_key text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL UNIQUE,
    description text NOT NULL,
    updated_at bigint NOT NULL
);

-- The last accepted statement seq of each (relay, worker) pair, kept after a removal too, so a
-- replayed statement stays refused across restarts. active = 0 once the worker was removed.
CREATE TABLE worker_registrations (
    relay_key text COLLATE "C" NOT NULL REFERENCES worker_relays (relay_key),
    worker_key text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    active integer NOT NULL,
    updated_at bigint NOT NULL,
    PRIMARY KEY (relay_key, worker_key)
);
