//! Routing over two real shards, checked against where rows really are and, for query
//! results, against one plain PostgreSQL database holding the same data (differential).

mod common;

use common::*;
use pgshard::sharding::column::Observed;
use pgshard::sharding::hash::{HashKey, partition_of};
use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio_postgres::SimpleQueryMessage;

const RULES: &str = "    reference_tables: [countries]
    sharded_tables:
      - { table: users, column: id, method: hash }
      - { table: orders, column: user_id, method: hash }
      - { table: split_t, column: id, method: hash }
      - { table: orders_archive, column: user_id, method: hash }
      - { table: prepared_t, column: id, method: hash }
      - { table: codes_t, column: code, method: hash, type: text }
      - table: events
        column: created_at
        method: range
        type: timestamptz
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ]
      - { table: ident_t, column: id, method: hash }
      - table: computed_t
        column: created_at
        method: range
        type: timestamptz
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ]
      - table: filter_t
        column: created_at
        method: range
        type: timestamptz
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', to: '2030-01-01', shard: 1 } ]
      - table: span_t
        column: at
        method: range
        type: timestamptz
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ]
      - table: local_t
        column: at
        method: range
        type: timestamp
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ]
      - table: round_t
        column: at
        method: range
        type: timestamptz
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ]
      - table: round_n
        column: k
        method: range
        type: numeric(10,1)
        ranges: [ { to: 5, shard: 0 }, { from: 5, shard: 1 } ]
      - { table: round_v, column: code, method: hash, type: text }
      - { table: round_other, column: id, method: hash }
      - { table: ret_t, column: id, method: hash }
      - table: ret_at
        column: at
        method: range
        type: timestamptz
        ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ]
      - { table: unlisted_t, column: id, method: hash }
      - { table: big_t, column: id, method: hash }
      - { table: unlisted_missing, column: id, method: hash }
      - table: accounts
        column: region
        method: list
        lists: [ { values: [eu, uk], shard: 0 }, { values: [us, ca], shard: 1 } ]
";

const SCHEMA: &str = "
DROP TABLE IF EXISTS users, orders, events, accounts, countries, split_t;
CREATE TABLE users (id bigint PRIMARY KEY, name text, score numeric);
CREATE TABLE orders (id bigint, user_id bigint, total numeric);
CREATE TABLE events (id int, created_at timestamptz);
CREATE TABLE accounts (id int, region text);
CREATE TABLE countries (code text PRIMARY KEY, name text);
CREATE TABLE split_t (id bigint PRIMARY KEY, name text);
";

/// The rows of `q` through pgshard, checked to be those of the plain database.
async fn same_as_plain(
    c: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    q: &str,
) -> Vec<Vec<Option<String>>> {
    let a = rows(&c.simple_query(q).await.unwrap());
    let b = rows(&plain.simple_query(q).await.unwrap());
    assert_eq!(a, b, "{q}");
    a
}

/// The first column of `q`'s rows with `params` (extended protocol) through pgshard,
/// checked to be the plain database's.
async fn same_column_as_plain<T>(
    c: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    q: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a> + PartialEq + std::fmt::Debug,
{
    let column = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<Vec<T>>();
    let a = column(c.query(q, params).await.unwrap());
    assert_eq!(a, column(plain.query(q, params).await.unwrap()), "{q}");
    a
}

/// How many `Shard N` plans pgshard's EXPLAIN of `q` shows: one per shard that runs it,
/// or none when one shard does (its plan alone).
async fn shard_plans(c: &tokio_postgres::Client, q: &str) -> usize {
    let plan = rows(&c.simple_query(&format!("EXPLAIN {q}")).await.unwrap());
    plan.iter()
        .flatten()
        .flatten()
        .filter(|l| l.starts_with("Shard "))
        .count()
}

fn ports() -> [u16; 2] {
    let c = cluster2();
    [c.shards[0].primary.port, c.shards[1].primary.port]
}

/// One proxy over the two shards, with the schema created through it (DDL broadcast) and
/// the same schema in a plain database for differential checks.
async fn setup() -> SocketAddr {
    static P: OnceLock<SocketAddr> = OnceLock::new();
    static INIT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let addr = *P.get_or_init(|| {
        let yaml = cluster2()
            .config_yaml("127.0.0.1:0", "transaction", 8)
            .replace("users:\n", "users:\n  - { name: trusty, auth: trust }\n");
        start_proxy_yaml(&format!("{yaml}{RULES}"))
    });
    INIT.get_or_init(|| async {
        let c = connect(addr).await;
        c.batch_execute(SCHEMA).await.unwrap();
        let cl = cluster2();
        cl.psql(ports()[0], "postgres", "CREATE DATABASE plain OWNER app")
            .unwrap();
        connect_server(ports()[0], "plain")
            .await
            .batch_execute(SCHEMA)
            .await
            .unwrap();
        // Users 1..=200 with orders, through pgshard (extended protocol, parameters) and
        // into the plain database.
        let plain = connect_server(ports()[0], "plain").await;
        for id in 1..=200i64 {
            let name = format!("user{:03}", (id * 37) % 200);
            let score = format!("{}.{}", id % 17, id % 10);
            for db in [&c, &plain] {
                db.execute(
                    "INSERT INTO users (id, name, score) VALUES ($1, $2, $3::text::numeric)",
                    &[&id, &name, &score],
                )
                .await
                .unwrap();
                db.batch_execute(&format!(
                    "INSERT INTO orders (id, user_id, total) VALUES ({}, {id}, {}.25)",
                    id * 10,
                    id % 7
                ))
                .await
                .unwrap();
            }
        }
    })
    .await;
    addr
}

#[tokio::test]
async fn ddl_is_broadcast_and_rows_land_on_their_hash_shard() {
    setup().await;
    for (s, port) in ports().into_iter().enumerate() {
        let d = connect_server(port, "app").await;
        let ids: Vec<i64> = d
            .query("SELECT id FROM users", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            ids.len() > 50,
            "shard {s} holds a fair share: {}",
            ids.len()
        );
        for id in &ids {
            assert_eq!(partition_of(&HashKey::Int(*id), 2), s as u64, "user {id}");
        }
        // Orders are co-located with their users.
        let bad: i64 = d
            .query_one(
                "SELECT count(*) FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(bad, 0);
    }
}

#[tokio::test]
async fn ddl_is_all_or_none() {
    let addr = setup().await;
    let c = connect(addr).await;
    let [p0, p1] = ports();
    // The index already exists on shard 1 only: the CREATE fails there and is rolled
    // back on shard 0.
    connect_server(p1, "app")
        .await
        .batch_execute("DROP INDEX IF EXISTS users_dup; CREATE INDEX users_dup ON users (id)")
        .await
        .unwrap();
    let e = c
        .batch_execute("CREATE INDEX users_dup ON users (name)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42P07");
    let exists = |port: u16, sql: &'static str| async move {
        connect_server(port, "app")
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    let t = "SELECT to_regclass('users_dup') IS NOT NULL";
    assert!(!exists(p0, t).await, "rolled back on shard 0");
    assert!(exists(p1, t).await);
    connect_server(p1, "app")
        .await
        .batch_execute("DROP INDEX users_dup")
        .await
        .unwrap();
    // Statements that cannot run in a transaction block still broadcast.
    c.batch_execute("VACUUM users").await.unwrap();
    c.batch_execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS users_name_c ON users (name)")
        .await
        .unwrap();
    let i = "SELECT to_regclass('users_name_c') IS NOT NULL";
    assert!(exists(p0, i).await && exists(p1, i).await);
}

#[tokio::test]
async fn point_queries_and_joins_match_plain_postgres() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for id in [1i64, 2, 77, 150, 200] {
        for q in [
            format!("SELECT id, name, score::text FROM users WHERE id = {id}"),
            format!(
                "SELECT u.name, o.total::text FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = {id} ORDER BY o.id"
            ),
            format!("SELECT * FROM users WHERE id IN ({id}) AND name IS NOT NULL"),
            format!("WITH x AS (SELECT * FROM orders WHERE user_id = {id}) SELECT count(*) FROM x"),
        ] {
            assert!(!same_as_plain(&c, &plain, &q).await.is_empty(), "{q}");
        }
        // Extended protocol, binary parameter.
        let r = c
            .query_one("SELECT name FROM users WHERE id = $1", &[&id])
            .await
            .unwrap();
        let p = plain
            .query_one("SELECT name FROM users WHERE id = $1", &[&id])
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), p.get::<_, String>(0));
    }
}

