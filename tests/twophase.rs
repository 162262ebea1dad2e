//! Transactions over several shards: two-phase commit, atomic under ROLLBACK, errors,
//! savepoints, pgshard crashing before and after its decision (failpoints in a real
//! `pgshard serve`), a shard's primary killed during PREPARE; and 32 concurrent clients
//! moving money between shards with the total kept.

mod common;

use common::*;
use pgshard::local::{ClusterOptions, LocalCluster};
use pgshard::sharding::hash::{HashKey, partition_of};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const RULES: &str = "    sharded_tables:\n      - { table: tp_accounts, column: id, method: hash }\n      - { table: tp_batch, column: id, method: hash }\n    two_phase_timeout_ms: 1000\n";

/// Two keys on different shards.
fn keys() -> (i64, i64) {
    let a = 1i64;
    let b = (2..)
        .find(|k| partition_of(&HashKey::Int(*k), 2) != partition_of(&HashKey::Int(a), 2))
        .unwrap();
    (a, b)
}

async fn setup(addr: SocketAddr) -> tokio_postgres::Client {
    let c = connect(addr).await;
    c.batch_execute(
        "CREATE TABLE tp_accounts (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))",
    )
    .await
    .unwrap();
    let (a, b) = keys();
    c.batch_execute(&format!(
        "INSERT INTO tp_accounts (id, balance) VALUES ({a}, 100), ({b}, 100)"
    ))
    .await
    .unwrap();
    c
}

async fn balances(c: &tokio_postgres::Client) -> (i64, i64) {
    let (a, b) = keys();
    let get = async |k: i64| -> i64 {
        c.query_one("SELECT balance FROM tp_accounts WHERE id = $1", &[&k])
            .await
            .unwrap()
            .get(0)
    };
    (get(a).await, get(b).await)
}

