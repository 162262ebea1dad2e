//! `pgshard serve` and signals: SIGTERM lets transactions in flight commit, refuses new
//! clients, closes idle ones, and exits 0; a second signal exits at once.

mod common;

use common::*;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn serve() -> (Child, SocketAddr, std::path::PathBuf) {
    let port = pgshard::local::free_port();
    let yaml = base_yaml("transaction", 4)
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"))
        + "limits: { shutdown_timeout_ms: 15000 }\n";
    let path = std::env::temp_dir().join(format!("pgshard-shutdown-{port}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["serve", "--config"])
        .arg(&path)
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr);
    (child, addr, path)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "pgshard did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sigterm_lets_the_running_transaction_commit() {
    let (mut child, addr, path) = serve();
    let mut a = connect(addr).await;
    let b = connect(addr).await;
    a.batch_execute("DROP TABLE IF EXISTS t_shut; CREATE TABLE t_shut (x int)")
        .await
        .unwrap();
    let tx = a.transaction().await.unwrap();
    tx.execute("INSERT INTO t_shut VALUES (1)", &[])
        .await
        .unwrap();
    b.batch_execute("SELECT 1").await.unwrap();

    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // No new clients; the idle one is closed.
    assert!(try_connect(addr, "app", "app", "app").await.is_err());
    assert!(b.batch_execute("SELECT 1").await.is_err());
    // The transaction in flight goes on and commits.
    tx.execute("INSERT INTO t_shut VALUES (2)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    let n: i64 = connect_direct()
        .await
        .query_one("SELECT count(*) FROM t_shut", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (mut child, addr, path) = serve();
    let mut a = connect(addr).await;
    let tx = a.transaction().await.unwrap();
    tx.batch_execute("SELECT 1").await.unwrap();
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "waits for the open transaction"
    );
    signal(&child, libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(!status.success());
    drop(tx);
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn sighup_reloads_and_slow_queries_are_logged() {
    let port = pgshard::local::free_port();
    let admin = pgshard::local::free_port();
    let yaml = base_yaml("transaction", 4)
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"))
        .replace(
            "users:\n",
            &format!(
                "slow_query_ms: 100\nadmin: {{ listen: '127.0.0.1:{admin}', users: [app] }}\nusers:\n"
            ),
        );
    let path = std::env::temp_dir().join(format!("pgshard-hup-{port}.yaml"));
    let log = std::env::temp_dir().join(format!("pgshard-hup-{port}.log"));
    std::fs::write(&path, &yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["--log-format", "text", "serve", "--config"])
        .arg(&path)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr);
    let c = connect(addr).await;
    c.batch_execute("SELECT pg_sleep(0.15)").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    let pools = || psql(admin, "app", "pgshard", "SHOW POOLS");
    assert!(pools().contains("|4|"), "{}", pools());

    // A bad file is refused; the running configuration stays.
    std::fs::write(&path, "users: [").unwrap();
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    c.batch_execute("SELECT 1").await.unwrap();
    assert!(pools().contains("|4|"));
    std::fs::write(&path, yaml.replace("size: 4", "size: 7")).unwrap();
    signal(&child, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pools().contains("|7|") {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload: {}",
            pools()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.batch_execute("SELECT 1").await.unwrap();
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("slow query") && text.contains("pg_sleep(0.15)"),
        "{text}"
    );
    assert!(
        !text.contains("SELECT 1\""),
        "fast queries are not logged as slow"
    );
    assert!(text.contains("configuration refused"), "{text}");
    assert!(text.contains("configuration reloaded"), "{text}");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&log);
}
