-- Batch audit records (docs/adr/0013-batch-audit-records.md).
--
-- A grouped publish, a lease and a group of acks used to write one audit record per message:
-- three rows (with two index entries each) for every message that goes through the broker,
-- about a fifth of PostgreSQL's time per message. They now write one record per actor, topic
-- and subscription in the transaction, listing its messages (and their trace ids, aligned) in
-- two array columns; the hash covers both lists (record format 2). Records of one message keep
-- ``message_id``, and records written before this migration are untouched.

ALTER TABLE sb_audit ADD COLUMN message_ids uuid[], ADD COLUMN trace_ids text[];
-- ``audit trail <message id>`` finds a batch that lists the message through this index (and a
-- record of that message alone through sb_audit_message). A small pending list (256 kB, not
-- the default 4 MB): the insert that finds the list over its limit merges it inline, and every
-- message id is a key of its own, so merging 4 MB stalled an insert for up to 410 ms; with no
-- pending list (fastupdate off) every insert costs more (docs/adr/0013-batch-audit-records.md).
CREATE INDEX sb_audit_messages ON sb_audit USING gin (message_ids)
    WITH (gin_pending_list_limit = 256)
    WHERE message_ids IS NOT NULL;

-- The one-statement group functions of migration 0005, with batch records: same work, same
-- checks, new audit arguments.
DROP FUNCTION sb_publish_group(
    uuid[], bigint[], bytea[], jsonb[], text[], text[], text[], text[], timestamptz[],
    timestamptz[], jsonb[], timestamptz[], text[], bytea[], bigint[], bigint, bigint, bytea,
    timestamptz[], integer[], text[], bytea[], text[], text[], text[], text[], text[], text[]);
DROP FUNCTION sb_ack_group(
    uuid[], bigint[], uuid[], bigint, bigint, bytea, timestamptz[], integer[], text[], bytea[],
    text[], text[], text[], text[], text[], text[]);
DROP FUNCTION sb_audit_append(
    bigint, bigint, bytea, text, uuid[], timestamptz[], integer[], text[], bytea[], text[],
    text[], text[], text[], text[], text[]);