/// Prepared transactions left on the servers, per shard.
fn prepared(c: &LocalCluster) -> Vec<String> {
    c.shards
        .iter()
        .map(|s| {
            c.psql(
                s.primary.port,
                "app",
                "SELECT count(*) FROM pg_prepared_xacts",
            )
            .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn commit_rollback_errors_and_savepoints_across_shards() {
    let c = own_cluster(2, 0);
    let yaml = c.config_yaml("127.0.0.1:0", "transaction", 4) + RULES;
    // `trusty` (trust) for the raw protocol client.
    let yaml = yaml.replace("users:\n", "users:\n  - { name: trusty, auth: trust }\n");
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let mut app = setup(addr).await;
    let (a, b) = keys();

    // COMMIT: both shards or none.
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = balance - 10 WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = balance + 10 WHERE id = {b}"
    ))
    .await
    .unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&app).await, (90, 110));
    assert_eq!(prepared(&c), ["0", "0"]);
    let decisions = c
        .psql(
            c.shards[0].primary.port,
            "app",
            "SELECT count(*) FROM pgshard_decisions",
        )
        .unwrap();
    assert_eq!(
        decisions, "0",
        "decision rows are removed once committed everywhere"
    );
    // With one server connection per shard: the decision is recorded on the transaction's
    // own connection to the coordinator shard. (It used to wait for a second one from the
    // pool, which under load every committing transaction does at once, until the
    // checkout timed out and the client heard that the outcome was unknown.)
    let one = connect(start_proxy_yaml(
        &(c.config_yaml("127.0.0.1:0", "transaction", 1) + RULES),
    ))
    .await;
    for _ in 0..2 {
        one.batch_execute(&format!(
            "BEGIN; UPDATE tp_accounts SET balance = balance - 5 WHERE id = {a}; \
             UPDATE tp_accounts SET balance = balance + 5 WHERE id = {b}; COMMIT"
        ))
        .await
        .unwrap();
    }
    assert_eq!(balances(&app).await, (80, 120));
    one.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = balance + 10 WHERE id = {a}; \
         UPDATE tp_accounts SET balance = balance - 10 WHERE id = {b}"
    ))
    .await
    .unwrap();
    assert_eq!(balances(&app).await, (90, 110));

    // ROLLBACK undoes both, in one query string or statement by statement.
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = 0 WHERE id = {a}; \
         UPDATE tp_accounts SET balance = 0 WHERE id = {b}; ROLLBACK"
    ))
    .await
    .unwrap();
    assert_eq!(balances(&app).await, (90, 110));
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 0 WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 0 WHERE id = {b}"
    ))
    .await
    .unwrap();
    app.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&app).await, (90, 110));
    // A comment before ROLLBACK (as ORMs and query tags add) is still a ROLLBACK.
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = 0 WHERE id = {a}; \
         UPDATE tp_accounts SET balance = 0 WHERE id = {b}"
    ))
    .await
    .unwrap();
    app.batch_execute("/* app: undo */ ROLLBACK").await.unwrap();
    assert_eq!(balances(&app).await, (90, 110));

    // One query string over both shards is one implicit transaction: its statements'
    // results come back in order, and an error rolls back all of it.
    let msgs = app
        .simple_query(&format!(
            "UPDATE tp_accounts SET balance = balance - 1 WHERE id = {a}; \
             UPDATE tp_accounts SET balance = balance + 1 WHERE id = {b}; \
             SELECT sum(balance) FROM tp_accounts"
        ))
        .await
        .unwrap();
    let r = rows(&msgs);
    assert_eq!(r, vec![vec![Some("200".to_string())]]);
    let tags = msgs
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1)))
        .count();
    assert_eq!(tags, 3, "UPDATE 1, UPDATE 1, SELECT 1");
    assert_eq!(balances(&app).await, (89, 111));
    let e = app
        .batch_execute(&format!(
            "UPDATE tp_accounts SET balance = balance - 1 WHERE id = {a}; \
             UPDATE tp_accounts SET balance = -5 WHERE id = {b}; \
             UPDATE tp_accounts SET balance = 0 WHERE id = {a}"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    assert_eq!(
        balances(&app).await,
        (89, 111),
        "the failed string left changes"
    );
    // With its own BEGIN: COMMIT at the end commits; an error leaves the transaction
    // aborted until ROLLBACK, as in PostgreSQL.
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = balance + 1 WHERE id = {a}; \
         UPDATE tp_accounts SET balance = balance - 1 WHERE id = {b}; COMMIT"
    ))
    .await
    .unwrap();
    assert_eq!(balances(&app).await, (90, 110));
    let e = app
        .batch_execute(&format!(
            "BEGIN; UPDATE tp_accounts SET balance = 1 WHERE id = {a}; \
             UPDATE tp_accounts SET balance = -1 WHERE id = {b}; COMMIT"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    let e = app.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    app.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&app).await, (90, 110));
    assert_eq!(prepared(&c), ["0", "0"]);

    // An error on the second shard: 25P02 until ROLLBACK; COMMIT then rolls back.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 1 WHERE id = {a}"
    ))
    .await
    .unwrap();
    let e = app
        .batch_execute(&format!(
            "UPDATE tp_accounts SET balance = -1 WHERE id = {b}"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    for k in [a, b] {
        let e = app
            .batch_execute(&format!("SELECT balance FROM tp_accounts WHERE id = {k}"))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "25P02");
    }
    let r = app.simple_query("COMMIT").await.unwrap();
    assert!(matches!(
        r.last(),
        Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))
    ));
    assert_eq!(balances(&app).await, (90, 110));

    // The isolation level follows the transaction to the shard that joins later.
    app.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = balance WHERE id = {a}"
    ))
    .await
    .unwrap();
    let r = rows(
        &app.simple_query(&format!(
            "SELECT current_setting('transaction_isolation') FROM tp_accounts WHERE id = {b}"
        ))
        .await
        .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("repeatable read"));
    app.batch_execute("COMMIT").await.unwrap();

    // Savepoints apply on every shard, including one that joins after them.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 50 WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute("SAVEPOINT s1").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 51 WHERE id = {b}"
    ))
    .await
    .unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 52 WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute("ROLLBACK TO SAVEPOINT s1").await.unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&app).await, (50, 110));

    // After an error, ROLLBACK TO SAVEPOINT recovers the transaction on every shard.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 60 WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute("SAVEPOINT s2").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 61 WHERE id = {b}"
    ))
    .await
    .unwrap();
    let e = app
        .batch_execute(&format!(
            "UPDATE tp_accounts SET balance = -1 WHERE id = {a}"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    let e = app
        .batch_execute(&format!("SELECT 1 FROM tp_accounts WHERE id = {b}"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    app.batch_execute("ROLLBACK TO SAVEPOINT s2").await.unwrap();
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 62 WHERE id = {b}"
    ))
    .await
    .unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&app).await, (60, 62));
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = 50 WHERE id = {a}; UPDATE tp_accounts SET balance = 110 WHERE id = {b}"
    ))
    .await
    .unwrap();
    assert_eq!(balances(&app).await, (50, 110));

    // The extended protocol, with parameters (tokio-postgres' transaction API).
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "UPDATE tp_accounts SET balance = balance + $2 WHERE id = $1",
        &[&a, &5i64],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE tp_accounts SET balance = balance - $2 WHERE id = $1",
        &[&b, &5i64],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(balances(&app).await, (55, 105));
    let tx = app.transaction().await.unwrap();
    tx.execute("UPDATE tp_accounts SET balance = 0 WHERE id = $1", &[&a])
        .await
        .unwrap();
    tx.execute("UPDATE tp_accounts SET balance = 0 WHERE id = $1", &[&b])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(balances(&app).await, (55, 105));
    assert_eq!(prepared(&c), ["0", "0"]);

    // Statements over several shards inside a transaction: a split INSERT, a cross-shard
    // read that sees the transaction's own rows, DDL; ROLLBACK undoes all of it.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute(
        "INSERT INTO tp_accounts (id, balance) VALUES (1000, 1), (1001, 1), (1002, 1), (1003, 1)",
    )
    .await
    .unwrap();
    let r = rows(
        &app.simple_query("SELECT count(*), sum(balance) FROM tp_accounts")
            .await
            .unwrap(),
    );
    assert_eq!(r[0], [Some("6".to_string()), Some("164".to_string())]);
    app.batch_execute("ALTER TABLE tp_accounts ADD COLUMN note text")
        .await
        .unwrap();
    app.batch_execute("ROLLBACK").await.unwrap();
    let r = rows(
        &app.simple_query("SELECT count(*) FROM tp_accounts")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("2"));
    for s in &c.shards {
        let cols = c
            .psql(
                s.primary.port,
                "app",
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'tp_accounts'",
            )
            .unwrap();
        assert_eq!(cols, "2", "the rolled-back ALTER left a column");
    }
    // Outside a transaction, a split INSERT commits on both shards at once (2PC), and a
    // failing one commits nowhere.
    app.batch_execute(
        "INSERT INTO tp_accounts (id, balance) VALUES (2000, 1), (2001, 1), (2002, 1), (2003, 1)",
    )
    .await
    .unwrap();
    let e = app
        .batch_execute("INSERT INTO tp_accounts (id, balance) VALUES (3000, 1), (3001, -1), (3002, 1), (3003, -1)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    let r = rows(
        &app.simple_query("SELECT count(*) FROM tp_accounts")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("6"));
    assert_eq!(prepared(&c), ["0", "0"]);

    // The same with parameters (extended protocol): each shard gets its rows and only
    // their parameters; RETURNING rows come from both.
    let ids: Vec<i64> = (4000..4006).collect();
    let r = app
        .query(
            "INSERT INTO tp_accounts (id, balance) VALUES ($1, $7), ($2, $7), ($3, $7), ($4, $7), ($5, $7), ($6, $7) RETURNING id",
            &[&ids[0], &ids[1], &ids[2], &ids[3], &ids[4], &ids[5], &3i64],
        )
        .await
        .unwrap();
    let mut back: Vec<i64> = r.iter().map(|row| row.get(0)).collect();
    back.sort_unstable();
    assert_eq!(back, ids);
    for (s, shard) in c.shards.iter().enumerate() {
        let there = c
            .psql(
                shard.primary.port,
                "app",
                "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM tp_accounts WHERE id >= 4000 AND balance = 3",
            )
            .unwrap();
        let want: Vec<String> = ids
            .iter()
            .filter(|id| partition_of(&HashKey::Int(**id), 2) as usize == s)
            .map(|id| id.to_string())
            .collect();
        assert_eq!(there, want.join(","), "shard {s}");
    }
    let e = app
        .execute(
            "INSERT INTO tp_accounts (id, balance) VALUES ($1, 1), ($2, -1)",
            &[&ids[0], &9999i64],
        )
        .await
        .unwrap_err();
    assert!(["23505", "23514"].contains(&sqlstate(&e).as_str()), "{e}");
    assert_eq!(prepared(&c), ["0", "0"]);

    settings_follow_multi_shard_transactions(addr, &app).await;
    settings_do_not_pin_a_transaction(&app, &server).await;
    pipelined_batches_over_several_shards(addr, &app, &c, &server).await;
}

