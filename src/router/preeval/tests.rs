use super::*;
use crate::router::analyze::tests::{lit, rules};
use crate::router::analyze::{Target, analyze, analyze_evaluating_first};

fn pre(sql: &str) -> std::sync::Arc<PreEval> {
    analyze_evaluating_first(sql, &rules())
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .pre_eval
        .unwrap_or_else(|| panic!("{sql}: no subquery evaluated first"))
}

fn answer(types: &[&str], rows: &[&[Option<&str>]]) -> Answer {
    Answer {
        types: types.iter().map(|t| t.to_string()).collect(),
        rows: rows
            .iter()
            .map(|r| r.iter().map(|v| v.map(str::to_string)).collect())
            .collect(),
    }
}

#[test]
fn subqueries_the_shards_cannot_answer_alone_are_evaluated_first() {
    let p = pre("SELECT * FROM users WHERE score > (SELECT avg(score) FROM users)");
    assert!(p.refused.is_some());
    assert_eq!(
        p.subqueries.iter().map(|s| &s.sql[..]).collect::<Vec<_>>(),
        ["SELECT avg(score) FROM users"]
    );
    assert_eq!(
        p.substitute(&[answer(&["numeric"], &[&[Some("2.5")]])])
            .unwrap(),
        "SELECT * FROM users WHERE score > ($pgshard$2.5$pgshard$::NUMERIC)"
    );
    // No row: NULL of the column's type.
    assert_eq!(
        p.substitute(&[answer(&["numeric"], &[])]).unwrap(),
        "SELECT * FROM users WHERE score > (NULL::NUMERIC)"
    );
    // PostgreSQL's errors for what a scalar subquery may not return.
    let e = p
        .substitute(&[answer(&["integer"], &[&[Some("1")], &[Some("2")]])])
        .unwrap_err();
    assert_eq!(e.code, "21000");
    let e = p
        .substitute(&[answer(&["integer", "text"], &[&[Some("1"), None]])])
        .unwrap_err();
    assert_eq!(e.code, "42601");
}

#[test]
fn in_lists_of_keys_route_to_their_shards() {
    // events is range-sharded: not co-located with users.
    let sql =
        "SELECT name FROM users WHERE id IN (SELECT id FROM events WHERE kind = 'x') ORDER BY name";
    let p = pre(sql);
    assert_eq!(
        p.subqueries[0].sql,
        "SELECT id FROM events WHERE kind = 'x'"
    );
    let out = p
        .substitute(&[answer(&["bigint"], &[&[Some("3")], &[Some("7")], &[None]])])
        .unwrap();
    assert_eq!(
        out,
        "SELECT name FROM users WHERE id IN ($pgshard$3$pgshard$::BIGINT, $pgshard$7$pgshard$::BIGINT, NULL::BIGINT) ORDER BY name"
    );
    match analyze(&out, &rules()).unwrap().target {
        Target::Keys(k) => assert_eq!(k[..2], [(0, lit("3")), (0, lit("7"))]),
        t => panic!("{t:?}"),
    }
    // Nothing is IN an empty set; everything is NOT IN one.
    assert_eq!(
        p.substitute(&[answer(&["bigint"], &[])]).unwrap(),
        "SELECT name FROM users WHERE false ORDER BY name"
    );
    let p = pre("DELETE FROM users WHERE id NOT IN (SELECT id FROM events)");
    assert_eq!(
        p.substitute(&[answer(&["bigint"], &[])]).unwrap(),
        "DELETE FROM users WHERE true"
    );
}

