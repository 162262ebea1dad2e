//! `pool.statement_cache`: unnamed statements and simple queries that pgshard prepares on
//! the servers on its own. Every answer is compared with the same request sent straight
//! to PostgreSQL; `pg_prepared_statements` (read through a pool of one server connection)
//! shows what pgshard prepared.

mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio_postgres::SimpleQueryMessage;

/// A proxy with both caches on, over one server connection, so that what it prepared can
/// be read back through it.
fn cached_proxy(per_connection: usize) -> SocketAddr {
    cached_proxy_server(per_connection).0
}

fn cached_proxy_server(
    per_connection: usize,
) -> (SocketAddr, std::sync::Arc<pgshard::frontend::Server>) {
    let yaml = base_yaml("transaction", 1).replace(
        "checkout_timeout_ms: 5000",
        &format!(
            "checkout_timeout_ms: 5000, statement_cache: {{ unnamed: true, simple: true, per_connection: {per_connection} }}"
        ),
    );
    assert!(yaml.contains("statement_cache"), "{yaml}");
    start_proxy_server(pgshard::config::Config::from_yaml(&yaml).unwrap())
}

/// A counter of the server statements of shard 0.
fn statements_metric(server: &pgshard::frontend::Server, what: &str) -> f64 {
    let m = pgshard::admin::metrics::render(server);
    sample(
        &m,
        &format!("pgshard_server_statements_{what}_total"),
        &["shard=\"0\""],
    )
}

fn shared_cached_proxy() -> SocketAddr {
    static P: OnceLock<SocketAddr> = OnceLock::new();
    *P.get_or_init(|| cached_proxy(500))
}

/// What a simple query returned, in a form to compare: each row with its column names,
/// command tags' row counts, or the error's SQLSTATE and message.
async fn outcome(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    match c.simple_query(sql).await {
        Ok(msgs) => msgs
            .iter()
            .map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    let cols: Vec<String> = r
                        .columns()
                        .iter()
                        .enumerate()
                        .map(|(i, col)| format!("{}={:?}", col.name(), r.get(i)))
                        .collect();
                    cols.join(",")
                }
                SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
                SimpleQueryMessage::RowDescription(d) => {
                    let names: Vec<&str> = d.iter().map(|c| c.name()).collect();
                    format!("columns {names:?}")
                }
                _ => "other".into(),
            })
            .collect(),
        Err(e) => vec![format!(
            "error {} {}",
            sqlstate(&e),
            e.as_db_error().map(|d| d.message()).unwrap_or("")
        )],
    }
}

async fn prepared_texts(c: &tokio_postgres::Client) -> Vec<String> {
    rows(
        &c.simple_query(
            "SELECT statement FROM pg_prepared_statements WHERE name LIKE 'pgshard_%' ORDER BY 1",
        )
        .await
        .unwrap(),
    )
    .into_iter()
    .map(|r| r[0].clone().unwrap())
    .collect()
}

async fn setup(tables: &str) {
    let direct = connect_direct().await;
    direct.batch_execute(tables).await.unwrap();
}

