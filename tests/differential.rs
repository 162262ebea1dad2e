//! Differential testing: a corpus of queries gives the same results through pgshard (on 2
//! and on 3 shards) as on one plain PostgreSQL database holding the same data unsharded.
//! Rows are compared exactly where the query orders them, as multisets otherwise.

mod common;

use common::*;
use std::net::SocketAddr;

fn rules(shards: usize) -> String {
    let last = shards - 1;
    format!(
        "    sharded_tables:
      - {{ table: users, column: id, method: hash }}
      - {{ table: orders, column: user_id, method: hash }}
      - {{ table: tags, column: tag, method: hash, type: text }}
      - {{ table: moments, column: id, method: hash }}
      - table: ev
        column: at
        method: range
        type: timestamptz
        ranges: [ {{ to: '2026-03-01', shard: 0 }}, {{ from: '2026-03-01', to: '2026-06-01', shard: 1 }}, {{ from: '2026-06-01', shard: {last} }} ]
"
    )
}

const SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text, score numeric, born date);
CREATE TABLE orders (id bigint, user_id bigint, total numeric(10,2), qty int);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE tags (tag text, user_id bigint, weight float8, mood mood);
CREATE TABLE ev (id int, at timestamptz, kind text);
";

/// The data, as multi-row INSERTs (split per shard by pgshard).
fn data() -> Vec<String> {
    let mut out = Vec::new();
    for chunk in (1..=300i64).collect::<Vec<_>>().chunks(50) {
        let users: Vec<String> = chunk
            .iter()
            .map(|id| {
                format!(
                    "({id}, 'u{:03}', {}.{}, DATE '2000-01-01' + {})",
                    (id * 37) % 150,
                    id % 23,
                    id % 10,
                    id * 11
                )
            })
            .collect();
        out.push(format!(
            "INSERT INTO users (id, name, score, born) VALUES {}",
            users.join(", ")
        ));
        let orders: Vec<String> = chunk
            .iter()
            .flat_map(|id| {
                (0..(id % 4)).map(move |k| {
                    format!(
                        "({}, {id}, {}.{}, {})",
                        id * 10 + k,
                        (id + k) % 13,
                        k * 25,
                        k + 1
                    )
                })
            })
            .collect();
        out.push(format!(
            "INSERT INTO orders (id, user_id, total, qty) VALUES {}",
            orders.join(", ")
        ));
        let tags: Vec<String> = chunk
            .iter()
            .map(|id| {
                format!(
                    "('tag{}', {id}, {}, '{}')",
                    id % 40,
                    (id % 9) as f64 / 4.0,
                    ["sad", "ok", "happy"][(id % 3) as usize]
                )
            })
            .collect();
        out.push(format!(
            "INSERT INTO tags (tag, user_id, weight, mood) VALUES {}",
            tags.join(", ")
        ));
        let ev: Vec<String> = chunk
            .iter()
            .map(|id| format!("({id}, '{}', 'k{}')", timestamp_2026(id * 7), id % 5))
            .collect();
        out.push(format!(
            "INSERT INTO ev (id, at, kind) VALUES {}",
            ev.join(", ")
        ));
    }
    out
}

