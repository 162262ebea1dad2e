//! The core proxy against real PostgreSQL, with tokio-postgres and raw protocol clients.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use std::time::{Duration, Instant};

#[tokio::test]
async fn simple_and_extended_queries_match_direct_postgres() {
    let c = connect(tx_proxy()).await;
    c.batch_execute(
        "DROP TABLE IF EXISTS t_basic; CREATE TABLE t_basic (id int primary key, name text, n numeric, ts timestamptz, b bytea);",
    )
    .await
    .unwrap();
    for i in 0..50 {
        c.execute(
            "INSERT INTO t_basic VALUES ($1, $2, $3::text::numeric, now(), $4)",
            &[
                &i,
                &format!("name {i}"),
                &format!("{i}.5"),
                &vec![i as u8; 10],
            ],
        )
        .await
        .unwrap();
    }
    let q = "SELECT id, name, n::text, b FROM t_basic WHERE id % 3 = 0 ORDER BY id";
    let via: Vec<(i32, String, String, Vec<u8>)> = c
        .query(q, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let d = connect_direct().await;
    let direct: Vec<(i32, String, String, Vec<u8>)> = d
        .query(q, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(via.len(), 17);
    assert_eq!(via, direct);
    // Simple protocol: several statements in one string, each with its result.
    let msgs = c
        .simple_query("SELECT 1 AS a; SELECT 'x' AS b, 2 AS c; SELECT count(*) FROM t_basic")
        .await
        .unwrap();
    let rows: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["1", "x", "50"]);
}

#[tokio::test]
async fn multi_statement_string_is_one_implicit_transaction() {
    let c = connect(tx_proxy()).await;
    c.batch_execute("DROP TABLE IF EXISTS t_multi; CREATE TABLE t_multi (x int)")
        .await
        .unwrap();
    let e = c
        .batch_execute("INSERT INTO t_multi VALUES (1); SELECT 1/0; INSERT INTO t_multi VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let n: i64 = c
        .query_one("SELECT count(*) FROM t_multi", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the failed string must leave nothing behind");
}

#[tokio::test]
async fn prepared_statements_survive_server_connection_changes_in_transaction_mode() {
    // A pool of 2 and 6 clients: each client's statements land on varying server connections.
    let addr = start_proxy_yaml(&base_yaml("transaction", 2));
    let setup = connect(addr).await;
    setup
        .batch_execute("DROP TABLE IF EXISTS t_prep; CREATE TABLE t_prep (k int, v text)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for client in 0..6 {
        tasks.push(tokio::spawn(async move {
            let c = connect(addr).await;
            let ins = c
                .prepare("INSERT INTO t_prep VALUES ($1, $2)")
                .await
                .unwrap();
            let sel = c
                .prepare("SELECT v FROM t_prep WHERE k = $1")
                .await
                .unwrap();
            for i in 0..40 {
                let k = client * 1000 + i;
                c.execute(&ins, &[&k, &format!("v{k}")]).await.unwrap();
                let v: String = c.query_one(&sel, &[&k]).await.unwrap().get(0);
                assert_eq!(v, format!("v{k}"));
            }
            // A statement prepared inside a transaction and used after it.
            let mut c = c;
            let tx = c.transaction().await.unwrap();
            let cnt = tx
                .prepare("SELECT count(*) FROM t_prep WHERE k / 1000 = $1")
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let n: i64 = c.query_one(&cnt, &[&client]).await.unwrap().get(0);
            assert_eq!(n, 40);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn statements_prepared_after_a_client_drops_all_of_its_own() {
    // One server connection for every client: what one client's DEALLOCATE ALL or
    // DISCARD ALL drops on it, the next client's statements must find prepared again
    // (psycopg sends DEALLOCATE ALL after every ROLLBACK once it has prepared).
    let addr = start_proxy_yaml(&base_yaml("transaction", 1));
    for drop_all in [
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "BEGIN; SELECT 1; ROLLBACK; DEALLOCATE ALL",
    ] {
        for _ in 0..2 {
            let c = connect(addr).await;
            let st = c
                .prepare("SELECT $1::int + 1 AS dropped_all")
                .await
                .unwrap();
            let n: i32 = c.query_one(&st, &[&41]).await.unwrap().get(0);
            assert_eq!(n, 42, "{drop_all}");
            c.batch_execute(drop_all).await.unwrap();
            // The client's own statement is gone, as on a server.
            let e = c.query_one(&st, &[&1]).await.unwrap_err();
            assert_eq!(sqlstate(&e), "26000", "{drop_all}");
        }
    }
}

#[tokio::test]
async fn transactions_commit_rollback_errors_and_savepoints() {
    let mut c = connect(tx_proxy()).await;
    c.batch_execute("DROP TABLE IF EXISTS t_tx; CREATE TABLE t_tx (x int)")
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO t_tx VALUES (1)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO t_tx VALUES (2)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // An error inside a transaction: later statements get 25P02 until ROLLBACK.
    c.batch_execute("BEGIN; INSERT INTO t_tx VALUES (3)")
        .await
        .unwrap();
    let e = c.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Savepoints.
    c.batch_execute(
        "BEGIN; INSERT INTO t_tx VALUES (4); SAVEPOINT s; INSERT INTO t_tx VALUES (5); ROLLBACK TO SAVEPOINT s; INSERT INTO t_tx VALUES (6); COMMIT",
    )
    .await
    .unwrap();
    let rows: Vec<i32> = c
        .query("SELECT x FROM t_tx ORDER BY x", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1, 4, 6]);
}

#[tokio::test]
async fn copy_in_and_out() {
    let c = connect(tx_proxy()).await;
    c.batch_execute("DROP TABLE IF EXISTS t_copy; CREATE TABLE t_copy (id int, s text)")
        .await
        .unwrap();
    let sink = c
        .copy_in("COPY t_copy FROM STDIN WITH (FORMAT csv)")
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    let mut data = String::new();
    for i in 0..20_000 {
        data.push_str(&format!("{i},\"row, {i}\"\n"));
    }
    for chunk in data.as_bytes().chunks(7000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    let n = sink.as_mut().finish().await.unwrap();
    assert_eq!(n, 20_000);
    let out: Vec<bytes::Bytes> = c
        .copy_out("COPY (SELECT * FROM t_copy ORDER BY id) TO STDOUT WITH (FORMAT csv)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let got: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(String::from_utf8(got).unwrap(), data);
    // A COPY that fails mid-way leaves the session usable.
    let sink = c.copy_in("COPY t_copy FROM STDIN").await.unwrap();
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"not a number\tx\n"))
        .await
        .unwrap();
    let e = sink.as_mut().finish().await.unwrap_err();
    assert_eq!(sqlstate(&e), "22P02");
    let n: i64 = c
        .query_one("SELECT count(*) FROM t_copy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20_000);
}

#[tokio::test]
async fn cancel_request_reaches_the_running_query() {
    let c = connect(tx_proxy()).await;
    let token = c.cancel_token();
    let start = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = c.batch_execute("SELECT pg_sleep(30)").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(sqlstate(&e), "57014");
    assert!(start.elapsed() < Duration::from_secs(10));
    // The session goes on.
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn listen_notify_in_session_mode() {
    let addr = session_proxy();
    let (listener, mut conn) =
        tokio_postgres::connect(&conn_str(addr, "app", "app", "app"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN pgshard_chan").await.unwrap();
    let other = connect(addr).await;
    other
        .batch_execute("NOTIFY pgshard_chan, 'hello'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification within 10 s")
        .unwrap();
    assert_eq!(got, ("pgshard_chan".to_string(), "hello".to_string()));
}

#[tokio::test]
async fn notifications_waiting_on_a_transaction_are_bounded() {
    let yaml = base_yaml("transaction", 4) + "limits: { max_message_size: 65536 }\n";
    let addr = start_proxy_yaml(&yaml);
    let (l, _rx) = listening_client(addr).await;
    l.batch_execute("LISTEN flood").await.unwrap();
    l.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let other = connect(addr).await;
    // 20 notifications of 4000 bytes wait for the end of the transaction: over 64 KiB.
    for _ in 0..20 {
        other
            .batch_execute("SELECT pg_notify('flood', repeat('x', 4000))")
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        assert!(Instant::now() < deadline, "the session is still open");
        match l.batch_execute("SELECT 1").await {
            Ok(()) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => break e,
        }
    };
    assert!(
        e.as_db_error().is_some_and(|d| d.code().code() == "53200") || e.is_closed(),
        "{e:?}"
    );
    // Other clients are not affected.
    other.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn listen_notify_in_transaction_mode() {
    // A pool of two server connections: one for the listening client's transaction below,
    // one for the other client; a LISTEN that held one would starve the other client.
    let addr = start_proxy_yaml(&base_yaml("transaction", 2));
    let (mut l, mut rx) = listening_client(addr).await;
    l.batch_execute("LISTEN tx_jobs").await.unwrap();
    l.batch_execute("LISTEN \"Mixed Chan\"").await.unwrap();
    let other = connect(addr).await;
    other.batch_execute("NOTIFY tx_jobs, 'one'").await.unwrap();
    other
        .batch_execute("SELECT pg_notify('Mixed Chan', 'two')")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("tx_jobs".into(), "one".into())
    );
    assert_eq!(
        next_notification(&mut rx).await,
        ("Mixed Chan".into(), "two".into())
    );
    // The listening client goes on using the pool like any other.
    let one: i32 = l.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // Notifications wait while the client is in a transaction, as PostgreSQL delivers them.
    l.batch_execute("BEGIN; SELECT 1").await.unwrap();
    other
        .batch_execute("NOTIFY tx_jobs, 'three'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "delivered inside a transaction");
    // LISTEN inside a transaction block takes effect at COMMIT, as in PostgreSQL: not
    // after ROLLBACK.
    l.batch_execute("LISTEN later").await.unwrap();
    l.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("tx_jobs".into(), "three".into())
    );
    other.batch_execute("NOTIFY later, 'lost'").await.unwrap();
    // In a transaction that commits (on a server, and answered by pgshard when it touched
    // no server; simple and extended protocol), from the COMMIT on.
    l.batch_execute("BEGIN").await.unwrap();
    l.batch_execute("LISTEN later").await.unwrap();
    l.batch_execute("SELECT 1").await.unwrap();
    other.batch_execute("NOTIFY later, 'early'").await.unwrap();
    l.batch_execute("COMMIT").await.unwrap();
    other.batch_execute("NOTIFY later, 'one'").await.unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("later".into(), "one".into())
    );
    l.batch_execute("BEGIN; UNLISTEN later").await.unwrap();
    l.batch_execute("ROLLBACK").await.unwrap();
    let tx = l.transaction().await.unwrap();
    tx.execute("UNLISTEN later", &[]).await.unwrap();
    tx.execute("LISTEN later_too", &[]).await.unwrap();
    tx.commit().await.unwrap();
    other
        .batch_execute("NOTIFY later, 'gone'; NOTIFY later_too, 'two'")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("later_too".into(), "two".into())
    );
    // After an error in the block: 25P02, and nothing at the end.
    l.batch_execute("BEGIN").await.unwrap();
    l.batch_execute("SELECT 1/0").await.unwrap_err();
    let e = l.batch_execute("LISTEN never").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    l.batch_execute("COMMIT").await.unwrap();
    l.batch_execute("UNLISTEN later_too").await.unwrap();
    // UNLISTEN stops one channel; the other still arrives.
    l.batch_execute("UNLISTEN tx_jobs").await.unwrap();
    other.batch_execute("NOTIFY tx_jobs, 'four'").await.unwrap();
    other
        .batch_execute("NOTIFY \"Mixed Chan\", 'five'")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("Mixed Chan".into(), "five".into())
    );
    // The listener connection is killed: pgshard reconnects and listens again. (Waiting
    // until it is gone: a notification it still delivered must not pass for one of the
    // new connection's.)
    other
        .batch_execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = 'pgshard listener'",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "no notification after the reconnect"
        );
        other
            .batch_execute("NOTIFY \"Mixed Chan\", 'again'")
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            Ok(Some(n)) => {
                assert_eq!(n, ("Mixed Chan".into(), "again".into()));
                break;
            }
            _ => continue,
        }
    }
    // In the extended protocol (a prepared statement, as pgjdbc and Npgsql send it).
    let st = l.prepare("LISTEN extended_chan").await.unwrap();
    assert_eq!(l.execute(&st, &[]).await.unwrap(), 0);
    other
        .batch_execute("NOTIFY extended_chan, 'ext'")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("extended_chan".into(), "ext".into())
    );
    l.execute("UNLISTEN extended_chan", &[]).await.unwrap();
    let one: i32 = l.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "the unnamed statement is a query again");
    // Refused: bad names.
    for (sql, code) in [("LISTEN 1abc", "42601"), ("UNLISTEN", "42601")] {
        let e = l.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{sql}");
    }
    let e = l.execute("LISTEN \"\"", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42601");
    // DISCARD ALL ends every LISTEN, as on a server.
    l.batch_execute("DISCARD ALL").await.unwrap();
    other
        .batch_execute("NOTIFY \"Mixed Chan\", 'gone'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(n) = rx.try_recv() {
        assert_eq!(n.1, "again", "{n:?} after DISCARD ALL");
    }
    // LISTEN among other statements in one string: as in PostgreSQL, the string is one
    // implicit transaction and its LISTENs take effect when it commits, not after an error.
    let e = l
        .batch_execute("LISTEN multi_a; SELECT 1/0")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    l.batch_execute("LISTEN multi_b; SELECT 1; LISTEN \"multi c\"")
        .await
        .unwrap();
    other
        .batch_execute("NOTIFY multi_a, 'lost'; NOTIFY multi_b, 'b'; NOTIFY \"multi c\", 'c'")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("multi_b".into(), "b".into())
    );
    assert_eq!(
        next_notification(&mut rx).await,
        ("multi c".into(), "c".into())
    );
    // Only LISTENs: no server takes part, and the string's transaction still commits.
    l.batch_execute("LISTEN multi_d; LISTEN multi_e")
        .await
        .unwrap();
    other
        .batch_execute("NOTIFY multi_d, 'd'; NOTIFY multi_e, 'e'")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("multi_d".into(), "d".into())
    );
    assert_eq!(
        next_notification(&mut rx).await,
        ("multi_e".into(), "e".into())
    );
    // No BEGIN left pending: each statement is its own transaction (now() moves).
    let now = async || -> String { l.query_one("SELECT now()::text", &[]).await.unwrap().get(0) };
    let first = now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_ne!(first, now().await, "a transaction left open");
    // asyncpg's reset of a connection its pool takes back.
    l.batch_execute("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
        .await
        .unwrap();
    other
        .batch_execute("NOTIFY multi_b, 'gone'; NOTIFY \"multi c\", 'gone'")
        .await
        .unwrap();
    l.batch_execute("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "a notification after UNLISTEN *");
    // No server connection is left listening for clients.
    let listening: i64 = other
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name <> 'pgshard listener' AND query ILIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listening, 0);
}

#[tokio::test]
async fn large_rows_pass_intact() {
    let c = connect(tx_proxy()).await;
    c.batch_execute(
        "DROP TABLE IF EXISTS t_large; CREATE TABLE t_large (id int, body text, raw bytea)",
    )
    .await
    .unwrap();
    let body: String = (0..3_000_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let raw: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    c.execute("INSERT INTO t_large VALUES (1, $1, $2)", &[&body, &raw])
        .await
        .unwrap();
    let r = c
        .query_one("SELECT body, raw FROM t_large WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), body);
    assert_eq!(r.get::<_, Vec<u8>>(1), raw);
    let msgs = c
        .simple_query("SELECT md5(body) FROM t_large")
        .await
        .unwrap();
    assert!(matches!(
        msgs[1],
        tokio_postgres::SimpleQueryMessage::Row(_)
    ));
}

#[tokio::test]
async fn two_hundred_clients_share_a_pool_of_ten() {
    // Its own server database, so that its server connections can be counted exactly.
    let addr = proxy_on_own_database("many", "transaction", 10);
    let setup = connect(addr).await;
    setup
        .batch_execute("DROP TABLE IF EXISTS t_many; CREATE TABLE t_many (c int, i int)")
        .await
        .unwrap();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            let direct = connect_direct().await;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = direct
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'many' AND application_name <> 'pgshard monitor'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for client in 0..200 {
        tasks.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            for i in 0..5 {
                let tx = c.transaction().await.unwrap();
                tx.execute("INSERT INTO t_many VALUES ($1, $2)", &[&client, &i])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.await.unwrap();
    let n: i64 = setup
        .query_one("SELECT count(*) FROM t_many", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..=10).contains(&peak),
        "{peak} server connections at the peak"
    );
}

async fn show(c: &tokio_postgres::Client, what: &str) -> String {
    let m = c.simple_query(&format!("SHOW {what}")).await.unwrap();
    match &m[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn session_settings_follow_the_client_in_transaction_mode() {
    // One server connection shared by two clients.
    let addr = start_proxy_yaml(&base_yaml("transaction", 1));
    let a = connect(addr).await;
    let b = connect(addr).await;
    a.batch_execute("SET search_path TO pg_catalog, public; SET work_mem = '7MB'")
        .await
        .unwrap();
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "work_mem").await, "7MB");
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    assert_eq!(show(&a, "search_path").await, "pg_catalog, public");
    // A SET rolled back with its transaction does not stick.
    a.batch_execute("BEGIN; SET work_mem = '9MB'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "work_mem").await, "7MB");
    a.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(show(&a, "work_mem").await, "4MB");
    // Startup parameters apply too.
    let c = connect_with(
        addr,
        "application_name=myapp options='-c statement_timeout=1234'",
    )
    .await;
    assert_eq!(show(&c, "application_name").await, "myapp");
    assert_eq!(show(&c, "statement_timeout").await, "1234ms");
    assert_eq!(show(&b, "statement_timeout").await, "0");
}

#[tokio::test]
async fn extended_protocol_error_recovery_matches_postgres() {
    let addr = start_proxy_yaml(&base_yaml("transaction", 2));
    let mut r = Raw::startup(addr, "trusty", "app").await;
    assert!(r.until_ready().await.ends_with('Z'));
    // A failing Parse: the rest of the batch is skipped up to Sync.
    let mut b = msg::parse("", "SELEC 1");
    b.extend(msg::bind("", "", &[]));
    b.extend(msg::execute(""));
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.until_ready().await, "EZ");
    // Named statements in transaction mode: prepare, then use after the server connection
    // went back to the pool.
    let mut b = msg::parse("s1", "SELECT $1::int + 1");
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.until_ready().await, "1Z");
    let mut b = msg::bind("", "s1", &["41"]);
    b.extend(msg::execute(""));
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.until_ready().await, "2DCZ");
    // Describe of a statement, duplicate names and unknown names, as PostgreSQL answers.
    let mut b = msg::describe_stmt("s1");
    b.extend(msg::parse("s1", "SELECT 2"));
    b.extend(msg::bind("", "s1", &["1"]));
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.until_ready().await, "tTEZ");
    let mut b = msg::bind("", "nope", &[]);
    b.extend(msg::execute(""));
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.error_code().await.as_deref(), Some("26000"));
    assert_eq!(r.until_ready().await, "Z");
    // Close then reuse of the name; Flush delivers without Sync.
    let mut b = msg::close_stmt("s1");
    b.extend(msg::parse("s1", "SELECT 'again'"));
    b.extend(msg::flush());
    r.send(&b).await;
    assert_eq!(r.recv().await.unwrap().0, b'3');
    assert_eq!(r.recv().await.unwrap().0, b'1');
    let mut b = msg::bind("", "s1", &[]);
    b.extend(msg::execute(""));
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.until_ready().await, "2DCZ");
    // A second client preparing the same text reuses the server's statement transparently.
    let mut r2 = Raw::startup(addr, "trusty", "app").await;
    r2.until_ready().await;
    let mut b = msg::parse("other", "SELECT 'again'");
    b.extend(msg::bind("", "other", &[]));
    b.extend(msg::execute(""));
    b.extend(msg::sync());
    r2.send(&b).await;
    assert_eq!(r2.until_ready().await, "12DCZ");
    // Simple-protocol DEALLOCATE of a protocol-level statement.
    r.send(&msg::query("DEALLOCATE s1")).await;
    assert_eq!(r.until_ready().await, "CZ");
    r.send(&msg::terminate()).await;
    assert!(r.recv().await.is_none());
}

/// An error pgshard raises itself in an extended-protocol batch (here the Bind of a
/// statement the client never prepared, which in transaction mode pgshard answers) fails
/// the transaction as a server's error does: the batch's Sync reports it failed, a later
/// COMMIT rolls back, and the implicit transaction of a batch outside a transaction block
/// rolls back the batch's earlier writes. Compared with plain PostgreSQL.
#[tokio::test]
async fn local_errors_in_a_batch_fail_the_transaction() {
    let addr = start_proxy_yaml(&base_yaml("transaction", 2));
    let port = cluster().shards[0].primary.port;
    let check = connect_direct().await;
    check
        .batch_execute("DROP TABLE IF EXISTS local_err; CREATE TABLE local_err (id int)")
        .await
        .unwrap();
    let failing = || {
        let mut b = msg::bind("", "never_prepared", &[]);
        b.extend(msg::execute(""));
        b
    };
    // (requests, the rows each leaves in the table)
    let cases: Vec<(Vec<Vec<u8>>, i64)> = vec![
        // In a transaction block: failed at the Sync, COMMIT rolls back.
        (
            vec![
                msg::query("BEGIN"),
                [
                    msg::run("INSERT INTO local_err VALUES (1)", &[]),
                    failing(),
                    msg::sync(),
                ]
                .concat(),
                msg::query("SELECT 1"),
                msg::query("COMMIT"),
            ],
            0,
        ),
        // BEGIN inside the batch.
        (
            vec![
                [
                    msg::run("BEGIN", &[]),
                    msg::run("INSERT INTO local_err VALUES (2)", &[]),
                    failing(),
                    msg::run("INSERT INTO local_err VALUES (3)", &[]),
                    msg::sync(),
                ]
                .concat(),
                msg::query("COMMIT"),
            ],
            0,
        ),
        // The implicit transaction of a batch: its earlier write is undone.
        (
            vec![
                [
                    msg::run("INSERT INTO local_err VALUES (4)", &[]),
                    failing(),
                    msg::sync(),
                ]
                .concat(),
                msg::query("SELECT 1"),
            ],
            0,
        ),
        // After the server's own error in the batch: one error, as on PostgreSQL.
        (
            vec![
                msg::query("BEGIN"),
                [
                    msg::run("INSERT INTO local_err VALUES (5)", &[]),
                    msg::run("SELECT 1/0", &[]),
                    failing(),
                    msg::sync(),
                ]
                .concat(),
                msg::query("ROLLBACK"),
            ],
            0,
        ),
        // And a transaction that wrote nothing yet.
        (
            vec![
                msg::query("BEGIN"),
                [failing(), msg::sync()].concat(),
                msg::query("SELECT 1"),
                msg::query("ROLLBACK"),
                msg::query("INSERT INTO local_err VALUES (6)"),
            ],
            1,
        ),
    ];
    for (requests, rows) in cases {
        let mut answers = Vec::new();
        for target in [addr, ([127, 0, 0, 1], port).into()] {
            let user = if target == addr { "trusty" } else { "postgres" };
            let mut r = Raw::startup(target, user, "app").await;
            r.until_ready().await;
            let mut got = Vec::new();
            for req in &requests {
                r.send(req).await;
                got.push(r.answer().await);
            }
            let n: i64 = check
                .query_one("SELECT count(*) FROM local_err", &[])
                .await
                .unwrap()
                .get(0);
            check.batch_execute("TRUNCATE local_err").await.unwrap();
            assert_eq!(n, rows, "rows left through {target}: {got:?}");
            answers.push(got);
        }
        assert_eq!(answers[0], answers[1], "through pgshard, then direct");
    }
}

#[tokio::test]
async fn pipelined_queries_are_answered_in_order() {
    let addr = start_proxy_yaml(&base_yaml("transaction", 2));
    let mut proxy = Raw::startup(addr, "trusty", "app").await;
    proxy.until_ready().await;
    let port = cluster().shards[0].primary.port;
    let mut direct = Raw::startup(([127, 0, 0, 1], port).into(), "postgres", "app").await;
    direct.until_ready().await;
    // pgshard answers a DEALLOCATE of a name no server knows, and LISTEN, itself: after the
    // server's answers before them, and with the status those leave (an error in a
    // transaction aborts it).
    pipelined_answers_match(
        &mut proxy,
        &mut direct,
        &[
            "SELECT * FROM no_such_table",
            "DEALLOCATE nosuch",
            "SELECT * FROM no_such_table",
            "LISTEN pipelined",
            "BEGIN",
            "DEALLOCATE nosuch",
            "LISTEN pipelined",
            "SELECT 1",
            "ROLLBACK",
            "UNLISTEN pipelined",
            "SELECT 1",
        ],
    )
    .await;
}

#[tokio::test]
async fn psql_and_pgbench_in_transaction_mode() {
    let addr = start_proxy_yaml(&base_yaml("transaction", 10));
    let port = addr.port().to_string();
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-d",
            "app",
            "-At",
        ])
        .args(["-c", "SELECT 40 + 2", "-c", "SHOW application_name"])
        .env("PGPASSWORD", "app")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\npsql\n");
    let pgbench = |args: &[&str]| pgbench(addr.port(), args);
    pgbench(&["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let text = pgbench(&["-M", mode, "-c", "8", "-j", "2", "-t", "150"]);
        assert!(
            text.contains("number of failed transactions: 0 (0.000%)"),
            "pgbench -M {mode}: {text}"
        );
        assert!(
            text.contains("number of transactions actually processed: 1200/1200"),
            "{text}"
        );
    }
    let text = pgbench(&["-M", "prepared", "-S", "-c", "4", "-t", "200"]);
    assert!(text.contains("actually processed: 800/800"), "{text}");
}