#[tokio::test]
async fn simple_queries_run_as_prepared_statements_with_postgresql_answers() {
    setup(
        "DROP TABLE IF EXISTS sc_acc;
         CREATE TABLE sc_acc (id int PRIMARY KEY, big bigint, amount numeric, name text, flag smallint);
         INSERT INTO sc_acc SELECT g, g * 10000000000, g / 4.0, 'n' || g, g % 3 FROM generate_series(-5, 40) g;",
    )
    .await;
    let addr = shared_cached_proxy();
    let proxy = connect(addr).await;
    let direct = connect_direct().await;
    let queries = [
        "SELECT * FROM sc_acc WHERE id = 7",
        "SELECT name FROM sc_acc WHERE id=-3",
        "SELECT name FROM sc_acc WHERE id = - 4",
        "select id, big from sc_acc where big >= 300000000000 and id <> 35 order by id",
        "SELECT id FROM sc_acc WHERE amount < 1.5 AND amount > -0.25 ORDER BY 1",
        "SELECT id FROM sc_acc WHERE amount = 2.5e0",
        "SELECT id FROM sc_acc WHERE big = 99999999999999999999",
        "SELECT id FROM sc_acc WHERE flag = 2 AND id <= 10 ORDER BY id LIMIT 3",
        // Column names and types of comparisons and of what stays in the text.
        "SELECT id = 3, 5, id + 1 FROM sc_acc WHERE id = 3",
        "SELECT count(*) FILTER (WHERE id > 20) FROM sc_acc WHERE flag <> 1",
        "SELECT CASE WHEN id = 1 THEN 'one' ELSE 'other' END FROM sc_acc WHERE id < 3 ORDER BY id",
        "WITH x AS (SELECT id FROM sc_acc WHERE id > 30) SELECT count(*) FROM x WHERE id != 33",
        // The server cannot prepare these with parameters: the query goes as written.
        "SELECT id = 3 FROM sc_acc WHERE id < 5 GROUP BY id = 3 ORDER BY 1",
        // Errors are PostgreSQL's own: a wrong operator, division by zero, no such column.
        "SELECT * FROM sc_acc WHERE name = 5",
        "SELECT 1 / (id - id) FROM sc_acc WHERE id = 4",
        "SELECT nope FROM sc_acc WHERE id = 4",
        // Writes: command tags with row counts.
        "UPDATE sc_acc SET flag = flag + 1 WHERE id = 12",
        "DELETE FROM sc_acc WHERE id = 40",
        "INSERT INTO sc_acc SELECT id + 100, big, amount, name, flag FROM sc_acc WHERE id = 11",
        "SELECT count(*), sum(flag) FROM sc_acc WHERE id >= 0",
    ];
    // Three times: first as sent, then prepared, then from the server's cache.
    for round in 0..3 {
        for q in queries {
            // Both paths reach the same table: a write's effect is undone after each.
            let restore = async || {
                direct
                    .batch_execute(
                        "DELETE FROM sc_acc WHERE id > 100;
                         INSERT INTO sc_acc VALUES (40, 400000000000, 10.0, 'n40', 1) ON CONFLICT DO NOTHING;",
                    )
                    .await
                    .unwrap()
            };
            let through = outcome(&proxy, q).await;
            restore().await;
            let expected = outcome(&direct, q).await;
            restore().await;
            assert_eq!(through, expected, "round {round}: {q}");
        }
    }
    let texts = prepared_texts(&proxy).await;
    assert!(
        texts.contains(&"SELECT * FROM sc_acc WHERE id = $1::int4".to_string()),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("big >= $1::int8 and id <> $2::int4")),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("amount < $1::numeric")),
        "{texts:?}"
    );
    // Inside a transaction block queries go as written.
    let before = prepared_texts(&proxy).await.len();
    for _ in 0..3 {
        let got = outcome(
            &proxy,
            "BEGIN; SELECT name FROM sc_acc WHERE id = 9 AND flag >= 0; COMMIT",
        )
        .await;
        assert!(got.iter().any(|r| r.contains("n9")), "{got:?}");
    }
    proxy
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .unwrap();
    assert_eq!(prepared_texts(&proxy).await.len(), before);
}

#[tokio::test]
async fn a_changed_table_does_not_fail_cached_simple_queries() {
    setup(
        "DROP TABLE IF EXISTS sc_chg;
         CREATE TABLE sc_chg (id int);
         INSERT INTO sc_chg VALUES (1), (2);",
    )
    .await;
    // Its own proxy: on the shared one another test's client can get the one server
    // connection closed (a disconnect mid-query), and with it the statements looked for.
    let addr = cached_proxy(500);
    let c = connect(addr).await;
    let q = "SELECT * FROM sc_chg WHERE id = 1";
    for _ in 0..3 {
        assert_eq!(
            outcome(&c, q).await,
            ["columns [\"id\"]", "id=Some(\"1\")", "complete 1"]
        );
    }
    assert!(
        prepared_texts(&c)
            .await
            .iter()
            .any(|t| t.contains("sc_chg"))
    );
    c.batch_execute("ALTER TABLE sc_chg ADD COLUMN extra text DEFAULT 'x'")
        .await
        .unwrap();
    // The server refuses its cached plan ("cached plan must not change result type");
    // the client never sees that: the query runs as written, then is prepared afresh.
    for _ in 0..3 {
        assert_eq!(
            outcome(&c, q).await,
            [
                "columns [\"id\", \"extra\"]",
                "id=Some(\"1\"),extra=Some(\"x\")",
                "complete 1"
            ]
        );
    }
}

