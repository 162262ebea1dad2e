//! Merge plans of cross-shard SELECTs, from their analysis.

use super::*;
use crate::router::analyze::{analyze, tests::rules};

#[test]
fn groups_of_one_shard_and_distinct_keys() {
    let m = |sql: &str| analyze(sql, &rules()).unwrap().merge.unwrap();
    // Grouped by the shard key: shards compute whole groups, merged as rows.
    let spec = m(
        "SELECT id, count(DISTINCT name), string_agg(name, ','), avg(score) FROM users GROUP BY id HAVING count(*) > 0 ORDER BY 2 DESC LIMIT 3 OFFSET 1",
    )
    .unwrap();
    assert_eq!(spec.aggregates, None);
    assert_eq!(spec.having, None);
    assert_eq!((spec.limit, spec.offset), (Some(3), 1));
    let spec = m(
        "SELECT o.user_id, sum(total) FROM orders o GROUP BY o.user_id ORDER BY max(total) LIMIT 5",
    )
    .unwrap();
    assert_eq!(spec.hidden.len(), 1);
    assert_eq!(spec.order[0].col, OrderCol::Hidden(0));
    // count(DISTINCT key): the shards' counts add up.
    for sql in [
        "SELECT count(DISTINCT user_id) FROM orders",
        "SELECT total, count(DISTINCT o.user_id) FROM orders o GROUP BY total",
        "SELECT count(DISTINCT o.user_id), count(DISTINCT u.id) FROM users u JOIN orders o ON o.user_id = u.id",
    ] {
        let spec = m(sql).unwrap();
        let a = spec.aggregates.unwrap();
        assert_eq!(a.last(), Some(&Column::Count), "{sql}");
    }
    // count(DISTINCT x) of another column: shards return x, grouped by it too.
    let a = analyze(
        "SELECT total, count(DISTINCT name) AS n, count(*) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY total",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.unwrap().unwrap();
    assert_eq!(
        spec.aggregates,
        Some(vec![Column::Key, Column::DistinctCount, Column::Count])
    );
    assert_eq!(
        a.shard_sql.as_deref(),
        Some(
            "SELECT total, name AS n, count(*) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY total, name"
        )
    );
    assert_eq!(
        analyze("SELECT count(DISTINCT name) FROM users", &rules())
            .unwrap()
            .shard_sql
            .as_deref(),
        Some("SELECT name AS count FROM users GROUP BY name")
    );
    for sql in [
        "SELECT id, rank() OVER (ORDER BY count(*)) FROM users GROUP BY id",
        "SELECT id FROM users GROUP BY id ORDER BY rank() OVER (ORDER BY id)",
        "SELECT user_id, count(*) FROM orders GROUP BY ROLLUP (user_id)",
    ] {
        assert!(m(sql).is_err(), "{sql}");
    }
    // GROUP BY a column not selected: PostgreSQL finishes the groups.
    let spec = m("SELECT name, count(*) FROM users GROUP BY name, score ORDER BY 2").unwrap();
    assert!(spec.finalize.is_some());
    // Aggregates whose partial results do not combine: the shards' rows are gathered.
    for sql in [
        "SELECT count(DISTINCT name), count(DISTINCT score) FROM users",
        "SELECT count(DISTINCT name) FILTER (WHERE id > 3) FROM users",
        "SELECT sum(DISTINCT user_id) FROM orders",
    ] {
        let spec = m(sql).unwrap();
        assert!(
            spec.finalize.is_some() && spec.aggregates.is_none(),
            "{sql}"
        );
    }
}

#[test]
fn windows_partitioned_by_the_shard_key() {
    let m = |sql: &str| analyze(sql, &rules()).map(|a| a.merge.unwrap());
    for sql in [
        "SELECT id, user_id, row_number() OVER (PARTITION BY user_id ORDER BY id DESC) AS rn FROM orders ORDER BY rn, id LIMIT 5",
        "SELECT u.id, sum(o.total) OVER (PARTITION BY u.id) FROM users u JOIN orders o ON o.user_id = u.id",
        "SELECT user_id, count(*), rank() OVER (PARTITION BY user_id ORDER BY count(*)) FROM orders GROUP BY user_id",
        "SELECT id FROM orders ORDER BY row_number() OVER (PARTITION BY user_id ORDER BY id)",
    ] {
        let spec = m(sql).unwrap().unwrap();
        assert_eq!(spec.aggregates, None, "{sql}");
    }
    // In a derived table: the outer query's rows are each shard's.
    let a = analyze(
        "SELECT * FROM (SELECT id, user_id, row_number() OVER (PARTITION BY user_id ORDER BY id DESC) AS rn FROM orders) t WHERE rn = 1",
        &rules(),
    )
    .unwrap();
    assert!(!a.one_shard);
    assert!(a.merge.unwrap().unwrap().is_concatenation());
    // Other windows: PostgreSQL computes them over the shards' rows gathered.
    for (sql, shards, last) in [
        (
            "SELECT id, row_number() OVER (ORDER BY id) FROM orders",
            "SELECT id AS v0 FROM orders",
            "SELECT pgshard_m.v0 AS \"id\", row_number() OVER (ORDER BY pgshard_m.v0) AS \"row_number\" FROM ROWS FROM (pg_catalog.unnest($1)) AS pgshard_m(v0)",
        ),
        (
            "SELECT o.id, lag(total, 1) OVER (PARTITION BY o.total ORDER BY o.id) AS prev FROM orders o WHERE user_id > $1 ORDER BY prev DESC, 1 LIMIT $2",
            "SELECT o.id AS v0, total AS v1, o.total AS v2 FROM orders o WHERE user_id > $1 OFFSET (($2::BIGINT * 0))",
            "SELECT pgshard_m.v0 AS \"id\", lag(pgshard_m.v1, 1) OVER (PARTITION BY pgshard_m.v2 ORDER BY pgshard_m.v0) AS \"prev\" FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5)) AS pgshard_m(v0, v1, v2) ORDER BY prev DESC, 1",
        ),
        (
            "SELECT row_number() OVER () FROM users",
            "SELECT 1 AS v0 FROM users",
            "SELECT row_number() OVER () AS \"row_number\" FROM ROWS FROM (pg_catalog.unnest($1)) AS pgshard_m(v0)",
        ),
        (
            "SELECT id FROM orders ORDER BY row_number() OVER (ORDER BY id)",
            "SELECT id AS v0 FROM orders",
            "SELECT pgshard_m.v0 AS \"id\" FROM ROWS FROM (pg_catalog.unnest($1)) AS pgshard_m(v0) ORDER BY row_number() OVER (ORDER BY pgshard_m.v0)",
        ),
    ] {
        let spec = m(sql).unwrap().unwrap();
        let fin = spec.finalize.as_ref().unwrap_or_else(|| panic!("{sql}"));
        assert_eq!(fin.shard_sql, shards, "{sql}");
        assert_eq!(fin.sql, last, "{sql}");
    }
    // Windows over groups, `*`, subqueries: refused.
    for sql in [
        "SELECT total, count(*), rank() OVER (PARTITION BY total ORDER BY count(*)) FROM orders GROUP BY total",
        "SELECT id, rank() OVER (ORDER BY count(*)) FROM users GROUP BY id",
        "SELECT *, row_number() OVER (ORDER BY id) FROM orders",
        "SELECT id, row_number() OVER (ORDER BY (SELECT 1)) FROM orders",
    ] {
        assert!(!matches!(m(sql), Ok(Ok(_))), "{sql}");
    }
    // In a derived table: the outer query runs around the subquery's final query.
    let a = analyze(
        "SELECT * FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM orders) t WHERE rn = $1 LIMIT 5",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.unwrap().unwrap();
    let fin = spec.finalize.unwrap();
    assert_eq!(fin.shard_sql, "SELECT id AS v0 FROM orders");
    assert_eq!(
        fin.sql,
        "SELECT * FROM (SELECT pgshard_m.v0 AS \"id\", row_number() OVER (ORDER BY pgshard_m.v0) AS \"rn\" FROM ROWS FROM (pg_catalog.unnest($2)) AS pgshard_m(v0)) t WHERE rn = $1"
    );
    assert_eq!(
        fin.limit,
        Some(crate::router::merge::Count::Text("5".into()))
    );
    assert_eq!(
        (fin.params, fin.final_params.clone(), fin.final_only.clone()),
        (1, vec![0], vec![0])
    );
    assert!(
        analyze(
            "SELECT * FROM (SELECT id, rank() OVER (ORDER BY count(*)) FROM users GROUP BY id) t",
            &rules()
        )
        .is_err()
    );
}

#[test]
fn merge_specs() {
    let m = |sql: &str| analyze(sql, &rules()).unwrap().merge.unwrap();
    assert_eq!(
        m("SELECT id, name FROM users ORDER BY name DESC, 1 LIMIT 5").unwrap(),
        MergeSpec {
            order: vec![
                OrderKey {
                    col: OrderCol::Position(1),
                    desc: true,
                    nulls_first: true,
                    collation: None,
                },
                OrderKey {
                    col: OrderCol::Position(0),
                    desc: false,
                    nulls_first: false,
                    collation: None,
                },
            ],
            limit: Some(5),
            offset: 0,
            distinct: false,
            aggregates: None,
            hidden: Vec::new(),
            distinct_on: Vec::new(),
            having: None,
            avg: Vec::new(),
            distinct_arg: None,
            limit_param: None,
            offset_param: None,
            finalize: None,
            whole_groups: false,
        }
    );
    let a = analyze("SELECT id, avg(total) FROM orders GROUP BY id", &rules()).unwrap();
    assert_eq!(
        a.shard_sql.as_deref(),
        Some(
            "SELECT id, sum(total) AS avg, count(total) AS \"__pgshard_sort_0\" FROM orders GROUP BY id"
        )
    );
    assert_eq!(a.merge.unwrap().unwrap().avg, vec![(1, 2)]);
    // HAVING: every group comes back from the shards, the condition is applied after
    // merging, on hidden aggregate columns when they are not output columns.
    let a = analyze(
        "SELECT id FROM orders GROUP BY id HAVING count(*) > 2 AND sum(total) <= 10.5",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.clone().unwrap().unwrap();
    assert_eq!(
        spec.aggregates,
        Some(vec![Column::Key, Column::Count, Column::Sum])
    );
    assert_eq!(spec.hidden.len(), 2);
    assert_eq!(
        a.shard_sql.as_deref(),
        Some(
            "SELECT id, count(*) AS \"__pgshard_sort_0\", sum(total) AS \"__pgshard_sort_1\" FROM orders GROUP BY id"
        )
    );
    let row: Vec<Option<&[u8]>> = vec![Some(b"1"), Some(b"3"), Some(b"10.50")];
    assert_eq!(spec.having.as_ref().unwrap().eval(&row), Some(true));
    let row: Vec<Option<&[u8]>> = vec![Some(b"1"), Some(b"2"), Some(b"1")];
    assert_eq!(spec.having.as_ref().unwrap().eval(&row), Some(false));
    // A HAVING that compares aggregates: PostgreSQL finishes the groups.
    let spec = m("SELECT id FROM orders GROUP BY id HAVING sum(total) > avg(total)").unwrap();
    assert!(spec.finalize.is_some() && spec.having.is_none());
    // DISTINCT ON: sorted by its columns first, then the first row of each run kept.
    let d = m("SELECT DISTINCT ON (name) name, id FROM users ORDER BY name, id DESC").unwrap();
    assert_eq!(d.distinct_on, vec![0]);
    assert!(m("SELECT DISTINCT ON (name) name, id FROM users ORDER BY id").is_err());
    assert_eq!(
        m("SELECT DISTINCT ON (id) id, name FROM users")
            .unwrap()
            .order
            .len(),
        1
    );
    let a = m("SELECT total, count(*), sum(total) AS t, min(id), max(id) FROM orders GROUP BY total ORDER BY t DESC LIMIT 3").unwrap();
    assert_eq!(
        a.aggregates,
        Some(vec![
            Column::Key,
            Column::Count,
            Column::Sum,
            Column::Min,
            Column::Max
        ])
    );
    assert_eq!(a.limit, Some(3));
    assert_eq!(
        m("SELECT count(*) FROM users").unwrap().aggregates,
        Some(vec![Column::Count])
    );
    assert!(m("SELECT name, count(*) FROM users GROUP BY 1").is_ok());
    assert!(
        m("SELECT DISTINCT name FROM users ORDER BY name")
            .unwrap()
            .distinct
    );
    let a = analyze(
        "SELECT id FROM users ORDER BY id LIMIT 5 OFFSET 10",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.clone().unwrap().unwrap();
    assert_eq!((spec.limit, spec.offset), (Some(5), 10));
    assert_eq!(
        a.shard_sql.as_deref(),
        Some("SELECT id FROM users ORDER BY id LIMIT 15")
    );
    let a = analyze(
        "SELECT id FROM users u ORDER BY lower(u.name) DESC LIMIT 2",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.clone().unwrap().unwrap();
    assert_eq!(spec.order[0].col, OrderCol::Hidden(0));
    assert_eq!(
        a.shard_sql.as_deref(),
        Some(
            "SELECT id, lower(u.name) AS \"__pgshard_sort_0\" FROM users u ORDER BY lower(u.name) DESC LIMIT 2"
        )
    );
    // A bare name is an output column name first (found in the RowDescription), else an
    // input column (hidden); aliases resolve directly.
    let a = analyze(
        "SELECT u.id, name AS n FROM users u ORDER BY id, n",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.unwrap().unwrap();
    assert_eq!(spec.order[0].col, OrderCol::NameOr("id".into(), 0));
    assert_eq!(spec.order[1].col, OrderCol::Position(1));
    assert_eq!(
        m("SELECT lower(name) FROM users ORDER BY lower(name)")
            .unwrap()
            .order[0]
            .col,
        OrderCol::Position(0)
    );
    for bad in [
        "SELECT DISTINCT ON (lower(name)) name, id FROM users",
        "SELECT id FROM users LIMIT $1 + 1",
        "SELECT id FROM users INTERSECT SELECT user_id FROM orders",
        "SELECT id FROM users UNION ALL SELECT user_id FROM orders UNION SELECT 1",
        "SELECT count(*) FROM users UNION ALL SELECT count(*) FROM orders",
        "SELECT DISTINCT id FROM users UNION ALL SELECT user_id FROM orders",
        "SELECT id FROM users UNION ALL (SELECT user_id FROM orders LIMIT 1)",
        "SELECT id FROM users UNION SELECT id FROM users ORDER BY lower(name)",
    ] {
        let refused = analyze(bad, &rules()).map_or(true, |a| a.merge.unwrap().is_err());
        assert!(refused, "{bad}");
    }
    // Finished by PostgreSQL over the merged groups.
    for sql in [
        "SELECT id, sum(total) FROM orders GROUP BY id HAVING sum(total) > max(id)",
        "SELECT sum(total) FROM orders GROUP BY user_id + 1",
        "SELECT count(*)::int FROM users",
        "SELECT count(*) FROM users OFFSET 1",
        "SELECT 1 + max(id) FROM users",
    ] {
        assert!(m(sql).unwrap().finalize.is_some(), "{sql}");
    }
    // UNION: the shards' rows de-duplicated; UNION ALL: concatenated; ORDER BY and
    // LIMIT over the result.
    let u = m("SELECT id FROM users UNION SELECT user_id FROM orders ORDER BY 1 LIMIT 3").unwrap();
    assert!(u.distinct);
    assert_eq!(u.limit, Some(3));
    assert_eq!(u.order.len(), 1);
    let a = m("SELECT id FROM users UNION ALL (SELECT user_id FROM orders)").unwrap();
    assert!(a.is_concatenation());
    // A SELECT of no sharded table would come back from every shard.
    let e = m("SELECT id FROM users UNION ALL SELECT 7").unwrap_err();
    assert!(e.contains("once per shard"), "{e}");
    assert!(m("SELECT id FROM users UNION SELECT 7").unwrap().distinct);
}

#[test]
fn limit_and_offset_parameters() {
    let a = |sql: &str| analyze(sql, &rules()).unwrap();
    // LIMIT $1 alone: each shard returns up to $1 rows; the merge takes $1.
    let q = a("SELECT id FROM users ORDER BY id LIMIT $1");
    let spec = q.merge.clone().unwrap().unwrap();
    assert_eq!((spec.limit_param, spec.offset_param), (Some(0), None));
    assert_eq!(q.shard_sql, None);
    // With OFFSET: each shard returns limit + offset rows.
    for (sql, shard) in [
        (
            "SELECT id FROM users ORDER BY id LIMIT $1 OFFSET $2",
            "SELECT id FROM users ORDER BY id LIMIT ($1::BIGINT + $2::BIGINT)",
        ),
        (
            "SELECT id FROM users ORDER BY id LIMIT 5 OFFSET $1",
            "SELECT id FROM users ORDER BY id LIMIT (5::BIGINT + $1::BIGINT)",
        ),
        (
            "SELECT id FROM users ORDER BY id LIMIT $2 OFFSET 3",
            "SELECT id FROM users ORDER BY id LIMIT ($2::BIGINT + 3::BIGINT)",
        ),
        (
            "SELECT id FROM users ORDER BY id OFFSET $1",
            "SELECT id FROM users ORDER BY id OFFSET ($1::BIGINT * 0)",
        ),
    ] {
        assert_eq!(a(sql).shard_sql.as_deref(), Some(shard), "{sql}");
    }
    let spec = a("SELECT id FROM users ORDER BY id LIMIT $2 OFFSET $1")
        .merge
        .unwrap()
        .unwrap();
    let bound = spec.bound(|i| Ok([Some(7), Some(3)][i])).unwrap();
    assert_eq!((bound.limit, bound.offset), (Some(3), 7));
    assert_eq!((bound.limit_param, bound.offset_param), (None, None));
    // NULL: no limit; negative: PostgreSQL's errors.
    let none = spec.bound(|_| Ok(None)).unwrap();
    assert_eq!((none.limit, none.offset), (None, 0));
    assert_eq!(
        spec.bound(|i| Ok(Some(i as i64 - 1))).unwrap_err().0,
        "2201X"
    );
    assert_eq!(spec.bound(|_| Ok(Some(-1))).unwrap_err().0, "2201W");
    // Aggregates: every shard returns every group; OFFSET with them is the final
    // query's.
    assert_eq!(
        a("SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC LIMIT $1")
            .shard_sql
            .as_deref(),
        Some("SELECT name, count(*) FROM users GROUP BY name OFFSET ($1::BIGINT * 0)")
    );
    let spec = a("SELECT count(*) FROM users OFFSET $1")
        .merge
        .unwrap()
        .unwrap();
    assert_eq!(
        spec.finalize.unwrap().offset,
        Some(crate::router::merge::Count::Param(0))
    );
}

#[test]
fn groups_postgresql_finishes() {
    let a = analyze(
        "SELECT qty % 3 AS g, coalesce(sum(total), 0), round(avg(total), 2) AS mean FROM orders GROUP BY g HAVING max(total) > 2 * min(total) ORDER BY count(*) DESC, g LIMIT $1 OFFSET 2",
        &rules(),
    )
    .unwrap();
    let spec = a.merge.unwrap().unwrap();
    // The shards' partial aggregates: group keys, then each aggregate once (avg as a sum
    // and a hidden count), and the LIMIT parameter still used.
    assert_eq!(
        a.shard_sql.as_deref(),
        Some(
            "SELECT qty % 3 AS k0, sum(total) AS a0, sum(total) AS a1, max(total) AS a2, min(total) AS a3, count(*) AS a4, count(total) AS \"__pgshard_sort_0\" FROM orders GROUP BY qty % 3 OFFSET (($1::BIGINT * 0))"
        )
    );
    assert_eq!(
        spec.aggregates,
        Some(vec![
            Column::Key,
            Column::Sum,
            Column::Avg,
            Column::Max,
            Column::Min,
            Column::Count,
            Column::Count
        ])
    );
    let fin = spec.finalize.as_deref().unwrap();
    assert_eq!(
        fin.sql,
        "SELECT pgshard_m.k0 AS \"g\", coalesce(pgshard_m.a0, 0) AS \"coalesce\", round(pgshard_m.a1, 2) AS \"mean\" FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6), pg_catalog.unnest($7)) AS pgshard_m(k0, a0, a1, a2, a3, a4) WHERE pgshard_m.a2 > 2 * pgshard_m.a3 ORDER BY pgshard_m.a4 DESC, g"
    );
    assert_eq!(fin.text(), None);
    let bound = spec.bound(|_| Ok(Some(7))).unwrap();
    assert!(
        bound
            .finalize
            .unwrap()
            .text()
            .unwrap()
            .ends_with(" LIMIT 7 OFFSET 2")
    );
    assert!(spec.bound(|_| Ok(Some(-1))).is_err());
    // What the final query cannot read is refused.
    for sql in [
        "SELECT sum(total) / (SELECT 2) FROM orders",
        "SELECT qty, total - max(total) FROM orders GROUP BY qty",
        "SELECT qty, count(*) FROM orders GROUP BY ROLLUP (qty)",
        "SELECT qty, string_agg(name, (SELECT ',')) FROM orders GROUP BY qty",
    ] {
        let m = analyze(sql, &rules()).unwrap().merge.unwrap();
        assert!(m.is_err(), "{sql}: {m:?}");
    }
    // The client's parameters keep their numbers in the final query; those only it uses
    // go to the shards as NULL text.
    let a = analyze(
        "SELECT qty, coalesce(sum(total), $2) FROM orders WHERE user_id > $1 GROUP BY qty HAVING sum(total) > $3 AND max(qty) > $1",
        &rules(),
    )
    .unwrap();
    let fin = a.merge.unwrap().unwrap().finalize.unwrap();
    assert_eq!(fin.params, 3);
    assert_eq!(fin.final_params, vec![0, 1, 2]);
    assert_eq!(fin.final_only, vec![1, 2]);
    assert!(fin.sql.contains("unnest($4)"), "{}", fin.sql);
    // Aggregates whose partial results do not combine: each shard returns the group keys
    // and the columns the aggregates read, and the final query aggregates them.
    let a = analyze(
        "SELECT qty, string_agg(id::text, ',' ORDER BY o.total) FILTER (WHERE id > 2) || '' AS s, avg(DISTINCT total) FROM orders o WHERE user_id > 5 GROUP BY qty HAVING count(*) > 1 ORDER BY s",
        &rules(),
    )
    .unwrap();
    assert_eq!(
        a.shard_sql.as_deref(),
        Some(
            "SELECT qty AS k0, id AS v0, o.total AS v1, total AS v2 FROM orders o WHERE user_id > 5"
        )
    );
    let spec = a.merge.unwrap().unwrap();
    assert_eq!(spec.aggregates, None);
    assert_eq!(
        spec.finalize.unwrap().sql,
        "SELECT pgshard_m.k0 AS \"qty\", string_agg(pgshard_m.v0::TEXT, ',' ORDER BY pgshard_m.v1) FILTER (WHERE pgshard_m.v0 > 2) || '' AS \"s\", avg(DISTINCT pgshard_m.v2) AS \"avg\" FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4)) AS pgshard_m(k0, v0, v1, v2) GROUP BY pgshard_m.k0 HAVING count(*) > 1 ORDER BY s"
    );
}

#[test]
fn output_names_are_postgresqls() {
    let name = |sql: &str| {
        let stmts = sqlparser::parser::Parser::parse_sql(
            &sqlparser::dialect::PostgreSqlDialect {},
            &format!("SELECT {sql}"),
        )
        .unwrap();
        let sqlparser::ast::Statement::Query(q) = &stmts[0] else {
            panic!()
        };
        let SetExpr::Select(s) = &*q.body else {
            panic!()
        };
        let sqlparser::ast::SelectItem::UnnamedExpr(e) = &s.projection[0] else {
            panic!()
        };
        colname::column_name(e).0
    };
    for (e, n) in [
        ("sum(x)", "sum"),
        ("t.x", "x"),
        ("\"Mixed\"", "Mixed"),
        ("count(*)::int", "count"),
        ("(max(a) - min(a))::bigint", "int8"),
        ("1 + 2", "?column?"),
        ("CASE WHEN x THEN 1 END", "case"),
        ("CASE WHEN x THEN 1 ELSE y END", "y"),
        ("max(a) - min(a)", "?column?"),
        ("5::float", "float8"),
        ("'a'::varchar(3)", "varchar"),
        ("(count(*))", "count"),
        ("extract(epoch FROM x)", "extract"),
    ] {
        assert_eq!(name(e), n, "{e}");
    }
}

#[test]
fn fetch_first_is_a_limit() {
    let a = |sql: &str| analyze(sql, &rules()).unwrap();
    let spec = a("SELECT id FROM users ORDER BY id OFFSET 3 ROWS FETCH FIRST ROW ONLY")
        .merge
        .unwrap()
        .unwrap();
    assert_eq!((spec.limit, spec.offset), (Some(1), 3));
    // The shards run it as the LIMIT it is, the offset applied after merging.
    let shards = a("SELECT id FROM users ORDER BY id OFFSET 3 ROWS FETCH FIRST 2 ROWS ONLY");
    assert_eq!(
        shards.shard_sql.as_deref(),
        Some("SELECT id FROM users ORDER BY id LIMIT 5")
    );
    let spec = a("SELECT id FROM users ORDER BY id FETCH NEXT $1 ROWS ONLY")
        .merge
        .unwrap()
        .unwrap();
    assert_eq!(spec.limit_param, Some(0));
    for sql in [
        "SELECT id FROM users ORDER BY id FETCH FIRST 2 ROWS WITH TIES",
        "SELECT id FROM users ORDER BY id FETCH FIRST 10 PERCENT ROWS ONLY",
    ] {
        assert!(a(sql).merge.unwrap().is_err(), "{sql}");
    }
}
