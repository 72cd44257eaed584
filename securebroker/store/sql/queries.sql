-- Named queries for the PostgreSQL store, parsed once at import (securebroker/store/sql/__init__.py).
-- Every value arrives as a bind parameter; nothing here is ever formatted with input.
-- Times ($now and friends) come from the broker's injected clock, not now(), so leases and
-- expiry are testable without sleeping and identical across the store adapters.

-- name: topic_create
INSERT INTO sb_topics (name, created_at) VALUES ($1, $2)
ON CONFLICT (name) DO NOTHING
RETURNING id, name, created_at;

-- name: topic_get
SELECT t.id, t.name, t.created_at,
       coalesce(array_agg(s.name ORDER BY s.name) FILTER (WHERE s.name IS NOT NULL), '{}') AS subs
FROM sb_topics t LEFT JOIN sb_subscriptions s ON s.topic_id = t.id
WHERE t.name = $1
GROUP BY t.id;

-- name: topic_list
SELECT t.id, t.name, t.created_at,
       coalesce(array_agg(s.name ORDER BY s.name) FILTER (WHERE s.name IS NOT NULL), '{}') AS subs
FROM sb_topics t LEFT JOIN sb_subscriptions s ON s.topic_id = t.id
GROUP BY t.id
ORDER BY t.name;

-- name: topic_delete_messages
DELETE FROM sb_messages WHERE topic_id = $1;

-- name: topic_delete_idempotency
DELETE FROM sb_idempotency WHERE topic_id = $1;

-- name: topic_delete
DELETE FROM sb_topics WHERE id = $1;

-- name: sub_create
INSERT INTO sb_subscriptions
    (name, topic_id, max_attempts, lease_ms, backoff_base_ms, backoff_max_ms, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO NOTHING
RETURNING id;

-- name: sub_get
SELECT s.id, s.name, s.topic_id, t.name AS topic, s.max_attempts, s.lease_ms,
       s.backoff_base_ms, s.backoff_max_ms, s.created_at
FROM sb_subscriptions s JOIN sb_topics t ON t.id = s.topic_id
WHERE s.name = $1;

-- name: sub_list
SELECT s.id, s.name, s.topic_id, t.name AS topic, s.max_attempts, s.lease_ms,
       s.backoff_base_ms, s.backoff_max_ms, s.created_at
FROM sb_subscriptions s JOIN sb_topics t ON t.id = s.topic_id
WHERE $1::text IS NULL OR t.name = $1
ORDER BY s.name;

-- name: sub_counts
SELECT count(*) FILTER (WHERE state = 0 AND available_at <= $2) AS ready,
       count(*) FILTER (WHERE state = 0 AND available_at > $2) AS delayed,
       count(*) FILTER (WHERE state = 1) AS leased,
       count(*) FILTER (WHERE state = 2) AS dead
FROM sb_deliveries WHERE subscription_id = $1;

-- name: sub_has_deliveries
SELECT count(*) FROM sb_deliveries WHERE subscription_id = $1;

-- name: sub_delete_deliveries
DELETE FROM sb_deliveries WHERE subscription_id = $1;

-- name: sub_delete
DELETE FROM sb_subscriptions WHERE id = $1;

-- name: orphans_delete
-- Messages left with no delivery after a subscription was deleted or purged.
DELETE FROM sb_messages m
WHERE m.id = ANY($1::uuid[])
  AND NOT EXISTS (SELECT 1 FROM sb_deliveries d WHERE d.message_id = m.id);

-- name: idem_claim
-- Inputs sorted by key, so concurrent batches lock claims in one order (no deadlocks).
-- A concurrent claim of the same key waits here for the other transaction, then conflicts.
INSERT INTO sb_idempotency (topic_id, producer_scope, key, message_id, fingerprint, created_at)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::uuid[], $5::bytea[],
                     $6::timestamptz[])
ON CONFLICT DO NOTHING
RETURNING message_id;

-- name: idem_existing
-- Each claim by its primary key in a LATERAL subquery of its own, locked in key order: joined
-- to the request, a drained table's one-row estimate made the plan walk the whole primary
-- key instead (docs/adr/0014-queue-plans.md, "Drained statistics").
SELECT x.topic_id, x.producer_scope, x.key, x.message_id, x.fingerprint, x.created_at
FROM (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])
          AS r (topic_id, producer_scope, key)
      ORDER BY 1, 2, 3) AS r
