//! INSERT routing: the key of each VALUES row, rows whose keys the shards make
//! (`generate_keys`), and a multi-row INSERT ... VALUES whose rows belong to several shards
//! split into one INSERT per shard (each with its own rows, in their original order).

use super::analyze::{Collector, KeyRef, name_of, query, value_of};
use super::{Params, RouteError, Router, Rules};
use sqlparser::ast::{Expr, SetExpr, Statement, TableObject};

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
        return if generated {
            c.any_shard = true;
            c.keyless.push(idx);
            Ok(())
        } else {
            Err(missing())
        };
    };
    match (&*src.body, pos) {
        (SetExpr::Values(v), Some(pos)) => {
            let mut defaults = 0;
            for row in &v.rows {
                match row.content.get(pos) {
                    Some(e) if generated && is_default(e) => defaults += 1,
                    e => match e.and_then(value_of) {
                        Some(k) => c.keys.push((idx, k)),
                        // A computed key: we cannot tell its shard.
                        None => {
                            return Err(format!(
                                "cannot route INSERT into sharded table {n}: its shard key {col} must be a literal or a parameter"
                            ));
                        }
                    },
                }
            }
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
        (SetExpr::Values(_), None) if ins.columns.is_empty() => {
            return Err(format!(
                "INSERT into sharded table {n} must name its columns (pgshard finds the shard key {col} by name)"
            ));
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
        (SetExpr::Values(_), None) => return Err(missing()),
        _ => {
            // The new rows' keys come out of a query: their shards are unknown here, and
            // routing by the query's own keys would put rows on the wrong shard.
            return Err(format!(
                "INSERT ... SELECT into sharded table {n} is not supported: pgshard cannot tell the shards of the new rows; use INSERT ... VALUES"
            ));
        }
    }
    Ok(())
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
    ) -> Result<Vec<(usize, String)>, RouteError> {
        let mut shard_of_row = Vec::with_capacity(split.keys.len());
        for (t, k) in &split.keys {
            let one = super::Analysis {
                target: super::Target::Keys(vec![(*t, k.clone())]),
                kind: super::Kind::Write,
                key_update: None,
                writes_reference: false,
                statements: 1,
                merge: None,
                shard_sql: None,
                inserts_sharded: true,
                insert_split: None,
                replica_safe: false,
                one_shard: false,
                keyless: Vec::new(),
            };
            match self.resolve(&one, params)? {
                super::Route::Shards(v) => shard_of_row.push(v[0]),
                super::Route::Default | super::Route::Any => {
                    shard_of_row.push(self.default_shard())
                }
            }
        }
        let mut shards: Vec<usize> = shard_of_row.clone();
        shards.sort_unstable();
        shards.dedup();
        let mut out = Vec::with_capacity(shards.len());
        for s in shards {
            let mut st = split.statement.clone();
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
        Ok(out)
    }
}

/// Renumbers a statement's `$n` parameters from `$1` in order of first use: the new text
/// and, for each new parameter, the old one's 0-based index (a shard's part of a split
/// INSERT uses only its rows' parameters, and PostgreSQL refuses unused gaps).
pub fn renumber_params(sql: &str) -> Result<(String, Vec<usize>), String> {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|e| e.to_string())?;
    let mut map: Vec<usize> = Vec::new();
    let mut out = String::with_capacity(sql.len());
    for t in tokens {
        match &t {
            Token::Placeholder(p) if p.len() > 1 && p.starts_with('$') => {
                let old: usize = p[1..]
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("bad parameter {p}"))?
                    - 1;
                let new = match map.iter().position(|&o| o == old) {
                    Some(k) => k,
                    None => {
                        map.push(old);
                        map.len() - 1
                    }
                };
                out.push_str(&format!("${}", new + 1));
            }
            other => out.push_str(&other.to_string()),
        }
    }
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
            "INSERT INTO users (name) VALUES ('a')",
            "INSERT INTO users DEFAULT VALUES",
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
        let parts = r
            .split_insert(a.insert_split.as_ref().unwrap(), &Default::default())
            .unwrap();
        assert_eq!(parts.len(), 2);
        for (s, text) in parts {
            for k in &keys {
                let here = partition_of(&HashKey::Int(*k), 2) as usize == s;
                assert_eq!(text.contains(&format!("({k}, 'n{k}')")), here, "{text}");
            }
            assert!(text.ends_with("RETURNING id"), "{text}");
        }
    }
}
