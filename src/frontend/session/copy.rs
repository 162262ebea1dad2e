//! COPY on sharded and reference tables: which shards a COPY needs and how it runs there,
//! and the bookkeeping of the shards taking part, shared by COPY FROM STDIN over several
//! shards (`copy_in.rs`) and COPY ... TO STDOUT over several (`copy_out.rs`).

use super::copy_out::Joined;
use super::{Session, SessionError};
use crate::pool::Pooled;
use crate::protocol::{self, PgError};
use crate::router::{self, copy::CopyStmt};
use bytes::BytesMut;

/// Rows are sent to a shard once this much is buffered for it.
pub(super) const BATCH: usize = 64 * 1024;

/// How a COPY over several shards runs.
#[derive(Clone)]
pub(super) enum CopyPlan {
    /// Into a sharded table (its rule index) or a reference table (None).
    In(Option<usize>),
    /// Gathered from these shards.
    Out(Vec<usize>),
    /// `COPY (query) TO STDOUT` whose query only a merge answers: the query's analysis
    /// for the merge (see [`merged_copy`]) over these shards.
    Merged(Vec<usize>, Box<router::Analysis>),
    /// Such a COPY pgshard cannot write.
    Refused(PgError),
}

/// The analysis under which `COPY (q) TO STDOUT` runs as its query `q`, merged, with the
/// rows written as the COPY's data: each shard runs the query (or its rewrite for the
/// merge), never the COPY.
fn merged_copy(cs: CopyStmt, q: &str, a: router::Analysis) -> router::Analysis {
    router::Analysis {
        shard_sql: Some(a.shard_sql.clone().unwrap_or_else(|| q.to_string())),
        copy_to: Some(std::sync::Arc::new(cs)),
        ..a
    }
}

/// Why pgshard cannot write a COPY's data from merged rows, if it cannot: binary rows
/// are not merged, and options it does not apply would change the data.
fn merged_copy_refused(cs: &CopyStmt) -> Option<PgError> {
    let hint = "Run the query itself (pgshard merges it), or COPY from each shard with a /* pgshard: shard=N */ hint.";
    if cs.format == router::copy::Format::Binary {
        return Some(PgError::new(
            "0A000",
            "COPY (query) TO STDOUT in the binary format over several shards only concatenates rows: a query with ORDER BY, LIMIT, DISTINCT or aggregates is not supported there",
        ).with_hint(hint));
    }
    cs.ignored.first().map(|o| {
        PgError::new(
            "0A000",
            format!("COPY (query) TO STDOUT over several shards whose rows pgshard merges does not support the option {o}"),
        )
        .with_hint(hint)
    })
}