#[test]
fn rows_exists_and_comparisons() {
    let p = pre(
        "SELECT * FROM users WHERE (id, name) IN (SELECT id, kind FROM events) AND EXISTS (SELECT 1 FROM events WHERE kind = 'y') AND score > ALL (SELECT score FROM events)",
    );
    assert_eq!(
        p.subqueries.iter().map(|s| &s.sql[..]).collect::<Vec<_>>(),
        [
            "SELECT id, kind FROM events",
            "SELECT 1 FROM events WHERE kind = 'y' LIMIT 1",
            "SELECT score FROM events",
        ]
    );
    let out = p
        .substitute(&[
            answer(&["bigint", "text"], &[&[Some("1"), Some("it's $pgshard$")]]),
            answer(&["integer"], &[]),
            answer(&["integer"], &[&[Some("4")]]),
        ])
        .unwrap();
    assert_eq!(
        out,
        "SELECT * FROM users WHERE (id, name) IN (SELECT * FROM (VALUES ($pgshard$1$pgshard$::BIGINT, $pgshard_$it's $pgshard$$pgshard_$::TEXT)) AS pgshard_rows) AND false AND score > ALL(SELECT * FROM (VALUES ($pgshard$4$pgshard$::INTEGER)) AS pgshard_rows)"
    );
    let out = p
        .substitute(&[
            answer(&["bigint", "text"], &[]),
            answer(&["integer"], &[&[Some("1")]]),
            answer(&["integer"], &[]),
        ])
        .unwrap();
    assert_eq!(
        out,
        "SELECT * FROM users WHERE false AND true AND score > ALL(SELECT NULL::INTEGER WHERE false)"
    );
    let e = p
        .substitute(&[
            answer(&["bigint"], &[&[Some("1")]]),
            answer(&["integer"], &[]),
            answer(&["integer"], &[]),
        ])
        .unwrap_err();
    assert_eq!(
        (e.code, &e.message[..]),
        ("42601", "subquery has too few columns")
    );
}

#[test]
fn what_is_not_evaluated_first() {
    for sql in [
        // The shards answer these alone.
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 5)",
        "SELECT * FROM users u WHERE score > (SELECT avg(total) FROM orders o WHERE o.user_id = u.id)",
        "SELECT * FROM users WHERE name IN (SELECT name FROM countries)",
        // Correlated (the alias hides the table's name: `orders` is the outer one).
        "SELECT * FROM orders WHERE total > (SELECT avg(o.total) FROM orders o WHERE o.user_id = orders.user_id)",
        "SELECT count(*) FROM users",
    ] {
        let a = analyze_evaluating_first(sql, &rules()).unwrap();
        assert!(a.pre_eval.is_none(), "{sql}");
    }
    // Correlated other than by the key: still refused.
    assert!(
        analyze_evaluating_first(
            "SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM events e WHERE e.kind = u.name)",
            &rules()
        )
        .is_err()
    );
    // A subquery naming its key is right on its shard: evaluated first only when the
    // statement needs other shards too.
    let p = pre("SELECT * FROM users WHERE score > (SELECT avg(score) FROM users WHERE id = 3)");
    assert!(p.refused.is_none());
    // The evaluated subquery's own subqueries are its own.
    let p = pre(
        "SELECT * FROM users WHERE id IN (SELECT id FROM events WHERE score > (SELECT avg(score) FROM events))",
    );
    assert_eq!(p.subqueries.len(), 1);
}

#[test]
fn type_names_read_back() {
    for oid in [16, 20, 1043, 1114, 1184, 1186, 1700, 1007, 1185, 3802] {
        let ty = builtin_type(oid).unwrap();
        assert!(data_type(ty).is_ok(), "{ty}");
    }
    assert!(data_type("public.\"My Type\"[]").is_ok());
    assert_eq!(builtin_type(1560), None);
    assert_eq!(builtin_type(2249), None);
}

#[test]
fn output_columns_keep_their_names() {
    let p = pre(
        "SELECT (SELECT count(*) FROM users), EXISTS (SELECT 1 FROM orders), ((SELECT max(score) AS \"Top\" FROM users)), (SELECT min(id) FROM users) AS m FROM countries",
    );
    assert_eq!(
        p.substitute(&[
            answer(&["bigint"], &[&[Some("5")]]),
            answer(&["integer"], &[]),
            answer(&["numeric"], &[&[None]]),
            answer(&["bigint"], &[&[Some("1")]]),
        ])
        .unwrap(),
        "SELECT ($pgshard$5$pgshard$::BIGINT) AS \"count\", false AS \"exists\", ((NULL::NUMERIC)) AS \"Top\", ($pgshard$1$pgshard$::BIGINT) AS m FROM countries"
    );
}

#[test]
fn explain_shows_the_statement_with_the_answers() {
    let p =
        pre("EXPLAIN (COSTS OFF) SELECT * FROM users WHERE score > (SELECT avg(score) FROM users)");
    assert_eq!(
        p.substitute(&[answer(&["numeric"], &[&[Some("1")]])])
            .unwrap(),
        "EXPLAIN (COSTS OFF) SELECT * FROM users WHERE score > ($pgshard$1$pgshard$::NUMERIC)"
    );
}

