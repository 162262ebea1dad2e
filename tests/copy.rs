//! COPY through pgshard on sharded and reference tables: rows split by key (text and CSV,
//! with their options), gathered back, checked on each shard against the shard function
//! and against a plain database with the same data; errors leave nothing behind; and
//! `pgbench -i` builds a sharded pgbench database that `pgbench -S` then reads.

mod common;

use common::*;
use futures_util::SinkExt;
use pgshard::sharding::hash::{HashKey, partition_of};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::OnceLock;

fn ports() -> [u16; 2] {
    let c = cluster2();
    [c.shards[0].primary.port, c.shards[1].primary.port]
}

const SCHEMA: &str = "CREATE TABLE cp (id bigint, name text, note text);
     CREATE TABLE cp_ref (code text PRIMARY KEY, v int);";

async fn setup() -> SocketAddr {
    static P: OnceLock<SocketAddr> = OnceLock::new();
    static INIT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let addr = *P.get_or_init(|| {
        let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 8)
            + "    reference_tables: [cp_ref]\n    sharded_tables:\n      - { table: cp, column: id, method: hash }\n";
        start_proxy_yaml(&yaml)
    });
    INIT.get_or_init(|| async {
        connect(addr).await.batch_execute(SCHEMA).await.unwrap();
        cluster2()
            .psql(
                ports()[0],
                "postgres",
                "CREATE DATABASE plain_copy OWNER app",
            )
            .unwrap();
        connect_server(ports()[0], "plain_copy")
            .await
            .batch_execute(SCHEMA)
            .await
            .unwrap();
    })
    .await;
    addr
}

/// COPY FROM STDIN of `data`, sent in chunks of `chunk` bytes.
async fn copy_in(
    c: &tokio_postgres::Client,
    sql: &str,
    data: &[u8],
    chunk: usize,
) -> Result<u64, tokio_postgres::Error> {
    let sink = c.copy_in(sql).await?;
    let mut sink = Box::pin(sink);
    for part in data.chunks(chunk) {
        sink.send(bytes::Bytes::copy_from_slice(part)).await?;
    }
    sink.as_mut().finish().await
}

