-- Atomic settle (DESIGN §3.6, docs/adr/0010-atomic-settle.md): acks and publishes in one
-- transaction, made idempotent by a settle id per principal. A retry after an unknown outcome
-- finds its row and gets the first outcome back instead of running again. Rows are kept for
-- the idempotency retention period, like idempotency keys.
CREATE TABLE sb_settles (
    producer_scope  text NOT NULL,
    settle_id       text NOT NULL,
    results         jsonb,          -- [[message_id, duplicate], ...] of the outputs
    fingerprint     bytea NOT NULL, -- what was settled: a reused id for another settle conflicts
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (producer_scope, settle_id)
);
CREATE INDEX sb_settles_created ON sb_settles (created_at);
