//! INSERT ... SELECT into a sharded table whose new rows' shards only their values tell
//! (`generate_series`, another table's non-key column, a merge over shards): pgshard runs
//! the SELECT in the client's transaction, then inserts its rows as VALUES, split per
//! shard by key, in the same transaction (two-phase commit over the shards). In the simple
//! and the extended protocol: each step goes to the servers as an extended-protocol
//! request carrying the client's parameters it uses.

use super::cross::extended_request;
use super::{Session, SessionError};
use crate::protocol::{self, PgError};
use crate::router::analyze::{InsertVia, Via};
use crate::router::{KeyRef, Params, Route};
use bytes::{Bytes, BytesMut};
use sqlparser::ast::{Expr, SetExpr, Statement, Value};

/// A Bind body with no parameters and text results (the simple protocol's).
const NO_PARAMETERS: &[u8] = &[0, 0, 0, 0, 0, 0];

impl Session {
    /// A simple-protocol INSERT ... SELECT through pgshard, inside the current
    /// transaction (`implicit`: the statement's own): the answer for the client (None when
    /// a server connection was lost).
    pub(super) async fn insert_via_out(
        &mut self,
        via: &InsertVia,
        implicit: bool,
    ) -> Result<Option<BytesMut>, SessionError> {
        let Some(results) = self
            .insert_via_steps(via, &[], NO_PARAMETERS, &Params::default(), implicit)
            .await?
        else {
            return Ok(None);
        };
        // The simple protocol has no NoData.
        let results = results
            .into_iter()
            .map(|r| r.into_iter().filter(|f| f[0] != b'n').collect())
            .collect();
        Ok(Some(crate::exec::scatter::combine_writes(results, true)))
    }

    /// The same at a Bind (`types` from its Parse): the result is held as the portal the
    /// client executes.
    pub(super) async fn insert_via_bind(
        &mut self,
        via: &InsertVia,
        types: &[u8],
        rest: &[u8],
    ) -> Result<(), SessionError> {
        let params = super::route::bound_params(types, rest)?;
        if !self.answer_held().await? {
            return Ok(());
        }
        let implicit = self.begin_implicit().await?;
        let Some(mut results) = self
            .insert_via_steps(via, types, rest, &params, implicit)
            .await?
        else {
            return Ok(());
        };
        let mut description: Option<Bytes> = None;
        for r in results.iter_mut() {
            if let Some(i) = r.iter().position(|f| matches!(f[0], b'T' | b'n')) {
                let d = r.remove(i).freeze();
                description.get_or_insert(d);
            }
        }
        let out = crate::exec::scatter::combine_writes(results, true);
        self.hold_write_result(out, description, implicit).await
    }

