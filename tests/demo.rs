//! `pgshard demo`, the README's first command, run as a user would: it starts primaries and
//! streaming replicas, serves psql, and Ctrl-C stops every server and removes its directory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// psql on the demo's `app` database.
fn psql(port: u16, user: &str, sql: &str) -> String {
    common::psql(port, user, "app", sql)
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn demo_serves_a_replicated_cluster_and_cleans_up_on_ctrl_c() {
    let port = pgshard::local::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["demo", "--shards", "2", "--replicas", "1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut config = None;
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(p) = line.strip_prefix("config: ") {
            config = Some(p.trim().to_string());
        }
        if line.contains(&format!("psql \"postgres://app:app@127.0.0.1:{port}/app\"")) {
            break;
        }
    }
    let config = config.expect("demo prints its config path");
    let root = std::path::Path::new(&config)
        .parent()
        .unwrap()
        .to_path_buf();
    let yaml = std::fs::read_to_string(&config).unwrap();
    let cfg = pgshard::config::Config::from_yaml(&yaml).unwrap();
    assert_eq!(cfg.databases[0].shards.len(), 2);

    // Through pgshard, with psql; reads go to the replicas.
    assert_eq!(psql(port, "app", "SELECT 6 * 7"), "42");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while psql(port, "app", "SELECT pg_is_in_recovery()") != "t" {
        assert!(
            std::time::Instant::now() < deadline,
            "demo reads never reached a replica"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    psql(
        port,
        "app",
        "CREATE TABLE demo_t (x int); INSERT INTO demo_t VALUES (1)",
    );
    // The example data: queries the demo suggests work, and rows are on their shards.
    assert_eq!(psql(port, "app", "SELECT count(*) FROM users"), "100");
    assert_eq!(
        psql(port, "app", "SELECT name FROM users WHERE id = 42"),
        "edsger42"
    );
    assert_eq!(
        psql(
            port,
            "app",
            "SELECT region, count(*) FROM accounts GROUP BY region ORDER BY region"
        ),
        "ca|1\neu|2\nuk|1\nus|2"
    );
    let mut total = 0;
    for (s, shard) in cfg.databases[0].shards.iter().enumerate() {
        let p: u16 = shard.primary.rsplit(':').next().unwrap().parse().unwrap();
        let ids = psql(p, "postgres", "SELECT string_agg(id::text, ',') FROM users");
        let ids: Vec<i64> = ids.split(',').map(|x| x.parse().unwrap()).collect();
        assert!(ids.len() > 20, "shard {s} has {} users", ids.len());
        for id in &ids {
            let want = pgshard::sharding::hash::partition_of(
                &pgshard::sharding::hash::HashKey::Int(*id),
                2,
            );
            assert_eq!(want, s as u64, "user {id}");
        }
        total += ids.len();
        assert_eq!(psql(p, "postgres", "SELECT count(*) FROM countries"), "4");
    }
    assert_eq!(total, 100);
    // A user without an id gets one from the shard it goes to, past the loaded ids.
    let id: i64 = psql(
        port,
        "app",
        "INSERT INTO users (name) VALUES ('you') RETURNING id",
    )
    .lines()
    .next()
    .unwrap()
    .parse()
    .unwrap();
    assert!(id > 100, "{id}");
    assert_eq!(
        psql(
            port,
            "app",
            &format!("SELECT name FROM users WHERE id = {id}")
        ),
        "you"
    );
    // Each primary streams to its replica, which is in recovery and receives the writes.
    for shard in &cfg.databases[0].shards {
        let p: u16 = shard.primary.rsplit(':').next().unwrap().parse().unwrap();
        let r: u16 = shard.replicas[0]
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            psql(
                p,
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            ),
            "1"
        );
        assert_eq!(psql(r, "postgres", "SELECT pg_is_in_recovery()"), "t");
    }
    let p0: u16 = cfg.databases[0].shards[0].replicas[0]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut replicated = false;
    for _ in 0..100 {
        let out = Command::new("psql")
            .args([
                "-X",
                "-At",
                "-h",
                "127.0.0.1",
                "-p",
                &p0.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "app", "-c", "SELECT count(*) FROM demo_t"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "1" {
            replicated = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(replicated, "the replica of shard 0 received the write");

    // The servers' PIDs, from their postmaster.pid files.
    let pids: Vec<i32> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("postmaster.pid")).ok())
        .map(|t| t.lines().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "2 primaries and 2 replicas");
    assert!(pids.iter().all(|&p| alive(p)));

    // Ctrl-C.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exits 0 on Ctrl-C: {status}");
    assert!(pids.iter().all(|&p| !alive(p)), "every server stopped");
    assert!(!root.exists(), "temp dir removed");
}
