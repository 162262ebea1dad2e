//! Statements over several shards inside a session: how each kind runs (`Multi`), and a
//! simple Query merged or broadcast across shards. Binds over several shards are in
//! `cross_bind.rs`.

use super::route::cross_shard_txn;
use super::*;
use crate::exec::scatter;
use crate::router::analyze::Via;
use crate::router::{Analysis, Kind};
use bytes::BytesMut;

/// How a statement over several shards runs.
pub(super) enum Multi {
    /// A SELECT whose rows are merged.
    Merge(Box<crate::router::merge::MergeSpec>),
    /// DDL, all or none.
    Ddl,
    /// A write allowed on several shards, all or none; `sum` adds up the row counts (not
    /// for reference tables, whose rows are the same on every shard).
    Write { sum: bool },
    /// An INSERT split per shard (shard, its statement), all or none.
    SplitInsert(crate::router::insert::SplitRows),
    /// An INSERT ... SELECT whose rows pgshard reads first, then inserts split by key.
    InsertVia(std::sync::Arc<crate::router::analyze::InsertVia>),
    /// EXPLAIN: each shard's plan (ANALYZE of a write runs it on each, all or none).
    Explain,
}

/// Parse, Bind, Describe (portal), Execute and Sync of an unnamed statement.
pub(super) fn extended_request(query: &[u8], types: &[u8], bind_rest: &[u8]) -> bytes::BytesMut {
    let mut req = bytes::BytesMut::new();
    protocol::write_parse(&mut req, b"", query, types);
    protocol::write_bind(&mut req, b"", b"", bind_rest);
    protocol::write_target(&mut req, b'D', b'P', b"");
    protocol::write_msg(&mut req, b'E', &[0, 0, 0, 0, 0]);
    protocol::write_msg(&mut req, b'S', &[]);
    req
}

/// Why a statement over several shards cannot run (in the extended protocol or a
/// transaction).
pub(super) fn multi_shard_error(shards: &[usize], a: &Analysis) -> PgError {
    match (&a.merge, a.kind) {
        (Some(Err(why)), _) => PgError::new("0A000", why.clone()),
        (_, Kind::Write | Kind::Ddl) => PgError::new(
            "0A000",
            format!(
                "this write needs shards {shards:?}, which pgshard runs in the extended protocol only in transaction pooling mode, outside a failed transaction and at the start of a batch"
            ),
        ),
        _ => PgError::new(
            "0A000",
            format!(
                "this statement needs shards {shards:?}, which pgshard does only outside transactions, for single SELECTs"
            ),
        ),
    }
}

/// Whether a read's rows go to the client as the shards send them (`stream.rs`): they
/// only concatenate, no final query finishes them, and neither a cursor nor COPY takes
/// them.
pub(super) fn streams(spec: &crate::router::merge::MergeSpec, a: &Analysis) -> bool {
    spec.is_concatenation() && spec.finalize.is_none() && a.cursor.is_none() && a.copy_to.is_none()
}

/// Whether a read ordered over several shards is merged as the shards' sorted rows
/// come (`sorted_stream.rs`): a plain ORDER BY (LIMIT, OFFSET), neither a cursor nor
/// COPY taking the rows.
pub(super) fn sorted_streams(spec: &crate::router::merge::MergeSpec, a: &Analysis) -> bool {
    crate::exec::sorted::streams_ordered(spec) && a.cursor.is_none() && a.copy_to.is_none()
}

