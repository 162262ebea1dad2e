//! Operating pgshard: the admin console (through psql), the Prometheus endpoint, PAUSE /
//! RESUME, BAN / UNBAN, FAILOVER, SWITCHOVER and RELOAD, against running clusters.

mod common;

use common::*;
use pgshard::local::LocalCluster;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The YAML of a proxy with an admin console and a metrics endpoint on free ports.
fn yaml(c: &LocalCluster, extra: &str) -> String {
    c.config_yaml("127.0.0.1:0", "transaction", 4).replace(
        "users:\n",
        "admin: { listen: '127.0.0.1:0', users: [admin] }\nmetrics: { listen: '127.0.0.1:0' }\nusers:\n  - { name: admin, password: app }\n",
    ) + "    failover: { user: postgres, check_interval_ms: 200 }\n"
        + extra
}

/// As [`yaml`], with the monitor checking but not failing over by itself.
fn yaml_manual_failover(c: &LocalCluster) -> String {
    yaml(c, "").replace(
        "failover: { user: postgres,",
        "failover: { enabled: false, user: postgres,",
    )
}

struct Proxy {
    addr: SocketAddr,
    admin: u16,
    metrics: SocketAddr,
    server: Arc<pgshard::frontend::Server>,
}

fn proxy(yaml: &str) -> Proxy {
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(yaml).unwrap());
    let (admin, metrics) = server.side_addrs();
    Proxy {
        addr,
        admin: admin.unwrap().port(),
        metrics: metrics.unwrap(),
        server,
    }
}

