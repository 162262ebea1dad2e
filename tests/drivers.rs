//! Real drivers through pgshard, compared with the same driver on one plain PostgreSQL:
//! asyncpg, psycopg 3 and the SQLAlchemy 2 ORM (Python), node-postgres with pg-cursor
//! (Node.js) and pgjdbc (Java) each run a
//! script of their common usage (tests/drivers/) against a two-shard pgshard and against a
//! plain database; the outputs must be the same line for line. `scripts/test` installs the
//! drivers.

mod common;

use common::*;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tables the scripts create, sharded by `id` (each driver has its own).
const RULES: &str = "    sharded_tables:
      - { table: asyncpg_items, column: id, method: hash }
      - { table: node_items, column: id, method: hash }
      - { table: jdbc_items, column: id, method: hash }
      - { table: psycopg_items, column: id, method: hash }
      - { table: sqlalchemy_customers, column: id, method: hash }
      - { table: sqlalchemy_orders, column: customer_id, method: hash }
";

/// A small pool (three server connections per shard for four drivers at once), so that
/// server connections pass between clients often.
fn proxy() -> SocketAddr {
    static P: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 3);
        start_proxy_yaml(&format!("{yaml}{RULES}"))
    })
}

/// The port of the plain database (`plain_<driver>` on the first shard's server; a
/// database per driver, so that the drivers' tests run side by side).
fn plain(driver: &str) -> (u16, String) {
    let port = cluster2().shards[0].primary.port;
    let db = format!("plain_{driver}");
    cluster2()
        .psql(port, "postgres", &format!("CREATE DATABASE {db} OWNER app"))
        .unwrap();
    (port, db)
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Runs `cmd` with `url` appended; its standard output (it must succeed and say `done`
/// within two minutes: a client waiting forever on pgshard fails the test).
fn run(cmd: &[&str], url: &str) -> String {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .arg(url)
        .current_dir(dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs the drivers)", cmd[0]));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.is_some_and(|s| s.success()) && stdout.ends_with("done\n"),
        "{cmd:?} {url} ({}): {stdout}{stderr}",
        if status.is_none() {
            "still running after 2 minutes"
        } else {
            "failed"
        }
    );
    stdout
}

/// The script's output through pgshard equals its output on the plain database (which is
/// returned).
fn same_through_pgshard(driver: &str, cmd: &[&str], url: impl Fn(u16, &str) -> String) -> String {
    let (port, db) = plain(driver);
    let expected = run(cmd, &url(port, &db));
    let got = run(cmd, &url(proxy().port(), "app"));
    for (i, (a, b)) in got.lines().zip(expected.lines()).enumerate() {
        assert_eq!(a, b, "{driver}, line {}: through pgshard vs plain", i + 1);
    }
    assert_eq!(got.lines().count(), expected.lines().count(), "{driver}");
    got
}

#[test]
fn asyncpg() {
    same_through_pgshard("asyncpg", &["python3", "asyncpg_client.py"], |port, db| {
        format!("postgresql://app:app@127.0.0.1:{port}/{db}")
    });
}

#[test]
fn node_postgres() {
    same_through_pgshard("node", &["node", "node_client.js"], |port, db| {
        format!("postgresql://app:app@127.0.0.1:{port}/{db}")
    });
}

#[test]
fn pgjdbc() {
    same_through_pgshard(
        "jdbc",
        &[
            "java",
            "-cp",
            "/usr/share/java/postgresql.jar",
            "JdbcClient.java",
        ],
        |port, db| format!("jdbc:postgresql://127.0.0.1:{port}/{db}?user=app&password=app"),
    );
}

#[test]
fn psycopg() {
    same_through_pgshard("psycopg", &["python3", "psycopg_client.py"], |port, db| {
        format!("host=127.0.0.1 port={port} user=app password=app dbname={db}")
    });
}

#[test]
fn sqlalchemy() {
    let out = same_through_pgshard(
        "sqlalchemy",
        &["python3", "sqlalchemy_client.py"],
        |port, db| format!("app:app@127.0.0.1:{port}/{db}"),
    );
    // Every step works (on plain PostgreSQL too): none is an error on both sides.
    assert!(!out.contains(": error"), "{out}");
    assert!(out.contains("duplicate key: ('23505', 30)"), "{out}");
}
