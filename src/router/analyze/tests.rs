//! Analysis tests, and the rules and helpers the other router tests share.

use super::*;
use crate::config::ShardedTableConfig;

pub(in crate::router) fn rules() -> Rules {
    let t = |y: &str| {
        let c: ShardedTableConfig = yaml_serde::from_str(y).unwrap();
        crate::sharding::ShardFn::new(&c, 2, "t").unwrap()
    };
    Rules::new(
        vec![
            t("{ table: users, column: id, method: hash }"),
            t("{ table: orders, column: user_id, method: hash }"),
            t("{ table: tickets, column: id, method: hash, generate_keys: true }"),
            t(
                "{ table: events, column: id, method: range, ranges: [ { to: 100, shard: 0 }, { from: 100, shard: 1 } ] }",
            ),
        ],
        vec!["countries".into()],
    )
}

pub(in crate::router) fn target(sql: &str) -> Target {
    analyze(sql, &rules()).unwrap().target
}

/// Refused as written, and routed once pgshard has evaluated its subqueries (`preeval`).
pub(in crate::router) fn evaluated_first(sql: &str) -> bool {
    analyze(sql, &rules()).is_err()
        && analyze_evaluating_first(sql, &rules()).is_ok_and(|a| {
            a.pre_eval
                .is_some_and(|p| p.refused.is_some() && !p.subqueries.is_empty())
        })
}

pub(in crate::router) fn lit(s: &str) -> KeyRef {
    KeyRef::Literal(s.into())
}

#[test]
fn keys_from_where_clauses() {
    assert_eq!(
        target("SELECT * FROM users WHERE id = 5"),
        Target::Keys(vec![(0, lit("5"))])
    );
    assert_eq!(
        target("select * from public.\"users\" u where u.id = $1 and u.name = 'x'"),
        Target::Keys(vec![(0, KeyRef::Param(0, None))])
    );
    assert_eq!(
        target("SELECT * FROM users WHERE name = 'x' AND (id IN (1, 2, -3))"),
        Target::Keys(vec![(0, lit("1")), (0, lit("2")), (0, lit("-3"))])
    );
    assert_eq!(
        target("SELECT * FROM users WHERE id = $1::bigint OR id = 7"),
        Target::Keys(vec![
            (
                0,
                KeyRef::Param(0, Some(crate::sharding::cast::Cast::Int(20)))
            ),
            (0, lit("7"))
        ])
    );
    // Signs and casts give the value PostgreSQL computes.
    assert_eq!(
        target("SELECT * FROM users WHERE id IN (-(-5), -(7.5)::int, int8 '9')"),
        Target::Keys(vec![(0, lit("5")), (0, lit("-8")), (0, lit("9"))])
    );
    assert_eq!(
        target("SELECT * FROM users WHERE id = 1 OR name = 'x'"),
        Target::All
    );
    assert_eq!(target("SELECT count(*) FROM users"), Target::All);
    assert_eq!(target("SELECT 1"), Target::Default);
    assert_eq!(target("SELECT * FROM countries"), Target::Default);
    assert_eq!(
        target("SELECT * FROM other_table WHERE id = 1"),
        Target::Default
    );
}