/// `2026-01-01 00:00:00+00` plus `hours`, as a literal (keys must be literals to route).
fn timestamp_2026(hours: i64) -> String {
    const MONTHS: [i64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let (mut day, hour) = (hours / 24, hours % 24);
    let mut month = 0;
    while day >= MONTHS[month] {
        day -= MONTHS[month];
        month += 1;
    }
    format!("2026-{:02}-{:02} {hour:02}:00:00+00", month + 1, day + 1)
}

/// At least 150 queries of the kinds the sharding issue names.
fn corpus() -> Vec<String> {
    let mut q = Vec::new();
    for k in [1, 2, 3, 17, 42, 99, 150, 151, 200, 299, 300, 301] {
        q.push(format!("SELECT * FROM users WHERE id = {k}"));
        q.push(format!(
            "SELECT id, total, qty FROM orders WHERE user_id = {k} ORDER BY id"
        ));
        q.push(format!(
            "SELECT u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = {k} ORDER BY o.id"
        ));
    }
    for (a, b, c) in [
        (1, 2, 3),
        (10, 150, 290),
        (5, 5, 6),
        (7, 8, 1000),
        (33, 66, 99),
    ] {
        q.push(format!(
            "SELECT id, name FROM users WHERE id IN ({a}, {b}, {c}) ORDER BY id"
        ));
        q.push(format!(
            "SELECT count(*) FROM users WHERE id IN ({a}, {b}, {c})"
        ));
    }
    for (a, b) in [(1, 10), (50, 75), (290, 400), (0, 0), (120, 121)] {
        q.push(format!(
            "SELECT id FROM users WHERE id BETWEEN {a} AND {b} ORDER BY id"
        ));
        q.push(format!(
            "SELECT id, score FROM users WHERE id >= {a} AND id < {b}"
        ));
    }
    for dir in ["ASC", "DESC"] {
        for (l, o) in [(5, 0), (10, 7), (3, 295), (20, 100)] {
            q.push(format!(
                "SELECT id, name FROM users ORDER BY name {dir}, id LIMIT {l} OFFSET {o}"
            ));
            q.push(format!(
                "SELECT id, score FROM users ORDER BY score {dir}, id DESC LIMIT {l} OFFSET {o}"
            ));
            q.push(format!(
                "SELECT id FROM users ORDER BY born {dir}, id LIMIT {l} OFFSET {o}"
            ));
        }
        q.push(format!(
            "SELECT tag, user_id FROM tags ORDER BY weight {dir}, user_id LIMIT 12"
        ));
        q.push(format!("SELECT id, at FROM ev ORDER BY at {dir} LIMIT 9"));
    }
    for m in [2, 3, 5, 7, 11] {
        q.push(format!(
            "SELECT user_id % {m} AS g, count(*), sum(total), min(total), max(total), sum(qty) FROM orders GROUP BY g ORDER BY g"
        ));
        q.push(format!(
            "SELECT id % {m} AS r, count(*), max(name), min(born) FROM users GROUP BY r ORDER BY r"
        ));
        q.push(format!(
            "SELECT DISTINCT qty % {m} AS d FROM orders ORDER BY d"
        ));
    }
    for m in [2, 3, 7] {
        // HAVING on merged groups (aggregates shown or not), DISTINCT ON.
        q.push(format!(
            "SELECT user_id % {m} AS g, sum(total) FROM orders GROUP BY g HAVING sum(total) > 1000 ORDER BY g"
        ));
        q.push(format!(
            "SELECT qty % {m} AS g, count(*) FROM orders GROUP BY g HAVING count(*) >= 10 AND max(total) < 90 OR min(total) = 0 ORDER BY g"
        ));
        q.push(format!(
            "SELECT id % {m} AS g FROM users GROUP BY g HAVING NOT (count(*) < 50) ORDER BY g"
        ));
        q.push(format!(
            "SELECT DISTINCT ON (qty % {m}) qty % {m} AS d, id, total FROM orders ORDER BY qty % {m}, total DESC, id"
        ));
        q.push(format!(
            "SELECT DISTINCT ON (r) id % {m} AS r, name FROM users ORDER BY r, name LIMIT 2"
        ));
    }
    q.push("SELECT user_id, count(*) FROM orders GROUP BY user_id HAVING count(*) > 2".into());
    for m in [2, 3, 5, 7] {
        // Merged groups ranked by their totals: every shard returns every group.
        q.push(format!(
            "SELECT user_id % {m} AS g, count(*) FROM orders GROUP BY g ORDER BY 2 DESC, g LIMIT 2"
        ));
        q.push(format!(
            "SELECT qty % {m} AS g, sum(total), max(id) FROM orders GROUP BY g ORDER BY sum(total) DESC LIMIT 1"
        ));
        // count(DISTINCT) of a non-key column, beside other aggregates.
        q.push(format!(
            "SELECT user_id % {m} AS g, count(DISTINCT qty), count(*), sum(total) FROM orders GROUP BY g ORDER BY g"
        ));
        q.push(format!(
            "SELECT qty, count(DISTINCT user_id % {m}) AS n FROM orders GROUP BY qty ORDER BY n DESC, qty LIMIT 3"
        ));
        // With avg (sums and counts merged twice, then divided) and HAVING (after both
        // merges).
        q.push(format!(
            "SELECT user_id % {m} AS g, count(DISTINCT qty), avg(total), avg(qty) FROM orders GROUP BY g ORDER BY g"
        ));
        q.push(format!(
            "SELECT qty % {m} AS g, count(DISTINCT total) FROM orders GROUP BY g HAVING count(*) > 20 AND sum(total) > 100 ORDER BY g"
        ));
    }
    // count(DISTINCT) of a key (added up) and of other columns (gathered, then counted).
    q.push("SELECT count(DISTINCT tag), count(*) FROM tags".into());
    q.push("SELECT count(DISTINCT user_id) FROM tags".into());
    q.push("SELECT count(DISTINCT name) FROM users WHERE id % 3 = 0".into());
    q.push("SELECT count(DISTINCT kind) FROM ev".into());
    // Grouped by the key: whole groups on each shard, any aggregate.
    q.push("SELECT user_id, string_agg(id::text, ',' ORDER BY id), avg(total), count(DISTINCT qty) FROM orders GROUP BY user_id ORDER BY user_id LIMIT 20".into());
    q.push("SELECT user_id, sum(total) AS s FROM orders GROUP BY user_id HAVING count(*) > 1 ORDER BY s DESC, user_id LIMIT 7".into());
    // Windows partitioned by the key.
    q.push("SELECT user_id, id, row_number() OVER (PARTITION BY user_id ORDER BY total DESC, id) FROM orders ORDER BY user_id, id".into());
    q.push("SELECT user_id, id FROM (SELECT user_id, id, rank() OVER (PARTITION BY user_id ORDER BY qty DESC, id) AS r FROM orders) t WHERE r = 1 ORDER BY id LIMIT 25".into());
    // avg: PostgreSQL's result type and scale (numeric division; float8 for floats).
    q.push("SELECT avg(score), avg(id) FROM users WHERE id = 7".into());
    q.push("SELECT avg(total), avg(qty) FROM orders WHERE user_id = 7".into());
    q.push("SELECT avg(score) FROM users".into());
    q.push("SELECT avg(qty), avg(total), count(*) FROM orders".into());
    q.push("SELECT avg(weight) AS w FROM tags".into());
    for m in [2, 5] {
        q.push(format!(
            "SELECT user_id % {m} AS g, avg(total), avg(qty) FROM orders GROUP BY g ORDER BY g"
        ));
        q.push(format!(
            "SELECT id % {m} AS g, avg(CASE WHEN id % 3 = 0 THEN NULL ELSE score END) AS a FROM users GROUP BY g ORDER BY a DESC"
        ));
    }
    q.push("SELECT avg(qty) FROM orders WHERE qty < 0".into());
    q.push("SELECT count(*), sum(score), min(score), max(score) FROM users".into());
    // bool_and/every and bool_or: a minimum and a maximum of booleans (NULLs ignored).
    q.push("SELECT bool_and(score > 1), bool_or(score > 22), every(id > 0), bool_and(NULL::bool) FROM users".into());
    q.push("SELECT id % 4 AS g, bool_and(score < 20), bool_or(name LIKE 'u1%') FROM users GROUP BY g HAVING count(*) > 10 ORDER BY g".into());
    q.push("SELECT count(*), sum(weight), max(tag) FROM tags".into());
    q.push("SELECT kind, count(*), min(at), max(at) FROM ev GROUP BY kind ORDER BY kind".into());
    q.push("SELECT DISTINCT tag FROM tags ORDER BY tag".into());
    q.push("SELECT DISTINCT kind FROM ev".into());
    q.push("SELECT count(*) FROM orders WHERE total > 10".into());
    for r in 0..5 {
        // NULLs, computed: NULLS FIRST/LAST in both directions.
        q.push(format!(
            "SELECT id, CASE WHEN id % 5 = {r} THEN NULL ELSE name END AS n FROM users ORDER BY n NULLS FIRST, id LIMIT 15"
        ));
        q.push(format!(
            "SELECT id, CASE WHEN id % 5 = {r} THEN NULL ELSE score END AS s FROM users ORDER BY s DESC NULLS LAST, id LIMIT 15"
        ));
        q.push(format!(
            "SELECT count(CASE WHEN id % 5 = {r} THEN NULL ELSE 1 END) FROM users"
        ));
    }
    for k in 1..=10 {
        // OR of keys (one or several shards) and ORDER BY an expression not returned.
        q.push(format!(
            "SELECT id FROM users WHERE id = {} OR id = {} ORDER BY id",
            k * 29,
            k * 31
        ));
        q.push(format!(
            "SELECT name FROM users ORDER BY lower(name) DESC, id LIMIT {k}"
        ));
    }
    for t in ["tag0", "tag7", "tag39", "tag40", "nope"] {
        q.push(format!(
            "SELECT user_id, weight FROM tags WHERE tag = '{t}' ORDER BY user_id"
        ));
        q.push(format!(
            "SELECT count(*) FROM tags WHERE tag IN ('{t}', 'tag1')"
        ));
    }
    for at in [
        "2026-01-05 07:00:00+00",
        "2026-03-01 00:00:00+00",
        "2026-06-30 12:00:00+02",
        "2026-12-31 00:00:00+00",
    ] {
        q.push(format!("SELECT id, kind FROM ev WHERE at = '{at}'"));
        q.push(format!("SELECT count(*) FROM ev WHERE at < '{at}'"));
        q.push(format!(
            "SELECT id FROM ev WHERE at >= '{at}' ORDER BY at, id LIMIT 5"
        ));
    }
    q
}

/// Aggregate queries whose merged groups PostgreSQL finishes: expressions over
/// aggregates, any HAVING, ORDER BY aggregates not selected, GROUP BY what is not
/// selected, DISTINCT and OFFSET over groups.
fn finished() -> Vec<String> {
    let mut q: Vec<String> = [
        "SELECT coalesce(sum(qty), 0) AS s, max(total) - min(total), round(avg(total), 2) FROM orders",
        "SELECT coalesce(sum(qty), 0), max(total) - min(total), count(*) + 1 FROM orders WHERE qty < 0",
        "SELECT user_id % 5 AS g, sum(total) / count(*) AS mean, count(*)::int, sum(qty)::float8 / 3 FROM orders GROUP BY g ORDER BY g",
        "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY count(*) DESC, qty LIMIT 3",
        "SELECT qty FROM orders GROUP BY qty ORDER BY sum(total) DESC LIMIT 2",
        "SELECT count(*) FROM orders GROUP BY qty ORDER BY 1",
        "SELECT qty % 3 AS g, count(*) FROM orders GROUP BY g HAVING max(total) > 2 * min(total) OR count(*) < 5 ORDER BY g",
        "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY qty OFFSET 2",
        "SELECT qty, count(*), avg(total) FROM orders GROUP BY qty ORDER BY qty LIMIT 2 OFFSET 1",
        "SELECT DISTINCT count(*) > 50 AS big FROM orders GROUP BY qty ORDER BY 1",
        "SELECT max(at) - min(at) AS span, kind FROM ev GROUP BY kind ORDER BY kind",
        "SELECT kind, extract(epoch FROM max(at) - min(at)) FROM ev GROUP BY kind ORDER BY 2 DESC, 1",
        "SELECT count(*) FILTER (WHERE qty > 1), count(*) FILTER (WHERE qty = 0) * 2 FROM orders",
        "SELECT tag, sum(weight) / nullif(count(*), 0) FROM tags GROUP BY tag ORDER BY 2 DESC NULLS LAST, tag LIMIT 5",
        "SELECT CASE WHEN count(*) > 100 THEN 'many' ELSE 'few' END, qty FROM orders GROUP BY qty ORDER BY qty",
        "SELECT count(DISTINCT name) + 0 AS names, count(*) FROM users",
        "SELECT avg(score)::numeric(10,3), avg(id) * 2, avg(score) FROM users",
        "SELECT sum(score) FROM users HAVING sum(score) > 0",
        "SELECT sum(score) FROM users HAVING sum(score) < 0",
        "SELECT date_trunc('year', born) AS y, count(*), max(score) - min(score) AS spread FROM users GROUP BY y ORDER BY spread DESC, y LIMIT 4",
        "SELECT born < DATE '2005-01-01', max(name) || '!' FROM users GROUP BY 1 ORDER BY 1",
        "SELECT upper(max(name)), min(id)::text FROM users WHERE id > 100",
        "SELECT qty, sum(total) FROM orders GROUP BY qty HAVING sum(total) > 500 AND count(DISTINCT user_id) > 3 ORDER BY sum(total) DESC",
        "SELECT bool_and(qty > 0) OR bool_or(qty > 2), count(*) FROM orders",
        "SELECT length(max(tag)), sum(weight)::numeric(12,1) FROM tags",
        "SELECT user_id % 4 AS g, count(*) FROM orders GROUP BY g HAVING count(*) > 10 ORDER BY g OFFSET 1",
        "SELECT total, sum(id) FROM orders GROUP BY total HAVING sum(total) > avg(total) ORDER BY total",
        "SELECT count(*) FROM users OFFSET 1",
        // Aggregates whose partial results do not combine: the shards' rows are gathered
        // and the final query aggregates them.
        "SELECT string_agg(name, ',' ORDER BY name) FROM users WHERE id < 40",
        "SELECT qty, string_agg(id::text, ' ' ORDER BY id) AS ids, count(*) FROM orders GROUP BY qty ORDER BY qty",
        "SELECT qty, array_agg(user_id ORDER BY user_id DESC, id) FROM orders WHERE user_id < 50 GROUP BY qty ORDER BY qty",
        "SELECT json_agg(tag ORDER BY tag, user_id), jsonb_agg(DISTINCT mood) FROM tags WHERE user_id < 30",
        "SELECT mood, percentile_cont(0.5) WITHIN GROUP (ORDER BY weight), mode() WITHIN GROUP (ORDER BY tag) FROM tags GROUP BY mood ORDER BY mood",
        "SELECT stddev(score), var_pop(score), stddev_samp(id), variance(id % 7) FROM users",
        "SELECT qty, sum(DISTINCT total), avg(DISTINCT total), count(DISTINCT user_id % 7) FROM orders GROUP BY qty ORDER BY qty",
        "SELECT count(DISTINCT name), count(DISTINCT score) FROM users",
        "SELECT qty % 3 AS g, string_agg(DISTINCT qty::text, ',' ORDER BY qty::text) FROM orders GROUP BY g HAVING count(DISTINCT user_id) > 5 ORDER BY g",
        "SELECT array_agg(id ORDER BY id) FILTER (WHERE qty = 2), count(*) FILTER (WHERE qty = 2) FROM orders WHERE user_id < 20",
        "SELECT string_agg(name, ','), count(*), stddev(score) FROM users WHERE id < 0",
        "SELECT kind, string_agg(id::text, ',' ORDER BY at DESC) AS ids FROM ev GROUP BY kind ORDER BY ids LIMIT 3",
        "SELECT string_agg('x', '-'), count(*) FROM orders WHERE qty = 2",
        // Built-in aggregates pgshard does not merge itself: gathered, then aggregated.
        "SELECT bit_xor(qty), bit_xor(id) FILTER (WHERE qty > 1), rank(3) WITHIN GROUP (ORDER BY qty) FROM orders",
        "SELECT qty % 2 AS g, bit_xor(user_id), cume_dist(2) WITHIN GROUP (ORDER BY qty) FROM orders GROUP BY g ORDER BY g",
        // GROUP BY a name that is an input column and an alias: PostgreSQL groups by the
        // column (150 groups here, not the 15 values of the alias).
        "SELECT left(name, 3) AS name, count(*) FROM users GROUP BY name ORDER BY 1, 2",
        "SELECT left(name, 2) AS name, sum(score) FROM users WHERE name > 'u1' GROUP BY name ORDER BY 2 DESC, 1 LIMIT 5",
        // Grouped by the key through an alias: whole groups on each shard, finished.
        "SELECT user_id AS u, coalesce(sum(total), 0) AS s, max(qty) - min(qty) FROM orders GROUP BY u ORDER BY s DESC, u LIMIT 5",
        "SELECT DISTINCT ON (g) qty % 2 AS g, qty, count(*) FROM orders GROUP BY qty ORDER BY g, count(*) DESC",
        // EXISTS over shards: whether any shard has a row (NOT EXISTS: whether none has).
        "SELECT EXISTS (SELECT 1 FROM orders WHERE total > 20)",
        "SELECT EXISTS (SELECT 1 FROM orders WHERE total > 1000) AS big, NOT EXISTS (SELECT * FROM users WHERE score < 0) AS none_negative, NOT EXISTS (SELECT 1 FROM tags WHERE mood = 'ok')",
        "SELECT EXISTS (SELECT * FROM users WHERE id = 42)",
        "SELECT EXISTS (SELECT 1 FROM users u JOIN orders o ON o.user_id = u.id WHERE o.qty = 3 AND u.name LIKE 'u1%')",
        // A group key of a user-defined type (its array type is the server's).
        "SELECT mood, count(*), sum(weight) / count(*) FROM tags GROUP BY mood ORDER BY count(*) DESC, mood",
        "SELECT mood FROM tags GROUP BY mood ORDER BY max(weight) DESC, mood",
        "SELECT count(*) FROM users OFFSET 0",
        "SELECT count(*) FROM users GROUP BY name ORDER BY name LIMIT 20",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for m in [3, 7] {
        q.push(format!(
            "SELECT id % {m} AS g, round(avg(score), 1) AS a, max(born) - min(born) AS days FROM users GROUP BY g ORDER BY a DESC, g"
        ));
        q.push(format!(
            "SELECT count(*) AS n FROM users GROUP BY id % {m} ORDER BY n, 1 LIMIT 2"
        ));
    }
    q
}

/// A parameter sent in text format, whatever its type.
#[derive(Debug)]
struct Text(String);

impl tokio_postgres::types::ToSql for Text {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    fn encode_format(&self, _: &tokio_postgres::types::Type) -> tokio_postgres::types::Format {
        tokio_postgres::types::Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Rows of a query with a text and an integer parameter, as text.
async fn rows_of(c: &tokio_postgres::Client, q: &str, sep: &str, n: i64) -> Vec<(String, String)> {
    c.query(q, &[&sep, &n])
        .await
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect()
}

/// Any value's bytes as the server sent them, to compare results exactly in binary.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RawValue(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for RawValue {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw.to_vec()))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Column names and rows of a simple query.
fn named(msgs: &[tokio_postgres::SimpleQueryMessage]) -> (Vec<String>, Vec<Vec<Option<String>>>) {
    let names = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::RowDescription(d) => {
                Some(d.iter().map(|c| c.name().to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_default();
    (names, rows(msgs))
}

/// Names, types and binary values in the extended protocol.
type Typed = (Vec<(String, u32)>, Vec<Vec<Option<RawValue>>>);

/// Asserts that a simple query answers through pgshard (`via`) as on the plain server:
/// column names and values; `what` begins the failure message.
async fn same_simple(
    via: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    q: &str,
    what: &str,
) {
    let a = named(
        &via.simple_query(q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e:?}")),
    );
    let b = named(&plain.simple_query(q).await.unwrap());
    assert_eq!(a, b, "{what}{q}");
}

/// [`same_simple`] through the extended protocol: names, types and binary values.
async fn same_extended(
    via: &tokio_postgres::Client,
    plain: &tokio_postgres::Client,
    q: &str,
    what: &str,
) {
    let a = typed(via, q).await.unwrap_or_else(|e| panic!("{q}: {e:?}"));
    let b = typed(plain, q).await.unwrap();
    assert_eq!(a, b, "{what}{q}");
}

async fn typed(c: &tokio_postgres::Client, q: &str) -> Result<Typed, tokio_postgres::Error> {
    let st = c.prepare(q).await?;
    let cols = st
        .columns()
        .iter()
        // User-defined types have each server's own OIDs.
        .map(|c| (c.name().to_string(), c.type_().oid().min(16384)))
        .collect();
    let rows = c
        .query(&st, &[])
        .await?
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, Option<RawValue>>(i))
                .collect()
        })
        .collect();
    Ok((cols, rows))
}

#[tokio::test]
async fn aggregates_postgresql_finishes() {
    for shards in [2, 3] {
        let via = connect(load(shards).await).await;
        let plain = plain().await;
        for q in finished() {
            same_simple(&via, &plain, &q, &format!("{shards} shards: ")).await;
            same_extended(&via, &plain, &q, &format!("{shards} shards, extended: ")).await;
        }
        // The final queries show in the metrics (on the shards whose servers ran them).
        let (_, server) = loaded(shards).await;
        let m = pgshard::admin::metrics::render(&server);
        let total = |name: &str| -> f64 {
            (0..shards)
                .map(|s| sample(&m, name, &[&format!("shard=\"{s}\"")]))
                .sum()
        };
        assert!(
            total("pgshard_finalized_total") >= finished().len() as f64,
            "{m}"
        );
        assert!(total("pgshard_finalized_bytes_total") > 0.0, "{m}");
        // Inside a transaction (the shards join it), simple and extended.
        via.batch_execute("BEGIN").await.unwrap();
        plain.batch_execute("BEGIN").await.unwrap();
        for c in [&via, &plain] {
            for k in [3, 4, 5] {
                c.batch_execute(&format!(
                    "UPDATE orders SET qty = qty + 10 WHERE user_id = {k}"
                ))
                .await
                .unwrap();
            }
        }
        for q in [
            "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY count(*) DESC, qty LIMIT 4",
            "SELECT max(qty) - min(qty) FROM orders",
            "SELECT mood FROM tags GROUP BY mood ORDER BY sum(weight), mood",
            "SELECT qty, string_agg(user_id::text, ',' ORDER BY user_id, id) FROM orders WHERE user_id < 12 GROUP BY qty ORDER BY qty",
        ] {
            let what = format!("{shards} shards, in a transaction: ");
            same_simple(&via, &plain, q, &what).await;
            let what = format!("{shards} shards, extended in a transaction: ");
            same_extended(&via, &plain, q, &what).await;
        }
        via.batch_execute("ROLLBACK").await.unwrap();
        plain.batch_execute("ROLLBACK").await.unwrap();
        // As a cursor's query.
        let script = "BEGIN; DECLARE c CURSOR FOR SELECT qty, count(*) * 2 AS twice FROM orders GROUP BY qty ORDER BY qty; FETCH 2 FROM c; FETCH ALL FROM c; COMMIT";
        same_simple(&via, &plain, script, &format!("{shards} shards: ")).await;
        // LIMIT and OFFSET as parameters.
        let q = "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY count(*) DESC, qty LIMIT $1 OFFSET $2";
        for (l, o) in [(2i64, 0i64), (3, 1), (10, 2)] {
            let get = |rs: Vec<tokio_postgres::Row>| -> Vec<(i32, i64)> {
                rs.iter().map(|r| (r.get(0), r.get(1))).collect()
            };
            let a = get(via
                .query(q, &[&l, &o])
                .await
                .unwrap_or_else(|e| panic!("{q}: {e:?}")));
            let b = get(plain.query(q, &[&l, &o]).await.unwrap());
            assert_eq!(a, b, "{shards} shards: {q} with {l}, {o}");
        }
        // Parameters in the final query (ORMs send literals as parameters), alone or in
        // WHERE too, in text and binary.
        let q = "SELECT qty, coalesce(sum(total), $1), round(avg(total), $2::int) FROM orders WHERE user_id > $3 GROUP BY qty HAVING count(*) > $4 AND max(user_id) > $3 ORDER BY qty";
        for (a1, a2, a3, a4) in [(0.5f64, 2i32, 10i64, 3i64), (1.0, 0, 250, 1)] {
            // A numeric parameter, sent as text.
            let n = Text(a1.to_string());
            let get = |rs: Vec<tokio_postgres::Row>| -> Vec<Vec<Option<RawValue>>> {
                rs.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<_, Option<RawValue>>(i))
                            .collect()
                    })
                    .collect()
            };
            let a = get(via
                .query(q, &[&n, &a2, &a3, &a4])
                .await
                .unwrap_or_else(|e| panic!("{q}: {e:?}")));
            let b = get(plain.query(q, &[&n, &a2, &a3, &a4]).await.unwrap());
            assert_eq!(a, b, "{shards} shards: {q}");
            assert!(!a.is_empty());
        }
        let q = "SELECT mood::text, string_agg(tag, $1 ORDER BY tag, user_id) FROM tags WHERE user_id < $2 GROUP BY mood ORDER BY mood";
        let a = rows_of(&via, q, "-", 20).await;
        let b = rows_of(&plain, q, "-", 20).await;
        assert_eq!(a, b, "{shards} shards: {q}");
        // Errors are PostgreSQL's: the final query's (division by zero), and the shards'
        // for a column neither grouped nor aggregated.
        for q in [
            "SELECT sum(qty) / 0 FROM orders",
            "SELECT qty, count(*) / (count(*) - count(*)) FROM orders GROUP BY qty",
            "SELECT qty, total, count(*) FROM orders GROUP BY qty ORDER BY 1",
            "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY total",
        ] {
            let a = via.simple_query(q).await.unwrap_err();
            let b = plain.simple_query(q).await.unwrap_err();
            assert_eq!(a.code(), b.code(), "{q}: {a:?}");
        }
        // What it cannot do is refused, never answered wrongly.
        let q = "SELECT sum(total) * 100.0 / (SELECT 1) FROM orders";
        let e = via.simple_query(q).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED),
            "{q}: {e:?}"
        );
    }
}