impl Session {
    /// COPY on a sharded database: true when handled here (else it is routed as any
    /// statement).
    pub(super) async fn copy_routed(
        &mut self,
        frame: &bytes::Bytes,
        sql: &str,
    ) -> Result<bool, SessionError> {
        let Some(Ok(cs)) = router::copy::parse_copy(sql) else {
            return Ok(false);
        };
        if !cs.stdio {
            return Ok(false);
        }
        let rules = &self.db.router.rules;
        let n = self.db.shards.len();
        match (&cs.table, &cs.query, cs.from) {
            (Some(t), _, true) if rules.table(t).is_some() => {
                let table = rules.table(t).expect("checked");
                self.copy_in(sql, cs, Some(table), false).await?;
            }
            (Some(t), _, true) if rules.is_reference(t) => {
                self.copy_in(sql, cs, None, false).await?
            }
            (Some(t), _, false) if rules.table(t).is_some() => {
                self.copy_out(sql, (0..n).collect(), Joined::of(&cs), false)
                    .await?
            }
            (Some(t), _, false) if rules.is_reference(t) => {
                // Any shard has all of it.
                let home = self.home_shard();
                self.copy_forward(frame, home).await?;
            }
            (None, Some(q), false) => {
                let a = match router::analyze::analyze(q, rules) {
                    Ok(a) => a,
                    Err(_) if !rules.mentioned_in(q) => return Ok(false),
                    Err(e) => {
                        let why = match e {
                            router::AnalyzeError::Parse(p)
                            | router::AnalyzeError::Unroutable(p) => p,
                        };
                        self.answer_error(PgError::new(
                            "0A000",
                            format!("pgshard cannot route this COPY query: {why}"),
                        ));
                        return Ok(true);
                    }
                };
                let route = match self
                    .db
                    .router
                    .resolve(&a, &router::Params::default(), &self.zone)
                {
                    Ok(r) => r,
                    Err(e) => {
                        self.answer_error(PgError::new(e.sqlstate(), e.to_string()));
                        return Ok(true);
                    }
                };
                match route {
                    router::Route::Default | router::Route::Any => return Ok(false),
                    router::Route::Shards(v) if v.len() == 1 => {
                        self.copy_forward(frame, v[0]).await?
                    }
                    router::Route::Shards(v) => {
                        let concat = matches!(&a.merge, Some(Ok(m)) if m.is_concatenation());
                        if concat {
                            self.copy_out(sql, v, Joined::of(&cs), false).await?;
                        } else if let Some(e) = merged_copy_refused(&cs) {
                            self.answer_error(e);
                        } else {
                            // The query runs merged, as on its own; its rows are written
                            // as the COPY's data.
                            let q = q.clone();
                            let a = merged_copy(cs, &q, a);
                            self.set_read_ok(sql, Some(&a));
                            self.run_multi(&q, v, &a).await?;
                        }
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The plan of a bound COPY statement (extended protocol) that needs several shards:
    /// Some((sql, into-table or None for a reference table, or gather shards)).
    pub(super) fn multi_copy(&self, sql: &str) -> Option<(CopyStmt, CopyPlan)> {
        let Some(Ok(cs)) = router::copy::parse_copy(sql) else {
            return None;
        };
        if !cs.stdio {
            return None;
        }
        let rules = &self.db.router.rules;
        let n = self.db.shards.len();
        let plan = match (&cs.table, &cs.query, cs.from) {
            (Some(t), _, true) if rules.table(t).is_some() => CopyPlan::In(rules.table(t)),
            (Some(t), _, true) if rules.is_reference(t) => CopyPlan::In(None),
            (Some(t), _, false) if rules.table(t).is_some() => CopyPlan::Out((0..n).collect()),
            (None, Some(q), false) => {
                let a = router::analyze::analyze(q, rules).ok()?;
                match self
                    .db
                    .router
                    .resolve(&a, &router::Params::default(), &self.zone)
                    .ok()?
                {
                    router::Route::Shards(v)
                        if v.len() > 1
                            && matches!(&a.merge, Some(Ok(m)) if m.is_concatenation()) =>
                    {
                        CopyPlan::Out(v)
                    }
                    router::Route::Shards(v) if v.len() > 1 && matches!(&a.merge, Some(Ok(_))) => {
                        match merged_copy_refused(&cs) {
                            Some(e) => CopyPlan::Refused(e),
                            None => {
                                let a = merged_copy(cs.clone(), q, a);
                                CopyPlan::Merged(v, Box::new(a))
                            }
                        }
                    }
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some((cs, plan))
    }

    /// Execute of a bound COPY over several shards (its Bind was answered by pgshard).
    pub(super) async fn execute_copy(
        &mut self,
        sql: &str,
        cs: CopyStmt,
        plan: CopyPlan,
    ) -> Result<(), SessionError> {
        self.settle().await?;
        self.relay.drain_local(&mut self.cout);
        match plan {
            CopyPlan::Out(shards) => self.copy_out(sql, shards, Joined::of(&cs), true).await,
            CopyPlan::In(table) => self.copy_in(sql, cs, table, true).await,
            // Answered at the Bind (`merged_copy_bind`).
            CopyPlan::Merged(..) | CopyPlan::Refused(_) => Ok(()),
        }
    }

    /// The Bind of a `COPY (query) TO STDOUT` whose query only a merge answers: the query
    /// runs merged as a Bind of it would (results as text, which the COPY's data is
    /// written from), and its portal holds the COPY's answer.
    pub(super) async fn merged_copy_bind(
        &mut self,
        frame: &bytes::Bytes,
        shards: &[usize],
        a: &router::Analysis,
    ) -> Result<(), SessionError> {
        let b = protocol::parse_bind(frame)?;
        let mut text = BytesMut::with_capacity(frame.len());
        let rest = protocol::with_result_formats(b.rest, &[])?;
        protocol::write_bind(&mut text, b.portal, b.stmt, &rest);
        let text = text.freeze();
        if self.status == b'I' && !self.in_batch {
            self.settle().await?;
            self.detach().await;
            return self.scatter_bind(&text, shards, a).await;
        }
        if self.can_run_in_transaction() {
            return self.write_bind(&text, shards, a).await;
        }
        let e = super::route::cross_shard_txn(self.home_shard(), shards);
        self.local_error(e);
        Ok(())
    }

    /// A COPY that one shard answers: forwarded as any statement.
    async fn copy_forward(
        &mut self,
        frame: &bytes::Bytes,
        shard: usize,
    ) -> Result<(), SessionError> {
        if self.backend.is_some() && self.shard != shard && self.status != b'I' {
            if !self.can_join() || !self.join_shard(shard).await? {
                let e = super::route::cross_shard_txn(self.shard, &[shard]);
                self.answer_error(e);
                return Ok(());
            }
        } else if !self.use_shard(shard).await? {
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        self.started();
        self.relay.push(super::Pending::Query);
        self.bout.extend_from_slice(frame);
        Ok(())
    }

    /// Makes every shard of `shards` a participant of the transaction (the client's, or a
    /// new implicit one). False when the client got an error.
    pub(super) async fn enter_shards(&mut self, shards: &[usize]) -> Result<bool, SessionError> {
        for &s in shards {
            if !self.enter_shard(s).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The connection of a participant shard.
    pub(super) fn participant(&mut self, s: usize) -> Option<&mut Pooled> {
        if self.shard == s && self.backend.is_some() {
            return self.backend.as_mut();
        }
        self.multi
            .parked
            .iter_mut()
            .find(|(p, _)| *p == s)
            .map(|(_, b)| b)
    }

    /// Takes every participant's connection out of the session (to use several at once).
    pub(super) fn take_participants(&mut self) -> Vec<(usize, Pooled)> {
        let mut v = std::mem::take(&mut self.multi.parked);
        if let Some(b) = self.backend.take() {
            v.push((self.shard, b));
        }
        v
    }

    /// Puts back what `take_participants` took (the attached shard stays attached).
    pub(super) fn restore_participants(&mut self, v: Vec<(usize, Pooled)>) {
        for (s, b) in v {
            if s == self.shard && self.backend.is_none() {
                self.backend = Some(b);
            } else {
                self.multi.parked.push((s, b));
            }
        }
    }

    /// Ends the statement: the implicit transaction commits (or rolls back after an
    /// error), and the client gets `out` and ReadyForQuery.
    pub(super) async fn finish_statement(
        &mut self,
        implicit: bool,
        mut out: BytesMut,
        extended: bool,
    ) -> Result<(), SessionError> {
        if implicit {
            self.end_implicit(&mut out).await?;
        }
        self.relay.drain_local(&mut self.cout);
        self.cout.extend_from_slice(&out);
        if !extended {
            protocol::write_ready(&mut self.cout, self.status);
        }
        Ok(())
    }

    /// An error before the COPY started: as any statement's (simple or extended).
    pub(super) fn copy_error(&mut self, e: PgError, extended: bool) {
        if extended {
            self.local_error(e);
        } else {
            self.answer_error(e);
        }
    }
}
