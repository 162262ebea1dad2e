//! INSERT ... SELECT into a sharded table whose new rows' shards only their values tell
//! (`generate_series`, another table's non-key column, a merge over shards): pgshard runs
//! the SELECT in the client's transaction, then inserts its rows as VALUES, split per
//! shard by key, in the same transaction (two-phase commit over the shards).

use super::cross::Multi;
use super::{Session, SessionError};
use crate::protocol::PgError;
use crate::router::analyze::{Analysis, InsertVia};
use crate::router::{KeyRef, Route};
use bytes::BytesMut;
use sqlparser::ast::{Expr, SetExpr, Statement, Value};

impl Session {
    /// Carries out an INSERT ... SELECT through pgshard inside the current transaction:
    /// the answer for the client (None when a server connection was lost).
    pub(super) async fn insert_via_out(
        &mut self,
        sql: &str,
        via: &InsertVia,
        a: &Analysis,
    ) -> Result<Option<BytesMut>, SessionError> {
        let fail = |s: &mut Session, e: PgError| {
            s.status = b'E';
            let mut f = BytesMut::new();
            e.write(&mut f);
            Ok(Some(f))
        };
        // First the INSERT with none of its rows, on one shard: PostgreSQL checks it as
        // written (column types, counts, names), so that what it would refuse is refused,
        // with its own error; and with no rows this is the answer (its tag, and
        // RETURNING's description).
        let none = match empty_insert(via) {
            Ok(s) => s,
            Err(e) => return fail(self, PgError::new("XX000", e)),
        };
        let home = self.home_shard();
        if !self.enter_shard(home).await? {
            self.status = b'E';
            return Ok(Some(BytesMut::new()));
        }
        let checked = match self.run_here(&none).await? {
            Some(frames) => frames,
            None => return Ok(None),
        };
        if self.status == b'E' {
            return Ok(Some(BytesMut::from(&checked.concat()[..])));
        }
        // The rows, read in this transaction (they see its own writes).
        let read = match self.db.router.resolve(&via.select, &Default::default()) {
            Ok(Route::Shards(v)) => v,
            Ok(Route::Default | Route::Any) => vec![self.home_shard()],
            Err(e) => return fail(self, PgError::new(e.sqlstate(), e.to_string())),
        };
        let out = if let [s] = read[..] {
            if !self.enter_shard(s).await? {
                self.status = b'E';
                return Ok(Some(BytesMut::new()));
            }
            match self.run_here(&via.select_sql).await? {
                Some(frames) => BytesMut::from(&frames.concat()[..]),
                None => return Ok(None),
            }
        } else {
            let spec = match &via.select.merge {
                Some(Ok(spec)) => spec.clone(),
                Some(Err(why)) => return fail(self, PgError::new("0A000", why.clone())),
                None => {
                    return fail(
                        self,
                        PgError::new("0A000", "this SELECT over several shards cannot be merged"),
                    );
                }
            };
            let plan = Multi::Merge(spec);
            match Box::pin(self.multi_tx_out(&via.select_sql, &read, &plan, &via.select)).await? {
                Some(out) => out,
                None => return Ok(None),
            }
        };
        let mut rows: Vec<Vec<Option<String>>> = Vec::new();
        for f in frames(&out) {
            match f[0] {
                b'E' => {
                    self.status = b'E';
                    return Ok(Some(BytesMut::from(f)));
                }
                b'D' => rows.push(
                    crate::exec::merge::fields(f)
                        .into_iter()
                        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                ),
                _ => {}
            }
        }
        let (statement, keys) = match with_rows(via, &rows) {
            Ok(x) => x,
            Err(e) => return fail(self, PgError::new("XX000", e)),
        };
        let Some(statement) = statement else {
            return Ok(Some(BytesMut::from(&checked.concat()[..])));
        };
        let split = crate::router::insert::InsertSplit { statement, keys };
        let parts = match self.db.router.split_insert(&split, &Default::default()) {
            Ok(p) => p,
            Err(e) => return fail(self, PgError::new(e.sqlstate(), e.to_string())),
        };
        let shards: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
        let plan = Multi::SplitInsert(parts);
        Box::pin(self.multi_tx_out(sql, &shards, &plan, a)).await
    }
}

