-- The consumer inbox (securebroker.inbox), in the CONSUMER's own database. One row per message
-- a consumer has taken effect on, written in the same transaction as the effect, so a
-- redelivered message is recognised and has no second effect. ``outputs`` keeps what the
-- handler asked to publish, so a settle interrupted by a crash is replayed, not recomputed.
CREATE TABLE IF NOT EXISTS sb_inbox (
    consumer      text NOT NULL,            -- the Inbox's name (one per consuming service)
    message_id    uuid NOT NULL,
    subscription  text NOT NULL,
    topic         text NOT NULL,
    outputs       jsonb,                    -- [{topic, payload (base64), ...}] or NULL
    processed_at  timestamptz NOT NULL,
    settled_at    timestamptz,              -- when the broker confirmed ack (+ outputs)
    redeliveries  integer NOT NULL DEFAULT 0,   -- deliveries seen after the first, no effect
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS sb_inbox_processed ON sb_inbox (processed_at);