/// The RowDescription (body) answering `frames`.
async fn description(raw: &mut Raw, frames: &[u8]) -> Vec<u8> {
    raw.send(frames).await;
    let mut t = None;
    while let Some((tag, body)) = raw.recv().await {
        match tag {
            b'T' => t = Some(body),
            b'E' => panic!("{}", String::from_utf8_lossy(&body)),
            b'Z' => break,
            _ => {}
        }
    }
    t.expect("a RowDescription")
}

/// The RowDescription of a portal of an aggregate PostgreSQL finishes is the one a shard
/// gives for the statement (names, types, and the group keys' table, column number and
/// type modifier, which drivers read for result metadata).
#[tokio::test]
async fn finished_descriptions_are_the_statements() {
    use bytes::BytesMut;
    use pgshard::protocol::{write_bind, write_msg, write_parse, write_target};
    let addr = load(2).await;
    let mut raw = Raw::startup(addr, "trusty", "app").await;
    raw.until_ready().await;
    for q in [
        "SELECT qty, total, count(*) FROM orders GROUP BY qty, total ORDER BY max(id) DESC LIMIT 4",
        "SELECT mood, tag, string_agg(user_id::text, ',' ORDER BY user_id) FROM tags GROUP BY mood, tag ORDER BY tag LIMIT 3",
        "SELECT total AS t, coalesce(sum(qty), 0) FROM orders GROUP BY t ORDER BY t LIMIT 2",
    ] {
        let mut stmt = BytesMut::new();
        write_parse(&mut stmt, b"", q.as_bytes(), &[0, 0]);
        write_target(&mut stmt, b'D', b'S', b"");
        write_msg(&mut stmt, b'S', &[]);
        let of_statement = description(&mut raw, &stmt).await;
        let mut portal = BytesMut::new();
        write_parse(&mut portal, b"", q.as_bytes(), &[0, 0]);
        write_bind(&mut portal, b"", b"", &[0, 0, 0, 0, 0, 0]);
        write_target(&mut portal, b'D', b'P', b"");
        write_msg(&mut portal, b'E', &[0, 0, 0, 0, 0]);
        write_msg(&mut portal, b'S', &[]);
        let of_portal = description(&mut raw, &portal).await;
        assert_eq!(of_portal, of_statement, "{q}");
    }
}

