-- Named queries of the producer outbox (securebroker.outbox), parsed once at import.
-- Every value arrives as a bind parameter; nothing here is ever formatted with input.
-- Times: $now is the relay's injected clock, or NULL for the database's now(). JSON columns
-- travel as text (::text / ::text::jsonb) so the queries work whatever jsonb codec the
-- caller's connection has.

-- name: install_lock
SELECT pg_advisory_xact_lock(5390217603718412067);

-- name: enqueue
INSERT INTO sb_outbox (key, topic, payload, attributes, content_type, ordering_key, trace_context)
VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7::text::jsonb);

-- name: claim
-- Lock up to $2 due rows in id order, skipping rows another relay holds, and return those that
-- may be published now: a row with an ordering key only if no EARLIER UNSENT row of the same
-- topic and key exists outside this claim. The check reads the table, not the locks: a row
-- another relay has locked (and skipped here) is still unsent, so it blocks its successors.
-- Blocked rows stay locked (and untouched) until this transaction ends.
WITH candidate AS MATERIALIZED (
    SELECT id, key, topic, payload, attributes::text AS attributes, content_type,
           ordering_key, trace_context::text AS trace_context, attempts
    FROM sb_outbox
    WHERE sent_at IS NULL AND next_attempt_at <= coalesce($1::timestamptz, now())
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
SELECT c.id, c.key, c.topic, c.payload, c.attributes, c.content_type, c.ordering_key,
       c.trace_context, c.attempts
FROM candidate c
WHERE c.ordering_key IS NULL
   OR NOT EXISTS (
        SELECT 1 FROM sb_outbox e
        WHERE e.topic = c.topic
          AND e.ordering_key = c.ordering_key
          AND e.sent_at IS NULL
          AND e.id < c.id
          AND e.id NOT IN (SELECT id FROM candidate)
   )
ORDER BY c.id;

-- name: mark_sent
UPDATE sb_outbox o
SET sent_at = coalesce($3::timestamptz, now()),
    message_id = s.message_id,
    attempts = o.attempts + 1,
    last_error = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS s(id, message_id)
WHERE o.id = s.id AND o.sent_at IS NULL;

-- name: mark_failed
UPDATE sb_outbox o
SET attempts = o.attempts + 1,
    last_error = s.error,
    next_attempt_at = coalesce($4::timestamptz, now()) + s.delay
FROM unnest($1::bigint[], $2::text[], $3::interval[]) AS s(id, error, delay)
WHERE o.id = s.id AND o.sent_at IS NULL;

-- name: purge_sent
DELETE FROM sb_outbox
WHERE id IN (
    SELECT id FROM sb_outbox
    WHERE sent_at IS NOT NULL AND sent_at < $1
    ORDER BY sent_at
    LIMIT $2
);

-- name: pending_count
SELECT count(*) FROM sb_outbox WHERE sent_at IS NULL;

-- name: installed
SELECT to_regclass('sb_outbox') IS NOT NULL;