    /// The three steps, in the current transaction:
    /// 1. the INSERT with none of its rows, on one shard: PostgreSQL checks it as written
    ///    (column types, counts, names), so that what it would refuse is refused with its
    ///    own error rather than taken as literals; with no rows this is the answer (its
    ///    tag, and RETURNING's description);
    /// 2. the SELECT, on its shard or merged over several (it sees the transaction's
    ///    writes);
    /// 3. its rows as literals in an INSERT ... VALUES split by key.
    ///
    /// The results of the last step run, per shard (with Describe's answer); an error as
    /// the only result. None when a server connection was lost (the client got that).
    /// `implicit`: the transaction is the statement's own.
    pub(super) async fn insert_via_steps(
        &mut self,
        via: &InsertVia,
        types: &[u8],
        rest: &[u8],
        params: &Params<'_>,
        implicit: bool,
    ) -> Result<Option<Vec<Vec<BytesMut>>>, SessionError> {
        match &via.how {
            Via::Computed(keys) => {
                return self
                    .insert_keys_steps(via, keys, types, rest, params, implicit)
                    .await;
            }
            Via::Unlisted => {
                return self
                    .insert_unlisted_steps(via, types, rest, params, implicit)
                    .await;
            }
            Via::Select => {}
        }
        let request = |sql: &str, text: bool| step_request(sql, types, rest, text.then_some(&[]));
        // 1.
        let none = match empty_insert(via) {
            Ok(sql) => sql,
            Err(e) => return failed(self, PgError::new("XX000", e)),
        };
        let req = match request(&none, false) {
            Ok(r) => r,
            Err(e) => return failed(self, e),
        };
        let home = self.home_shard();
        let Some(checked) = self.run_request_on(home, &req).await? else {
            return Ok(None);
        };
        if self.status == b'E' {
            return Ok(Some(vec![checked]));
        }
        // 2.
        let read = match self.db.router.resolve(&via.select, params, &self.zone) {
            Ok(Route::Shards(v)) => v,
            Ok(Route::Default | Route::Any) => vec![home],
            Err(e) => return failed(self, PgError::new(e.sqlstate(), e.to_string())),
        };
        let merged = read.len() > 1;
        if merged && via.select.one_shard {
            return failed(
                self,
                PgError::new(
                    "0A000",
                    format!(
                        "this SELECT needs shards {read:?}, and a subquery in it aggregates, groups or limits rows of one shard: it can run on one shard only"
                    ),
                ),
            );
        }
        let select_sql = match (&via.select.merge, merged) {
            (_, false) => via.select_sql.as_str(),
            (Some(Ok(_)), true) => via.select.shard_sql.as_deref().unwrap_or(&via.select_sql),
            (Some(Err(why)), true) => return failed(self, PgError::new("0A000", why.clone())),
            (None, true) => {
                return failed(
                    self,
                    PgError::new("0A000", "this SELECT over several shards cannot be merged"),
                );
            }
        };
        let req = match request(select_sql, true) {
            Ok(r) => r,
            Err(e) => return failed(self, e),
        };
        let mut parts = Vec::with_capacity(read.len());
        for &s in &read {
            let Some(frames) = self.run_request_on(s, &req).await? else {
                return Ok(None);
            };
            if self.status == b'E' {
                return Ok(Some(vec![frames]));
            }
            parts.push(frames);
        }
        let out = match (&via.select.merge, merged) {
            (Some(Ok(spec)), true) => {
                let spec = match super::cross_bind::bound_by(spec, &params.binary, &params.values) {
                    Ok(spec) => spec,
                    Err(e) => return failed(self, e),
                };
                let merged = self.merge_in_transaction(read[0], parts, &spec, &[]).await;
                let Some(merged) = self
                    .finish_in_transaction(
                        read[0],
                        &spec,
                        merged,
                        &[],
                        Some(&crate::exec::finalize::ClientParams {
                            oids: params.oids.clone(),
                            binary: params.binary.clone(),
                            values: params.values.clone(),
                        }),
                    )
                    .await?
                else {
                    return Ok(None);
                };
                match merged {
                    // The final query's error, as a shard's.
                    Ok(out) if self.status == b'E' => {
                        return Ok(Some(vec![
                            protocol::frames(&out).map(BytesMut::from).collect(),
                        ]));
                    }
                    Ok(out) => out,
                    Err(e) => return failed(self, e),
                }
            }
            _ => BytesMut::from(&parts.concat().concat()[..]),
        };
        let rows = crate::exec::merge::text_rows(&out);
        // 3.
        let (statement, keys) = match with_rows(via, &rows) {
            Ok(x) => x,
            Err(e) => return failed(self, PgError::new("XX000", e)),
        };
        let Some(statement) = statement else {
            return Ok(Some(vec![checked]));
        };
        let split = crate::router::insert::InsertSplit { statement, keys };
        let inserts = match self.db.router.split_insert(&split, params, &self.zone) {
            Ok(p) => p,
            Err(e) => return failed(self, PgError::new(e.sqlstate(), e.to_string())),
        };
        let mut parts = Vec::with_capacity(inserts.parts.len());
        for (s, sql) in &inserts.parts {
            if crate::router::insert::renumber_params(sql).is_ok_and(|(_, k)| !k.is_empty()) {
                return failed(
                    self,
                    PgError::new(
                        "0A000",
                        "an INSERT ... SELECT that pgshard carries out may use parameters in its SELECT only",
                    ),
                );
            }
            match request(sql, false) {
                Ok(r) => parts.push((*s, r)),
                Err(e) => return failed(self, e),
            }
        }
        self.run_split(parts, &inserts).await
    }

