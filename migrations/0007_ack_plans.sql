-- Acks plan by index lookups whatever the statistics say (docs/adr/0014-queue-plans.md).
--
-- A queue table's statistics are always stale: between two ANALYZEs it swings from a few
-- hundred live rows to a backlog of a million, and after a burst of acks its pages hold mostly
-- dead tuples, so the row count the planner derives from the page count stays small while the
-- pages to read grow. Planned from such statistics, the ack (sb_ack_rows, which both ack paths
-- call) joined its request to sb_deliveries and to sb_messages by hash joins over sequential
-- scans of both tables: one group of acks took up to 290 ms under W3 at 5,000 msg/s, the
-- consumers' credit stayed taken meanwhile, and deliveries stalled (end-to-end p99 of 0.4-1.7 s
-- while publish confirms stayed under 130 ms). It also walked the whole partial index of leased
-- rows, which an ANALYZE taken while nothing was leased says is empty, once per group (hashing
-- it: 2.7 ms for 50 acks with 10,000 messages leased) or, with hash joins off, once per ack
-- (52 ms).
--
-- Every row an ack touches is found by its primary key, and the function now says so. The
-- settings below forbid the plans that read whole tables; they apply while the function runs,
-- and only then. The leased-state test is written "state + 0 = 1", which no partial index's
-- predicate matches, so the delete cannot walk sb_deliveries_leased (WHERE state = 1) either:
-- the only way left to a delivery is its primary key, one lookup per ack. The body is
-- otherwise 0005's.
CREATE OR REPLACE FUNCTION sb_ack_rows(p_id uuid[], p_sub bigint[], p_token uuid[])
RETURNS TABLE (message_id uuid, subscription_id bigint) LANGUAGE sql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
    WITH req AS (
        SELECT * FROM unnest(p_id, p_sub, p_token) AS r (message_id, subscription_id, lease_token)
    ), done AS (
        DELETE FROM sb_deliveries d USING req
        WHERE d.message_id = req.message_id AND d.subscription_id = req.subscription_id
          -- "+ 0": not the partial index of leased rows (above)
          AND d.state + 0 = 1 AND d.lease_token = req.lease_token
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
-- A marker that only a crash of the server erases (docs/adr/0008-audit-trail.md, "Server
-- crashes"). Crash recovery empties unlogged tables; a clean shutdown keeps them. Leases commit
-- asynchronously (synchronous_commit = off), so a crash can lose a lease's last audit records
-- after the broker's lane has moved past them. A broker that was between transactions when the
-- server crashed saw no connection error: its pool reconnected silently, and its next record
-- would have linked to a lost one. It reads this token on every new connection and retires its
-- lanes when the token changed.
CREATE UNLOGGED TABLE sb_server_epoch (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    token  uuid NOT NULL
);
