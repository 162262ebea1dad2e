//! Keys the shards generate (`generate_keys`): INSERTs that leave out the shard key, over
//! two real shards, with `pgshard keys` installing and checking the setup.

mod common;

use common::*;
use pgshard::sharding::hash::{HashKey, partition_of};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

const RULES: &str = "    sharded_tables:
      - { table: tickets, column: id, method: hash, generate_keys: true }
      - { table: users, column: id, method: hash }
";

const SCHEMA: &str = "
CREATE TABLE tickets (id bigserial PRIMARY KEY, title text NOT NULL DEFAULT 'untitled');
CREATE TABLE users (id bigint PRIMARY KEY, name text);
";

fn ports() -> [u16; 2] {
    let c = cluster2();
    [c.shards[0].primary.port, c.shards[1].primary.port]
}

/// The configuration file, written into the cluster's directory.
fn config_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let c = cluster2();
        let path = c.root.join("keys.yaml");
        let yaml = c.config_yaml("127.0.0.1:0", "transaction", 8);
        std::fs::write(&path, format!("{yaml}{RULES}")).unwrap();
        path
    })
}

/// `pgshard keys --config FILE <args>`: (success, stdout + stderr).
fn keys_command(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .arg("keys")
        .arg("--config")
        .arg(config_path())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A proxy over the two shards, the schema created through it, and the keys checked
/// (not ready: a plain bigserial) and then installed with `pgshard keys --apply`.
async fn setup() -> SocketAddr {
    static P: OnceLock<SocketAddr> = OnceLock::new();
    static INIT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let addr =
        *P.get_or_init(|| start_proxy_yaml(&std::fs::read_to_string(config_path()).unwrap()));
    INIT.get_or_init(|| async {
        connect(addr).await.batch_execute(SCHEMA).await.unwrap();
        let (ok, out) = keys_command(&[]);
        assert!(!ok, "{out}");
        assert!(
            out.contains("NOT READY database app shard 0")
                && out.contains("tickets.id: its default is nextval('tickets_id_seq'::regclass)"),
            "{out}"
        );
        // Before the setup, rows without keys are refused: the table's own bigserial
        // default would store them wherever its key does not belong.
        let c = connect(addr).await;
        let e = c
            .batch_execute("INSERT INTO tickets (title) VALUES ('too early')")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{e:?}");
        assert!(
            e.as_db_error().unwrap().message().contains("pgshard keys"),
            "{e:?}"
        );
        assert!(tickets().await.is_empty());
        let (ok, out) = keys_command(&["--apply"]);
        assert!(ok, "{out}");
        for s in 0..2 {
            assert!(
                out.contains(&format!("database app shard {s} tickets.id: keys ready")),
                "{out}"
            );
        }
        // Installing again changes nothing and still succeeds.
        let (ok, out) = keys_command(&["--apply"]);
        assert!(ok, "{out}");
    })
    .await;
    addr
}

/// Every ticket on the shards: (shard, id, title).
async fn tickets() -> Vec<(usize, i64, String)> {
    let mut out = Vec::new();
    for (s, port) in ports().into_iter().enumerate() {
        for r in connect_server(port, "app")
            .await
            .query("SELECT id, title FROM tickets", &[])
            .await
            .unwrap()
        {
            out.push((s, r.get(0), r.get(1)));
        }
    }
    out
}

#[tokio::test]
async fn key_shard_is_postgres_hash_partitioning() {
    setup().await;
    let d = connect_server(ports()[0], "app").await;
    d.batch_execute("CREATE TABLE IF NOT EXISTS hp (k bigint) PARTITION BY HASH (k)")
        .await
        .unwrap();
    let keys: Vec<i64> = [0, 1, -1, 42, i64::MAX, i64::MIN, 1 << 40, -(1 << 35) - 7]
        .into_iter()
        .chain((1..200).map(|i| i * 7919 - 500_000))
        .collect();
    for shards in 1..=5i32 {
        for &k in &keys {
            let r = d
                .query_one(
                    "SELECT pgshard.key_shard($1, $2),
                            satisfies_hash_partition('hp'::regclass, $2, pgshard.key_shard($1, $2), $1)",
                    &[&k, &shards],
                )
                .await
                .unwrap();
            let got: i32 = r.get(0);
            assert_eq!(
                got as u64,
                partition_of(&HashKey::Int(k), shards as u64),
                "key {k}, {shards} shards"
            );
            assert!(r.get::<_, bool>(1), "PostgreSQL agrees on key {k}");
        }
    }
}

#[tokio::test]
async fn inserts_without_the_key_get_one_from_their_shard() {
    let addr = setup().await;
    let c = connect(addr).await;
    let mut returned = Vec::new();
    // Simple protocol, one row at a time, with RETURNING.
    for i in 0..10 {
        let msgs = c
            .simple_query(&format!(
                "INSERT INTO tickets (title) VALUES ('simple {i}') RETURNING id"
            ))
            .await
            .unwrap();
        returned.push(rows(&msgs)[0][0].as_ref().unwrap().parse::<i64>().unwrap());
    }
    // Extended protocol with parameters (unnamed and prepared statements).
    for i in 0..10 {
        let r = c
            .query_one(
                "INSERT INTO tickets (title) VALUES ($1) RETURNING id",
                &[&format!("extended {i}")],
            )
            .await
            .unwrap();
        returned.push(r.get(0));
    }
    let st = c
        .prepare("INSERT INTO tickets (id, title) VALUES (DEFAULT, $1) RETURNING id")
        .await
        .unwrap();
    for i in 0..10 {
        returned.push(
            c.query_one(&st, &[&format!("prepared {i}")])
                .await
                .unwrap()
                .get(0),
        );
    }
    // Several rows at once, DEFAULT VALUES, and rows made by a query.
    let msgs = c
        .simple_query(
            "INSERT INTO tickets (title) VALUES ('multi a'), ('multi b'), ('multi c') RETURNING id",
        )
        .await
        .unwrap();
    returned.extend(
        rows(&msgs)
            .iter()
            .map(|r| r[0].as_ref().unwrap().parse::<i64>().unwrap()),
    );
    let r = c
        .query_one("INSERT INTO tickets DEFAULT VALUES RETURNING id", &[])
        .await
        .unwrap();
    returned.push(r.get(0));
    let n = c
        .execute(
            "INSERT INTO tickets (title) SELECT 'series ' || g FROM generate_series(1, 20) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 20);
    // Without a column list: DEFAULT for the key, and keys given by the rows of a
    // SELECT (each on its key's shard, which the shard's CHECK constraint also demands).
    let r = c
        .query_one(
            "INSERT INTO tickets VALUES (DEFAULT, 'unlisted default') RETURNING id",
            &[],
        )
        .await
        .unwrap();
    returned.push(r.get(0));
    for s in [0u64, 0, 1, 1, 0, 1] {
        let key = (50_000i64..)
            .find(|k| partition_of(&HashKey::Int(*k), 2) == s && !returned.contains(k))
            .unwrap();
        c.batch_execute(&format!(
            "INSERT INTO tickets SELECT {key}, 'unlisted select'"
        ))
        .await
        .unwrap();
        returned.push(key);
    }
    // psql, as a user would.
    let id = psql(
        addr.port(),
        "app",
        "app",
        "INSERT INTO tickets (title) VALUES ('psql') RETURNING id",
    );
    returned.push(id.lines().next().unwrap().parse().unwrap());

    let all = tickets().await;
    let ids: HashSet<i64> = all.iter().map(|t| t.1).collect();
    assert_eq!(ids.len(), all.len(), "keys are unique over the shards");
    for id in &returned {
        assert!(ids.contains(id), "returned key {id} is stored");
    }
    for (s, id, title) in &all {
        assert_eq!(
            partition_of(&HashKey::Int(*id), 2),
            *s as u64,
            "ticket {id} ({title}) is on the shard its key hashes to"
        );
    }
    let per_shard = |s: usize| all.iter().filter(|t| t.0 == s).count();
    assert!(
        per_shard(0) >= 5 && per_shard(1) >= 5,
        "INSERTs take the shards in turn: {} and {}",
        per_shard(0),
        per_shard(1)
    );
    // One statement's rows stay together: they were made on one shard.
    let shard_of = |title: &str| all.iter().find(|t| t.2 == title).unwrap().0;
    assert_eq!(shard_of("multi a"), shard_of("multi c"));
    let series: HashSet<usize> = all
        .iter()
        .filter(|t| t.2.starts_with("series "))
        .map(|t| t.0)
        .collect();
    assert_eq!(series.len(), 1);
    // And they read back through pgshard like any row, by key.
    for id in returned.iter().take(5) {
        let r = c
            .query_one("SELECT title FROM tickets WHERE id = $1", &[id])
            .await
            .unwrap();
        assert!(!r.get::<_, String>(0).is_empty());
    }
}

#[tokio::test]
async fn a_transaction_keeps_its_rows_on_its_shard() {
    let addr = setup().await;
    let c = connect(addr).await;
    // A user's shard, then a ticket without a key: the ticket joins that shard, with no
    // second shard and no two-phase commit (max_prepared_transactions is 0 here). In one
    // query string and in separate statements.
    for user in [3i64, 4, 6, 13, 14, 16] {
        let home = partition_of(&HashKey::Int(user), 2) as usize;
        let title = format!("for user {user}");
        let statements = [
            "BEGIN".to_string(),
            format!("INSERT INTO users (id, name) VALUES ({user}, 'u{user}')"),
            format!("INSERT INTO tickets (title) VALUES ('{title}')"),
            "COMMIT".to_string(),
        ];
        if user < 10 {
            c.batch_execute(&statements.join("; ")).await.unwrap();
        } else {
            for st in &statements {
                c.batch_execute(st).await.unwrap();
            }
        }
        let t = tickets().await;
        let (s, ..) = t.iter().find(|t| t.2 == title).unwrap();
        assert_eq!(*s, home, "{title}");
    }
    // The same in the extended protocol, inside an explicit transaction.
    let mut tx_client = connect(addr).await;
    let tx = tx_client.transaction().await.unwrap();
    tx.execute("INSERT INTO users (id, name) VALUES ($1, 'x')", &[&5i64])
        .await
        .unwrap();
    tx.execute("INSERT INTO tickets (title) VALUES ($1)", &[&"tx ext"])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let t = tickets().await;
    assert_eq!(
        t.iter().find(|t| t.2 == "tx ext").unwrap().0 as u64,
        partition_of(&HashKey::Int(5), 2)
    );
}

#[tokio::test]
async fn what_cannot_be_placed_is_refused() {
    let addr = setup().await;
    let c = connect(addr).await;
    let on = |s: u64| {
        (10_000..)
            .find(|k| partition_of(&HashKey::Int(*k), 2) == s)
            .unwrap()
    };
    for (sql, needle) in [
        (
            "INSERT INTO users (name) VALUES ('no key')",
            "set generate_keys",
        ),
        (
            "INSERT INTO users DEFAULT VALUES",
            "must give its shard key",
        ),
        (
            "INSERT INTO tickets (id, title) VALUES (DEFAULT, 'a'), (7, 'b')",
            "in some rows and DEFAULT in others",
        ),
        (
            "INSERT INTO tickets (title) SELECT name FROM users",
            "reads sharded tables",
        ),
        (
            "WITH u AS (SELECT id FROM users WHERE id = 1) INSERT INTO tickets (title) SELECT 'u' FROM u",
            "cannot be part of a statement that needs other shards",
        ),
        (
            "WITH t AS (INSERT INTO users (name) VALUES ('cte') RETURNING id) SELECT * FROM t",
            "run it on its own",
        ),
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        assert!(
            e.as_db_error().unwrap().message().contains(needle),
            "{sql}: {e:?}"
        );
    }
    // Two key-less INSERTs in one string go to one shard together.
    c.batch_execute(
        "INSERT INTO tickets (title) VALUES ('pair 1'); INSERT INTO tickets (title) VALUES ('pair 2')",
    )
    .await
    .unwrap();
    // In a string over several shards, statements run one by one: the rows go to the shard
    // the string is on when their INSERT runs.
    c.batch_execute(&format!(
        "INSERT INTO users (id) VALUES ({}); INSERT INTO users (id) VALUES ({}); INSERT INTO tickets (title) VALUES ('after 1')",
        on(0),
        on(1)
    ))
    .await
    .unwrap();
    let t = tickets().await;
    let s = |title: &str| t.iter().find(|t| t.2 == title).unwrap().0;
    assert_eq!(s("pair 1"), s("pair 2"));
    assert_eq!(s("after 1"), 1);
    // The CHECK constraint refuses a row whose key belongs to the other shard, whoever
    // sends it there.
    let e = c
        .batch_execute(&format!(
            "/* pgshard: shard=0 */ INSERT INTO tickets (id, title) VALUES ({}, 'misplaced')",
            on(1)
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514", "{e}");
}

#[tokio::test]
async fn check_reports_the_keys_and_sql_prints_them() {
    setup().await;
    let out = run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"))
            .args(["check", "--config"])
            .arg(config_path()),
    );
    assert!(
        out.contains("database app shard 1 tickets.id: keys ready"),
        "{out}"
    );
    let (ok, sql) = keys_command(&["--sql"]);
    assert!(ok, "{sql}");
    assert!(
        sql.contains("-- database app shard 1")
            && sql.contains("pgshard.next_key('\"tickets_id_pgshard_seq\"'::regclass, 1, 2)")
            && sql.contains("CHECK (pgshard.key_shard(\"id\", 2) = 1) NOT VALID"),
        "{sql}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_keys_avoid_a_shard_without_primary() {
    let mut c = own_cluster(2, 1);
    let path = c.root.join("keys.yaml");
    let yaml = c.config_yaml("127.0.0.1:0", "transaction", 4)
        + "    failover: { enabled: false, user: postgres, check_interval_ms: 100 }\n"
        + RULES;
    std::fs::write(&path, &yaml).unwrap();
    let addr = start_proxy_yaml(&yaml);
    let app = connect(addr).await;
    app.batch_execute(SCHEMA).await.unwrap();
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"))
            .args(["keys", "--apply", "--config"])
            .arg(&path),
    );
    c.shards[1].primary.stop_with(libc::SIGKILL);
    // Until the monitor sees shard 1 down, its turns fail; then every row goes to shard 0.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1 is still tried"
        );
        match app
            .query_one(
                "INSERT INTO tickets (title) VALUES ('up') RETURNING id",
                &[],
            )
            .await
        {
            Ok(r) => {
                assert_eq!(partition_of(&HashKey::Int(r.get(0)), 2), 0);
                in_a_row += 1;
            }
            Err(e) => {
                // Connections to the killed server end with 57P01; new ones fail with 08006.
                assert!(["08006", "57P01"].contains(&sqlstate(&e).as_str()), "{e:?}");
                in_a_row = 0;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