/// A user-defined aggregate over several shards is refused (pgshard would take it for a
/// plain function and return each shard's row); grouped by the shard key, each shard
/// computes it whole and the answer is PostgreSQL's.
#[tokio::test]
async fn user_defined_aggregates_over_shards() {
    let _ = load(2).await;
    let agg =
        "CREATE AGGREGATE my_sum(numeric) (sfunc = numeric_add, stype = numeric, initcond = '0')";
    for sh in &cluster2().shards {
        connect_server(sh.primary.port, "app")
            .await
            .batch_execute(agg)
            .await
            .unwrap();
    }
    let plain = plain().await;
    plain.batch_execute(agg).await.unwrap();
    // A proxy of its own: its monitor reads the aggregates' names on its first round.
    let yaml = cluster2().config_yaml("127.0.0.1:0", "transaction", 2);
    let c = connect(start_proxy_yaml(&format!("{yaml}{}", rules(2)))).await;
    let q = "SELECT my_sum(total) FROM orders";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match c.simple_query(q).await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED) => {
                let msg = e.as_db_error().map(|d| d.message().to_string());
                assert!(
                    msg.as_deref().is_some_and(|m| m.contains("my_sum")),
                    "{msg:?}"
                );
                break;
            }
            Ok(r) if std::time::Instant::now() < deadline => {
                // Before the monitor's first reading: one row per shard.
                assert!(rows(&r).len() <= 2);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => panic!("{q}: {other:?}"),
        }
    }
    let q = "SELECT user_id, my_sum(total) FROM orders GROUP BY user_id ORDER BY user_id LIMIT 7";
    let a = rows(&c.simple_query(q).await.unwrap());
    let b = rows(&plain.simple_query(q).await.unwrap());
    assert_eq!(a, b, "{q}");
}

