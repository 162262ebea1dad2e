"""A small shop on pgshard with psycopg 3: creates a sharded schema (customers by id,
their orders co-located by customer id), writes and reads customers with their orders,
runs a cross-shard report and a transaction over two shards, and hears about it with
LISTEN/NOTIFY (in transaction pooling mode, pgshard listens for its clients).

    cargo run -- demo                  # in another terminal
    pip install 'psycopg[binary]'
    python3 examples/shop.py           # PGSHARD_URL overrides the connection string
"""

import os
import time

import psycopg

URL = os.environ.get("PGSHARD_URL", "host=127.0.0.1 port=6432 user=app password=app dbname=app")


def main() -> None:
    with psycopg.connect(URL, autocommit=True) as db:
        # DDL goes to every shard.
        db.execute(
            "CREATE TABLE IF NOT EXISTS shop_customers (id bigint PRIMARY KEY, name text NOT NULL, credit numeric(10,2) NOT NULL DEFAULT 100)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS shop_orders (id bigint NOT NULL, customer_id bigint NOT NULL, amount numeric(10,2) NOT NULL)"
        )
        # Ids of this run (so that runs do not collide with each other or with shop.rs).
        base = (int(time.time() * 1000) % 1_000_000_000) * 100 + 50
        for i in range(1, 21):
            cid = base + i
            # Each row goes to its customer's shard.
            db.execute("INSERT INTO shop_customers (id, name) VALUES (%s, %s)", (cid, f"customer {i}"))
        # executemany pipelines the rows with one Sync: a batch over both shards, all or
        # nothing (pgshard commits it with two-phase commit).
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO shop_orders (id, customer_id, amount) VALUES (%s, %s, %s)",
                [((base + i) * 10 + k, base + i, f"{10 + k}.50") for i in range(1, 21) for k in range(3)],
            )
            try:
                cur.executemany(
                    "INSERT INTO shop_customers (id, name) VALUES (%s, %s)",
                    [(base + 21 + j, "new") for j in range(4)] + [(base + 1, "duplicate")],
                )
                raise AssertionError("a duplicate key must fail the batch")
            except psycopg.errors.UniqueViolation:
                pass
        kept = db.execute(
            "SELECT count(*) FROM shop_customers WHERE id > %s AND id <= %s", (base + 20, base + 24)
        ).fetchone()[0]
        assert kept == 0, f"{kept} rows of a failed batch were kept"

        # One customer with its orders: a join of co-located tables, on one shard.
        me = base + 7
        rows = db.execute(
            "SELECT c.name, o.id, o.amount FROM shop_customers c JOIN shop_orders o ON o.customer_id = c.id "
            "WHERE c.id = %s ORDER BY o.id",
            (me,),
        ).fetchall()
        print(f"customer {me} has {len(rows)} orders")
        assert len(rows) == 3

        # A report over every shard, merged by pgshard.
        orders, total = db.execute(
            "SELECT count(*), sum(amount) FROM shop_orders WHERE customer_id > %s AND customer_id <= %s",
            (base, base + 20),
        ).fetchone()
        total = str(total)
        print(f"report: {orders} orders, total {total}")
        assert (orders, total) == (60, "690.00")

        # Move credit between two customers (most likely on two shards): all or nothing.
        src, dst = base + 1, base + 2
        with db.transaction():
            db.execute("UPDATE shop_customers SET credit = credit - 25 WHERE id = %s", (src,))
            db.execute("UPDATE shop_customers SET credit = credit + 25 WHERE id = %s", (dst,))
        a = db.execute("SELECT credit::text FROM shop_customers WHERE id = %s", (src,)).fetchone()[0]
        b = db.execute("SELECT credit::text FROM shop_customers WHERE id = %s", (dst,)).fetchone()[0]
        print(f"transfer: {src} has {a}, {dst} has {b}")
        assert (a, b) == ("75.00", "125.00")

        # A listener hears about it, whichever shard the NOTIFY runs on.
        with psycopg.connect(URL, autocommit=True) as listener:
            listener.execute("LISTEN shop_transfers")
            db.execute("SELECT pg_notify('shop_transfers', %s)", (f"{src}->{dst}",))
            heard = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
            print(f"heard: {heard}")
            assert heard == [f"{src}->{dst}"], heard
        print("shop example OK")


if __name__ == "__main__":
    main()
