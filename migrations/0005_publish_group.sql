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
-- lane (securebroker/audit/log.py): their per-record columns as arrays, the lane's chain, first
-- sequence number and head; each record's prev_hash is the hash of the one before it.
-- p_chain NULL means auditing is off.
CREATE FUNCTION sb_publish_group(
    p_id uuid[], p_topic bigint[], p_payload bytea[], p_attributes jsonb[],
    p_content_type text[], p_idem_key text[], p_ordering_key text[], p_producer text[],
    p_not_before timestamptz[], p_expires_at timestamptz[], p_trace_context jsonb[],
    p_published_at timestamptz[], p_scope text[], p_fingerprint bytea[], p_locks bigint[],
    p_chain bigint, p_seq0 bigint, p_prev bytea, a_at timestamptz[], a_actor integer[],
    a_cert text[], a_sub text[], a_addr text[], a_proto text[], a_trace text[], a_hash bytea[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    expected integer;
    claimed integer;
BEGIN
    -- publishers of one ordering key in key order (no deadlocks), as the general path does
    IF p_locks IS NOT NULL THEN
        PERFORM count(pg_advisory_xact_lock(k))
        FROM (SELECT k FROM unnest(p_locks) AS k ORDER BY k) AS keys;
    END IF;
    SELECT count(*) INTO expected FROM unnest(p_idem_key) AS k WHERE k IS NOT NULL;
    IF expected > 0 THEN
        -- in key order, so concurrent groups lock claims in one order
        INSERT INTO sb_idempotency (topic_id, producer_scope, key, message_id, fingerprint,
                                    created_at)
        SELECT r.topic_id, r.scope, r.key, r.id, r.fp, r.at
        FROM unnest(p_topic, p_scope, p_idem_key, p_id, p_fingerprint, p_published_at)
            AS r (topic_id, scope, key, id, fp, at)
        WHERE r.key IS NOT NULL
        ORDER BY r.topic_id, r.scope, r.key
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS claimed = ROW_COUNT;
        IF claimed <> expected THEN
            RAISE EXCEPTION 'an idempotency key of this group is already claimed'
                USING ERRCODE = 'SB001';
        END IF;
    END IF;
    -- the same insert as the named query "publish" (securebroker/store/sql/queries.sql)
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
    IF p_chain IS NOT NULL THEN
        INSERT INTO sb_audit (chain, seq, at, event, outcome, actor_cert, actor_sub,
                              origin_addr, origin_proto, topic, message_id, trace_id,
                              prev_hash, hash)
        SELECT p_chain, p_seq0 + r.n, r.at, 'published', 'success', a.cert, a.sub, a.addr,
               a.proto, t.name, r.id, r.trace,
               coalesce(lag(r.hash) OVER (ORDER BY r.n), p_prev), r.hash
        FROM unnest(p_id, p_topic, a_at, a_actor, a_trace, a_hash)
                WITH ORDINALITY AS r (id, topic_id, at, actor, trace, hash, n)
            JOIN unnest(a_cert, a_sub, a_addr, a_proto)
                WITH ORDINALITY AS a (cert, sub, addr, proto, i) ON a.i = r.actor
            JOIN sb_topics t ON t.id = r.topic_id;
    END IF;
    RETURN cardinality(p_id);
END
$$;

-- Acks of a group in one statement, likewise: the named query "ack" plus one "acked" audit
-- record per ack (topic and subscription names from the subscription ids). Every ack must
-- still hold its lease; when one does not (a stale or repeated ack) it raises SQLSTATE SB002,
-- nothing is kept, and the broker runs the group on the general path, which reports each
-- stale ack on its own.
CREATE FUNCTION sb_ack_group(
    p_id uuid[], p_sub bigint[], p_token uuid[],
    p_chain bigint, p_seq0 bigint, p_prev bytea, a_at timestamptz[], a_actor integer[],
    a_cert text[], a_sub text[], a_addr text[], a_proto text[], a_trace text[], a_hash bytea[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    acked integer;
BEGIN
    WITH req AS (
        SELECT * FROM unnest(p_id, p_sub, p_token) AS r (message_id, subscription_id, lease_token)
    ), done AS (
        DELETE FROM sb_deliveries d USING req
        WHERE d.message_id = req.message_id AND d.subscription_id = req.subscription_id
          AND d.state = 1 AND d.lease_token = req.lease_token
        RETURNING d.message_id, d.subscription_id
    ), gone AS (
        DELETE FROM sb_messages m
        USING (SELECT message_id, count(*) AS n FROM done GROUP BY message_id) AS g
        WHERE m.id = g.message_id
          AND (SELECT count(*) FROM sb_deliveries o WHERE o.message_id = g.message_id) = g.n
    )
    SELECT count(*) INTO acked FROM done;
    IF acked <> cardinality(p_id) THEN
        RAISE EXCEPTION 'an ack of this group no longer holds its lease' USING ERRCODE = 'SB002';
    END IF;
    IF p_chain IS NOT NULL THEN
        INSERT INTO sb_audit (chain, seq, at, event, outcome, actor_cert, actor_sub,
                              origin_addr, origin_proto, topic, subscription, message_id,
                              trace_id, prev_hash, hash)
        SELECT p_chain, p_seq0 + r.n, r.at, 'acked', 'success', a.cert, a.sub, a.addr,
               a.proto, t.name, s.name, r.id, r.trace,
               coalesce(lag(r.hash) OVER (ORDER BY r.n), p_prev), r.hash
        FROM unnest(p_id, p_sub, a_at, a_actor, a_trace, a_hash)
                WITH ORDINALITY AS r (id, sub_id, at, actor, trace, hash, n)
            JOIN unnest(a_cert, a_sub, a_addr, a_proto)
                WITH ORDINALITY AS a (cert, sub, addr, proto, i) ON a.i = r.actor
            JOIN sb_subscriptions s ON s.id = r.sub_id
            JOIN sb_topics t ON t.id = s.topic_id;
    END IF;
    RETURN acked;
END
$$;