/// Sends the frames, then reads the answer (see [`answer`]).
async fn exchange(r: &mut Raw, frames: &[Vec<u8>]) -> Vec<(u8, Vec<u8>)> {
    r.send(&frames.concat()).await;
    answer(r).await
}

/// Messages up to ReadyForQuery: (tag, body).
async fn answer(r: &mut Raw) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((t, b)) = r.recv().await {
        out.push((t, b));
        if t == b'Z' {
            break;
        }
    }
    out
}

fn tags(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

fn values(msgs: &[(u8, Vec<u8>)]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| data_row(b))
        .collect()
}

/// The SQLSTATE of the first error among the messages.
fn code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    Some(error_field(body, b'C'))
}

/// Opens raw connections through pgshard and straight to PostgreSQL.
async fn raw_pair(addr: SocketAddr) -> (Raw, Raw) {
    let mut proxy = Raw::startup(addr, "trusty", "app").await;
    proxy.until_ready().await;
    let port = cluster().shards[0].primary.port;
    let mut direct = Raw::startup(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "postgres",
        "app",
    )
    .await;
    direct.until_ready().await;
    (proxy, direct)
}

#[tokio::test]
async fn unnamed_statements_answer_as_postgresql_does() {
    setup(
        "DROP TABLE IF EXISTS sc_un;
         CREATE TABLE sc_un (id int PRIMARY KEY, v text);
         INSERT INTO sc_un SELECT g, 'v' || g FROM generate_series(1, 20) g;",
    )
    .await;
    let addr = shared_cached_proxy();
    let (mut p, mut d) = raw_pair(addr).await;
    let select = "SELECT v FROM sc_un WHERE id = $1";
    // Each exchange is sent to both; tags and rows must be the same.
    let cases: Vec<Vec<Vec<u8>>> = vec![
        // Parse, Bind, Describe portal, Execute, Sync, several times with new values.
        vec![
            msg::parse("", select),
            msg::bind("", "", &["3"]),
            describe_portal(),
            msg::execute(""),
            msg::sync(),
        ],
        vec![
            msg::parse("", select),
            msg::bind("", "", &["4"]),
            describe_portal(),
            msg::execute(""),
            msg::sync(),
        ],
        // Describe of the unnamed statement: ParameterDescription and RowDescription.
        vec![msg::parse("", select), msg::describe_stmt(""), msg::sync()],
        // Two Binds of one Parse, in one batch.
        vec![
            msg::parse("", select),
            msg::bind("", "", &["5"]),
            msg::execute(""),
            msg::bind("", "", &["6"]),
            msg::execute(""),
            msg::sync(),
        ],
        // Bind in a later batch than its Parse.
        vec![msg::parse("", select), msg::sync()],
        vec![msg::bind("", "", &["7"]), msg::execute(""), msg::sync()],
        // A write, then an error at Parse, then a statement after it.
        vec![
            msg::parse("", "UPDATE sc_un SET v = v || '!' WHERE id = $1"),
            msg::bind("", "", &["8"]),
            msg::execute(""),
            msg::sync(),
        ],
        vec![
            msg::parse("", "SELECT nope FROM sc_un WHERE id = $1"),
            msg::bind("", "", &["1"]),
            msg::execute(""),
            msg::sync(),
        ],
        vec![
            msg::parse("", select),
            msg::bind("", "", &["8"]),
            msg::execute(""),
            msg::sync(),
        ],
        // An error at Bind (bad parameter), then the statement again.
        vec![
            msg::parse("", select),
            msg::bind("", "", &["x"]),
            msg::execute(""),
            msg::sync(),
        ],
        vec![msg::bind("", "", &["9"]), msg::execute(""), msg::sync()],
        // Closing the unnamed statement.
        vec![msg::close_stmt(""), msg::sync()],
        // Not cached: a utility statement.
        vec![
            msg::parse("", "SHOW TimeZone"),
            msg::bind("", "", &[]),
            msg::execute(""),
            msg::sync(),
        ],
        // Inside a transaction.
        vec![msg::query("BEGIN")],
        vec![
            msg::parse("", select),
            msg::bind("", "", &["10"]),
            msg::execute(""),
            msg::sync(),
        ],
        vec![msg::query("COMMIT")],
    ];
    for (i, frames) in cases.iter().enumerate() {
        let got = exchange(&mut p, frames).await;
        let want = exchange(&mut d, frames).await;
        assert_eq!(tags(&got), tags(&want), "case {i}");
        assert_eq!(values(&got), values(&want), "case {i}");
        assert_eq!(code(&got), code(&want), "case {i}");
        if i == 12 {
            // SHOW's value may differ between the two sessions' settings: tags suffice.
            continue;
        }
        let descr = |m: &[(u8, Vec<u8>)]| -> Vec<Vec<u8>> {
            m.iter()
                .filter(|(t, _)| matches!(t, b'T' | b't'))
                .map(|(_, b)| b.clone())
                .collect()
        };
        // Table OIDs in RowDescription are the same server's.
        assert_eq!(descr(&got), descr(&want), "case {i}");
    }
    let c = connect(addr).await;
    let texts = prepared_texts(&c).await;
    assert!(texts.contains(&select.to_string()), "{texts:?}");
    assert!(!texts.iter().any(|t| t.contains("SHOW")), "{texts:?}");
    assert!(!texts.iter().any(|t| t.contains("nope")), "{texts:?}");
}