/// Multi-shard transactions prepared so far (`pgshard_2pc_prepared_total`).
fn two_phase_commits(server: &pgshard::frontend::Server) -> f64 {
    sample(
        &pgshard::admin::metrics::render(server),
        "pgshard_2pc_prepared_total",
        &[],
    )
}

/// `BEGIN; SET LOCAL ...` then statements on one shard (as multi-tenant applications
/// start their transactions): the SET ran on the default shard, but the transaction moves
/// to its data's shard with the setting replayed, and commits there in one phase.
async fn settings_do_not_pin_a_transaction(
    app: &tokio_postgres::Client,
    server: &pgshard::frontend::Server,
) {
    let prepared_2pc = || two_phase_commits(server);
    let before = prepared_2pc();
    // A key away from the default shard (0), where the SET runs.
    let k = (1..)
        .find(|k| partition_of(&HashKey::Int(*k), 2) != 0)
        .unwrap();
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute("SET LOCAL work_mem = '21MB'")
        .await
        .unwrap();
    app.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(setting_on(app, k, "work_mem").await, "21MB");
    app.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = balance WHERE id = {k}"
    ))
    .await
    .unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    // The extended protocol (a SET bound and executed) likewise.
    app.batch_execute("BEGIN").await.unwrap();
    app.execute("SET LOCAL work_mem = '22MB'", &[])
        .await
        .unwrap();
    assert_eq!(setting_on(app, k, "work_mem").await, "22MB");
    app.batch_execute("COMMIT").await.unwrap();
    // set_config, as PostgREST sets a request's role and claims: simple protocol, and
    // extended with parameters (tokio-postgres binds them in binary).
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute("SELECT set_config('work_mem', '23MB', true)")
        .await
        .unwrap();
    assert_eq!(setting_on(app, k, "work_mem").await, "23MB");
    app.batch_execute("COMMIT").await.unwrap();
    app.batch_execute("BEGIN").await.unwrap();
    app.query(
        "SELECT set_config($1, $2, true), set_config('app.tenant', $3, true)",
        &[&"work_mem", &"24MB", &"acme"],
    )
    .await
    .unwrap();
    assert_eq!(setting_on(app, k, "work_mem").await, "24MB");
    assert_eq!(setting_on(app, k, "app.tenant").await, "acme");
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(prepared_2pc(), before, "one shard, one phase");
    assert_eq!(setting_on(app, k, "work_mem").await, "4MB");
}

