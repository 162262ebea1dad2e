//! INSERT routing: the key of each VALUES row, rows whose keys the shards make
//! (`generate_keys`), and a multi-row INSERT ... VALUES whose rows belong to several shards
//! split into one INSERT per shard (each with its own rows, in their original order).

use super::analyze::{Collector, KeyRef, name_of, query, value_of};
use super::computed::{cast_type, evaluated, readable, with_default_key};
use super::{Params, RouteError, Router, Rules};
use sqlparser::ast::{Expr, SelectItem, SetExpr, Statement, TableObject};

/// Collects an INSERT's target: each VALUES row's key; rows whose keys the shards make
/// (`generate_keys`, the key left out or DEFAULT); or why its rows cannot be placed.
pub(super) fn insert(
    ins: &sqlparser::ast::Insert,
    rules: &Rules,
    c: &mut Collector,
) -> Result<(), String> {
    let TableObject::TableName(name) = &ins.table else {
        return Ok(());
    };
    let Some(n) = name_of(name) else {
        return Ok(());
    };
    if rules.is_reference(&n) {
        c.reference = true;
    }
    let Some(idx) = rules.table(&n) else {
        if let Some(src) = &ins.source {
            query(src, rules, c);
        }
        return Ok(());
    };
    let rule = &rules.tables[idx];
    let col = &rule.column;
    let pos = ins
        .columns
        .iter()
        .position(|cn| name_of(cn).as_deref() == Some(col.as_str()));
    let generated = rule.generate_keys;
    let missing = || {
        format!(
            "INSERT into sharded table {n} must give its shard key {col} (or set generate_keys on the table, so that the shards make keys)"
        )
    };
    let Some(src) = &ins.source else {
        // DEFAULT VALUES.
        if generated {
            c.any_shard = true;
            c.keyless.push(idx);
            return Ok(());
        }
        // As `(key) VALUES (DEFAULT)`: the key's default, evaluated by a server.
        let with_key = with_default_key(ins, col);
        c.insert_via = Some(evaluated(
            &with_key,
            rules,
            idx,
            0,
            &n,
            vec![None],
            vec![None],
        )?);
        c.seen.push(idx);
        return Ok(());
    };
    match (&*src.body, pos) {
        (SetExpr::Values(v), Some(pos)) => {
            let mut defaults = 0;
            // Keys a server must evaluate (see `ComputedKeys`): their expressions, None
            // for the column's default.
            let mut computed: Vec<Option<String>> = Vec::new();
            let mut rows: Vec<Option<KeyRef>> = Vec::with_capacity(v.rows.len());
            for row in &v.rows {
                match row.content.get(pos) {
                    Some(e) if generated && is_default(e) => defaults += 1,
                    Some(e) if is_default(e) => {
                        computed.push(None);
                        rows.push(None);
                    }
                    Some(e) => match value_of(e) {
                        Some(k) if readable(&k, rule) => rows.push(Some(k)),
                        // Text pgshard cannot read as the key's type: the server reads
                        // it as the column would.
                        Some(_) => {
                            computed.push(Some(format!("CAST(({e}) AS {})", cast_type(rule.ty))));
                            rows.push(None);
                        }
                        None => {
                            computed.push(Some(e.to_string()));
                            rows.push(None);
                        }
                    },
                    None => return Err(missing()),
                }
            }
            if !computed.is_empty() {
                if defaults > 0 {
                    return Err(format!(
                        "INSERT into sharded table {n} gives the shard key {col} in some rows and DEFAULT in others; send them as separate INSERTs"
                    ));
                }
                c.insert_via = Some(evaluated(ins, rules, idx, pos, &n, computed, rows)?);
                c.seen.push(idx);
                return Ok(());
            }
            // Every row's key is readable: routed by them (DEFAULT rows aside).
            c.keys.extend(rows.into_iter().flatten().map(|k| (idx, k)));
            if defaults == v.rows.len() {
                c.any_shard = true;
                c.keyless.push(idx);
            } else if defaults > 0 {
                return Err(format!(
                    "INSERT into sharded table {n} gives the shard key {col} in some rows and DEFAULT in others; send them as separate INSERTs"
                ));
            } else {
                c.seen.push(idx);
            }
        }
        // No column list: which value is the key depends on the table's columns, which
        // the session reads where the INSERT runs (with `generate_keys` too: the rows
        // may give their keys).
        (_, None) if ins.columns.is_empty() => {
            c.insert_via = Some(super::analyze::InsertVia {
                insert: Statement::Insert(ins.clone()),
                select_sql: String::new(),
                select: super::Analysis::of(super::Target::Default, super::Kind::Read),
                table: idx,
                key: 0,
                how: super::analyze::Via::Unlisted,
            });
            c.seen.push(idx);
        }
        (_, None) if generated => {
            // The rows' keys come from the shard they land on; a query that makes the rows
            // must then read nothing that lives on other shards.
            let mut source = Collector::default();
            query(src, rules, &mut source);
            if !source.seen.is_empty() || source.any_shard || source.error.is_some() {
                return Err(format!(
                    "INSERT ... SELECT into sharded table {n} reads sharded tables: pgshard runs it on one shard, which holds only part of their rows"
                ));
            }
            c.any_shard = true;
            c.keyless.push(idx);
        }
        // The key left out: each row's is the column's default, which a server evaluates
        // (the key is added to the columns, DEFAULT in each row).
        (SetExpr::Values(v), None) => {
            let with_key = with_default_key(ins, col);
            let key = with_key.columns.len() - 1;
            let rows = vec![None; v.rows.len()];
            let computed = vec![None; v.rows.len()];
            c.insert_via = Some(evaluated(&with_key, rules, idx, key, &n, computed, rows)?);
            c.seen.push(idx);
        }
        (body, Some(pos)) => {
            if let SetExpr::Select(sel) = body {
                match super::colocation::insert_source(sel, pos, idx, rules) {
                    // Each shard makes its new rows from its own rows of a co-located
                    // table: the statement runs as written on the shards the SELECT needs.
                    // The target is not "seen" here: its shards are the SELECT's.
                    Ok(Some(_)) if !super::nested::cross_row(src, rules) => {
                        query(src, rules, c);
                        c.insert_select = true;
                        return Ok(());
                    }
                    // A constant key and a SELECT that reads no sharded table: one row
                    // source, routed by the key like VALUES.
                    Ok(None) => {
                        let key = sel.projection.get(pos).and_then(|i| match i {
                            SelectItem::UnnamedExpr(e)
                            | SelectItem::ExprWithAlias { expr: e, .. } => value_of(e),
                            _ => None,
                        });
                        if let Some(k) = key {
                            let mut source = Collector::default();
                            query(src, rules, &mut source);
                            if source.seen.is_empty() {
                                c.keys.push((idx, k));
                                c.seen.push(idx);
                                query(src, rules, c);
                                c.insert_select = true;
                                return Ok(());
                            }
                        }
                    }
                    _ => {}
                }
            }
            // Otherwise only the rows' values tell their shards: pgshard reads them, then
            // inserts them split by key.
            c.insert_via = Some(via(ins, src, rules, idx, pos, &n)?);
            c.seen.push(idx);
        }
        (_, None) => {
            return Err(format!(
                "INSERT ... SELECT into sharded table {n} must name its columns (pgshard finds the shard key {col} by name)"
            ));
        }
    }
    Ok(())
}

