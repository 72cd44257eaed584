-- Named queries of the audit trail (securebroker/audit/log.py, docs/adr/0008-audit-trail.md).
-- Parsed once at import; every value is a bind parameter.

-- name: audit_chain_create
INSERT INTO sb_audit_chains (instance) VALUES ($1) RETURNING id;

-- name: audit_epoch
-- The server's crash marker (migration 0007): the token, created if a crash emptied the table.
-- (The SELECT does not see the INSERT's row: one of the two returns it.)
WITH ins AS (
    INSERT INTO sb_server_epoch (token) VALUES (gen_random_uuid())
    ON CONFLICT (id) DO NOTHING
    RETURNING token
)
SELECT token FROM ins UNION ALL SELECT token FROM sb_server_epoch LIMIT 1;

-- name: audit_chain_head
SELECT seq, hash, at FROM sb_audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1;

-- name: audit_ensure_partition
SELECT sb_audit_ensure_partition($1::date);

-- name: audit_key_register
INSERT INTO sb_audit_keys (key_id, public_key) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING;

-- name: audit_keys
SELECT key_id, public_key FROM sb_audit_keys ORDER BY created_at, key_id;

-- name: audit_checkpoint_insert
INSERT INTO sb_audit_checkpoints (instance, n, at, body, signature, key_id)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: audit_checkpoint_last
SELECT n, body FROM sb_audit_checkpoints WHERE instance = $1 ORDER BY n DESC LIMIT 1;

-- name: audit_checkpoints
-- Checkpoints signed in [since, until), in signing order.
SELECT instance, n, body, signature, key_id FROM sb_audit_checkpoints
WHERE at >= $1 AND at < $2
ORDER BY instance, n;

-- name: audit_trail
SELECT chain, seq, at, event, outcome, actor_cert, actor_sub, origin_addr, origin_proto, topic,
       subscription, message_id, key_id, trace_id, detail, prev_hash, hash, message_ids,
       trace_ids
FROM sb_audit
-- a record of this message alone, or a batch record that lists it (ADR 0013); each condition
-- has its own index (sb_audit_message, sb_audit_messages)
WHERE message_id = $1 OR (message_ids IS NOT NULL AND message_ids @> ARRAY[$1::uuid])
ORDER BY at, chain, seq
LIMIT $2;

-- name: audit_search
-- Filters are optional (NULL matches all); pages continue after the (at, chain, seq) cursor.
SELECT chain, seq, at, event, outcome, actor_cert, actor_sub, origin_addr, origin_proto, topic,
       subscription, message_id, key_id, trace_id, detail, prev_hash, hash, message_ids,
       trace_ids
FROM sb_audit
WHERE at >= $1 AND at < $2
  AND ($3::text IS NULL OR actor_cert = $3 OR actor_sub = $3)
  AND ($4::text IS NULL OR topic = $4)
  AND ($5::text IS NULL OR event = $5)
  AND (at, chain, seq) > ($6::timestamptz, $7::bigint, $8::bigint)
ORDER BY at, chain, seq
LIMIT $9;

-- name: audit_export
-- One page of an export: records of [since, until) in chain order after the (chain, seq) cursor.
SELECT chain, seq, at, event, outcome, actor_cert, actor_sub, origin_addr, origin_proto, topic,
       subscription, message_id, key_id, trace_id, detail, prev_hash, hash, message_ids,
       trace_ids
FROM sb_audit
WHERE at >= $1 AND at < $2 AND (chain, seq) > ($3::bigint, $4::bigint)
ORDER BY chain, seq
LIMIT $5;

-- name: audit_partitions
SELECT to_date(substr(c.relname, 11), 'YYYYMM') AS month
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'sb_audit'::regclass AND c.relname ~ '^sb_audit_p[0-9]{6}$'
ORDER BY 1;

-- name: audit_digest_between
-- How many records [since, until) holds, and a digest of their hashes in chain order: prune
-- compares it with the export's records of the same range.
SELECT count(*) AS n,
       sha256(coalesce(string_agg(hash, ''::bytea ORDER BY chain, seq), ''::bytea)) AS digest
FROM sb_audit WHERE at >= $1 AND at < $2;

-- name: audit_lock_partition
SELECT sb_audit_prune_partition($1::date, 'lock');

-- name: audit_drop_partition
SELECT sb_audit_prune_partition($1::date, 'drop');

-- name: audit_pruned_insert
INSERT INTO sb_audit_pruned (month, records, bundle_sha256) VALUES ($1, $2, $3);

-- name: audit_horizon
-- The start of what is still kept: the month after the newest pruned one (NULL: all of it).
SELECT (max(month) + interval '1 month')::date FROM sb_audit_pruned;

-- name: audit_anchors
-- For each chain, its last record before $1 (chains are ordered by time: Lane.stage), where an
-- export starting at $1 must continue from. Only chains with records in [$1, $2).
SELECT c.id AS chain, h.seq, h.hash
FROM sb_audit_chains c
CROSS JOIN LATERAL (
    SELECT a.seq, a.hash FROM sb_audit a
    WHERE a.chain = c.id AND a.at < $1
    ORDER BY a.seq DESC LIMIT 1
) h
WHERE EXISTS (SELECT 1 FROM sb_audit w WHERE w.chain = c.id AND w.at >= $1 AND w.at < $2);
