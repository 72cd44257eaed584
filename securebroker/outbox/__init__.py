"""The producer outbox: send messages in the same transaction as your business rows.

A service writes its rows and the messages it wants to send in ONE transaction of ITS OWN
PostgreSQL database (``enqueue``); a relay (``OutboxRelay``, or ``securebroker outbox relay``)
publishes pending rows to the broker with each row's key as the idempotency key. A rolled-back
transaction sends nothing; a committed one is sent, and a relay crash or retry never makes a
second message (DESIGN §3.7; see ``docs/outbox.md``)::

    await install(conn)  # once: CREATE TABLE IF NOT EXISTS sb_outbox ...

    async with conn.transaction():
        await conn.execute("INSERT INTO orders ...")
        await enqueue(conn, "orders.created", payload, key=f"order-{order_id}",
                      ordering_key=f"customer-{customer_id}")

    relay = OutboxRelay(pool, client)
    task = asyncio.create_task(relay.run(stop))
"""

from securebroker.outbox.relay import OutboxRelay, RelayStats, backoff_delay
from securebroker.outbox.table import (
    DEFAULT_CONTENT_TYPE,
    TABLE,
    check_message,
    enqueue,
    install,
    installed,
    purge_sent,
)

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "TABLE",
    "OutboxRelay",
    "RelayStats",
    "backoff_delay",
    "check_message",
    "enqueue",
    "install",
    "installed",
    "purge_sent",
]
