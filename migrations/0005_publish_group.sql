-- One round trip per group commit (docs/adr/0012-one-statement-group-publish.md).
--
-- A group of publishes used to take five round trips (BEGIN, idempotency claims, the insert,
-- the audit COPY, COMMIT); on a busy broker each round trip waits a whole event-loop cycle, so
-- confirm latency, and with a fixed number of publishes in flight, throughput, were set by the
-- round trips. This function does the whole group as one statement, which PostgreSQL runs as
-- its own transaction (autocommit; the pool's synchronous_commit = on, so the reply comes
-- after the WAL flush, as a COMMIT's would).
--
-- It is the fast path for groups of fresh messages only. When any idempotency key is already
-- claimed (a retry, a duplicate, an expired claim to renew) it raises SQLSTATE SB001 and the
-- whole statement rolls back, claims included; the broker then runs the group on the general
-- path, which sorts out duplicates, conflicts and renewals.
--
-- Audit records (one "published" record per message) arrive already hashed by the broker's
-- lane (securebroker/audit/log.py): the lane's chain, first sequence number and head; per
-- record its time, context, trace id and hash; and the group's distinct contexts (actor, topic,
-- subscription: exactly the values hashed, never looked up here, so a topic deleted meanwhile
-- cannot drop a record). Each record's prev_hash is the hash of the one before it. Every
-- record must be inserted, or the statement fails and nothing is kept. p_chain NULL means
-- auditing is off.
-- The insert of fresh messages and their deliveries, shared by both paths: the general path's
-- named query "publish" (securebroker/store/sql/queries.sql) and sb_publish_group below.
-- One message row, fanned out (by reference) into one delivery row per subscription. Empty
-- attribute maps arrive as NULL (cheaper to encode than '{}' per message).
CREATE FUNCTION sb_insert_messages(
    p_id uuid[], p_topic bigint[], p_payload bytea[], p_attributes jsonb[],
    p_content_type text[], p_idem_key text[], p_ordering_key text[], p_producer text[],
    p_not_before timestamptz[], p_expires_at timestamptz[], p_trace_context jsonb[],
    p_published_at timestamptz[]
) RETURNS void LANGUAGE sql AS $$
    WITH m AS (
        INSERT INTO sb_messages (id, topic_id, payload, attributes, content_type,
                                 idempotency_key, ordering_key, producer, not_before,
                                 expires_at, trace_context, published_at)
        SELECT r.id, r.topic_id, r.payload, coalesce(r.attributes, '{}'), r.content_type,
               r.idempotency_key, r.ordering_key, r.producer, r.not_before, r.expires_at,
               coalesce(r.trace_context, '{}'), r.published_at
        FROM unnest(p_id, p_topic, p_payload, p_attributes, p_content_type, p_idem_key,
                    p_ordering_key, p_producer, p_not_before, p_expires_at, p_trace_context,
                    p_published_at)
            AS r (id, topic_id, payload, attributes, content_type, idempotency_key,
                  ordering_key, producer, not_before, expires_at, trace_context, published_at)
        RETURNING id, seq, topic_id, ordering_key, not_before, expires_at, published_at
    )
    INSERT INTO sb_deliveries (message_id, subscription_id, seq, available_at, ordering_key,
                               expires_at)
    SELECT m.id, s.id, m.seq, coalesce(m.not_before, m.published_at), m.ordering_key,
           m.expires_at
    FROM m JOIN sb_subscriptions s ON s.topic_id = m.topic_id;
$$;

-- Acks, shared by both paths (the named query "ack" and sb_ack_group): delete the deliveries
-- the tokens still own, and a message with its last delivery; returns the deliveries acked.
CREATE FUNCTION sb_ack_rows(p_id uuid[], p_sub bigint[], p_token uuid[])
RETURNS TABLE (message_id uuid, subscription_id bigint) LANGUAGE sql AS $$
    WITH req AS (
        SELECT * FROM unnest(p_id, p_sub, p_token) AS r (message_id, subscription_id, lease_token)
    ), done AS (
        DELETE FROM sb_deliveries d USING req
        WHERE d.message_id = req.message_id AND d.subscription_id = req.subscription_id
          AND d.state = 1 AND d.lease_token = req.lease_token
        RETURNING d.message_id, d.subscription_id
    ), gone AS (
        -- Every data-modifying CTE sees the snapshot from before the statement, so the rows
        -- just deleted are still counted: the message goes when all its live rows are in done.
        DELETE FROM sb_messages m
        USING (SELECT done.message_id, count(*) AS n FROM done GROUP BY done.message_id) AS g
        WHERE m.id = g.message_id
          AND (SELECT count(*) FROM sb_deliveries o WHERE o.message_id = g.message_id) = g.n
    )
    SELECT done.message_id, done.subscription_id FROM done;