/// Sends a batch; the tags of the answers up to ReadyForQuery, and its status.
async fn run_batch(raw: &mut Raw, batch: &[u8]) -> (String, u8) {
    raw.send(batch).await;
    let mut tags = String::new();
    loop {
        let (t, body) = raw.recv().await.expect("an answer");
        tags.push(t as char);
        if t == b'Z' {
            return (tags, body[0]);
        }
    }
}

/// A pipelined batch (one Sync) whose statements go to several shards, as pgjdbc's
/// executeBatch, asyncpg's executemany and psycopg's pipeline mode send them: outside a
/// transaction all of it commits or none does (two-phase), inside one the shards join.
/// Each batch is also run on one plain PostgreSQL: the client sees the same answers.
async fn pipelined_batches_over_several_shards(
    addr: SocketAddr,
    app: &tokio_postgres::Client,
    c: &LocalCluster,
    server: &pgshard::frontend::Server,
) {
    app.batch_execute("CREATE TABLE tp_batch (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let direct_port = c.shards[0].primary.port;
    c.psql(direct_port, "postgres", "CREATE DATABASE batch_ref")
        .unwrap();
    c.psql(
        direct_port,
        "batch_ref",
        "CREATE TABLE tp_batch (id bigint PRIMARY KEY, v text)",
    )
    .unwrap();
    let direct_addr: SocketAddr = format!("127.0.0.1:{direct_port}").parse().unwrap();
    let mut raw = Raw::startup(addr, "trusty", "app").await;
    assert!(raw.until_ready().await.ends_with('Z'));
    let mut plain = Raw::startup(direct_addr, "postgres", "batch_ref").await;
    assert!(plain.until_ready().await.ends_with('Z'));
    let shard_of = |k: i64| partition_of(&HashKey::Int(k), 2) as usize;
    // Keys 1.. alternate between the shards often enough; pick them by shard.
    let on = |s: usize, n: usize| -> Vec<i64> {
        (1000..).filter(|k| shard_of(*k) == s).take(n).collect()
    };
    let (x, y) = (on(0, 8), on(1, 8));
    let rows_on = |s: usize| {
        c.psql(
            c.shards[s].primary.port,
            "app",
            "SELECT coalesce(string_agg(id || v, ',' ORDER BY id), '') FROM tp_batch",
        )
        .unwrap()
    };
    let insert = "INSERT INTO tp_batch (id, v) VALUES ($1, $2)";
    // Parse, Bind, Execute per row (the unnamed statement), then one Sync.
    let unnamed = |rows: &[(i64, &str)]| {
        let mut b = Vec::new();
        for (id, v) in rows {
            b.extend(msg::parse("", insert));
            b.extend(msg::bind("", "", &[&id.to_string(), v]));
            b.extend(msg::execute(""));
        }
        b.extend(msg::sync());
        b
    };
    let both = async |raw: &mut Raw, plain: &mut Raw, batch: &[u8]| {
        let got = run_batch(raw, batch).await;
        assert_eq!(
            got,
            run_batch(plain, batch).await,
            "as one PostgreSQL answers"
        );
        got
    };

    // Outside a transaction: one implicit transaction over both shards, committed.
    let got = both(
        &mut raw,
        &mut plain,
        &unnamed(&[(x[0], "a"), (y[0], "a"), (x[1], "a")]),
    )
    .await;
    assert_eq!(got, ("12C12C12CZ".to_string(), b'I'));
    assert_eq!(rows_on(0), format!("{}a,{}a", x[0], x[1]));
    assert_eq!(rows_on(1), format!("{}a", y[0]));
    assert_eq!(prepared(c), ["0", "0"]);

    // A Flush after the Sync (psycopg's pipeline sends one), with the Sync still in
    // flight or after it, starts no batch: a read over every shard still may follow.
    let mut one = msg::parse("", "SELECT count(*) FROM tp_batch WHERE id = $1");
    one.extend(msg::bind("", "", &[&x[0].to_string()]));
    one.extend(msg::execute(""));
    one.extend(msg::sync());
    one.extend(msg::flush());
    assert_eq!(
        both(&mut raw, &mut plain, &one).await,
        ("12DCZ".to_string(), b'I')
    );
    let mut count = msg::flush();
    count.extend(msg::parse("", "SELECT count(*) FROM tp_batch"));
    count.extend(msg::bind("", "", &[]));
    count.extend(msg::execute(""));
    count.extend(msg::sync());
    assert_eq!(
        both(&mut raw, &mut plain, &count).await,
        ("12DCZ".to_string(), b'I')
    );

    // Reads only, over both shards: the batch moves without a transaction over them (no
    // two-phase commit, which servers without prepared transactions would refuse).
    let before = two_phase_commits(server);
    let mut reads = msg::parse("", "SELECT v FROM tp_batch WHERE id = $1");
    for k in [x[0], y[0], x[1]] {
        reads.extend(msg::bind("", "", &[&k.to_string()]));
        reads.extend(msg::execute(""));
    }
    reads.extend(msg::sync());
    assert_eq!(
        both(&mut raw, &mut plain, &reads).await,
        ("12DC2DC2DCZ".to_string(), b'I')
    );
    assert_eq!(two_phase_commits(server), before, "no two-phase commit");

    // A failure on the second shard: the rows before it, on the first, are not kept;
    // what follows the error is skipped, as by PostgreSQL.
    let batch = unnamed(&[(x[2], "b"), (y[0], "dup"), (x[3], "b")]);
    let got = both(&mut raw, &mut plain, &batch).await;
    assert_eq!(got, ("12C12EZ".to_string(), b'I'));
    assert_eq!(rows_on(0), format!("{}a,{}a", x[0], x[1]));
    assert_eq!(prepared(c), ["0", "0"]);

    // A failure on the first shard before the batch moves on: skipped as well.
    let batch = unnamed(&[(x[0], "dup"), (y[1], "c")]);
    assert_eq!(
        both(&mut raw, &mut plain, &batch).await,
        ("12EZ".to_string(), b'I')
    );
    assert_eq!(rows_on(1), format!("{}a", y[0]));

    // A named statement bound again and again (asyncpg, pgjdbc past its threshold), and
    // the unnamed statement bound twice after one Parse.
    let mut prep = msg::parse("ins", insert);
    prep.extend(msg::sync());
    assert_eq!(
        both(&mut raw, &mut plain, &prep).await,
        ("1Z".to_string(), b'I')
    );
    let mut batch = Vec::new();
    for id in [x[4], y[2], x[5]] {
        batch.extend(msg::bind("", "ins", &[&id.to_string(), "d"]));
        batch.extend(msg::execute(""));
    }
    batch.extend(msg::parse("", insert));
    for id in [y[3], x[6]] {
        batch.extend(msg::bind("", "", &[&id.to_string(), "e"]));
        batch.extend(msg::execute(""));
    }
    batch.extend(msg::sync());
    assert_eq!(
        both(&mut raw, &mut plain, &batch).await,
        ("2C2C2C12C2CZ".to_string(), b'I')
    );
    assert_eq!(
        rows_on(0),
        format!("{}a,{}a,{}d,{}d,{}e", x[0], x[1], x[4], x[5], x[6])
    );
    assert_eq!(rows_on(1), format!("{}a,{}d,{}e", y[0], y[2], y[3]));

    // Inside the client's transaction, the batch's shards join it; COMMIT is two-phase.
    for r in [&mut raw, &mut plain] {
        assert_eq!(
            run_batch(r, &msg::query("BEGIN")).await,
            ("CZ".to_string(), b'T')
        );
    }
    let batch = unnamed(&[(y[4], "f"), (x[7], "f")]);
    assert_eq!(
        both(&mut raw, &mut plain, &batch).await,
        ("12C12CZ".to_string(), b'T')
    );
    for r in [&mut raw, &mut plain] {
        assert_eq!(
            run_batch(r, &msg::query("COMMIT")).await,
            ("CZ".to_string(), b'I')
        );
    }
    assert!(rows_on(0).ends_with(&format!("{}f", x[7])));
    assert!(rows_on(1).ends_with(&format!("{}f", y[4])));
    assert_eq!(prepared(c), ["0", "0"]);
}

/// A setting as the server holding `key`'s row sees it (simple protocol, routed by key).
async fn setting_on(app: &tokio_postgres::Client, key: i64, name: &str) -> String {
    let m = app
        .simple_query(&format!(
            "SELECT current_setting('{name}') FROM tp_accounts WHERE id = {key}"
        ))
        .await
        .unwrap();
    rows(&m)[0][0].clone().unwrap()
}

/// Opens a transaction that has both shards in it.
async fn begin_on_both(app: &tokio_postgres::Client) {
    let (a, b) = keys();
    for sql in [
        format!("BEGIN; UPDATE tp_accounts SET balance = balance WHERE id = {a}"),
        format!("UPDATE tp_accounts SET balance = balance WHERE id = {b}"),
    ] {
        app.batch_execute(&sql).await.unwrap();
    }
}

/// SET and SET LOCAL inside a transaction over several shards reach every shard of it,
/// those that join later included, follow ROLLBACK TO SAVEPOINT, and a session SET stays
/// with the client after COMMIT (and only with it).
async fn settings_follow_multi_shard_transactions(addr: SocketAddr, app: &tokio_postgres::Client) {
    let (a, b) = keys();
    let both = async |name: &str| {
        (
            setting_on(app, a, name).await,
            setting_on(app, b, name).await,
        )
    };
    let same = |v: &str| (v.to_string(), v.to_string());
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = balance WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute("SET LOCAL work_mem = '7MB'")
        .await
        .unwrap();
    assert_eq!(
        setting_on(app, b, "work_mem").await,
        "7MB",
        "replayed on the shard that joins"
    );
    app.batch_execute("SET LOCAL work_mem = '9MB'")
        .await
        .unwrap();
    assert_eq!(both("work_mem").await, same("9MB"));
    app.batch_execute("SAVEPOINT s; SET LOCAL work_mem = '11MB'")
        .await
        .unwrap();
    assert_eq!(both("work_mem").await, same("11MB"));
    app.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    assert_eq!(both("work_mem").await, same("9MB"));
    app.batch_execute("SET statement_timeout = '54321ms'")
        .await
        .unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(both("statement_timeout").await, same("54321ms"));
    assert_eq!(both("work_mem").await, same("4MB"));

    // Leading comments (as ORMs and sqlcommenter write them) and a quoted savepoint name,
    // replayed on a shard that joins later.
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = balance WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.batch_execute("/* app:checkout */ SAVEPOINT \"Retry\"")
        .await
        .unwrap();
    app.batch_execute("-- tune\nSET LOCAL work_mem = '12MB'")
        .await
        .unwrap();
    assert_eq!(setting_on(app, b, "work_mem").await, "12MB", "replayed");
    app.batch_execute("/* app */ ROLLBACK TO SAVEPOINT \"Retry\"")
        .await
        .unwrap();
    assert_eq!(both("work_mem").await, same("4MB"));
    app.batch_execute("COMMIT").await.unwrap();

    // set_config with bound parameters in a transaction over both shards reaches both,
    // and a shard that joins later.
    app.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = balance WHERE id = {a}"
    ))
    .await
    .unwrap();
    app.query("SELECT set_config('work_mem', $1, true)", &[&"26MB"])
        .await
        .unwrap();
    assert_eq!(setting_on(app, b, "work_mem").await, "26MB", "replayed");
    app.query("SELECT set_config('work_mem', $1, true)", &[&"27MB"])
        .await
        .unwrap();
    assert_eq!(both("work_mem").await, same("27MB"));
    app.batch_execute("COMMIT").await.unwrap();

    // Rolled back: as if it had not happened, on every shard.
    begin_on_both(app).await;
    app.batch_execute("SET statement_timeout = '1111ms'")
        .await
        .unwrap();
    assert_eq!(both("statement_timeout").await, same("1111ms"));
    app.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(both("statement_timeout").await, same("54321ms"));

    // The extended protocol (tokio-postgres' execute) keeps them in step too.
    begin_on_both(app).await;
    app.execute("SET LOCAL work_mem = '13MB'", &[])
        .await
        .unwrap();
    assert_eq!(both("work_mem").await, same("13MB"));
    app.execute("SAVEPOINT e", &[]).await.unwrap();
    app.execute("SET LOCAL work_mem = '15MB'", &[])
        .await
        .unwrap();
    assert_eq!(both("work_mem").await, same("15MB"));
    app.execute("ROLLBACK TO SAVEPOINT e", &[]).await.unwrap();
    assert_eq!(both("work_mem").await, same("13MB"));
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(both("work_mem").await, same("4MB"));

    // A SET later in a pipelined batch (one Sync for several statements) too.
    let mut raw = Raw::startup(addr, "trusty", "app").await;
    assert!(raw.until_ready().await.ends_with('Z'));
    for sql in [
        format!("BEGIN; UPDATE tp_accounts SET balance = balance WHERE id = {a}"),
        format!("UPDATE tp_accounts SET balance = balance WHERE id = {b}"),
    ] {
        raw.send(&msg::query(&sql)).await;
        assert!(!raw.until_ready().await.contains('E'));
    }
    let mut batch = Vec::new();
    for sql in ["SELECT 1", "SET LOCAL work_mem = '17MB'"] {
        batch.extend(msg::parse("", sql));
        batch.extend(msg::bind("", "", &[]));
        batch.extend(msg::execute(""));
    }
    batch.extend(msg::sync());
    raw.send(&batch).await;
    assert_eq!(raw.until_ready().await, "12DC12CZ");
    for key in [a, b] {
        raw.send(&msg::query(&format!(
            "SELECT current_setting('work_mem') FROM tp_accounts WHERE id = {key}"
        )))
        .await;
        let mut value = None;
        while let Some((t, body)) = raw.recv().await {
            if t == b'D' {
                // One text column: count (2 bytes), length (4), the value.
                value = Some(String::from_utf8_lossy(&body[6..]).into_owned());
            }
            if t == b'Z' {
                break;
            }
        }
        assert_eq!(value.as_deref(), Some("17MB"), "shard of {key}");
    }
    raw.send(&msg::query("ROLLBACK")).await;
    raw.until_ready().await;

    // The servers' connections do not carry it to other clients.
    let others = futures_util::future::join_all((0..4).map(|_| connect(addr))).await;
    for o in &others {
        assert_eq!(setting_on(o, a, "statement_timeout").await, "0");
        assert_eq!(setting_on(o, b, "statement_timeout").await, "0");
    }
    app.batch_execute("RESET statement_timeout").await.unwrap();
}

