//! Subqueries pgshard evaluates before their statement (`router::preeval`): each runs on
//! its own, merged over the shards it needs (in the client's transaction when one is
//! open, so that it sees the transaction's writes), and the statement with their answers
//! in place is routed as if the client had sent it: a simple Query's text, or a Bind's
//! statement with the client's parameters it still uses (its result then held as the
//! portal, as for other Binds pgshard carries out).

use super::insert_select::bound_parts;
use super::route::{Dest, bound_params, mergeable};
use super::{Session, SessionError};
use crate::config::PoolMode;
use crate::exec::scatter;
use crate::protocol::{self, PgError};
use crate::router::preeval::{Answer, PreEval, builtin_type};
use crate::router::{Analysis, AnalyzeError, Kind, Params, Route};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

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

impl From<crate::router::preeval::SubstituteError> for PgError {
    fn from(e: crate::router::preeval::SubstituteError) -> PgError {
        PgError::new(e.code, e.message)
    }
}

/// How deep subqueries with subqueries of their own to evaluate first are followed.
const MAX_DEPTH: usize = 8;

/// A statement's analysis and the subqueries to evaluate before it.
type Planned = (Arc<Analysis>, Arc<PreEval>);

/// How a subquery is sent: as a simple Query, or with a Bind's parameters (its
/// statement's parameter types and the Bind's body after its names), results in text.
#[derive(Clone, Copy)]
enum How<'a> {
    Simple,
    Bound(&'a [u8], &'a [u8]),
}

impl Session {
    /// For a single statement of a simple Query that `decide` refused: its subqueries'
    /// answers in their places, when evaluating them first is what it needs.
    pub(super) async fn pre_evaluated(&mut self, sql: &str) -> Result<Pre, SessionError> {
        let Some(pre) = self.pre_evaluation(sql, &Params::default()) else {
            return Ok(Pre::AsWritten);
        };
        Ok(match self.answers(&pre, sql, How::Simple, 0).await? {
            Ok(answers) => match pre.1.substitute(&answers) {
                Ok(sql) => Pre::Rewritten(sql),
                Err(e) => Pre::Failed(Err(e.into())),
            },
            Err(pre) => pre,
        })
    }

    /// A Bind (transaction pooling mode, at the start of a batch) whose statement `decide`
    /// refused, carried out by evaluating its subqueries first; false when that is not
    /// what it needs (the refusal stands).
    pub(super) async fn pre_evaluated_bind(&mut self, frame: &Bytes) -> Result<bool, SessionError> {
        if self.mode != PoolMode::Transaction
            || !(self.status == b'I' || self.can_run_in_transaction())
        {
            return Ok(false);
        }
        let b = protocol::parse_bind(frame)?;
        let Some((query, types)) = self.route.texts.get(b.stmt).cloned() else {
            return Ok(false);
        };
        let Ok(sql) = std::str::from_utf8(&query) else {
            return Ok(false);
        };
        let rest = b.rest.to_vec();
        let params = bound_params(&types, &rest)?;
        let Some(pre) = self.pre_evaluation(sql, &params) else {
            return Ok(false);
        };
        if !self.answer_held().await? {
            return Ok(true);
        }
        if self.status == b'I' {
            // The subqueries and a read run on connections of their own.
            self.settle().await?;
            self.detach().await;
        }
        let rewritten = match self
            .answers(&pre, sql, How::Bound(&types, &rest), 0)
            .await?
        {
            Ok(answers) => pre.1.substitute(&answers).map_err(PgError::from),
            Err(Pre::Failed(out)) => {
                self.bind_pre_failed(out).await?;
                return Ok(true);
            }
            Err(_) => {
                // The client got the error: the rest of the batch is skipped.
                self.local_skip = true;
                return Ok(true);
            }
        };
        // The client's parameters the statement still uses, renumbered from $1.
        let bound = rewritten.and_then(|sql| bound_parts(&sql, &types, &rest, None));
        let (sql, types, rest) = match bound {
            Ok(b) => b,
            Err(e) => {
                self.bind_pre_failed(Err(e)).await?;
                return Ok(true);
            }
        };
        let params = bound_params(&types, &rest)?;
        self.route.uncached = true;
        self.route.decided_read = false;
        let dest = self.decide_async(&sql, &params).await;
        self.route.uncached = false;
        self.route.batch_writes = self.route.wrote_before_bind || !self.route.decided_read;
        let query = sql.as_bytes();
        match dest {
            Err(e) => self.bind_pre_failed(Err(e)).await?,
            Ok(Dest::Shard(s)) => self.run_bound_on(s, query, &types, &rest).await?,
            Ok(Dest::Multi(shards, a)) if self.status == b'I' && mergeable(&a) => {
                let Some(Ok(spec)) = &a.merge else {
                    unreachable!("mergeable")
                };
                match super::cross_bind::bound_by(spec, &params.binary, &params.values) {
                    Ok(spec) => {
                        self.scatter_bound(&spec, query, &types, &rest, &shards, &a)
                            .await?
                    }
                    Err(e) => self.bind_pre_failed(Err(e)).await?,
                }
            }
            Ok(Dest::Multi(shards, a)) if a.kind >= Kind::Write || mergeable(&a) || a.explain => {
                self.write_bound(query, &types, &rest, &shards, &a).await?
            }
            Ok(Dest::Multi(shards, a)) => {
                self.bind_pre_failed(Err(super::cross::multi_shard_error(&shards, &a)))
                    .await?
            }
        }
        Ok(true)
    }