/// The frames of a buffer of whole messages.
fn frames(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        let len = b.get(i + 1..i + 5)?;
        let end = i + 1 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let f = b.get(i..end)?;
        i = end;
        Some(f)
    })
}

/// The INSERT with the rows as its VALUES (their text as literals, which PostgreSQL
/// converts to the columns' types), and each row's key; None when there are no rows.
#[allow(clippy::type_complexity)]
fn with_rows(
    via: &InsertVia,
    rows: &[Vec<Option<String>>],
) -> Result<(Option<Statement>, Vec<(usize, KeyRef)>), String> {
    if rows.is_empty() {
        return Ok((None, Vec::new()));
    }
    let mut values = parse_query("VALUES (NULL)")?;
    let SetExpr::Values(v) = &mut *values.body else {
        return Err("VALUES template".into());
    };
    let template = v.rows.pop().ok_or("VALUES template row")?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in rows {
        keys.push((
            via.table,
            match r.get(via.key).cloned().flatten() {
                Some(k) => KeyRef::Literal(k),
                None => KeyRef::Null,
            },
        ));
        let mut row = template.clone();
        row.content = r
            .iter()
            .map(|x| match x {
                Some(s) => Expr::value(Value::SingleQuotedString(s.clone())),
                None => Expr::value(Value::Null),
            })
            .collect();
        v.rows.push(row);
    }
    let mut st = via.insert.clone();
    if let Statement::Insert(ins) = &mut st {
        ins.source = Some(Box::new(values));
    }
    Ok((Some(st), keys))
}

/// The INSERT reading no row of its SELECT.
fn empty_insert(via: &InsertVia) -> Result<String, String> {
    let none = parse_query(&format!(
        "SELECT * FROM ({}) AS pgshard_rows LIMIT 0",
        via.select_sql
    ))?;
    let mut st = via.insert.clone();
    if let Statement::Insert(ins) = &mut st {
        ins.source = Some(Box::new(none));
    }
    Ok(st.to_string())
}

fn parse_query(sql: &str) -> Result<sqlparser::ast::Query, String> {
    let mut st =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .map_err(|e| e.to_string())?;
    match st.pop() {
        Some(Statement::Query(q)) => Ok(*q),
        _ => Err(format!("not a query: {sql}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_values_with_their_keys() {
        let rules = crate::router::Rules::new(
            vec![
                crate::sharding::ShardFn::new(
                    &yaml_serde::from_str("{ table: t, column: id, method: hash }").unwrap(),
                    2,
                    "t",
                )
                .unwrap(),
            ],
            Vec::new(),
        );
        let a = crate::router::analyze::analyze(
            "INSERT INTO t (name, id) SELECT name, n FROM src RETURNING id",
            &rules,
        )
        .unwrap();
        let via = a.insert_via.unwrap();
        assert_eq!(via.key, 1);
        let rows = vec![
            vec![Some("it's".to_string()), Some("5".to_string())],
            vec![None, None],
        ];
        let (st, keys) = with_rows(&via, &rows).unwrap();
        assert_eq!(
            st.unwrap().to_string(),
            "INSERT INTO t (name, id) VALUES ('it''s', '5'), (NULL, NULL) RETURNING id"
        );
        assert_eq!(
            keys,
            vec![(0, KeyRef::Literal("5".into())), (0, KeyRef::Null)]
        );
        assert_eq!(with_rows(&via, &[]).unwrap().0, None);
        assert_eq!(
            empty_insert(&via).unwrap(),
            "INSERT INTO t (name, id) SELECT * FROM (SELECT name, n FROM src) AS pgshard_rows LIMIT 0 RETURNING id"
        );
    }
}
