-- The producer outbox (securebroker.outbox), installed in the PRODUCER's own database by
-- `securebroker.outbox.install(conn)` or `securebroker outbox migrate --dsn DSN`.
-- Idempotent: every statement is IF NOT EXISTS, and install() runs it under an advisory lock so
-- two installers at once do not race on the catalog.

CREATE TABLE IF NOT EXISTS sb_outbox (
    -- claim order (and, per topic + ordering key, publish order)
    id              bigserial PRIMARY KEY,
    -- the broker idempotency key the relay publishes with (a UUIDv7 string by default)
    key             text NOT NULL UNIQUE CHECK (length(key) BETWEEN 1 AND 255),
    topic           text NOT NULL,
    payload         bytea NOT NULL,
    attributes      jsonb NOT NULL DEFAULT '{}',
    content_type    text NOT NULL DEFAULT 'application/octet-stream',
    ordering_key    text CHECK (length(ordering_key) BETWEEN 1 AND 255),
    -- W3C trace context of the enqueuing transaction ({} when untraced)
    trace_context   jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- publish attempts made (the successful one included)
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- set together, in the relay's transaction, once the broker confirmed the message
    sent_at         timestamptz,
    message_id      uuid,
    -- the last failure's error code or class (never a payload or an error text)
    last_error      text,
    CONSTRAINT sb_outbox_sent_has_id CHECK ((sent_at IS NULL) = (message_id IS NULL))
);

-- Pending rows in claim order.
CREATE INDEX IF NOT EXISTS sb_outbox_pending ON sb_outbox (id) WHERE sent_at IS NULL;

-- "Is there an earlier unsent row with my topic and ordering key?"
CREATE INDEX IF NOT EXISTS sb_outbox_pending_ordering ON sb_outbox (topic, ordering_key, id)
    WHERE sent_at IS NULL AND ordering_key IS NOT NULL;

-- Sent rows by age, for purge_sent().
CREATE INDEX IF NOT EXISTS sb_outbox_sent ON sb_outbox (sent_at) WHERE sent_at IS NOT NULL;