#[tokio::test]
async fn a_changed_table_does_not_fail_cached_unnamed_statements() {
    setup(
        "DROP TABLE IF EXISTS sc_chg2;
         CREATE TABLE sc_chg2 (id int);
         INSERT INTO sc_chg2 VALUES (1), (2);",
    )
    .await;
    // Its own proxy: its one server connection holds the statements of this test only.
    let (addr, server) = cached_proxy_server(500);
    let (mut p, mut d) = raw_pair(addr).await;
    let select = "SELECT * FROM sc_chg2 WHERE id = $1";
    let run = vec![
        msg::parse("", select),
        msg::bind("", "", &["1"]),
        describe_portal(),
        msg::execute(""),
        msg::sync(),
    ];
    let describe = vec![msg::parse("", select), msg::describe_stmt(""), msg::sync()];
    let descr = |m: &[(u8, Vec<u8>)]| -> Vec<Vec<u8>> {
        m.iter()
            .filter(|(t, _)| matches!(t, b'T' | b't'))
            .map(|(_, b)| b.clone())
            .collect()
    };
    let mut column = 0;
    let mut alter = async |d: &mut Raw| {
        column += 1;
        let sql = format!("ALTER TABLE sc_chg2 ADD COLUMN c{column} int DEFAULT {column}");
        assert_eq!(code(&exchange(d, &[msg::query(&sql)]).await), None);
    };
    // Each case: the table changes after the statement was prepared and used, then the
    // same batch goes through pgshard and straight to PostgreSQL. PostgreSQL parses the
    // unnamed statement afresh; pgshard, which answered the Parse from its cache, must
    // not let the server's refusal of the old plan through.
    for (i, frames) in [&run, &describe, &run].into_iter().enumerate() {
        for _ in 0..2 {
            exchange(&mut p, frames).await;
        }
        alter(&mut d).await;
        let got = exchange(&mut p, frames).await;
        let want = exchange(&mut d, frames).await;
        assert_eq!(code(&got), None, "case {i}: {got:?}");
        assert_eq!(tags(&got), tags(&want), "case {i}");
        assert_eq!(values(&got), values(&want), "case {i}");
        assert_eq!(descr(&got), descr(&want), "case {i}");
        // Prepared afresh: the next batch is answered from the cache again.
        let again = exchange(&mut p, frames).await;
        assert_eq!(tags(&again), tags(&want), "case {i}");
    }
    // A client that sends its next batch before the answer to the refused one: that one
    // cannot go again before the next, so it reports the refusal, and every answer keeps
    // its place (never the next batch's rows as this one's).
    exchange(&mut p, &run).await;
    alter(&mut d).await;
    let next = [
        msg::parse("", "SELECT 'next'"),
        msg::bind("", "", &[]),
        msg::execute(""),
        msg::sync(),
    ];
    let got = exchange(&mut p, &[run.concat(), next.concat()]).await;
    assert_eq!(code(&got).as_deref(), Some("0A000"), "{got:?}");
    assert_eq!(tags(&got), "1EZ");
    assert_eq!(values(&answer(&mut p).await), [[Some("next".to_string())]]);
    let want = exchange(&mut d, &run).await;
    assert_eq!(values(&exchange(&mut p, &run).await), values(&want));
    // The three batches sent again; the pipelined one was not.
    assert_eq!(statements_metric(&server, "retried"), 3.0);
    assert!(statements_metric(&server, "reused") >= 6.0);
}