#[tokio::test]
async fn cross_shard_selects_merge_like_one_database() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for q in [
        "SELECT id, name FROM users ORDER BY id",
        "SELECT id, name FROM users ORDER BY name DESC, id LIMIT 7",
        "SELECT id, score FROM users ORDER BY score, id DESC LIMIT 15",
        "SELECT id FROM users WHERE id IN (3, 4, 5, 6, 7, 8) ORDER BY 1",
        "SELECT o.id, o.total FROM orders o ORDER BY o.total DESC, o.id LIMIT 9",
        "SELECT * FROM users WHERE name = 'user000' ORDER BY id",
        // Aggregates: counts and sums add up, min/max pick, groups merge.
        "SELECT count(*) FROM users",
        "SELECT count(*), sum(id), min(name), max(score), sum(score) FROM users",
        "SELECT count(*) AS n, max(id) FROM users WHERE id > 1000",
        "SELECT user_id % 5 AS g, count(*), sum(total) FROM orders GROUP BY g ORDER BY g",
        "SELECT name, count(*) FROM users GROUP BY name ORDER BY count(*) DESC, name LIMIT 4",
        "SELECT total, count(*), min(user_id) FROM orders GROUP BY 1 ORDER BY 1",
        // OFFSET applies after merging (each shard returns offset + limit rows).
        "SELECT id, name FROM users ORDER BY id LIMIT 5 OFFSET 10",
        "SELECT id, name FROM users ORDER BY name DESC, id OFFSET 195",
        // ORDER BY what is not returned: hidden sort columns, stripped from the result.
        "SELECT id FROM users ORDER BY name, id LIMIT 12",
        "SELECT u.id FROM users u ORDER BY u.score DESC, lower(u.name), u.id LIMIT 9 OFFSET 3",
        "SELECT * FROM users ORDER BY score, id LIMIT 5",
        // DISTINCT: the shards' distinct rows, de-duplicated.
        "SELECT DISTINCT name FROM users ORDER BY name",
        "SELECT DISTINCT total FROM orders ORDER BY total DESC LIMIT 4 OFFSET 1",
        "SELECT DISTINCT user_id % 3 AS r, total FROM orders ORDER BY 1, 2",
        // Grouped by the shard key: each shard computes whole groups, any aggregate.
        "SELECT user_id, sum(total) FROM orders GROUP BY user_id HAVING sum(total) > avg(total) ORDER BY user_id",
        "SELECT u.id, count(DISTINCT u.name), string_agg(u.name, ',' ORDER BY u.name), avg(u.score) FROM users u GROUP BY u.id HAVING count(*) = 1 ORDER BY 4 DESC, 1 LIMIT 7 OFFSET 3",
        "SELECT user_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY total) FROM orders GROUP BY user_id ORDER BY max(total) DESC, user_id LIMIT 5",
        // Windows partitioned by the shard key: each partition whole on one shard.
        "SELECT id, user_id, row_number() OVER (PARTITION BY user_id ORDER BY id DESC) AS rn FROM orders ORDER BY user_id, id",
        "SELECT user_id, id FROM (SELECT user_id, id, row_number() OVER (PARTITION BY user_id ORDER BY total DESC, id) AS rn FROM orders) t WHERE rn = 1 ORDER BY user_id LIMIT 20",
        "SELECT u.id, u.name, sum(o.total) OVER (PARTITION BY u.id) AS t FROM users u JOIN orders o ON o.user_id = u.id ORDER BY t DESC, u.id LIMIT 10",
        "SELECT user_id, count(*), rank() OVER (PARTITION BY user_id ORDER BY count(*)) FROM orders GROUP BY user_id ORDER BY 1 LIMIT 10",
        // Distinct shard keys: counted on each shard, added up.
        "SELECT count(DISTINCT user_id) FROM orders",
        "SELECT total, count(DISTINCT o.user_id), count(*) FROM orders o GROUP BY total ORDER BY total",
        "SELECT count(DISTINCT u.id) FROM users u JOIN orders o ON o.user_id = u.id WHERE o.total > 2",
        // Aggregates with LIMIT: every shard returns every group (a shard's top groups
        // are not the top groups once merged).
        "SELECT total, count(*) FROM orders GROUP BY total ORDER BY 2 DESC, 1 LIMIT 2",
        "SELECT id % 4 AS k, sum(score) FROM users GROUP BY id % 4 ORDER BY 2 DESC LIMIT 1",
        // count(DISTINCT x) of other columns: distinct values gathered, then counted.
        "SELECT count(DISTINCT name) FROM users",
        "SELECT count(DISTINCT o.total) FROM users u JOIN orders o ON o.user_id = u.id",
        "SELECT user_id % 5 AS g, count(DISTINCT total), count(*), sum(total), min(id), max(id) FROM orders GROUP BY user_id % 5 ORDER BY g",
        "SELECT total, count(DISTINCT name) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY total ORDER BY total",
        "SELECT total, count(DISTINCT user_id % 3) AS n FROM orders GROUP BY total ORDER BY n DESC, total LIMIT 3",
        "SELECT count(DISTINCT CASE WHEN id % 2 = 0 THEN name END) FROM users",
        "SELECT score, count(DISTINCT name) FROM users WHERE id < 0 GROUP BY score",
        // TABLE name, as psql users write it (sqlparser does not read it).
        "TABLE users ORDER BY id",
        "table users order by name desc, id limit 4 offset 2",
        "TABLE countries",
    ] {
        same_as_plain(&c, &plain, q).await;
    }
    // Without ORDER BY the rows are all there, in some order.
    let mut a = rows(&c.simple_query("SELECT id FROM users").await.unwrap());
    a.sort_by_key(|r| r[0].as_ref().unwrap().parse::<i64>().unwrap());
    assert_eq!(a.len(), 200);
    // What cannot be merged yet is refused, never answered wrongly.
    for q in [
        "SELECT user_id, rank() OVER (ORDER BY count(*)) FROM orders GROUP BY user_id",
        "SELECT DISTINCT ON (lower(name)) name, id FROM users",
    ] {
        let e = c.simple_query(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
    c.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn unions_across_shards_match_plain_postgres() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for q in [
        // A keyed SELECT with one that has no key: every shard (not the key's alone).
        "SELECT id FROM users WHERE id = 1 UNION ALL SELECT user_id FROM orders WHERE user_id < 6 ORDER BY 1",
        "SELECT id FROM users WHERE id < 20 UNION ALL SELECT user_id FROM orders WHERE user_id < 10 ORDER BY 1",
        "SELECT name FROM users UNION SELECT name FROM users ORDER BY name",
        "SELECT id, name FROM users WHERE id <= 5 UNION SELECT user_id, 'o' FROM orders WHERE user_id <= 3 ORDER BY id DESC, name LIMIT 4 OFFSET 1",
        "SELECT total FROM orders UNION SELECT score FROM users ORDER BY 1 LIMIT 10",
        "(SELECT id FROM users WHERE id > 190) UNION ALL (SELECT user_id FROM orders WHERE user_id > 195) ORDER BY id",
        "SELECT name FROM users WHERE id = 3 UNION SELECT 'constant' ORDER BY 1",
    ] {
        assert!(!same_as_plain(&c, &plain, q).await.is_empty(), "{q}");
    }
    // Extended protocol, with parameters in both SELECTs.
    let q = "SELECT id FROM users WHERE id < $1 UNION SELECT user_id FROM orders WHERE user_id < $2 ORDER BY 1 DESC";
    let a: Vec<i64> = c
        .query(q, &[&30i64, &40i64])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let b: Vec<i64> = plain
        .query(q, &[&30i64, &40i64])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(a, b);
    // What would not combine is refused, never answered wrongly.
    for q in [
        "SELECT id FROM users UNION ALL SELECT 5",
        "SELECT id FROM users INTERSECT SELECT user_id FROM orders",
        "SELECT count(*) FROM users UNION ALL SELECT count(*) FROM orders",
        "SELECT id FROM users UNION ALL SELECT user_id FROM orders UNION SELECT 1",
    ] {
        let e = c.simple_query(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
}

#[tokio::test]
async fn joins_and_subqueries_see_every_row_they_need_or_are_refused() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let on = |s: u64| {
        (1..200)
            .find(|k| partition_of(&HashKey::Int(*k), 2) == s)
            .unwrap()
    };
    let (a, b) = (on(0), on(1));
    for q in [
        // Correlated with the outer row (co-located): each shard answers for its rows.
        "SELECT u.id, (SELECT count(*) FROM orders o WHERE o.user_id = u.id) FROM users u ORDER BY 1".to_string(),
        "SELECT id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id AND o.total > 3) ORDER BY id".to_string(),
        // Joined on the shard keys (co-located), over every shard; or each side pinned to
        // the same key.
        "SELECT u.id, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id < 30 ORDER BY o.id".to_string(),
        format!("SELECT u.name, o.total FROM users u, orders o WHERE u.id = {a} AND o.user_id = {a} ORDER BY o.id"),
        format!("SELECT u.name, o.total FROM users u, orders o WHERE u.id = ANY('{{{a}}}') AND o.user_id = ANY(ARRAY[{a}, {a}]) ORDER BY o.id"),
        "SELECT id FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 3) ORDER BY id".to_string(),
        // Grouped by the shard key: each group on one shard.
        "WITH t AS (SELECT user_id, sum(total) AS s FROM orders GROUP BY user_id) SELECT user_id, s FROM t WHERE s > 3 ORDER BY user_id".to_string(),
        // Keyed alike: one shard.
        format!("SELECT id, total FROM orders WHERE user_id = {a} AND total >= (SELECT max(total) FROM orders WHERE user_id = {a})"),
        format!("SELECT name FROM users WHERE id = {b} AND score <= (SELECT max(score) FROM users WHERE id = {b})"),
    ] {
        assert!(!same_as_plain(&c, &plain, &q).await.is_empty(), "{q}");
    }
    // Aggregates over every shard's rows, which no shard has alone, and subqueries not
    // related by the keys: pgshard evaluates them first (they used to be answered from one
    // shard, then refused).
    for q in [
        "SELECT id FROM users WHERE score > (SELECT avg(score) FROM users) ORDER BY id".to_string(),
        format!("SELECT id FROM users WHERE id = {a} AND score < (SELECT avg(score) FROM users)"),
        format!("SELECT id, (SELECT count(*) FROM orders) FROM users WHERE id = {a}"),
        format!(
            "SELECT id FROM users WHERE id = {a} AND score > (SELECT min(score) FROM users WHERE id = {b})"
        ),
        "SELECT id FROM users WHERE name IN (SELECT name FROM users WHERE score > 5) ORDER BY id".to_string(),
        "SELECT id FROM users WHERE EXISTS (SELECT 1 FROM orders WHERE total > 5) AND id < 9 ORDER BY id".to_string(),
    ] {
        same_as_plain(&c, &plain, &q).await;
    }
    // A write whose subquery reads every shard: the write goes to its key's shard only.
    let q = format!(
        "UPDATE users SET score = score WHERE id = {a} AND name IN (SELECT name FROM users WHERE score > 5)"
    );
    assert_eq!(
        affected(&c.simple_query(&q).await.unwrap()),
        affected(&plain.simple_query(&q).await.unwrap())
    );
    for q in [
        // Joined on something else than the shard keys: pairs across shards would be
        // missed.
        "SELECT u.id, o.id FROM users u JOIN orders o ON o.total = u.score".to_string(),
        // Correlated by other columns than the keys.
        "SELECT id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.total = u.score)"
            .to_string(),
        format!("SELECT u.id, o.id FROM users u, orders o WHERE u.id = {a}"),
        format!("SELECT u.id, o.id FROM users u, orders o WHERE u.id = {a} AND o.user_id = {b}"),
        format!(
            "SELECT u.id, o.id FROM users u, orders o WHERE u.id = {a} AND o.user_id = ANY(ARRAY[{a}, {b}])"
        ),
    ] {
        let e = c.simple_query(&q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
}

/// The command tag's row count of a simple query.
fn affected(msgs: &[SimpleQueryMessage]) -> u64 {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .sum()
}

/// INSERT ... SELECT into a sharded table: from a co-located table it runs on every shard
/// the SELECT needs, each shard inserting rows made from its own rows; otherwise pgshard
/// reads the rows and inserts them split by key. The same rows as on one plain PostgreSQL,
/// each on its hash shard, and the same errors.
#[tokio::test]
async fn insert_select_matches_plain_postgres() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let ddl = "DROP TABLE IF EXISTS orders_archive; CREATE TABLE orders_archive (id bigint, user_id bigint, total numeric)";
    c.batch_execute(ddl).await.unwrap();
    plain.batch_execute(ddl).await.unwrap();
    for q in [
        // Every shard.
        "INSERT INTO orders_archive (id, user_id, total) SELECT id, user_id, total FROM orders WHERE total > 3",
        "INSERT INTO orders_archive (total, user_id, id) SELECT sum(total), user_id, max(id) + 1 FROM orders GROUP BY user_id HAVING sum(total) < 2",
        // Joined on the keys.
        "INSERT INTO orders_archive (id, user_id, total) SELECT o.id + 1000000, u.id, u.score FROM users u JOIN orders o ON o.user_id = u.id WHERE u.name LIKE 'user1%'",
        // One shard.
        "INSERT INTO orders_archive (user_id, id, total) SELECT u.id, u.id * 100, u.score FROM users u WHERE u.id = 42",
        // A constant key.
        "INSERT INTO orders_archive (id, user_id, total) SELECT 1, 77, 2.5",
        // Keys that only the rows tell: pgshard reads the rows, then splits them by key.
        "INSERT INTO orders_archive (id, user_id, total) SELECT id, id, total FROM orders WHERE total < 2",
        "INSERT INTO orders_archive (id, user_id, total) SELECT g, g * 7, 0 FROM generate_series(1, 40) g",
        "INSERT INTO orders_archive (id, user_id, total) SELECT max(id), count(*), sum(total) FROM orders",
        // Aggregates PostgreSQL finishes over the merged groups.
        "INSERT INTO orders_archive (id, user_id, total) SELECT count(*) + 5000000, max(user_id) - min(user_id), coalesce(sum(total), 0) FROM orders",
        "INSERT INTO orders_archive (id, user_id, total) SELECT count(*) * 10 + 6000000, (total * 100)::bigint % 7, round(avg(total), 1) FROM orders GROUP BY 2 ORDER BY count(*) DESC, 2 LIMIT 3",
        "INSERT INTO orders_archive (user_id, id, total) SELECT DISTINCT user_id % 10, 0, NULL::numeric FROM orders",
        "INSERT INTO orders_archive (id, user_id, total) SELECT user_id, user_id + 1, 1 FROM orders WHERE user_id = 9 UNION ALL SELECT 2, 3, 4",
    ] {
        let a = affected(&c.simple_query(q).await.unwrap());
        let b = affected(&plain.simple_query(q).await.unwrap());
        assert_eq!(a, b, "{q}");
        assert!(a > 0, "{q}");
    }
    // What PostgreSQL refuses in the statement as written is refused the same way (the
    // rows, as literals, would have been taken).
    for q in [
        "INSERT INTO orders_archive (user_id, id, total) SELECT DISTINCT user_id % 10, 0, NULL FROM orders",
        "INSERT INTO orders_archive (user_id, id, total) SELECT id, id, 'x'::text FROM orders",
        "INSERT INTO orders_archive (user_id, id) SELECT id, id, total FROM orders",
    ] {
        let a = c.simple_query(q).await.unwrap_err();
        let b = plain.simple_query(q).await.unwrap_err();
        assert_eq!(sqlstate(&a), sqlstate(&b), "{q}: {a} / {b}");
    }
    // Through pgshard with RETURNING, and with no rows.
    for q in [
        "INSERT INTO orders_archive (id, user_id, total) SELECT id + 4000000, id, total FROM orders WHERE total = 2.25 RETURNING user_id, id",
        "INSERT INTO orders_archive (id, user_id, total) SELECT id, id, total FROM orders WHERE total > 1000 RETURNING id",
    ] {
        let a = c.simple_query(q).await.unwrap();
        let b = plain.simple_query(q).await.unwrap();
        assert_eq!(affected(&a), affected(&b), "{q}");
        let (mut a, mut b) = (rows(&a), rows(&b));
        a.sort();
        b.sort();
        assert_eq!(a, b, "{q}");
    }
    // psql shows the same for no rows (RETURNING's result, and the tag).
    let q = "INSERT INTO orders_archive (id, user_id, total) SELECT id, id, total FROM orders WHERE false RETURNING id";
    assert_eq!(
        psql(addr.port(), "app", "app", q),
        psql(ports()[0], "postgres", "plain", q)
    );
    // RETURNING, from every shard.
    let q = "INSERT INTO orders_archive (id, user_id, total) SELECT id + 2000000, user_id, 0 FROM orders WHERE total = 1.25 RETURNING id, user_id";
    let mut a = rows(&c.simple_query(q).await.unwrap());
    let mut b = rows(&plain.simple_query(q).await.unwrap());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // The extended protocol, with a parameter for the key.
    for db in [&c, &plain] {
        let n = db
            .execute(
                "INSERT INTO orders_archive (id, user_id, total) SELECT id + 3000000, user_id, total FROM orders WHERE user_id = $1",
                &[&7i64],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    // Inside a transaction, rolled back on every shard.
    let before = same_as_plain(&c, &plain, "SELECT count(*) FROM orders_archive").await;
    c.batch_execute(
        "BEGIN; INSERT INTO orders_archive (id, user_id, total) SELECT id, user_id, total FROM orders; INSERT INTO orders_archive (id, user_id, total) SELECT id, id, total FROM orders; ROLLBACK",
    )
    .await
    .unwrap();
    assert_eq!(
        rows(
            &c.simple_query("SELECT count(*) FROM orders_archive")
                .await
                .unwrap()
        ),
        before
    );
    same_as_plain(
        &c,
        &plain,
        "SELECT id, user_id, total FROM orders_archive ORDER BY id, user_id, total",
    )
    .await;
    // Each row on its key's shard.
    for (shard, port) in ports().into_iter().enumerate() {
        let direct = connect_server(port, "app").await;
        for r in rows(
            &direct
                .simple_query("SELECT user_id FROM orders_archive")
                .await
                .unwrap(),
        ) {
            let k: i64 = r[0].as_deref().unwrap().parse().unwrap();
            assert_eq!(partition_of(&HashKey::Int(k), 2) as usize, shard, "{k}");
        }
    }
    // Without the column list: the table's columns and the SELECT's width tell them (here
    // the co-located copy of one user's orders).
    let q = "INSERT INTO orders_archive SELECT * FROM orders WHERE user_id = 9";
    assert_eq!(
        rows_or_sqlstate(&c, q).await,
        rows_or_sqlstate(&plain, q).await
    );
    same_as_plain(
        &c,
        &plain,
        "SELECT * FROM orders_archive WHERE user_id = 9 ORDER BY id",
    )
    .await;
    // A SELECT whose subquery reads one shard's rows cannot run over several.
    for q in [
        "INSERT INTO orders_archive (id, user_id, total) SELECT id, id, total FROM orders WHERE total > (SELECT avg(total) FROM orders WHERE user_id = 5)",
    ] {
        let e = c.batch_execute(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}: {e}");
    }
    // The extended protocol: the client's parameters go to the steps that use them, and
    // RETURNING's rows come in the client's (binary) formats.
    for db in [&c, &plain] {
        let n = db
            .execute(
                "INSERT INTO orders_archive (id, user_id, total) SELECT id + 5000000, id, total FROM orders WHERE user_id = $1",
                &[&3i64],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    let returning = async |db: &tokio_postgres::Client, q: &str| {
        let mut v: Vec<(i64, i64)> = db
            .query(q, &[&6_000_000i64, &"1.5"])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        v.sort();
        v
    };
    for q in [
        "INSERT INTO orders_archive (id, user_id, total) SELECT g + $1::bigint, g, $2::text::numeric FROM generate_series(1, 9) g RETURNING id, user_id",
        "INSERT INTO orders_archive (id, user_id, total) SELECT max(id), count(*), sum(total) FROM orders WHERE total > $2::text::numeric AND id < $1 RETURNING id, user_id",
        "INSERT INTO orders_archive (id, user_id, total) SELECT id + $1, id, total FROM orders WHERE total > $2::text::numeric * 1000 RETURNING id, user_id",
    ] {
        let a = returning(&c, q).await;
        assert_eq!(a, returning(&plain, q).await, "{q}");
    }
    // In a transaction, with the error of a statement PostgreSQL refuses.
    let e = c
        .execute(
            "INSERT INTO orders_archive (user_id, id, total) SELECT id, id, $1::text FROM orders",
            &[&"x"],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42804", "{e}");
    c.batch_execute("DROP TABLE orders_archive").await.unwrap();
}

#[tokio::test]
async fn writes_and_transactions_over_shards() {
    // On split_t, whose rows other tests read only by key ranges: users' rows are compared
    // whole by concurrent tests.
    let addr = setup().await;
    let mut c = connect(addr).await;
    let a = 1001i64;
    let b = (1002..)
        .find(|k| partition_of(&HashKey::Int(*k), 2) != partition_of(&HashKey::Int(a), 2))
        .unwrap();
    // A transaction over both shards: ROLLBACK undoes the work on both.
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO split_t (id, name) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    tx.execute("INSERT INTO split_t (id, name) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM split_t WHERE id IN ($1, $2)",
            &[&a, &b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "ROLLBACK of a two-shard transaction left rows");
    // Committed single-shard transactions work, on either shard.
    for k in [a, b] {
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO split_t (id, name) VALUES ($1, 'x')", &[&k])
            .await
            .unwrap();
        tx.execute("UPDATE split_t SET name = 'y' WHERE id = $1", &[&k])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let n: String = c
            .query_one("SELECT name FROM split_t WHERE id = $1", &[&k])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, "y");
    }
    // Moving a row to another shard through its key is refused; staying is fine.
    let e = c
        .batch_execute(&format!("UPDATE split_t SET id = {b} WHERE id = {a}"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    c.batch_execute(&format!("UPDATE split_t SET id = {a} WHERE id = {a}"))
        .await
        .unwrap();
    c.batch_execute(&format!("DELETE FROM split_t WHERE id IN ({a})"))
        .await
        .unwrap();
    c.batch_execute(&format!("DELETE FROM split_t WHERE id = {b}"))
        .await
        .unwrap();
    // A write without a key would touch every shard: refused until 2PC.
    let e = c
        .batch_execute("UPDATE split_t SET name = name")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
}

#[tokio::test]
async fn range_and_list_tables_route_by_typed_values() {
    let addr = setup().await;
    let c = connect(addr).await;
    for sql in [
        "INSERT INTO events (id, created_at) VALUES (1, '2025-12-31 23:59:59+00')",
        "INSERT INTO events (id, created_at) VALUES (2, '2026-01-01 00:00:00+00')",
        "INSERT INTO accounts (id, region) VALUES (1, 'uk')",
        "INSERT INTO accounts (id, region) VALUES (2, 'ca')",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let count = |port: u16, sql: &'static str| async move {
        connect_server(port, "app")
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let [p0, p1] = ports();
    assert_eq!(
        count(p0, "SELECT count(*) FROM events WHERE id = 1").await,
        1
    );
    assert_eq!(
        count(p1, "SELECT count(*) FROM events WHERE id = 2").await,
        1
    );
    assert_eq!(
        count(p0, "SELECT count(*) FROM accounts WHERE region = 'uk'").await,
        1
    );
    assert_eq!(
        count(p1, "SELECT count(*) FROM accounts WHERE region = 'ca'").await,
        1
    );
    // Timestamps compare as timestamps: another offset, same instant.
    let r = c
        .query_one(
            "SELECT id FROM events WHERE created_at = $1::text::timestamptz",
            &[&"2026-01-01 01:00:00+01"],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 2);
    // A value in no list is an error naming the column.
    let e = c
        .batch_execute("INSERT INTO accounts (id, region) VALUES (3, 'jp')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    assert!(format!("{e:?}").contains("region"), "{e:?}");
    // Without a column list the table's columns tell where the key is.
    c.batch_execute("INSERT INTO accounts VALUES (3, 'uk')")
        .await
        .unwrap();
    assert_eq!(
        count(p0, "SELECT count(*) FROM accounts WHERE id = 3").await,
        1
    );
    let e = c
        .batch_execute("INSERT INTO accounts VALUES (4, 'jp')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    assert!(format!("{e:?}").contains("region"), "{e:?}");
}

#[tokio::test]
async fn hints_and_forced_shards() {
    let addr = setup().await;
    let c = connect(addr).await;
    let port_of = |m: Vec<SimpleQueryMessage>| rows(&m)[0][0].clone().unwrap();
    let [p0, p1] = ports();
    let q = "SELECT current_setting('port')";
    assert_eq!(
        port_of(
            c.simple_query(&format!("/* pgshard: shard=1 */ {q}"))
                .await
                .unwrap()
        ),
        p1.to_string()
    );
    c.batch_execute("SET pgshard.shard = 1").await.unwrap();
    assert_eq!(port_of(c.simple_query(q).await.unwrap()), p1.to_string());
    c.batch_execute("RESET pgshard.shard").await.unwrap();
    assert_eq!(port_of(c.simple_query(q).await.unwrap()), p0.to_string());
    let e = c
        .batch_execute("/* pgshard: shard=7 */ SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    let e = c.batch_execute("SET pgshard.shard = 2").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    // Statements the parser cannot read run where their shard is known without parsing.
    c.batch_execute("DO $$ BEGIN PERFORM 1; END $$")
        .await
        .unwrap();
    let e = c
        .batch_execute("DO $$ BEGIN PERFORM * FROM users; END $$")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    c.batch_execute("/* pgshard: shard=1 */ DO $$ BEGIN PERFORM * FROM users; END $$")
        .await
        .unwrap();
    // COPY to one shard with a hint (tests/copy.rs covers COPY split by key).
    {
        use futures_util::SinkExt;
        let sink = c
            .copy_in("/* pgshard: shard=1 */ COPY accounts (id, region) FROM STDIN")
            .await
            .unwrap();
        let mut sink = Box::pin(sink);
        sink.send(bytes::Bytes::from_static(b"77\tus\n"))
            .await
            .unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), 1);
    }
    let n: i64 = connect_server(p1, "app")
        .await
        .query_one("SELECT count(*) FROM accounts WHERE id = 77", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn reference_tables_and_cross_shard_writes() {
    let addr = setup().await;
    let c = connect(addr).await;
    let [p0, p1] = ports();
    // Reference tables: a write goes to every shard (one row, as the tag says), in the
    // extended protocol with parameters too, and inside a transaction.
    let n = c
        .execute(
            "INSERT INTO countries VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&"zz", &"Zed"],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let mut tx_client = connect(addr).await;
    let tx = tx_client.transaction().await.unwrap();
    tx.execute("INSERT INTO countries VALUES ($1, 'Why')", &[&"yy"])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    for p in [p0, p1] {
        let r = rows(
            &connect_server(p, "app")
                .await
                .simple_query("SELECT string_agg(code, ',' ORDER BY code) FROM countries WHERE code IN ('yy', 'zz')")
                .await
                .unwrap(),
        );
        assert_eq!(r[0][0].as_deref(), Some("zz"), "shard on port {p}");
    }
    // UPDATE and DELETE change every shard's copy alike (simple and extended protocol).
    let copies = async |code: &str| {
        let mut v = Vec::new();
        for p in [p0, p1] {
            let r = connect_server(p, "app")
                .await
                .query_opt("SELECT name FROM countries WHERE code = $1", &[&code])
                .await
                .unwrap();
            v.push(r.map(|r| r.get::<_, String>(0)));
        }
        v
    };
    c.execute(
        "INSERT INTO countries VALUES ($1, 'Ex') ON CONFLICT DO NOTHING",
        &[&"xx"],
    )
    .await
    .unwrap();
    let msgs = c
        .simple_query("UPDATE countries SET name = 'Ex 2' WHERE code = 'xx' RETURNING name")
        .await
        .unwrap();
    assert_eq!(rows(&msgs), vec![vec![Some("Ex 2".to_string())]]);
    assert_eq!(
        copies("xx").await,
        vec![Some("Ex 2".into()), Some("Ex 2".into())]
    );
    let n = c
        .execute(
            "UPDATE countries SET name = $1 WHERE code = 'xx'",
            &[&"Ex 3"],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        copies("xx").await,
        vec![Some("Ex 3".into()), Some("Ex 3".into())]
    );
    let n = c
        .execute("DELETE FROM countries WHERE code = $1", &[&"xx"])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(copies("xx").await, vec![None, None]);
    // Changed from a sharded table's rows, each copy would take its own shard's: refused.
    let e = c
        .batch_execute("UPDATE countries SET name = u.name FROM users u WHERE u.id = 7 AND countries.code = 'fr'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    // DDL over the extended protocol goes everywhere; a keyless UPDATE is refused there
    // too, by default.
    c.execute(
        "CREATE INDEX IF NOT EXISTS countries_name ON countries (name)",
        &[],
    )
    .await
    .unwrap();
    let e = c
        .execute("UPDATE orders SET total = total WHERE id > $1", &[&0i64])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    let msgs = c
        .simple_query("INSERT INTO countries VALUES ('fr', 'France') ON CONFLICT (code) DO UPDATE SET name = 'France'")
        .await
        .unwrap();
    assert!(
        matches!(msgs.last(), Some(SimpleQueryMessage::CommandComplete(1))),
        "{:?}",
        msgs.iter()
            .map(|m| match m {
                SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
                SimpleQueryMessage::Row(_) => "row".to_string(),
                _ => "other".to_string(),
            })
            .collect::<Vec<_>>()
    );
    for p in [p0, p1] {
        let n: i64 = connect_server(p, "app")
            .await
            .query_one("SELECT count(*) FROM countries WHERE code = 'fr'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
    // A keyless UPDATE is refused by default, naming the setting that allows it.
    let e = c
        .batch_execute("UPDATE orders SET total = total")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    assert!(format!("{e:?}").contains("cross_shard_writes"), "{e:?}");
    // With cross_shard_writes: allow it runs everywhere; counts add up; RETURNING rows from
    // every shard.
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 4);
    let allow = start_proxy_yaml(&format!("{yaml}{RULES}    cross_shard_writes: allow\n"));
    let w = connect(allow).await;
    // A cursor that locks rows over several shards stays refused (each shard would
    // declare its own, and a FETCH read one of them).
    let e = w
        .batch_execute("BEGIN; DECLARE locking CURSOR FOR SELECT id FROM users FOR UPDATE")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    w.batch_execute("ROLLBACK").await.unwrap();
    let plain = connect_server(p0, "plain").await;
    let q = "UPDATE orders SET total = total WHERE user_id % 40 = 0 RETURNING user_id";
    let mut via = rows(&w.simple_query(q).await.unwrap());
    let mut direct = rows(&plain.simple_query(q).await.unwrap());
    via.sort();
    direct.sort();
    assert_eq!(via, direct);
    let n = w
        .execute(
            "UPDATE orders SET total = total WHERE id >= $1",
            &[&-1000i64],
        )
        .await
        .unwrap();
    let msgs = w
        .simple_query("UPDATE orders SET total = total")
        .await
        .unwrap();
    let total: i64 = plain
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        matches!(msgs.last(), Some(SimpleQueryMessage::CommandComplete(n)) if *n == total as u64),
        "{msgs:?}"
    );
    assert_eq!(
        n, total as u64,
        "extended-protocol keyless UPDATE: counts add up"
    );
}

#[tokio::test]
async fn multi_row_insert_is_split_per_shard() {
    let addr = setup().await;
    let c = connect(addr).await;
    let [p0, p1] = ports();
    let ids: Vec<i64> = (7001..=7010).collect();
    let values: Vec<String> = ids.iter().map(|k| format!("({k}, 'split{k}')")).collect();
    let msgs = c
        .simple_query(&format!(
            "INSERT INTO split_t (id, name) VALUES {} RETURNING id",
            values.join(", ")
        ))
        .await
        .unwrap();
    let mut returned: Vec<i64> = rows(&msgs)
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect();
    returned.sort();
    assert_eq!(returned, ids, "RETURNING rows come back from every shard");
    assert!(matches!(
        msgs.last(),
        Some(SimpleQueryMessage::CommandComplete(10))
    ));
    // Every row on its own shard, none duplicated.
    let mut seen = 0;
    for (s, p) in [p0, p1].into_iter().enumerate() {
        let on: Vec<i64> = connect_server(p, "app")
            .await
            .query("SELECT id FROM split_t WHERE id BETWEEN 7001 AND 7010", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in &on {
            assert_eq!(partition_of(&HashKey::Int(*id), 2), s as u64);
        }
        seen += on.len();
    }
    assert_eq!(seen, 10);
    // All or none: a duplicate key on one shard rolls back the other shard's rows too.
    let e = c
        .batch_execute("INSERT INTO split_t (id, name) VALUES (7101, 'x'), (7102, 'y'), (7103, 'z'), (7001, 'dup')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM split_t WHERE id BETWEEN 7101 AND 7103",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // INSERT ... SELECT with a computed key: pgshard reads the row, inserts it on its shard.
    c.batch_execute(
        "INSERT INTO split_t (id, name) SELECT id + 100000, name FROM users WHERE id = 1",
    )
    .await
    .unwrap();
    let name: String = c
        .query_one("SELECT name FROM split_t WHERE id = 100001", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "user037");
    c.batch_execute("DELETE FROM split_t WHERE id = 100001")
        .await
        .unwrap();
}

#[tokio::test]
async fn pgbench_on_a_sharded_database() {
    // pgbench's tables are not sharded: they live on the default shard, and its
    // COPY ... WITH (freeze on), which the parser cannot read, still passes.
    let addr = setup().await;
    let run = |args: &[&str]| pgbench(addr.port(), args);
    run(&["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let text = run(&["-M", mode, "-c", "4", "-t", "100"]);
        assert!(
            text.contains("actually processed: 400/400"),
            "-M {mode}: {text}"
        );
    }
}

#[tokio::test]
async fn cross_shard_selects_over_the_extended_protocol() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    // Binary results of merged aggregates (sum, avg, HAVING) are the bytes PostgreSQL
    // itself sends for the same query on the same data.
    struct Raw(Option<Vec<u8>>);
    impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
        fn from_sql(
            _: &tokio_postgres::types::Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Raw(Some(raw.to_vec())))
        }
        fn from_sql_null(
            _: &tokio_postgres::types::Type,
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Raw(None))
        }
        fn accepts(_: &tokio_postgres::types::Type) -> bool {
            true
        }
    }
    for q in [
        "SELECT user_id % 3 AS g, sum(total), avg(total), avg(id), count(*) FROM orders WHERE id > $1 GROUP BY g ORDER BY g",
        "SELECT user_id % 5 AS g, avg(total) FROM orders WHERE id > $1 GROUP BY g HAVING sum(total) > 100 AND count(*) > 3 ORDER BY g",
        "SELECT avg(score), sum(score) FROM users WHERE id > $1",
    ] {
        let raw = |rows: Vec<tokio_postgres::Row>| -> Vec<Vec<Option<Vec<u8>>>> {
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i).0).collect())
                .collect()
        };
        let ours = raw(c.query(q, &[&0i64]).await.unwrap());
        let theirs = raw(plain.query(q, &[&0i64]).await.unwrap());
        assert!(!theirs.is_empty(), "{q}");
        assert_eq!(ours, theirs, "{q}");
    }
    type Row = (i64, String);
    let mut parts: Vec<Vec<Row>> = Vec::new();
    let fetch = |rows: Vec<tokio_postgres::Row>| -> Vec<Row> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let cases: [(&str, i64); 6] = [
        (
            "SELECT id, name FROM users WHERE id > $1 ORDER BY lower(name) DESC, id LIMIT 6",
            5,
        ),
        (
            "SELECT id, name FROM users WHERE id > $1 ORDER BY id LIMIT 3 OFFSET 4",
            10,
        ),
        (
            "SELECT id, name FROM users WHERE id > $1 ORDER BY id LIMIT 10",
            50,
        ),
        (
            "SELECT id, name FROM users WHERE id > $1 ORDER BY name DESC, id",
            120,
        ),
        (
            "SELECT u.id, u.name FROM users u WHERE u.id < $1 ORDER BY 2, 1 LIMIT 25",
            90,
        ),
        (
            "SELECT id, name FROM users WHERE id % 50 = $1 ORDER BY id",
            3,
        ),
    ];
    for (q, p) in cases {
        let via = fetch(c.query(q, &[&p]).await.unwrap());
        let direct = fetch(plain.query(q, &[&p]).await.unwrap());
        assert!(!via.is_empty(), "{q}");
        assert_eq!(via, direct, "{q}");
        // A prepared statement, used twice.
        let st = c.prepare(q).await.unwrap();
        assert_eq!(fetch(c.query(&st, &[&p]).await.unwrap()), direct, "{q}");
        assert_eq!(fetch(c.query(&st, &[&p]).await.unwrap()), direct, "{q}");
    }
    // Ordered by binary numerics (as asyncpg receives them), negative ones too.
    for q in [
        "SELECT id, score FROM users WHERE id > $1 ORDER BY score DESC, id",
        "SELECT id, -score * 1.5 AS neg FROM users WHERE id > $1 ORDER BY neg, id LIMIT 30",
    ] {
        let raw = |rows: Vec<tokio_postgres::Row>| -> Vec<(i64, Option<Vec<u8>>)> {
            rows.iter()
                .map(|r| (r.get(0), r.get::<_, Raw>(1).0))
                .collect()
        };
        let ours = raw(c.query(q, &[&0i64]).await.unwrap());
        let theirs = raw(plain.query(q, &[&0i64]).await.unwrap());
        assert!(theirs.len() >= 30, "{q}");
        assert_eq!(ours, theirs, "{q}");
    }
    // Aggregates over binary results: counts (int8) merge; a binary numeric sum is refused.
    for (q, p) in [
        ("SELECT count(*) FROM users WHERE id > $1", 0i64),
        ("SELECT count(*) FROM orders WHERE user_id < $1", 100),
    ] {
        let via: i64 = c.query_one(q, &[&p]).await.unwrap().get(0);
        let direct: i64 = plain.query_one(q, &[&p]).await.unwrap().get(0);
        assert_eq!(via, direct, "{q}");
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&5i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Inside a transaction the shards join it: the read sees the transaction's own
    // uncommitted write, and a portal fetched in parts (tokio-postgres names its portals)
    // returns what PostgreSQL returns, part by part.
    let (mut c, mut plain) = (c, plain);
    for client in [&mut c, &mut plain] {
        let tx = client.transaction().await.unwrap();
        tx.execute("UPDATE users SET name = 'in tx' WHERE id = $1", &[&5i64])
            .await
            .unwrap();
        let q = "SELECT id, name FROM users WHERE id < $1 ORDER BY name, id";
        let rows = fetch(tx.query(q, &[&40i64]).await.unwrap());
        assert!(rows.contains(&(5, "in tx".to_string())), "{rows:?}");
        parts.push(rows);
        let portal = tx.bind(q, &[&40i64]).await.unwrap();
        loop {
            let part = tx.query_portal(&portal, 7).await.unwrap();
            let done = part.len() < 7;
            parts.push(fetch(part));
            if done {
                break;
            }
        }
        tx.rollback().await.unwrap();
    }
    let (ours, theirs) = parts.split_at(parts.len() / 2);
    assert_eq!(ours, theirs);
    assert!(ours.len() > 3, "fetched in parts");
    let n: i64 = c
        .query_one("SELECT count(*) FROM users WHERE name = 'in tx'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "rolled back");
}

#[tokio::test]
async fn extended_protocol_begin_waits_for_the_first_statement() {
    // As pgjdbc does: BEGIN through Parse/Bind/Execute, pipelined with the first statement.
    let addr = setup().await;
    let [p0, p1] = ports();
    let keys = [9001i64, 9002, 9003, 9004];
    let shards: std::collections::HashSet<u64> = keys
        .iter()
        .map(|k| partition_of(&HashKey::Int(*k), 2))
        .collect();
    assert_eq!(shards.len(), 2, "the keys cover both shards");
    for key in keys {
        let mut r = Raw::startup(addr, "trusty", "app").await;
        r.until_ready().await;
        let mut b = msg::run("BEGIN", &[]);
        b.extend(msg::run(
            "INSERT INTO split_t (id, name) VALUES ($1, 'jdbc')",
            &[&key.to_string()],
        ));
        b.extend(msg::sync());
        r.send(&b).await;
        assert_eq!(r.until_ready().await, "12C12CZ");
        let mut b = msg::run("COMMIT", &[]);
        b.extend(msg::sync());
        r.send(&b).await;
        assert_eq!(r.until_ready().await, "12CZ");
        let shard = partition_of(&HashKey::Int(key), 2) as usize;
        let n: i64 = connect_server([p0, p1][shard], "app")
            .await
            .query_one("SELECT count(*) FROM split_t WHERE id = $1", &[&key])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "key {key} committed on shard {shard}");
    }
}

#[tokio::test]
async fn listen_hears_every_shard_once() {
    let addr = setup().await;
    let (l, mut rx) = listening_client(addr).await;
    l.batch_execute("LISTEN shard_news").await.unwrap();
    let c = connect(addr).await;
    for s in 0..2 {
        c.batch_execute(&format!(
            "/* pgshard: shard={s} */ NOTIFY shard_news, 'from shard {s}'"
        ))
        .await
        .unwrap();
    }
    // From a statement routed by its key, as a trigger on a sharded table would send it.
    let id = (1..)
        .find(|k| partition_of(&HashKey::Int(*k), 2) == 1)
        .unwrap();
    c.query(
        "SELECT pg_notify('shard_news', 'user ' || id) FROM users WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_notification(&mut rx).await.1);
    }
    got.sort();
    assert_eq!(
        got,
        [
            "from shard 0".to_string(),
            "from shard 1".to_string(),
            format!("user {id}")
        ]
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "a notification arrived twice");
    // LISTEN in the extended protocol on a sharded database.
    l.execute("LISTEN shard_ext", &[]).await.unwrap();
    c.batch_execute("/* pgshard: shard=1 */ NOTIFY shard_ext, 'ext'")
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        ("shard_ext".to_string(), "ext".to_string())
    );
}

#[tokio::test]
async fn cursors_over_shards_return_every_row() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    // DECLARE over both shards, then FETCH and MOVE forward and CLOSE, in the simple
    // protocol: the same rows, row counts and tags as on one database (a cursor per
    // shard, read from one of them, used to return one shard's rows).
    let script = [
        "BEGIN",
        "DECLARE cur CURSOR FOR SELECT id, name FROM users WHERE id > 20 ORDER BY name, id",
        "FETCH 5 FROM cur",
        "MOVE FORWARD 10 IN cur",
        "FETCH NEXT FROM cur",
        "FETCH cur",
        "FETCH FORWARD ALL FROM cur",
        "FETCH 3 FROM cur",
        "MOVE ALL FROM cur",
        "CLOSE cur",
        "DECLARE \"Agg\" NO SCROLL CURSOR FOR SELECT name, count(*) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY name ORDER BY 2 DESC, 1 LIMIT 7",
        "FETCH ALL FROM \"Agg\"",
        "COMMIT",
    ];
    for q in script {
        let tags = |m: &[SimpleQueryMessage]| -> Vec<String> {
            m.iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::CommandComplete(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        };
        let a = c.simple_query(q).await.unwrap();
        let b = plain.simple_query(q).await.unwrap();
        assert_eq!(rows(&a), rows(&b), "{q}");
        assert_eq!(tags(&a), tags(&b), "{q}");
    }
    let fetched = rows(
        &c.simple_query("BEGIN; DECLARE c2 CURSOR FOR SELECT id FROM users; FETCH ALL FROM c2")
            .await
            .unwrap(),
    );
    assert_eq!(fetched.len(), 200, "every shard's rows");
    c.batch_execute("COMMIT").await.unwrap();
    // WITH HOLD outlives the transaction (and may be declared outside one); without it, a
    // cursor needs a transaction block, as in PostgreSQL.
    c.batch_execute(
        "DECLARE held CURSOR WITH HOLD FOR SELECT id FROM users WHERE id <= 4 ORDER BY id",
    )
    .await
    .unwrap();
    c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    let r = rows(&c.simple_query("FETCH 3 FROM held").await.unwrap());
    assert_eq!(
        r,
        [["1"], ["2"], ["3"]].map(|r| r.map(|v| Some(v.to_string())).to_vec())
    );
    c.batch_execute("CLOSE held").await.unwrap();
    // Declared WITH HOLD in a transaction: kept after COMMIT, gone after ROLLBACK.
    for end in ["COMMIT", "ROLLBACK"] {
        c.batch_execute(&format!(
            "BEGIN; DECLARE h CURSOR WITH HOLD FOR SELECT id FROM users ORDER BY id DESC; {end}"
        ))
        .await
        .unwrap();
        let r = c.simple_query("FETCH 1 FROM h").await;
        match end {
            "COMMIT" => {
                assert_eq!(rows(&r.unwrap())[0][0].as_deref(), Some("200"));
                c.batch_execute("CLOSE h").await.unwrap();
            }
            _ => assert_eq!(sqlstate(&r.unwrap_err()), "34000"),
        }
    }
    for (q, code) in [
        ("DECLARE nope CURSOR FOR SELECT id FROM users", "25P01"),
        ("FETCH 1 FROM held", "34000"),
    ] {
        let e = c.batch_execute(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{q}");
    }
    // Backward movement of a NO SCROLL cursor is refused, and the transaction fails as
    // after any error.
    for (q, code) in [
        ("FETCH BACKWARD 1 FROM b", "55000"),
        ("MOVE ABSOLUTE 0 IN b", "55000"),
        ("FETCH SIDEWAYS FROM b", "0A000"),
    ] {
        c.batch_execute(
            "BEGIN; DECLARE b NO SCROLL CURSOR FOR SELECT id FROM users; FETCH 2 FROM b",
        )
        .await
        .unwrap();
        let e = c.batch_execute(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{q}");
        // Raised through the server (so that its transaction fails too), with pgshard's
        // hint or none: never an empty one.
        let hint = e.as_db_error().and_then(|d| d.hint());
        assert_eq!(hint.is_some(), code == "55000", "{q}: {hint:?}");
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    for declare in [
        "DECLARE bin BINARY CURSOR FOR SELECT id FROM users",
        "DECLARE locking CURSOR FOR SELECT id FROM users FOR UPDATE",
    ] {
        let e = c
            .batch_execute(&format!("BEGIN; {declare}"))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{declare}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    // Over the extended protocol (as psycopg declares with parameters), FETCH in text; a
    // FETCH asking for binary results is refused (pgshard holds the rows as text).
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "DECLARE ext CURSOR FOR SELECT id FROM users WHERE id > $1 ORDER BY id",
        &[&190i64],
    )
    .await
    .unwrap();
    let r = rows(&tx.simple_query("FETCH 4 FROM ext").await.unwrap());
    assert_eq!(r.len(), 4);
    assert_eq!(r[0][0].as_deref(), Some("191"));
    let e = tx.query("FETCH 2 FROM ext", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn explain_shows_the_plans_of_the_shards_that_run_the_statement() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plan = async |q: &str| -> Vec<String> {
        rows(&c.simple_query(q).await.unwrap())
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect()
    };
    // One key: that key's shard (ANALYZE finds the row there; on the other shard it
    // would find none).
    for id in [5, 6, 7, 8] {
        let p = plan(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT * FROM users WHERE id = {id}"
        ))
        .await;
        assert!(p[0].contains("rows=1"), "{p:?}");
        assert!(!p.iter().any(|l| l.starts_with("Shard")), "{p:?}");
    }
    // Several shards: each one's plan under its name, never one shard's plan alone.
    let p = plan("EXPLAIN (COSTS OFF) SELECT count(*) FROM users").await;
    assert_eq!(
        p.iter().filter(|l| l.starts_with("Shard ")).count(),
        2,
        "{p:?}"
    );
    assert_eq!(
        p.iter().filter(|l| l.contains("Aggregate")).count(),
        2,
        "{p:?}"
    );
    let p = plan("EXPLAIN (COSTS OFF, FORMAT JSON) SELECT id FROM users").await;
    assert_eq!(p.len(), 2, "one JSON plan per shard");
    // A subquery evaluated first: the plan of the statement with its answer in place.
    let p = plan(
        "EXPLAIN (COSTS OFF) SELECT id FROM users WHERE score > (SELECT max(score) - 1 FROM users)",
    )
    .await;
    assert_eq!(
        p.iter().filter(|l| l.starts_with("Shard ")).count(),
        2,
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.contains("Filter: (score > ")), "{p:?}");
    assert!(!p.iter().any(|l| l.contains("InitPlan")), "{p:?}");
    // In the extended protocol, with parameters.
    let p: Vec<String> = c
        .query(
            "EXPLAIN (COSTS OFF) SELECT id FROM users WHERE id > $1",
            &[&3i64],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(p.contains(&"Shard 1".to_string()), "{p:?}");
    // Without ANALYZE a write over every shard only plans (allowed); with it, it runs
    // (cross_shard_writes is deny here).
    let p = plan("EXPLAIN (COSTS OFF) UPDATE users SET name = name").await;
    assert_eq!(
        p.iter().filter(|l| l.starts_with("Shard ")).count(),
        2,
        "{p:?}"
    );
    let e = c
        .simple_query("EXPLAIN ANALYZE UPDATE users SET name = name")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    // An INSERT whose rows go to both shards: planned on each, never run on each (every
    // shard would insert every row).
    let a = 910_001i64;
    let b = (a + 1..)
        .find(|b| partition_of(&HashKey::Int(*b), 2) != partition_of(&HashKey::Int(a), 2))
        .unwrap();
    let insert = format!("INSERT INTO split_t (id, name) VALUES ({a}, 'a'), ({b}, 'b')");
    let p = plan(&format!("EXPLAIN (COSTS OFF) {insert}")).await;
    assert_eq!(
        p.iter().filter(|l| l.starts_with("Shard ")).count(),
        2,
        "{p:?}"
    );
    let e = c
        .simple_query(&format!("EXPLAIN ANALYZE {insert}"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    let n = rows(
        &c.simple_query(&format!(
            "SELECT count(*) FROM split_t WHERE id IN ({a}, {b})"
        ))
        .await
        .unwrap(),
    );
    assert_eq!(n[0][0].as_deref(), Some("0"));
}

#[tokio::test]
async fn limit_and_offset_parameters_over_shards() {
    // ORMs send LIMIT and OFFSET as parameters (SQLAlchemy's .limit(), Hibernate's
    // setMaxResults): merged with the values bound, as one database answers.
    let addr = setup().await;
    let mut c = connect(addr).await;
    let mut plain = connect_server(ports()[0], "plain").await;
    let ids =
        |rows: Vec<tokio_postgres::Row>| -> Vec<i64> { rows.iter().map(|r| r.get(0)).collect() };
    let cases: [(&str, Vec<Option<i64>>); 11] = [
        (
            "SELECT id FROM users ORDER BY name, id LIMIT $1",
            vec![Some(7)],
        ),
        // The SQL standard's form, as Hibernate 6 pages.
        (
            "SELECT id FROM users ORDER BY id DESC OFFSET $1 ROWS FETCH FIRST $2 ROWS ONLY",
            vec![Some(10), Some(5)],
        ),
        (
            "SELECT id FROM users ORDER BY name, id FETCH NEXT $1 ROWS ONLY",
            vec![Some(3)],
        ),
        (
            "SELECT id FROM users WHERE id > $1 ORDER BY id FETCH FIRST ROW ONLY",
            vec![Some(42)],
        ),
        (
            "SELECT user_id FROM orders GROUP BY user_id ORDER BY count(*) DESC, user_id OFFSET 2 ROWS FETCH FIRST $1 ROWS ONLY",
            vec![Some(4)],
        ),
        (
            "SELECT id FROM users ORDER BY id DESC LIMIT $1 OFFSET $2",
            vec![Some(5), Some(10)],
        ),
        (
            "SELECT id FROM users ORDER BY score, id LIMIT 4 OFFSET $1",
            vec![Some(150)],
        ),
        (
            "SELECT id FROM users ORDER BY id OFFSET $1",
            vec![Some(195)],
        ),
        ("SELECT id FROM users ORDER BY id LIMIT $1", vec![None]),
        (
            "SELECT id FROM users WHERE id > $2 ORDER BY id LIMIT $1",
            vec![Some(3), Some(50)],
        ),
        (
            "SELECT user_id FROM orders GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT $1",
            vec![Some(6)],
        ),
    ];
    for (q, params) in &cases {
        let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let ours = ids(c.query(*q, &p).await.unwrap());
        let theirs = ids(plain.query(*q, &p).await.unwrap());
        assert_eq!(ours, theirs, "{q} {params:?}");
        // Inside a transaction too.
        for client in [&mut c, &mut plain] {
            let tx = client.transaction().await.unwrap();
            assert_eq!(
                ids(tx.query(*q, &p).await.unwrap()),
                theirs,
                "{q} in a transaction"
            );
            tx.rollback().await.unwrap();
        }
    }
    let e = c
        .query("SELECT id FROM users ORDER BY id LIMIT $1", &[&-1i64])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "2201W");
    // The simple protocol, and what FETCH FIRST adds to LIMIT: refused, not answered
    // shard by shard.
    for q in [
        "SELECT id, name FROM users ORDER BY name DESC, id FETCH FIRST 4 ROWS ONLY",
        "SELECT id FROM users ORDER BY id OFFSET 197 ROWS FETCH NEXT 10 ROWS ONLY",
        "SELECT count(*) FROM users FETCH FIRST 1 ROW ONLY",
    ] {
        same_as_plain(&c, &plain, q).await;
    }
    let e = c
        .simple_query("SELECT id FROM users ORDER BY name FETCH FIRST 3 ROWS WITH TIES")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
}

#[tokio::test]
async fn decimal_literals_for_integer_keys() {
    // `id = 5.0` compares numerically in PostgreSQL; an INSERT of 7.6 into a bigint key
    // stores 8. pgshard routes both as PostgreSQL casts them (it used to refuse with 22P02).
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for q in [
        "SELECT id, name FROM users WHERE id = 5.0",
        "SELECT id FROM users WHERE id IN (6.0, 7.00, 8.5) ORDER BY id",
        "SELECT id FROM users WHERE id = 9.5",
    ] {
        same_as_plain(&c, &plain, q).await;
    }
    let key = 920_007i64;
    c.batch_execute(&format!(
        "INSERT INTO split_t (id, name) VALUES ({}.6, 'rounded')",
        key - 1
    ))
    .await
    .unwrap();
    let s = partition_of(&HashKey::Int(key), 2) as usize;
    let on_shard = connect_server(ports()[s], "app").await;
    let n: i64 = on_shard
        .query_one("SELECT count(*) FROM split_t WHERE id = $1", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the row is on its key's shard");
    c.batch_execute(&format!("DELETE FROM split_t WHERE id = {key}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn casts_of_key_values_route_as_postgresql_casts() {
    // A cast can change a key: `(14.5)::float8::bigint` is 14 (float to integer rounds
    // half to even, numeric half away from zero), `'abcdef'::varchar(2)` is 'ab'. pgshard
    // used to route by the text as written, so reads missed rows and writes landed on the
    // wrong shard.
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let ddl = "DROP TABLE IF EXISTS codes_t; CREATE TABLE codes_t (code text PRIMARY KEY, n int)";
    let fill = "INSERT INTO codes_t (code, n) SELECT chr(97 + i / 26) || chr(97 + i % 26), i FROM generate_series(0, 99) i";
    for db in [&c, &plain] {
        db.batch_execute(ddl).await.unwrap();
        db.batch_execute(fill).await.unwrap();
    }
    // Half-way floats: rounding half to even and half away from zero differ on every other
    // one, and for some of those the two integers live on different shards.
    let mut queries: Vec<String> = (10..40)
        .map(|n| format!("SELECT id, name FROM users WHERE id = ({n}.5)::float8::bigint"))
        .collect();
    queries.extend(
        [
            "SELECT id FROM users WHERE id = bigint '42'",
            "SELECT id FROM users WHERE id = '123456'::varchar(2)::bigint",
            "SELECT id FROM users WHERE id = 13.5::numeric(3,0)",
            "SELECT id FROM users WHERE id = 13.45::numeric(4,1)",
            "SELECT id FROM users WHERE id IN (20.5::float8, 21::float8, 22.5) ORDER BY id",
            "SELECT id FROM users WHERE id = 31.5::float8",
            "SELECT id FROM users WHERE id = CAST(-(-17.5) AS integer)",
            "SELECT n FROM codes_t WHERE code = 'bcdef'::varchar(2)",
            "SELECT n FROM codes_t WHERE code = 'ab   '::char(5)",
            "SELECT n FROM codes_t WHERE code = 'cd'::char",
            "SELECT n FROM codes_t WHERE code = text 'de'",
            "SELECT n FROM codes_t WHERE code IN ('efgh'::varchar(2), 'fg'::text) ORDER BY n",
        ]
        .map(String::from),
    );
    for q in &queries {
        same_as_plain(&c, &plain, q).await;
    }
    // Writes land where PostgreSQL's value belongs, literal or bound parameter (a float8
    // parameter bound in binary: 2n + 0.5 is stored as 2n), and reads by that value find
    // them.
    for n in 300..310i64 {
        let lit =
            format!("INSERT INTO split_t (id, name) VALUES ('{n}99'::varchar(3)::bigint, 'lit')");
        c.batch_execute(&lit).await.unwrap();
        c.execute(
            "INSERT INTO split_t (id, name) VALUES ($1::float8, 'param')",
            &[&(2.0 * n as f64 + 0.5)],
        )
        .await
        .unwrap();
        let v: Vec<(i64, &str)> = vec![(n, "lit"), (2 * n, "param")];
        for (key, name) in v {
            let s = partition_of(&HashKey::Int(key), 2) as usize;
            let on_shard = connect_server(ports()[s], "app").await;
            let got: Vec<String> = on_shard
                .query("SELECT name FROM split_t WHERE id = $1", &[&key])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(got, [name], "key {key} on shard {s}");
            let through: String = c
                .query_one("SELECT name FROM split_t WHERE id = $1", &[&key])
                .await
                .unwrap()
                .get(0);
            assert_eq!(through, name);
        }
    }
    // A float parameter compared with the key: only a whole number can match.
    let found = c
        .query("SELECT id FROM users WHERE id = $1::float8", &[&45.0f64])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert!(
        c.query("SELECT id FROM users WHERE id = $1::float8", &[&45.5f64])
            .await
            .unwrap()
            .is_empty()
    );
    // Where routing cannot tell the value (a float that is not a whole number, as a
    // literal), the read goes to every shard and a server evaluates the insert's key.
    same_as_plain(
        &c,
        &plain,
        "SELECT id FROM users WHERE id = (33.7)::float8::numeric::bigint",
    )
    .await;
    // 400.5 rounds half to even, to 400, as PostgreSQL stores it.
    c.batch_execute("INSERT INTO split_t (id, name) VALUES ((400.5)::float8, 'x')")
        .await
        .unwrap();
    let here = partition_of(&HashKey::Int(400), 2) as usize;
    let n: i64 = connect_server(ports()[here], "app")
        .await
        .query_one("SELECT count(*) FROM split_t WHERE id = 400", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the row with key 400 is on its shard");
    for port in ports() {
        connect_server(port, "app")
            .await
            .batch_execute("DELETE FROM split_t WHERE id BETWEEN 300 AND 620")
            .await
            .unwrap();
    }
    for db in [&c, &plain] {
        db.batch_execute("DROP TABLE codes_t").await.unwrap();
    }
}

#[tokio::test]
async fn sql_prepared_statements_run_where_their_arguments_belong() {
    let addr = setup().await;
    let ddl = "DROP TABLE IF EXISTS prepared_t; CREATE TABLE prepared_t (id bigint PRIMARY KEY, name text)";
    connect(addr).await.batch_execute(ddl).await.unwrap();
    let plain = connect_server(ports()[0], "plain").await;
    plain.batch_execute(ddl).await.unwrap();
    // One server connection per shard: the second client gets the first one's.
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 1);
    let one = start_proxy_yaml(&format!("{yaml}{RULES}"));
    let a = connect(one).await;
    let mut script =
        vec!["PREPARE get(bigint) AS SELECT id, name, score FROM users WHERE id = $1".to_string()];
    // Rows of both shards (a statement prepared on one shard would find half of them).
    script.extend((1..=12).map(|id| format!("EXECUTE get({id})")));
    script.extend(
        [
            "EXECUTE get('7')",
            "EXECUTE get(8.0)",
            "EXECUTE get(1, 2)",
            "EXECUTE get",
            "PREPARE get AS SELECT 1",
            "PREPARE missing AS SELECT * FROM no_such_table",
            "EXECUTE missing",
            "EXECUTE nothing(1)",
            // Writes land on their rows' shards (checked below).
            "PREPARE put AS INSERT INTO prepared_t (id, name) VALUES ($1, $2) RETURNING id, name",
            "EXECUTE put(1, 'it''s')",
            "EXECUTE put(2, upper('b'))",
            "EXECUTE put(3, NULL)",
            "EXECUTE put(4, $$dollar ' $1$$)",
            "EXECUTE put(1, 'again')",
            // Over every shard, merged.
            "PREPARE total(bigint) AS SELECT count(*), sum(score) FROM users WHERE id <= $1",
            "EXECUTE total(150)",
            // In a transaction block, over two shards.
            "BEGIN",
            "PREPARE named(int) AS SELECT name FROM users WHERE id = $1",
            "EXECUTE named(3)",
            "EXECUTE named(4)",
            "COMMIT",
            "EXECUTE named(5)",
            "BEGIN",
            "PREPARE broken AS SELECT * FROM no_such_table",
            "PREPARE after_error AS SELECT 1",
            "ROLLBACK",
            "EXECUTE after_error",
            // A query string of several statements.
            "PREPARE several(bigint) AS SELECT name FROM users WHERE id = $1; EXECUTE several(9); EXECUTE several(10)",
            "EXECUTE several(11); EXECUTE get(12)",
            "PREPARE gone AS SELECT 1",
            "DEALLOCATE gone; SELECT 2",
            "EXECUTE gone",
            "DEALLOCATE get",
            "EXECUTE get(1)",
            "DEALLOCATE get",
            "DEALLOCATE PREPARE several",
            "EXECUTE named(6)",
            "DEALLOCATE ALL",
            "EXECUTE named(6)",
            "PREPARE get AS SELECT 2",
            "EXECUTE get",
            "DISCARD ALL",
            "EXECUTE get",
        ]
        .map(String::from),
    );
    for q in &script {
        assert_eq!(
            rows_or_sqlstate(&a, q).await,
            rows_or_sqlstate(&plain, q).await,
            "{q}"
        );
    }
    for (s, port) in ports().into_iter().enumerate() {
        let d = connect_server(port, "app").await;
        for r in d.query("SELECT id FROM prepared_t", &[]).await.unwrap() {
            let id: i64 = r.get(0);
            assert_eq!(partition_of(&HashKey::Int(id), 2), s as u64, "row {id}");
        }
    }
    assert_eq!(
        rows_or_sqlstate(&a, "SELECT id, name FROM prepared_t ORDER BY id").await,
        rows_or_sqlstate(&plain, "SELECT id, name FROM prepared_t ORDER BY id").await
    );

    // The server connections keep none of the statements: another client of the same
    // connections can use the names, and cannot run the first client's statements.
    let b = connect(one).await;
    a.batch_execute("PREPARE mine(bigint) AS SELECT name FROM users WHERE id = $1")
        .await
        .unwrap();
    for q in [
        "SELECT name FROM pg_prepared_statements",
        "/* pgshard: shard=1 */ SELECT name FROM pg_prepared_statements",
    ] {
        assert_eq!(rows_or_sqlstate(&b, q).await, Ok(vec![]), "{q}");
    }
    assert_eq!(
        rows_or_sqlstate(&b, "EXECUTE mine(1)").await,
        Err("26000".into())
    );
    assert_eq!(
        rows_or_sqlstate(&b, "PREPARE mine AS SELECT 'b'").await,
        Ok(vec![])
    );
    assert_eq!(
        rows_or_sqlstate(&b, "EXECUTE mine").await,
        Ok(vec![vec![Some("b".into())]])
    );
    assert_eq!(
        rows_or_sqlstate(&a, "EXECUTE mine(1)").await,
        rows_or_sqlstate(&plain, "SELECT name FROM users WHERE id = 1").await
    );
    // Over the extended protocol pgshard cannot keep them: refused, not run on one shard.
    for q in ["EXECUTE mine(1)", "PREPARE other AS SELECT 1"] {
        let e = a.query(q, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
    assert_eq!(
        rows_or_sqlstate(&a, "EXECUTE mine(2)").await,
        rows_or_sqlstate(&plain, "SELECT name FROM users WHERE id = 2").await
    );
    // SQL-level and protocol-level statements share one namespace, as on a server: a Parse
    // of a kept statement's name fails, and the statement still works.
    let mut r = Raw::startup(addr, "trusty", "app").await;
    r.until_ready().await;
    r.send(&msg::query(
        "PREPARE kept(bigint) AS SELECT name FROM users WHERE id = $1",
    ))
    .await;
    assert_eq!(r.until_ready().await, "CZ");
    let mut b = msg::parse("kept", "SELECT 1");
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.error_code().await.as_deref(), Some("42P05"));
    assert_eq!(r.until_ready().await, "Z");
    let mut b = msg::parse("other", "SELECT 1");
    b.extend(msg::bind("", "other", &[]));
    b.extend(msg::execute(""));
    b.extend(msg::sync());
    r.send(&b).await;
    assert_eq!(r.until_ready().await, "12DCZ");
    r.send(&msg::query("EXECUTE kept(5)")).await;
    assert_eq!(r.until_ready().await, "TDCZ");

    // A client that does not wait for each answer gets them in order: pgshard's own
    // (a kept statement's DEALLOCATE, an unknown one's error) after the servers'.
    r.send(&msg::query("PREPARE kept2 AS SELECT 2")).await;
    assert_eq!(r.until_ready().await, "CZ");
    let mut direct = Raw::startup(([127, 0, 0, 1], ports()[0]).into(), "postgres", "plain").await;
    direct.until_ready().await;
    direct.send(&msg::query("PREPARE kept2 AS SELECT 2")).await;
    assert_eq!(direct.until_ready().await, "CZ");
    pipelined_answers_match(
        &mut r,
        &mut direct,
        &[
            "SELECT * FROM no_such_table",
            "DEALLOCATE nosuch",
            "EXECUTE kept2",
            "DEALLOCATE kept2",
            "EXECUTE kept2",
            "BEGIN",
            "SELECT * FROM no_such_table",
            "DEALLOCATE nosuch",
            "ROLLBACK",
            "SELECT 1",
        ],
    )
    .await;

    // Session mode: the same (a session's server connections change with its shards).
    let yaml = cluster2().config_yaml("127.0.0.1:0", "session", 2);
    let s = connect(start_proxy_yaml(&format!("{yaml}{RULES}"))).await;
    for q in [
        "PREPARE get(bigint) AS SELECT id, name FROM users WHERE id = $1",
        "EXECUTE get(3)",
        "EXECUTE get(4)",
        "EXECUTE get(3)",
        "DEALLOCATE get",
        "EXECUTE get(4)",
    ] {
        assert_eq!(
            rows_or_sqlstate(&s, q).await,
            rows_or_sqlstate(&plain, q).await,
            "{q}"
        );
    }
}

#[tokio::test]
async fn timestamp_keys_are_read_in_the_sessions_time_zone() {
    // `events` is range-sharded on a timestamptz at 2026-01-01 UTC, `local_t` on a
    // timestamp (without time zone) at 2026-01-01. A timestamptz written without an
    // offset is a time in the session's TimeZone, a binary timestamptz is an instant, and
    // a timestamp ignores an offset in its text: pgshard read them all as UTC, so in any
    // other zone rows landed on the wrong shard and reads missed them.
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let addr = setup().await;
    let c = connect(addr).await;
    c.batch_execute("DROP TABLE IF EXISTS local_t; CREATE TABLE local_t (id int, at timestamp)")
        .await
        .unwrap();
    let [p0, p1] = ports();
    // Where a row is, read on the shards themselves.
    let shard_of = |table: &'static str, id: i32| async move {
        let mut found = Vec::new();
        for (s, port) in [p0, p1].into_iter().enumerate() {
            let n: i64 = connect_server(port, "app")
                .await
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE id = $1"),
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                found.push(s);
            }
        }
        found
    };
    let utc = |s: &str| -> SystemTime {
        // "2025-12-31 23:30:00.6" as seconds after the epoch, for the binary parameters.
        let secs: f64 = match s {
            "2025-12-31 23:30" => 1_767_223_800.0,
            "2025-12-31 23:59:59.6" => 1_767_225_599.6,
            "2025-12-31 15:30" => 1_767_195_000.0,
            _ => unreachable!(),
        };
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    };

    // Transaction pooling: the SET is its own transaction, and the zone holds after it.
    c.batch_execute("SET TIME ZONE 'Europe/Berlin'")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO events (id, created_at) VALUES (101, '2026-01-01 00:30')")
        .await
        .unwrap();
    assert_eq!(
        shard_of("events", 101).await,
        [0],
        "23:30 UTC is before 2026"
    );
    let found = |sql: &'static str| {
        let c = &c;
        async move { rows(&c.simple_query(sql).await.unwrap()) }
    };
    assert_eq!(
        found("SELECT id FROM events WHERE created_at = '2026-01-01 00:30'").await,
        [[Some("101".to_string())]]
    );
    assert_eq!(
        found("SELECT id FROM events WHERE created_at = '2026-01-01 00:30'::timestamp").await,
        [[Some("101".to_string())]]
    );
    // A binary timestamptz is the instant, whatever the zone.
    let r = c
        .query(
            "SELECT id FROM events WHERE created_at = $1",
            &[&utc("2025-12-31 23:30")],
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    // timestamptz(0) rounds the parameter before PostgreSQL stores it: to 2026.
    c.execute(
        "INSERT INTO events (id, created_at) VALUES (102, $1::timestamptz(0))",
        &[&utc("2025-12-31 23:59:59.6")],
    )
    .await
    .unwrap();
    assert_eq!(shard_of("events", 102).await, [1]);

    // A numeric zone (reported as the POSIX string `<+05>-05`).
    c.batch_execute("SET TIME ZONE 5").await.unwrap();
    c.batch_execute("INSERT INTO events (id, created_at) VALUES (103, '2026-01-01 04:30')")
        .await
        .unwrap();
    assert_eq!(shard_of("events", 103).await, [0]);
    // COPY rows too.
    {
        use futures_util::SinkExt;
        let mut sink = Box::pin(
            c.copy_in("COPY events (id, created_at) FROM STDIN")
                .await
                .unwrap(),
        );
        sink.send(bytes::Bytes::from_static(b"107\t2026-01-01 04:30\n"))
            .await
            .unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), 1);
    }
    assert_eq!(shard_of("events", 107).await, [0]);

    // A timestamp key: the offset in the text is ignored; a timestamptz becomes the
    // wall-clock time in the session's zone.
    c.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    c.batch_execute("INSERT INTO local_t (id, at) VALUES (1, '2026-01-01 00:30+09')")
        .await
        .unwrap();
    assert_eq!(shard_of("local_t", 1).await, [1]);
    c.execute(
        "INSERT INTO local_t (id, at) VALUES (2, $1::timestamptz)",
        &[&utc("2025-12-31 15:30")],
    )
    .await
    .unwrap();
    assert_eq!(
        shard_of("local_t", 2).await,
        [1],
        "15:30 UTC is 00:30 in Tokyo"
    );
    c.batch_execute("INSERT INTO local_t (id, at) VALUES (3, '2026-01-01 00:30+09'::timestamptz)")
        .await
        .unwrap();
    assert_eq!(shard_of("local_t", 3).await, [1]);
    assert_eq!(
        found("SELECT id FROM local_t WHERE at = '2025-12-31 15:30+00'::timestamptz ORDER BY id")
            .await,
        [
            [Some("1".to_string())],
            [Some("2".to_string())],
            [Some("3".to_string())]
        ]
    );

    // Inside a transaction, SET LOCAL holds until its end; then the zone before it does.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET LOCAL TIME ZONE 'America/New_York'")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO events (id, created_at) VALUES (104, '2025-12-31 20:00')")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(shard_of("events", 104).await, [1], "01:00 UTC");
    c.batch_execute("INSERT INTO events (id, created_at) VALUES (105, '2026-01-01 08:30')")
        .await
        .unwrap();
    assert_eq!(
        shard_of("events", 105).await,
        [0],
        "23:30 UTC, back in Tokyo"
    );
    let stored: Vec<String> = {
        let mut v = Vec::new();
        for port in [p0, p1] {
            for r in connect_server(port, "app")
                .await
                .query(
                    "SELECT id || ' ' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM events WHERE id BETWEEN 101 AND 105 ORDER BY id",
                    &[],
                )
                .await
                .unwrap()
            {
                v.push(r.get(0));
            }
        }
        v.sort();
        v
    };
    assert_eq!(
        stored,
        [
            "101 2025-12-31 23:30",
            "102 2026-01-01 00:00",
            "103 2025-12-31 23:30",
            "104 2026-01-01 01:00",
            "105 2025-12-31 23:30"
        ]
    );
    // A SET in the same query string as a time that needs the zone: pgshard cannot
    // tell which zone the server will read it in, and says so.
    let e = c
        .batch_execute(
            "SET TIME ZONE 'America/New_York'; INSERT INTO events (id, created_at) VALUES (106, '2025-12-31 20:00')",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22P02", "{e:?}");
    assert!(format!("{e:?}").contains("TimeZone may change"), "{e:?}");
    // In a transaction over both shards, a SET over the extended protocol: the shards'
    // frames come back to pgshard, which reads the new zone from them too.
    c.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    c.batch_execute(
        "BEGIN;
         INSERT INTO events (id, created_at) VALUES (108, '2025-06-01 00:00+00');
         INSERT INTO events (id, created_at) VALUES (109, '2026-06-01 00:00+00')",
    )
    .await
    .unwrap();
    c.execute("SET TIME ZONE 'America/New_York'", &[])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO events (id, created_at) VALUES (110, '2025-12-31 20:00')",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(shard_of("events", 110).await, [1], "01:00 UTC");
    c.batch_execute("RESET TIME ZONE").await.unwrap();
}

#[tokio::test]
async fn filters_on_keys_with_no_shard_ask_every_shard() {
    // A filter on a key pgshard cannot place narrows nothing: PostgreSQL reads 'epoch',
    // zone names and a time after a SET TIME ZONE in the same string, and NULL or a value
    // outside every range or list matches no row. pgshard used to refuse these (22P02,
    // 23514, 23502); every shard now answers, as one PostgreSQL would.
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let create =
        "DROP TABLE IF EXISTS filter_t; CREATE TABLE filter_t (id int, created_at timestamptz)";
    let insert = "INSERT INTO filter_t (id, created_at) VALUES (1, 'epoch'), \
                  (2, '2025-06-01 12:00 Europe/Berlin'), (3, '2026-06-01 00:00+00'), \
                  (4, '2027-02-03 04:05+00')";
    for db in [&c, &plain] {
        db.batch_execute(create).await.unwrap();
        db.batch_execute(insert).await.unwrap();
    }
    for q in [
        "SELECT id FROM filter_t WHERE created_at = 'epoch'",
        "SELECT id FROM filter_t WHERE created_at = '2025-06-01 12:00 Europe/Berlin'",
        "SELECT id FROM filter_t WHERE created_at = 'June 1, 2026 00:00 UTC'",
        "SELECT id FROM filter_t WHERE created_at IN ('epoch', '2027-02-03 04:05+00') ORDER BY id",
        "SELECT id FROM filter_t WHERE created_at = '2031-01-01 00:00+00'",
        "SELECT id FROM filter_t WHERE created_at = NULL",
        "SET TIME ZONE 'Asia/Tokyo'; SELECT id FROM filter_t WHERE created_at = '2026-06-01 09:00'",
        "RESET TIME ZONE",
        "SELECT id FROM filter_t WHERE created_at = 'yesterday' OR id = 4",
        "SELECT count(*) FROM accounts WHERE region = 'jp'",
        "SELECT count(*) FROM users WHERE id = NULL",
    ] {
        same_as_plain(&c, &plain, q).await;
    }
    // Every shard was asked: the rows are on both.
    let on = |port| async move {
        let d = connect_server(port, "app").await;
        let n: i64 = d
            .query_one("SELECT count(*) FROM filter_t", &[])
            .await
            .unwrap()
            .get(0);
        n
    };
    assert_eq!((on(ports()[0]).await, on(ports()[1]).await), (2, 2));
    // NULL parameters, in the extended protocol.
    for (q, v) in [
        (
            "SELECT id FROM filter_t WHERE created_at = $1",
            None::<std::time::SystemTime>,
        ),
        (
            "SELECT id FROM filter_t WHERE created_at IS NOT DISTINCT FROM $1",
            None,
        ),
    ] {
        same_column_as_plain::<i32>(&c, &plain, q, &[&v]).await;
    }
    let n = c
        .query("SELECT name FROM users WHERE id = $1", &[&None::<i64>])
        .await
        .unwrap();
    assert!(n.is_empty());
    // A write with such a filter is a write on every shard, refused by default.
    let e = c
        .batch_execute("DELETE FROM filter_t WHERE created_at = 'epoch'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(format!("{e:?}").contains("cross_shard_writes"), "{e:?}");
    // Rows are never broadcast: a new key outside every range stays an error.
    let e = c
        .batch_execute("INSERT INTO filter_t (id, created_at) VALUES (5, '2031-01-01 00:00+00')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514", "{e:?}");
    let e = c
        .batch_execute(
            "UPDATE filter_t SET created_at = NULL WHERE created_at = '2026-06-01 00:00+00'",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23502", "{e:?}");
}

#[tokio::test]
async fn range_conditions_go_to_the_shards_whose_ranges_they_meet() {
    // `at >= a AND at < b` on a range-sharded table needs only the shards whose ranges
    // meet [a, b]; pgshard used to ask every shard (and refused such writes by default).
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let create = "DROP TABLE IF EXISTS span_t; CREATE TABLE span_t (id int, at timestamptz, n int)";
    let insert = "INSERT INTO span_t (id, at, n) VALUES (1, '2025-03-01 00:00+00', 0), \
                  (2, '2025-12-31 23:30+00', 0), (3, '2026-01-01 00:00+00', 0), \
                  (4, '2026-02-10 00:00+00', 0), (5, '2026-02-28 23:59+00', 0), \
                  (6, '2026-03-01 00:00+00', 0)";
    for db in [&c, &plain] {
        db.batch_execute(create).await.unwrap();
        db.batch_execute(insert).await.unwrap();
    }
    let one_shard = "at >= '2026-02-01 00:00+00' AND at < '2026-03-01 00:00+00'";
    for q in [
        format!("SELECT id FROM span_t WHERE {one_shard} ORDER BY id"),
        "SELECT id FROM span_t WHERE at BETWEEN '2025-01-01 00:00+00' AND '2025-12-31 23:59+00' ORDER BY id".into(),
        "SELECT id FROM span_t WHERE at < '2026-01-01 00:00+00' ORDER BY id".into(),
        "SELECT id FROM span_t WHERE at <= '2026-01-01 00:00+00' ORDER BY id".into(),
        "SELECT id FROM span_t WHERE at > '2025-12-31 22:00-02' ORDER BY id".into(),
        "SELECT id FROM span_t WHERE '2026-01-01 00:00+00' > at ORDER BY id".into(),
        "SELECT count(*), min(at)::text, max(id) FROM span_t WHERE at >= '2025-06-01 00:00+00'".into(),
        "SELECT id FROM span_t WHERE at < '2025-06-01 00:00+00' OR at > '2026-02-20 00:00+00' ORDER BY id".into(),
        "SELECT id FROM span_t WHERE at > '2026-03-01 00:00+00' AND at < '2025-01-01 00:00+00'".into(),
        format!("UPDATE span_t SET n = n + 1 WHERE {one_shard} RETURNING id, n"),
        "DELETE FROM span_t WHERE at < '2025-06-01 00:00+00' RETURNING id".into(),
        "SELECT id, n FROM span_t ORDER BY id".into(),
    ] {
        same_as_plain(&c, &plain, &q).await;
    }
    // Which shards ran it: EXPLAIN shows one plan, or one per shard under `Shard N`.
    for (q, plans) in [
        (format!("SELECT * FROM span_t WHERE {one_shard}"), 0),
        (
            "SELECT * FROM span_t WHERE at < '2025-06-01 00:00+00'".into(),
            0,
        ),
        (
            "SELECT * FROM span_t WHERE at > '2025-06-01 00:00+00'".into(),
            2,
        ),
    ] {
        assert_eq!(shard_plans(&c, &q).await, plans, "{q}");
    }
    // Parameters, in the extended protocol: binary timestamps.
    let t = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
    let (feb, mar) = (t(1_769_904_000), t(1_772_323_200)); // 2026-02-01, 2026-03-01 UTC
    let q = "SELECT id FROM span_t WHERE at >= $1 AND at < $2 ORDER BY id";
    same_column_as_plain::<i32>(&c, &plain, q, &[&feb, &mar]).await;
    let n = c
        .execute(
            "UPDATE span_t SET n = n + 10 WHERE at BETWEEN $1 AND $2",
            &[&feb, &mar],
        )
        .await
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn key_equal_to_any_element_of_an_array_goes_to_the_elements_shards() {
    // `id = ANY($1)` with an array of keys, as asyncpg, pgx and node-postgres users write a
    // list: the shards of its elements, where pgshard used to ask every shard (and
    // refused such writes by default).
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for q in [
        "SELECT id, name FROM users WHERE id = ANY('{3,5,150}') ORDER BY id",
        "SELECT id, name FROM users WHERE id = ANY(ARRAY[7, 8]) ORDER BY id",
        "SELECT id FROM users WHERE id = ANY('{}')",
        "SELECT id FROM users WHERE id = ANY('{NULL,9}'::bigint[])",
        "SELECT count(*) FROM users WHERE id = ANY('{1,2,3,4,5,6}') OR id = 199",
    ] {
        same_as_plain(&c, &plain, q).await;
    }
    let q = "SELECT id FROM users WHERE id = ANY($1) ORDER BY id";
    for keys in [vec![1i64, 2, 3, 120], vec![42], vec![]] {
        same_column_as_plain::<i64>(&c, &plain, q, &[&keys]).await;
    }
    assert!(c.query(q, &[&None::<Vec<i64>>]).await.unwrap().is_empty());
    // Keys of one shard: one shard runs it (EXPLAIN shows one plan, no `Shard N`), and a
    // write with them is a one-shard write.
    let shard_of = |id: i64| partition_of(&HashKey::Int(id), 2);
    let same: Vec<i64> = (930_000..)
        .filter(|&id| shard_of(id) == shard_of(930_000))
        .take(3)
        .collect();
    let list = format!(
        "{{{}}}",
        same.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let q = format!("SELECT * FROM users WHERE id = ANY('{list}')");
    assert_eq!(shard_plans(&c, &q).await, 0, "{q}");
    for id in &same {
        c.execute("INSERT INTO split_t (id, name) VALUES ($1, 'any')", &[id])
            .await
            .unwrap();
    }
    let n = c
        .execute("DELETE FROM split_t WHERE id = ANY($1)", &[&same])
        .await
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn computed_keys_are_evaluated_by_a_server() {
    // `computed_t` is range-sharded on a timestamptz at 2026-01-01 UTC. Keys pgshard cannot
    // read itself (expressions such as now(), and text such as 'infinity' or a zone name)
    // were refused; a server now evaluates them, each row goes to its value's shard, and
    // the row stores the value it was routed by.
    use std::time::{Duration, SystemTime};
    let addr = setup().await;
    let mut c = connect(addr).await;
    // A table of its own, range-sharded as `events` (the other tests read `events`).
    c.batch_execute(
        "DROP TABLE IF EXISTS computed_t; CREATE TABLE computed_t (id int, created_at timestamptz)",
    )
    .await
    .unwrap();
    let [p0, p1] = ports();
    let direct = connect_server(p0, "app").await;
    let shard_of = |id: i32| async move {
        let mut found = Vec::new();
        for (s, port) in [p0, p1].into_iter().enumerate() {
            let n: i64 = connect_server(port, "app")
                .await
                .query_one("SELECT count(*) FROM computed_t WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                found.push(s);
            }
        }
        found
    };
    // A row's stored value, read on the shards themselves.
    let stored = |id: i32| async move {
        let mut out = Vec::new();
        for port in [p0, p1] {
            for row in connect_server(port, "app")
                .await
                .query(
                    "SELECT created_at::text FROM computed_t WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap()
            {
                out.push(row.get::<_, String>(0));
            }
        }
        out
    };

    // Text pgshard cannot parse, in the simple protocol: stored as PostgreSQL reads it.
    for (id, text, shard) in [
        (1, "infinity", 1),
        (2, "-infinity", 0),
        (3, "epoch", 0),
        (4, "2026-01-01 00:30 Europe/Berlin", 0),
        (5, "2025-12-31 23:59:59.9999999", 1),
        (6, "January 2, 2026 10:00", 1),
    ] {
        c.batch_execute(&format!(
            "INSERT INTO computed_t (id, created_at) VALUES ({id}, '{text}')"
        ))
        .await
        .unwrap_or_else(|e| panic!("{text}: {e:?}"));
        assert_eq!(shard_of(id).await, [shard], "{text}");
        let plain: String = direct
            .query_one(&format!("SELECT '{text}'::timestamptz::text"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored(id).await, [plain], "{text}");
    }

    // Expressions, several rows split over the shards, with the client's parameters in
    // the extended protocol; RETURNING answers as from one INSERT.
    let far = SystemTime::now() + Duration::from_secs(1000 * 366 * 86400);
    let rows = c
        .query(
            "INSERT INTO computed_t (id, created_at) VALUES
               (10, now() - interval '1000 years'),
               (11, now() + $1::text::interval),
               (12, timestamptz '2025-06-01 00:00+00' + $2::int * interval '1 day'),
               (13, $3),
               (14, '2024-01-01')
             RETURNING id",
            &[&"1000 years", &300i32, &far],
        )
        .await
        .unwrap();
    let mut ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort();
    assert_eq!(ids, [10, 11, 12, 13, 14]);
    for (id, shard) in [(10, 0), (11, 1), (12, 1), (13, 1), (14, 0)] {
        assert_eq!(shard_of(id).await, [shard], "row {id}");
    }
    let plain: String = direct
        .query_one(
            "SELECT (timestamptz '2025-06-01 00:00+00' + 300 * interval '1 day')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored(12).await, [plain]);

    // Rows whose readable keys are all on one shard do not take the others there.
    c.batch_execute(
        "INSERT INTO computed_t (id, created_at) VALUES (15, '2024-01-01'), (16, now() + interval '1000 years')",
    )
    .await
    .unwrap();
    assert_eq!(shard_of(15).await, [0]);
    assert_eq!(shard_of(16).await, [1]);

    // In a transaction now() is the transaction's, the same in every row on its shard.
    c.batch_execute(
        "BEGIN;
         INSERT INTO computed_t (id, created_at) VALUES (20, now());
         INSERT INTO computed_t (id, created_at) VALUES (21, now());
         COMMIT",
    )
    .await
    .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO computed_t (id, created_at) VALUES (22, now())",
        &[],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO computed_t (id, created_at) VALUES (23, now())",
        &[],
    )
    .await
    .unwrap();
    let same: i64 = tx
        .query_one(
            "SELECT count(*) FROM computed_t WHERE id IN (22, 23) AND created_at = now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(same, 2, "now() is the transaction's on the rows' shard");
    tx.commit().await.unwrap();
    let s20 = shard_of(20).await;
    assert_eq!(s20.len(), 1);
    assert_eq!(shard_of(21).await, s20);
    assert_eq!(stored(20).await, stored(21).await);
    assert_eq!(stored(22).await, stored(23).await);
    assert_ne!(stored(20).await, stored(22).await);

    // PostgreSQL's own errors; a key that reads a sharded table stays refused.
    let e = c
        .batch_execute("INSERT INTO computed_t (id, created_at) VALUES (30, 'garbage')")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_DATETIME_FORMAT),
        "{e:?}"
    );
    let e = c
        .batch_execute("INSERT INTO computed_t (id, created_at) VALUES (31, now()::text)")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::DATATYPE_MISMATCH),
        "{e:?}"
    );
    // A key made by a subquery over every shard (refused before): evaluated first, the
    // row goes to its value's shard (the max is row 1's 'infinity').
    c.batch_execute(
        "INSERT INTO computed_t (id, created_at) VALUES (32, (SELECT max(created_at) FROM computed_t))",
    )
    .await
    .unwrap();
    assert_eq!(shard_of(32).await, [1]);
    assert_eq!(stored(32).await, ["infinity"]);
    assert!(shard_of(30).await.is_empty() && shard_of(31).await.is_empty());
    // The session still works, outside and inside a transaction.
    c.batch_execute("BEGIN; INSERT INTO computed_t (id, created_at) VALUES (33, now()); ROLLBACK")
        .await
        .unwrap();
    assert!(shard_of(33).await.is_empty());
    // The key left out (or DEFAULT, or DEFAULT VALUES): the column's default, looked up
    // and evaluated by a server.
    c.batch_execute("ALTER TABLE computed_t ALTER created_at SET DEFAULT now()")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO computed_t (id) VALUES (60), (61)")
        .await
        .unwrap();
    c.query(
        "INSERT INTO computed_t (id, created_at) VALUES ($1, DEFAULT)",
        &[&62i32],
    )
    .await
    .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO computed_t (id) VALUES (63)", &[])
        .await
        .unwrap();
    let same: i64 = tx
        .query_one(
            "SELECT count(*) FROM computed_t WHERE id = 63 AND created_at = now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(same, 1, "the default's now() is the transaction's");
    tx.commit().await.unwrap();
    let s60 = shard_of(60).await;
    for id in [61, 62, 63] {
        assert_eq!(shard_of(id).await, s60, "row {id}");
    }
    assert_eq!(stored(60).await, stored(61).await);
    c.batch_execute("ALTER TABLE computed_t ALTER created_at SET DEFAULT '2020-02-02 00:00+00'")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO computed_t DEFAULT VALUES")
        .await
        .unwrap();
    let mut keyless = Vec::new();
    for port in [p0, p1] {
        let n: i64 = connect_server(port, "app")
            .await
            .query_one("SELECT count(*) FROM computed_t WHERE id IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        keyless.push(n);
    }
    assert_eq!(keyless, [1, 0], "DEFAULT VALUES: 2020-02-02 is shard 0's");
    // A default drawn from a sequence: in a transaction's first statement, as outside
    // one, one key per row (it used to be drawn twice there, once to find where the
    // transaction begins), and the row stores the key it was routed by.
    // (An unsharded sequence lives on the default shard only: one on each shard here.)
    for port in [p0, p1] {
        connect_server(port, "app")
            .await
            .batch_execute("DROP SEQUENCE IF EXISTS computed_seq; CREATE SEQUENCE computed_seq; GRANT ALL ON SEQUENCE computed_seq TO PUBLIC")
            .await
            .unwrap();
    }
    c.batch_execute(
        "ALTER TABLE computed_t ALTER created_at SET DEFAULT \
         '2020-02-02 00:00+00'::timestamptz + nextval('computed_seq')::int * interval '1 second'",
    )
    .await
    .unwrap();
    let drawn = || async move {
        let mut n = 0i64;
        for port in [p0, p1] {
            n += connect_server(port, "app")
                .await
                .query_one(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM computed_seq",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
        n
    };
    let before = drawn().await;
    c.batch_execute("BEGIN; INSERT INTO computed_t (id) VALUES (70); COMMIT")
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO computed_t (id) VALUES ($1)", &[&71i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(drawn().await - before, 2, "one key per row");
    assert_eq!(shard_of(70).await, [0]);
    assert_eq!(shard_of(71).await, [0]);
    let at = |n: i64| format!("2020-02-02 00:00:{n:02}+00");
    assert_eq!(stored(70).await, [at(before + 1)]);
    assert_eq!(stored(71).await, [at(before + 2)]);
    // A transaction that ran only settings moves to the row's shard; still one key.
    c.batch_execute(
        "ALTER TABLE computed_t ALTER created_at SET DEFAULT \
         '2027-01-01 00:00+00'::timestamptz + nextval('computed_seq')::int * interval '1 second'",
    )
    .await
    .unwrap();
    let before = drawn().await;
    c.batch_execute(
        "BEGIN; SET LOCAL work_mem = '8MB'; INSERT INTO computed_t (id) VALUES (72); COMMIT",
    )
    .await
    .unwrap();
    assert_eq!(drawn().await - before, 1, "one key");
    assert_eq!(shard_of(72).await, [1]);
    // No default: refused, naming the key (a NULL key has no shard); an identity key is
    // refused too.
    c.batch_execute("ALTER TABLE computed_t ALTER created_at DROP DEFAULT")
        .await
        .unwrap();
    let e = c
        .batch_execute("INSERT INTO computed_t (id) VALUES (65)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(format!("{e:?}").contains("no default"), "{e:?}");
    c.batch_execute(
        "DROP TABLE IF EXISTS ident_t; CREATE TABLE ident_t (id int GENERATED ALWAYS AS IDENTITY, v int)",
    )
    .await
    .unwrap();
    let e = c
        .batch_execute("INSERT INTO ident_t (v) VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    // An INSERT in WITH is not carried out in steps: refused rather than run everywhere.
    let e = c
        .batch_execute(
            "WITH x AS (INSERT INTO computed_t (id, created_at) VALUES (66, now()) RETURNING id) SELECT * FROM x",
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("run it on its own"), "{e:?}");
    assert!(shard_of(65).await.is_empty() && shard_of(66).await.is_empty());

    // Session pooling: refused, saying why.
    let yaml = cluster2().config_yaml("127.0.0.1:0", "session", 2);
    let session = connect(start_proxy_yaml(&format!("{yaml}{RULES}"))).await;
    let e = session
        .batch_execute("INSERT INTO computed_t (id, created_at) VALUES (34, now())")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(
        format!("{e:?}").contains("transaction pooling mode"),
        "{e:?}"
    );
    assert!(shard_of(34).await.is_empty());
}

#[tokio::test]
async fn written_keys_are_placed_as_their_columns_store_them() {
    // A timestamptz(0) column stores 23:59:59.7 as the next day's 00:00:00, numeric(10,1)
    // stores 4.96 as 5.0, varchar(3) stores 'abc  ' as 'abc': each row must be on the
    // shard of its stored key, where reads of that key look. round_t's and round_v's
    // modifiers are read from the servers' catalog; round_n's is in the configuration.
    let ddl = "DROP TABLE IF EXISTS round_t, round_n, round_v, round_other;
        CREATE TABLE round_t (id int, at timestamptz(0));
        CREATE TABLE round_n (id int, k numeric(10,1));
        CREATE TABLE round_v (id int, code varchar(3));
        CREATE TABLE round_other (id text)";
    let addr = setup().await;
    connect(addr).await.batch_execute(ddl).await.unwrap();
    let plain = connect_server(ports()[0], "plain").await;
    plain.batch_execute(ddl).await.unwrap();
    let yaml = cluster2()
        .config_yaml("127.0.0.1:0", "transaction", 2)
        .replace(
            "default_shard: 0\n",
            "default_shard: 0\n    failover: { check_interval_ms: 100 }\n",
        )
        .replace(
            "users:\n",
            "admin: { listen: '127.0.0.1:0', users: [admin] }\nusers:\n  - { name: admin, auth: trust }\n",
        );
    let (proxy, server) =
        start_proxy_server(pgshard::config::Config::from_yaml(&format!("{yaml}{RULES}")).unwrap());
    let observed = |table: &str| {
        let state = server.state.load();
        let db = &state.topology.databases["app"];
        let f = db
            .router
            .rules
            .tables
            .iter()
            .find(|f| f.table == table)
            .unwrap();
        f.key.observed()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ["round_t", "round_n", "round_v", "round_other"]
        .iter()
        .any(|t| !matches!(observed(t), Observed::Type { .. }))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            observed("round_t")
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ok = |name: &str| Observed::Type {
        name: name.into(),
        matches: true,
    };
    assert_eq!(observed("round_t"), ok("timestamp(0) with time zone"));
    assert_eq!(observed("round_n"), ok("numeric(10,1)"));
    assert_eq!(observed("round_v"), ok("character varying(3)"));
    // Configured as bigint (the default for hash), text on the servers: reported.
    assert_eq!(
        observed("round_other"),
        Observed::Type {
            name: "text".into(),
            matches: false
        }
    );
    let metrics = pgshard::admin::metrics::render(&server);
    assert!(
        metrics
            .contains("pgshard_shard_key_type_mismatch{database=\"app\",table=\"round_other\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgshard_shard_key_type_mismatch{database=\"app\",table=\"round_t\"} 0")
    );
    let admin_port = server.side_addrs().0.unwrap().port().to_string();
    let out = std::process::Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &admin_port])
        .args(["-U", "admin", "-d", "pgshard", "-c", "SHOW TABLES"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&out.stdout);
    for line in [
        "app|round_t|at|range|timestamptz|timestamp(0) with time zone|ok",
        "app|round_v|code|hash|text|character varying(3)|ok",
        "app|round_other|id|hash|integer|text|type differs",
    ] {
        assert!(tables.lines().any(|l| l == line), "{line} in {tables}");
    }

    // The modifiers a configuration declares are encoded as PostgreSQL's catalog has them.
    let types = [
        "numeric(10,1)",
        "numeric(7)",
        "numeric(5,-2)",
        "timestamptz(3)",
        "timestamp(0)",
        "varchar(20)",
    ];
    let cols: Vec<String> = (0..types.len())
        .map(|i| format!("c{i} {}", types[i]))
        .collect();
    plain
        .batch_execute(&format!("CREATE TEMP TABLE mods ({})", cols.join(", ")))
        .await
        .unwrap();
    for (i, ty) in types.iter().enumerate() {
        let sql = format!(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'mods'::regclass AND attname = 'c{i}'"
        );
        let typmod: i32 = plain.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(
            pgshard::sharding::column::declared(ty).unwrap().1,
            typmod,
            "{ty}"
        );
    }

    let c = connect(proxy).await;
    let statements = [
        "INSERT INTO round_t (id, at) VALUES (1, '2025-12-31 23:59:59.7+00'), (2, '2025-12-31 23:59:59.2+00')",
        "INSERT INTO round_n (id, k) VALUES (1, 4.96), (2, 4.94), (3, '4.95')",
        "INSERT INTO round_v (id, code) VALUES (1, 'abc  '), (2, 'xy ')",
    ];
    for q in statements {
        c.batch_execute(q).await.unwrap();
        plain.batch_execute(q).await.unwrap();
    }
    // Parameters (binary for the timestamp and the text), an UPDATE's new key, COPY.
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_767_225_599_600_000);
    for db in [&c, &plain] {
        db.execute("INSERT INTO round_t (id, at) VALUES (3, $1)", &[&at])
            .await
            .unwrap();
        db.execute(
            "INSERT INTO round_v (id, code) VALUES (3, $1)",
            &[&"efg   "],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO round_n (id, k) VALUES (4, $1::text::numeric)",
            &[&"14.94"],
        )
        .await
        .unwrap();
        db.batch_execute("UPDATE round_n SET k = 4.91 WHERE k = 4.9")
            .await
            .unwrap();
        let sink = db
            .copy_in::<_, bytes::Bytes>("COPY round_t (id, at) FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        use futures_util::SinkExt;
        sink.send(bytes::Bytes::from_static(b"4\t2025-12-31 23:59:59.5+00\n"))
            .await
            .unwrap();
        sink.close().await.unwrap();
    }
    // A new key that the column rounds into another shard's range moves the row: refused
    // (as written, 4.96 would have stayed on the row's shard, stored as 5.0).
    let e = c
        .batch_execute("UPDATE round_n SET k = 4.96 WHERE k = 4.9")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    // Every row on the shard of its stored key: the ranged tables' bounds are checked by
    // the servers, the hashed key hashed here.
    for (table, key) in [
        ("round_t", "(at >= '2026-01-01 00:00:00+00')::int::text"),
        ("round_n", "(k >= 5)::int::text"),
        ("round_v", "code"),
    ] {
        for (s, port) in ports().into_iter().enumerate() {
            let d = connect_server(port, "app").await;
            let sql = format!("SELECT id::text, {key} FROM {table}");
            for r in rows(&d.simple_query(&sql).await.unwrap()) {
                let key = r[1].clone().unwrap();
                let shard = match table {
                    "round_v" => partition_of(&HashKey::Text(key.as_bytes()), 2),
                    _ => key.parse().unwrap(),
                };
                assert_eq!(shard, s as u64, "{table} row {:?}", r[0]);
            }
        }
    }
    // Reads of the stored keys find the rows, as on one server.
    for q in [
        "SELECT id FROM round_t WHERE at = '2026-01-01 00:00:00+00' ORDER BY id",
        "SELECT id FROM round_t WHERE at = '2025-12-31 23:59:59+00' ORDER BY id",
        "SELECT id FROM round_n WHERE k = 5.0 ORDER BY id",
        "SELECT id FROM round_n WHERE k = 4.9 ORDER BY id",
        "SELECT id FROM round_n WHERE k = 14.9 ORDER BY id",
        "SELECT id FROM round_v WHERE code = 'abc'",
        "SELECT id FROM round_v WHERE code = 'efg'",
        "SELECT id FROM round_v WHERE code = 'xy '",
        "SELECT id FROM round_v WHERE code = 'abc  '",
    ] {
        let got = same_as_plain(&c, &plain, q).await;
        assert!(!got.is_empty() || q.ends_with("'abc  '"), "{q}");
    }
    // A new modifier (ALTER TABLE through pgshard): the monitor reads it again.
    for db in [&c, &plain] {
        db.batch_execute("ALTER TABLE round_t ALTER at TYPE timestamptz(1)")
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while observed("round_t") != ok("timestamp(1) with time zone") {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            observed("round_t")
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for db in [&c, &plain] {
        db.batch_execute("INSERT INTO round_t (id, at) VALUES (5, '2025-12-31 23:59:59.96+00')")
            .await
            .unwrap();
    }
    let d = connect_server(ports()[1], "app").await;
    let on_1 = rows(
        &d.simple_query("SELECT id FROM round_t WHERE id = 5")
            .await
            .unwrap(),
    );
    assert_eq!(on_1.len(), 1, "row 5 on shard 1");
    same_as_plain(
        &c,
        &plain,
        "SELECT id FROM round_t WHERE at = '2026-01-01 00:00:00+00' ORDER BY id",
    )
    .await;
    for db in [&c, &plain] {
        db.batch_execute("DROP TABLE round_t, round_n, round_v, round_other")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn returning_rows_of_a_split_insert_come_in_the_statements_row_order() {
    // One server returns an INSERT's RETURNING rows in the order of its VALUES, and
    // drivers rely on it (Django's bulk_create gives each object the key in its position).
    // Split over shards, each shard returns its own rows: they are put back in order.
    let ddl = "DROP TABLE IF EXISTS ret_t, ret_at;
        CREATE TABLE ret_t (id bigint PRIMARY KEY, name text);
        CREATE TABLE ret_at (id int, at timestamptz)";
    let addr = setup().await;
    let mut c = connect(addr).await;
    let mut plain = connect_server(ports()[0], "plain").await;
    c.batch_execute(ddl).await.unwrap();
    plain.batch_execute(ddl).await.unwrap();
    let values: Vec<String> = (1..=12).map(|i| format!("({i}, 'n{i}')")).collect();
    let simple = [
        format!("INSERT INTO ret_t (id, name) VALUES {} RETURNING id, name", values.join(", ")),
        // Keys a server evaluates (pgshard does not read `+ interval`).
        "INSERT INTO ret_at (id, at) VALUES (1, '2025-12-31'::timestamptz + interval '1 day'), \
         (2, '2025-06-01'::timestamptz + interval '1 day'), (3, '2026-03-01'::timestamptz + interval '1 day'), \
         (4, '2025-01-01'::timestamptz + interval '1 day') RETURNING id, at"
            .into(),
        // INSERT ... SELECT split by key.
        "INSERT INTO ret_t (id, name) SELECT g, 'g' || g FROM generate_series(101, 112) g ORDER BY g DESC RETURNING id".into(),
        // In a transaction block.
        "BEGIN".into(),
        "INSERT INTO ret_t (id, name) VALUES (201, 'a'), (202, 'b'), (203, 'c'), (204, 'd'), (205, 'e') RETURNING id".into(),
        "COMMIT".into(),
        // ON CONFLICT DO NOTHING skips rows: the order cannot be known, the rows can.
        "INSERT INTO ret_t (id, name) VALUES (1, 'x'), (301, 'y'), (302, 'z') ON CONFLICT DO NOTHING RETURNING id".into(),
    ];
    statements_match_plain(&c, &plain, &simple).await;
    // The extended protocol, outside and inside a transaction.
    let q = "INSERT INTO ret_t (id, name) VALUES ($1, 'p'), ($2, 'q'), ($3, 'r'), ($4, 's'), ($5, 't'), ($6, 'u') RETURNING id";
    returned_keys_match_plain(&mut c, &mut plain, q, 6, &[(400, false), (500, true)]).await;
    // Session mode runs a statement over several shards on connections of its own.
    let yaml = cluster2().config_yaml("127.0.0.1:0", "session", 2);
    let session = connect(start_proxy_yaml(&format!("{yaml}{RULES}"))).await;
    let values: Vec<String> = (601..=612).map(|i| format!("({i}, 'n{i}')")).collect();
    let q = format!(
        "INSERT INTO ret_t (id, name) VALUES {} RETURNING id",
        values.join(", ")
    );
    assert_eq!(
        rows_or_sqlstate(&session, &q).await,
        rows_or_sqlstate(&plain, &q).await
    );
    for db in [&c, &plain] {
        db.batch_execute("DROP TABLE ret_t, ret_at").await.unwrap();
    }
}

#[tokio::test]
async fn insert_without_a_column_list_finds_the_key_among_the_tables_columns() {
    // Hand-written SQL and `pg_dump --inserts` name no columns: the key's position is the
    // table's, read where the INSERT runs, so that it follows the table as it changes.
    let ddl = "DROP TABLE IF EXISTS unlisted_t;
        CREATE TABLE unlisted_t (note text, id bigint PRIMARY KEY, n int DEFAULT 7)";
    let addr = setup().await;
    let mut c = connect(addr).await;
    let mut plain = connect_server(ports()[0], "plain").await;
    c.batch_execute(ddl).await.unwrap();
    plain.batch_execute(ddl).await.unwrap();
    let values: Vec<String> = (1..=12).map(|i| format!("('n{i}', {i}, {i})")).collect();
    let simple = [
        // Over both shards, RETURNING in the statement's order.
        format!("INSERT INTO unlisted_t VALUES {} RETURNING id, note, n", values.join(", ")),
        // Fewer values than columns: the rest take their defaults.
        "INSERT INTO unlisted_t VALUES ('short', 20) RETURNING *".into(),
        // A key a server evaluates.
        "INSERT INTO unlisted_t VALUES ('sum', 20 + 1, 1), ('sum', 20 + 2, 1) RETURNING id".into(),
        // Schema-qualified, ON CONFLICT.
        "INSERT INTO public.unlisted_t VALUES ('dup', 1, 0), ('new', 23, 0) ON CONFLICT (id) DO NOTHING RETURNING id".into(),
        // What PostgreSQL refuses, it refuses with its own SQLSTATE.
        "INSERT INTO unlisted_t VALUES ('x', 90, 1, 'extra')".into(),
        "INSERT INTO unlisted_t VALUES ('x', 'not a number', 1)".into(),
        "INSERT INTO unlisted_missing VALUES (1)".into(),
        // The key's position moves when a column before it is dropped.
        "ALTER TABLE unlisted_t DROP COLUMN note".into(),
        "INSERT INTO unlisted_t VALUES (31, 1), (32, 2), (33, 3), (34, 4), (35, 5) RETURNING *".into(),
        // A column added inside the transaction counts for the INSERTs in it.
        "BEGIN".into(),
        "ALTER TABLE unlisted_t ADD COLUMN extra text".into(),
        "INSERT INTO unlisted_t VALUES (41, 1, 'a'), (42, 2, 'b'), (43, 3, 'c'), (44, 4, 'd') RETURNING *".into(),
        "COMMIT".into(),
        // INSERT ... SELECT: keys that only the rows tell, a `*` (the query's description
        // tells how many columns it fills), a constant key, rows of a co-located table,
        // fewer columns than the table's, too many.
        "INSERT INTO unlisted_t SELECT g, g % 3, 's' || g FROM generate_series(1001, 1010) g RETURNING id".into(),
        "INSERT INTO unlisted_t SELECT id + 2000, n, extra FROM unlisted_t WHERE id < 100".into(),
        "INSERT INTO unlisted_t SELECT * FROM (VALUES (3001::bigint, 1, 'w'), (3002, 2, 'w')) v".into(),
        "INSERT INTO unlisted_t SELECT 3101, 1, 'c' RETURNING *".into(),
        "INSERT INTO unlisted_t SELECT u.id, 1, u.name FROM users u WHERE u.id > 190".into(),
        "INSERT INTO unlisted_t SELECT 3201 RETURNING *".into(),
        "INSERT INTO unlisted_t SELECT 1, 2, 'x', 4".into(),
        // A transaction that begins with one: where its first row goes.
        "BEGIN".into(),
        "INSERT INTO unlisted_t VALUES (51, 1, 'x')".into(),
        "SELECT id, extra FROM unlisted_t WHERE id = 51".into(),
        "COMMIT".into(),
        // In a failed transaction, refused as any statement there.
        "BEGIN".into(),
        "SELECT 1/0".into(),
        "INSERT INTO unlisted_t VALUES (55, 1, 'x')".into(),
        "ROLLBACK".into(),
        // SQL-level prepared statements run where their arguments belong.
        "PREPARE unl(bigint) AS INSERT INTO unlisted_t VALUES ($1, 5, 'p') RETURNING id".into(),
        "EXECUTE unl(61)".into(),
        "EXECUTE unl(62)".into(),
        "DEALLOCATE unl".into(),
    ];
    statements_match_plain(&c, &plain, &simple).await;
    // The extended protocol, outside and inside a transaction.
    let q = "INSERT INTO unlisted_t VALUES ($1, 1, 'p'), ($2, 2, 'q'), ($3, 3, 'r'), ($4, 4, 's') RETURNING id";
    returned_keys_match_plain(&mut c, &mut plain, q, 4, &[(600, false), (700, true)]).await;
    for db in [&c, &plain] {
        db.execute(
            "INSERT INTO unlisted_t SELECT $1::bigint, $2::int, 'e'",
            &[&3301i64, &4i32],
        )
        .await
        .unwrap();
    }
    let one = c
        .query_one(
            "INSERT INTO unlisted_t VALUES ($1, $2) RETURNING n",
            &[&800i64, &9i32],
        )
        .await
        .unwrap();
    assert_eq!(one.get::<_, i32>(0), 9);
    plain
        .execute("INSERT INTO unlisted_t VALUES ($1, $2)", &[&800i64, &9i32])
        .await
        .unwrap();
    // Several in one query string.
    let q = "INSERT INTO unlisted_t VALUES (901, 1, 'a'); INSERT INTO unlisted_t VALUES (902, 2, 'b'), (903, 3, 'c')";
    assert_eq!(
        rows_or_sqlstate(&c, q).await,
        rows_or_sqlstate(&plain, q).await
    );
    unlisted_rows_on_their_shards(&c, &plain).await;
    // A restore of `pg_dump --inserts` with psql (which empties search_path first).
    let dump = run_ok(
        std::process::Command::new("pg_dump")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &ports()[0].to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "--data-only",
                "--inserts",
                "--rows-per-insert=3",
                "-t",
                "unlisted_t",
                "plain",
            ]),
    );
    assert!(
        dump.contains("INSERT INTO public.unlisted_t VALUES"),
        "{dump}"
    );
    c.batch_execute(
        "DROP TABLE unlisted_t; CREATE TABLE unlisted_t (id bigint PRIMARY KEY, n int DEFAULT 7, extra text)",
    )
    .await
    .unwrap();
    let mut restore = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &addr.port().to_string(), "-U", "app", "-d", "app"])
        .env("PGPASSWORD", "app")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(dump.as_bytes())
        .unwrap();
    let out = restore.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every row on its key's shard, and the same rows as the plain database.
    unlisted_rows_on_their_shards(&c, &plain).await;
    for db in [&c, &plain] {
        db.batch_execute("DROP TABLE unlisted_t").await.unwrap();
    }
}

/// Every row of `unlisted_t` is on its key's shard, and the rows are the plain database's.
async fn unlisted_rows_on_their_shards(c: &tokio_postgres::Client, plain: &tokio_postgres::Client) {
    let mut seen = 0;
    for (s, p) in ports().into_iter().enumerate() {
        let on: Vec<i64> = connect_server(p, "app")
            .await
            .query("SELECT id FROM unlisted_t", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in &on {
            assert_eq!(partition_of(&HashKey::Int(*id), 2), s as u64, "{id}");
        }
        seen += on.len();
    }
    let all = same_as_plain(c, plain, "SELECT * FROM unlisted_t ORDER BY id").await;
    assert_eq!(seen, all.len());
    assert!(seen > 30, "{seen}");
}

#[tokio::test]
async fn windows_over_rows_of_several_shards_match_plain_postgres() {
    // Windows not partitioned by the shard key need every shard's rows: the shards send
    // the columns the query reads, and PostgreSQL computes the windows over all of them.
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for q in [
        "SELECT id, row_number() OVER (ORDER BY id) FROM orders ORDER BY id",
        "SELECT id, user_id, rank() OVER (ORDER BY total DESC, id) AS r FROM orders ORDER BY r LIMIT 15",
        "SELECT id, total, sum(total) OVER (ORDER BY id) AS running FROM orders WHERE id < 500 ORDER BY id",
        "SELECT id, lag(total) OVER (ORDER BY id), lead(id, 2) OVER (ORDER BY id) FROM orders ORDER BY id OFFSET 10 LIMIT 20",
        "SELECT total, id, dense_rank() OVER (PARTITION BY total ORDER BY id) FROM orders ORDER BY total, id",
        "SELECT u.name, o.id, ntile(4) OVER (ORDER BY o.id) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id < 50 ORDER BY o.id",
        "SELECT DISTINCT total, count(*) OVER (PARTITION BY total) FROM orders ORDER BY 1",
        "SELECT id FROM orders ORDER BY row_number() OVER (ORDER BY total, id) DESC LIMIT 5",
        "SELECT row_number() OVER () > 0 AS counted FROM orders LIMIT 3",
        "SELECT id, score, percent_rank() OVER (ORDER BY score, id), first_value(name) OVER (ORDER BY score DESC, id) FROM users ORDER BY id",
        "SELECT id, avg(score) OVER (ORDER BY id ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) FROM users WHERE id <= 30 ORDER BY id",
    ] {
        same_as_plain_in_and_out_of_a_transaction(&c, &plain, q).await;
    }
    // The extended protocol: parameters in WHERE and LIMIT, binary results.
    let q = "SELECT id, row_number() OVER (ORDER BY total DESC, id) FROM orders WHERE user_id > $1 ORDER BY 2 LIMIT $2";
    let n = pairs_as_plain(&c, &plain, q, &[&150i64, &7i64]).await;
    assert_eq!(n, 7);
    // What it does not cover is refused, never answered wrongly.
    for q in [
        "SELECT *, row_number() OVER (ORDER BY id) FROM orders",
        "SELECT id, rank() OVER w FROM orders WINDOW w AS (ORDER BY id)",
        "SELECT id, row_number() OVER (ORDER BY (SELECT max(o.id) FROM orders o WHERE o.user_id = orders.user_id)) FROM orders",
    ] {
        let e = c.simple_query(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
}

#[tokio::test]
async fn answers_past_max_merge_bytes_fail_with_54000_and_the_rest_goes_on() {
    // What pgshard holds to merge a statement is bounded: a merge over a table too large
    // for memory fails on its own instead of taking the process (and every client) down.
    let addr = setup().await;
    let c = connect(addr).await;
    c.batch_execute(
        "DROP TABLE IF EXISTS big_t; CREATE TABLE big_t (id bigint PRIMARY KEY, pad text)",
    )
    .await
    .unwrap();
    // About 200 KB per shard.
    c.batch_execute(
        "INSERT INTO big_t (id, pad) SELECT g, repeat('x', 2000) FROM generate_series(1, 200) g",
    )
    .await
    .unwrap();
    // A column ordered in a collation a server ranks, and an index in that order.
    c.batch_execute(
        "ALTER TABLE big_t ADD COLUMN m text COLLATE \"en-x-icu\" GENERATED ALWAYS AS ((id % 7)::text) STORED; \
         CREATE INDEX big_t_m ON big_t (m, id)",
    )
    .await
    .unwrap();
    let yaml = cluster2()
        .config_yaml("127.0.0.1:0", "transaction", 2)
        .replace("users:\n", "users:\n  - { name: trusty, auth: trust }\n");
    let (small, server) = start_proxy_server(
        pgshard::config::Config::from_yaml(&format!("{yaml}{RULES}    max_merge_bytes: 65536\n"))
            .unwrap(),
    );
    let mut l = connect(small).await;
    // (DISTINCT: merged held. Rows that only concatenate or are only ordered stream.)
    let big = "SELECT DISTINCT id, pad FROM big_t ORDER BY id";
    for _ in 0..3 {
        // Simple and extended protocol; the pool's connections stay usable after.
        let e = l.simple_query(big).await.unwrap_err();
        assert_eq!(sqlstate(&e), "54000", "{e:?}");
        assert!(format!("{e:?}").contains("max_merge_bytes"), "{e:?}");
        let e = l.query(big, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "54000", "{e:?}");
        let n: i64 = l
            .query_one("SELECT count(*) FROM big_t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 200);
        let few = rows(
            &l.simple_query("SELECT id FROM big_t ORDER BY id LIMIT 3")
                .await
                .unwrap(),
        );
        assert_eq!(few.len(), 3);
    }
    // Inside a transaction: the statement fails, and the transaction with it.
    let tx = l.transaction().await.unwrap();
    tx.execute("INSERT INTO big_t (id, pad) VALUES (1001, 'a')", &[])
        .await
        .unwrap();
    let e = tx.query(big, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e:?}");
    let e = tx.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e:?}");
    tx.rollback().await.unwrap();
    // RETURNING rows of a write over several shards past the limit: nothing is written.
    let values: Vec<String> = (2001..2081)
        .map(|i| format!("({i}, repeat('y', 2000))"))
        .collect();
    let e = l
        .simple_query(&format!(
            "INSERT INTO big_t (id, pad) VALUES {} RETURNING pad",
            values.join(", ")
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e:?}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM big_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    // Rows that only concatenate stream to the client, past the limit: nothing is held.
    for _ in 0..3 {
        let all = rows(&l.simple_query("SELECT id, pad FROM big_t").await.unwrap());
        assert_eq!(all.len(), 200);
        assert!(
            all.iter()
                .all(|r| r[1].as_deref().map(str::len) == Some(2000))
        );
        // The extended protocol too (binary results), pipelined batches as well.
        let (all, few) = futures_util::join!(
            l.query("SELECT id, pad FROM big_t WHERE id > $1", &[&0i64]),
            l.query("SELECT pad FROM big_t WHERE id <= $1", &[&3i64])
        );
        let all = all.unwrap();
        assert_eq!(all.len(), 200);
        assert!(all.iter().all(|r| r.get::<_, String>(1).len() == 2000));
        let mut ids: Vec<i64> = all.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=200).collect::<Vec<i64>>());
        assert_eq!(few.unwrap().len(), 3);
        // A shard's error in the middle of the stream ends it as PostgreSQL's would; the
        // connections stay in step.
        let e = l
            .simple_query("SELECT id, 1 / (id - 150) FROM big_t")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
        let e = l
            .query("SELECT id, 1 / (id - $1) FROM big_t", &[&150i64])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
        let n: i64 = l
            .query_one("SELECT count(*) FROM big_t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 200);
    }
    // Rows ordered over the shards stream too, merged as each shard sends them sorted:
    // with hidden sort columns, LIMIT and OFFSET, in both protocols, pipelined.
    for _ in 0..2 {
        let all = rows(
            &l.simple_query("SELECT id, pad FROM big_t ORDER BY id")
                .await
                .unwrap(),
        );
        let ids: Vec<i64> = all
            .iter()
            .map(|r| r[0].as_ref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids, (1..=200).collect::<Vec<i64>>());
        let pads = rows(
            &l.simple_query("SELECT pad FROM big_t ORDER BY id DESC")
                .await
                .unwrap(),
        );
        assert_eq!(pads.len(), 200);
        assert!(pads.iter().all(|r| r.len() == 1));
        let page = rows(
            &l.simple_query("SELECT id FROM big_t ORDER BY id DESC LIMIT 4 OFFSET 150")
                .await
                .unwrap(),
        );
        assert_eq!(
            page,
            [["50"], ["49"], ["48"], ["47"]].map(|r| r.map(|v| Some(v.to_string())))
        );
        let (all, page) = futures_util::join!(
            l.query(
                "SELECT id, pad FROM big_t WHERE id > $1 ORDER BY id DESC",
                &[&0i64]
            ),
            l.query(
                "SELECT id FROM big_t ORDER BY pad, id LIMIT $1 OFFSET $2",
                &[&3i64, &10i64]
            )
        );
        let ids: Vec<i64> = all.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, (1..=200).rev().collect::<Vec<i64>>());
        let ids: Vec<i64> = page.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [11, 12, 13]);
        let e = l
            .simple_query("SELECT id, 1 / (id - 150) FROM big_t ORDER BY id")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
        let e = l
            .query(
                "SELECT id, 1 / (id - $1) FROM big_t ORDER BY id",
                &[&150i64],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
    }
    // As JDBC, psycopg and libpq's PQexecParams send it: the portal described, then
    // executed (again: an exhausted portal, as a server's), answered as one server would.
    let batch = [
        msg::parse("", "SELECT id, pad FROM big_t"),
        msg::bind("", "", &[]),
        msg::describe_portal(""),
        msg::execute(""),
        msg::execute(""),
        msg::sync(),
    ]
    .concat();
    let mut proxy = Raw::startup(small, "trusty", "app").await;
    proxy.until_ready().await;
    let mut direct = Raw::startup(([127, 0, 0, 1], ports()[0]).into(), "postgres", "app").await;
    direct.until_ready().await;
    for _ in 0..2 {
        proxy.send(&batch).await;
        direct.send(&batch).await;
        let (p, d) = (proxy.until_ready().await, direct.until_ready().await);
        assert_eq!(p.matches('D').count(), 200, "{p}");
        let tags = |t: &str| t.replace('D', "");
        assert_eq!(tags(&p), tags(&d));
        assert_eq!(tags(&p), "12TCCZ");
    }
    // Inside a transaction too, each shard in turn on the transaction's connection: the
    // rows include the transaction's own, and a shard's error aborts it.
    for _ in 0..2 {
        l.batch_execute("BEGIN; INSERT INTO big_t (id, pad) VALUES (1001, repeat('z', 2000))")
            .await
            .unwrap();
        let all = rows(&l.simple_query("SELECT id, pad FROM big_t").await.unwrap());
        assert_eq!(all.len(), 201);
        assert!(all.iter().any(|r| r[0].as_deref() == Some("1001")));
        let all = l
            .query("SELECT id, pad FROM big_t WHERE id > $1", &[&1i64])
            .await
            .unwrap();
        assert_eq!(all.len(), 200);
        assert!(all.iter().any(|r| r.get::<_, i64>(0) == 1001));
        // Ordered: the shards' sorted rows merged as the participants send them.
        let all = rows(
            &l.simple_query("SELECT id, pad FROM big_t ORDER BY id")
                .await
                .unwrap(),
        );
        let ids: Vec<i64> = all
            .iter()
            .map(|r| r[0].as_ref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids, (1..=200).chain([1001]).collect::<Vec<i64>>());
        let all = l
            .query(
                "SELECT pad FROM big_t WHERE id > $1 ORDER BY id DESC",
                &[&100i64],
            )
            .await
            .unwrap();
        assert_eq!(all.len(), 101);
        assert_eq!(all[0].get::<_, String>(0), "z".repeat(2000));
        // Values a server ranks are merged held, and read on the participants alike.
        let page = rows(
            &l.simple_query(
                "SELECT id FROM big_t ORDER BY pad COLLATE \"en-x-icu\" DESC, id LIMIT 2 OFFSET 1",
            )
            .await
            .unwrap(),
        );
        assert_eq!(page, [[Some("1".to_string())], [Some("2".to_string())]]);
        let e = l
            .query(
                "SELECT id, 1 / (id - $1) FROM big_t ORDER BY id",
                &[&150i64],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
        let e = l.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02", "{e:?}");
        // A shard's error in a merge held, after each shard's first rows (an index scan
        // in the ranked order: no sort first), whichever shard it is on: the transaction
        // is aborted for the batch's Sync and what follows.
        // (Each shard's second row in that order: its first is read before pgshard knows
        // the merge is held.)
        let on = |s: u64| {
            let mut ids: Vec<i64> = (1..=200i64)
                .filter(|&k| partition_of(&HashKey::Int(k), 2) == s)
                .collect();
            ids.sort_by_key(|&k| (k % 7, k));
            ids[1]
        };
        for bad in [on(0), on(1)] {
            l.batch_execute("ROLLBACK; BEGIN; SET LOCAL enable_sort = off")
                .await
                .unwrap();
            let e = l
                .query(
                    "SELECT id, 1 / (id - $1) FROM big_t ORDER BY m, id",
                    &[&bad],
                )
                .await
                .unwrap_err();
            assert_eq!(sqlstate(&e), "22012", "{e:?}");
            let e = l.query("SELECT 1", &[]).await.unwrap_err();
            assert_eq!(sqlstate(&e), "25P02", "{e:?}");
        }
        l.batch_execute("ROLLBACK").await.unwrap();
        l.batch_execute("BEGIN; INSERT INTO big_t (id, pad) VALUES (1001, repeat('z', 2000))")
            .await
            .unwrap();
        let e = l
            .simple_query("SELECT id, 1 / (id - 150) FROM big_t")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
        let e = l.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02", "{e:?}");
        l.batch_execute("ROLLBACK").await.unwrap();
        // And a shard's error in the extended protocol.
        l.batch_execute("BEGIN").await.unwrap();
        let e = l
            .query("SELECT id, 1 / (id - $1) FROM big_t", &[&150i64])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012", "{e:?}");
        let e = l.query("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02", "{e:?}");
        l.batch_execute("ROLLBACK").await.unwrap();
    }
    l.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let all = rows(&l.simple_query("SELECT id FROM big_t").await.unwrap());
    assert_eq!(all.len(), 200);
    l.batch_execute("COMMIT").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM big_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    // Counted for the operator: 3 x 2 reads, one in a transaction, one write.
    let hits = sample(
        &pgshard::admin::metrics::render(&server),
        "pgshard_merge_limit_exceeded_total",
        &[],
    );
    assert_eq!(hits, 8.0);
    // The proxy without the small limit merges it all.
    assert_eq!(rows(&c.simple_query(big).await.unwrap()).len(), 200);
    c.batch_execute("DROP TABLE big_t").await.unwrap();
}

#[tokio::test]
async fn queries_over_derived_tables_that_need_every_shard_match_plain_postgres() {
    // The subquery is merged as it would be on its own; the outer query runs around its
    // final query on one server.
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    for q in [
        // Top-N by a window over every shard.
        "SELECT * FROM (SELECT id, row_number() OVER (ORDER BY id DESC) AS rn FROM orders) t WHERE rn <= 5 ORDER BY rn",
        "SELECT * FROM (SELECT id, row_number() OVER (PARTITION BY total ORDER BY id) AS rn FROM orders) t WHERE rn = 1 ORDER BY id",
        // Aggregates over aggregates, DISTINCT, a LIMIT inside.
        "SELECT avg(n)::numeric(10,4), max(n) FROM (SELECT total, count(*) AS n FROM orders GROUP BY total) s",
        "SELECT count(*) FROM (SELECT DISTINCT name FROM users) u",
        "SELECT name FROM (SELECT name, score FROM users ORDER BY score DESC, id LIMIT 10) top ORDER BY name",
        "SELECT s.total, s.n FROM (SELECT total, count(*) AS n FROM orders GROUP BY total HAVING count(*) > 5) s ORDER BY s.n DESC, s.total LIMIT 3",
        "SELECT t.total, t.c FROM (SELECT total, count(*) AS c, string_agg(id::text, ',' ORDER BY id) AS ids FROM orders GROUP BY total) AS t WHERE t.c > 20 ORDER BY 1",
        // The same written as a CTE read once.
        "WITH t AS (SELECT id, row_number() OVER (ORDER BY id DESC) AS rn FROM orders) SELECT * FROM t WHERE rn <= 5 ORDER BY rn",
        "WITH s(total, n) AS (SELECT total, count(*) FROM orders GROUP BY total) SELECT max(n), count(*) FROM s",
        "WITH t AS MATERIALIZED (SELECT DISTINCT name FROM users) SELECT count(*) FROM t AS x",
    ] {
        same_as_plain_in_and_out_of_a_transaction(&c, &plain, q).await;
    }
    // The extended protocol: parameters inside, outside and in the outer LIMIT.
    let q = "SELECT id, r FROM (SELECT id, rank() OVER (ORDER BY total DESC, id) AS r FROM orders WHERE user_id > $1) t WHERE r <= $2 ORDER BY r LIMIT $3";
    let n = pairs_as_plain(&c, &plain, q, &[&120i64, &9i64, &6i64]).await;
    assert_eq!(n, 6);
    // A parameter in the derived table's own LIMIT is refused, not misread.
    let e = c
        .query(
            "SELECT * FROM (SELECT id FROM orders ORDER BY id LIMIT $1) t",
            &[&3i64],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
}

/// Each statement's rows (or SQLSTATE) through pgshard are plain PostgreSQL's; in any
/// order for ON CONFLICT, which skips rows.
async fn statements_match_plain(
    c: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    statements: &[String],
) {
    for q in statements {
        let ours = rows_or_sqlstate(c, q).await;
        let theirs = rows_or_sqlstate(plain, q).await;
        if q.contains("ON CONFLICT") {
            let sorted = |r: Result<Vec<Vec<Option<String>>>, String>| {
                let mut r = r.unwrap();
                r.sort();
                r
            };
            assert_eq!(sorted(ours), sorted(theirs), "{q}");
        } else {
            assert_eq!(ours, theirs, "{q}");
        }
    }
}

/// An INSERT `q` of `n` bigint keys `$1..$n` returning them, with keys from each `base`
/// (outside or inside a transaction): through pgshard the keys come back in order, as
/// from plain PostgreSQL.
async fn returned_keys_match_plain(
    c: &mut tokio_postgres::Client,
    plain: &mut tokio_postgres::Client,
    q: &str,
    n: i64,
    runs: &[(i64, bool)],
) {
    for &(base, in_tx) in runs {
        let keys: Vec<i64> = (base..base + n).collect();
        let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = keys
            .iter()
            .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let mut got = Vec::new();
        for client in [&mut *c, &mut *plain] {
            let rows = if in_tx {
                let tx = client.transaction().await.unwrap();
                let r = tx.query(q, &p).await.unwrap();
                tx.commit().await.unwrap();
                r
            } else {
                client.query(q, &p).await.unwrap()
            };
            got.push(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>());
        }
        assert_eq!(got[0], keys, "in a transaction: {in_tx}");
        assert_eq!(got[0], got[1]);
    }
}

/// [`same_as_plain`], outside a transaction and inside one (where the shards join it).
async fn same_as_plain_in_and_out_of_a_transaction(
    c: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    q: &str,
) {
    same_as_plain(c, plain, q).await;
    c.batch_execute("BEGIN").await.unwrap();
    same_as_plain(c, plain, q).await;
    c.batch_execute("COMMIT").await.unwrap();
}

/// The (bigint, bigint) rows of `q` with `params` (extended protocol, binary results)
/// through pgshard, checked to be the plain database's: how many.
async fn pairs_as_plain(
    c: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    q: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> usize {
    let pairs = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    };
    let ours = pairs(c.query(q, params).await.unwrap());
    assert_eq!(ours, pairs(plain.query(q, params).await.unwrap()), "{q}");
    ours.len()
}

#[tokio::test]
async fn a_broadcast_write_that_loses_a_shard_leaves_no_connection_inside_its_transaction() {
    // One-phase commit sends a reference-table write to every shard in a transaction on
    // each; when one shard's connection fails, the others' transactions must not go back
    // to the pool open (the next client would run inside them).
    use std::time::Duration;
    let addr = setup().await;
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 2);
    let p = start_proxy_yaml(&format!("{yaml}{RULES}    two_phase_commit: off\n"));
    let c = connect(p).await;
    let marker = "pgshard_lost_shard_marker";
    let q = format!(
        "UPDATE countries SET name = name WHERE code = (SELECT pg_sleep(2)::text || '{marker}')"
    );
    let running = tokio::spawn(async move { c.batch_execute(&q).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed: i64 = connect_server(ports()[1], "postgres")
        .await
        .query_one(
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let outcome = running.await.unwrap();
    assert_eq!(killed, 1, "{outcome:?}");
    assert!(outcome.is_err());
    // The other shard's part finished inside its transaction: its connection is closed,
    // which ends the transaction.
    let open = || async {
        let n: i64 = connect_server(ports()[0], "postgres")
            .await
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a connection stayed idle in its transaction"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the proxy goes on.
    let c = connect(p).await;
    c.batch_execute("SELECT 1").await.unwrap();
    let _ = addr;
}

/// Writes whose subqueries need every shard's rows: pgshard evaluates the subqueries
/// first, then the write goes where its own keys (or tables) say.
#[tokio::test]
async fn writes_whose_subqueries_pgshard_evaluates_first() {
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    // A reference table's rows chosen by a sharded table's: every shard's copy alike.
    c.batch_execute("INSERT INTO countries (code, name) VALUES ('pre1', 'user001'), ('pre2', 'nobody'), ('pre3', 'user002')")
        .await
        .unwrap();
    let q = "DELETE FROM countries WHERE code LIKE 'pre%' AND name IN (SELECT name FROM users WHERE score > 1)";
    assert_eq!(affected(&c.simple_query(q).await.unwrap()), 2);
    let q = "DELETE FROM countries WHERE code = $1 AND name NOT IN (SELECT name FROM users WHERE id < $2)";
    assert_eq!(c.execute(q, &[&"pre2", &5i64]).await.unwrap(), 1);
    for p in ports() {
        let left = connect_server(p, "app")
            .await
            .query("SELECT code FROM countries WHERE code LIKE 'pre%'", &[])
            .await
            .unwrap();
        assert!(left.is_empty(), "shard on port {p}");
    }
    // INSERTs: a key made from every shard's rows goes to its own shard; the rows of an
    // INSERT ... SELECT filtered by every shard's rows, each to its key's shard.
    let q = "INSERT INTO split_t (id, name) VALUES ((SELECT max(id) + 1000000 FROM users), 'pre') RETURNING id";
    let id: i64 = rows(&c.simple_query(q).await.unwrap())[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(id, 1_000_200);
    let q = "INSERT INTO split_t (id, name) VALUES ((SELECT max(id) + $1 FROM users), 'pre')";
    assert_eq!(c.execute(q, &[&1_000_001i64]).await.unwrap(), 1);
    let q = "INSERT INTO split_t (id, name) SELECT id + 2000000, name FROM users WHERE score > (SELECT avg(score) FROM users)";
    let n = affected(&c.simple_query(q).await.unwrap());
    let want = rows(
        &plain
            .simple_query("SELECT count(*) FROM users WHERE score > (SELECT avg(score) FROM users)")
            .await
            .unwrap(),
    );
    assert_eq!(Some(n.to_string()), want[0][0]);
    for (s, p) in ports().into_iter().enumerate() {
        let ids: Vec<i64> = connect_server(p, "app")
            .await
            .query("SELECT id FROM split_t WHERE id >= 1000000", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in ids {
            assert_eq!(partition_of(&HashKey::Int(id), 2), s as u64, "{id}");
        }
    }
    // (split_t's other rows are read by key ranges elsewhere: these stay.)
    let all = rows(
        &c.simple_query("SELECT count(*) FROM split_t WHERE id >= 1000000")
            .await
            .unwrap(),
    );
    assert_eq!(all[0][0], Some((n + 2).to_string()));
    // A write over every shard: as allowed by cross_shard_writes.
    let q = "UPDATE orders SET total = total WHERE total > (SELECT avg(total) FROM orders)";
    let e = c.simple_query(q).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    assert!(format!("{e:?}").contains("cross_shard_writes"), "{e:?}");
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 4);
    let allow = connect(start_proxy_yaml(&format!(
        "{yaml}{RULES}    cross_shard_writes: allow\n    max_subquery_rows: 5\n"
    )))
    .await;
    let want = affected(&plain.simple_query(q).await.unwrap());
    assert!(want > 10);
    assert_eq!(affected(&allow.simple_query(q).await.unwrap()), want);
    let q = "UPDATE orders SET total = total WHERE total > (SELECT avg(total) FROM orders WHERE user_id > $1)";
    assert_eq!(allow.execute(q, &[&0i64]).await.unwrap(), want);
    // More rows than max_subquery_rows: refused, the connection usable.
    let q = "SELECT count(*) FROM users WHERE name IN (SELECT name FROM users WHERE id > $1)";
    let e = allow.query(q, &[&0i64]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e:?}");
    let q = "SELECT count(*) FROM users WHERE name IN (SELECT name FROM users WHERE score > 1)";
    let e = allow.simple_query(q).await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e:?}");
    assert!(format!("{e:?}").contains("max_subquery_rows"), "{e:?}");
    let q = "SELECT count(*) FROM users WHERE id IN (SELECT id FROM users WHERE id < 4)";
    assert_eq!(
        rows(&allow.simple_query(q).await.unwrap()),
        [[Some("3".to_string())]]
    );
}

/// MERGE: into a reference table, every copy alike; into a sharded table, refused (every
/// shard would insert the rows it finds no match for: it used to be broadcast as DDL).
#[tokio::test]
async fn merge_into_reference_tables_reaches_every_copy() {
    let addr = setup().await;
    let c = connect(addr).await;
    let merge = "MERGE INTO countries c USING (VALUES ('mg1', 'One'), ('mg2', 'Two')) v(code, name) ON c.code = v.code WHEN MATCHED THEN UPDATE SET name = v.name WHEN NOT MATCHED THEN INSERT (code, name) VALUES (v.code, v.name)";
    assert_eq!(affected(&c.simple_query(merge).await.unwrap()), 2);
    assert_eq!(c.execute(merge, &[]).await.unwrap(), 2);
    for p in ports() {
        let n: i64 = connect_server(p, "app")
            .await
            .query_one("SELECT count(*) FROM countries WHERE code LIKE 'mg%'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "shard on port {p}");
    }
    c.batch_execute("DELETE FROM countries WHERE code LIKE 'mg%'")
        .await
        .unwrap();
    for q in [
        "MERGE INTO users u USING (VALUES (900001, 'm')) v(id, name) ON u.id = v.id WHEN NOT MATCHED THEN INSERT (id, name) VALUES (v.id, v.name)",
        "MERGE INTO countries c USING users u ON c.name = u.name WHEN MATCHED THEN DELETE",
    ] {
        let e = c.simple_query(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{q}");
    }
    let n = rows(
        &c.simple_query("SELECT count(*) FROM users WHERE id = 900001")
            .await
            .unwrap(),
    );
    assert_eq!(n, [[Some("0".to_string())]]);
}

/// Rows of a test's own in split_t (other tests read users and split_t by other keys),
/// with these ids, which must lie on both shards: deleted, then inserted with `name`,
/// on each client's database.
async fn own_split_rows(dbs: &[&tokio_postgres::Client], ids: &[i64], name: &str) {
    let shards: std::collections::HashSet<u64> = ids
        .iter()
        .map(|k| partition_of(&HashKey::Int(*k), 2))
        .collect();
    assert_eq!(shards.len(), 2, "the rows are on both shards");
    delete_split_rows(dbs, ids).await;
    let values: Vec<String> = ids.iter().map(|id| format!("({id}, '{name}')")).collect();
    for db in dbs {
        db.batch_execute(&format!(
            "INSERT INTO split_t (id, name) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    }
}

/// An UPDATE of each of these split_t rows (one shard each) to `name`.
fn split_updates(ids: &[i64], name: &str) -> Vec<String> {
    ids.iter()
        .map(|id| format!("UPDATE split_t SET name = '{name}' WHERE id = {id}"))
        .collect()
}

/// Deletes these split_t rows, one statement each (one shard each).
async fn delete_split_rows(dbs: &[&tokio_postgres::Client], ids: &[i64]) {
    let deletes: Vec<String> = ids
        .iter()
        .map(|id| format!("DELETE FROM split_t WHERE id = {id}"))
        .collect();
    for db in dbs {
        db.batch_execute(&deletes.join("; ")).await.unwrap();
    }
}

#[tokio::test]
async fn query_strings_that_end_a_transaction_over_several_shards() {
    // A COMMIT or ROLLBACK inside a query string ends the transaction on every shard it
    // touched, as PostgreSQL ends it: it used to go, with the string, to one shard only,
    // whose part alone was committed (the others' rolled back), while the client was told
    // COMMIT.
    let addr = setup().await;
    let l = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let ids = [8801i64, 8802, 8803, 8804];
    own_split_rows(&[&l, &plain], &ids, "").await;
    let begin = |name: &str| format!("BEGIN; {}", split_updates(&ids, name).join("; "));
    let count = |name: &'static str| {
        let l = &l;
        async move {
            l.query_one("SELECT count(*) FROM split_t WHERE name = $1", &[&name])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    // (string, whether the updates are committed, its rows)
    let cases: [(&str, bool, &[&str]); 6] = [
        ("COMMIT; SELECT 2", true, &["2"]),
        ("SELECT 3; COMMIT", true, &["3"]),
        ("COMMIT; BEGIN; SELECT 4; COMMIT", true, &["4"]),
        ("ROLLBACK; SELECT 5", false, &["5"]),
        ("SELECT 6; ROLLBACK", false, &["6"]),
        ("END; SELECT 7; SELECT 8", true, &["7", "8"]),
    ];
    for (i, (string, committed, answer)) in cases.into_iter().enumerate() {
        let name: &'static str = Box::leak(format!("string{i}").into_boxed_str());
        for c in [&l, &plain] {
            c.batch_execute(&begin(name)).await.unwrap();
            let got = rows(&c.simple_query(string).await.unwrap());
            let want: Vec<Vec<Option<String>>> =
                answer.iter().map(|v| vec![Some(v.to_string())]).collect();
            assert_eq!(got, want, "{string}");
        }
        assert_eq!(count(name).await, if committed { 4 } else { 0 }, "{string}");
        // The session is out of the transaction, as on the server.
        let n: i64 = l.query_one("SELECT 1::bigint", &[]).await.unwrap().get(0);
        assert_eq!(n, 1);
    }
    // In a failed transaction: a ROLLBACK first runs, and so does the rest; anything
    // else first fails, as in PostgreSQL.
    for c in [&l, &plain] {
        c.batch_execute(&begin("failed")).await.unwrap();
        let e = c.simple_query("SELECT 1/0").await.unwrap_err();
        assert_eq!(sqlstate(&e), "22012");
        let e = c.simple_query("SELECT 1; ROLLBACK").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02");
        let got = rows(&c.simple_query("ROLLBACK; SELECT 9").await.unwrap());
        assert_eq!(got, [[Some("9".to_string())]]);
    }
    assert_eq!(count("failed").await, 0);
    // A COMMIT inside the string with statements after it in the same transaction
    // cannot be split so: refused, and nothing is committed.
    l.batch_execute(&begin("inside")).await.unwrap();
    let e = l
        .simple_query("SELECT 1; COMMIT; SELECT 2")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    l.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count("inside").await, 0);
    delete_split_rows(&[&l, &plain], &ids).await;
}

#[tokio::test]
async fn commit_in_a_pipelined_batch_over_several_shards() {
    // A COMMIT later in a batch whose statements went to several shards (pgjdbc's and
    // Npgsql's pipelines, asyncpg's executemany in a transaction) commits on every shard:
    // it used to go on to the attached shard's server, which committed its part alone
    // (the others' were rolled back) while the client was told COMMIT.
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let step = |sql: &str| msg::run(sql, &[]);
    let ids = [8811i64, 8812, 8813, 8814];
    own_split_rows(&[&c, &plain], &ids, "").await;
    let updates = |name: &str| -> Vec<u8> {
        split_updates(&ids, name)
            .iter()
            .flat_map(|u| step(u))
            .collect()
    };
    let (mut proxy, mut direct) = through_and_plain(addr).await;
    // (batches sent one after the other, the name they write, whether it is committed)
    let cases: Vec<(Vec<Vec<u8>>, &str, bool)> = vec![
        // BEGIN, the writes and COMMIT in one batch.
        (
            vec![
                [
                    step("BEGIN"),
                    updates("batch1"),
                    step("COMMIT"),
                    msg::sync(),
                ]
                .concat(),
            ],
            "batch1",
            true,
        ),
        // BEGIN first, then the writes and COMMIT, and a statement after it.
        (
            vec![
                [step("BEGIN"), msg::sync()].concat(),
                [
                    updates("batch2"),
                    step("COMMIT"),
                    step("SELECT 1"),
                    msg::sync(),
                ]
                .concat(),
            ],
            "batch2",
            true,
        ),
        // ROLLBACK alike.
        (
            vec![
                [step("BEGIN"), msg::sync()].concat(),
                [updates("batch3"), step("ROLLBACK"), msg::sync()].concat(),
            ],
            "batch3",
            false,
        ),
        // An error before the COMMIT: the COMMIT is skipped with the rest of the batch,
        // the transaction stays aborted until the client's ROLLBACK.
        (
            vec![
                [
                    step("BEGIN"),
                    updates("batch4"),
                    step("SELECT 1/0"),
                    step("COMMIT"),
                    msg::sync(),
                ]
                .concat(),
                [step("ROLLBACK"), msg::sync()].concat(),
            ],
            "batch4",
            false,
        ),
    ];
    for (batches, name, committed) in cases {
        for b in &batches {
            proxy.send(b).await;
            direct.send(b).await;
            assert_eq!(proxy.answer().await, direct.answer().await, "{name}");
        }
        for db in [&c, &plain] {
            let n: i64 = db
                .query_one("SELECT count(*) FROM split_t WHERE name = $1", &[&name])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, if committed { 4 } else { 0 }, "{name}");
        }
    }
    delete_split_rows(&[&c, &plain], &ids).await;
}

#[tokio::test]
async fn chained_and_prepared_transactions_over_several_shards() {
    // COMMIT AND CHAIN / ROLLBACK AND CHAIN over several shards begin the next
    // transaction at once, alike, as PostgreSQL does: pgshard used to end the transaction
    // only, so the statements after it committed one by one and the client's ROLLBACK
    // did not undo them.
    let addr = setup().await;
    let l = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let ids = [8821i64, 8822, 8823, 8824];
    own_split_rows(&[&l, &plain], &ids, "a").await;
    let update = |name: &str| split_updates(&ids, name).join("; ");
    async fn names(db: &tokio_postgres::Client) -> Vec<Vec<Option<String>>> {
        rows(
            &db.simple_query(
                "SELECT name, count(*) FROM split_t WHERE id BETWEEN 8821 AND 8824 GROUP BY name ORDER BY name",
            )
            .await
            .unwrap(),
        )
    }
    for db in [&l, &plain] {
        // A transaction that ran nothing yet (pgshard holds its BEGIN back), both
        // protocols.
        db.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            .await
            .unwrap();
        db.batch_execute("COMMIT AND CHAIN").await.unwrap();
        db.execute("ROLLBACK AND CHAIN", &[]).await.unwrap();
        let iso = rows(&db.simple_query("SHOW transaction_isolation").await.unwrap());
        assert_eq!(iso, [[Some("serializable".to_string())]]);
        db.batch_execute("ROLLBACK").await.unwrap();
        db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
        db.batch_execute(&update("b")).await.unwrap();
        db.batch_execute("COMMIT AND CHAIN").await.unwrap();
        // The next transaction is open, alike.
        let iso = rows(&db.simple_query("SHOW transaction_isolation").await.unwrap());
        assert_eq!(iso, [[Some("repeatable read".to_string())]]);
        db.batch_execute(&update("c")).await.unwrap();
        // In the extended protocol too.
        db.execute("ROLLBACK AND CHAIN", &[]).await.unwrap();
        db.batch_execute(&update("d")).await.unwrap();
        // In a failed transaction: rolled back, and the next one begins.
        let e = db.simple_query("SELECT 1/0").await.unwrap_err();
        assert_eq!(sqlstate(&e), "22012");
        db.batch_execute("ROLLBACK AND CHAIN").await.unwrap();
        db.batch_execute(&update("e")).await.unwrap();
        db.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(names(&l).await, names(&plain).await);
    assert_eq!(
        names(&l).await,
        [[Some("b".to_string()), Some("4".to_string())]]
    );
    // PREPARE TRANSACTION would prepare one shard's part alone: refused, nothing of the
    // transaction is committed.
    l.batch_execute("BEGIN").await.unwrap();
    l.batch_execute(&update("f")).await.unwrap();
    let e = l
        .simple_query("PREPARE TRANSACTION 'mine'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    l.batch_execute("ROLLBACK").await.unwrap();
    l.batch_execute("BEGIN").await.unwrap();
    l.batch_execute(&update("f")).await.unwrap();
    let e = l
        .execute("PREPARE TRANSACTION 'mine'", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    l.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        names(&l).await,
        [[Some("b".to_string()), Some("4".to_string())]]
    );
    delete_split_rows(&[&l, &plain], &ids).await;
}

#[tokio::test]
async fn a_transaction_begun_in_a_query_string_joins_other_shards_alike() {
    // `BEGIN ...; SET LOCAL ...` in one string (as multi-tenant applications begin, with
    // the tenant for row-level security) went to one shard as it was; shards joining the
    // transaction later began it with a plain BEGIN and without the settings: another
    // isolation level, and no tenant.
    let addr = setup().await;
    let c = connect(addr).await;
    let seen = "SELECT DISTINCT current_setting('transaction_isolation'), current_setting('work_mem'), current_setting('app.tenant', true) FROM users";
    for (begin, want) in [
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL work_mem = '3MB'; SET LOCAL app.tenant = 't1'",
            ["repeatable read", "3MB", "t1"],
        ),
        (
            "BEGIN; SET LOCAL app.tenant = 't2'; SAVEPOINT a; SET LOCAL work_mem = '5MB'; ROLLBACK TO SAVEPOINT a",
            ["read committed", "4MB", "t2"],
        ),
    ] {
        c.batch_execute(begin).await.unwrap();
        let got = rows(&c.simple_query(seen).await.unwrap());
        assert_eq!(got, [want.map(|v| Some(v.to_string()))], "{begin}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
}

#[tokio::test]
async fn statements_pgshard_cannot_read_are_not_run_on_one_shard_in_a_transaction() {
    // A statement naming a sharded table that pgshard's parser cannot read is refused,
    // inside a transaction as outside one. It used to run on the shard the transaction
    // was on, answering with that shard's rows only (or writing there only).
    let addr = setup().await;
    let c = connect(addr).await;
    let q = "SELECT id FROM users ORDER BY (id % 7)::text COLLATE \"C\", id";
    c.batch_execute("BEGIN; SELECT * FROM users WHERE id = 1")
        .await
        .unwrap();
    match c.simple_query(q).await {
        // (Should the parser learn to read it, the answer must be whole.)
        Ok(r) => assert_eq!(rows(&r).len(), 200),
        Err(e) => {
            assert_eq!(sqlstate(&e), "0A000", "{e:?}");
            let e = c.simple_query("SELECT 1").await.unwrap_err();
            assert_eq!(sqlstate(&e), "25P02", "{e:?}");
        }
    }
    c.batch_execute("ROLLBACK").await.unwrap();
    // One that names none still runs where the transaction is.
    c.batch_execute("BEGIN; SELECT * FROM users WHERE id = 1")
        .await
        .unwrap();
    c.batch_execute("DO $$ BEGIN PERFORM 1; END $$")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn cancel_stops_a_read_streamed_from_several_shards() {
    // A read over several shards streamed to the client (rows that concatenate, or
    // ordered) can be cancelled, as psql's Ctrl-C does: the cancel request reaches a shard
    // being read, whose error ends the answer, and the other shards are cancelled too.
    // (It used to reach no server: the session had none attached.)
    let addr = setup().await;
    let c = connect(addr).await;
    let keys = [1i64, 2, 3, 4];
    let shards: std::collections::HashSet<u64> = keys
        .iter()
        .map(|k| partition_of(&HashKey::Int(*k), 2))
        .collect();
    assert_eq!(shards.len(), 2, "the rows are on both shards");
    for q in [
        "SELECT id, pg_sleep(2) FROM users WHERE id IN (1, 2, 3, 4)",
        "SELECT id, pg_sleep(2) FROM users WHERE id IN (1, 2, 3, 4) ORDER BY id",
    ] {
        let cancel = cancel_after(&c, 500);
        let e = c.simple_query(q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "57014", "{q}: {e:?}");
        cancel.await.unwrap();
        // The session and the pool's connections go on.
        let n: i64 = c
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 200);
    }
}

#[tokio::test]
async fn an_error_pgshard_raises_in_the_extended_protocol_fails_the_transaction() {
    // tokio-postgres runs each statement as a Parse/Bind/Execute/Sync batch. When pgshard
    // refuses one itself, the batch's Sync must report the transaction failed, as after a
    // server's error; it used to report it healthy, and a later COMMIT then committed
    // the writes before the error.
    let addr = setup().await;
    let mut c = connect(addr).await;
    let unreadable = "SELECT id FROM users ORDER BY (id % 7)::text COLLATE \"C\", id";
    for (id, refused) in [
        (8801_i64, unreadable),
        (8802, "PREPARE TRANSACTION 'pgshard_test'"),
    ] {
        let t = c.transaction().await.unwrap();
        // A write on one shard, then a read of the other: over several shards.
        t.execute("INSERT INTO split_t VALUES ($1, 'local error')", &[&id])
            .await
            .unwrap();
        t.query("SELECT * FROM split_t WHERE id = $1", &[&(id + 1)])
            .await
            .unwrap();
        let failed = match t.query(refused, &[]).await {
            // (Should the parser learn to read it, the answer must be whole.)
            Ok(r) => {
                assert_eq!(r.len(), 200, "{refused}");
                false
            }
            Err(e) => {
                assert_eq!(sqlstate(&e), "0A000", "{refused}: {e:?}");
                let e = t.query("SELECT 1", &[]).await.unwrap_err();
                assert_eq!(sqlstate(&e), "25P02", "{refused}: {e:?}");
                true
            }
        };
        t.commit().await.unwrap();
        let left = c
            .query("SELECT * FROM split_t WHERE id = $1", &[&id])
            .await
            .unwrap();
        if failed {
            assert!(left.is_empty(), "{refused}: the write was committed");
        }
        c.execute("DELETE FROM split_t WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn transactions_over_several_shards_report_no_parameter_changes() {
    // pgshard marks each backend of a transaction over several shards for its deadlock
    // detector (a transaction-local application_name). The client must not see the
    // server report that mark, nor its own value coming back when the transaction ends:
    // the same messages as from one PostgreSQL, in both protocols.
    let addr = setup().await;
    let (mut proxy, mut direct) = through_and_plain(addr).await;
    for end in [
        "COMMIT",
        "ROLLBACK",
        "SELECT 1/0",
        "COMMIT AND CHAIN",
        // Errors on every shard: streamed, merged in order, held for an aggregate.
        "SELECT 1/(id - id) FROM users",
        "SELECT 1/(id - id) FROM users ORDER BY id",
        "SELECT sum(1/(id - id)) FROM users",
        "SELECT count(*) FROM users GROUP BY 1/(id - id)",
    ] {
        let requests = [
            msg::query("BEGIN"),
            msg::query("SELECT name FROM users WHERE id = 1"),
            msg::query("SELECT count(*) FROM users"),
            msg::query(end),
            msg::query("ROLLBACK"),
            msg::query("SELECT 1"),
        ];
        answers_alike(&mut proxy, &mut direct, &requests, end).await;
        let requests = [
            msg::query("BEGIN"),
            [
                msg::run("SELECT name FROM users WHERE id = $1", &["2"]),
                msg::sync(),
            ]
            .concat(),
            [msg::run("SELECT count(*) FROM users", &[]), msg::sync()].concat(),
            [msg::run(end, &[]), msg::sync()].concat(),
            msg::query("ROLLBACK"),
        ];
        answers_alike(&mut proxy, &mut direct, &requests, end).await;
    }
    // The client's own changes are reported, once each, as by PostgreSQL.
    let requests = [
        "SET application_name = 'other'",
        "SET application_name = 'other'",
        "BEGIN",
        "SELECT count(*) FROM users",
        "SELECT 1/0",
        "ROLLBACK",
        "BEGIN",
        "SET LOCAL application_name = 'local'",
        "SELECT count(*) FROM users",
        "COMMIT",
        "RESET application_name",
        "SELECT count(*) FROM users",
    ]
    .map(msg::query);
    answers_alike(&mut proxy, &mut direct, &requests, "SET").await;
    // A SET LOCAL of the time zone undone at the end: the client is told, and pgshard
    // reads timestamp keys in the zone the session is back in (UTC: 00:30 is in 2026,
    // on shard 1; in Tokyo it would be 2025, on shard 0).
    let requests = [
        "BEGIN",
        "SET LOCAL TimeZone = 'Asia/Tokyo'",
        "SELECT count(*) FROM users",
        "COMMIT",
        "SHOW TimeZone",
    ]
    .map(msg::query);
    answers_alike(&mut proxy, &mut direct, &requests, "SET LOCAL TimeZone").await;
    proxy
        .send(&msg::query(
            "INSERT INTO events (id, created_at) VALUES (8891, '2026-01-01 00:30')",
        ))
        .await;
    assert_eq!(proxy.answer().await, "CZ I");
    let mut found = Vec::new();
    for port in ports() {
        let shard = connect_server(port, "app").await;
        found.push(
            shard
                .execute("DELETE FROM events WHERE id = 8891", &[])
                .await
                .unwrap(),
        );
    }
    assert_eq!(found, [0, 1], "the row went to the shard of 2025");
}

/// Sends each request through `proxy` and to `direct` and compares their answers (tags and
/// the status left), but for what comes before an error: a merge that fails may send no
/// RowDescription (PostgreSQL describes the rows before it runs the statement), and a
/// held merge runs at the Bind, which then fails in place of the Execute.
async fn answers_alike(proxy: &mut Raw, direct: &mut Raw, requests: &[Vec<u8>], what: &str) {
    for (i, req) in requests.iter().enumerate() {
        proxy.send(req).await;
        direct.send(req).await;
        let (p, d) = (proxy.answer().await, direct.answer().await);
        let alike = |a: String| a.replace("TE(", "E(").replace("2E(", "E(");
        assert_eq!(alike(p), alike(d), "{what}, request {i}");
    }
}

#[tokio::test]
async fn cancel_stops_held_merges_and_writes_over_several_shards() {
    // Outside a transaction, a merge pgshard holds (an aggregate) and a write over several
    // shards run on pooled connections, with no server attached to the session: a cancel
    // request reached no server, and they ran to their end. The cancel now reaches the
    // shard whose answer pgshard awaits; its 57014 ends the statement (for a write: on
    // every shard, rolled back).
    let addr = setup().await;
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 4);
    let allow = start_proxy_yaml(&format!("{yaml}{RULES}    cross_shard_writes: allow\n"));
    let keys = [1i64, 2, 3, 4];
    let shards: std::collections::HashSet<u64> = keys
        .iter()
        .map(|k| partition_of(&HashKey::Int(*k), 2))
        .collect();
    assert_eq!(shards.len(), 2, "the rows are on both shards");
    let slow = "id IN (1, 2, 3, 4) AND pg_sleep(1)::text = ''";
    for (proxy, q) in [
        (
            addr,
            format!("SELECT count(*), max(name) FROM users WHERE {slow}"),
        ),
        (
            addr,
            format!("SELECT name, count(*) FROM users WHERE {slow} GROUP BY name"),
        ),
        (allow, format!("UPDATE users SET score = -1 WHERE {slow}")),
    ] {
        let c = connect(proxy).await;
        let cancel = cancel_after(&c, 500);
        let started = std::time::Instant::now();
        let e = c.simple_query(&q).await.unwrap_err();
        assert_eq!(sqlstate(&e), "57014", "{q}: {e:?}");
        cancel.await.unwrap();
        // Each shard sleeps 2 s: the cancel ended them, not the sleep.
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1900),
            "{q}"
        );
        // The session and the pool's connections go on; the write left nothing.
        let n: i64 = c
            .query_one("SELECT count(*) FROM users WHERE score = -1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{q}");
    }
}

#[tokio::test]
async fn cancel_stops_an_ordered_read_in_a_transaction_over_several_shards() {
    // Inside a transaction the shards of an ordered read run at once on its participants.
    // The client's cancel request went to the attached server only: when that shard had
    // answered, it reached no statement, and the read ran to its end. It now goes to the
    // shard whose answer pgshard awaits.
    let addr = setup().await;
    let c = connect(addr).await;
    // The shards join in order, the last one attached: `a`'s (1) answers at once.
    let on = |k: i64| partition_of(&HashKey::Int(k), 2);
    let a = (1..100).find(|&k| on(k) == 1).unwrap();
    let b = (1..100).find(|&k| on(k) == 0).unwrap();
    c.batch_execute(&format!("BEGIN; SELECT * FROM users WHERE id = {a}"))
        .await
        .unwrap();
    let q = format!(
        "SELECT id, pg_sleep(CASE WHEN id = {a} THEN 0 ELSE 3 END) FROM users \
         WHERE id IN ({a}, {b}) ORDER BY id"
    );
    let cancel = cancel_after(&c, 500);
    let started = std::time::Instant::now();
    let e = c.simple_query(&q).await.unwrap_err();
    assert_eq!(sqlstate(&e), "57014", "{e:?}");
    assert!(started.elapsed() < std::time::Duration::from_millis(2500));
    cancel.await.unwrap();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
}

#[tokio::test]
async fn extended_batches_over_several_shards_answer_as_postgres() {
    // Pipelined Parse/Bind/Execute batches as drivers send them (pgjdbc's batches and
    // fetch size, psycopg's pipeline mode), with errors mid-batch, transactions begun
    // and ended in them, and portals fetched in parts: the same messages, in the same
    // order, with the same status as one PostgreSQL holding the same data.
    let addr = setup().await;
    let (mut proxy, mut direct) = through_and_plain(addr).await;
    let count = || msg::run("SELECT count(*) FROM users", &[]);
    let batches: Vec<Vec<Vec<u8>>> = vec![
        vec![
            msg::run("BEGIN", &[]),
            msg::run("SELECT name FROM users WHERE id = $1", &["3"]),
            count(),
            msg::run("SELECT 1/0", &[]),
            msg::run("SELECT 2", &[]),
            msg::sync(),
        ],
        vec![msg::run("SELECT 1", &[]), msg::sync()],
        vec![msg::run("ROLLBACK", &[]), msg::sync()],
        vec![
            count(),
            msg::run("SELECT id FROM users ORDER BY id LIMIT 2", &[]),
            msg::sync(),
        ],
        vec![
            msg::run("BEGIN", &[]),
            count(),
            msg::run("SELECT id FROM users ORDER BY id DESC LIMIT 2", &[]),
            msg::run("COMMIT", &[]),
            msg::sync(),
        ],
        vec![
            msg::parse("s1", "SELECT name FROM users WHERE id = $1"),
            msg::bind("", "s1", &["4"]),
            msg::execute(""),
            msg::bind("", "s1", &["5"]),
            msg::execute(""),
            msg::sync(),
        ],
        vec![
            msg::run("SELECT count(*) FROM users WHERE id > $1", &["x"]),
            msg::sync(),
        ],
        vec![
            msg::run("BEGIN", &[]),
            count(),
            msg::run("SELECT count(*) FROM users WHERE id > $1", &["x"]),
            msg::sync(),
        ],
        vec![msg::run("COMMIT", &[]), msg::sync()],
        vec![
            msg::parse("", "SELECT id FROM users ORDER BY id"),
            msg::bind("p", "", &[]),
            msg::describe_portal("p"),
            msg::execute_n("p", 3),
            msg::execute_n("p", 2),
            msg::sync(),
        ],
        vec![
            msg::run("BEGIN", &[]),
            msg::parse("", "SELECT id FROM users ORDER BY id"),
            msg::bind("p", "", &[]),
            msg::execute_n("p", 3),
            msg::sync(),
        ],
        vec![msg::execute_n("p", 2), msg::sync()],
        vec![msg::run("COMMIT", &[]), msg::sync()],
        vec![msg::execute_n("p", 2), msg::sync()],
    ];
    for (n, b) in batches.iter().enumerate() {
        let req: Vec<u8> = b.concat();
        proxy.send(&req).await;
        direct.send(&req).await;
        assert_eq!(proxy.answer().await, direct.answer().await, "batch {n}");
    }
}

#[tokio::test]
async fn locking_reads_over_several_shards() {
    // SELECT ... FOR UPDATE over several shards (a transfer between two accounts on two
    // shards locks both rows first): it runs on each shard's primary, inside the client's
    // transaction when there is one, and its rows merge as a read's. It used to be
    // refused as a write over several shards.
    let addr = setup().await;
    let c = connect(addr).await;
    let other = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let on = |k: i64| partition_of(&HashKey::Int(k), 2);
    let a = (1..100).find(|&k| on(k) == 0).unwrap();
    let b = (1..100).find(|&k| on(k) == 1).unwrap();
    let q = format!("SELECT id, name FROM users WHERE id IN ({a}, {b}) ORDER BY id FOR UPDATE");
    // Outside a transaction, as a read (each shard's lock ends with its statement).
    assert_eq!(
        rows(&c.simple_query(&q).await.unwrap()),
        rows(&plain.simple_query(&q).await.unwrap())
    );
    let nowait = |k: i64| format!("SELECT id FROM users WHERE id = {k} FOR UPDATE NOWAIT");
    for extended in [false, true] {
        c.batch_execute("BEGIN").await.unwrap();
        let got = if extended {
            c.query(
                "SELECT id, name FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&vec![a, b]],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| vec![Some(r.get::<_, i64>(0).to_string()), r.get(1)])
            .collect::<Vec<_>>()
        } else {
            rows(&c.simple_query(&q).await.unwrap())
        };
        assert_eq!(got, rows(&plain.simple_query(&q).await.unwrap()));
        // Both rows are locked, each on its own shard, until the transaction ends.
        for k in [a, b] {
            let e = other.simple_query(&nowait(k)).await.unwrap_err();
            assert_eq!(sqlstate(&e), "55P03", "{k}: {e:?}");
        }
        c.batch_execute("COMMIT").await.unwrap();
        for k in [a, b] {
            other.simple_query(&nowait(k)).await.unwrap();
        }
    }
    // With a LIMIT each shard would lock rows pgshard does not return: refused.
    let e = c
        .simple_query("SELECT id FROM users ORDER BY id LIMIT 3 FOR UPDATE")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
}

#[tokio::test]
async fn cursors_over_several_shards_scroll_as_on_postgres() {
    // pgshard holds the rows of a cursor whose query reads several shards: FETCH and MOVE
    // in every direction (psycopg's `scroll()`, reporting tools paging back) answer
    // from them as PostgreSQL answers from its own cursor. They used to move forward only.
    let addr = setup().await;
    let c = connect(addr).await;
    let plain = connect_server(ports()[0], "plain").await;
    let answer = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        msgs.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!("{:?}", r.get(0))),
                tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(format!("#{n}")),
                _ => None,
            })
            .collect()
    };
    let commands = [
        "FETCH 3 FROM c",
        "FETCH PRIOR FROM c",
        "FETCH FIRST FROM c",
        "FETCH LAST FROM c",
        "FETCH NEXT FROM c",
        "FETCH PRIOR FROM c",
        "FETCH ABSOLUTE 10 FROM c",
        "FETCH RELATIVE -2 FROM c",
        "FETCH RELATIVE 0 FROM c",
        "FETCH BACKWARD 3 FROM c",
        "FETCH FORWARD 0 FROM c",
        "FETCH -2 FROM c",
        "MOVE ABSOLUTE 0 IN c",
        "FETCH BACKWARD 1 FROM c",
        "FETCH 2 FROM c",
        "MOVE LAST IN c",
        "MOVE BACKWARD ALL IN c",
        "FETCH FORWARD 4 FROM c",
        "FETCH ABSOLUTE -3 FROM c",
        "FETCH ABSOLUTE 500 FROM c",
        "FETCH BACKWARD 2 FROM c",
        "MOVE RELATIVE 5 IN c",
        "FETCH BACKWARD -2 FROM c",
        "MOVE FORWARD 3 IN c",
        "FETCH RELATIVE 3 FROM c",
        "MOVE -1 IN c",
        "FETCH ALL FROM c",
        "FETCH BACKWARD ALL FROM c",
        "FETCH c",
    ];
    for db in [&c, &plain] {
        db.batch_execute(
            "BEGIN; DECLARE c SCROLL CURSOR FOR SELECT id FROM users WHERE id <= 30 ORDER BY id",
        )
        .await
        .unwrap();
    }
    for q in commands {
        let (a, b) = (c.simple_query(q).await, plain.simple_query(q).await);
        assert_eq!(answer(a.unwrap()), answer(b.unwrap()), "{q}");
    }
    for db in [&c, &plain] {
        db.batch_execute("ROLLBACK").await.unwrap();
    }
    // NO SCROLL: forward only, as PostgreSQL says.
    for db in [&c, &plain] {
        db.batch_execute("BEGIN; DECLARE n NO SCROLL CURSOR FOR SELECT id FROM users ORDER BY id")
            .await
            .unwrap();
        db.batch_execute("FETCH 2 FROM n").await.unwrap();
        let e = db.simple_query("FETCH PRIOR FROM n").await.unwrap_err();
        assert_eq!(sqlstate(&e), "55000", "{e:?}");
        db.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// Sends `c`'s cancel request after `ms` milliseconds, as psql's Ctrl-C does.
fn cancel_after(c: &tokio_postgres::Client, ms: u64) -> tokio::task::JoinHandle<()> {
    let token = c.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    })
}

/// Raw sessions through pgshard and to the plain database holding the same data, both
/// ready for their first request.
async fn through_and_plain(addr: SocketAddr) -> (Raw, Raw) {
    let mut proxy = Raw::startup(addr, "trusty", "app").await;
    proxy.until_ready().await;
    let mut direct = Raw::startup(([127, 0, 0, 1], ports()[0]).into(), "postgres", "plain").await;
    direct.until_ready().await;
    (proxy, direct)
}
