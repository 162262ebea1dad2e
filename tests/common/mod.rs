//! Test harness: one real PostgreSQL cluster per test binary, and pgshard instances over it
//! running on a runtime that lives as long as the test process.

#![allow(dead_code)]

use bytes::{BufMut, BytesMut};
use pgshard::config::Config;
use pgshard::local::{ClusterOptions, LocalCluster};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A cluster of its own, for a test that kills, restarts or reconfigures servers.
pub fn own_cluster(shards: usize, replicas: usize) -> LocalCluster {
    LocalCluster::start(ClusterOptions {
        shards,
        replicas,
        ..ClusterOptions::default()
    })
    .expect("starting local PostgreSQL")
}

/// Waits until something accepts connections at `addr` (a `pgshard serve` just started).
pub fn wait_listening(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "pgshard serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cluster shared by every test of this binary: one shard, no replicas.
pub fn cluster() -> &'static LocalCluster {
    static C: OnceLock<LocalCluster> = OnceLock::new();
    C.get_or_init(|| own_cluster(1, 0))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The YAML for a proxy over the shared cluster.
/// Besides app/app (SCRAM), it has `trusty` (trust) and `m5` (md5, password `m5pw`).
pub fn base_yaml(mode: &str, pool_size: u32) -> String {
    cluster().config_yaml("127.0.0.1:0", mode, pool_size).replace(
        "users:\n",
        "users:\n  - { name: trusty, auth: trust }\n  - { name: m5, password: m5pw, auth: md5 }\n",
    )
}

/// Starts a pgshard on a free port with this configuration; returns its address.
pub fn start_proxy_yaml(yaml: &str) -> SocketAddr {
    let cfg = Config::from_yaml(yaml).expect("valid test config");
    start_proxy(cfg)
}

pub fn start_proxy(cfg: Config) -> SocketAddr {
    start_proxy_server(cfg).0
}

/// Starts a pgshard and returns its address and its server (to reach its topology).
pub fn start_proxy_server(
    mut cfg: Config,
) -> (SocketAddr, std::sync::Arc<pgshard::frontend::Server>) {
    // PGSHARD_TEST_STATEMENT_CACHE=1 runs every transaction-mode proxy of the suite with
    // both statement caches on: a wide check that they change no answer.
    if std::env::var_os("PGSHARD_TEST_STATEMENT_CACHE").is_some()
        && cfg.pool.mode == pgshard::config::PoolMode::Transaction
    {
        cfg.pool.statement_cache.unnamed = true;
        cfg.pool.statement_cache.simple = true;
    }
    let rt = runtime();
    let _g = rt.enter();
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std.set_nonblocking(true).unwrap();
    let addr = std.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(std).unwrap();
    let server = pgshard::frontend::spawn(cfg, listener).expect("proxy starts");
    (addr, server)
}

/// A proxy in transaction mode with a pool of 10, shared by tests that need nothing special.
pub fn tx_proxy() -> SocketAddr {
    static P: OnceLock<SocketAddr> = OnceLock::new();
    *P.get_or_init(|| start_proxy_yaml(&base_yaml("transaction", 10)))
}

/// A proxy in session mode.
pub fn session_proxy() -> SocketAddr {
    static P: OnceLock<SocketAddr> = OnceLock::new();
    *P.get_or_init(|| start_proxy_yaml(&base_yaml("session", 10)))
}

pub fn conn_str(addr: SocketAddr, user: &str, password: &str, db: &str) -> String {
    format!(
        "host={} port={} user={user} password={password} dbname={db} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Connects with tokio-postgres as app/app.
pub async fn connect(addr: SocketAddr) -> tokio_postgres::Client {
    try_connect(addr, "app", "app", "app")
        .await
        .expect("connect through pgshard")
}

pub async fn try_connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&conn_str(addr, user, password, db), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects directly to the shard's primary, bypassing pgshard (for differential checks).
pub async fn connect_direct() -> tokio_postgres::Client {
    let port = cluster().shards[0].primary.port;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    connect(addr).await
}

/// Terminates, on the server at `port`, pgshard's pooled connections (those it opened,
/// not its monitor's), as a restart or `idle_session_timeout` would; returns how many.
pub async fn terminate_pool_connections(port: u16) -> i64 {
    connect(([127, 0, 0, 1], port).into())
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pgshard'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The SQLSTATE of a tokio-postgres error.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// A raw protocol client, for message sequences drivers do not produce.
pub struct Raw {
    pub s: TcpStream,
    pub buf: BytesMut,
}

impl Raw {
    /// Connects and authenticates as a trust user (`trusty` must exist in the config).
    pub async fn startup(addr: SocketAddr, user: &str, db: &str) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        r.send_startup(user, db).await;
        r
    }

    pub async fn send_startup(&mut self, user: &str, db: &str) {
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(196608);
        for (k, v) in [("user", user), ("database", db)] {
            b.put_slice(k.as_bytes());
            b.put_u8(0);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let n = b.len() as i32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        self.s.write_all(&b).await.unwrap();
    }

    pub async fn send(&mut self, data: &[u8]) {
        self.s.write_all(data).await.unwrap();
    }

    /// Reads one message: (tag, body). None on EOF.
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let n = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > n {
                    let f = self.buf.split_to(n + 1);
                    return Some((f[0], f[5..].to_vec()));
                }
            }
            let r = tokio::time::timeout(Duration::from_secs(20), self.s.read_buf(&mut self.buf))
                .await
                .expect("no answer within 20 s");
            match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads messages up to and including ReadyForQuery; returns their tags.
    pub async fn until_ready(&mut self) -> String {
        let mut tags = String::new();
        while let Some((t, _)) = self.recv().await {
            tags.push(t as char);
            if t == b'Z' {
                break;
            }
        }
        tags
    }

    /// Reads one answer up to its ReadyForQuery: its tags, with each error's SQLSTATE in
    /// parentheses and the transaction status after the final `Z` (`"E(42P01)Z I"`).
    pub async fn answer(&mut self) -> String {
        let mut out = String::new();
        while let Some((t, body)) = self.recv().await {
            out.push(t as char);
            match t {
                b'E' => out.push_str(&format!("({})", error_field(&body, b'C'))),
                b'Z' => {
                    out.push(' ');
                    out.push(body[0] as char);
                    break;
                }
                _ => {}
            }
        }
        out
    }

    /// Reads until an ErrorResponse and returns its SQLSTATE.
    pub async fn error_code(&mut self) -> Option<String> {
        while let Some((t, body)) = self.recv().await {
            if t == b'E' {
                return Some(error_field(&body, b'C'));
            }
        }
        None
    }
}

/// Sends `queries` as simple Queries in one write, as a client that does not wait for each
/// answer (tokio-postgres sends its next query once it reads an ErrorResponse, before the
/// ReadyForQuery), through `proxy` and straight to `direct`; the answers must match, in
/// order, with the transaction status each one leaves.
pub async fn pipelined_answers_match(proxy: &mut Raw, direct: &mut Raw, queries: &[&str]) {
    let batch: Vec<u8> = queries.iter().flat_map(|q| msg::query(q)).collect();
    proxy.send(&batch).await;
    direct.send(&batch).await;
    for q in queries {
        assert_eq!(proxy.answer().await, direct.answer().await, "{q}");
    }
}

/// A field of an ErrorResponse's body ("" when it has none).
pub fn error_field(body: &[u8], field: u8) -> String {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let f = body[i];
        let end = body[i + 1..].iter().position(|&c| c == 0).unwrap() + i + 1;
        if f == field {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}

/// The text values of a DataRow's body.
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut i = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
        i += 4;
        if len < 0 {
            out.push(None);
        } else {
            let end = i + len as usize;
            out.push(Some(String::from_utf8_lossy(&body[i..end]).into_owned()));
            i = end;
        }
    }
    out
}

/// Message builders for raw tests.
pub mod msg {
    use bytes::{BufMut, BytesMut};

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        b.to_vec()
    }
    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }
    pub fn query(sql: &str) -> Vec<u8> {
        frame(b'Q', &cstr(sql))
    }
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(sql));
        b.extend([0, 0]);
        frame(b'P', &b)
    }
    /// Bind with text parameters and text results.
    pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(cstr(stmt));
        b.extend([0, 0]);
        b.extend((params.len() as u16).to_be_bytes());
        for p in params {
            b.extend((p.len() as i32).to_be_bytes());
            b.extend(p.as_bytes());
        }
        b.extend([0, 0]);
        frame(b'B', &b)
    }
    /// Parse, Bind (text parameters) and Execute of the unnamed statement and portal,
    /// as libpq's PQexecParams and pgjdbc send a statement (without the Sync).
    pub fn run(sql: &str, params: &[&str]) -> Vec<u8> {
        let mut b = parse("", sql);
        b.extend(bind("", "", params));
        b.extend(execute(""));
        b
    }
    pub fn execute(portal: &str) -> Vec<u8> {
        execute_n(portal, 0)
    }
    /// Execute with a row limit.
    pub fn execute_n(portal: &str, rows: i32) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(rows.to_be_bytes());
        frame(b'E', &b)
    }
    pub fn describe_portal(name: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        b.extend(cstr(name));
        frame(b'D', &b)
    }
    pub fn describe_stmt(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        b.extend(cstr(name));
        frame(b'D', &b)
    }
    pub fn close_stmt(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        b.extend(cstr(name));
        frame(b'C', &b)
    }
    pub fn sync() -> Vec<u8> {
        frame(b'S', &[])
    }
    pub fn flush() -> Vec<u8> {
        frame(b'H', &[])
    }
    pub fn terminate() -> Vec<u8> {
        frame(b'X', &[])
    }
}