CROSS JOIN LATERAL (
    SELECT i.topic_id, i.producer_scope, i.key, i.message_id, i.fingerprint, i.created_at
    FROM sb_idempotency i
    WHERE i.topic_id = r.topic_id AND i.producer_scope = r.producer_scope AND i.key = r.key
    LIMIT 1
    FOR UPDATE
) AS x;

-- name: idem_renew
-- A claim older than the retention period is free again: it now names the new message.
UPDATE sb_idempotency SET message_id = $4, fingerprint = $5, created_at = $6
WHERE topic_id = $1 AND producer_scope = $2 AND key = $3;

-- name: ordering_lock
-- Serialises publishers of one ordering key so sequence order equals commit order for it.
SELECT count(pg_advisory_xact_lock(k))
FROM (SELECT k FROM unnest($1::bigint[]) AS k ORDER BY k) AS keys;

-- name: publish
-- Messages and their deliveries (migration 0005's sb_insert_messages, which the one-statement
-- group shares).
SELECT sb_insert_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: lease
-- Runs on the lease pool (postgres.LEASE_SETTINGS: no WAL-flush wait, no bitmap scans).
-- Each queue table is reached only through a key: the picked rows by their row ids (locked in
-- this statement, so the ids stay theirs), each message by its primary key in a LATERAL
-- subquery of its own. No other condition on an indexed column is added to those steps: with
-- a statistics-derived estimate of one row (a drained queue, docs/adr/0014-queue-plans.md),
-- any such condition offers the planner a walk of a whole index instead of the lookups.
-- Eligible: live, available, attempts left, not expired, and first of its ordering-key group.
-- An expired lease is eligible again because leasing sets available_at to the lease expiry.
-- prev_state and prev_consumer tell the audit trail when a lease ran out before this one.
WITH picked AS (
    SELECT d.ctid AS row_id, d.message_id, d.state AS prev_state, d.consumer AS prev_consumer
    FROM sb_deliveries d
    WHERE d.subscription_id = $1 AND d.state < 2 AND d.available_at <= $2
      AND d.attempts < $3
      AND (d.expires_at IS NULL OR d.expires_at > $2)
      AND (d.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM sb_deliveries p
            WHERE p.subscription_id = d.subscription_id AND p.ordering_key = d.ordering_key
              AND p.state < 2 AND p.seq < d.seq))
    ORDER BY d.available_at, d.seq
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE sb_deliveries d
    SET state = 1, attempts = d.attempts + 1, lease_token = gen_random_uuid(),
        lease_expires_at = $5, available_at = $5, consumer = $6,
        history = CASE WHEN d.state = 1 THEN d.history || jsonb_build_array(jsonb_build_object(
                    'attempt', d.attempts, 'outcome', 'lease_expired',
                    'at', d.lease_expires_at, 'consumer', d.consumer))
                  ELSE d.history END
    FROM picked
    WHERE d.ctid = picked.row_id
    RETURNING d.message_id, d.lease_token, d.attempts, d.seq, picked.prev_state,
              picked.prev_consumer
)
SELECT l.message_id, l.lease_token, l.attempts, m.topic, m.payload, m.attributes,
       m.content_type, m.idempotency_key, m.ordering_key, m.producer, m.trace_context,
       m.published_at, l.prev_state, l.prev_consumer
FROM leased l
CROSS JOIN LATERAL (
    SELECT (SELECT t.name FROM sb_topics t WHERE t.id = m.topic_id) AS topic, m.payload,
           m.attributes, m.content_type, m.idempotency_key, m.ordering_key, m.producer,
           m.trace_context, m.published_at
    FROM sb_messages m
    WHERE m.id = l.message_id
    LIMIT 1
) m
ORDER BY l.seq;