    /// Whether a statement refused as written is carried out at its Binds by evaluating
    /// its subqueries first (so its Parse is not refused).
    pub(super) fn evaluates_first(&mut self, sql: &str) -> bool {
        self.mode == PoolMode::Transaction
            && self
                .analysis_evaluating_first(sql)
                .is_ok_and(|a| a.pre_eval.is_some())
    }

    /// Runs a bound statement on shard `s` (in the client's transaction, or one of its
    /// own) and holds its result as the Bind's portal.
    async fn run_bound_on(
        &mut self,
        s: usize,
        query: &[u8],
        types: &[u8],
        rest: &[u8],
    ) -> Result<(), SessionError> {
        let implicit = self.begin_implicit().await?;
        let req = super::cross::extended_request(query, types, rest);
        let Some(mut frames) = self.run_request_on(s, &req).await? else {
            return Ok(());
        };
        let description = frames
            .iter()
            .position(|f| matches!(f[0], b'T' | b'n'))
            .map(|i| frames.remove(i).freeze());
        self.hold_write_result(joined(frames), description, implicit)
            .await
    }

    /// Fails a Bind whose subqueries could not be evaluated (or their answers not put in
    /// their places): the rest of the batch is skipped, and an open transaction fails, on
    /// its server too (as `answer_error` does for a simple query).
    async fn bind_pre_failed(
        &mut self,
        out: Result<BytesMut, PgError>,
    ) -> Result<(), SessionError> {
        match out {
            Err(e) if self.status == b'T' && self.backend.is_some() => {
                self.db.shards[self.home_shard()].stats.error(e.code);
                let mut raise = BytesMut::new();
                protocol::write_query(&mut raise, &super::query::raise_sql(&e));
                let s = self.shard;
                if let Some(frames) = self.run_request_on(s, &raise).await? {
                    self.status = b'E';
                    self.bind_failed(joined(frames).freeze());
                }
            }
            Err(e) => {
                if self.status == b'T' {
                    self.status = b'E';
                }
                self.local_error(e);
            }
            // A server's error: its transaction failed with it.
            Ok(frames) => self.bind_failed(frames.freeze()),
        }
        Ok(())
    }

    /// The subqueries of `sql` to evaluate first (its analysis's), when it needs that:
    /// it is refused as written, or right on one shard only and needs several with
    /// `params`. None in an aborted transaction (which refuses it as written).
    fn pre_evaluation(&mut self, sql: &str, params: &Params<'_>) -> Option<Planned> {
        if self.status == b'E' || self.route.forced.is_some() || crate::router::hint(sql).is_some()
        {
            return None;
        }
        let a = self.analysis_evaluating_first(sql).ok()?;
        let pre = a.pre_eval.clone()?;
        if pre.refused.is_none() {
            match self.db.router.resolve(&a, params, &self.zone) {
                Ok(Route::Shards(v)) if v.len() > 1 => {}
                _ => return None,
            }
        }
        Some((a, pre))
    }

