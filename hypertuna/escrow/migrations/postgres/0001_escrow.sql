-- Escrow state: relays (owner binding, durable lease version), deposits (ciphertext only),
-- leases (ids, times, digests; never secrets), the hash-chained audit log and its checkpoints,
-- and deposit idempotency keys. Times are Unix milliseconds.

CREATE TABLE escrow_relays (
    relay_key TEXT PRIMARY KEY,
    owner_key TEXT NOT NULL,
    lease_version BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE escrow_deposits (
    deposit_id TEXT PRIMARY KEY,
    relay_key TEXT NOT NULL REFERENCES escrow_relays (relay_key),
    owner_key TEXT NOT NULL,
    writer_public_key TEXT NOT NULL,
    package BYTEA NOT NULL,
    package_digest TEXT NOT NULL,
    package_created_at_ms BIGINT NOT NULL,
    rotation BIGINT NOT NULL,
    deposited_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
    unlock_count BIGINT NOT NULL DEFAULT 0,
    ended_at_ms BIGINT,
    superseded_by TEXT
);
-- One active deposit per relay, whatever the code above it does.
CREATE UNIQUE INDEX escrow_deposits_one_active ON escrow_deposits (relay_key)
    WHERE status = 'active';
CREATE INDEX escrow_deposits_relay ON escrow_deposits (relay_key, rotation);

CREATE TABLE escrow_leases (
    lease_id TEXT PRIMARY KEY,
    relay_key TEXT NOT NULL REFERENCES escrow_relays (relay_key),
    deposit_id TEXT NOT NULL REFERENCES escrow_deposits (deposit_id),
    lease_version BIGINT NOT NULL,
    requester_id TEXT NOT NULL,
    session_key_digest TEXT NOT NULL,
    sealed_digest TEXT NOT NULL,
    issued_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'released', 'expired', 'revoked',
                                           'superseded')),
    ended_at_ms BIGINT,
    end_reason TEXT,
    UNIQUE (relay_key, lease_version)
);
-- No two active leases for one relay, even if serialization were ever broken.
CREATE UNIQUE INDEX escrow_leases_one_active ON escrow_leases (relay_key)
    WHERE status = 'active';
CREATE INDEX escrow_leases_active_expiry ON escrow_leases (expires_at_ms)
    WHERE status = 'active';
CREATE INDEX escrow_leases_deposit ON escrow_leases (deposit_id);

CREATE TABLE escrow_audit (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    action TEXT NOT NULL,
    relay_key TEXT,
    deposit_id TEXT,
    lease_id TEXT,
    actor TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE escrow_checkpoints (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL
);

CREATE TABLE escrow_idempotency (
    idempotency_key TEXT PRIMARY KEY,
    request_digest TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    claimed_at_ms BIGINT NOT NULL,
    response TEXT
);