fn describe_portal() -> Vec<u8> {
    let mut b = vec![b'D'];
    b.extend(6i32.to_be_bytes());
    b.extend([b'P', 0]);
    b
}

#[tokio::test]
async fn each_server_connection_keeps_at_most_so_many_statements() {
    let (addr, server) = cached_proxy_server(3);
    let mut r = Raw::startup(addr, "trusty", "app").await;
    r.until_ready().await;
    // Ten distinct statements, then the first ones again (closed and prepared anew).
    for round in 0..2 {
        for i in 0..10 {
            let sql = format!("SELECT $1::int + {i}");
            let got = exchange(
                &mut r,
                &[
                    msg::parse("", &sql),
                    msg::bind("", "", &["1"]),
                    msg::execute(""),
                    msg::sync(),
                ],
            )
            .await;
            assert_eq!(
                values(&got),
                [[Some((1 + i).to_string())]],
                "round {round} statement {i}: {}",
                tags(&got)
            );
        }
    }
    // Twenty Parses; each past the third closed the least recently used statement.
    assert_eq!(statements_metric(&server, "prepared"), 20.0);
    assert_eq!(statements_metric(&server, "evicted"), 17.0);
    assert_eq!(statements_metric(&server, "reused"), 0.0);
    let c = connect(addr).await;
    let texts = prepared_texts(&c).await;
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(
        texts.contains(&"SELECT $1::int + 9".to_string()),
        "{texts:?}"
    );
}

#[tokio::test]
async fn pgbench_and_psql_through_the_statement_cache() {
    let addr = shared_cached_proxy();
    let port = addr.port();
    // Its own tables: pgbench -i drops and creates pgbench_*.
    pgbench(port, &["-i", "-s", "1", "-q"]);
    // One thread per client: pgbench -M prepared prepares with a blocking call, which with
    // two clients on a thread and one server connection waits on the client it blocks.
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(port, &["-M", mode, "-c", "4", "-j", "4", "-t", "200", "-n"]);
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
        let out = pgbench(
            port,
            &["-M", mode, "-S", "-c", "4", "-j", "4", "-t", "300", "-n"],
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    let c = connect(addr).await;
    let texts = prepared_texts(&c).await;
    // -M simple: the literal became a parameter; -M extended: the unnamed statement.
    assert!(
        texts
            .iter()
            .any(|t| t.contains("FROM pgbench_accounts WHERE aid = $1::int4")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("FROM pgbench_accounts WHERE aid = $1") && !t.contains("::int4")),
        "{texts:?}"
    );
    assert_eq!(
        psql(
            port,
            "app",
            "app",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ),
        psql(
            cluster().shards[0].primary.port,
            "app",
            "app",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        )
    );
}

#[test]
fn the_statement_cache_is_refused_in_session_mode() {
    let yaml = base_yaml("session", 1).replace(
        "checkout_timeout_ms: 5000",
        "checkout_timeout_ms: 5000, statement_cache: { unnamed: true }",
    );
    let e = pgshard::config::Config::from_yaml(&yaml)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pool.statement_cache"), "{e}");
}
