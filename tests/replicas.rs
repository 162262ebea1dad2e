//! Replicas behind pgshard: the read/write split, load balancing, lag bounds,
//! read-your-writes under a replica delayed on purpose, and a replica that dies and comes
//! back. Each test has its own cluster (1 shard: a primary and two streaming replicas; 2 shards
//! with a replica each for a batch over shards).

mod common;

use common::*;
use pgshard::local::LocalCluster;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A proxy over `c` with these extra database keys (indented YAML lines).
fn proxy(c: &LocalCluster, extra: &str) -> SocketAddr {
    let mut yaml = c.config_yaml("127.0.0.1:0", "transaction", 10);
    yaml.push_str("    failover: { user: postgres, check_interval_ms: 200 }\n");
    yaml.push_str(extra);
    start_proxy_yaml(&yaml)
}

async fn port_of(c: &tokio_postgres::Client, sql: &str) -> i32 {
    let rows = rows(&c.simple_query(sql).await.unwrap());
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

/// Waits until plain reads through the proxy reach a replica (the monitor's first rounds).
async fn wait_for_replica_reads(c: &tokio_postgres::Client) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = rows(
            &c.simple_query("SELECT pg_is_in_recovery()::text")
                .await
                .unwrap(),
        );
        if r[0][0].as_deref() == Some("true") {
            return;
        }
        assert!(Instant::now() < deadline, "reads never reached a replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a replica answers `sql` (a count) with 1.
async fn wait_replayed(c: &LocalCluster, port: u16, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.psql(port, "app", sql).unwrap() != "1" {
        assert!(
            Instant::now() < deadline,
            "replica on {port} never replayed: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reads_go_to_replicas_and_writes_to_the_primary() {
    let c = own_cluster(1, 2);
    let primary = c.shards[0].primary.port as i32;
    let replicas: HashSet<i32> = c.shards[0].replicas.iter().map(|r| r.port as i32).collect();
    let addr = proxy(
        &c,
        "    read_from: replicas\n    consistency: eventual\n    writing_functions: [public.audit]\n",
    );
    let app = connect(addr).await;
    app.batch_execute(
        "CREATE TABLE t_rw (id int PRIMARY KEY, v text); CREATE SEQUENCE s_rw;
         CREATE FUNCTION audit() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    .await
    .unwrap();
    for r in &c.shards[0].replicas {
        wait_replayed(
            &c,
            r.port,
            "SELECT count(*) FROM pg_class WHERE relname = 't_rw'",
        )
        .await;
    }
    wait_for_replica_reads(&app).await;

    // Round robin over both replicas, never the primary.
    let mut seen = HashSet::new();
    for _ in 0..20 {
        seen.insert(port_of(&app, "SELECT inet_server_port()").await);
    }
    assert_eq!(seen, replicas);
    // Extended protocol with parameters, too.
    let row = app
        .query_one("SELECT inet_server_port(), $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert!(replicas.contains(&row.get::<_, i32>(0)));
    assert_eq!(row.get::<_, i32>(1), 42);

    // Everything that writes, locks or needs the primary goes there.
    let on_primary = [
        "INSERT INTO t_rw VALUES (1, 'a') RETURNING inet_server_port()",
        "SELECT inet_server_port() FROM t_rw FOR UPDATE",
        "SELECT inet_server_port() FROM (SELECT nextval('s_rw')) s",
        "SELECT inet_server_port() FROM (SELECT pg_advisory_xact_lock(7)) s",
        "SELECT inet_server_port(), audit()",
        "WITH d AS (DELETE FROM t_rw WHERE id = 99 RETURNING 1) SELECT inet_server_port()",
        "/* pgshard: target=primary */ SELECT inet_server_port()",
    ];
    for sql in on_primary {
        assert_eq!(port_of(&app, sql).await, primary, "{sql}");
    }
    // A transaction goes to the primary, unless it is READ ONLY.
    app.batch_execute("BEGIN").await.unwrap();
    assert_eq!(port_of(&app, "SELECT inet_server_port()").await, primary);
    app.batch_execute("COMMIT").await.unwrap();
    app.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert!(replicas.contains(&port_of(&app, "SELECT inet_server_port()").await));
    let e = app
        .batch_execute("INSERT INTO t_rw VALUES (2, 'b')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25006");
    app.batch_execute("ROLLBACK").await.unwrap();
    // Per session.
    app.batch_execute("SET pgshard.target = primary")
        .await
        .unwrap();
    assert_eq!(port_of(&app, "SELECT inet_server_port()").await, primary);
    app.batch_execute("RESET pgshard.target").await.unwrap();
    assert!(replicas.contains(&port_of(&app, "SELECT inet_server_port()").await));
    let e = app
        .batch_execute("SET pgshard.target = elsewhere")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023");

    // SQL-level prepared statements follow their client to whichever node it gets (a
    // replica too: PREPARE only plans); EXECUTE of a write runs on the primary.
    app.batch_execute("PREPARE rd(int) AS SELECT $1 + 1")
        .await
        .unwrap();
    app.batch_execute(
        "PREPARE wr(int) AS INSERT INTO t_rw VALUES ($1, 'p') RETURNING inet_server_port()",
    )
    .await
    .unwrap();
    for id in 10..14 {
        assert_eq!(port_of(&app, &format!("EXECUTE wr({id})")).await, primary);
        assert_eq!(port_of(&app, &format!("EXECUTE rd({id})")).await, id + 1);
    }
    let other = connect(addr).await;
    let e = other.batch_execute("EXECUTE rd(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000");
    other.batch_execute("PREPARE rd AS SELECT 1").await.unwrap();
    app.batch_execute("DEALLOCATE wr").await.unwrap();
    let e = app.batch_execute("EXECUTE wr(20)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000");

    // pgbench's read-only workload in every query mode, through the split.
    pgbench(addr.port(), &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(addr.port(), &["-S", "-M", mode, "-c", "4", "-t", "50"]);
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
}

#[tokio::test]
async fn read_your_writes_under_a_delayed_replica() {
    let c = own_cluster(1, 1);
    let replica = &c.shards[0].replicas[0];
    // The replica may lag by 10 s and still take reads, so that only the consistency
    // mode decides whether a read sees a write made just before it.
    let ryw = proxy(
        &c,
        "    read_from: replicas\n    max_replica_lag_ms: 10000\n",
    );
    let eventual = proxy(
        &c,
        "    read_from: replicas\n    max_replica_lag_ms: 10000\n    consistency: eventual\n",
    );
    let bounded = proxy(&c, "    read_from: replicas\n    max_replica_lag_ms: 500\n");
    let setup = connect(ryw).await;
    setup
        .batch_execute("CREATE TABLE t_ryw (id int PRIMARY KEY)")
        .await
        .unwrap();
    wait_for_replica_reads(&setup).await;
    c.set_and_reload(replica, "recovery_min_apply_delay", "3s")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let a = connect(ryw).await;
    let b = connect(eventual).await;
    for id in 0..3 {
        a.execute("INSERT INTO t_ryw VALUES ($1)", &[&id])
            .await
            .unwrap();
        // At once: the replica cannot have applied it yet.
        let n: i64 = a
            .query_one("SELECT count(*) FROM t_ryw WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "read-your-writes read missed the client's own write");
    }
    // Eventual consistency reads the delayed replica: the writes are not there yet.
    let n: i64 = b
        .query_one("SELECT count(*) FROM t_ryw", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 0,
        "the eventual read should have gone to the delayed replica"
    );
    // A client that wrote nothing reads the replica in read_your_writes mode too.
    let fresh = connect(ryw).await;
    let r = rows(
        &fresh
            .simple_query("SELECT pg_is_in_recovery()::text")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("true"));

    // With a 500 ms bound, the lagging replica gets no reads once its lag shows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d = connect(bounded).await;
    let r = rows(
        &d.simple_query("SELECT pg_is_in_recovery()::text")
            .await
            .unwrap(),
    );
    assert_eq!(
        r[0][0].as_deref(),
        Some("false"),
        "lagging replica still took a read"
    );
    // And once it caught up, it takes reads again.
    c.set_and_reload(replica, "recovery_min_apply_delay", "0")
        .unwrap();
    wait_for_replica_reads(&d).await;
}

async fn count(c: &tokio_postgres::Client, id: i32) -> i64 {
    c.query_one("SELECT count(*) FROM t_ack WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn acknowledged_writes_are_read_by_every_client() {
    let c = own_cluster(2, 1);
    let replicas: Vec<u16> = c.shards.iter().map(|s| s.replicas[0].port).collect();
    // The replicas may lag by 10 s and still take reads: only the consistency mode
    // decides whether a read sees another client's write made just before it.
    let config = |consistency: &str| {
        c.config_yaml("127.0.0.1:0", "transaction", 6)
            + "    failover: { user: postgres, check_interval_ms: 200 }\n"
            + "    read_from: replicas\n    max_replica_lag_ms: 10000\n"
            + consistency
            + "    sharded_tables:\n      - { table: t_ack, column: id, method: hash }\n"
    };
    let shared = start_proxy_yaml(&config("    consistency: read_acknowledged_writes\n"));
    let own = start_proxy_yaml(&config(""));
    use pgshard::sharding::hash::{HashKey, partition_of};
    let keys_on = |s: u64| -> Vec<i32> {
        (1..)
            .filter(|k| partition_of(&HashKey::Int(i64::from(*k)), 2) == s)
            .take(4)
            .collect()
    };
    let (on0, on1) = (keys_on(0), keys_on(1));
    let setup = connect(shared).await;
    setup
        .batch_execute("CREATE TABLE t_ack (id int PRIMARY KEY)")
        .await
        .unwrap();
    for &r in &replicas {
        wait_replayed(
            &c,
            r,
            "SELECT count(*) FROM pg_class WHERE relname = 't_ack'",
        )
        .await;
    }
    let writer = connect(shared).await;
    let reader = connect(shared).await;
    let other = connect(own).await;
    wait_for_replica_reads(&reader).await;
    wait_for_replica_reads(&other).await;
    // The replicas stop replaying: what is written now is on the primaries only.
    for &r in &replicas {
        c.psql(r, "postgres", "SELECT pg_wal_replay_pause()")
            .unwrap();
    }
    // One shard per write: pgshard reads each commit's position.
    for &id in &on0[..2] {
        writer
            .execute("INSERT INTO t_ack (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
        // Another client of the same pgshard, at once: it sees the write.
        assert_eq!(
            count(&reader, id).await,
            1,
            "a read missed a write acknowledged to another client"
        );
    }
    // In per-client read-your-writes, a client that did not write reads the paused
    // replica, where the rows are not: the setup does test something.
    assert_eq!(
        count(&other, on0[0]).await,
        0,
        "the per-client read should have gone to the paused replica"
    );
    // A transaction over both shards (two-phase commit, positions not read): its rows
    // are seen on both.
    writer
        .batch_execute(&format!(
            "BEGIN; INSERT INTO t_ack (id) VALUES ({}); INSERT INTO t_ack (id) VALUES ({}); COMMIT",
            on0[2], on1[0]
        ))
        .await
        .unwrap();
    assert_eq!(count(&reader, on1[0]).await, 1);
    assert_eq!(count(&reader, on0[2]).await, 1);
    assert_eq!(count(&other, on1[0]).await, 0);
    // Once the replicas have replayed everything, reads go back to them.
    for &r in &replicas {
        c.psql(r, "postgres", "SELECT pg_wal_replay_resume()")
            .unwrap();
    }
    wait_replayed(
        &c,
        replicas[1],
        &format!("SELECT count(*) FROM t_ack WHERE id = {}", on1[0]),
    )
    .await;
    wait_for_replica_reads(&reader).await;
}

#[tokio::test]
async fn a_replica_leaves_and_rejoins_the_rotation() {
    let mut c = own_cluster(1, 2);
    let addr = proxy(&c, "    read_from: replicas\n    consistency: eventual\n");
    let app = connect(addr).await;
    wait_for_replica_reads(&app).await;
    let ports: Vec<i32> = c.shards[0].replicas.iter().map(|r| r.port as i32).collect();
    // Wait until both replicas take reads.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        assert!(Instant::now() < deadline);
        seen.insert(port_of(&app, "SELECT inet_server_port()").await);
    }
    // Slow reads in flight on both replicas: READ ONLY transactions stay on one node,
    // which the first statement tells.
    let mut slow = Vec::new();
    for _ in 0..6 {
        let client = connect(addr).await;
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        let port = port_of(&client, "SELECT inet_server_port()").await;
        slow.push((
            port,
            tokio::spawn(async move {
                let r = client.batch_execute("SELECT pg_sleep(1.5)").await;
                (r, client)
            }),
        ));
    }
    assert!(
        slow.iter().any(|(p, _)| *p == ports[1]) && slow.iter().any(|(p, _)| *p == ports[0]),
        "reads not spread over both replicas: {:?}",
        slow.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.shards[0].replicas[0].stop_with(libc::SIGKILL);
    for (port, t) in slow {
        let (r, client) = t.await.unwrap();
        if port == ports[1] {
            r.unwrap();
            client.batch_execute("COMMIT").await.unwrap();
        } else {
            let e = r.unwrap_err();
            assert!(e.is_closed() || sqlstate(&e) == "08006", "{e}");
        }
    }

    // Once the monitor saw it, no read goes to the dead replica, and none fails.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..20 {
        let p = port_of(&app, "SELECT inet_server_port()").await;
        assert_eq!(p, ports[1]);
    }
    // Back: it rejoins the rotation.
    c.restart(0, Some(0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = port_of(&app, "SELECT inet_server_port()").await;
        if p == ports[0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted replica never took reads again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn manual_failover_promotes_the_chosen_replica_and_fences_the_old_primary() {
    let c = own_cluster(1, 2);
    let old = c.shards[0].primary.port as i32;
    let chosen = c.shards[0].replicas[1].port as i32;
    let other = c.shards[0].replicas[0].port;
    let mut yaml = c.config_yaml("127.0.0.1:0", "transaction", 10);
    yaml.push_str("    failover: { user: postgres, check_interval_ms: 200 }\n");
    let (addr, server) = start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap());
    let app = connect(addr).await;
    app.batch_execute(
        "CREATE TABLE t_manual (id int PRIMARY KEY, at int DEFAULT inet_server_port())",
    )
    .await
    .unwrap();
    app.execute("INSERT INTO t_manual (id) VALUES (1)", &[])
        .await
        .unwrap();
    let db = server.state.load().topology.databases["app"].clone();
    // Not a replica: refused.
    assert!(db.failover(0, Some(0)).await.is_err());
    let to = db.failover(0, Some(2)).await.unwrap();
    assert_eq!(to, 2);
    // Writes go to the promoted replica; the old primary, still running, gets none.
    for id in 2..12 {
        let p: i32 = app
            .query_one("INSERT INTO t_manual (id) VALUES ($1) RETURNING at", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(p, chosen);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.psql(old as u16, "app", "SELECT count(*) FROM t_manual")
            .unwrap(),
        "1"
    );
    // The other replica follows the new primary.
    wait_replayed(&c, other, "SELECT count(*) FROM t_manual WHERE id = 11").await;
    let v = db.shards[0].view();
    assert_eq!(v.primary, Some(2));
    assert!(v.nodes[0].fenced, "the old primary must be fenced");
}

#[tokio::test]
async fn least_outstanding_avoids_the_busy_replica() {
    let c = own_cluster(1, 2);
    let addr = proxy(
        &c,
        "    read_from: replicas\n    consistency: eventual\n    load_balance: least_outstanding\n",
    );
    let app = connect(addr).await;
    wait_for_replica_reads(&app).await;
    // Two long READ ONLY transactions hold server connections on one replica...
    let busy = connect(addr).await;
    busy.batch_execute("BEGIN READ ONLY").await.unwrap();
    let busy_port = port_of(&busy, "SELECT inet_server_port()").await;
    // ... then every new read goes to the other one, which has nothing in flight.
    for _ in 0..10 {
        let p = port_of(&app, "SELECT inet_server_port()").await;
        assert_ne!(
            p, busy_port,
            "a read went to the replica with a transaction in flight"
        );
    }
    busy.batch_execute("COMMIT").await.unwrap();
}

/// A pipelined batch of reads over two shards (psycopg's pipeline mode sends them so)
/// starts on one shard's replica and moves to the other's, reading replicas throughout.
#[tokio::test]
async fn a_pipelined_batch_of_reads_moves_between_shards_on_replicas() {
    let c = own_cluster(2, 1);
    let yaml = c
        .config_yaml("127.0.0.1:0", "transaction", 4)
        .replace("users:\n", "users:\n  - { name: trusty, auth: trust }\n")
        + "    failover: { user: postgres, check_interval_ms: 200 }\n"
        + "    read_from: replicas\n    consistency: eventual\n"
        + "    sharded_tables:\n      - { table: rb, column: id, method: hash }\n";
    let addr = start_proxy_yaml(&yaml);
    let app = connect(addr).await;
    app.batch_execute("CREATE TABLE rb (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    use pgshard::sharding::hash::{HashKey, partition_of};
    let key_on = |s: usize| {
        (1..)
            .find(|k| partition_of(&HashKey::Int(*k), 2) as usize == s)
            .unwrap()
    };
    let (x, y) = (key_on(0), key_on(1));
    for (k, v) in [(x, "on 0"), (y, "on 1")] {
        app.execute("INSERT INTO rb (id, v) VALUES ($1, $2)", &[&k, &v])
            .await
            .unwrap();
    }
    c.wait_replicas_caught_up().unwrap();
    wait_for_replica_reads(&app).await;

    let mut raw = Raw::startup(addr, "trusty", "app").await;
    assert!(raw.until_ready().await.ends_with('Z'));
    let mut batch = msg::parse(
        "",
        "SELECT v, pg_is_in_recovery()::text FROM rb WHERE id = $1",
    );
    for k in [x, y, x] {
        batch.extend(msg::bind("", "", &[&k.to_string()]));
        batch.extend(msg::execute(""));
    }
    batch.extend(msg::sync());
    raw.send(&batch).await;
    let (mut tags, mut rows) = (String::new(), Vec::new());
    while let Some((t, body)) = raw.recv().await {
        tags.push(t as char);
        if t == b'D' {
            rows.push(data_row(&body));
        }
        if t == b'Z' {
            assert_eq!(body[0], b'I');
            break;
        }
    }
    assert_eq!(tags, "12DC2DC2DCZ");
    let want = |v: &str| vec![Some(v.to_string()), Some("true".to_string())];
    assert_eq!(rows, [want("on 0"), want("on 1"), want("on 0")]);

    // A read over both shards goes to their replicas; one that locks rows, to their
    // primaries (in both protocols).
    let over_both = "SELECT v, pg_is_in_recovery()::text FROM rb ORDER BY v";
    let in_recovery = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| {
        common::rows(&msgs)
            .into_iter()
            .map(|r| r[1].clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        in_recovery(app.simple_query(over_both).await.unwrap()),
        ["true", "true"]
    );
    let locking = format!("{over_both} FOR UPDATE");
    assert_eq!(
        in_recovery(app.simple_query(&locking).await.unwrap()),
        ["false", "false"]
    );
    let extended: Vec<String> = app
        .query(&locking, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(1))
        .collect();
    assert_eq!(extended, ["false", "false"]);
}