/// A two-shard cluster (no replicas), for routing tests.
pub fn cluster2() -> &'static LocalCluster {
    static C: OnceLock<LocalCluster> = OnceLock::new();
    C.get_or_init(|| own_cluster(2, 0))
}

/// Connects as the superuser straight to one server's database.
pub async fn connect_server(port: u16, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs pgbench against `port` as app/app on database `app`; panics with its output when
/// it fails, and returns that output.
pub fn pgbench(port: u16, args: &[&str]) -> String {
    pgbench_within(Duration::from_secs(600), port, args)
}

/// Runs pgbench, failing (not hanging) after `limit`: clients waiting forever (a deadlock
/// nothing breaks) fail the test.
pub fn pgbench_within(limit: Duration, port: u16, args: &[&str]) -> String {
    let mut child = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", "app")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both pipes drained as pgbench writes, so that it never blocks on a full one.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = std::io::Read::read_to_string(&mut r, &mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "pgbench {args:?} still running after {limit:?}: {}",
                out.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "pgbench {args:?}: {text}");
    text
}

/// Runs SQL with psql (unaligned, tuples only) as `user` (password `app`) on `db`; panics
/// when psql fails, and returns its trimmed output.
pub fn psql(port: u16, user: &str, db: &str, sql: &str) -> String {
    run_ok(
        std::process::Command::new("psql")
            .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", user, "-d", db, "-c", sql])
            .env("PGPASSWORD", "app"),
    )
    .trim()
    .to_string()
}