/// An INSERT ... SELECT through pgshard: the SELECT must be a read pgshard can run (on one
/// shard, or merged over several).
fn via(
    ins: &sqlparser::ast::Insert,
    src: &sqlparser::ast::Query,
    rules: &Rules,
    table: usize,
    key: usize,
    n: &str,
) -> Result<super::analyze::InsertVia, String> {
    use super::analyze::{AnalyzeError, Kind, analyze};
    let select_sql = src.to_string();
    let select = analyze(&select_sql, rules).map_err(|e| match e {
        AnalyzeError::Parse(m) | AnalyzeError::Unroutable(m) => {
            format!("INSERT ... SELECT into sharded table {n}: {m}")
        }
    })?;
    if select.kind != Kind::Read {
        return Err(format!(
            "INSERT ... SELECT into sharded table {n}: its SELECT locks or writes rows, which pgshard does not run ahead of the INSERT"
        ));
    }
    Ok(super::analyze::InsertVia {
        insert: Statement::Insert(ins.clone()),
        select_sql,
        select,
        table,
        key,
        how: super::analyze::Via::Select,
    })
}

/// `DEFAULT` in a VALUES row.
fn is_default(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(id) if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default"))
}

/// What splitting needs: the statement, and the key of each VALUES row (in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertSplit {
    pub statement: Statement,
    /// (sharded table, key) per row.
    pub keys: Vec<(usize, KeyRef)>,
}