/// psql on the admin console: (success, stdout, stderr).
fn admin_try(port: u16, user: &str, db: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", user, "-d", db, "-c", sql])
        .env("PGPASSWORD", "app")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn admin(port: u16, sql: &str) -> String {
    let (ok, out, err) = admin_try(port, "admin", "pgshard", sql);
    assert!(ok, "{sql}: {err}");
    out
}

/// GET /metrics.
async fn metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    body
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn console_shows_everything_and_metrics_move_with_traffic() {
    let c = own_cluster(1, 1);
    let p = proxy(&yaml(&c, "    read_from: replicas\n"));
    let primary = c.shards[0].primary.addr();
    let replica = c.shards[0].replicas[0].addr();
    let app = connect(p.addr).await;
    app.batch_execute("CREATE TABLE t_admin (x int)")
        .await
        .unwrap();

    let shards = admin(p.admin, "SHOW SHARDS");
    assert!(
        shards.starts_with(&format!("app|0|{primary}|{replica} (")),
        "{shards}"
    );
    wait_until("both nodes up", async || {
        admin(p.admin, "SHOW SERVERS")
            .lines()
            .all(|l| l.contains("|up|"))
    })
    .await;
    let servers = admin(p.admin, "SHOW SERVERS");
    assert!(
        servers.contains(&format!("{primary}|primary|up|1|")),
        "{servers}"
    );
    assert!(
        servers.contains(&format!("{replica}|replica|up|")),
        "{servers}"
    );
    assert!(admin(p.admin, "SHOW VERSION").starts_with("pgshard "));
    let cfg = admin(p.admin, "SHOW CONFIG");
    assert!(
        cfg.contains("databases[0].server_password|********"),
        "{cfg}"
    );
    assert!(
        !cfg.contains("|app\n") || !cfg.contains("password|app"),
        "{cfg}"
    );
    assert!(admin(p.admin, "SHOW POOLS").contains(&format!("{primary}|app|app|4|")));

    // Traffic moves the statistics and the metrics.
    let before = admin(p.admin, "SHOW STATS");
    let q0: u64 = before.split('|').nth(2).unwrap().parse().unwrap();
    for i in 0..10 {
        app.execute("INSERT INTO t_admin VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let _ = app.batch_execute("SELECT 1/0").await.unwrap_err();
    let after = admin(p.admin, "SHOW STATS");
    let q1: u64 = after.split('|').nth(2).unwrap().parse().unwrap();
    assert!(q1 >= q0 + 11, "{before} -> {after}");
    let m = metrics(p.metrics).await;
    assert!(sample(&m, "pgshard_queries_total", &["shard=\"0\""]) >= 11.0);
    assert_eq!(sample(&m, "pgshard_errors_total", &["class=\"22\""]), 1.0);
    assert_eq!(sample(&m, "pgshard_node_up", &[&primary]), 1.0);
    assert_eq!(sample(&m, "pgshard_node_primary", &[&primary]), 1.0);
    assert_eq!(sample(&m, "pgshard_node_fenced", &[&replica]), 0.0);
    assert!(sample(&m, "pgshard_query_duration_seconds_count", &["shard=\"0\""]) >= 11.0);
    assert!(m.contains("pgshard_pool_checkout_wait_seconds_bucket"));
    assert!(m.contains("# TYPE pgshard_replication_lag_bytes gauge"));
    assert!(sample(&m, "pgshard_clients_connected", &[]) >= 1.0);

    // Clients, with their transaction state.
    app.batch_execute("BEGIN; INSERT INTO t_admin VALUES (99)")
        .await
        .unwrap();
    let clients = admin(p.admin, "SHOW CLIENTS");
    assert!(clients.contains("|app|app|in transaction|"), "{clients}");
    app.batch_execute("COMMIT").await.unwrap();

    // Errors a client can make.
    let (ok, _, err) = admin_try(p.admin, "admin", "pgshard", "SHOW NONSENSE");
    assert!(
        !ok && err.contains("unknown admin command") && err.contains("SHOW SHARDS"),
        "{err}"
    );
    let (ok, _, err) = admin_try(p.admin, "app", "pgshard", "SHOW SHARDS");
    assert!(!ok && err.contains("not an admin user"), "{err}");
    let (ok, _, err) = admin_try(p.admin, "admin", "app", "SHOW SHARDS");
    assert!(!ok && err.contains("pgshard"), "{err}");
    let (ok, _, err) = admin_try(p.admin, "admin", "pgshard", "FAILOVER 7");
    assert!(!ok && err.contains("does not exist"), "{err}");

    // BAN a replica: reads go to the primary; UNBAN: back on the replica.
    wait_until("reads on the replica", async || {
        rows(
            &app.simple_query("SELECT pg_is_in_recovery()::text")
                .await
                .unwrap(),
        )[0][0]
            .as_deref()
            == Some("true")
    })
    .await;
    admin(p.admin, &format!("BAN {replica}"));
    for _ in 0..5 {
        let r = rows(
            &app.simple_query("SELECT pg_is_in_recovery()::text")
                .await
                .unwrap(),
        );
        assert_eq!(r[0][0].as_deref(), Some("false"));
    }
    let (ok, _, err) = admin_try(p.admin, "admin", "pgshard", &format!("BAN {primary}"));
    assert!(!ok && err.contains("FAILOVER first"), "{err}");
    admin(p.admin, &format!("UNBAN {replica}"));
    wait_until("reads back on the replica", async || {
        rows(
            &app.simple_query("SELECT pg_is_in_recovery()::text")
                .await
                .unwrap(),
        )[0][0]
            .as_deref()
            == Some("true")
    })
    .await;

    // PAUSE waits for the running transaction; new transactions wait until RESUME.
    let tx = connect(p.addr).await;
    tx.batch_execute("BEGIN; INSERT INTO t_admin VALUES (100)")
        .await
        .unwrap();
    let port = p.admin;
    let pause = tokio::task::spawn_blocking(move || admin(port, "PAUSE"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned with a transaction running"
    );
    tx.batch_execute("COMMIT").await.unwrap();
    pause.await.unwrap();
    let waiting = tokio::spawn(async move {
        let t = Instant::now();
        tx.batch_execute("INSERT INTO t_admin VALUES (101)")
            .await
            .unwrap();
        t.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a new transaction ran while paused");
    admin(p.admin, "RESUME");
    assert!(waiting.await.unwrap() >= Duration::from_millis(400));
    drop(p.server);
}

#[tokio::test]
async fn a_dead_node_shows_down_and_failover_from_the_console() {
    let mut c = own_cluster(1, 1);
    let p = proxy(&yaml_manual_failover(&c));
    let primary = c.shards[0].primary.addr();
    let replica = c.shards[0].replicas[0].addr();
    let app = connect(p.addr).await;
    app.batch_execute("SELECT 1").await.unwrap();
    let (listener, mut notes) = listening_client(p.addr).await;
    listener
        .batch_execute("LISTEN after_failover")
        .await
        .unwrap();
    c.shards[0].primary.stop_with(libc::SIGKILL);
    wait_until("primary down", async || {
        admin(p.admin, "SHOW SERVERS").contains(&format!("{primary}|primary|down|"))
    })
    .await;
    // The listener connection is down with the primary, and the metric says so.
    wait_until("listener down in the metrics", async || {
        sample(
            &metrics(p.metrics).await,
            "pgshard_listener_connected",
            &["shard=\"0\""],
        ) == 0.0
    })
    .await;
    let m = metrics(p.metrics).await;
    assert_eq!(sample(&m, "pgshard_node_up", &[&primary]), 0.0);
    assert!(admin(p.admin, "SHOW SHARDS").contains("|degraded"));
    let out = admin(p.admin, &format!("FAILOVER 0 TO {replica}"));
    let _ = out;
    wait_until("writes on the new primary", async || {
        match try_connect(p.addr, "app", "app", "app").await {
            Ok(c) => c
                .batch_execute("CREATE TABLE IF NOT EXISTS t_fo (x int)")
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
    // pgshard's listener connection followed the primary: a NOTIFY there reaches the
    // client that listened before the failover.
    wait_until("a notification from the new primary", async || {
        if let Ok(c) = try_connect(p.addr, "app", "app", "app").await {
            let _ = c
                .batch_execute("NOTIFY after_failover, 'new primary'")
                .await;
        }
        matches!(
            tokio::time::timeout(std::time::Duration::from_millis(300), notes.recv()).await,
            Ok(Some((ch, payload))) if ch == "after_failover" && payload == "new primary"
        )
    })
    .await;
    let m = metrics(p.metrics).await;
    assert_eq!(sample(&m, "pgshard_listen_channels", &["app"]), 1.0);
    assert_eq!(
        sample(&m, "pgshard_listener_connected", &["shard=\"0\""]),
        1.0
    );
    assert!(sample(&m, "pgshard_notifications_total", &["app"]) >= 1.0);
    assert_eq!(sample(&m, "pgshard_failovers_total", &[]), 1.0);
    assert_eq!(sample(&m, "pgshard_node_primary", &[&replica]), 1.0);
    assert!(sample(&m, "pgshard_last_failover_duration_seconds", &[]) > 0.0);

    // The old primary comes back: fenced, and the metric says so.
    c.restart(0, None).unwrap();
    wait_until("old primary up again, and fenced", async || {
        admin(p.admin, "SHOW SERVERS").contains(&format!("{primary}|fenced|up|1|"))
    })
    .await;
    let m = metrics(p.metrics).await;
    assert_eq!(sample(&m, "pgshard_node_fenced", &[&primary]), 1.0);
    assert_eq!(sample(&m, "pgshard_node_up", &[&primary]), 1.0);
    let servers = admin(p.admin, "SHOW SERVERS");
    assert!(
        servers
            .lines()
            .any(|l| l.contains(&primary) && l.contains("|true|false|")),
        "{servers}"
    );
}

#[tokio::test]
async fn reload_changes_pools_and_adds_a_replica_without_client_errors() {
    let c = own_cluster(1, 2);
    let second = c.shards[0].replicas[1].addr();
    let full = yaml(&c, "    read_from: replicas\n    consistency: eventual\n");
    // Start without the second replica.
    let start = full.replace(&format!(", {second}"), "");
    assert_ne!(start, full);
    let path = c.root.join("reload.yaml");
    std::fs::write(&path, &start).unwrap();
    let p = proxy(&start);
    p.server.set_config_path(path.clone());

    let app = connect(p.addr).await;
    app.batch_execute("CREATE TABLE t_reload (x int)")
        .await
        .unwrap();
    c.wait_replicas_caught_up().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, addr) = (stop.clone(), p.addr);
        clients.push(tokio::spawn(async move {
            let c = connect(addr).await;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.execute("INSERT INTO t_reload VALUES ($1)", &[&i])
                    .await
                    .unwrap();
                c.query_one("SELECT count(*) FROM t_reload", &[])
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A broken file is refused and the running configuration stays.
    std::fs::write(&path, "databases: [").unwrap();
    let (ok, _, err) = admin_try(p.admin, "admin", "pgshard", "RELOAD");
    assert!(!ok && err.contains("configuration refused"), "{err}");
    assert!(admin(p.admin, "SHOW POOLS").contains("|app|app|4|"));

    // Bigger pools and the second replica (a new socket directory waits for a restart).
    let bigger = format!(
        "unix_socket_dir: /tmp\n{}",
        full.replace("size: 4", "size: 6")
    );
    std::fs::write(&path, bigger).unwrap();
    let (ok, _, notice) = admin_try(p.admin, "admin", "pgshard", "RELOAD");
    assert!(
        ok && notice.contains("unix_socket_dir changes need a restart"),
        "{notice}"
    );
    let pools = admin(p.admin, "SHOW POOLS");
    assert!(
        pools.contains("|app|app|6|") && !pools.contains("|app|app|4|"),
        "{pools}"
    );
    wait_until("the added replica takes reads", async || {
        admin(p.admin, "SHOW SERVERS").contains(&format!("{second}|replica|up|"))
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(&second) {
        assert!(
            Instant::now() < deadline,
            "reads never reached the added replica"
        );
        let r = rows(
            &app.simple_query("SELECT inet_server_port()::text")
                .await
                .unwrap(),
        );
        seen.insert(format!("127.0.0.1:{}", r[0][0].as_deref().unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in clients {
        assert!(t.await.unwrap() > 0, "a client made no progress");
    }
}

/// A planned switchover with the primary running: writers keep going through it without
/// an error, every write acknowledged before, during and after it is on the new primary,
/// and the old primary refuses writes.
#[tokio::test]
async fn switchover_loses_no_acknowledged_write() {
    let c = own_cluster(1, 1);
    let p = proxy(&yaml_manual_failover(&c));
    let primary = c.shards[0].primary.addr();
    let replica = c.shards[0].replicas[0].addr();
    let app = connect(p.addr).await;
    app.batch_execute("CREATE TABLE t_sw (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    // Refused without a replica to take over, and with nothing changed.
    let (ok, _, err) = admin_try(
        p.admin,
        "admin",
        "pgshard",
        &format!("SWITCHOVER 0 TO {primary}"),
    );
    assert!(!ok && err.contains("is not a replica"), "{err}");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let (stop, addr) = (stop.clone(), p.addr);
            tokio::spawn(async move {
                let c = connect(addr).await;
                let mut acked = Vec::new();
                let mut id = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.execute("INSERT INTO t_sw (id) VALUES ($1)", &[&id])
                        .await
                        .expect("no write fails during a switchover");
                    acked.push(id);
                    id += 4;
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = tokio::task::spawn_blocking(move || admin(p.admin, "SWITCHOVER 0"))
        .await
        .unwrap();
    let _ = out;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 20, "writes went on: {}", acked.len());

    let db = p.server.state.load().topology.databases["app"].clone();
    let v = db.shards[0].view();
    assert_eq!(v.primary, Some(1), "the replica is the primary");
    assert!(v.nodes[0].fenced, "the old primary is fenced");
    let m = metrics(p.metrics).await;
    assert_eq!(sample(&m, "pgshard_node_primary", &[&replica]), 1.0);
    let on_new = c
        .psql(
            c.shards[0].replicas[0].port,
            "app",
            "SELECT count(*) FROM t_sw",
        )
        .unwrap();
    assert_eq!(
        on_new,
        acked.len().to_string(),
        "every acknowledged write is there"
    );
    let missing = c
        .psql(
            c.shards[0].replicas[0].port,
            "app",
            &format!(
                "SELECT count(*) FROM unnest(ARRAY[{}]::bigint[]) a(id) WHERE id NOT IN (SELECT id FROM t_sw)",
                acked.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
            ),
        )
        .unwrap();
    assert_eq!(missing, "0");
    let e = c
        .psql(
            c.shards[0].primary.port,
            "app",
            "INSERT INTO t_sw VALUES (-1)",
        )
        .unwrap_err();
    assert!(e.to_string().contains("read-only transaction"), "{e}");
}
