-- The payment flow's own tables and queries (securebroker/faults/flow.py): the order service's,
-- the payment service's and the ledger consumer's databases, and what the checker reads.

-- name: orders_schema
CREATE TABLE IF NOT EXISTS fault_orders (
    order_id      text PRIMARY KEY,
    amount_cents  bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- name: payments_schema
CREATE TABLE IF NOT EXISTS fault_ledger_debits (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      text NOT NULL,     -- deliberately not unique: a double debit must show
    amount_cents  bigint NOT NULL,
    message_id    uuid NOT NULL,
    debited_at    timestamptz NOT NULL DEFAULT now()
);

-- name: ledger_schema
CREATE TABLE IF NOT EXISTS fault_completions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      text NOT NULL,     -- deliberately not unique: a double completion must show
    message_id    uuid NOT NULL,
    completed_at  timestamptz NOT NULL DEFAULT now()
);

-- name: order_insert
INSERT INTO fault_orders (order_id, amount_cents) VALUES ($1, $2);

-- name: debit_insert
INSERT INTO fault_ledger_debits (order_id, amount_cents, message_id) VALUES ($1, $2, $3);

-- name: completion_insert
INSERT INTO fault_completions (order_id, message_id) VALUES ($1, $2);

-- name: held_by_broker
-- Order ids of the deliveries a subscription still holds, with their state (2: dead).
SELECT m.attributes ->> 'order_id' AS order_id, d.state
FROM sb_deliveries d
JOIN sb_subscriptions s ON s.id = d.subscription_id
JOIN sb_messages m ON m.id = d.message_id
WHERE s.name = $1;

-- name: redeliveries_debits
-- One row per inbox row with redeliveries, with its order id (via the effect row).
SELECT coalesce(
           (SELECT e.order_id FROM fault_ledger_debits e
            WHERE e.message_id = i.message_id LIMIT 1),
           i.message_id::text) AS order_id,
       i.redeliveries
FROM sb_inbox i WHERE i.consumer = $1 AND i.redeliveries > 0;

-- name: redeliveries_completions
SELECT coalesce(
           (SELECT e.order_id FROM fault_completions e
            WHERE e.message_id = i.message_id LIMIT 1),
           i.message_id::text) AS order_id,
       i.redeliveries
FROM sb_inbox i WHERE i.consumer = $1 AND i.redeliveries > 0;

-- name: unsent_outbox
SELECT key FROM sb_outbox WHERE sent_at IS NULL;

-- name: confirmed_orders
SELECT order_id FROM fault_orders;

-- name: debit_orders
SELECT order_id FROM fault_ledger_debits;

-- name: completion_orders
SELECT order_id FROM fault_completions;

-- name: count_orders
SELECT count(*) FROM fault_orders;

-- name: count_completed
SELECT count(DISTINCT order_id) FROM fault_completions;

-- name: deliveries_by_state
SELECT s.name, d.state, count(*) AS n FROM sb_deliveries d
JOIN sb_subscriptions s ON s.id = d.subscription_id
GROUP BY s.name, d.state ORDER BY 1, 2;