/// A proxy over a cluster with the schema and data loaded through it; the plain database
/// (on the 2-shard cluster's first server) gets the same statements once.
async fn load(shards: usize) -> SocketAddr {
    loaded(shards).await.0
}

/// As [`load`], with the proxy's server (for its metrics).
async fn loaded(shards: usize) -> (SocketAddr, std::sync::Arc<pgshard::frontend::Server>) {
    type Cell = tokio::sync::OnceCell<(SocketAddr, std::sync::Arc<pgshard::frontend::Server>)>;
    static TWO: Cell = Cell::const_new();
    static THREE: Cell = Cell::const_new();
    let (cell, cluster) = if shards == 2 {
        (&TWO, cluster2())
    } else {
        (&THREE, cluster3())
    };
    cell.get_or_init(|| async {
        let yaml = cluster
            .config_yaml("127.0.0.1:0", "transaction", 6)
            .replace("users:\n", "users:\n  - { name: trusty, auth: trust }\n");
        let cfg = pgshard::config::Config::from_yaml(&format!("{yaml}{}", rules(shards))).unwrap();
        let (addr, server) = start_proxy_server(cfg);
        let c = connect(addr).await;
        c.batch_execute(SCHEMA).await.unwrap();
        for s in data() {
            c.batch_execute(&s).await.unwrap();
        }
        (addr, server)
    })
    .await
    .clone()
}

async fn plain() -> tokio_postgres::Client {
    static INIT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let port = cluster2().shards[0].primary.port;
    INIT.get_or_init(|| async {
        cluster2()
            .psql(port, "postgres", "CREATE DATABASE plain OWNER app")
            .unwrap();
        let p = connect_server(port, "plain").await;
        p.batch_execute(SCHEMA).await.unwrap();
        for s in data() {
            p.batch_execute(&s).await.unwrap();
        }
    })
    .await;
    connect_server(port, "plain").await
}

async fn compare(addr: SocketAddr, shards: usize) {
    let via = connect(addr).await;
    let plain = plain().await;
    let corpus = corpus();
    assert!(corpus.len() >= 150, "{} queries", corpus.len());
    for q in &corpus {
        let mut a = rows(
            &via.simple_query(q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e:?}")),
        );
        let mut b = rows(&plain.simple_query(q).await.unwrap());
        if !q.contains("ORDER BY") {
            a.sort();
            b.sort();
        }
        assert_eq!(a, b, "{shards} shards: {q}");
    }
    // The same inside a transaction block (the shards join it; ordered rows are merged
    // as the participants send them).
    for c in [&via, &plain] {
        c.batch_execute("BEGIN").await.unwrap();
    }
    for q in &corpus {
        let mut a = rows(
            &via.simple_query(q)
                .await
                .unwrap_or_else(|e| panic!("in a transaction: {q}: {e:?}")),
        );
        let mut b = rows(&plain.simple_query(q).await.unwrap());
        if !q.contains("ORDER BY") {
            a.sort();
            b.sort();
        }
        assert_eq!(a, b, "{shards} shards, in a transaction: {q}");
    }
    for c in [&via, &plain] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // Prepared statements with parameters (extended protocol, binary parameters).
    for k in [1i64, 42, 151, 300, 999] {
        for q in [
            "SELECT id::text, name FROM users WHERE id = $1",
            "SELECT id::text, name FROM users WHERE id IN ($1, $1::bigint + 1)",
            "SELECT id::text, total::text FROM orders WHERE user_id = $1 ORDER BY id",
            "SELECT id::text, name FROM users WHERE id > $1 ORDER BY name, id LIMIT 7",
            "SELECT user_id::text, tag FROM tags WHERE user_id < $1 ORDER BY weight DESC, user_id LIMIT 5",
        ] {
            let get = |rs: Vec<tokio_postgres::Row>| -> Vec<(Option<String>, Option<String>)> {
                let mut v: Vec<_> = rs.iter().map(|r| (r.get(0), r.get(1))).collect();
                if !q.contains("ORDER BY") {
                    v.sort();
                }
                v
            };
            let a = get(via
                .query(q, &[&k])
                .await
                .unwrap_or_else(|e| panic!("{q}: {e:?}")));
            let b = get(plain.query(q, &[&k]).await.unwrap());
            assert_eq!(a, b, "{shards} shards: {q} with {k}");
        }
    }
}

#[tokio::test]
async fn corpus_on_two_shards() {
    let addr = load(2).await;
    compare(addr, 2).await;
}