#[test]
fn inserts_get_their_keys_and_rows_from_answers() {
    let p = pre("INSERT INTO users (id, name) VALUES ((SELECT max(id) + 1 FROM users), 'next')");
    let out = p
        .substitute(&[answer(&["bigint"], &[&[Some("201")]])])
        .unwrap();
    assert_eq!(
        out,
        "INSERT INTO users (id, name) VALUES (($pgshard$201$pgshard$::BIGINT), 'next')"
    );
    assert_eq!(
        analyze(&out, &rules()).unwrap().target,
        Target::Keys(vec![(0, lit("201"))])
    );
    let p = pre(
        "INSERT INTO orders (id, user_id, total) SELECT id, id, score FROM users WHERE score > (SELECT avg(score) FROM users)",
    );
    assert_eq!(p.subqueries[0].sql, "SELECT avg(score) FROM users");
}

#[test]
fn constants_read_back_whatever_they_hold() {
    let p = pre("SELECT * FROM users WHERE name IN (SELECT name FROM users WHERE score > 1)");
    for v in [
        "a$pgshard$b",
        "$pgshard_$$pgshard$",
        "it's",
        "back\\slash",
        "$",
        "",
    ] {
        let out = p.substitute(&[answer(&["text"], &[&[Some(v)]])]).unwrap();
        let st =
            sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, &out)
                .unwrap_or_else(|e| panic!("{out}: {e}"));
        assert_eq!(st[0].to_string(), out);
        let mut found = None;
        let _ = sqlparser::ast::visit_expressions(&st, |e| {
            if let Expr::Value(x) = e
                && let Value::DollarQuotedString(d) = &x.value
            {
                found = Some(d.value.clone());
            }
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(found.as_deref(), Some(v), "{out}");
    }
}

#[test]
fn the_innermost_subqueries_when_the_rest_runs_on_the_shards() {
    // The IN is co-located (orders by user_id): only the average is evaluated first.
    let p = pre(
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > (SELECT avg(total) FROM orders))",
    );
    assert_eq!(
        p.subqueries.iter().map(|s| &s.sql[..]).collect::<Vec<_>>(),
        ["SELECT avg(total) FROM orders"]
    );
    assert_eq!(
        p.substitute(&[answer(&["numeric"], &[&[Some("4.5")]])])
            .unwrap(),
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > ($pgshard$4.5$pgshard$::NUMERIC))"
    );
    // Not co-located: the outermost, with its own subquery.
    let p = pre(
        "SELECT * FROM users WHERE id = ANY (SELECT id FROM events WHERE score > ALL (SELECT score FROM events WHERE kind = 'x')) AND name IN (SELECT kind FROM events)",
    );
    assert_eq!(
        p.subqueries.iter().map(|s| &s.sql[..]).collect::<Vec<_>>(),
        [
            "SELECT id FROM events WHERE score > ALL(SELECT score FROM events WHERE kind = 'x')",
            "SELECT kind FROM events",
        ]
    );
    assert_eq!(
        p.substitute(&[
            answer(&["integer"], &[&[Some("1")]]),
            answer(&["text"], &[&[Some("k")]]),
        ])
        .unwrap(),
        "SELECT * FROM users WHERE id = ANY(SELECT * FROM (VALUES ($pgshard$1$pgshard$::INTEGER)) AS pgshard_rows) AND name IN ($pgshard$k$pgshard$::TEXT)"
    );
    // A comparison's rows before another subquery: each answer in its own place.
    let p = pre(
        "SELECT * FROM users WHERE score > ALL (SELECT score FROM events) AND name IN (SELECT kind FROM events) AND EXISTS (SELECT 1 FROM events)",
    );
    assert_eq!(
        p.substitute(&[
            answer(&["integer"], &[&[Some("3")]]),
            answer(&["text"], &[&[Some("k")]]),
            answer(&["integer"], &[]),
        ])
        .unwrap(),
        "SELECT * FROM users WHERE score > ALL(SELECT * FROM (VALUES ($pgshard$3$pgshard$::INTEGER)) AS pgshard_rows) AND name IN ($pgshard$k$pgshard$::TEXT) AND false"
    );
}