    /// The answers of the statement's subqueries, in order; or what the statement's
    /// answer is instead.
    async fn answers(
        &mut self,
        (a, pre): &Planned,
        sql: &str,
        how: How<'_>,
        depth: usize,
    ) -> Result<Result<Vec<Answer>, Pre>, SessionError> {
        let started = std::time::Instant::now();
        let mut answers = Vec::with_capacity(pre.subqueries.len());
        for sub in &pre.subqueries {
            // Replicas only when the statement itself may read there.
            self.set_read_ok(sql, Some(a));
            match self.subquery_answer(&sub.sql, how, depth).await? {
                Ok(answer) => answers.push(answer),
                Err(pre) => return Ok(Err(pre)),
            }
        }
        if depth == 0 {
            crate::metrics::inc(&self.db.pre_evaluated);
        }
        tracing::debug!(
            subqueries = answers.len(),
            micros = started.elapsed().as_micros() as u64,
            "subqueries evaluated first"
        );
        Ok(Ok(answers))
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
    async fn subquery_answer(
        &mut self,
        sql: &str,
        how: How<'_>,
        depth: usize,
    ) -> Result<Result<Answer, Pre>, SessionError> {
        let refused =
            |code: &'static str, why: String| Err(Pre::Failed(Err(PgError::new(code, why))));
        let params = match how {
            How::Simple => Params::default(),
            How::Bound(types, rest) => bound_params(types, rest)?,
        };
        // A subquery with subqueries of its own to evaluate first: those first.
        let mut own = None;
        if depth < MAX_DEPTH
            && let Some(planned) = self.pre_evaluation(sql, &params)
        {
            let answers = match Box::pin(self.answers(&planned, sql, how, depth + 1)).await? {
                Ok(answers) => answers,
                Err(pre) => return Ok(Err(pre)),
            };
            match planned.1.substitute(&answers) {
                Ok(text) => own = Some(text),
                Err(e) => return Ok(refused(e.code, e.message)),
            }
        }
        let sql = own.as_deref().unwrap_or(sql);
        self.route.uncached = own.is_some();
        let a = self.analysis(sql);
        self.route.uncached = false;
        let a = match a {
            Ok(a) => a,
            Err(AnalyzeError::Unroutable(why)) => return Ok(refused("0A000", why)),
            Err(AnalyzeError::Parse(e)) => return Ok(refused("42601", e)),
        };
        let shards = match self.db.router.resolve(&a, &params, &self.zone) {
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
            (Some(Ok(spec)), true) => {
                match super::cross_bind::bound_by(spec, &params.binary, &params.values) {
                    Ok(spec) => Some(spec),
                    Err(e) => return Ok(Err(Pre::Failed(Err(e)))),
                }
            }
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
        let out = match self.read(&shards, text, spec.as_ref(), how).await? {
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
            let names = match self.read(&shards[..1], &lookup, None, How::Simple).await? {
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
        let limit = self.db.config.max_subquery_rows;
        if limit > 0
            && protocol::frames(&out)
                .filter(|f| f[0] == b'D')
                .nth(limit)
                .is_some()
        {
            return Ok(Err(Pre::Failed(Err(PgError::new(
                "54000",
                format!("subquery {sql} returned more than max_subquery_rows ({limit}) rows, which pgshard puts in the statement as constants"),
            )
            .with_hint("Relate the subquery to the outer query by the shard keys, narrow it, or raise the database's max_subquery_rows.")))));
        }
        Ok(Ok(Answer {
            types,
            rows: crate::exec::merge::text_rows(&out),
        }))
    }

    /// A read's whole answer (simple protocol, text), merged over `shards` by `spec`: in
    /// the client's transaction when one is open (its shards join it), else on its own.
    async fn read(
        &mut self,
        shards: &[usize],
        sql: &str,
        spec: Option<&crate::router::merge::MergeSpec>,
        how: How<'_>,
    ) -> Result<Result<BytesMut, Pre>, SessionError> {
        // The parameters a final query may use, the client's as bound.
        let client = match how {
            How::Simple => None,
            How::Bound(types, rest) => match crate::exec::finalize::ClientParams::of(types, rest) {
                Ok(c) => Some(c),
                Err(e) => return Ok(Err(Pre::Failed(Err(e)))),
            },
        };
        // Only the parameters the text uses, renumbered, with text results.
        let bound = match how {
            How::Simple => None,
            How::Bound(types, rest) => match bound_parts(sql, types, rest, Some(&[])) {
                Ok(parts) => Some(parts),
                Err(e) => return Ok(Err(Pre::Failed(Err(e)))),
            },
        };
        if self.status == b'T' {
            // Another shard joins the transaction where statements may join it.
            if shards.iter().any(|&s| s != self.home_shard()) && !self.can_run_in_transaction() {
                let e = super::route::cross_shard_txn(self.home_shard(), shards);
                return Ok(Err(Pre::Failed(Err(e))));
            }
            let req = match &bound {
                None => {
                    let mut q = BytesMut::new();
                    protocol::write_query(&mut q, sql);
                    q
                }
                Some((sql, types, rest)) => {
                    super::cross::extended_request(sql.as_bytes(), types, rest)
                }
            };
            let mut results = Vec::with_capacity(shards.len());
            for &s in shards {
                let Some(frames) = self.run_request_on(s, &req).await? else {
                    return Ok(Err(Pre::Answered));
                };
                if frames.is_empty() {
                    // The shard could not join (the client got that error).
                    return Ok(Err(Pre::Answered));
                }
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
                .finish_in_transaction(shards[0], spec, merged, &[], client.as_ref())
                .await?
            else {
                return Ok(Err(Pre::Answered));
            };
            return Ok(answer_of(merged, &mut self.status));
        }
        let prelude = self.settings_sql();
        let nodes = self.read_nodes(shards);
        let settings = (Some(&prelude[..]), self.settings_fp);
        let request = match &bound {
            None => scatter::Request::Simple(sql),
            Some((sql, types, rest)) => scatter::Request::Extended {
                query: sql.as_bytes(),
                types,
                bind_rest: rest,
            },
        };
        let mut out =
            scatter::run_on_shards(&self.db, &nodes, request, Some(&prelude), self.settings_fp)
                .await;
        if let (Ok(r), Some(spec)) = (&mut out, spec) {
            let r = std::mem::take(r);
            let merged = crate::exec::finalize::merged_and_finished(
                &self.db,
                nodes[0],
                r,
                spec,
                (&[], &[]),
                client.as_ref(),
                settings,
            )
            .await;
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
