//! Startup, authentication, TLS and bad input: every failure is a PostgreSQL error with the
//! right SQLSTATE, and other clients keep working.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use rand::{RngExt, SeedableRng};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn yaml_with(extra: &str) -> String {
    format!("{}{extra}", base_yaml("transaction", 4))
}

#[tokio::test]
async fn unknown_database_user_and_wrong_password() {
    let addr = tx_proxy();
    let e = try_connect(addr, "app", "app", "nodb").await.err().unwrap();
    assert_eq!(sqlstate(&e), "3D000");
    let e = try_connect(addr, "nobody_here", "x", "app")
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e), "28000");
    let e = try_connect(addr, "app", "wrong", "app")
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e), "28P01");
    connect(addr).await.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn stalled_startup_times_out_with_an_error() {
    // Long enough for a real startup on a loaded machine (trust, below), short enough that
    // the three stalls take a few seconds.
    let addr = start_proxy_yaml(&yaml_with("limits: { startup_timeout_ms: 1000 }\n"));
    // Nothing at all.
    let mut r = Raw {
        s: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
    };
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    // Half a startup packet.
    let mut r = Raw {
        s: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
    };
    r.send(&[0, 0, 0, 40, 0, 3]).await;
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    // Authentication never answered.
    let mut r = Raw::startup(addr, "app", "app").await;
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    // A client that completes its startup is not cut off.
    try_connect(addr, "trusty", "unused", "app")
        .await
        .unwrap()
        .batch_execute("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn server_down_gives_08006_to_that_client_only() {
    // A port bound but not listening: connections to it are refused, and while the
    // socket lives no other process (or test) can listen there.
    let hold = tokio::net::TcpSocket::new_v4().unwrap();
    hold.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = hold.local_addr().unwrap().port();
    let yaml = base_yaml("transaction", 4).replace(
        &cluster().shards[0].primary.addr(),
        &format!("127.0.0.1:{dead}"),
    );
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let t = std::time::Instant::now();
    let e = try_connect(addr, "app", "app", "app").await.err().unwrap();
    assert_eq!(sqlstate(&e), "08006");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "fails fast, not at the checkout timeout"
    );
    // What an operator pages on.
    let m = pgshard::admin::metrics::render(&server);
    assert!(sample(&m, "pgshard_pool_connect_failures_total", &[]) >= 1.0);
    assert_eq!(
        sample(&m, "pgshard_pool_connections_opened_total", &[]),
        0.0
    );
    assert!(sample(&m, "pgshard_errors_total", &["class=\"08\""]) >= 1.0);
    connect(tx_proxy())
        .await
        .batch_execute("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn checkout_timeout_is_53300() {
    let yaml = base_yaml("transaction", 1)
        .replace("checkout_timeout_ms: 5000", "checkout_timeout_ms: 300");
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let a = connect(addr).await;
    let b = connect(addr).await;
    a.batch_execute("BEGIN; SELECT 1").await.unwrap(); // holds the only server connection
    let e = b.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    let m = pgshard::admin::metrics::render(&server);
    assert_eq!(sample(&m, "pgshard_pool_checkout_timeouts_total", &[]), 1.0);
    assert_eq!(sample(&m, "pgshard_errors_total", &["class=\"53\""]), 1.0);
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("SELECT 1").await.unwrap();
}

/// The process ids of pgshard's server connections to a server database.
async fn server_pids(direct: &tokio_postgres::Client, db: &str) -> Vec<i32> {
    let rows = direct
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'pgshard' \
             ORDER BY pid",
            &[&db],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Polls until `check` holds for the server connections' pids, or fails after 10 s.
async fn until_pids(
    direct: &tokio_postgres::Client,
    db: &str,
    what: &str,
    check: impl Fn(&[i32]) -> bool,
) -> Vec<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pids = server_pids(direct, db).await;
        if check(&pids) {
            return pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: server connections {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn pool_keeps_min_idle_and_recycles_idle_and_old_connections() {
    let c = cluster();
    let db = "pool_recycling";
    c.psql(
        c.shards[0].primary.port,
        "postgres",
        &format!("CREATE DATABASE {db} OWNER app"),
    )
    .unwrap();
    let direct = connect_server(c.shards[0].primary.port, "postgres").await;
    let yaml = base_yaml("transaction", 4)
        .replace(
            "checkout_timeout_ms: 5000",
            "checkout_timeout_ms: 5000, min_idle: 2, idle_timeout_ms: 400, max_lifetime_ms: 3000",
        )
        .replace(
            "  - name: app\n",
            &format!("  - name: app\n    server_database: {db}\n"),
        );
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());

    // min_idle: opened without any client.
    until_pids(&direct, db, "min_idle", |p| p.len() == 2).await;

    // Four clients in transactions at once need four connections...
    let clients = futures_util::future::join_all((0..4).map(|_| connect(addr))).await;
    for cl in &clients {
        cl.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    assert_eq!(server_pids(&direct, db).await.len(), 4);
    for cl in &clients {
        cl.batch_execute("COMMIT").await.unwrap();
    }
    // ...and the two beyond min_idle close once idle for idle_timeout_ms.
    let kept = until_pids(&direct, db, "idle timeout", |p| p.len() == 2).await;

    // max_lifetime_ms: both are replaced, the one in use and the idle one, and min_idle
    // still holds.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let n: i32 = clients[0].query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(n, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_pids(&direct, db, "max lifetime", |p| {
        p.len() == 2 && p.iter().all(|pid| !kept.contains(pid))
    })
    .await;
    let m = pgshard::admin::metrics::render(&server);
    let closed = |why: &str| {
        sample(
            &m,
            "pgshard_pool_connections_closed_total",
            &[&format!("reason=\"{why}\"")],
        )
    };
    assert!(closed("idle") >= 2.0, "{m}");
    assert!(closed("lifetime") >= 2.0, "{m}");
    assert_eq!(closed("broken"), 0.0);
    assert!(sample(&m, "pgshard_pool_connections_opened_total", &[]) >= 6.0);
}

async fn trust_session(addr: SocketAddr) -> Raw {
    let mut r = Raw::startup(addr, "trusty", "app").await;
    assert!(r.until_ready().await.ends_with('Z'));
    r
}

#[tokio::test]
async fn oversized_and_malformed_messages_are_fatal_errors() {
    let addr = start_proxy_yaml(&yaml_with("limits: { max_message_size: 1048576 }\n"));
    let bystander = connect(addr).await;
    // Over the limit: refused from the header alone.
    let mut r = trust_session(addr).await;
    let big = "x".repeat(2 << 20);
    r.send(&msg::query(&format!("SELECT '{big}'"))[..64]).await;
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    assert!(r.recv().await.is_none(), "connection closed after FATAL");
    // Unknown message type.
    let mut r = trust_session(addr).await;
    r.send(&[b'z', 0, 0, 0, 4]).await;
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    // Impossible length.
    let mut r = trust_session(addr).await;
    r.send(&[b'Q', 0, 0, 0, 2]).await;
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    // Parse without its terminators.
    let mut r = trust_session(addr).await;
    r.send(&[b'P', 0, 0, 0, 7, b'a', b'b', b'c']).await;
    assert_eq!(r.error_code().await.as_deref(), Some("08P01"));
    // Unsupported protocol version.
    let mut r = Raw {
        s: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
    };
    r.send(&[0, 0, 0, 8, 0, 2, 0, 0]).await;
    assert_eq!(r.error_code().await.as_deref(), Some("0A000"));
    // A message just under the limit works.
    let ok = "y".repeat(1_000_000);
    let row = bystander
        .query_one("SELECT length($1::text)", &[&ok])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1_000_000);
}

#[tokio::test]
async fn gssenc_and_ssl_requests_without_tls_are_declined() {
    let addr = tx_proxy();
    for code in [80877104i32, 80877103] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(code);
        s.write_all(&b).await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        assert_eq!(one[0], b'N');
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        r.send_startup("trusty", "app").await;
        assert!(r.until_ready().await.ends_with('Z'));
    }
    let out = std::process::Command::new("psql")
        .args(["-X", "-At", "-c", "SELECT 1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app sslmode=require",
            addr.port()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not support SSL"));
}

#[tokio::test]
async fn tls_with_psql() {
    let dir = std::env::temp_dir().join(format!("pgshard-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    openssl(
        &dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ]
        .into_iter()
        .chain(["-subj", "/CN=localhost", "-keyout", "server.key"])
        .chain(["-out", "server.crt"])
        .collect::<Vec<_>>(),
    );
    let addr = start_proxy_yaml(&yaml_with(&format!(
        "tls: {{ cert: {}, key: {} }}\n",
        cert.display(),
        key.display()
    )));
    for (mode, ssl) in [("require", "t"), ("disable", "f")] {
        let out = std::process::Command::new("psql")
            .args(["-X", "-At", "-c", "SELECT 6 * 7", "-c", "\\conninfo"])
            .arg(format!(
                "host=127.0.0.1 port={} user=app password=app dbname=app sslmode={mode}",
                addr.port()
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.starts_with("42\n"), "{text}");
        assert_eq!(text.contains("SSL connection"), ssl == "t", "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Random bytes after startup: each connection ends with an error or keeps going, never a
/// panic or a hang, and other clients are not disturbed.
#[tokio::test]
async fn fuzzed_sessions_do_not_disturb_others() {
    let addr = start_proxy_yaml(&yaml_with("limits: { max_message_size: 65536 }\n"));
    let bystander = connect(addr).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let tags = b"QPBDCEHSdcfFXzp\0";
    for round in 0..150 {
        let mut r = trust_session(addr).await;
        let mut data = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            // Mostly well-framed messages with random bodies, sometimes raw garbage.
            if rng.random_bool(0.8) {
                let body: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
                data.push(tags[rng.random_range(0..tags.len())]);
                data.extend(((body.len() + 4) as i32).to_be_bytes());
                data.extend(body);
            } else {
                data.extend((0..rng.random_range(1..30)).map(|_| rng.random::<u8>()));
            }
        }
        data.extend(msg::sync());
        r.send(&data).await;
        // Either a ReadyForQuery arrives or the connection closes; both within the timeout.
        // (A message whose declared length was not all sent is legitimately waited for,
        // as PostgreSQL would: such a connection is just dropped.)
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            let mut seen = 0;
            while let Some((t, _)) = r.recv().await {
                seen += 1;
                if t == b'Z' || seen > 1000 {
                    break;
                }
            }
        })
        .await;
        if round % 25 == 0 {
            let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
        }
    }
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn check_command_validates_and_prints_topology() {
    let dir = std::env::temp_dir().join(format!("pgshard-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, base_yaml("transaction", 4)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("shard 0: primary 127.0.0.1:"), "{text}");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, base_yaml("transaction", 0)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool.size: must be at least 1"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn scram_user_with_a_stored_verifier() {
    let verifier = postgres_protocol::password::scram_sha_256(b"v3r1f13d");
    let yaml = base_yaml("transaction", 4).replace(
        "users:\n",
        &format!("users:\n  - {{ name: veri, password: '{verifier}' }}\n"),
    );
    let addr = start_proxy_yaml(&yaml);
    let c = try_connect(addr, "veri", "v3r1f13d", "app").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    let e = try_connect(addr, "veri", "nope", "app")
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn unix_domain_sockets_to_clients_and_servers() {
    let dir = std::env::temp_dir().join(format!("pgshard-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let primary = &cluster().shards[0].primary;
    // pgshard reaches the server on its socket and listens on one of its own; the monitor
    // checks the node on the socket too.
    let yaml = format!("unix_socket_dir: {d}\n{}", base_yaml("transaction", 4))
        .replace(&primary.addr(), &primary.socket_addr())
        .replace(
            "    default_shard: 0\n",
            "    default_shard: 0\n    failover: { enabled: false, check_interval_ms: 100 }\n",
        );
    assert!(yaml.contains(&format!("primary: {}", primary.socket_addr())));
    // `pgshard check` reaches the primary on its socket as the pools do.
    let path = dir.join("check.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let out = run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_pgshard"))
            .args(["check", "--config"])
            .arg(&path),
    );
    assert!(
        out.contains(&format!(
            "primary {}: reachable, max_prepared_transactions",
            primary.socket_addr()
        )),
        "{out}"
    );
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let socket = pgshard::net::socket_path(d, addr.port());
    assert!(socket.exists(), "{} is missing", socket.display());

    // tokio-postgres over pgshard's socket, simple and extended; the server sees a Unix
    // socket client (no server address).
    let conn = format!(
        "host={d} port={} user=app password=app dbname=app",
        addr.port()
    );
    let (c, task) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("connect on pgshard's socket");
    tokio::spawn(task);
    let msgs = c
        .simple_query("SELECT inet_server_addr() IS NULL")
        .await
        .unwrap();
    let on_socket = msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(
        on_socket.as_deref(),
        Some("t"),
        "pgshard -> server on the socket"
    );
    let row = c.query_one("SELECT $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    // A cancel request arrives on pgshard's socket and goes to the server on its socket.
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled, not slept")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&e), "57014");

    // psql with -h <dir>, as on a database host.
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-At",
            "-h",
            d,
            "-p",
            &addr.port().to_string(),
            "-U",
            "app",
            "app",
        ])
        .args([
            "-c",
            "SELECT 'via ' || coalesce(inet_client_addr()::text, 'socket')",
        ])
        .env("PGPASSWORD", "app")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "via socket",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No TLS on a Unix socket, as in PostgreSQL: SSLRequest is declined.
    let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(one[0], b'N');

    // The monitor checked the node on its socket.
    until_checked(&server).await;

    // At shutdown the socket file goes with the listener.
    server.shut_down();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "socket file left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs openssl in `dir`; panics with its stderr when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    run_ok(
        std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args),
    );
}

/// A CA (`<name>.crt`/`.key`) in `dir`.
fn test_ca(dir: &std::path::Path, name: &str) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ]
        .into_iter()
        .chain([
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
        ])
        .chain(["-addext", "basicConstraints=critical,CA:TRUE"])
        .chain(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .collect::<Vec<_>>(),
    );
}

/// A certificate `<name>.crt`/`.key` for `cn`, issued by the CA `ca`, with these
/// extensions (openssl's `-extfile` lines).
fn test_cert(dir: &std::path::Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let (crt, key, csr, extfile) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
        ]
        .into_iter()
        .chain(["-keyout", &key, "-out", &csr])
        .collect::<Vec<_>>(),
    );
    openssl(
        dir,
        &["x509", "-req", "-in", &csr, "-days", "2", "-CAcreateserial"]
            .into_iter()
            .chain(["-CA", &format!("{ca}.crt"), "-CAkey", &format!("{ca}.key")])
            .chain(["-extfile", &extfile, "-out", &crt])
            .collect::<Vec<_>>(),
    );
}

/// A server certificate issued by `ca` for the IP address `ip`.
fn test_server_cert(dir: &std::path::Path, ca: &str, name: &str, ip: &str) {
    let ext =
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n");
    test_cert(dir, ca, name, "server", &ext);
}

/// Waits until the monitor has checked the shard's primary (as a primary).
async fn until_checked(server: &pgshard::frontend::Server) {
    let db = server.state.load().topology.databases["app"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while db.shards[0].view().nodes[0].in_recovery != Some(false) {
        assert!(std::time::Instant::now() < deadline, "node never checked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the server connection behind pgshard is encrypted, or why there is none.
async fn server_ssl(addr: SocketAddr) -> Result<bool, String> {
    let describe = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    };
    let c = try_connect(addr, "app", "app", "app")
        .await
        .map_err(describe)?;
    let row = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(describe)?;
    Ok(row.get(0))
}

#[tokio::test]
async fn tls_to_the_servers() {
    let c = own_cluster(1, 0);
    let dir = c.root.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    test_ca(&dir, "ca");
    test_ca(&dir, "other-ca");
    test_server_cert(&dir, "ca", "right", "127.0.0.1");
    test_server_cert(&dir, "ca", "elsewhere", "127.0.0.2");
    // The server's key must belong to the server's user, unreadable by others.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let owner = std::fs::metadata(&c.root).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        std::os::unix::fs::chown(&p, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let primary = &c.shards[0].primary;
    let serve_cert = |name: &str| {
        c.set_and_reload(
            primary,
            "ssl_cert_file",
            &format!("{}/{name}.crt", dir.display()),
        )
        .unwrap();
        c.set_and_reload(
            primary,
            "ssl_key_file",
            &format!("{}/{name}.key", dir.display()),
        )
        .unwrap();
        c.set_and_reload(primary, "ssl", "on").unwrap();
    };
    serve_cert("right");
    let yaml = |tls: &str| {
        format!(
            "server_tls: {tls}\n{}",
            c.config_yaml("127.0.0.1:0", "transaction", 4)
        )
        .replace(
            "    default_shard: 0\n",
            "    default_shard: 0\n    failover: { enabled: false, check_interval_ms: 100 }\n",
        )
    };
    let proxy =
        |tls: &str| start_proxy_server(pgshard::config::Config::from_yaml(&yaml(tls)).unwrap());
    let ca = dir.join("ca.crt");
    let other = dir.join("other-ca.crt");
    let full = format!("{{ mode: verify-full, ca: {} }}", ca.display());

    // Verified, and the monitor's checks go over TLS with the same verification.
    let (addr, server) = proxy(&full);
    assert_eq!(server_ssl(addr).await, Ok(true));
    until_checked(&server).await;
    // A pooled TLS connection the server closed while idle is not handed out.
    assert_eq!(terminate_pool_connections(primary.port).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server_ssl(addr).await, Ok(true));
    // Pool connections closed (here idle past idle_timeout_ms) end with a Terminate and
    // TLS's close_notify: the server logs no broken connection.
    let log = c.root.join("shard0-primary.log");
    let broken = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("unexpected eof") || l.contains("could not receive data"))
            .count()
    };
    let before = broken();
    let idle = yaml(&full).replace(
        "checkout_timeout_ms: 5000 }",
        "checkout_timeout_ms: 5000, idle_timeout_ms: 200 }",
    );
    let (idle_addr, idle_server) =
        start_proxy_server(pgshard::config::Config::from_yaml(&idle).unwrap());
    assert_eq!(server_ssl(idle_addr).await, Ok(true));
    let open = || {
        sample(
            &pgshard::admin::metrics::render(&idle_server),
            "pgshard_pool_connections",
            &["state=\"idle\""],
        )
    };
    let start = std::time::Instant::now();
    while open() > 0.0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open(), 0.0, "the idle connection was not closed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        broken(),
        before,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // prefer (the default) encrypts when the server offers it; disable does not.
    assert_eq!(server_ssl(proxy("{}").0).await, Ok(true));
    assert_eq!(server_ssl(proxy("{ mode: disable }").0).await, Ok(false));

    // A certificate from another CA: no server connection (08006), no health check.
    let (addr, server) = proxy(&format!("{{ mode: verify-ca, ca: {} }}", other.display()));
    let e = server_ssl(addr).await.unwrap_err();
    assert!(e.contains("08006") && e.contains("certificate"), "{e}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = server.state.load().topology.databases["app"].clone();
    let v = db.shards[0].view();
    assert!(
        v.nodes[0].failures > 0 && v.nodes[0].in_recovery.is_none(),
        "{:?}",
        v.nodes[0]
    );
    // require with a CA checks the chain, as libpq.
    let e = server_ssl(proxy(&format!("{{ mode: require, ca: {} }}", other.display())).0)
        .await
        .unwrap_err();
    assert!(e.contains("certificate"), "{e}");

    // A certificate for another address: verify-full refuses it, verify-ca takes it.
    serve_cert("elsewhere");
    let e = server_ssl(proxy(&full).0).await.unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    let ca_only = format!("{{ mode: verify-ca, ca: {} }}", ca.display());
    assert_eq!(server_ssl(proxy(&ca_only).0).await, Ok(true));

    // A server that authenticates app by certificate: pgshard presents its client
    // certificate (the monitor, connecting as app too, as well).
    test_cert(
        &dir,
        "ca",
        "client",
        "app",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    );
    let hba = primary.data.join("pg_hba.conf");
    let plain_hba = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl all app 127.0.0.1/32 cert\n{plain_hba}"),
    )
    .unwrap();
    c.set_and_reload(primary, "ssl_ca_file", &ca.display().to_string())
        .unwrap();
    let with_cert = format!(
        "{{ mode: verify-ca, ca: {}, cert: {}, key: {} }}",
        ca.display(),
        dir.join("client.crt").display(),
        dir.join("client.key").display()
    );
    let (addr, server) = proxy(&with_cert);
    assert_eq!(server_ssl(addr).await, Ok(true));
    until_checked(&server).await;
    let e = server_ssl(proxy(&ca_only).0).await.unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    std::fs::write(&hba, plain_hba).unwrap();

    // Without TLS on the server: prefer falls back to plain, require refuses.
    c.set_and_reload(primary, "ssl", "off").unwrap();
    assert_eq!(server_ssl(proxy("{ mode: prefer }").0).await, Ok(false));
    let e = server_ssl(proxy("{ mode: require }").0).await.unwrap_err();
    assert!(e.contains("does not support TLS"), "{e}");
}