impl Session {
    /// How a statement over several shards runs, or why it cannot.
    pub(super) fn multi_plan(&self, shards: &[usize], a: &Analysis) -> Result<Multi, PgError> {
        let sharded_writes_allowed =
            self.db.config.cross_shard_writes == crate::config::CrossShardWrites::Allow;
        if a.cursor.is_some() && a.kind >= Kind::Write {
            // Each shard would declare a cursor of its own, and a FETCH read one of them.
            return Err(PgError::new(
                "0A000",
                "a cursor over several shards whose query locks rows (FOR UPDATE/SHARE) is not supported",
            ));
        }
        if a.explain && a.kind >= Kind::Write {
            // EXPLAIN ANALYZE runs the write as written on each shard: only where that is
            // the write itself (not an INSERT whose rows pgshard splits), and as allowed.
            let mut write = a.clone();
            write.explain = false;
            return match self.multi_plan(shards, &write)? {
                Multi::SplitInsert(_) | Multi::InsertVia(_) => Err(PgError::new(
                    "0A000",
                    "EXPLAIN ANALYZE of an INSERT whose rows go to several shards is not supported (explain it without ANALYZE)",
                )),
                _ => Ok(Multi::Explain),
            };
        }
        Ok(match (a.kind, &a.merge) {
            _ if a.explain => Multi::Explain,
            (Kind::Ddl, _) => Multi::Ddl,
            (Kind::Read | Kind::Other, Some(Ok(_)))
                if a.cursor.as_ref().is_some_and(|c| c.binary) =>
            {
                return Err(PgError::new(
                    "0A000",
                    "a BINARY cursor over several shards is not supported (declare it without BINARY)",
                ));
            }
            (Kind::Read | Kind::Other, Some(Ok(spec))) => Multi::Merge(Box::new(spec.clone())),
            (Kind::Read | Kind::Other, Some(Err(why))) => {
                return Err(PgError::new("0A000", why.clone()));
            }
            (Kind::Read | Kind::Other, None) => {
                return Err(PgError::new(
                    "0A000",
                    "this statement over several shards cannot be merged",
                ));
            }
            // Each shard's primary locks the rows it returns: all of them, or a LIMIT
            // would lock rows the client never gets.
            (Kind::Write, Some(Ok(spec))) if a.locking_read => {
                if spec.limit.is_some()
                    || spec.offset > 0
                    || spec.limit_param.is_some()
                    || spec.offset_param.is_some()
                {
                    return Err(PgError::new(
                        "0A000",
                        "FOR UPDATE/SHARE with LIMIT or OFFSET over several shards is not supported: each shard would lock rows pgshard does not return",
                    )
                    .with_hint("Lock the rows by their shard keys, or without LIMIT."));
                }
                Multi::Merge(Box::new(spec.clone()))
            }
            // Each shard inserts the rows it makes from its own rows.
            (Kind::Write, _) if a.insert_select => Multi::Write { sum: true },
            (Kind::Write, _) if a.insert_via.is_some() => {
                Multi::InsertVia(a.insert_via.clone().expect("checked"))
            }
            (Kind::Write, _) if a.inserts_sharded => match &a.insert_split {
                Some(split) => {
                    match self
                        .db
                        .router
                        .split_insert(split, &Default::default(), &self.zone)
                    {
                        Ok(parts) => Multi::SplitInsert(parts),
                        Err(e) => return Err(PgError::new(e.sqlstate(), e.to_string())),
                    }
                }
                None => {
                    return Err(PgError::new(
                        "0A000",
                        format!("this INSERT needs shards {shards:?}, and only INSERT ... VALUES can be split over shards"),
                    )
                    .with_hint("Insert the rows of each shard key separately."));
                }
            },
            (Kind::Write, _) if a.writes_reference => Multi::Write { sum: false },
            (Kind::Write, _) if sharded_writes_allowed => Multi::Write { sum: true },
            (Kind::Write, _) => {
                return Err(PgError::new(
                    "0A000",
                    format!("this write needs shards {shards:?}, and cross_shard_writes is deny"),
                )
                .with_hint("Add a shard key condition, or set cross_shard_writes: allow for this database (all or none, with two-phase commit)."));
            }
        })
    }

