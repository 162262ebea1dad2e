"""asyncpg against one database: prints what each step returns, so that the output through
pgshard can be compared with the output on one plain PostgreSQL (tests/drivers.rs).

asyncpg talks the extended protocol only: named statements it describes before binding
(with a Flush), binary results, executemany as one pipelined batch, cursors that fetch
from a named portal with a row limit inside a transaction, binary COPY, and a pool that
resets each connection with a multi-statement string (UNLISTEN * among them).
"""

import asyncio
import io
import sys

import asyncpg

URL = sys.argv[1]
T = "asyncpg_items"  # sharded by id in the pgshard configuration


def show(name, value):
    print(f"{name}: {value!r}")


async def step(name, coro):
    try:
        show(name, await coro)
    except asyncpg.PostgresError as e:
        print(f"{name}: error {e.sqlstate}")


async def main():
    c = await asyncpg.connect(URL)
    await c.execute(f"DROP TABLE IF EXISTS {T}")
    await c.execute(f"CREATE TABLE {T} (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), tags text[])")
    # One pipelined batch over both shards: all or nothing.
    await c.executemany(
        f"INSERT INTO {T} (id, name, qty, price, tags) VALUES ($1, $2, $3, $4, $5)",
        [(i, f"n{i}", i % 7, i * 1.25, ["a", str(i)]) for i in range(1, 61)],
    )
    await step("batch fails whole", c.executemany(
        f"INSERT INTO {T} (id, name) VALUES ($1, $2)", [(100, "x"), (101, "y"), (5, "dup")]))
    await step("after failed batch", c.fetchval(f"SELECT count(*) FROM {T}"))
    await step("by key", c.fetchrow(f"SELECT id, name, qty, price, tags FROM {T} WHERE id = $1", 42))
    await step("merged aggregate", c.fetchrow(f"SELECT count(*), sum(qty), avg(price), max(name) FROM {T}"))
    await step("merged order limit", c.fetch(f"SELECT id, price FROM {T} WHERE qty = $1 ORDER BY price DESC LIMIT 4", 3))
    await step("group by", c.fetch(f"SELECT qty, count(*) FROM {T} GROUP BY qty ORDER BY qty"))
    stmt = await c.prepare(f"SELECT name FROM {T} WHERE id = ANY($1::bigint[]) ORDER BY id")
    await step("prepared over shards", stmt.fetch([1, 2, 3, 40]))
    await step("prepared again", stmt.fetch([7]))
    await step("column types", asyncio.sleep(0, [(a.name, a.type.name) for a in stmt.get_attributes()]))

    # A transaction: reads over both shards see its own writes, cursors fetch in parts.
    async with c.transaction():
        await c.execute(f"UPDATE {T} SET qty = qty + 100 WHERE id = $1", 3)
        await c.execute(f"UPDATE {T} SET qty = qty + 100 WHERE id = $1", 4)
        await step("tx merged read", c.fetch(f"SELECT id, qty FROM {T} WHERE qty > $1 ORDER BY id", 50))
        await step("tx count", c.fetchval(f"SELECT count(*) FROM {T} WHERE qty > 100"))
        ids = [r["id"] async for r in c.cursor(f"SELECT id FROM {T} WHERE id <= $1 ORDER BY id", 23, prefetch=5)]
        show("cursor prefetch", ids)
        cur = await c.cursor(f"SELECT id, name FROM {T} ORDER BY id DESC")
        show("cursor fetch", await cur.fetch(3))
        await cur.forward(4)
        show("cursor after forward", await cur.fetch(2))
    await step("committed", c.fetchval(f"SELECT sum(qty) FROM {T}"))
    try:
        async with c.transaction():
            await c.execute(f"DELETE FROM {T} WHERE id = $1", 10)
            show("tx deleted", await c.fetchval(f"SELECT count(*) FROM {T}"))
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    await step("rolled back", c.fetchval(f"SELECT count(*) FROM {T}"))

    await step("copy records", c.copy_records_to_table(
        T, records=[(1000 + i, f"c{i}", i, None, None) for i in range(20)], columns=["id", "name", "qty", "price", "tags"]))
    await step("after copy", c.fetch(f"SELECT count(*), sum(id) FROM {T} WHERE id >= 1000"))
    # Binary COPY out of both shards is one valid stream: it loads into another table.
    out = io.BytesIO()
    await step("copy out binary", c.copy_from_table(T, columns=["id", "name", "qty"], output=out, format="binary"))
    await c.execute("DROP TABLE IF EXISTS asyncpg_copied")
    await c.execute("CREATE TABLE asyncpg_copied (id bigint, name text, qty int)")
    out.seek(0)
    await step("copy in binary", c.copy_to_table("asyncpg_copied", source=out, format="binary"))
    await step("copied", c.fetchrow("SELECT count(*), sum(id), string_agg(name, ',' ORDER BY id) FROM asyncpg_copied"))
    await c.execute("DROP TABLE asyncpg_copied")
    out = io.BytesIO()
    await step("copy out csv", c.copy_from_query(f"SELECT id, name FROM {T} WHERE id < $1", 5, output=out, format="csv", header=True))
    show("csv", sorted(out.getvalue().decode().splitlines()))
    await step("division by zero", c.fetch(f"SELECT 1 / (qty - qty) FROM {T} WHERE id = $1", 1))
    await step("unknown column", c.fetch(f"SELECT nope FROM {T}"))
    await step("after errors", c.fetchval("SELECT 1"))

    # LISTEN/NOTIFY: another connection's notification arrives.
    got = asyncio.Queue()
    await c.add_listener("asyncpg_chan", lambda _c, _pid, ch, payload: got.put_nowait((ch, payload)))
    other = await asyncpg.connect(URL)
    await other.execute("NOTIFY asyncpg_chan, 'hello'")
    show("notification", await asyncio.wait_for(got.get(), 10))
    await c.remove_listener("asyncpg_chan", lambda *a: None)
    await other.close()

    # A pool: each release resets the connection with one multi-statement string.
    pool = await asyncpg.create_pool(URL, min_size=2, max_size=4)
    counts = await asyncio.gather(*[pool.fetchval(f"SELECT count(*) FROM {T} WHERE id <= $1", i) for i in range(30)])
    show("pool", counts)
    async with pool.acquire() as pc:
        await pc.execute("SET application_name = 'asyncpg_pool'")
    async with pool.acquire() as pc:
        show("pool reset settings", await pc.fetchval("SHOW application_name") != "asyncpg_pool")
    await pool.close()
    await c.execute(f"DROP TABLE {T}")
    await c.close()
    print("done")


asyncio.run(main())