#[tokio::test]
async fn pgbench_in_session_mode() {
    // Its own database: pgbench -i drops and recreates its tables.
    let port = proxy_on_own_database("bench2", "session", 6).port();
    let run = |args: &[&str]| pgbench(port, args);
    run(&["-i", "-s", "1", "-q", "--foreign-keys"]);
    for mode in ["simple", "extended", "prepared"] {
        let text = run(&["-M", mode, "-c", "4", "-t", "100"]);
        assert!(
            text.contains("actually processed: 400/400"),
            "-M {mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "-M {mode}: {text}"
        );
    }
}

#[tokio::test]
async fn md5_and_trust_users() {
    let addr = tx_proxy();
    let c = try_connect(addr, "m5", "m5pw", "app").await.unwrap();
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let e = try_connect(addr, "m5", "bad", "app").await.err().unwrap();
    assert_eq!(sqlstate(&e), "28P01");
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=trusty dbname=app", addr.port()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_server_connection_dying_affects_only_its_client() {
    let addr = start_proxy_yaml(&base_yaml("transaction", 4));
    let direct = connect_direct().await;
    let bystander = connect(addr).await;
    let victim = |name: &'static str| async move {
        connect_with(addr, &format!("application_name={name}")).await
    };
    let kill = |name: &'static str| {
        let direct = &direct;
        async move {
            let n: i64 = direct
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "one server connection runs {name}'s transaction");
        }
    };
    // Killed while running a query: the query fails, the session goes on (transaction mode).
    let a = victim("victim_a").await;
    let running = tokio::spawn(async move {
        let r = a.batch_execute("SELECT pg_sleep(30)").await;
        (a, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill("victim_a").await;
    let (a, r) = running.await.unwrap();
    let code = sqlstate(&r.unwrap_err());
    assert!(code == "57P01" || code == "08006", "{code}");
    let one: i32 = a.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // Killed while idle in a transaction: the client learns it at its next statement (its
    // connection ends, as with PostgreSQL itself).
    let b = victim("victim_b").await;
    b.batch_execute("BEGIN; SELECT 1").await.unwrap();
    kill("victim_b").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.batch_execute("SELECT 1").await.is_err());
    // Nobody else noticed.
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    connect(addr).await.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_the_server_closed_while_idle_are_not_handed_out() {
    // Its own server, to restart.
    let mut c = own_cluster(1, 0);
    let (addr, server) = start_proxy_server(
        pgshard::config::Config::from_yaml(&c.config_yaml("127.0.0.1:0", "transaction", 4))
            .unwrap(),
    );
    let clients = futures_util::future::join_all((0..4).map(|_| connect(addr))).await;
    let fill_pool = async || {
        // Four transactions at once: four server connections, idle in the pool after.
        let all = clients
            .iter()
            .map(|cl| cl.batch_execute("SELECT pg_sleep(0.2)"));
        for r in futures_util::future::join_all(all).await {
            r.unwrap();
        }
    };
    let closed_for = |reason: &str| {
        let m = pgshard::admin::metrics::render(&server);
        sample(
            &m,
            "pgshard_pool_connections_closed_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    let closed = || closed_for("server_closed");
    fill_pool().await;
    // Terminated while idle (pg_terminate_backend, idle_session_timeout).
    assert_eq!(
        terminate_pool_connections(c.shards[0].primary.port).await,
        4
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for cl in &clients {
        cl.batch_execute("SELECT 1").await.unwrap();
    }
    assert!(closed() >= 4.0, "{}", closed());
    // The server restarted between two health checks: every idle connection is dead.
    fill_pool().await;
    c.restart(0, None).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for cl in &clients {
        cl.batch_execute("SELECT 1").await.unwrap();
    }
    // Found closed at checkout, or dropped by the monitor if its check saw the server
    // down first (a slow restart under load): either way never handed out.
    let gone = closed() + closed_for("invalidated");
    assert!(gone >= 8.0, "{gone}");
}

/// A query string pgshard runs statement by statement (here because of UNLISTEN) that
/// resets settings, as asyncpg's pool does on every release: the client's settings follow
/// the RESET to its next server connection, even after another client used the one it
/// ran on.
#[tokio::test]
async fn a_reset_in_a_query_string_follows_the_client() {
    let addr = proxy_on_own_database("reset_script", "transaction", 1);
    let a = connect(addr).await;
    let b = connect(addr).await;
    a.batch_execute("SET application_name = 'pooled'; SET work_mem = '7MB'")
        .await
        .unwrap();
    a.batch_execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
        .await
        .unwrap();
    // Another client's settings on the one server connection.
    b.batch_execute("SET work_mem = '9MB'").await.unwrap();
    let show = |sql: &'static str| {
        let a = &a;
        async move { a.query_one(sql, &[]).await.unwrap().get::<_, String>(0) }
    };
    assert_ne!(show("SHOW application_name").await, "pooled");
    assert_ne!(show("SHOW work_mem").await, "7MB");
    assert_ne!(show("SHOW work_mem").await, "9MB");
}

/// The first column of each row of a simple query.
async fn column(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    rows_or_sqlstate(c, sql).await.map(|rows| {
        rows.into_iter()
            .map(|r| r[0].clone().unwrap_or_default())
            .collect()
    })
}

#[tokio::test]
async fn sql_prepared_statements_follow_their_client_in_transaction_mode() {
    // One server connection for every client: a statement one client prepares with SQL
    // PREPARE must be neither visible to nor in the way of another, and must stay its
    // client's across transactions, as on a server of its own.
    let addr = start_proxy_yaml(&base_yaml("transaction", 1));
    let a = connect(addr).await;
    let b = connect(addr).await;
    let ok = |v: &[&str]| Ok::<Vec<String>, String>(v.iter().map(|s| s.to_string()).collect());
    let missing = Err::<Vec<String>, String>("26000".into());

    column(&a, "PREPARE p1(int) AS SELECT $1 + 1")
        .await
        .unwrap();
    assert_eq!(column(&b, "EXECUTE p1(5)").await, missing);
    column(&b, "PREPARE p1(int) AS SELECT $1 * 10")
        .await
        .unwrap();
    assert_eq!(column(&b, "EXECUTE p1(5)").await, ok(&["50"]));
    assert_eq!(column(&a, "EXECUTE p1(5)").await, ok(&["6"]));
    assert_eq!(
        column(&a, "PREPARE p1 AS SELECT 1").await,
        Err("42P05".into()),
        "a name the client holds"
    );
    // What the server shows each client is its own.
    let mine = "SELECT name FROM pg_prepared_statements WHERE from_sql ORDER BY 1";
    assert_eq!(column(&b, mine).await, ok(&["p1"]));

    // Inside a transaction block, in a string of several statements, over the extended
    // protocol: each kept after its transaction.
    column(&a, "BEGIN; PREPARE p2 AS SELECT 'two'; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        column(&a, "PREPARE p3 AS SELECT 3; EXECUTE p3").await,
        ok(&["3"])
    );
    a.execute("PREPARE p4 AS SELECT 4", &[]).await.unwrap();
    assert_eq!(column(&a, "EXECUTE p2").await, ok(&["two"]));
    assert_eq!(column(&a, "EXECUTE p3").await, ok(&["3"]));
    let four: i32 = a.query_one("EXECUTE p4", &[]).await.unwrap().get(0);
    assert_eq!(four, 4);
    assert_eq!(column(&a, mine).await, ok(&["p1", "p2", "p3", "p4"]));
    assert_eq!(column(&b, mine).await, ok(&["p1"]));

    // A PREPARE that failed is not kept; DEALLOCATE and DISCARD ALL drop, as on a server.
    assert_eq!(
        column(&a, "PREPARE bad AS SELECT * FROM no_such_table").await,
        Err("42P01".into())
    );
    assert_eq!(column(&a, "EXECUTE bad").await, missing);
    column(&a, "DEALLOCATE p1").await.unwrap();
    assert_eq!(column(&a, "EXECUTE p1(1)").await, missing);
    assert_eq!(column(&a, "DEALLOCATE p1").await, missing);
    assert_eq!(column(&a, "EXECUTE p2").await, ok(&["two"]));
    column(&a, "DEALLOCATE ALL").await.unwrap();
    assert_eq!(column(&a, "EXECUTE p2").await, missing);
    assert_eq!(column(&b, "EXECUTE p1(7)").await, ok(&["70"]));
    column(&b, "DISCARD ALL").await.unwrap();
    assert_eq!(column(&b, "EXECUTE p1(7)").await, missing);

    // A client that leaves takes its statements with it.
    column(&a, "PREPARE left_behind AS SELECT 1").await.unwrap();
    drop(a);
    let c = connect(addr).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while column(&c, mine).await != ok(&[]) {
        assert!(
            Instant::now() < deadline,
            "a statement of a client that left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(column(&c, "EXECUTE left_behind").await, missing);
}

/// SQL-level prepared statements in transaction mode (pgshard keeps them and prepares
/// them on whichever server connection the client gets): their errors are PostgreSQL's.
#[tokio::test]
async fn sql_prepared_statement_errors_match_postgres() {
    let addr = start_proxy_yaml(&base_yaml("transaction", 2));
    let mut proxy = Raw::startup(addr, "trusty", "app").await;
    proxy.until_ready().await;
    let port = cluster().shards[0].primary.port;
    let mut direct = Raw::startup(([127, 0, 0, 1], port).into(), "postgres", "app").await;
    direct.until_ready().await;
    pipelined_answers_match(
        &mut proxy,
        &mut direct,
        &[
            "PREPARE missing_t AS SELECT * FROM no_such_table",
            "EXECUTE missing_t",
            "PREPARE bad_syntax AS SELEC 1",
            "PREPARE ok_p(int) AS SELECT $1 + 1",
            "PREPARE ok_p(int) AS SELECT $1 + 2",
            "EXECUTE ok_p(1)",
            "EXECUTE ok_p('x')",
            "EXECUTE ok_p(1, 2)",
            "EXECUTE nope",
            "DEALLOCATE nope",
            "BEGIN",
            "PREPARE in_tx AS SELECT * FROM no_such_table",
            "ROLLBACK",
            "EXECUTE in_tx",
            "BEGIN",
            "PREPARE in_tx2 AS SELECT 2",
            "ROLLBACK",
            "EXECUTE in_tx2",
            "DEALLOCATE ok_p",
            "EXECUTE ok_p(1)",
            "DEALLOCATE ALL",
        ],
    )
    .await;
}