impl Router {
    /// One INSERT per shard, each with the rows whose key belongs there.
    pub fn split_insert(
        &self,
        split: &InsertSplit,
        params: &Params<'_>,
        zone: &crate::sharding::Zone,
    ) -> Result<SplitRows, RouteError> {
        let shard_of_row = split
            .keys
            .iter()
            .map(|(t, k)| self.shard_of_row(*t, k, params, zone))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(split_rows(&split.statement, &shard_of_row))
    }

    /// The shard of a row of sharded table `t` whose key is `k`.
    pub fn shard_of_row(
        &self,
        t: usize,
        k: &KeyRef,
        params: &Params<'_>,
        zone: &crate::sharding::Zone,
    ) -> Result<usize, RouteError> {
        let one = super::Analysis {
            inserts_sharded: true,
            ..super::Analysis::of(
                super::Target::Keys(vec![(t, k.clone())]),
                super::Kind::Write,
            )
        };
        Ok(match self.resolve(&one, params, zone)? {
            super::Route::Shards(v) => v[0],
            super::Route::Default | super::Route::Any => self.default_shard(),
        })
    }
}

/// An INSERT ... VALUES split over shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitRows {
    /// Each shard's INSERT, by shard.
    pub parts: Vec<(usize, String)>,
    /// The shard of each of the statement's rows, in order (RETURNING rows go back to the
    /// client in that order: `exec::scatter::in_row_order`).
    pub row_shards: Vec<usize>,
}

impl SplitRows {
    /// The shards of the parts, in order.
    pub fn shards(&self) -> Vec<usize> {
        self.parts.iter().map(|(s, _)| *s).collect()
    }
}

/// One INSERT ... VALUES per shard of `shard_of_row` (in order), each with that shard's
/// rows in their original order.
pub fn split_rows(statement: &Statement, shard_of_row: &[usize]) -> SplitRows {
    let mut shards: Vec<usize> = shard_of_row.to_vec();
    shards.sort_unstable();
    shards.dedup();
    let mut out = Vec::with_capacity(shards.len());
    for s in shards {
        let mut st = statement.clone();
        if let Statement::Insert(ins) = &mut st
            && let Some(src) = &mut ins.source
            && let SetExpr::Values(v) = &mut *src.body
        {
            let mut i = 0;
            v.rows.retain(|_| {
                let keep = shard_of_row.get(i) == Some(&s);
                i += 1;
                keep
            });
        }
        out.push((s, st.to_string()));
    }
    SplitRows {
        parts: out,
        row_shards: shard_of_row.to_vec(),
    }
}

/// Renumbers a statement's `$n` parameters from `$1` in order of first use: the new text
/// and, for each new parameter, the old one's 0-based index (a shard's part of a split
/// INSERT uses only its rows' parameters, and PostgreSQL refuses unused gaps).
pub fn renumber_params(sql: &str) -> Result<(String, Vec<usize>), String> {
    use super::lexer::{is_ident_char, skip_token};
    // The text is copied as it is but for the parameters (printing tokens back would
    // have to re-quote strings and identifiers exactly).
    let b = sql.as_bytes();
    let mut map: Vec<usize> = Vec::new();
    let mut out = String::with_capacity(sql.len());
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        let parameter = b[i] == b'$'
            && b.get(i + 1).is_some_and(u8::is_ascii_digit)
            && !(i > 0 && is_ident_char(b[i - 1]));
        if !parameter {
            i = match b[i] {
                b'\'' | b'"' | b'-' | b'/' | b'$' => skip_token(b, i),
                _ => i + 1,
            };
            continue;
        }
        let mut j = i + 1;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        let old = sql[i + 1..j]
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("bad parameter {}", &sql[i..j]))?
            - 1;
        let new = match map.iter().position(|&o| o == old) {
            Some(k) => k,
            None => {
                map.push(old);
                map.len() - 1
            }
        };
        out.push_str(&sql[copied..i]);
        out.push_str(&format!("${}", new + 1));
        (i, copied) = (j, j);
    }
    out.push_str(&sql[copied..]);
    Ok((out, map))
}