#[tokio::test]
async fn corpus_on_three_shards() {
    let addr = load(3).await;
    compare(addr, 3).await;
}

/// Uncorrelated subqueries over sharded tables that no shard can answer alone: pgshard
/// evaluates them first (`router::preeval`).
fn evaluated_first() -> Vec<String> {
    let mut q: Vec<String> = [
        // Scalars: aggregates over every shard's rows, in WHERE and in the select list.
        "SELECT id, name FROM users WHERE score > (SELECT avg(score) FROM users) ORDER BY id",
        "SELECT count(*) FROM users WHERE score >= (SELECT max(score) - 3 FROM users)",
        "SELECT id, score - (SELECT min(score) FROM users) AS d FROM users WHERE id < 20 ORDER BY id",
        "SELECT id FROM users WHERE born > (SELECT min(at)::date + 30 FROM ev) ORDER BY born, id LIMIT 5",
        "SELECT (SELECT count(*) FROM orders) AS n, (SELECT max(tag) FROM tags) AS t",
        "SELECT id FROM users WHERE score = (SELECT score FROM users WHERE id > 1000)",
        // IN lists: the outer query goes to the shards of the keys found.
        "SELECT id, name FROM users WHERE id IN (SELECT id FROM ev WHERE kind = 'k1') ORDER BY id",
        "SELECT id FROM users WHERE id NOT IN (SELECT user_id FROM tags WHERE weight > 1.5) ORDER BY id",
        "SELECT count(*) FROM users WHERE id IN (SELECT user_id FROM tags WHERE weight > 100)",
        "SELECT count(*) FROM users WHERE id NOT IN (SELECT user_id FROM tags WHERE weight > 100)",
        "SELECT id FROM users WHERE name IN (SELECT name FROM users GROUP BY name HAVING count(*) > 1) ORDER BY id",
        "SELECT user_id, tag FROM tags WHERE (user_id, tag) IN (SELECT id, 'tag' || (id % 40) FROM users WHERE id < 50) ORDER BY user_id",
        // A user-defined type (an enum): its name read from the server.
        "SELECT tag, user_id, mood FROM tags WHERE mood IN (SELECT mood FROM tags WHERE weight = 0) ORDER BY user_id",
        "SELECT count(*) FROM tags WHERE mood > (SELECT min(mood) FROM tags)",
        // EXISTS, ANY, ALL.
        "SELECT id FROM users WHERE EXISTS (SELECT 1 FROM orders WHERE total > 70) AND id < 5 ORDER BY id",
        "SELECT id FROM users WHERE NOT EXISTS (SELECT 1 FROM orders WHERE total > 1000) AND id < 5 ORDER BY id",
        "SELECT id FROM users WHERE score > ALL (SELECT weight FROM tags WHERE weight > 1) ORDER BY id",
        "SELECT id FROM users WHERE id = ANY (SELECT user_id FROM tags WHERE tag = 'tag7') ORDER BY id",
        "SELECT EXISTS (SELECT user_id FROM orders GROUP BY user_id HAVING count(*) > 2)",
        // Subqueries with subqueries of their own to evaluate first.
        "SELECT id FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > (SELECT avg(total) FROM orders)) ORDER BY id",
        "SELECT id FROM users WHERE name IN (SELECT name FROM users WHERE score > (SELECT avg(score) + 5 FROM users)) ORDER BY id",
        // Text that needs quoting, NULLs, timestamps.
        "SELECT id FROM users WHERE name || ' ''$x$' IN (SELECT name || ' ''$x$' FROM users WHERE id < 4) ORDER BY id",
        "SELECT id, at FROM ev WHERE at = (SELECT max(at) FROM ev) OR at = (SELECT min(at) FROM ev) ORDER BY id",
        "SELECT id FROM ev WHERE at IN (SELECT at FROM ev WHERE id % 50 = 0) ORDER BY id",
    ]
    .map(String::from)
    .to_vec();
    for k in [3, 150] {
        // Beside a key condition: one shard.
        q.push(format!(
            "SELECT id, name FROM users WHERE id = {k} AND score <= (SELECT max(score) FROM users)"
        ));
    }
    q
}

/// Subqueries evaluated first, on 2 and 3 shards: the same rows and errors as on the plain
/// database, outside and inside a transaction (which the subqueries see the writes of).
#[tokio::test]
async fn subqueries_evaluated_first_match_plain_postgres() {
    let plain = plain().await;
    for shards in [2, 3] {
        let via = connect(load(shards).await).await;
        for q in evaluated_first() {
            let mut a = rows(
                &via.simple_query(&q)
                    .await
                    .unwrap_or_else(|e| panic!("{shards} shards: {q}: {e:?}")),
            );
            let mut b = rows(&plain.simple_query(&q).await.unwrap());
            if !q.contains("ORDER BY") {
                a.sort();
                b.sort();
            }
            assert_eq!(a, b, "{shards} shards: {q}");
        }
        // The extended protocol: names, types and binary values.
        for q in evaluated_first() {
            let mut a = typed(&via, &q)
                .await
                .unwrap_or_else(|e| panic!("{shards} shards, extended: {q}: {e:?}"));
            let mut b = typed(&plain, &q).await.unwrap();
            if !q.contains("ORDER BY") {
                a.1.sort();
                b.1.sort();
            }
            assert_eq!(a, b, "{shards} shards, extended: {q}");
        }
        // With parameters, in the subquery and out of it.
        let q = "SELECT id::text FROM users WHERE score > (SELECT avg(score) FROM users WHERE id > $1) AND id < $2 ORDER BY id";
        let get =
            |rs: Vec<tokio_postgres::Row>| -> Vec<String> { rs.iter().map(|r| r.get(0)).collect() };
        for (lo, hi) in [(10i64, 60i64), (150, 300), (0, 0)] {
            let a = get(via.query(q, &[&lo, &hi]).await.unwrap());
            assert_eq!(a, get(plain.query(q, &[&lo, &hi]).await.unwrap()), "{q}");
        }
        let q = "SELECT id::text FROM users WHERE id IN (SELECT user_id FROM tags WHERE tag = $1 AND weight >= $2) ORDER BY id";
        for (tag, w) in [("tag7", 0.0f64), ("tag11", 1.0), ("none", 0.0)] {
            let a = get(via.query(q, &[&tag, &w]).await.unwrap());
            assert_eq!(a, get(plain.query(q, &[&tag, &w]).await.unwrap()), "{q}");
        }
        // A write whose subquery reads every shard.
        let q = "UPDATE users SET score = score WHERE id = $1 AND score <= (SELECT max(score) FROM users)";
        assert_eq!(via.execute(q, &[&7i64]).await.unwrap(), 1);
        // Errors at Bind, and in a transaction, where the subqueries see its writes.
        let e = via
            .query(
                "SELECT id FROM users WHERE score = (SELECT score FROM users WHERE id > $1)",
                &[&1i64],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "21000", "{e:?}");
        via.batch_execute("BEGIN").await.unwrap();
        via.execute(
            "INSERT INTO users (id, name, score) VALUES (6000, 'big', 5000)",
            &[],
        )
        .await
        .unwrap();
        let q = "SELECT id::text FROM users WHERE score > (SELECT avg(score) * $1::int FROM users) ORDER BY id";
        assert_eq!(get(via.query(q, &[&20i32]).await.unwrap()), ["6000"]);
        let e = via
            .query("SELECT (SELECT id FROM users WHERE id > $1)", &[&0i64])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "21000");
        let e = via.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02");
        via.batch_execute("ROLLBACK").await.unwrap();
        assert!(
            get(via
                .query("SELECT id::text FROM users WHERE id = $1", &[&6000i64])
                .await
                .unwrap())
            .is_empty()
        );
        // Output columns named as PostgreSQL names them.
        same_simple(
            &via,
            &plain,
            "SELECT (SELECT count(*) FROM orders), EXISTS (SELECT 1 FROM tags WHERE weight > 2), (SELECT max(tag) AS \"Top\" FROM tags)",
            "",
        )
        .await;
        for q in [
            "SELECT id FROM users WHERE score = (SELECT score FROM users)",
            "SELECT id FROM users WHERE score = (SELECT score, id FROM users LIMIT 1)",
            "SELECT id FROM users WHERE id IN (SELECT id, name FROM users WHERE id = 1 OR id = 2)",
            "SELECT id FROM users WHERE id IN (SELECT nope FROM users)",
        ] {
            let a = via.simple_query(q).await.unwrap_err();
            let b = plain.simple_query(q).await.unwrap_err();
            assert_eq!(sqlstate(&a), sqlstate(&b), "{shards} shards: {q}: {a:?}");
        }
        // In a transaction, after a write the subqueries must see.
        let insert = "INSERT INTO users (id, name, score, born) VALUES (5000, 'top', 1000, DATE '2020-01-01'), (5001, 'top', 0, NULL)";
        for c in [&via, &plain] {
            c.batch_execute("BEGIN").await.unwrap();
            c.batch_execute(insert).await.unwrap();
        }
        for q in [
            "SELECT id, name FROM users WHERE score > (SELECT avg(score) FROM users) ORDER BY id",
            "SELECT id FROM users WHERE name IN (SELECT name FROM users WHERE score >= 1000) ORDER BY id",
        ] {
            let a = rows(&via.simple_query(q).await.unwrap());
            assert_eq!(a, rows(&plain.simple_query(q).await.unwrap()), "{q}");
        }
        // An error in one aborts the transaction, as on a server.
        via.simple_query("SELECT (SELECT id FROM users)")
            .await
            .unwrap_err();
        let e = via.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02");
        for c in [&via, &plain] {
            c.batch_execute("ROLLBACK").await.unwrap();
        }
        // The first statement of a transaction (no shard has begun it yet).
        let q = "SELECT count(*) FROM users WHERE score > (SELECT avg(score) FROM users)";
        via.batch_execute("BEGIN").await.unwrap();
        let a = rows(&via.simple_query(q).await.unwrap());
        via.batch_execute("COMMIT").await.unwrap();
        assert_eq!(a, rows(&plain.simple_query(q).await.unwrap()));
        let gone = "SELECT count(*) FROM users WHERE id >= 5000 OR score > (SELECT avg(score) * 100 FROM users)";
        assert_eq!(
            rows(&via.simple_query(gone).await.unwrap()),
            [[Some("0".to_string())]]
        );
    }
}

