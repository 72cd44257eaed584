-- Named queries of the consumer inbox (securebroker/inbox/__init__.py). Bind parameters only.

-- name: install_lock
SELECT pg_advisory_xact_lock(7152093466143);

-- name: claim
-- First sight of a message: the row, in the handler's transaction. A concurrent delivery of
-- the same message waits here for that transaction, then finds the row.
INSERT INTO sb_inbox (consumer, message_id, subscription, topic, processed_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING message_id;

-- name: seen
-- A redelivery of a message already taken effect on: count it, return what to settle with.
UPDATE sb_inbox SET redeliveries = redeliveries + 1
WHERE consumer = $1 AND message_id = $2
RETURNING outputs::text AS outputs;

-- name: set_outputs
UPDATE sb_inbox SET outputs = $3::text::jsonb WHERE consumer = $1 AND message_id = $2;

-- name: settled
UPDATE sb_inbox SET settled_at = $3 WHERE consumer = $1 AND message_id = $2;

-- name: trim
-- Rows older than the retention (longer than any redelivery can arrive), oldest first.
DELETE FROM sb_inbox WHERE ctid IN (
    SELECT ctid FROM sb_inbox
    WHERE consumer = $1 AND processed_at < $2 AND settled_at IS NOT NULL
    ORDER BY processed_at LIMIT $3
);