async fn copy_out(c: &tokio_postgres::Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let stream = c.copy_out(sql).await?;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await?;
    Ok(chunks.iter().map(|b| String::from_utf8_lossy(b)).collect())
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// Every row of `cp` on each shard belongs there, none twice; returns the total.
async fn placement() -> usize {
    let mut seen = HashSet::new();
    for (s, port) in ports().into_iter().enumerate() {
        let direct = connect_server(port, "app").await;
        for r in direct.query("SELECT id FROM cp", &[]).await.unwrap() {
            let id: i64 = r.get(0);
            assert_eq!(
                partition_of(&HashKey::Int(id), 2),
                s as u64,
                "row {id} on shard {s}"
            );
            assert!(seen.insert(id), "row {id} twice");
        }
    }
    seen.len()
}

#[tokio::test]
async fn copy_splits_rows_by_key_and_gathers_them_back() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain_copy").await;

    // Text format: escapes, NULLs, 3000 rows in chunks that cut rows anywhere.
    let mut text = String::new();
    for id in 1..=3000i64 {
        let note = if id % 7 == 0 {
            "\\N".to_string()
        } else {
            format!("tab\\there {id}\\\\")
        };
        text.push_str(&format!("{id}\tname{id}\t{note}\n"));
    }
    for db in [&c, &plain] {
        let n = copy_in(
            db,
            "COPY cp (id, name, note) FROM STDIN",
            text.as_bytes(),
            777,
        )
        .await
        .unwrap();
        assert_eq!(n, 3000);
    }
    // CSV with a header, quotes, a delimiter and a newline inside a field, NULL 'NULL'.
    let mut csv = String::from("id;name;note\n");
    for id in 3001..=3200i64 {
        csv.push_str(&format!("{id};\"a;b \"\"q\"\" {id}\";\"line1\nline2\"\n"));
    }
    csv.push_str("3201;x;NULL\n");
    // Without a column list and schema-qualified, with an empty search_path (as psql
    // restoring a dump has): the key's position comes from that table's columns.
    for db in [&c, &plain] {
        db.batch_execute("SET search_path = ''").await.unwrap();
        let n = copy_in(
            db,
            "COPY public.cp FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER ';', NULL 'NULL')",
            csv.as_bytes(),
            100,
        )
        .await
        .unwrap();
        assert_eq!(n, 201);
        db.batch_execute("RESET search_path").await.unwrap();
    }
    // Binary format (as asyncpg's copy_records_to_table and psycopg's binary copy send
    // it): each row's key field decoded from its bytes.
    for db in [&c, &plain] {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let sink = db
            .copy_in("COPY cp (id, name, note) FROM STDIN (FORMAT binary)")
            .await
            .unwrap();
        let w = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::TEXT]);
        let mut w = Box::pin(w);
        for id in 3202..=3400i64 {
            let note = (id % 3 != 0).then(|| format!("bin {id}"));
            w.as_mut()
                .write(&[&id, &format!("b{id}"), &note])
                .await
                .unwrap();
        }
        assert_eq!(w.as_mut().finish().await.unwrap(), 199);
    }
    assert_eq!(placement().await, 3400);
    // And out: one binary stream (one header, one trailer) with every shard's rows.
    let binary_out = async |db: &tokio_postgres::Client| {
        use futures_util::TryStreamExt;
        use tokio_postgres::binary_copy::BinaryCopyOutStream;
        use tokio_postgres::types::Type;
        let stream = db
            .copy_out("COPY cp (id, note) TO STDOUT (FORMAT binary)")
            .await
            .unwrap();
        let rows: Vec<_> = BinaryCopyOutStream::new(stream, &[Type::INT8, Type::TEXT])
            .try_collect()
            .await
            .unwrap();
        let mut v: Vec<(i64, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        v.sort();
        v
    };
    let ours = binary_out(&c).await;
    assert_eq!(ours.len(), 3400);
    assert_eq!(ours, binary_out(&plain).await);

    // Gathered back: the same rows as the plain database.
    let ours = copy_out(&c, "COPY cp TO STDOUT").await.unwrap();
    let theirs = copy_out(&plain, "COPY cp TO STDOUT").await.unwrap();
    assert_eq!(sorted_lines(&ours), sorted_lines(&theirs));
    let csv_out = copy_out(&c, "COPY cp (id, name) TO STDOUT WITH (FORMAT csv, HEADER)")
        .await
        .unwrap();
    assert_eq!(csv_out.lines().filter(|l| *l == "id,name").count(), 1);
    assert!(csv_out.starts_with("id,name\n"));
    let q = "COPY (SELECT id, note FROM cp WHERE id > 2990) TO STDOUT";
    assert_eq!(
        sorted_lines(&copy_out(&c, q).await.unwrap()),
        sorted_lines(&copy_out(&plain, q).await.unwrap())
    );
    // A query only a merge answers: pgshard merges it and writes the rows as COPY
    // writes them, escapes and quotes included.
    let tricky = "INSERT INTO cp (id, name, note) VALUES (9001, E'tab\\there', 'a,b'), \
                  (9002, E'line\\nbreak', E'back\\\\slash'), (9003, '\\.', 'say \"hi\"'), \
                  (9004, '', NULL), (9005, 'nil', E'cr\\rhere')";
    for db in [&c, &plain] {
        db.batch_execute(tricky).await.unwrap();
    }
    for q in [
        "COPY (SELECT id, note FROM cp ORDER BY id) TO STDOUT",
        "COPY (SELECT id, name, note FROM cp WHERE id > 9000 ORDER BY id) TO STDOUT (FORMAT csv, HEADER)",
        "COPY (SELECT id, name, note FROM cp WHERE id > 9000 ORDER BY id DESC) TO STDOUT (DELIMITER ',', NULL 'nil', HEADER)",
        "COPY (SELECT name FROM cp WHERE id > 9000 ORDER BY id) TO STDOUT (FORMAT csv)",
        "COPY (SELECT name, note FROM cp WHERE id > 9000 ORDER BY id) TO STDOUT (FORMAT csv, QUOTE '''', ESCAPE '\\', NULL 'nil', DELIMITER ';')",
        "COPY (SELECT id, name FROM cp WHERE id > 9000 ORDER BY id) TO STDOUT WITH CSV HEADER",
        "COPY (SELECT count(*), max(id), sum(id), count(note) FROM cp) TO STDOUT (FORMAT csv, HEADER true)",
        "COPY (SELECT DISTINCT note IS NULL AS missing FROM cp ORDER BY 1) TO STDOUT",
        "COPY (SELECT id FROM cp ORDER BY id LIMIT 5 OFFSET 3) TO STDOUT",
        "COPY (SELECT id % 3 AS r, count(*) FROM cp GROUP BY 1 ORDER BY 1) TO STDOUT",
    ] {
        let ours = copy_out(&c, q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e:?}"));
        assert_eq!(ours, copy_out(&plain, q).await.unwrap(), "{q}");
    }
    // psql sends it as a simple query.
    for q in [
        "COPY (SELECT id, name, note FROM cp WHERE id > 9000 ORDER BY id) TO STDOUT (FORMAT csv, HEADER)",
        "COPY (SELECT id, name FROM cp WHERE id > 9000 ORDER BY name DESC) TO STDOUT",
        "COPY (SELECT count(*), sum(id) FROM cp) TO STDOUT",
    ] {
        assert_eq!(
            psql(addr.port(), "app", "app", q),
            psql(ports()[0], "postgres", "plain_copy", q),
            "{q}"
        );
    }
    // In a transaction, over the shards it joins.
    for db in [&c, &plain] {
        db.batch_execute("BEGIN; UPDATE cp SET note = 'in tx' WHERE id = 9001")
            .await
            .unwrap();
    }
    let q = "COPY (SELECT id, note FROM cp WHERE id > 9000 ORDER BY id) TO STDOUT";
    assert_eq!(
        copy_out(&c, q).await.unwrap(),
        copy_out(&plain, q).await.unwrap()
    );
    for db in [&c, &plain] {
        db.batch_execute("COMMIT").await.unwrap();
    }
    // What pgshard would have to write differently is refused, not approximated.
    for q in [
        "COPY (SELECT id FROM cp ORDER BY id) TO STDOUT (FORMAT binary)",
        "COPY (SELECT id FROM cp ORDER BY id) TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
        "COPY (SELECT id FROM cp ORDER BY id) TO STDOUT (ENCODING 'LATIN1')",
    ] {
        let e = copy_out(&c, q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
    for db in [&c, &plain] {
        for id in 9001..=9005 {
            db.batch_execute(&format!("DELETE FROM cp WHERE id = {id}"))
                .await
                .unwrap();
        }
    }
    // One key: one shard.
    assert_eq!(
        copy_out(&c, "COPY (SELECT name FROM cp WHERE id = 5) TO STDOUT")
            .await
            .unwrap(),
        "name5\n"
    );

    // Reference table: every row on every shard; read back once.
    let n = copy_in(
        &c,
        "COPY cp_ref FROM STDIN (FORMAT csv)",
        b"fr,1\ngb,2\nus,3\n",
        4,
    )
    .await
    .unwrap();
    assert_eq!(n, 3);
    for port in ports() {
        let direct = connect_server(port, "app").await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM cp_ref", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
    }
    assert_eq!(
        copy_out(&c, "COPY cp_ref TO STDOUT")
            .await
            .unwrap()
            .lines()
            .count(),
        3
    );
}

#[tokio::test]
async fn failed_copies_leave_nothing_behind() {
    let addr = setup().await;
    let c = connect(addr).await;
    let count = async |c: &tokio_postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM cp WHERE id >= 100000", &[])
            .await
            .unwrap()
            .get(0)
    };
    // A bad key in the middle: 22P02, and the rows before it (on both shards) are gone.
    let mut data = String::new();
    for id in 100000..100100i64 {
        data.push_str(&format!("{id}\tok\t\\N\n"));
    }
    data.push_str("notanumber\tbad\t\\N\n");
    let e = copy_in(&c, "COPY cp FROM STDIN", data.as_bytes(), 64)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22P02", "{e}");
    assert_eq!(count(&c).await, 0);
    // A row the server rejects (too many columns) on one shard: nothing anywhere.
    let e = copy_in(
        &c,
        "COPY cp (id, name) FROM STDIN",
        b"100001\ta\n100002\tb\textra\n",
        1000,
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&e), "22P04", "{e}");
    assert_eq!(count(&c).await, 0);
    // The key column must be there; binary data must start with its signature. (The first
    // fails before COPY starts, where tokio-postgres then sends a CopyFail and a Sync of
    // its own, which PostgreSQL answers with an extra ReadyForQuery as pgshard does: a
    // fresh client for each.)
    let e = copy_in(
        &connect(addr).await,
        "COPY cp (name) FROM STDIN",
        b"x\n",
        10,
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    let e = copy_in(
        &connect(addr).await,
        "COPY cp FROM STDIN (FORMAT binary)",
        b"100006\tx\t\\N\n",
        10,
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&e), "22P04", "{e:?}");
    assert_eq!(count(&c).await, 0);
    // The client gives up: CopyFail.
    {
        let sink = c
            .copy_in::<_, bytes::Bytes>("COPY cp FROM STDIN")
            .await
            .unwrap();
        let mut sink = Box::pin(sink);
        sink.send(bytes::Bytes::from_static(b"100003\tx\t\\N\n"))
            .await
            .unwrap();
        drop(sink); // tokio-postgres sends CopyFail when the sink is dropped unfinished
    }
    c.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(count(&c).await, 0);
    // Inside a transaction: the COPY's rows go with its ROLLBACK.
    c.batch_execute("BEGIN").await.unwrap();
    let n = copy_in(
        &c,
        "COPY cp FROM STDIN",
        b"100004\tx\t\\N\n100005\ty\t\\N\n",
        7,
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    let r = rows(
        &c.simple_query("SELECT count(*) FROM cp WHERE id >= 100000")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("2"));
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&c).await, 0);
}