-- name: ack
-- Delete the deliveries the tokens still own; delete a message with its last delivery
-- (migration 0005's sb_ack_rows, which the one-statement group shares).
SELECT message_id, subscription_id FROM sb_ack_rows($1, $2, $3);

-- name: nack_lock
-- Each row is found by its primary key in a LATERAL subquery over sb_deliveries alone (as in
-- migration 0008's sb_ack_rows: a join could be turned into a walk of the whole table), and
-- locked in key order. "state + 0": never by walking the partial index of leased rows, which
-- stale statistics can call empty (docs/adr/0014-queue-plans.md).
SELECT x.message_id, x.subscription_id, x.attempts, x.row_id
FROM (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[])
          AS r (message_id, subscription_id, lease_token)
      ORDER BY 1, 2) AS r
CROSS JOIN LATERAL (
    SELECT d.message_id, d.subscription_id, d.attempts, d.ctid AS row_id FROM sb_deliveries d
    WHERE d.message_id = r.message_id AND d.subscription_id = r.subscription_id
      AND d.state + 0 = 1 AND d.lease_token = r.lease_token
    LIMIT 1
    FOR UPDATE
) AS x;

-- name: nack_apply
-- The rows nack_lock locked in this transaction, by their row ids (locked, so they stay
-- theirs), after plan_by_keys: joined to its values by key, or by row id with sequential
-- scans allowed, a drained table's one-row estimate made this scan the whole table once per
-- nack (12 s for 1,000 nacks with 100,000 queued).
UPDATE sb_deliveries d
SET state = r.state, available_at = r.available_at, lease_token = NULL, lease_expires_at = NULL,
    last_error = r.error, dead_reason = r.dead_reason,
    dead_at = CASE WHEN r.state = 2 THEN $6::timestamptz END,
    history = d.history || jsonb_build_array(jsonb_build_object(
        'attempt', d.attempts, 'outcome', 'nacked', 'at', $6::timestamptz,
        'consumer', d.consumer, 'error', r.error))
FROM unnest($1::tid[], $2::smallint[], $3::timestamptz[], $4::text[], $5::text[])
    AS r (row_id, state, available_at, error, dead_reason)
WHERE d.ctid = r.row_id;

-- name: extend
-- "state + 0": by primary key, as nack_lock
UPDATE sb_deliveries SET lease_expires_at = $4, available_at = $4
WHERE message_id = $1 AND subscription_id = $2 AND state + 0 = 1 AND lease_token = $3
RETURNING lease_expires_at;

-- name: plan_by_keys
-- For this transaction only (the sweeps and nacks): the planner settings named in $1 with the
-- values in $2 (postgres.KEY_LOOKUPS, which the lease connections keep), so a queue table is
-- reached by its indexes and row ids, never scanned whole.
SELECT count(set_config(name, value, true)) FROM unnest($1::text[], $2::text[]) AS s (name, value);

-- name: sweep_expired
-- Runs after plan_by_keys. The rows picked are locked by this statement and updated by their
-- row ids, with no other condition on an indexed column: with a statistics-derived estimate of
-- one row (a drained queue, docs/adr/0014-queue-plans.md), a join on the key was a walk of the
-- whole primary key on every sweep, with nothing to sweep.
WITH c AS (
    SELECT ctid AS row_id FROM sb_deliveries
    WHERE state = 0 AND expires_at IS NOT NULL AND expires_at <= $1
    ORDER BY expires_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE sb_deliveries d
SET state = 2, dead_reason = 'expired', dead_at = $1,
    history = d.history || jsonb_build_array(jsonb_build_object(
        'outcome', 'expired', 'at', $1::timestamptz))
FROM c
WHERE d.ctid = c.row_id
RETURNING d.message_id,
    (SELECT s.name FROM sb_subscriptions s WHERE s.id = d.subscription_id) AS sub,
    (SELECT t.name FROM sb_subscriptions s JOIN sb_topics t ON t.id = s.topic_id
     WHERE s.id = d.subscription_id) AS topic;

-- name: sweep_exhausted
-- As sweep_expired. Leases that ran out are found through the partial index of leased rows
-- (by expiry: bounded by how many expired), each one's limit by a lookup of its subscription.
WITH c AS (
    SELECT d.ctid AS row_id
    FROM sb_deliveries d
    WHERE d.state = 1 AND d.available_at <= $1
      AND d.attempts >= (SELECT s.max_attempts FROM sb_subscriptions s
                         WHERE s.id = d.subscription_id)
    ORDER BY d.available_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE sb_deliveries d
SET state = 2, dead_reason = 'max_attempts', dead_at = $1, last_error = 'lease expired',
    lease_token = NULL, lease_expires_at = NULL,
    history = d.history || jsonb_build_array(jsonb_build_object(
        'attempt', d.attempts, 'outcome', 'lease_expired',
        'at', d.lease_expires_at, 'consumer', d.consumer))
FROM c
WHERE d.ctid = c.row_id
RETURNING d.message_id, d.attempts, d.consumer,
    (SELECT s.name FROM sb_subscriptions s WHERE s.id = d.subscription_id) AS sub,
    (SELECT t.name FROM sb_subscriptions s JOIN sb_topics t ON t.id = s.topic_id
     WHERE s.id = d.subscription_id) AS topic;

-- name: cleanup_messages
-- Message rows no delivery refers to any more, older than the grace period: a racing ack left
-- them behind, or their topic had no subscription. Each call examines at most $2 messages,
-- oldest first, from where the previous call stopped ($3: the last published_at it examined;
-- the start of time to begin a new pass), so its cost is bounded whatever the backlog: looking
-- for orphans among all the messages older than the grace period cost 100 ms per 200,000
-- queued messages, every cleanup interval. Each candidate is checked by a primary-key lookup
-- (a count, which stays a per-row lookup: NOT EXISTS here became a hashed subplan over all the
-- deliveries, 45 ms per call at 200,000 queued instead of 14) and deleted by key, so stale
-- statistics cannot turn either into a scan of a whole table.
-- Returns how many were deleted, how many examined, and where the next call goes on.
WITH scan AS MATERIALIZED (
    SELECT m.id, m.published_at,
           (SELECT count(*) FROM sb_deliveries d WHERE d.message_id = m.id) = 0 AS orphan
    FROM sb_messages m
    WHERE m.published_at < $1 AND m.published_at > $3
    ORDER BY m.published_at
    LIMIT $2
), gone AS (
    DELETE FROM sb_messages m
    WHERE m.id = ANY (ARRAY(SELECT s.id FROM scan s WHERE s.orphan))
    RETURNING m.id
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM scan) AS examined,
       (SELECT max(s.published_at) FROM scan s) AS last_at;

-- name: cleanup_idempotency
DELETE FROM sb_idempotency WHERE ctid IN (
    SELECT ctid FROM sb_idempotency WHERE created_at < $1 ORDER BY created_at LIMIT $2
);

-- name: cleanup_settles
DELETE FROM sb_settles WHERE ctid IN (
    SELECT ctid FROM sb_settles WHERE created_at < $1 ORDER BY created_at LIMIT $2
);

-- name: settle_claim
-- Taken first, so a concurrent retry of the same settle waits here for the first attempt and
-- then sees its outcome, instead of racing it for the deliveries.
INSERT INTO sb_settles (producer_scope, settle_id, created_at, fingerprint)
VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
RETURNING settle_id;

-- name: settle_get
SELECT results, created_at, fingerprint FROM sb_settles
WHERE producer_scope = $1 AND settle_id = $2;

-- name: settle_renew
-- A settle id older than the retention period is free again.
UPDATE sb_settles SET created_at = $3, results = NULL, fingerprint = $4
WHERE producer_scope = $1 AND settle_id = $2;

-- name: settle_done
UPDATE sb_settles SET results = $3 WHERE producer_scope = $1 AND settle_id = $2;

-- name: dead_list
-- Each message by its primary key (LATERAL), never a join the planner could turn into a walk.
SELECT d.message_id, m.topic, m.idempotency_key, d.attempts, d.dead_reason,
       d.last_error, d.dead_at, m.published_at, d.history
FROM sb_deliveries d
CROSS JOIN LATERAL (
    SELECT (SELECT t.name FROM sb_topics t WHERE t.id = m.topic_id) AS topic,
           m.idempotency_key, m.published_at
    FROM sb_messages m WHERE m.id = d.message_id
    LIMIT 1
) AS m
WHERE d.subscription_id = $1 AND d.state = 2 AND ($2::uuid IS NULL OR d.message_id > $2)
ORDER BY d.message_id
LIMIT $3;

-- name: redrive
-- Back to ready with a fresh set of attempts; id, key, history and last error are kept.
UPDATE sb_deliveries d
SET state = 0, attempts = 0, available_at = $3, dead_reason = NULL, dead_at = NULL,
    expires_at = NULL,
    history = d.history || jsonb_build_array(jsonb_build_object(
        'outcome', 'redriven', 'at', $3::timestamptz, 'attempts', d.attempts))
WHERE d.subscription_id = $1 AND d.state = 2
  AND ($2::uuid[] IS NULL OR d.message_id = ANY($2::uuid[]))
RETURNING d.message_id;

-- name: purge
DELETE FROM sb_deliveries
WHERE subscription_id = $1 AND (state = 2) = $2
RETURNING message_id;

-- name: publish_group
-- A whole group commit in one statement (migrations 0005 and 0006: fresh messages only;
-- SQLSTATE SB001 when a key is already claimed, and nothing is kept).
SELECT sb_publish_group($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                        $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29);

-- name: ack_group
-- A group's acks in one statement (migrations 0005 and 0006: every ack must hold its lease;
-- SQLSTATE SB002 otherwise, and nothing is kept).
SELECT sb_ack_group($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    $17);
