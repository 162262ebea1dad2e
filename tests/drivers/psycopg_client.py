"""psycopg 3 against one database: prints what each step returns, so that the output
through pgshard can be compared with the output on one plain PostgreSQL (tests/drivers.rs).

psycopg sends its own BEGIN before the first statement of a transaction, server-side
cursors as DECLARE plus FETCH FORWARD n (Django's .iterator(), SQLAlchemy's
stream_results), pipeline mode as one extended-protocol batch, binary results on request,
prepared statements after a statement's fifth use, COPY in text and binary.
"""

import sys

import psycopg
from psycopg import sql

URL = sys.argv[1]
T = "psycopg_items"  # sharded by id in the pgshard configuration


def show(name, value):
    print(f"{name}: {value!r}")


def step(conn, name, f):
    try:
        show(name, f())
    except psycopg.Error as e:
        print(f"{name}: error {e.sqlstate}")
        if not conn.autocommit:
            conn.rollback()


def main():
    c = psycopg.connect(URL)
    c.execute(f"DROP TABLE IF EXISTS {T}")
    c.execute(f"CREATE TABLE {T} (id bigint PRIMARY KEY, name text, qty int, price numeric(8,2))")
    c.commit()
    with c.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {T} (id, name, qty, price) VALUES (%s, %s, %s, %s)",
            [(i, f"n{i}", i % 6, i * 0.5) for i in range(1, 81)],
        )
    c.commit()
    step(c, "count", lambda: c.execute(f"SELECT count(*), sum(price) FROM {T}").fetchone())
    # LIMIT and OFFSET as parameters, as SQLAlchemy's .limit() and .offset() send them.
    step(c, "limit offset", lambda: c.execute(f"SELECT id FROM {T} ORDER BY price DESC, id LIMIT %s OFFSET %s", (4, 2)).fetchall())
    c.rollback()

    # Server-side cursors: DECLARE and FETCH inside the transaction psycopg began.
    def server_cursor():
        with c.cursor(name="items_cur") as cur:
            cur.itersize = 7
            cur.execute(f"SELECT id, name FROM {T} WHERE qty = %s ORDER BY id", (2,))
            first = cur.fetchmany(3)
            cur.scroll(2)
            rest = cur.fetchall()
        c.commit()
        return first, rest

    step(c, "server cursor", server_cursor)

    def iterate():
        with c.cursor(name="iter_cur") as cur:
            cur.itersize = 5
            cur.execute(f"SELECT id FROM {T} ORDER BY price DESC, id")
            out = [r[0] for r in cur]
        c.commit()
        return out

    step(c, "iterate", iterate)

    def with_hold():
        with c.cursor(name="held_cur", withhold=True) as cur:
            cur.execute(f"SELECT qty, count(*) FROM {T} GROUP BY qty ORDER BY qty")
            c.commit()  # the cursor outlives the transaction
            return cur.fetchall()

    step(c, "with hold", with_hold)

    # Reads over shards in a transaction see its writes; savepoints roll back.
    def transaction():
        with c.transaction():
            c.execute(f"UPDATE {T} SET qty = 50 WHERE id = %s", (1,))
            try:
                with c.transaction():
                    c.execute(f"UPDATE {T} SET qty = 60 WHERE id = %s", (2,))
                    c.execute(f"SELECT 1 / (qty - qty) FROM {T} WHERE id = %s", (2,))
            except psycopg.errors.DivisionByZero:
                pass
            return c.execute(f"SELECT id, qty FROM {T} WHERE qty >= 50 ORDER BY id").fetchall()

    step(c, "transaction", transaction)
    c.commit()

    # Pipeline mode: one batch over both shards, in a transaction.
    def pipeline():
        with c.pipeline():
            a = c.execute(f"SELECT count(*) FROM {T}")
            c.execute(f"UPDATE {T} SET name = 'piped' WHERE id = %s", (3,))
            b = c.execute(f"SELECT name FROM {T} WHERE id = %s", (3,))
            d = c.execute(f"SELECT max(id), min(name) FROM {T}")
        out = (a.fetchall(), b.fetchall(), d.fetchall())
        c.rollback()
        return out

    step(c, "pipeline", pipeline)

    def binary():
        with c.cursor(binary=True) as cur:
            cur.execute(f"SELECT id, price FROM {T} WHERE id < %s ORDER BY price DESC", (6,))
            return cur.fetchall()

    step(c, "binary results", binary)
    c.rollback()

    def prepared():
        out = []
        for i in range(7):
            out.append(c.execute(f"SELECT count(*) FROM {T} WHERE qty = %s", (i % 6,), prepare=True).fetchone())
        return out

    step(c, "prepared", prepared)
    c.rollback()

    # COPY in (text and binary) and out.
    def copy():
        with c.cursor() as cur:
            with cur.copy(f"COPY {T} (id, name, qty) FROM STDIN") as cp:
                for i in range(1000, 1020):
                    cp.write_row((i, f"c{i}", i % 3))
            with cur.copy(f"COPY {T} (id, name, qty) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["int8", "text", "int4"])
                for i in range(2000, 2020):
                    cp.write_row((i, f"b{i}", i % 3))
            c.commit()
            rows = []
            with cur.copy(f"COPY (SELECT id, name FROM {T} WHERE id >= 1000) TO STDOUT") as cp:
                for row in cp.rows():
                    rows.append(row)
            return len(rows), sorted(rows)[:3], sorted(rows)[-3:]

    step(c, "copy", copy)
    c.commit()

    # Autocommit and LISTEN/NOTIFY.
    c.autocommit = True
    c.execute("LISTEN psycopg_chan")
    with psycopg.connect(URL, autocommit=True) as other:
        other.execute("SELECT pg_notify('psycopg_chan', 'hello')")
    show("notification", [(n.channel, n.payload) for n in c.notifies(timeout=5, stop_after=1)])
    step(c, "autocommit merged", lambda: c.execute(f"SELECT qty, avg(price) FROM {T} WHERE id < 1000 GROUP BY qty ORDER BY qty").fetchall())
    step(c, "declare outside a transaction", lambda: c.execute(f"DECLARE x CURSOR FOR SELECT id FROM {T}"))
    c.execute(f"DROP TABLE {T}")
    c.close()
    print("done")


main()
