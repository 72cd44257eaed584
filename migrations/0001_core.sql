-- securebroker core schema: topics, subscriptions, messages, deliveries, idempotency keys.
-- See docs/adr/0002-queue-tables.md for the index plan and the retention strategy.

CREATE TABLE sb_topics (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL
);

CREATE TABLE sb_subscriptions (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    topic_id         bigint NOT NULL REFERENCES sb_topics (id),
    max_attempts     integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 1000),
    lease_ms         bigint NOT NULL CHECK (lease_ms > 0),
    backoff_base_ms  bigint NOT NULL CHECK (backoff_base_ms > 0),
    backoff_max_ms   bigint NOT NULL CHECK (backoff_max_ms >= backoff_base_ms),
    created_at       timestamptz NOT NULL
);
CREATE INDEX sb_subscriptions_topic ON sb_subscriptions (topic_id);

-- Publish order across all topics; also the order key for ordering-key groups.
-- No CACHE: cached blocks per connection would hand out numbers out of commit order.
CREATE SEQUENCE sb_message_seq AS bigint;

-- One row per accepted message; referenced by one delivery row per subscription.
-- No foreign keys on the hot tables: integrity is kept by the store's transactions, and an FK
-- check per inserted row would cost an index probe on every publish.
CREATE TABLE sb_messages (
    id               uuid PRIMARY KEY,          -- UUIDv7: time-ordered
    seq              bigint NOT NULL DEFAULT nextval('sb_message_seq'),
    topic_id         bigint NOT NULL,
    payload          bytea NOT NULL,
    attributes       jsonb NOT NULL DEFAULT '{}',
    content_type     text NOT NULL,
    idempotency_key  text,
    ordering_key     text,
    producer         text NOT NULL,
    not_before       timestamptz,
    expires_at       timestamptz,
    trace_context    jsonb NOT NULL DEFAULT '{}',
    published_at     timestamptz NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX sb_messages_topic ON sb_messages (topic_id);
CREATE INDEX sb_messages_published ON sb_messages (published_at);

-- The state of one message in one subscription. Acked rows are deleted at once.
-- state: 0 ready (available_at may be in the future: delayed or backing off),
--        1 leased (available_at = lease expiry, so an expired lease is simply "ready again"),
--        2 dead (the subscription's dead-letter queue).
CREATE TABLE sb_deliveries (
    message_id        uuid NOT NULL,
    subscription_id   bigint NOT NULL,
    seq               bigint NOT NULL,
    state             smallint NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2)),
    available_at      timestamptz NOT NULL,
    ordering_key      text,
    expires_at        timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    consumer          text,
    last_error        text,
    dead_reason       text,
    dead_at           timestamptz,
    history           jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (message_id, subscription_id)
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
-- The dequeue scan: live rows of one subscription in availability order.
CREATE INDEX sb_deliveries_dequeue ON sb_deliveries (subscription_id, available_at, seq)
    WHERE state < 2;
-- "Is there an earlier live message with my ordering key?" (one in flight per key).
CREATE INDEX sb_deliveries_ordering ON sb_deliveries (subscription_id, ordering_key, seq)
    WHERE state < 2 AND ordering_key IS NOT NULL;
-- The sweeper: leases that ran out, and ready messages that expire.
CREATE INDEX sb_deliveries_leased ON sb_deliveries (available_at) WHERE state = 1;
CREATE INDEX sb_deliveries_expiring ON sb_deliveries (expires_at)
    WHERE state = 0 AND expires_at IS NOT NULL;
-- The dead-letter queue listing.
CREATE INDEX sb_deliveries_dead ON sb_deliveries (subscription_id, message_id) WHERE state = 2;

-- Idempotency claims, kept for the retention period (default 7 days) independently of the
-- message rows, so a retry days later still gets the original id.
CREATE TABLE sb_idempotency (
    topic_id        bigint NOT NULL,
    producer_scope  text NOT NULL,
    key             text NOT NULL,
    message_id      uuid NOT NULL,
    fingerprint     bytea NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (topic_id, producer_scope, key)
);
CREATE INDEX sb_idempotency_created ON sb_idempotency (created_at);