#[tokio::test]
async fn pgbench_initializes_and_reads_a_sharded_database() {
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 8)
        + "    reference_tables: [pgbench_branches, pgbench_tellers]\n    sharded_tables:\n      - { table: pgbench_accounts, column: aid, method: hash, type: integer }\n      - { table: pgbench_history, column: aid, method: hash, type: integer }\n";
    let addr = start_proxy_yaml(&yaml);
    pgbench(addr.port(), &["-i", "-s", "2", "-q"]);
    let mut total = 0;
    for (s, port) in ports().into_iter().enumerate() {
        let direct = connect_server(port, "app").await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM pgbench_accounts", &[])
            .await
            .unwrap()
            .get(0);
        assert!(n > 80_000, "shard {s} holds {n} accounts");
        total += n;
        let wrong: i64 = direct
            .query("SELECT aid FROM pgbench_accounts", &[])
            .await
            .unwrap()
            .iter()
            .filter(|r| partition_of(&HashKey::Int(r.get::<_, i32>(0) as i64), 2) != s as u64)
            .count() as i64;
        assert_eq!(wrong, 0, "accounts on the wrong shard {s}");
        for (t, want) in [("pgbench_branches", 2i64), ("pgbench_tellers", 20)] {
            let n: i64 = direct
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, want, "{t} on shard {s}");
        }
    }
    assert_eq!(total, 200_000);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            addr.port(),
            &["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "200"],
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    let c = connect(addr).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200_000);
}