fn serve(c: &LocalCluster, failpoint: Option<&str>) -> ServeProcess {
    serve_process(
        c,
        |listen| c.config_yaml(listen, "transaction", 4) + RULES,
        failpoint,
    )
}

/// BEGIN; move 10 from a to b; COMMIT (whose result is returned).
async fn transfer(addr: SocketAddr) -> Result<(), tokio_postgres::Error> {
    let (a, b) = keys();
    let c = connect(addr).await;
    c.batch_execute(&format!(
        "BEGIN; UPDATE tp_accounts SET balance = balance - 10 WHERE id = {a}"
    ))
    .await?;
    c.batch_execute(&format!(
        "UPDATE tp_accounts SET balance = balance + 10 WHERE id = {b}"
    ))
    .await?;
    c.batch_execute("COMMIT").await
}

/// Waits until recovery (in a fresh pgshard) left no prepared transaction.
async fn recovered(c: &LocalCluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while prepared(c) != ["0", "0"] {
        assert!(
            Instant::now() < deadline,
            "in-doubt transactions left: {:?}",
            prepared(c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn crashes_of_pgshard_and_of_a_shard_leave_all_or_nothing() {
    let mut c = own_cluster(2, 0);
    {
        let s = serve(&c, None);
        setup(s.addr).await;
    }

    // pgshard dies after PREPARE, before deciding: recovery rolls back (after the
    // in-doubt timeout), everywhere.
    {
        let s = serve(&c, Some("crash_after_prepare"));
        assert!(transfer(s.addr).await.is_err());
        assert_eq!(prepared(&c), ["1", "1"], "both shards prepared");
    }
    {
        let s = serve(&c, None);
        recovered(&c).await;
        assert_eq!(balances(&connect(s.addr).await).await, (100, 100));
    }

    // pgshard dies after recording commit, before COMMIT PREPARED: recovery commits.
    {
        let s = serve(&c, Some("crash_after_decision"));
        assert!(transfer(s.addr).await.is_err());
        assert_eq!(prepared(&c), ["1", "1"]);
    }
    {
        let s = serve(&c, None);
        recovered(&c).await;
        assert_eq!(balances(&connect(s.addr).await).await, (90, 110));
    }

    // A shard's primary dies while the transaction prepares: nothing commits.
    {
        let s = serve(&c, Some("sleep_before_prepare"));
        let addr = s.addr;
        let t = tokio::spawn(transfer(addr));
        tokio::time::sleep(Duration::from_millis(800)).await;
        c.shards[1].primary.stop_with(libc::SIGKILL);
        let r = t.await.unwrap();
        assert!(r.is_err(), "COMMIT succeeded with a shard dead");
        c.restart(1, None).unwrap();
    }
    {
        let s = serve(&c, None);
        recovered(&c).await;
        assert_eq!(balances(&connect(s.addr).await).await, (90, 110));
    }
}

/// Two transactions, through `older_at` and `younger_at`, that each lock a row on one
/// shard, then wait for the other's row on the other shard: a deadlock no server sees.
/// The younger one's wait is cancelled and its client gets 40P01 (asked in the extended
/// protocol when `extended`; the older one waits in the simple protocol); the older one
/// goes on and commits. The error the younger one got.
async fn deadlock_between(
    older_at: SocketAddr,
    younger_at: SocketAddr,
    extended: bool,
) -> tokio_postgres::error::DbError {
    let (a, b) = keys();
    let older = connect(older_at).await;
    let younger = connect(younger_at).await;
    let bump = |k: i64| format!("UPDATE tp_accounts SET balance = balance + 1 WHERE id = {k}");
    older
        .batch_execute(&format!("BEGIN; {}", bump(a)))
        .await
        .unwrap();
    younger
        .batch_execute(&format!("BEGIN; {}", bump(b)))
        .await
        .unwrap();
    let before = balances(&connect(older_at).await).await;
    // The older transaction spans both shards first, and waits for the younger's row.
    let waiting = tokio::spawn({
        let sql = bump(b);
        async move {
            let r = older.batch_execute(&sql).await;
            (older, r)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    let started = Instant::now();
    let last = async {
        if extended {
            younger.execute(&bump(a), &[]).await.map(|_| ())
        } else {
            younger.batch_execute(&bump(a)).await
        }
    };
    let e = tokio::time::timeout(Duration::from_secs(30), last)
        .await
        .expect("the deadlock was not broken within 30 s")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "40P01", "{e}");
    younger.batch_execute("ROLLBACK").await.unwrap();
    let (older, r) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the older transaction went on")
        .unwrap();
    r.unwrap();
    older.batch_execute("COMMIT").await.unwrap();
    eprintln!("deadlock across shards broken in {:?}", started.elapsed());
    assert_eq!(
        balances(&connect(older_at).await).await,
        (before.0 + 1, before.1 + 1)
    );
    e.as_db_error().unwrap().clone()
}

/// Both clients through one pgshard: its detector breaks the cycle.
async fn deadlock_across_shards(addr: SocketAddr, server: &pgshard::frontend::Server) {
    let db = deadlock_between(addr, addr, true).await;
    assert_eq!(db.message(), "deadlock detected");
    assert!(db.detail().unwrap().contains("shards [0, 1]"), "{db:?}");
    let metrics = pgshard::admin::metrics::render(server);
    assert_eq!(sample(&metrics, "pgshard_deadlocks_total", &[]), 1.0);
}

/// The same over a write that runs on two shards at once outside a transaction
/// (`two_phase_commit: off`, one-phase): it holds its row on one shard while its part on the
/// other waits. It is the younger transaction here, so it is the one cancelled: its client
/// gets 40P01 and the write is rolled back on both shards.
async fn deadlock_with_a_one_phase_write(c: &LocalCluster, first: &pgshard::frontend::Server) {
    let yaml = c.config_yaml("127.0.0.1:0", "transaction", 8)
        + RULES
        + "    two_phase_commit: off\n    cross_shard_writes: allow\n";
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let (a, b) = keys();
    let before = balances(&connect(addr).await).await;
    let older = connect(addr).await;
    older
        .batch_execute(&format!(
            "BEGIN; UPDATE tp_accounts SET balance = balance + 1 WHERE id = {a}; SELECT balance FROM tp_accounts WHERE id = {b}"
        ))
        .await
        .unwrap();
    let writer = connect(addr).await;
    let write = tokio::spawn(async move {
        writer
            .batch_execute(&format!(
                "UPDATE tp_accounts SET balance = balance + 10 WHERE id IN ({a}, {b})"
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished());
    tokio::time::timeout(
        Duration::from_secs(30),
        older.batch_execute(&format!(
            "UPDATE tp_accounts SET balance = balance + 1 WHERE id = {b}"
        )),
    )
    .await
    .expect("the deadlock was not broken within 30 s")
    .unwrap();
    let e = write.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "40P01", "{e}");
    older.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        balances(&connect(addr).await).await,
        (before.0 + 1, before.1 + 1)
    );
    // Both pgshard servers of this test process watch the same primaries and know the same
    // transactions (one registry per process): either may have broken it.
    let broken = [first, &server].map(|s| {
        sample(
            &pgshard::admin::metrics::render(s),
            "pgshard_deadlocks_total",
            &[],
        )
    });
    assert!(broken[0] + broken[1] >= 2.0, "{broken:?}");
}

/// The two transactions through two pgshard processes: neither knows the other's
/// transaction, but both find the cycle from the ids marked on the servers' backends, and
/// the process of the younger one cancels it.
async fn deadlock_across_two_pgshard_processes(
    c: &LocalCluster,
    first: &pgshard::frontend::Server,
    first_addr: SocketAddr,
) {
    let broken = || {
        sample(
            &pgshard::admin::metrics::render(first),
            "pgshard_deadlocks_total",
            &[],
        )
    };
    let before_here = broken();
    let other = serve(c, None);
    deadlock_between(first_addr, other.addr, false).await;
    // The victim was the other process's: this one left it alone.
    assert_eq!(broken(), before_here);
}

#[tokio::test]
async fn thirty_two_clients_move_money_between_shards_and_the_total_stays() {
    let c = own_cluster(2, 0);
    let yaml = c.config_yaml("127.0.0.1:0", "transaction", 40) + RULES;
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let app = setup(addr).await;
    deadlock_across_shards(addr, &server).await;
    deadlock_with_a_one_phase_write(&c, &server).await;
    deadlock_across_two_pgshard_processes(&c, &server, addr).await;
    app.batch_execute(
        "DROP TABLE tp_accounts; CREATE TABLE tp_accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)",
    )
    .await
    .unwrap();
    // 200 accounts of 1000 each, through pgshard (the INSERT is split per shard).
    let values: Vec<String> = (1..=200).map(|i| format!("({i}, 1000)")).collect();
    app.batch_execute(&format!(
        "INSERT INTO tp_accounts (id, balance) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let script = c.root.join("transfer.sql");
    // Rows are locked in a random order: concurrent transfers wait for each other in
    // cycles, on one shard (PostgreSQL breaks those) or across two (pgshard does). Either
    // way the client gets 40P01, and pgbench retries the transfer.
    std::fs::write(
        &script,
        "\\set a random(1, 200)\n\\set b random(1, 200)\n\\set amt random(1, 100)\n\
         BEGIN;\n\
         UPDATE tp_accounts SET balance = balance - :amt WHERE id = :a;\n\
         UPDATE tp_accounts SET balance = balance + :amt WHERE id = :b;\n\
         COMMIT;\n",
    )
    .unwrap();
    let out = pgbench_within(
        Duration::from_secs(120),
        addr.port(),
        &[
            "-n",
            "-c",
            "32",
            "-j",
            "2",
            "-T",
            "30",
            "--max-tries",
            "50",
            "-f",
            script.to_str().unwrap(),
        ],
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let committed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(committed > 100, "{out}");
    // Directly on the shards: the total is unchanged, nothing is left prepared.
    let total: i64 = c
        .shards
        .iter()
        .map(|s| {
            c.psql(
                s.primary.port,
                "app",
                "SELECT coalesce(sum(balance), 0) FROM tp_accounts",
            )
            .unwrap()
            .parse::<i64>()
            .unwrap()
        })
        .sum();
    assert_eq!(total, 200_000);
    assert_eq!(prepared(&c), ["0", "0"]);
    let broken = sample(
        &pgshard::admin::metrics::render(&server),
        "pgshard_deadlocks_total",
        &[],
    );
    eprintln!(
        "2PC transfers: {committed} committed in 30 s by 32 clients (pgshard_deadlocks_total: {broken})"
    );
}

#[test]
fn check_says_when_a_primary_cannot_prepare() {
    let c = LocalCluster::start(ClusterOptions {
        shards: 2,
        replicas: 0,
        extra_conf: vec!["max_prepared_transactions = 0".into()],
        ..ClusterOptions::default()
    })
    .unwrap();
    let path = c.root.join("check.yaml");
    std::fs::write(
        &path,
        c.config_yaml("127.0.0.1:0", "transaction", 4) + RULES,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("max_prepared_transactions is 0").count(),
        2,
        "{text}"
    );
    let off = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&off.stdout).contains("max_prepared"));
}
