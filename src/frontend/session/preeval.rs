//! Subqueries pgshard evaluates before their statement (`router::preeval`), for a simple
//! Query: each runs on its own, merged over the shards it needs (in the client's
//! transaction when one is open, so that it sees the transaction's writes), and the
//! statement with their answers in place is routed as if the client had sent it.

use super::{Session, SessionError};
use crate::exec::scatter;
use crate::protocol::{self, PgError};
use crate::router::preeval::{Answer, builtin_type};
use crate::router::{AnalyzeError, Params, Route};
use bytes::BytesMut;

/// What becomes of a statement with subqueries pgshard can evaluate first.
pub(super) enum Pre {
    /// It runs as written (nothing to evaluate, or it runs on one shard as it is).
    AsWritten,
    /// The statement to run instead.
    Rewritten(String),
    /// Its answer: an error, pgshard's or a server's (frames without ReadyForQuery).
    Failed(Result<BytesMut, PgError>),
    /// The client got an error already (a server connection lost, a shard unavailable).
    Answered,
}

impl Session {
    /// For a single statement of a simple Query: its subqueries' answers in their places,
    /// when the statement needs them evaluated first.
    pub(super) async fn pre_evaluated(&mut self, sql: &str) -> Result<Pre, SessionError> {
        if self.status == b'E' || self.route.forced.is_some() || crate::router::hint(sql).is_some()
        {
            // An aborted transaction refuses it as written; a chosen shard runs it so.
            return Ok(Pre::AsWritten);
        }
        let Ok(a) = self.analysis_evaluating_first(sql) else {
            return Ok(Pre::AsWritten);
        };
        let Some(pre) = a.pre_eval.clone() else {
            return Ok(Pre::AsWritten);
        };
        if pre.refused.is_none() {
            // Right as written on one shard.
            match self.db.router.resolve(&a, &Params::default(), &self.zone) {
                Ok(Route::Shards(v)) if v.len() > 1 => {}
                _ => return Ok(Pre::AsWritten),
            }
        }
        let started = std::time::Instant::now();
        let mut answers = Vec::with_capacity(pre.subqueries.len());
        for sub in &pre.subqueries {
            // Replicas only when the statement itself may read there.
            self.set_read_ok(sql, Some(&a));
            match self.subquery_answer(&sub.sql).await? {
                Ok(answer) => answers.push(answer),
                Err(pre) => return Ok(pre),
            }
        }
        crate::metrics::inc(&self.db.pre_evaluated);
        tracing::debug!(
            subqueries = answers.len(),
            micros = started.elapsed().as_micros() as u64,
            "subqueries evaluated first"
        );
        Ok(match pre.substitute(&answers) {
            Ok(sql) => Pre::Rewritten(sql),
            Err(e) => Pre::Failed(Err(PgError::new(e.code, e.message))),
        })
    }

    /// Answers a statement whose subquery could not be evaluated (or its answer not put
    /// in its place).
    pub(super) fn pre_evaluation_failed(&mut self, out: Result<BytesMut, PgError>) {
        match out {
            // pgshard's refusal: raised on the server of an open transaction, so that
            // both know it failed.
            Err(e) if self.status != b'E' => self.answer_error(e),
            out => {
                let frame = out.unwrap_or_else(|e| {
                    self.db.shards[self.home_shard()].stats.error(e.code);
                    let mut f = BytesMut::new();
                    e.write(&mut f);
                    f
                });
                self.relay.drain_local(&mut self.cout);
                self.cout.extend_from_slice(&frame);
                protocol::write_ready(&mut self.cout, self.status);
            }
        }
    }

