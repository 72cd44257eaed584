-- Acks touch the queue tables only through key lookups, never through a join the planner could
-- turn around (docs/adr/0014-queue-plans.md, "Drained statistics").
--
-- After a queue drains, an ANALYZE (autovacuum's, after the burst of deletes) finds pages and
-- no live rows: it records reltuples = 0 over relpages > 0. The planner scales that density,
-- zero, by the current page count, so however large the table grows again it is estimated at
-- one row until the next ANALYZE. 0007's sb_ack_rows joined its request to sb_deliveries and
-- to sb_messages; against a one-row estimate, a full walk of either primary key with the
-- request as the inner side of a nested loop looks cheapest, and the settings of 0007 forbid
-- only sequential scans, bitmaps, hash and merge joins, not that. It ran 8 s for 50 acks with
-- 100,000 messages queued (and 10.7 s once under W3r): one ack group that slow takes every
-- consumer's credit and stops all deliveries.
--
-- Here no statement joins a queue table to anything. Each request row finds its delivery in a
-- LATERAL subquery over sb_deliveries alone, with the request's key as parameters: the only
-- paths the planner has for it are the primary key with that key as its condition, or the
-- sequential scan that is turned off. It locks the row (FOR UPDATE): a concurrent extend, nack
-- or new lease is waited for, and its result re-checked, as the join's delete did. Requests
-- are taken in key order, the order nack_lock locks in. The delete that follows goes by row id
-- in a second statement, so under its newer snapshot it sees the version the first locked (an
-- extend committed meanwhile, say); the same statement's snapshot would not. The messages go
-- by primary key, through an array. Hash joins are allowed again: the only joins left are of
-- rows in memory.
CREATE OR REPLACE FUNCTION sb_ack_rows(p_id uuid[], p_sub bigint[], p_token uuid[])
RETURNS TABLE (message_id uuid, subscription_id bigint) LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_mergejoin = off
AS $$
DECLARE
    held tid[];
BEGIN
    SELECT array_agg(x.row_id) INTO held
    FROM (SELECT * FROM unnest(p_id, p_sub, p_token) AS r (message_id, subscription_id, lease_token)
          ORDER BY 1, 2) AS r
    CROSS JOIN LATERAL (
        -- "+ 0": not the partial index of leased rows, which stale statistics call empty
        SELECT d.ctid AS row_id FROM sb_deliveries d
        WHERE d.message_id = r.message_id AND d.subscription_id = r.subscription_id
          AND d.state + 0 = 1 AND d.lease_token = r.lease_token
        LIMIT 1
        FOR UPDATE
    ) AS x;
    IF held IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH done AS (
        DELETE FROM sb_deliveries d WHERE d.ctid = ANY (held)
        RETURNING d.message_id, d.subscription_id
    ), gone AS (
        -- Every data-modifying CTE sees the snapshot from before the statement, so the rows
        -- just deleted are still counted: the message goes when all its live rows are in done.
        DELETE FROM sb_messages m
        WHERE m.id = ANY (ARRAY(
            SELECT g.message_id
            FROM (SELECT done.message_id, count(*) AS n FROM done GROUP BY done.message_id) AS g
            WHERE (SELECT count(*) FROM sb_deliveries o WHERE o.message_id = g.message_id) = g.n))
    )
    SELECT done.message_id, done.subscription_id FROM done;
END
$$;