#[cfg(test)]
mod tests {
    use crate::config::DatabaseConfig;
    use crate::router::analyze::tests::{lit, rules, target};
    use crate::router::analyze::{AnalyzeError, Target, analyze};
    use crate::sharding::hash::{HashKey, partition_of};

    #[test]
    fn rows_whose_keys_the_shards_make_go_to_any_shard() {
        for sql in [
            "INSERT INTO tickets (title) VALUES ('a'), ('b') RETURNING id",
            "INSERT INTO tickets (id, title) VALUES (DEFAULT, $1)",
            "INSERT INTO tickets DEFAULT VALUES",
            "INSERT INTO tickets (title) SELECT 'x' || g FROM generate_series(1, 3) g",
            "INSERT INTO tickets (title) SELECT code FROM countries",
            "INSERT INTO tickets (title) VALUES ('a'); INSERT INTO tickets (title) VALUES ('b')",
        ] {
            assert_eq!(target(sql), Target::Any, "{sql}");
            assert!(analyze(sql, &rules()).unwrap().inserts_sharded, "{sql}");
        }
        // With a key it is routed by the key like any row; with other statements it goes
        // where they go.
        assert_eq!(
            target("INSERT INTO tickets (id, title) VALUES (5, 'a')"),
            Target::Keys(vec![(2, lit("5"))])
        );
        assert_eq!(
            target("INSERT INTO users (id) VALUES (1); INSERT INTO tickets (title) VALUES ('a')"),
            Target::Keys(vec![(0, lit("1"))])
        );
        assert_eq!(
            target("SELECT 1; INSERT INTO tickets (title) VALUES ('a')"),
            Target::Default
        );
        assert_eq!(target(""), Target::Default);
        for sql in [
            "INSERT INTO users (name) SELECT 'a'",
            "INSERT INTO tickets (title) SELECT name FROM users",
            "INSERT INTO tickets (id) VALUES (DEFAULT), (3)",
            "WITH x AS (INSERT INTO users (name) VALUES ('a') RETURNING id) SELECT * FROM x",
        ] {
            assert!(
                matches!(analyze(sql, &rules()), Err(AnalyzeError::Unroutable(_))),
                "{sql}"
            );
        }
    }

    #[test]
    fn insert_select_runs_where_the_rows_it_reads_are() {
        let a = |sql: &str| analyze(sql, &rules()).unwrap();
        // The new key is the key of a co-located table read: every shard the SELECT
        // needs, the statement as written.
        for (sql, t) in [
            (
                "INSERT INTO orders (user_id, total) SELECT id, score FROM users",
                Target::All,
            ),
            (
                "INSERT INTO orders (total, user_id) SELECT o.total * 2, o.user_id FROM orders o WHERE o.total > 5 RETURNING user_id",
                Target::All,
            ),
            (
                "INSERT INTO orders (user_id, total) SELECT u.id, 1 FROM users u WHERE u.id = 5 ON CONFLICT DO NOTHING",
                Target::Keys(vec![(0, lit("5"))]),
            ),
            (
                "INSERT INTO users (id, name) SELECT o.user_id, count(*) FROM orders o GROUP BY o.user_id",
                Target::All,
            ),
            // A constant key, and no sharded table read: routed by the key.
            (
                "INSERT INTO users (id, name) SELECT 7, 'x'",
                Target::Keys(vec![(0, lit("7"))]),
            ),
            (
                "INSERT INTO users (id, name) SELECT 7, name FROM countries",
                Target::Keys(vec![(0, lit("7"))]),
            ),
        ] {
            let an = a(sql);
            assert_eq!(an.target, t, "{sql}");
            assert!(an.insert_select && an.inserts_sharded, "{sql}");
            assert!(an.insert_split.is_none(), "{sql}");
        }
        // Otherwise pgshard reads the rows and inserts them split by key.
        for sql in [
            "INSERT INTO users (id, name) SELECT score, name FROM users",
            "INSERT INTO events (id) SELECT id FROM users",
            "INSERT INTO users (id) SELECT g FROM generate_series(1, 3) g",
            "INSERT INTO users (id, name) SELECT 5, name FROM users WHERE id = 7",
            "INSERT INTO users (id) SELECT * FROM orders",
            "INSERT INTO users (id) SELECT user_id FROM orders UNION SELECT id FROM users",
            "INSERT INTO users (id) SELECT DISTINCT user_id FROM orders",
            "INSERT INTO users (id) SELECT user_id FROM orders LIMIT 5",
            "INSERT INTO users (id, name) SELECT count(*), name FROM users GROUP BY name",
        ] {
            let an = a(sql);
            let via = an.insert_via.as_ref().unwrap_or_else(|| panic!("{sql}"));
            assert_eq!(an.target, Target::All, "{sql}");
            assert!(!an.insert_select && an.insert_split.is_none(), "{sql}");
            assert_eq!(via.select.kind, crate::router::Kind::Read, "{sql}");
        }
        // Columns not named: the session reads the table's.
        assert!(matches!(
            a("INSERT INTO users SELECT * FROM users")
                .insert_via
                .as_deref(),
            Some(crate::router::analyze::InsertVia {
                how: crate::router::analyze::Via::Unlisted,
                ..
            })
        ));
        for sql in [
            // A SELECT pgshard would refuse on its own, or one that locks rows.
            "INSERT INTO users (id) SELECT u.id FROM users u JOIN orders o ON o.total = u.score",
            "INSERT INTO users (id) SELECT score FROM users FOR UPDATE",
        ] {
            assert!(
                matches!(analyze(sql, &rules()), Err(AnalyzeError::Unroutable(_))),
                "{sql}: {:?}",
                analyze(sql, &rules()).map(|a| a.target)
            );
        }
    }