#[test]
fn joins_ctes_and_locking() {
    assert_eq!(
        target("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 9"),
        Target::Keys(vec![(0, lit("9"))])
    );
    assert_eq!(
        target("WITH x AS (SELECT * FROM orders WHERE user_id = 4) SELECT * FROM x"),
        Target::Keys(vec![(1, lit("4"))])
    );
    // A quoted alias keeps its case, where it is declared and where it is used.
    assert_eq!(
        target(r#"SELECT * FROM users AS "U" WHERE "U".id = 5"#),
        Target::Keys(vec![(0, lit("5"))])
    );
    let a = analyze("SELECT * FROM users WHERE id = 1 FOR UPDATE", &rules()).unwrap();
    assert_eq!(a.kind, Kind::Write);
    assert_eq!(a.target, Target::Keys(vec![(0, lit("1"))]));
    assert!(a.locking_read && !a.replica_safe);
    // A locking read is one whose only write is its locking clause.
    for (sql, locking) in [
        ("SELECT * FROM users FOR SHARE SKIP LOCKED", true),
        (
            "WITH x AS (SELECT id FROM users) SELECT * FROM x, users FOR UPDATE OF users",
            true,
        ),
        (
            "WITH d AS (DELETE FROM orders RETURNING user_id) SELECT * FROM users, d FOR UPDATE",
            false,
        ),
        ("SELECT * FROM (SELECT * FROM users FOR UPDATE) s", false),
        ("DECLARE c CURSOR FOR SELECT * FROM users FOR UPDATE", false),
        ("SELECT * FROM users", false),
        ("SELECT 1 FROM users FOR UPDATE; SELECT 2", false),
    ] {
        assert_eq!(
            analyze(sql, &rules()).unwrap().locking_read,
            locking,
            "{sql}"
        );
    }
}

#[test]
fn set_operation_branches_are_not_co_located() {
    // A branch without a key needs every shard: the other branch's key does not
    // bring it to one shard (it is no join on the key).
    for sql in [
        "SELECT id FROM users WHERE id = 1 UNION ALL SELECT user_id FROM orders",
        "SELECT user_id FROM orders UNION SELECT id FROM users WHERE id = 1",
        "SELECT id FROM users WHERE id = 1 EXCEPT SELECT user_id FROM orders",
        "SELECT 1 UNION ALL (SELECT id FROM users WHERE id = 1 UNION ALL SELECT id FROM users)",
    ] {
        assert_eq!(target(sql), Target::All, "{sql}");
    }
    assert_eq!(
        target(
            "SELECT id FROM users WHERE id = 1 UNION ALL SELECT user_id FROM orders WHERE user_id = 2"
        ),
        Target::Keys(vec![(0, lit("1")), (1, lit("2"))])
    );
    assert_eq!(
        target("SELECT id FROM users WHERE id = 1 UNION SELECT 5"),
        Target::Keys(vec![(0, lit("1"))])
    );
}

#[test]
fn writes() {
    assert_eq!(
        target("INSERT INTO users (name, id) VALUES ('a', 1), ('b', $2)"),
        Target::Keys(vec![(0, lit("1")), (0, KeyRef::Param(1, None))])
    );
    // Without a column list the session reads the table's columns first.
    let a = analyze("INSERT INTO users VALUES (1, 'a')", &rules()).unwrap();
    assert_eq!(a.target, Target::All);
    assert!(matches!(
        a.insert_via.as_deref(),
        Some(super::InsertVia {
            how: super::Via::Unlisted,
            table: 0,
            ..
        })
    ));
    // So does INSERT ... SELECT without one, and with `generate_keys` (tickets), where
    // the SELECT may give the key.
    for sql in [
        "INSERT INTO users SELECT 1, 'a'",
        "INSERT INTO tickets SELECT 5, 'x'",
    ] {
        let a = analyze(sql, &rules()).unwrap();
        assert!(
            matches!(
                a.insert_via.as_deref(),
                Some(super::InsertVia {
                    how: super::Via::Unlisted,
                    ..
                })
            ),
            "{sql}"
        );
        assert!(a.keyless.is_empty(), "{sql}");
    }
    // Keys pgshard cannot read: one query evaluates them, each once, then cast to the
    // key's type; the rows with readable keys keep theirs.
    let a = analyze(
        "INSERT INTO users (id) VALUES (random() * $1), (5), ('1e3')",
        &rules(),
    )
    .unwrap();
    assert_eq!(a.target, Target::All);
    let via = a.insert_via.unwrap();
    assert_eq!(
        via.computed().unwrap().rows,
        vec![None, Some(lit("5")), None]
    );
    assert_eq!(
        via.select_sql,
        "SELECT pgshard_k0, CAST(pgshard_k0 AS pg_catalog.int8), pgshard_k1, CAST(pgshard_k1 AS pg_catalog.int8) \
         FROM (SELECT random() * $1 AS pgshard_k0, CAST(('1e3') AS pg_catalog.int8) AS pgshard_k1 OFFSET 0) AS pgshard_keys"
    );
    // Not one that reads a sharded table (a shard holds part of its rows).
    assert!(
        analyze(
            "INSERT INTO users (id) VALUES ((SELECT max(id) + 1 FROM users))",
            &rules()
        )
        .is_err()
    );
    // The column's default (DEFAULT, the key left out, DEFAULT VALUES): looked up when
    // the statement runs, the key added to the columns where it was left out.
    for (sql, insert) in [
        (
            "INSERT INTO users (id, name) VALUES (DEFAULT, 'a'), (7, 'b')",
            "INSERT INTO users (id, name) VALUES (DEFAULT, 'a'), (7, 'b')",
        ),
        (
            "INSERT INTO users (name) VALUES ('a'), ('b')",
            "INSERT INTO users (name, \"id\") VALUES ('a', DEFAULT), ('b', DEFAULT)",
        ),
        (
            "INSERT INTO users DEFAULT VALUES",
            "INSERT INTO users (\"id\") VALUES (DEFAULT)",
        ),
    ] {
        let via = analyze(sql, &rules()).unwrap().insert_via.unwrap();
        assert_eq!(via.insert.to_string(), insert);
        let keys = via.computed().cloned().unwrap();
        assert!(keys.exprs.iter().all(Option::is_none), "{sql}");
        assert_eq!(
            keys.rows.len(),
            keys.exprs.len() + usize::from(sql.contains("(7"))
        );
    }
    // A computed key: pgshard reads the rows, then splits them by key.
    let a = analyze(
        "INSERT INTO users (id, name) SELECT id + 1, name FROM users WHERE id = 1",
        &rules(),
    )
    .unwrap();
    assert_eq!(a.target, Target::All);
    let via = a.insert_via.unwrap();
    assert_eq!(via.select.target, Target::Keys(vec![(0, lit("1"))]));
    assert_eq!(
        via.select_sql,
        "SELECT id + 1, name FROM users WHERE id = 1"
    );
    // Into an unsharded table it is fine (it runs where that table lives).
    assert_eq!(
        target("INSERT INTO local_t SELECT * FROM users WHERE id = 3"),
        Target::Keys(vec![(0, lit("3"))])
    );
    assert_eq!(
        target("UPDATE users SET name = 'x' WHERE id = 3"),
        Target::Keys(vec![(0, lit("3"))])
    );
    let a = analyze("UPDATE users SET id = 4 WHERE id = 3", &rules()).unwrap();
    assert_eq!(a.key_update, Some((0, Some(lit("4")))));
    assert_eq!(
        target("DELETE FROM orders WHERE user_id = 2"),
        Target::Keys(vec![(1, lit("2"))])
    );
    assert_eq!(target("DELETE FROM orders"), Target::All);
    assert_eq!(target("INSERT INTO countries VALUES ('fr')"), Target::All);
    assert_eq!(
        target("CREATE TABLE users (id bigint primary key)"),
        Target::All
    );
    assert_eq!(target("CREATE TABLE local_t (id int)"), Target::Default);
    assert_eq!(target("CREATE INDEX ON orders (user_id)"), Target::All);
    assert_eq!(target("DROP TABLE IF EXISTS users, orders"), Target::All);
    // Types, domains, schemas and extensions that sharded tables may use: every shard.
    for sql in [
        "CREATE TYPE mood AS ENUM ('sad', 'ok')",
        "CREATE TYPE pair AS (a int, b int)",
        "ALTER TYPE mood ADD VALUE 'happy'",
        "DROP TYPE IF EXISTS mood",
        "CREATE DOMAIN positive AS int CHECK (VALUE > 0)",
        "DROP DOMAIN positive",
        "CREATE SCHEMA IF NOT EXISTS app",
        "DROP SCHEMA app CASCADE",
        "CREATE EXTENSION IF NOT EXISTS pgcrypto",
        "DROP EXTENSION pgcrypto",
    ] {
        assert_eq!(target(sql), Target::All, "{sql}");
    }
    assert!(matches!(
        analyze("COPY users FROM STDIN", &rules()),
        Err(AnalyzeError::Unroutable(m)) if m.contains("COPY")
    ));
    assert_eq!(target("COPY other_table FROM STDIN"), Target::Default);
    assert_eq!(target("GRANT SELECT ON users TO public"), Target::All);
    assert_eq!(target("COMMENT ON TABLE orders IS 'x'"), Target::All);
    assert_eq!(
        target("GRANT SELECT ON other_table TO public"),
        Target::Default
    );
    assert_eq!(target("SET search_path = users"), Target::Default);
}

#[test]
fn several_statements_combine() {
    let a = analyze(
        "BEGIN; UPDATE users SET n = 1 WHERE id = 1; COMMIT",
        &rules(),
    )
    .unwrap();
    assert_eq!(a.statements, 3);
    assert_eq!(a.target, Target::Keys(vec![(0, lit("1"))]));
}

#[test]
fn exists_over_shards_merges_booleans() {
    use crate::router::merge::Column;
    let a = analyze(
        "SELECT EXISTS (SELECT 1 FROM orders WHERE total > 5) AS e, NOT EXISTS (SELECT * FROM users)",
        &rules(),
    )
    .unwrap();
    assert_eq!(a.target, Target::All);
    assert_eq!(a.kind, Kind::Read);
    assert!(a.replica_safe);
    assert_eq!(
        a.merge.unwrap().unwrap().aggregates,
        Some(vec![Column::Max, Column::Min])
    );
    // One shard when the subquery names its key.
    let a = analyze(
        "SELECT EXISTS (SELECT 1 FROM users WHERE id = 42)",
        &rules(),
    )
    .unwrap();
    assert!(matches!(a.target, Target::Keys(ref k) if k.len() == 1));
    // Grouped or limited subqueries depend on the other shards' rows: evaluated first.
    for sql in [
        "SELECT EXISTS (SELECT user_id FROM orders GROUP BY user_id HAVING count(*) > 2)",
        "SELECT EXISTS (SELECT 1 FROM orders OFFSET 3)",
    ] {
        assert!(evaluated_first(sql), "{sql}");
    }
}

#[test]
fn bounds_from_comparisons() {
    let range =
        |lower: Vec<KeyRef>, upper: Vec<KeyRef>| KeyRef::Range(Box::new(KeyRange { lower, upper }));
    assert_eq!(
        target("SELECT * FROM events WHERE id >= 5 AND name = 'x' AND id < 20"),
        Target::Keys(vec![(3, range(vec![lit("5")], vec![lit("20")]))])
    );
    assert_eq!(
        target("SELECT * FROM events WHERE 5 < id"),
        Target::Keys(vec![(3, range(vec![lit("5")], vec![]))])
    );
    assert_eq!(
        target("SELECT * FROM events e WHERE e.id BETWEEN $1 AND $2::bigint"),
        Target::Keys(vec![(
            3,
            range(
                vec![KeyRef::Param(0, None)],
                vec![KeyRef::Param(1, Some(crate::sharding::cast::Cast::Int(20)))]
            )
        )])
    );
    // A value narrows more than bounds; a disjunction needs both.
    assert_eq!(
        target("SELECT * FROM events WHERE id > 5 AND id = 7"),
        Target::Keys(vec![(3, lit("7"))])
    );
    assert_eq!(
        target("SELECT * FROM events WHERE id = 7 AND id > 5"),
        Target::Keys(vec![(3, lit("7"))])
    );
    assert_eq!(
        target("SELECT * FROM events WHERE id < 5 OR id = 200"),
        Target::Keys(vec![(3, range(vec![], vec![lit("5")])), (3, lit("200"))])
    );
    for sql in [
        "SELECT * FROM events WHERE id < 5 OR name = 'x'",
        "SELECT * FROM events WHERE id NOT BETWEEN 1 AND 5",
        "SELECT * FROM events WHERE id < now_ms()",
        "SELECT * FROM events WHERE id <> 5",
    ] {
        assert_eq!(target(sql), Target::All, "{sql}");
    }
}

#[test]
fn between_symmetric_is_not_read_as_bounds() {
    let r = analyze(
        "SELECT * FROM events WHERE id BETWEEN SYMMETRIC 250 AND 50",
        &rules(),
    );
    assert!(
        !matches!(&r, Ok(a) if matches!(&a.target, Target::Keys(_))),
        "{r:?}"
    );
}

#[test]
fn table_commands_are_read_as_the_selects_they_are() {
    let a = |sql: &str| analyze(sql, &rules()).unwrap();
    assert_eq!(a("TABLE users").target, Target::All);
    assert_eq!(a("TABLE users").kind, Kind::Read);
    assert_eq!(a("/* c */ table countries;").target, Target::Default);
    // Clauses after the name: merged, the shards running the rewrite where one is needed.
    let paged = a("TABLE ONLY users ORDER BY id LIMIT 2 OFFSET 3");
    let spec = paged.merge.unwrap().unwrap();
    assert_eq!((spec.limit, spec.offset), (Some(2), 3));
    assert_eq!(
        paged.shard_sql.as_deref(),
        Some("SELECT * FROM ONLY users ORDER BY id LIMIT 5")
    );
    assert_eq!(a("TABLE users; TABLE orders").statements, 2);
    // Not a TABLE command: the parser's error stays.
    assert!(matches!(
        analyze("SELEC 1 FROM users", &rules()),
        Err(AnalyzeError::Parse(_))
    ));
    assert!(matches!(
        analyze("TABLE", &rules()),
        Err(AnalyzeError::Parse(_))
    ));
}

#[test]
fn reference_writes_go_to_every_shard() {
    for sql in [
        "INSERT INTO countries VALUES ('fr', 'France')",
        "UPDATE countries SET name = 'x' WHERE code = 'fr'",
        "UPDATE countries c SET name = 'x' WHERE c.code = $1",
        "DELETE FROM countries WHERE code = 'fr'",
    ] {
        let a = analyze(sql, &rules()).unwrap();
        assert!(a.writes_reference, "{sql}");
        assert_eq!(a.target, Target::All, "{sql}");
    }
    // Read only: where the rest of the statement goes.
    for (sql, table) in [
        (
            "DELETE FROM orders USING countries WHERE orders.user_id = 3 AND countries.code = 'fr'",
            1,
        ),
        (
            "UPDATE users SET name = countries.name FROM countries WHERE users.id = 3",
            0,
        ),
    ] {
        let a = analyze(sql, &rules()).unwrap();
        assert!(!a.writes_reference, "{sql}");
        assert_eq!(a.target, Target::Keys(vec![(table, lit("3"))]), "{sql}");
    }
    assert!(
        matches!(analyze("UPDATE countries SET name = u.name FROM users u WHERE u.id = 1", &rules()), Err(AnalyzeError::Unroutable(m)) if m.contains("reference table countries"))
    );
    // A subquery: its rows, read first, are the same for every shard's copy.
    let sql = "DELETE FROM countries WHERE code IN (SELECT name FROM users)";
    assert!(evaluated_first(sql));
    assert!(
        analyze_evaluating_first(sql, &rules())
            .unwrap()
            .writes_reference
    );
}
#[test]
fn merge_statements() {
    // Into a reference table, from constants or other reference tables: every copy.
    let a = analyze(
        "MERGE INTO countries c USING (VALUES ('fr', 'France')) v(code, name) ON c.code = v.code WHEN MATCHED THEN UPDATE SET name = v.name WHEN NOT MATCHED THEN INSERT VALUES (v.code, v.name)",
        &rules(),
    )
    .unwrap();
    assert_eq!(
        (a.kind, a.target, a.writes_reference),
        (Kind::Write, Target::All, true)
    );
    for sql in [
        // Every shard would insert the rows it does not find.
        "MERGE INTO users u USING (VALUES (5, 'x')) v(id, name) ON u.id = v.id WHEN NOT MATCHED THEN INSERT (id, name) VALUES (v.id, v.name)",
        // Each copy would change by its own shard's rows.
        "MERGE INTO countries c USING users u ON c.name = u.name WHEN MATCHED THEN DELETE",
        "MERGE INTO countries c USING (SELECT name FROM users) u ON c.name = u.name WHEN MATCHED THEN DELETE",
    ] {
        assert!(
            matches!(analyze(sql, &rules()), Err(AnalyzeError::Unroutable(_))),
            "{sql}"
        );
    }
    // Neither sharded nor reference: where unsharded tables are.
    let a = analyze(
        "MERGE INTO plain_t p USING (VALUES (1)) v(id) ON p.id = v.id WHEN NOT MATCHED THEN INSERT VALUES (v.id)",
        &rules(),
    )
    .unwrap();
    assert_eq!((a.kind, a.target), (Kind::Write, Target::Default));
}