#[tokio::test]
async fn rows_are_where_their_shard_function_says() {
    // After the split INSERTs: every row on its shard, none duplicated, none missing.
    let _ = load(3).await;
    let c = cluster3();
    let mut total = 0;
    for (s, sh) in c.shards.iter().enumerate() {
        let db = connect_server(sh.primary.port, "app").await;
        let ids: Vec<i64> = db
            .query("SELECT id FROM users", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in &ids {
            let want = pgshard::sharding::hash::partition_of(
                &pgshard::sharding::hash::HashKey::Int(*id),
                3,
            );
            assert_eq!(want, s as u64, "user {id} on shard {s}");
        }
        total += ids.len();
    }
    assert_eq!(total, 300);
}

/// Values pgshard cannot order by their bytes: text in an ICU collation (the database's
/// default, as `en_US.UTF-8` databases are), a column of its own collation, `COLLATE` in
/// ORDER BY, enums, intervals and network addresses. PostgreSQL ranks them for the merge
/// (ORDER BY, min/max, DISTINCT ON, UNION); compared with one plain PostgreSQL database of
/// the same collation.
#[tokio::test]
async fn orders_values_as_postgresql_does() {
    let c = cluster2();
    let create =
        "CREATE DATABASE icu OWNER app TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'";
    for sh in &c.shards {
        c.psql(sh.primary.port, "postgres", create).unwrap();
    }
    c.psql(
        c.shards[0].primary.port,
        "postgres",
        "CREATE DATABASE icu_plain OWNER app TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'",
    )
    .unwrap();
    let yaml = c.config_yaml("127.0.0.1:0", "transaction", 4).replace(
        "  - name: app\n",
        "  - name: app\n    server_database: icu\n",
    );
    let rules = "    sharded_tables:\n      - { table: people, column: id, method: hash }\n";
    let via = connect(start_proxy_yaml(&format!("{yaml}{rules}"))).await;
    let plain = connect_server(c.shards[0].primary.port, "icu_plain").await;
    let schema = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); \
        CREATE TABLE people (id bigint PRIMARY KEY, name text, nick varchar(20) COLLATE \"C\", mood mood, span interval, ip inet)";
    let names = [
        "alice", "Bob", "émile", "Zoe", "zed", "Ángel", "bob", "ALICE", "Örjan", "_x", "10", "9",
        "a b", "ab", "Émile", "angel", "Zoë", "z",
    ];
    let spans = ["1 day", "23 hours", "2 mons", "25 hours", "-1 day", "1 mon"];
    let rows: Vec<String> = (1..=72)
        .map(|i: usize| {
            format!(
                "({i}, {}, '{}', '{}', '{}', '{}.0.{}.1')",
                if i.is_multiple_of(11) {
                    "NULL".to_string()
                } else {
                    format!("'{}'", names[i % names.len()])
                },
                names[(i * 7) % names.len()],
                ["sad", "ok", "happy"][i % 3],
                spans[i % spans.len()],
                (i * 13) % 40,
                i % 3
            )
        })
        .collect();
    let insert = format!(
        "INSERT INTO people (id, name, nick, mood, span, ip) VALUES {}",
        rows.join(", ")
    );
    for db in [&via, &plain] {
        db.batch_execute(schema).await.unwrap();
        db.batch_execute(&insert).await.unwrap();
    }
    // (query, also in binary results)
    let queries = [
        ("SELECT id, name FROM people ORDER BY name, id", true),
        (
            "SELECT id, name FROM people ORDER BY name DESC, id LIMIT 7 OFFSET 3",
            true,
        ),
        (
            "SELECT id FROM people ORDER BY name NULLS FIRST, id LIMIT 9",
            true,
        ),
        (
            "SELECT id, nick FROM people ORDER BY nick, id LIMIT 12",
            true,
        ),
        (
            "SELECT id, name FROM people ORDER BY name COLLATE \"C\", id LIMIT 12",
            true,
        ),
        (
            "SELECT id, nick FROM people ORDER BY nick COLLATE \"en-x-icu\" DESC, id LIMIT 12",
            true,
        ),
        (
            "SELECT min(name), max(name), min(nick), max(nick) FROM people",
            true,
        ),
        (
            "SELECT mood, min(name), max(name), count(*) FROM people GROUP BY mood ORDER BY mood",
            true,
        ),
        ("SELECT id, mood FROM people ORDER BY mood DESC, id", true),
        ("SELECT min(mood), max(mood) FROM people", true),
        ("SELECT DISTINCT name FROM people ORDER BY name", true),
        (
            "SELECT DISTINCT ON (mood) mood, name FROM people ORDER BY mood, name",
            true,
        ),
        (
            "SELECT lower(name) AS l, count(*) FROM people GROUP BY l ORDER BY l",
            true,
        ),
        (
            "SELECT name FROM people WHERE id < 20 UNION SELECT name FROM people WHERE id > 40 ORDER BY name",
            true,
        ),
        ("SELECT id, span FROM people ORDER BY span, id", false),
        ("SELECT min(span), max(span) FROM people", false),
        ("SELECT id, ip FROM people ORDER BY ip DESC, id", false),
    ];
    // Finished by PostgreSQL over the merged groups (or gathered rows): group keys and
    // inputs keep their column's collation in the final query.
    let finished = [
        "SELECT nick, count(*)::int AS n FROM people GROUP BY nick ORDER BY nick",
        "SELECT nick, count(*)::int AS n FROM people GROUP BY nick HAVING nick > 'Z' ORDER BY nick DESC",
        "SELECT string_agg(nick, ',' ORDER BY nick, id) FROM people WHERE id < 30",
        "SELECT name, count(*)::int AS n FROM people GROUP BY name ORDER BY name",
        "SELECT mood, string_agg(name, ',' ORDER BY name, id) FROM people GROUP BY mood ORDER BY mood",
    ];
    let queries: Vec<(&str, bool)> = queries
        .into_iter()
        .chain(finished.into_iter().map(|q| (q, true)))
        .collect();
    // min and max of two rows on two shards: pgshard compares the shards' answers.
    let on = |id: i64| {
        pgshard::sharding::hash::partition_of(&pgshard::sharding::hash::HashKey::Int(id), 2)
    };
    let pair = |a: &[i64], b: &[i64]| -> (i64, i64) {
        a.iter()
            .flat_map(|&x| b.iter().map(move |&y| (x, y)))
            .find(|&(x, y)| on(x) != on(y))
            .expect("two rows on two shards")
    };
    // 'alice' against 'Bob' (names), 'sad' against 'happy' (moods), '2 mons' against
    // '25 hours' (spans).
    let (alice, bob) = pair(&[18, 36, 54, 72], &[1, 19, 37]);
    let (sad, happy) = pair(&[3, 6, 9, 12, 15], &[2, 5, 8, 14, 17]);
    let (months, hours) = pair(&[2, 8, 14, 20], &[3, 9, 15, 21]);
    let pairs = [
        format!("SELECT min(name), max(name), count(*) FROM people WHERE id IN ({alice}, {bob})"),
        format!("SELECT min(mood), max(mood) FROM people WHERE id IN ({sad}, {happy})"),
        format!("SELECT min(span), max(span) FROM people WHERE id IN ({months}, {hours})"),
    ];
    let queries = queries
        .iter()
        .map(|(q, b)| (q.to_string(), *b))
        .chain(pairs.iter().map(|q| (q.clone(), !q.contains("span"))));
    for (q, binary) in queries {
        same_simple(&via, &plain, &q, "").await;
        if binary {
            same_extended(&via, &plain, &q, "extended, binary: ").await;
        }
    }
    // Inside a transaction (the shards join it; the ranks come from a connection of
    // their own) and with a row limit per Execute (a portal pgshard holds).
    for db in [&via, &plain] {
        db.batch_execute("BEGIN; UPDATE people SET name = 'Aaron' WHERE id = 5")
            .await
            .unwrap();
    }
    let q = "SELECT id, name FROM people ORDER BY name DESC, id LIMIT 20";
    same_simple(&via, &plain, q, "in a transaction: ").await;
    same_extended(&via, &plain, q, "in a transaction, extended: ").await;
    for db in [&via, &plain] {
        db.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// Dates and times as PostgreSQL orders them in every DateStyle and time zone: BC dates,
/// years past 9999, infinities, and a time zone's repeated hour (01:15 EST comes after
/// 01:45 EDT). Their text is not in the order of its bytes: ORDER BY (held and streamed),
/// min and max over shards are compared with one plain PostgreSQL database.
#[tokio::test]
async fn orders_dates_and_times_as_postgresql_does() {
    let via = connect(load(2).await).await;
    let plain = plain().await;
    let schema = "DROP TABLE IF EXISTS moments; \
        CREATE TABLE moments (id bigint, d date, ts timestamp, tz timestamptz)";
    let dates = [
        "2026-03-15",
        "2026-04-01",
        "2026-12-01",
        "2025-12-31",
        "0044-03-15 BC",
        "0001-01-01",
        "0001-12-31 BC",
        "10000-01-01",
        "9999-12-31",
        "infinity",
        "-infinity",
        "2026-01-02",
    ];
    let instants = [
        "2026-11-01 05:15:00+00",
        "2026-11-01 05:45:00+00",
        "2026-11-01 06:15:00+00",
        "2026-11-01 06:30:00+00",
        "2026-03-08 06:59:59.5+00",
        "2026-03-08 07:00:00.25+00",
        "0044-03-15 12:00:00+00 BC",
        "10000-01-01 00:00:00+00",
        "infinity",
        "-infinity",
        "2026-07-01 00:00:00+00",
    ];
    let rows: Vec<String> = (1..=48)
        .map(|i: usize| {
            let d = dates[i % dates.len()];
            let t = instants[(i * 5) % instants.len()];
            let ts = if d.contains("infinity") {
                d.to_string()
            } else {
                match d.strip_suffix(" BC") {
                    Some(day) => format!("{day} 0{}:30:00 BC", i % 10),
                    None => format!("{d} 0{}:30:00", i % 10),
                }
            };
            if i.is_multiple_of(13) {
                format!("({i}, NULL, NULL, NULL)")
            } else {
                format!("({i}, '{d}', '{ts}', '{t}')")
            }
        })
        .collect();
    let insert = format!("INSERT INTO moments VALUES {}", rows.join(", "));
    for db in [&via, &plain] {
        db.batch_execute(schema).await.unwrap();
        db.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
        db.batch_execute(&insert).await.unwrap();
    }
    let queries = [
        "SELECT id, d FROM moments ORDER BY d, id",
        "SELECT id, ts FROM moments ORDER BY ts DESC, id LIMIT 20",
        "SELECT id, tz FROM moments WHERE {tz} ORDER BY tz, id",
        "SELECT id, tz FROM moments WHERE {tz} ORDER BY tz DESC NULLS LAST, id LIMIT 9 OFFSET 2",
        "SELECT min(d), max(d), min(ts), max(ts), min(tz), max(tz) FROM moments WHERE {tz}",
        "SELECT min(d), max(d), min(tz), max(tz) FROM moments WHERE d > '2000-01-01' AND d < '9000-01-01'",
        "SELECT d, count(*) FROM moments GROUP BY d ORDER BY d",
        "SELECT DISTINCT tz FROM moments WHERE {tz} ORDER BY tz",
    ];
    for (style, zone) in [
        ("ISO, MDY", "UTC"),
        ("ISO, MDY", "America/New_York"),
        ("ISO, DMY", "Asia/Kolkata"),
        ("SQL, DMY", "UTC"),
        ("SQL, MDY", "America/New_York"),
        ("German", "Europe/Berlin"),
        ("Postgres, DMY", "America/New_York"),
    ] {
        for db in [&via, &plain] {
            db.batch_execute(&format!(
                "SET DateStyle = '{style}'; SET TimeZone = '{zone}'"
            ))
            .await
            .unwrap();
        }
        let what = format!("{style}, {zone}: ");
        // In other styles than ISO a server ranks the text, and PostgreSQL cannot read
        // back a timestamptz before its zone's standard time (`07:03:58 LMT BC`).
        let tz = if style.starts_with("ISO") {
            "true"
        } else {
            "(tz > '1900-01-01 00:00+00' OR NOT isfinite(tz) OR tz IS NULL)"
        };
        for q in queries {
            let q = q.replace("{tz}", tz);
            same_simple(&via, &plain, &q, &what).await;
            same_extended(&via, &plain, &q, &format!("extended, {what}")).await;
        }
    }
    for db in [&via, &plain] {
        db.batch_execute("RESET DateStyle; RESET TimeZone")
            .await
            .unwrap();
    }
}
