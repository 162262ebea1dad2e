//! Splitting a multi-row INSERT ... VALUES whose rows belong to several shards into one
//! INSERT per shard (each with its own rows, in their original order).

use super::analyze::KeyRef;
use super::{Params, RouteError, Router};
use sqlparser::ast::{SetExpr, Statement};

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

    use crate::config::DatabaseConfig;
    use crate::router::analyze::analyze;
    use crate::sharding::hash::{HashKey, partition_of};

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