    /// A statement over several shards (simple protocol, outside a transaction).
    pub(super) async fn run_multi(
        &mut self,
        sql: &str,
        shards: Vec<usize>,
        a: &Analysis,
    ) -> Result<(), SessionError> {
        if self.status != b'I' && !self.can_run_in_transaction() {
            let e = cross_shard_txn(self.home_shard(), &shards);
            self.answer_error(e);
            return Ok(());
        }
        let plan = match self.multi_plan(&shards, a) {
            Ok(p) => p,
            Err(e) => {
                self.answer_error(e);
                return Ok(());
            }
        };
        if let Some(e) = a.cursor.as_ref().and_then(|c| self.cursor_refused(c)) {
            self.answer_error(e);
            return Ok(());
        }
        // Inside a transaction the statement joins every shard it needs; outside one, a
        // write runs in an implicit transaction over them, committed with two-phase commit.
        // Reads outside a transaction need no transaction: they run in parallel below.
        // An INSERT ... SELECT through pgshard reads, then writes: one transaction, whatever
        // the commit protocol.
        let reads = matches!(plan, Multi::Merge(_))
            || (matches!(plan, Multi::Explain) && a.kind <= Kind::Read);
        let transactional = self.status != b'I'
            || (!reads
                && self.db.config.two_phase_commit == crate::config::TwoPhaseCommit::On
                && self.mode == PoolMode::Transaction
                && !scatter::needs_autocommit(sql))
            || matches!(plan, Multi::InsertVia(_)) && self.mode == PoolMode::Transaction;
        if transactional {
            return self.run_multi_tx(sql, shards, plan, a).await;
        }
        self.settle().await?;
        for &s in &shards {
            let st = &self.db.shards[s].stats;
            crate::metrics::inc(match plan {
                Multi::Ddl | Multi::Write { .. } => &st.broadcast,
                _ => &st.cross_shard,
            });
        }
        let prelude = self.settings_sql();
        let nodes = self.read_nodes(&shards);
        let started = std::time::Instant::now();
        if let Multi::Merge(spec) = &plan
            && streams(spec, a)
        {
            // Rows that only concatenate: streamed, not held.
            let sql = a.shard_sql.as_deref().unwrap_or(sql);
            self.stream_rows(&nodes, scatter::Request::Simple(sql), &prelude, true)
                .await?;
            self.cross_shard_done(&shards, "stream", started.elapsed(), sql);
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        if let Multi::Merge(spec) = &plan
            && sorted_streams(spec, a)
        {
            use super::sorted_stream::Sorted;
            let req = scatter::Request::Simple(a.shard_sql.as_deref().unwrap_or(sql));
            let (kind, out) = match self
                .stream_sorted(&nodes, req, (&prelude, true), spec, &[])
                .await?
            {
                Sorted::Streamed(_) => ("stream", Ok(BytesMut::new())),
                Sorted::Held(results) => {
                    let settings = (Some(&prelude[..]), self.settings_fp);
                    let merged = crate::exec::finalize::merged_and_finished(
                        &self.db,
                        nodes[0],
                        results,
                        spec,
                        (&[], &[]),
                        None,
                        settings,
                    )
                    .await;
                    ("merge", merged)
                }
            };
            self.cross_shard_done(&shards, kind, started.elapsed(), sql);
            self.write_answer(out);
            return Ok(());
        }
        let out = match &plan {
            Multi::Merge(spec) => {
                let merged = match scatter::run_on_shards(
                    &self.db,
                    &nodes,
                    scatter::Request::Simple(a.shard_sql.as_deref().unwrap_or(sql)),
                    Some(&prelude),
                    self.settings_fp,
                )
                .await
                {
                    Ok(r) => {
                        let settings = (Some(&prelude[..]), self.settings_fp);
                        crate::exec::finalize::merged_and_finished(
                            &self.db,
                            nodes[0],
                            r,
                            spec,
                            (&[], &[]),
                            None,
                            settings,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                merged.map(|out| self.merged_answer(a, out))
            }
            Multi::SplitInsert(split) => scatter::run_each_all_or_none(
                &self.db,
                &split.parts,
                Some(&prelude),
                self.settings_fp,
            )
            .await
            .map(|r| {
                let r = scatter::in_row_order(r, &split.shards(), &split.row_shards);
                scatter::combine_writes(r, true)
            }),
            Multi::InsertVia(via) => Err(PgError::new(
                "0A000",
                match via.how {
                    Via::Computed(_) => {
                        "an INSERT whose shard keys a server must evaluate (an expression, or text pgshard cannot read as the key's type) needs transaction pooling mode"
                    }
                    Via::Select => {
                        "INSERT ... SELECT whose rows pgshard must split by key needs transaction pooling mode"
                    }
                    Via::Unlisted => {
                        "an INSERT into a sharded table over several shards without a column list needs transaction pooling mode (or name the columns)"
                    }
                },
            )),
            Multi::Explain if reads => scatter::run_on_shards(
                &self.db,
                &nodes,
                scatter::Request::Simple(sql),
                Some(&prelude),
                self.settings_fp,
            )
            .await
            .map(|r| scatter::explain_result(r, &shards)),
            Multi::Ddl | Multi::Write { .. } | Multi::Explain => {
                scatter::run_all_or_none(&self.db, &shards, sql, Some(&prelude), self.settings_fp)
                    .await
                    .map(|r| match plan {
                        Multi::Write { sum } => scatter::combine_writes(r, sum),
                        Multi::Explain => scatter::explain_result(r, &shards),
                        _ => scatter::broadcast_result(r),
                    })
            }
        };
        let kind = match plan {
            Multi::Merge(_) => "merge",
            Multi::SplitInsert(_) => "split insert",
            Multi::Ddl => "broadcast ddl",
            Multi::Write { .. } => "broadcast write",
            Multi::InsertVia(_) => "insert select",
            Multi::Explain => "explain",
        };
        self.cross_shard_done(&shards, kind, started.elapsed(), sql);
        self.write_answer(out);
        Ok(())
    }

    /// A simple Query's answer (or pgshard's error in its place), then ReadyForQuery.
    fn write_answer(&mut self, out: Result<BytesMut, PgError>) {
        self.relay.drain_local(&mut self.cout);
        match out {
            Ok(bytes) => self.cout.extend_from_slice(&bytes),
            Err(e) => {
                self.db.shards[self.home_shard()].stats.error(e.code);
                e.write(&mut self.cout)
            }
        }
        protocol::write_ready(&mut self.cout, self.status);
    }

    /// The client's answer from a query's merged rows: as they are, held as a DECLARE's
    /// cursor, or written as a COPY's data.
    pub(super) fn merged_answer(&mut self, a: &Analysis, out: bytes::BytesMut) -> bytes::BytesMut {
        match (&a.cursor, &a.copy_to) {
            (Some(c), _) => self.declare_cursor(c, out),
            (None, Some(cs)) => crate::exec::copy_text::from_merged(&out, cs),
            (None, None) => out,
        }
    }

    /// Logs a request pgshard ran over several shards (debug; warn when slow).
    pub(super) fn cross_shard_done(
        &self,
        shards: &[usize],
        kind: &str,
        took: std::time::Duration,
        sql: &str,
    ) {
        tracing::debug!(shards = ?shards, kind, micros = took.as_micros() as u64, "request done");
        if self.slow.is_some_and(|s| took >= s) {
            let head: String = sql.chars().take(500).collect();
            tracing::warn!(shards = ?shards, kind, ms = took.as_millis() as u64, statement = %head, "slow query");
        }
    }
}