/// Runs a command; its stdout. Panics with its stderr when it fails.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A proxy whose `app` database is a server database of its own (created here), for tests
/// that must not share tables or server connections with others.
pub fn proxy_on_own_database(server_db: &str, mode: &str, pool_size: u32) -> SocketAddr {
    let c = cluster();
    c.psql(
        c.shards[0].primary.port,
        "postgres",
        &format!("CREATE DATABASE {server_db} OWNER app"),
    )
    .unwrap();
    let yaml = base_yaml(mode, pool_size).replace(
        "  - name: app\n",
        &format!("  - name: app\n    server_database: {server_db}\n"),
    );
    start_proxy_yaml(&yaml)
}

/// A three-shard cluster (no replicas), for differential tests.
pub fn cluster3() -> &'static LocalCluster {
    static C: OnceLock<LocalCluster> = OnceLock::new();
    C.get_or_init(|| own_cluster(3, 0))
}

/// The rows of a simple-query result, as text (None for NULL).
pub fn rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// A simple query's rows ([`rows`]), or its SQLSTATE.
pub async fn rows_or_sqlstate(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    c.simple_query(sql)
        .await
        .map(|m| rows(&m))
        .map_err(|e| sqlstate(&e))
}

/// Connects as app/app with extra connection parameters (`application_name=x ...`).
pub async fn connect_with(addr: SocketAddr, extra: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(
        &format!("{} {extra}", conn_str(addr, "app", "app", "app")),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c
}

/// The value of the first sample of `metric` (Prometheus text) whose line contains all of
/// `parts`.
pub fn sample(text: &str, metric: &str, parts: &[&str]) -> f64 {
    text.lines()
        .find(|l| l.starts_with(metric) && parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {metric} {parts:?} in\n{text}"))
}

/// A `pgshard serve` process, killed when dropped.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `pgshard serve` on a free port with the configuration `yaml_for(listen)` (written
/// into the cluster's directory), with the failpoint given or none, and waits until it
/// listens.
pub fn serve_process(
    c: &LocalCluster,
    yaml_for: impl FnOnce(&str) -> String,
    failpoint: Option<&str>,
) -> ServeProcess {
    let port = pgshard::local::free_port();
    let listen = format!("127.0.0.1:{port}");
    let path = c.root.join(format!("pgshard-{port}.yaml"));
    std::fs::write(&path, yaml_for(&listen)).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"));
    cmd.args(["serve", "--config"]).arg(&path);
    match failpoint {
        Some(f) => cmd.env("PGSHARD_FAILPOINT", f),
        None => cmd.env_remove("PGSHARD_FAILPOINT"),
    };
    let child = cmd.stdout(std::process::Stdio::null()).spawn().unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    wait_listening(addr);
    ServeProcess { child, addr }
}

/// A client whose notifications (channel, payload) arrive on the receiver.
pub async fn listening_client(
    addr: SocketAddr,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let (client, mut conn) =
        tokio_postgres::connect(&conn_str(addr, "app", "app", "app"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

/// The next notification, within 10 s.
pub async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification within 10 s")
        .expect("the connection is open")
}