$$;

-- The audit records of a one-statement group, hashed by the broker: one record per message
-- id, with the given event; all of them or an error (a lost record would break the chain).
CREATE FUNCTION sb_audit_append(
    p_chain bigint, p_seq0 bigint, p_prev bytea, p_event text, p_id uuid[],
    a_at timestamptz[], a_ctx integer[], a_trace text[], a_hash bytea[], c_cert text[],
    c_sub text[], c_addr text[], c_proto text[], c_topic text[], c_subscription text[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    recorded integer;
BEGIN
    INSERT INTO sb_audit (chain, seq, at, event, outcome, actor_cert, actor_sub, origin_addr,
                          origin_proto, topic, subscription, message_id, trace_id, prev_hash,
                          hash)
    SELECT p_chain, p_seq0 + r.n, r.at, p_event, 'success', c.cert, c.sub, c.addr, c.proto,
           c.topic, c.subscription, r.id, r.trace,
           coalesce(lag(r.hash) OVER (ORDER BY r.n), p_prev), r.hash
    FROM unnest(p_id, a_at, a_ctx, a_trace, a_hash)
            WITH ORDINALITY AS r (id, at, ctx, trace, hash, n)
        JOIN unnest(c_cert, c_sub, c_addr, c_proto, c_topic, c_subscription)
            WITH ORDINALITY AS c (cert, sub, addr, proto, topic, subscription, i)
            ON c.i = r.ctx;
    GET DIAGNOSTICS recorded = ROW_COUNT;
    IF recorded <> cardinality(p_id) OR recorded <> cardinality(a_hash) THEN
        RAISE EXCEPTION 'audit records of this group do not match its messages';
    END IF;
END
$$;

CREATE FUNCTION sb_publish_group(
    p_id uuid[], p_topic bigint[], p_payload bytea[], p_attributes jsonb[],
    p_content_type text[], p_idem_key text[], p_ordering_key text[], p_producer text[],
    p_not_before timestamptz[], p_expires_at timestamptz[], p_trace_context jsonb[],
    p_published_at timestamptz[], p_scope text[], p_fingerprint bytea[], p_locks bigint[],
    p_chain bigint, p_seq0 bigint, p_prev bytea, a_at timestamptz[], a_ctx integer[],
    a_trace text[], a_hash bytea[], c_cert text[], c_sub text[], c_addr text[], c_proto text[],
    c_topic text[], c_subscription text[]
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
        PERFORM sb_audit_append(p_chain, p_seq0, p_prev, 'published', p_id, a_at, a_ctx,
                                a_trace, a_hash, c_cert, c_sub, c_addr, c_proto, c_topic,
                                c_subscription);
    END IF;
    RETURN cardinality(p_id);
END
$$;

-- Acks of a group in one statement, likewise: sb_ack_rows plus one "acked" audit record per
-- ack. Every ack must
-- still hold its lease; when one does not (a stale or repeated ack) it raises SQLSTATE SB002,
-- nothing is kept, and the broker runs the group on the general path, which reports each
-- stale ack on its own.
CREATE FUNCTION sb_ack_group(
    p_id uuid[], p_sub bigint[], p_token uuid[],
    p_chain bigint, p_seq0 bigint, p_prev bytea, a_at timestamptz[], a_ctx integer[],
    a_trace text[], a_hash bytea[], c_cert text[], c_sub text[], c_addr text[], c_proto text[],
    c_topic text[], c_subscription text[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    acked integer;
BEGIN
    SELECT count(*) INTO acked FROM sb_ack_rows(p_id, p_sub, p_token);
    IF acked <> cardinality(p_id) THEN
        RAISE EXCEPTION 'an ack of this group no longer holds its lease' USING ERRCODE = 'SB002';
    END IF;
    IF p_chain IS NOT NULL THEN
        PERFORM sb_audit_append(p_chain, p_seq0, p_prev, 'acked', p_id, a_at, a_ctx, a_trace,
                                a_hash, c_cert, c_sub, c_addr, c_proto, c_topic,
                                c_subscription);
    END IF;
    RETURN acked;
END
$$;