    /// Runs a subquery on the shards it needs and reads its answer as text.
    async fn subquery_answer(&mut self, sql: &str) -> Result<Result<Answer, Pre>, SessionError> {
        let refused =
            |code: &'static str, why: String| Err(Pre::Failed(Err(PgError::new(code, why))));
        let a = match self.analysis(sql) {
            Ok(a) => a,
            Err(AnalyzeError::Unroutable(why)) => return Ok(refused("0A000", why)),
            Err(AnalyzeError::Parse(e)) => return Ok(refused("42601", e)),
        };
        let shards = match self.db.router.resolve(&a, &Params::default(), &self.zone) {
            Ok(Route::Shards(v)) => v,
            Ok(Route::Default | Route::Any) => vec![self.home_shard()],
            Err(e) => return Ok(refused(e.sqlstate(), e.to_string())),
        };
        let spec = match (&a.merge, shards.len() > 1) {
            (_, false) => None,
            _ if a.one_shard => {
                return Ok(refused(
                    "0A000",
                    format!(
                        "subquery {sql} needs shards {shards:?}, and a subquery in it aggregates, groups or limits rows of one shard"
                    ),
                ));
            }
            (Some(Ok(spec)), true) => Some(spec.clone()),
            (Some(Err(why)), true) => return Ok(refused("0A000", why.clone())),
            (None, true) => {
                return Ok(refused(
                    "0A000",
                    format!("subquery {sql} over several shards cannot be merged"),
                ));
            }
        };
        let text = match spec {
            Some(_) => a.shard_sql.as_deref().unwrap_or(sql),
            None => sql,
        };
        let out = match self.read(&shards, text, spec.as_ref()).await? {
            Ok(out) => out,
            Err(pre) => return Ok(Err(pre)),
        };
        let Some(t) = protocol::frames(&out).find(|f| f[0] == b'T') else {
            return Ok(refused("42601", format!("subquery {sql} returns no rows")));
        };
        let columns = crate::exec::merge::column_types(t);
        let mut types = Vec::with_capacity(columns.len());
        let mut unknown = Vec::new();
        for &(oid, modifier) in &columns {
            match builtin_type(oid) {
                Some(name) => types.push(name.to_string()),
                None => {
                    unknown.push(types.len());
                    types.push(format!("pg_catalog.format_type({oid}, {modifier})"));
                }
            }
        }
        if !unknown.is_empty() {
            // Named by the server whose description this is (a type's OID is its own).
            let lookup = format!(
                "SELECT {}",
                unknown
                    .iter()
                    .map(|&i| types[i].as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let names = match self.read(&shards[..1], &lookup, None).await? {
                Ok(out) => out,
                Err(pre) => return Ok(Err(pre)),
            };
            let Some(row) = protocol::frames(&names).find(|f| f[0] == b'D') else {
                return Ok(refused("XX000", "type names not read".into()));
            };
            for (&i, name) in unknown.iter().zip(crate::exec::merge::fields(row)) {
                types[i] = String::from_utf8_lossy(name.unwrap_or(b"unknown")).into_owned();
            }
        }
        let rows = protocol::frames(&out)
            .filter(|f| f[0] == b'D')
            .map(|f| {
                crate::exec::merge::fields(f)
                    .into_iter()
                    .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                    .collect()
            })
            .collect();
        Ok(Ok(Answer { types, rows }))
    }

    /// A read's whole answer (simple protocol, text), merged over `shards` by `spec`: in
    /// the client's transaction when one is open (its shards join it), else on its own.
    async fn read(
        &mut self,
        shards: &[usize],
        sql: &str,
        spec: Option<&crate::router::merge::MergeSpec>,
    ) -> Result<Result<BytesMut, Pre>, SessionError> {
        if self.status == b'T' {
            if shards.iter().any(|&s| s != self.home_shard()) && !self.can_join() {
                let e = super::route::cross_shard_txn(self.home_shard(), shards);
                return Ok(Err(Pre::Failed(Err(e))));
            }
            let mut results = Vec::with_capacity(shards.len());
            for &s in shards {
                if !self.enter_shard(s).await? {
                    return Ok(Err(Pre::Answered));
                }
                let Some(frames) = self.run_here(sql).await? else {
                    return Ok(Err(Pre::Answered));
                };
                if self.status == b'E' {
                    let mut status = b'E';
                    return Ok(answer_of(Ok(joined(frames)), &mut status));
                }
                results.push(frames);
            }
            let Some(spec) = spec else {
                return Ok(Ok(joined(results.concat())));
            };
            let merged = self
                .merge_in_transaction(shards[0], results, spec, &[])
                .await;
            let Some(merged) = self
                .finish_in_transaction(shards[0], spec, merged, &[], None)
                .await?
            else {
                return Ok(Err(Pre::Answered));
            };
            return Ok(answer_of(merged, &mut self.status));
        }
        let prelude = self.settings_sql();
        let nodes = self.read_nodes(shards);
        let settings = (Some(&prelude[..]), self.settings_fp);
        let mut out = scatter::run_on_shards(
            &self.db,
            &nodes,
            scatter::Request::Simple(sql),
            Some(&prelude),
            self.settings_fp,
        )
        .await;
        if let (Ok(r), Some(spec)) = (&mut out, spec) {
            let r = std::mem::take(r);
            let mut merged =
                scatter::merge_select(&self.db, nodes[0], r, spec, &[], settings).await;
            if let (Ok(m), Some(fin)) = (&mut merged, &spec.finalize) {
                let m = std::mem::take(m);
                merged =
                    crate::exec::finalize::run(&self.db, nodes[0], fin, m, &[], None, settings)
                        .await;
            }
            let mut status = self.status;
            return Ok(answer_of(merged, &mut status));
        }
        let mut status = self.status;
        Ok(answer_of(out.map(|r| joined(r.concat())), &mut status))
    }
}

/// A read's answer, or its error as the statement's (a transaction is then aborted).
fn answer_of(out: Result<BytesMut, PgError>, status: &mut u8) -> Result<BytesMut, Pre> {
    match out {
        Ok(out) if protocol::has_error(&out) => {
            if *status == b'T' {
                *status = b'E';
            }
            let error = protocol::frames(&out)
                .find(|f| f[0] == b'E')
                .map(BytesMut::from);
            Err(Pre::Failed(Ok(error.unwrap_or(out))))
        }
        Ok(out) => Ok(out),
        Err(e) => {
            if *status == b'T' {
                *status = b'E';
            }
            Err(Pre::Failed(Err(e)))
        }
    }
}

/// Frames as one buffer.
fn joined(frames: Vec<BytesMut>) -> BytesMut {
    let mut out = BytesMut::with_capacity(frames.iter().map(|f| f.len()).sum());
    for f in frames {
        out.extend_from_slice(&f);
    }
    out
}