    #[test]
    fn parameters_are_renumbered_by_first_use() {
        let (sql, map) = super::renumber_params(
            "INSERT INTO t (id, n) VALUES ($3, '$9 stays'), ($4, $3) RETURNING $7",
        )
        .unwrap();
        assert_eq!(
            sql,
            "INSERT INTO t (id, n) VALUES ($1, '$9 stays'), ($2, $1) RETURNING $3"
        );
        assert_eq!(map, vec![2, 3, 6]);
        // Quotes, comments and identifiers as written.
        let (sql, map) = super::renumber_params(
            "SELECT 'it''s $2', E'\\'$1', $q$ $3 $q$, \"a$1\", x$2, /* $4 */ $5 -- $6\n",
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT 'it''s $2', E'\\'$1', $q$ $3 $q$, \"a$1\", x$2, /* $4 */ $1 -- $6\n"
        );
        assert_eq!(map, vec![4]);
    }

    #[test]
    fn rows_go_to_their_shards_in_order() {
        let cfg: DatabaseConfig = yaml_serde::from_str(
            "{ name: app, server_user: app, shards: [ { primary: '127.0.0.1:1' }, { primary: '127.0.0.1:2' } ], sharded_tables: [ { table: users, column: id, method: hash } ] }",
        )
        .unwrap();
        let r = crate::router::Router::new(&cfg);
        let keys: Vec<i64> = (1..=6).collect();
        let values: Vec<String> = keys.iter().map(|k| format!("({k}, 'n{k}')")).collect();
        let sql = format!(
            "INSERT INTO users (id, name) VALUES {} RETURNING id",
            values.join(", ")
        );
        let a = analyze(&sql, &r.rules).unwrap();
        let split = r
            .split_insert(
                a.insert_split.as_ref().unwrap(),
                &Default::default(),
                &crate::sharding::Zone::utc(),
            )
            .unwrap();
        let row_shards: Vec<usize> = keys
            .iter()
            .map(|k| partition_of(&HashKey::Int(*k), 2) as usize)
            .collect();
        assert_eq!(split.row_shards, row_shards);
        assert_eq!(split.parts.len(), 2);
        for (s, text) in split.parts {
            for k in &keys {
                let here = partition_of(&HashKey::Int(*k), 2) as usize == s;
                assert_eq!(text.contains(&format!("({k}, 'n{k}')")), here, "{text}");
            }
            assert!(text.ends_with("RETURNING id"), "{text}");
        }
    }
}
