-- Acks plan by index lookups whatever the statistics say (docs/adr/0014-queue-plans.md).
--
-- A queue table's statistics are always stale: between two ANALYZEs it swings from a few
-- hundred live rows to a backlog of a million, and after a burst of acks its pages hold mostly
-- dead tuples, so the row count the planner derives from the page count stays small while the
-- pages to read grow. Planned from such statistics, the ack (sb_ack_rows, which both ack paths
-- call) joined its request to sb_deliveries and to sb_messages by hash joins over sequential
-- scans of both tables: one group of acks took up to 290 ms under W3 at 5,000 msg/s, the
-- consumers' credit stayed taken meanwhile, and deliveries stalled (end-to-end p99 of 0.4-1.7 s
-- while publish confirms stayed under 130 ms). Every row an ack touches is found through a
-- primary key, so the function never needs anything else: these settings apply while it runs,
-- and only then.
ALTER FUNCTION sb_ack_rows(uuid[], bigint[], uuid[])
    SET enable_seqscan = off
    SET enable_bitmapscan = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off;