    /// Runs the requests of a split INSERT's parts (`parts`, one per part of `split`) as
    /// `run_parts` does, with its RETURNING rows in the order of the statement's rows.
    pub(super) async fn run_split(
        &mut self,
        parts: Vec<(usize, BytesMut)>,
        split: &crate::router::insert::SplitRows,
    ) -> Result<Option<Vec<Vec<BytesMut>>>, SessionError> {
        let from: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
        let results = self.run_parts(parts).await?;
        Ok(results.map(|r| crate::exec::scatter::in_row_order(r, &from, &split.row_shards)))
    }

    /// Runs each shard's part of an INSERT in turn, in the current transaction, up to the
    /// first error: each part's frames (the error's last). None when a server connection
    /// was lost (the client got that error).
    pub(super) async fn run_parts(
        &mut self,
        parts: Vec<(usize, BytesMut)>,
    ) -> Result<Option<Vec<Vec<BytesMut>>>, SessionError> {
        let mut results = Vec::with_capacity(parts.len());
        for (s, req) in parts {
            let Some(frames) = self.run_request_on(s, &req).await? else {
                return Ok(None);
            };
            let error = self.status == b'E';
            results.push(frames);
            if error {
                break;
            }
        }
        Ok(Some(results))
    }
}

/// A step's answer that is an error: the transaction fails, as on a server.
pub(super) fn failed(
    s: &mut Session,
    e: PgError,
) -> Result<Option<Vec<Vec<BytesMut>>>, SessionError> {
    s.status = b'E';
    let mut f = BytesMut::new();
    e.write(&mut f);
    Ok(Some(vec![vec![f]]))
}

/// A step's extended-protocol request: `sql` with its parameters renumbered from `$1`,
/// bound to those it uses of the client's (`types` from Parse, `rest` from Bind), with
/// these result formats (one per column, true: binary; none: all text) or, for None, the
/// client's.
pub(super) fn step_request(
    sql: &str,
    types: &[u8],
    rest: &[u8],
    results: Option<&[bool]>,
) -> Result<BytesMut, PgError> {
    let (sql, types, bind) = bound_parts(sql, types, rest, results)?;
    Ok(extended_request(sql.as_bytes(), &types, &bind))
}

/// [`step_request`]'s parts: the renumbered text, its parameters' types, and the Bind's
/// body after its names.
pub(super) fn bound_parts(
    sql: &str,
    types: &[u8],
    rest: &[u8],
    results: Option<&[bool]>,
) -> Result<(String, Vec<u8>, Vec<u8>), PgError> {
    let bad = |e: protocol::ProtocolError| PgError::new("08P01", e.to_string());
    let (sql, keep) =
        crate::router::insert::renumber_params(sql).map_err(|e| PgError::new("42601", e))?;
    let mut bind = protocol::select_bind_params(rest, &keep).map_err(bad)?;
    if let Some(formats) = results {
        bind = protocol::with_result_formats(&bind, formats).map_err(bad)?;
    }
    let types = protocol::select_param_types(types, &keep);
    Ok((sql, types, bind))
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
    let mut values = crate::router::parse_query("VALUES (NULL)")?;
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
    let none = crate::router::parse_query(&format!(
        "SELECT * FROM ({}) AS pgshard_rows LIMIT 0",
        via.select_sql
    ))?;
    let mut st = via.insert.clone();
    if let Statement::Insert(ins) = &mut st {
        ins.source = Some(Box::new(none));
    }
    Ok(st.to_string())
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