-- The batch records of a one-statement group, hashed by the broker's lane: record i covers the
-- next r_count[i] messages of p_id (the broker orders the group's messages by record), with
-- their trace ids from a_trace (aligned with p_id; NULL when no message has one); its context
-- (actor, topic, subscription: exactly the values hashed) is c_*[r_ctx[i]]. Every message must
-- be covered exactly once and every record inserted, or the statement fails and nothing is
-- kept.
CREATE FUNCTION sb_audit_append(
    p_chain bigint, p_seq0 bigint, p_prev bytea, p_event text, p_id uuid[], a_trace text[],
    r_at timestamptz[], r_ctx integer[], r_count integer[], r_hash bytea[], c_cert text[],
    c_sub text[], c_addr text[], c_proto text[], c_topic text[], c_subscription text[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    recorded integer;
BEGIN
    IF (a_trace IS NOT NULL AND cardinality(a_trace) <> cardinality(p_id))
       -- one count, time, context and hash per record (unnest pads shorter arrays with NULLs)
       OR cardinality(r_hash) IS DISTINCT FROM cardinality(r_count)
       OR cardinality(r_at) IS DISTINCT FROM cardinality(r_count)
       OR cardinality(r_ctx) IS DISTINCT FROM cardinality(r_count)
       OR (SELECT coalesce(sum(x), 0) FROM unnest(r_count) AS x) <> cardinality(p_id)
       OR EXISTS (SELECT 1 FROM unnest(r_count) AS x WHERE x IS NULL OR x < 1) THEN
        RAISE EXCEPTION 'audit records of this group do not cover its messages';
    END IF;
    INSERT INTO sb_audit (chain, seq, at, event, outcome, actor_cert, actor_sub, origin_addr,
                          origin_proto, topic, subscription, message_ids, trace_ids, prev_hash,
                          hash)
    SELECT p_chain, p_seq0 + r.n, r.at, p_event, 'success', c.cert, c.sub, c.addr, c.proto,
           c.topic, c.subscription, p_id[r.upto - r.cnt + 1 : r.upto],
           coalesce(a_trace[r.upto - r.cnt + 1 : r.upto], array_fill(NULL::text, ARRAY[r.cnt])),
           coalesce(lag(r.hash) OVER (ORDER BY r.n), p_prev), r.hash
    FROM (SELECT x.*, sum(x.cnt) OVER (ORDER BY x.n) AS upto
          FROM unnest(r_at, r_ctx, r_count, r_hash) WITH ORDINALITY AS x (at, ctx, cnt, hash, n)
         ) AS r
        JOIN unnest(c_cert, c_sub, c_addr, c_proto, c_topic, c_subscription)
            WITH ORDINALITY AS c (cert, sub, addr, proto, topic, subscription, i)
            ON c.i = r.ctx;
    GET DIAGNOSTICS recorded = ROW_COUNT;
    IF recorded <> cardinality(r_hash) OR recorded <> cardinality(r_at) THEN
        RAISE EXCEPTION 'audit records of this group do not match its messages';
    END IF;
END
$$;

CREATE FUNCTION sb_publish_group(
    p_id uuid[], p_topic bigint[], p_payload bytea[], p_attributes jsonb[],
    p_content_type text[], p_idem_key text[], p_ordering_key text[], p_producer text[],
    p_not_before timestamptz[], p_expires_at timestamptz[], p_trace_context jsonb[],
    p_published_at timestamptz[], p_scope text[], p_fingerprint bytea[], p_locks bigint[],
    p_chain bigint, p_seq0 bigint, p_prev bytea, a_trace text[], r_at timestamptz[],
    r_ctx integer[], r_count integer[], r_hash bytea[], c_cert text[], c_sub text[],
    c_addr text[], c_proto text[], c_topic text[], c_subscription text[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    expected integer;
    claimed integer;
BEGIN
    -- Locks in the general path's order (publish_in: claims, then ordering keys), so a retry
    -- on one path and its original on the other cannot deadlock.
    SELECT count(*) INTO expected FROM unnest(p_idem_key) AS k WHERE k IS NOT NULL;
    IF expected > 0 THEN
        -- in key order (byte order: the broker sorts by code point), so concurrent groups
        -- lock claims in one order
        INSERT INTO sb_idempotency (topic_id, producer_scope, key, message_id, fingerprint,
                                    created_at)
        SELECT r.topic_id, r.scope, r.key, r.id, r.fp, r.at
        FROM unnest(p_topic, p_scope, p_idem_key, p_id, p_fingerprint, p_published_at)
            AS r (topic_id, scope, key, id, fp, at)
        WHERE r.key IS NOT NULL
        ORDER BY r.topic_id, r.scope COLLATE "C", r.key COLLATE "C"
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS claimed = ROW_COUNT;
        IF claimed <> expected THEN
            RAISE EXCEPTION 'an idempotency key of this group is already claimed'
                USING ERRCODE = 'SB001';
        END IF;
    END IF;
    -- publishers of one ordering key in key order, as the general path does
    IF p_locks IS NOT NULL THEN
        PERFORM count(pg_advisory_xact_lock(k))
        FROM (SELECT k FROM unnest(p_locks) AS k ORDER BY k) AS keys;
    END IF;
    PERFORM sb_insert_messages(p_id, p_topic, p_payload, p_attributes, p_content_type,
                               p_idem_key, p_ordering_key, p_producer, p_not_before,
                               p_expires_at, p_trace_context, p_published_at);
    IF p_chain IS NOT NULL THEN
        PERFORM sb_audit_append(p_chain, p_seq0, p_prev, 'published', p_id, a_trace, r_at,
                                r_ctx, r_count, r_hash, c_cert, c_sub, c_addr, c_proto,
                                c_topic, c_subscription);
    END IF;
    RETURN cardinality(p_id);
END
$$;

CREATE FUNCTION sb_ack_group(
    p_id uuid[], p_sub bigint[], p_token uuid[],
    p_chain bigint, p_seq0 bigint, p_prev bytea, a_trace text[], r_at timestamptz[],
    r_ctx integer[], r_count integer[], r_hash bytea[], c_cert text[], c_sub text[],
    c_addr text[], c_proto text[], c_topic text[], c_subscription text[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    acked integer;
BEGIN
    SELECT count(*) INTO acked FROM sb_ack_rows(p_id, p_sub, p_token);
    IF acked <> cardinality(p_id) THEN
        RAISE EXCEPTION 'an ack of this group no longer holds its lease' USING ERRCODE = 'SB002';
    END IF;
    IF p_chain IS NOT NULL THEN
        PERFORM sb_audit_append(p_chain, p_seq0, p_prev, 'acked', p_id, a_trace, r_at, r_ctx,
                                r_count, r_hash, c_cert, c_sub, c_addr, c_proto, c_topic,
                                c_subscription);
    END IF;
    RETURN acked;
END
$$;
